//! `cargo xtask soak [--minutes N]`: the load-and-soak run of issue #13 (item 8) for N
//! minutes (default 10). It is the test `tests/tests/soak.rs` (a one-minute slice in `cargo
//! xtask test`) run longer through `VISCUM_SOAK_MINUTES`; the scenario and the properties it
//! asserts are in `tests/src/soak/mod.rs`. Needs root (namespaces, eBPF).

use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};

use crate::{build, process, setup};

/// Options of `cargo xtask soak`.
#[derive(clap::Args)]
pub struct Options {
    /// Minutes of load.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
}

/// `cargo xtask soak`.
pub fn run(opts: &Options) -> Result<ExitCode> {
    if !(opts.minutes > 0.0 && opts.minutes <= 24.0 * 60.0) {
        bail!(
            "--minutes {}: must be more than 0 and at most a day (1440)",
            opts.minutes
        );
    }
    if !process::is_root() {
        bail!("the soak needs root (network namespaces, eBPF)");
    }
    setup::ensure()?;
    let viscum = build::viscum_debug()?;
    let mut cmd = process::cargo();
    cmd.args([
        "test",
        "-p",
        "viscum-tests",
        "--test",
        "soak",
        "--",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("VISCUM_BIN", &viscum)
    .env("VISCUM_SOAK_MINUTES", opts.minutes.to_string());
    println!("+ {}", process::display(&cmd));
    let status = cmd.status().context("cannot start cargo test")?;
    Ok(process::exit_code(status))
}
