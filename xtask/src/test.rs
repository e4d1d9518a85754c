//! `cargo xtask test`: set up, build `viscum`, run every test.

use std::{env, ffi::OsString, process::ExitCode};

use anyhow::{Context as _, Result, bail};

use crate::{build, process, setup};

/// Options of `cargo xtask test`.
#[derive(clap::Args)]
pub struct Options {
    /// Extra arguments for the test binaries, e.g. a test name filter.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "TEST_ARGS"
    )]
    args: Vec<OsString>,
}

/// `cargo xtask test`.
pub fn run(opts: &Options) -> Result<ExitCode> {
    let ci = env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !process::is_root() {
        if ci {
            // Privileged tests skip themselves without root; in CI that would
            // turn the run green without testing the datapath at all.
            bail!(
                "CI=true but not running as root: the privileged integration tests must run in CI"
            );
        }
        eprintln!("warning: not root: the privileged integration tests will skip themselves");
    }
    setup::ensure()?;
    let viscum = build::viscum_debug()?;
    let mut cmd = process::cargo();
    // The integration tests build namespaces, veths and bpffs pins and attach
    // programs: they run one at a time so they cannot see each other's state.
    // --no-fail-fast: one CI run should show every failing test binary,
    // not just the first.
    cmd.args([
        "test",
        "--workspace",
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ])
    .args(&opts.args)
    // Tests that drive the real CLI run exactly the binary just built.
    .env("VISCUM_BIN", &viscum);
    println!("+ {}", process::display(&cmd));
    let status = cmd.status().context("cannot start cargo test")?;
    if !status.success() {
        eprintln!("error: tests failed ({status})");
    }
    Ok(process::exit_code(status))
}
