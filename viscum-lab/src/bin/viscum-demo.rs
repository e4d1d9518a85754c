//! `viscum-demo` (started by `cargo xtask run --demo NAME`): one of the paper's use cases in
//! its own lab, with its figures printed; see [`viscum_lab::demo`].

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use viscum_lab::{
    demo::{self, Demo},
    shout,
};

/// Options of the demos.
#[derive(Parser)]
#[command(about = "Viscum's demos: the paper's use cases in namespaces, measured")]
struct Args {
    /// The viscum binary to run in the edge namespace.
    #[arg(long, value_name = "PATH")]
    viscum: PathBuf,
    /// Which demo.
    #[arg(long, value_enum)]
    demo: Demo,
    /// A few seconds of traffic instead of the full run (what the tests run).
    #[arg(long)]
    smoke: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            shout!("error: demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demos create network namespaces and attach eBPF programs: run them as root");
    }
    let viscum = std::path::absolute(&args.viscum)
        .with_context(|| format!("cannot resolve {}", args.viscum.display()))?;
    if !viscum.is_file() {
        bail!("--viscum {}: no such file", viscum.display());
    }
    // SAFETY: set before any other thread exists; the lab reads it to find the binary.
    unsafe { std::env::set_var("VISCUM_BIN", &viscum) };
    demo::run(args.demo, args.smoke)?;
    Ok(())
}
