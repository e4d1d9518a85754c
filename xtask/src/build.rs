//! `cargo xtask build`: set up, then build `viscum-user`.
//!
//! The eBPF object needs no separate step: `viscum-user/build.rs` builds it
//! with aya-build (nightly + bpf-linker) and embeds it in the binary.

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};

use crate::{process, setup};

/// Options of `cargo xtask build`.
#[derive(clap::Args)]
pub struct Options {
    /// Build with the release profile.
    #[arg(long)]
    release: bool,
    /// Build for this target triple (e.g. aarch64-unknown-linux-musl) instead of the host.
    #[arg(long, value_name = "TRIPLE")]
    target: Option<String>,
}

/// `cargo xtask build`.
pub fn run(opts: &Options) -> Result<ExitCode> {
    setup::ensure()?;
    let mut args = vec!["build", "-p", "viscum-user"];
    if opts.release {
        args.push("--release");
    }
    if let Some(target) = &opts.target {
        args.extend(["--target", target]);
    }
    let binary = cargo_build(&args)?;
    println!("built {}", binary.display());
    Ok(ExitCode::SUCCESS)
}

/// Builds the `viscum` binary (debug profile, host) and returns its absolute path.
pub fn viscum_debug() -> Result<PathBuf> {
    cargo_build(&["build", "-p", "viscum-user", "--bin", "viscum"])
}

/// Runs `cargo <args>` and returns the path of the `viscum` executable it built.
///
/// Cargo's own JSON messages tell where the binary went, so this is right
/// whatever `CARGO_TARGET_DIR`, `--target` or profile is in force; the
/// `-render-diagnostics` variant keeps warnings and errors human-readable on
/// stderr.
pub fn cargo_build(args: &[&str]) -> Result<PathBuf> {
    cargo_build_bin(args, "viscum-user", "viscum")
}

/// Runs `cargo <args>` and returns the path of binary `bin` of package `package` it built
/// (see [`cargo_build`]).
pub fn cargo_build_bin(args: &[&str], package: &str, bin: &str) -> Result<PathBuf> {
    let mut cmd = process::cargo();
    cmd.args(args);
    built_bin(cmd, package, bin)
}

/// Runs a prepared cargo build command `cmd` (JSON messages added here) and returns the path
/// of binary `bin` of package `package` it built. Lines that are not cargo's JSON (a build
/// script printing to stdout) are passed on.
///
/// # Errors
/// Cargo cannot be started or fails, or it built no such binary.
pub fn built_bin(mut cmd: Command, package: &str, bin: &str) -> Result<PathBuf> {
    let manifest = format!("{package}/Cargo.toml");
    let mut binary = None;
    cmd.arg("--message-format=json-render-diagnostics");
    let status = process::each_stdout_line(&mut cmd, |line| {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            println!("{line}");
            return;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == bin
            && msg["target"]["kind"][0] == "bin"
            && msg["manifest_path"]
                .as_str()
                .is_some_and(|p| p.ends_with(&manifest))
            && let Some(exe) = msg["executable"].as_str()
        {
            binary = Some(PathBuf::from(exe));
        }
    })?;
    if !status.success() {
        bail!("`{}` failed ({status})", process::display(&cmd));
    }
    binary.with_context(|| format!("cargo built no `{bin}` binary"))
}
