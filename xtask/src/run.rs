//! `cargo xtask run`: run `viscum` with arguments, or start the lab.

use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result};

use crate::{build, lab, process, setup};

/// Options of `cargo xtask run`.
#[derive(clap::Args)]
pub struct Options {
    /// Use this viscum binary instead of building one (e.g. a stub while working on the lab).
    #[arg(long, value_name = "PATH")]
    viscum: Option<PathBuf>,
    /// Run one of the paper's use cases in its own lab instead, printing what it measured:
    /// `speedtest` (iperf3 at the edge vs from the cloud) or `alpr` (image uploads, text
    /// results to the cloud: uploaded vs uplink bytes).
    #[arg(long, value_name = "NAME", value_parser = ["speedtest", "alpr"])]
    demo: Option<String>,
    /// With --demo: a few seconds of traffic instead of the full run.
    #[arg(long, requires = "demo")]
    smoke: bool,
    /// Arguments for `viscum` (e.g. `-- redirect list`); without any, start the lab.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<OsString>,
}

/// `cargo xtask run`.
pub fn run(opts: Options) -> Result<ExitCode> {
    setup::ensure()?;
    let viscum = match opts.viscum {
        Some(path) => std::path::absolute(&path)
            .with_context(|| format!("cannot resolve {}", path.display()))?,
        None => build::viscum_debug()?,
    };
    if let Some(demo) = &opts.demo {
        return lab::demo(&viscum, demo, opts.smoke);
    }
    if opts.args.is_empty() {
        return lab::run(&viscum);
    }
    let mut cmd = Command::new(&viscum);
    cmd.args(&opts.args);
    println!("+ {}", process::display(&cmd));
    // exec, not spawn: viscum gets the terminal's signals directly and its
    // exit code becomes ours without a middleman.
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot run {}", viscum.display()))
}
