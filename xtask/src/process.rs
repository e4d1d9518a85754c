//! Helpers for running the commands xtask is made of: print what runs, and
//! turn a failure into an error that names the command and shows its stderr.

use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, ExitCode, ExitStatus, Output},
};

use anyhow::{Context as _, Result, bail};

/// The workspace root, so xtask works from any directory of the tree.
pub fn workspace_root() -> PathBuf {
    // xtask/ sits directly in the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// A `cargo` command run from the workspace root.
///
/// Uses the `cargo` that started xtask (`$CARGO`), so a `cargo +toolchain
/// xtask` keeps its toolchain.
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// The command line of `cmd`, for messages (`ip -n vlab-edge link ...`).
pub fn display(cmd: &Command) -> String {
    let mut line = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            line.push(format!(
                "{}={}",
                key.to_string_lossy(),
                value.to_string_lossy()
            ));
        }
    }
    line.push(cmd.get_program().to_string_lossy().into_owned());
    line.extend(cmd.get_args().map(quote));
    line.join(" ")
}

fn quote(arg: &OsStr) -> String {
    let arg = arg.to_string_lossy();
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=+@,%[]".contains(c));
    if plain {
        arg.into_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with the terminal as its stdin/stdout/stderr, printing it first;
/// fails if it does not exit 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    println!("+ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Prints and runs `cmd` with its stdout piped, hands each line of it to `each` as it
/// comes (stderr stays the terminal's), and returns the exit status.
///
/// # Errors
/// The command cannot be started, its output cannot be read, or waiting for it fails.
pub fn each_stdout_line(cmd: &mut Command, mut each: impl FnMut(&str)) -> Result<ExitStatus> {
    use std::io::{BufRead as _, BufReader};
    cmd.stdout(std::process::Stdio::piped());
    println!("+ {}", display(cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    let stdout = child.stdout.take().context("stdout is piped")?;
    for line in BufReader::new(stdout).lines() {
        each(&line.with_context(|| format!("reading the output of `{}`", display(cmd)))?);
    }
    child
        .wait()
        .with_context(|| format!("waiting for `{}`", display(cmd)))
}

/// Runs `cmd` quietly and returns its stdout; on failure the error carries
/// the command line and its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = capture(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` quietly and returns whatever it produced, success or not.
pub fn capture(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("cannot start `{}`", display(cmd)))
}

/// `true` when `program` is found on `PATH`.
pub fn have(program: &str) -> bool {
    which::which(program).is_ok()
}

/// The exit code to hand on for a child's `status` (1 when it died by a signal).
pub fn exit_code(status: ExitStatus) -> ExitCode {
    match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}

/// `true` under CI (`CI=true` or `CI=1`, as CI services set it): then
/// nothing may be skipped and nothing cached from an earlier run is reused.
pub fn is_ci() -> bool {
    env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// `true` when running as root, which the namespace tests, the lab and
/// `apt-get` need.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Installs Debian `packages` with `apt-get update` and `apt-get install -y`, printing the
/// commands; fails, naming what to install, without apt-get or root.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    if !have("apt-get") {
        bail!(
            "no apt-get on this system: install {} (Debian names) yourself",
            packages.join(" ")
        );
    }
    if !is_root() {
        bail!(
            "installing {} needs root: run `apt-get install -y {}` as root",
            packages.join(" "),
            packages.join(" ")
        );
    }
    let apt = || {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(apt().arg("update"))?;
    run(apt()
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages))
}

/// The packages of `tools` ((program, Debian package) pairs) whose program is not on `PATH`,
/// each once.
pub fn missing_packages<'a>(tools: &[(&str, &'a str)]) -> Vec<&'a str> {
    let mut missing: Vec<&str> = Vec::new();
    for (program, package) in tools {
        if !have(program) && !missing.contains(package) {
            missing.push(package);
        }
    }
    missing
}
