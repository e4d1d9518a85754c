//! `cargo xtask dist --test`: a cross-built target proven on this host under qemu-user.
//!
//! 1. The unit tests of viscum-common and viscum-user, built for the target (debug profile,
//!    the same toolchain and flags as the release build) and run by cargo through
//!    `CARGO_TARGET_<T>_RUNNER=qemu-<arch>`. qemu-user has no `bpf()` (ENOSYS), so the unit
//!    tests that need it skip themselves; the datapath itself is proven by the VM kernel
//!    matrix (`cargo xtask vm`, arm64 and big-endian s390x included).
//! 2. The release binary from `target/dist`: `viscum --version` prints this version, and
//!    `viscum run --check` accepts a valid configuration and refuses a broken one with an
//!    error naming the problem.

use std::{fmt, fs, path::Path, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::{
    cross::{self, Prepared},
    process,
};

/// What the proof of one target measured.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Wall time of building and running the unit tests, seconds.
    pub tests_s: f64,
    /// Wall time of `--version` + both `run --check`s, seconds.
    pub cli_s: f64,
    pub version: String,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unit tests {} passed, {} failed, {} ignored ({:.0} s); `{}`, run --check ok ({:.1} s)",
            self.passed, self.failed, self.ignored, self.tests_s, self.version, self.cli_s
        )
    }
}

/// A valid configuration for `run --check` (the README's example, trimmed).
const GOOD_CONFIG: &str = r#"[engine]
interfaces = ["br-lan"]

[[service]]
name = "speedtest"
match = ["tcp://198.51.100.7:5201", "udp://198.51.100.7:5201"]
command = ["iperf3", "-s", "-p", "5201"]
restart = "on-failure"
[service.health]
tcp = 5201
interval_ms = 500
timeout_ms = 300
"#;

/// The same with an impossible address: `run --check` must refuse it, naming it.
const BAD_CONFIG: &str = r#"[engine]
interfaces = ["br-lan"]

[[service]]
name = "speedtest"
match = ["tcp://198.51.100.700:5201"]
command = ["iperf3", "-s", "-p", "5201"]
"#;

/// Runs the unit tests of `p`'s target under qemu-user, then checks `binary` (the release
/// build) there too. Fails on any failed test or check.
pub fn prove(p: Prepared, binary: &Path) -> Result<Report> {
    let mut report = Report::default();
    let t = Instant::now();
    unit_tests(p, &mut report)?;
    report.tests_s = t.elapsed().as_secs_f64();
    if report.failed > 0 || report.passed == 0 {
        bail!(
            "unit tests under {}: {} passed, {} failed",
            p.target.qemu,
            report.passed,
            report.failed
        );
    }
    let t = Instant::now();
    cli_checks(p, binary, &mut report)?;
    report.cli_s = t.elapsed().as_secs_f64();
    println!(
        "dist: {} under {}: {report}",
        p.target.triple, p.target.qemu
    );
    Ok(report)
}

fn unit_tests(p: Prepared, report: &mut Report) -> Result<()> {
    let mut cmd = cross::cargo(p, "test", true)?;
    cmd.args([
        "-p",
        "viscum-common",
        "-p",
        "viscum-user",
        "--lib",
        "--no-fail-fast",
    ])
    .env(
        format!("CARGO_TARGET_{}_RUNNER", cross::env_triple(p.target.triple)),
        p.target.qemu,
    )
    .args(["--", "--test-threads=1"]);
    let status = process::each_stdout_line(&mut cmd, |line| {
        println!("{line}");
        if let Some((passed, failed, ignored)) = result_line(line) {
            report.passed += passed;
            report.failed += failed;
            report.ignored += ignored;
        }
    })?;
    if !status.success() && report.failed == 0 {
        bail!("`{}` failed ({status})", process::display(&cmd));
    }
    Ok(())
}

/// `test result: ok. 12 passed; 0 failed; 1 ignored; ...` -> (12, 0, 1).
fn result_line(line: &str) -> Option<(u64, u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |what: &str| -> Option<u64> {
        rest.split(';')
            .find_map(|part| part.trim().strip_suffix(what))
            .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
    };
    Some((count(" passed")?, count(" failed")?, count(" ignored")?))
}

fn cli_checks(p: Prepared, binary: &Path, report: &mut Report) -> Result<()> {
    let qemu = |args: &[&str]| {
        let mut c = Command::new(p.target.qemu);
        c.arg(binary).args(args);
        c
    };
    let version = process::output(&mut qemu(&["--version"]))?;
    let version = version.trim().to_owned();
    if !version.contains(env!("CARGO_PKG_VERSION")) {
        bail!(
            "`viscum --version` under {} printed '{version}', not version {}",
            p.target.qemu,
            env!("CARGO_PKG_VERSION")
        );
    }
    report.version = version;

    let dir = binary.parent().context("binary has no directory")?;
    let good = dir.join(format!("check-{}.toml", p.target.triple));
    let bad = dir.join(format!("check-bad-{}.toml", p.target.triple));
    fs::write(&good, GOOD_CONFIG).with_context(|| format!("cannot write {}", good.display()))?;
    fs::write(&bad, BAD_CONFIG).with_context(|| format!("cannot write {}", bad.display()))?;
    let path = |p: &Path| p.display().to_string();
    let out = process::output(&mut qemu(&["run", "--check", "--config", &path(&good)]))?;
    if !out.contains("ok (1 service: speedtest)") {
        bail!("`viscum run --check` printed '{}', not ok", out.trim());
    }
    let refused = process::capture(&mut qemu(&["run", "--check", "--config", &path(&bad)]))?;
    let err = String::from_utf8_lossy(&refused.stderr);
    if refused.status.success() || !err.contains("198.51.100.700") {
        bail!(
            "`viscum run --check` of a broken configuration: exit {}, stderr '{}' (expected a refusal naming 198.51.100.700)",
            refused.status,
            err.trim()
        );
    }
    let _ = fs::remove_file(&good);
    let _ = fs::remove_file(&bad);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libtest_summaries() {
        assert_eq!(
            result_line(
                "test result: ok. 78 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 1.2s"
            ),
            Some((78, 0, 2))
        );
        assert_eq!(
            result_line(
                "test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some((3, 1, 0))
        );
        assert_eq!(result_line("running 3 tests"), None);
    }
}
