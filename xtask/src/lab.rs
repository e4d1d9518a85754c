//! The lab (`cargo xtask run` without arguments): builds the `viscum-lab` binary of the
//! viscum-lab crate and hands over to it.
//!
//! The lab itself (client, edge running viscum, cloud; until Ctrl-C) is that binary, built on
//! the same `viscum_lab::Lab` topology as the integration tests and the benchmarks. It is exec'd, not spawned: Ctrl-C reaches it directly and its exit code
//! becomes ours, and there is no xtask left whose death (or closed output pipe) could cut
//! its teardown short. xtask itself does not depend on viscum-lab (it must build on a fresh
//! machine before the eBPF toolchain exists).

use std::{os::unix::process::CommandExt as _, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{build, process};

/// Builds `viscum-lab` and execs it with the `viscum` binary at `viscum`; returns only on
/// failure.
pub fn run(viscum: &Path) -> Result<std::process::ExitCode> {
    if !process::is_root() {
        bail!("the lab creates network namespaces and attaches eBPF programs: run it as root");
    }
    let lab = build::cargo_build_bin(
        &["build", "-p", "viscum-lab", "--bin", "viscum-lab"],
        "viscum-lab",
        "viscum-lab",
    )?;
    let mut cmd = Command::new(&lab);
    cmd.arg("--viscum").arg(viscum);
    println!("+ {}", process::display(&cmd));
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot run {}", lab.display()))
}

/// Builds `viscum-demo` and execs it for demo `name` (`--smoke`: briefly) with the `viscum`
/// binary at `viscum`; returns only on failure.
pub fn demo(viscum: &Path, name: &str, smoke: bool) -> Result<std::process::ExitCode> {
    if !process::is_root() {
        bail!("the demos create network namespaces and attach eBPF programs: run them as root");
    }
    let bin = build::cargo_build_bin(
        &["build", "-p", "viscum-lab", "--bin", "viscum-demo"],
        "viscum-lab",
        "viscum-demo",
    )?;
    let mut cmd = Command::new(&bin);
    cmd.arg("--viscum").arg(viscum).args(["--demo", name]);
    if smoke {
        cmd.arg("--smoke");
    }
    println!("+ {}", process::display(&cmd));
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot run {}", bin.display()))
}
