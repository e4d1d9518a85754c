//! `cargo xtask deb`: the Debian package of Viscum for edge servers.
//!
//! [cargo-deb](https://crates.io/crates/cargo-deb) does the packaging from
//! `[package.metadata.deb]` in `viscum-user/Cargo.toml`: `/usr/sbin/viscum`, the
//! example `/etc/viscum/viscum.toml` (a conffile), `viscum.service` and its
//! maintainer-script snippets, all from `dist/debian/` (see `docs/debian.md`).
//! This command release-builds `viscum` first (through [`build::cargo_build`],
//! like `cargo xtask build`) and then packages that binary with `cargo deb
//! --no-build`, so the build is the project's ordinary one.
//!
//! [`ensure_cargo_deb`] installs the pinned cargo-deb for `cargo xtask setup`
//! (about a minute on two cores; `--locked`, so its dependencies are the ones
//! its release was tested with).

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{build, process, setup};

/// The cargo-deb release `cargo xtask setup` installs (3.8.0 needs rustc 1.85).
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// Options of `cargo xtask deb`.
#[derive(clap::Args)]
pub struct Options {
    /// Target triple to package for (e.g. aarch64-unknown-linux-gnu); default: the host.
    #[arg(long, value_name = "TRIPLE")]
    target: Option<String>,
    /// Directory for the .deb; default: `<target dir>/debian`.
    #[arg(long, short = 'o', value_name = "DIR")]
    output: Option<PathBuf>,
}

/// `cargo xtask deb`.
pub fn run(opts: &Options) -> Result<ExitCode> {
    setup::ensure()?;
    let started = Instant::now();
    let mut args = vec!["build", "--release", "-p", "viscum-user", "--bin", "viscum"];
    if let Some(target) = &opts.target {
        args.extend(["--target", target]);
    }
    let binary = build::cargo_build(&args)?;
    let built = started.elapsed();
    // <target dir>/[<triple>/]release/viscum
    let target_dir = binary
        .ancestors()
        .nth(if opts.target.is_some() { 3 } else { 2 })
        .context("unexpected binary path")?;
    let out = opts
        .output
        .clone()
        .unwrap_or_else(|| target_dir.join("debian"));
    let deb = package(&out, None, opts.target.as_deref(), false)?;
    let size = std::fs::metadata(&deb)?.len();
    println!(
        "{}: {} bytes ({:.1} MiB); release build {:.0?}, package {:.0?}",
        deb.display(),
        size,
        size as f64 / 1024.0 / 1024.0,
        built,
        started.elapsed().checked_sub(built).unwrap()
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `cargo deb --no-build` on the `viscum` binary already built for `profile`
/// (`None`: release) and `target` (`None`: the host), writing the .deb into `out_dir`, and
/// returns its path. `fast` trades size for time (`--fast`: lighter xz).
///
/// # Errors
/// cargo-deb is missing or fails (e.g. the binary was not built), or prints no path.
pub fn package(
    out_dir: &Path,
    profile: Option<&str>,
    target: Option<&str>,
    fast: bool,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let mut cmd = process::cargo();
    cmd.args(["deb", "-p", "viscum-user", "--no-build", "--locked", "-o"])
        .arg(out_dir);
    if let Some(profile) = profile {
        cmd.args(["--profile", profile]);
    }
    if let Some(target) = target {
        cmd.args(["--target", target]);
    }
    if fast {
        cmd.arg("--fast");
    }
    println!("+ {}", process::display(&cmd));
    let output = process::capture(&mut cmd)?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            process::display(&cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    // cargo-deb prints the path of the package it wrote, alone on the last line.
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb printed no .deb path: {stdout}"))
}

/// The version `cargo deb --version` reports (`cargo-deb 3.8.0` -> `3.8.0`), if it runs.
fn cargo_deb_version() -> Option<String> {
    let out = process::capture(process::cargo().args(["deb", "--version"])).ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
}

/// What [`ensure_cargo_deb`] would install, for `cargo xtask setup --check`.
pub fn check_cargo_deb() -> Option<String> {
    match cargo_deb_version() {
        Some(v) if v == CARGO_DEB_VERSION => None,
        Some(v) => Some(format!("cargo-deb {CARGO_DEB_VERSION} (found {v})")),
        None => Some(format!("cargo-deb {CARGO_DEB_VERSION}")),
    }
}

/// Makes sure the pinned cargo-deb is installed. Returns whether it installed it.
pub fn ensure_cargo_deb() -> Result<bool> {
    let Some(missing) = check_cargo_deb() else {
        return Ok(false);
    };
    println!("setup: installing {missing}");
    process::run(process::cargo().args([
        "install",
        "--locked",
        &format!("cargo-deb@{CARGO_DEB_VERSION}"),
    ]))?;
    match cargo_deb_version() {
        Some(v) if v == CARGO_DEB_VERSION => Ok(true),
        other => bail!(
            "cargo deb still reports {other:?} after `cargo install`: is ~/.cargo/bin first on PATH?"
        ),
    }
}
