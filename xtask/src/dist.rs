//! `cargo xtask dist`: release binaries of `viscum`, one per target.
//!
//! Edge boxes are routers (arm64, armv7, MIPS), so the intended outputs are
//! static musl binaries; the eBPF object is embedded, so each is one file.
//! The release profile already strips symbols and optimizes for size.

use std::{
    fs,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};

use crate::{build, process, setup};

/// Options of `cargo xtask dist`.
#[derive(clap::Args)]
pub struct Options {
    /// Target triple to build for (repeatable); default: the host's musl target
    /// if installed, else the host.
    #[arg(long = "target", value_name = "TRIPLE")]
    targets: Vec<String>,
}

/// `cargo xtask dist`.
pub fn run(opts: &Options) -> Result<ExitCode> {
    setup::ensure()?;
    let host = host_triple()?;
    let installed =
        process::output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    let installed: Vec<&str> = installed.lines().map(str::trim).collect();
    let targets = if opts.targets.is_empty() {
        // A static musl binary runs on any Linux of that arch; fall back to
        // the host's (glibc, dynamic) target rather than fail.
        let musl = host.replace("-gnu", "-musl");
        if installed.contains(&musl.as_str()) {
            vec![musl]
        } else {
            eprintln!(
                "note: {musl} not installed (`rustup target add {musl}`): building a dynamic {host} binary"
            );
            vec![host.clone()]
        }
    } else {
        opts.targets.clone()
    };

    for target in &targets {
        if !installed.contains(&target.as_str()) {
            bail!(
                "target {target} is not installed: `rustup target add {target}` (and a linker for it, see README)"
            );
        }
        let binary = build::cargo_build(&[
            "build",
            "--release",
            "-p",
            "viscum-user",
            "--bin",
            "viscum",
            "--target",
            target,
        ])?;
        // <target dir>/<triple>/release/viscum -> <target dir>/dist/viscum-<triple>
        let target_dir = binary
            .ancestors()
            .nth(3)
            .context("unexpected binary path")?;
        let dist = target_dir.join("dist");
        fs::create_dir_all(&dist).with_context(|| format!("cannot create {}", dist.display()))?;
        let out = dist.join(format!("viscum-{target}"));
        fs::copy(&binary, &out)
            .with_context(|| format!("cannot copy {} to {}", binary.display(), out.display()))?;
        let size = fs::metadata(&out)?.len();
        println!(
            "{}: {} bytes ({:.1} MiB)",
            out.display(),
            size,
            size as f64 / 1024.0 / 1024.0
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn host_triple() -> Result<String> {
    process::output(Command::new("rustc").arg("-vV"))?
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("`rustc -vV` prints no host triple")
}
