//! Developer tasks for Viscum, run as `cargo xtask <command>` (aliased in
//! `.cargo/config.toml`).
//!
//! # Layout
//!
//! One module per command: [`setup`] installs the toolchain and test tools,
//! [`build`] builds the `viscum` binary (and finds it), [`run`] runs it or
//! starts the [`lab`], [`test`](mod@test) runs every test, [`vm`] runs the VM kernel
//! matrix, [`dist`] makes release binaries, [`bench`](mod@bench) runs the benchmarks, [`fuzz`] the packet
//! fuzzer, [`soak`] soaks a daemon under load. [`process`] holds the small helpers
//! they share for running commands.
//!
//! xtask is an edge of the project, so errors are `anyhow` and are printed
//! once, with their whole chain, in `main`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod build;
mod cross;
mod deb;
mod dist;
mod fuzz;
mod lab;
mod package;
mod process;
mod profile;
mod run;
mod setup;
mod soak;
mod test;
mod vm;

/// Developer tasks for Viscum.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing Viscum needs; a quick no-op when all of it is there.
    Setup(setup::Options),
    /// Set up, then `cargo build -p viscum-user` (the `viscum` binary embeds the eBPF object).
    Build(build::Options),
    /// Set up, build, then run all tests (privileged namespace tests need root), then the VM matrix.
    Test(test::Options),
    /// Boot Debian's kernels (6.1, 6.12; amd64, arm64, s390x) under qemu and run the guest checks.
    Vm(vm::Options),
    /// Set up, build, then run `viscum ARGS...`; without ARGS, start the lab until Ctrl-C.
    Run(run::Options),
    /// Release-build stripped `viscum` binaries (static musl where the target is installed).
    Dist(dist::Options),
    /// Release-build `viscum` and package it as a .deb (cargo-deb; docs/debian.md).
    Deb(deb::Options),
    /// Set up, build and run the benchmarks; write bench/results/*.json and bench/RESULTS.md.
    Bench(bench::Options),
    /// Profile one benchmark group's load: samples per kernel function and source line of the
    /// classifier (perf cpu-clock; target/profile/*.md).
    Profile(profile::Options),
    /// Set up, build, then run the packet fuzzer (10M frames by default; docs/fuzzing.md).
    Fuzz(fuzz::Options),
    /// Set up, build, then soak a real daemon under load, flaps and reloads (default 10 min).
    Soak(soak::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup(opts) => setup::run(&opts),
        Command::Build(opts) => build::run(&opts),
        Command::Test(opts) => test::run(&opts),
        Command::Vm(opts) => vm::run(&opts),
        Command::Run(opts) => run::run(opts),
        Command::Dist(opts) => dist::run(&opts),
        Command::Bench(opts) => bench::run(&opts),
        Command::Deb(opts) => deb::run(&opts),
        Command::Profile(opts) => profile::run(&opts),
        Command::Fuzz(opts) => fuzz::run(&opts),
        Command::Soak(opts) => soak::run(&opts),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
