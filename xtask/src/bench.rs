//! `cargo xtask bench`: placeholder until the benchmarks exist.

use std::process::ExitCode;

use anyhow::Result;

/// `cargo xtask bench`: fails on purpose, so nobody mistakes it for a pass.
pub fn run() -> Result<ExitCode> {
    eprintln!("benchmarks: not implemented yet");
    Ok(ExitCode::FAILURE)
}
