//! The guest runner `viscum-vmcheck`, run on this machine as an ordinary process (not PID 1):
//! every check of the VM kernel matrix must pass on the development kernel, so a broken runner
//! shows up in every `cargo test`, not only in the (slow) matrix.

use std::{
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use viscum_tests::skip_unless_root;

/// Well above the runner's time on this machine (seconds); it only bounds a hang.
const TIMEOUT: Duration = Duration::from_secs(300);

/// Runs the built `viscum-vmcheck` with `env` added; returns its status and stdout (stderr is
/// passed through). Killed (and the test fails) after [`TIMEOUT`].
fn run_vmcheck(env: &[(&str, &str)]) -> (ExitStatus, String) {
    let bin = env!("CARGO_BIN_EXE_viscum-vmcheck");
    let viscum = viscum_tests::lab::viscum_bin();
    let mut child = Command::new(bin)
        .args(["--viscum".as_ref(), viscum.as_os_str()])
        .args(["--name", "host-test"])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"));
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for viscum-vmcheck") {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            // Our own child, by its pid.
            // SAFETY: plain kill(2) on a child not yet reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let _ = child.wait();
            panic!("viscum-vmcheck ran longer than {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().expect("reader thread").expect("read stdout");
    eprintln!("{out}");
    (status, out)
}

/// The report of a run's output, checking that every line is a record of the guest contract.
fn parse_report(out: &str) -> serde_json::Value {
    let lines: Vec<&str> = out.lines().collect();
    for line in &lines {
        assert!(
            [
                "VMCHECK ",
                "VMCHECK-CASE ",
                "VMCHECK-REPORT ",
                "VMCHECK-RESULT "
            ]
            .iter()
            .any(|p| line.starts_with(p)),
            "not a VMCHECK record: {line}"
        );
    }
    let report_line = lines
        .iter()
        .find_map(|l| l.strip_prefix("VMCHECK-REPORT "))
        .expect("a VMCHECK-REPORT line");
    let report: serde_json::Value = serde_json::from_str(report_line).expect("report is JSON");
    let cases = report["cases"].as_array().expect("cases");
    let case_lines = lines
        .iter()
        .filter(|l| l.starts_with("VMCHECK-CASE "))
        .count();
    assert_eq!(cases.len(), case_lines, "one report entry per case line");
    report
}

#[test]
fn vmcheck_passes_on_this_kernel() {
    if skip_unless_root() {
        return;
    }
    let (status, out) = run_vmcheck(&[]);
    assert_eq!(
        out.lines().last(),
        Some("VMCHECK-RESULT PASS"),
        "viscum-vmcheck did not pass ({status})"
    );
    assert!(status.success(), "exit status {status}");
    let report = parse_report(&out);
    assert_eq!(report["vm"], "host-test");
    assert!(report["kernel"].as_str().is_some_and(|k| !k.is_empty()));
    assert!(report["arch"].as_str().is_some_and(|a| !a.is_empty()));
    assert!(report["btf"].is_boolean());
    assert!(report["jit"].is_string() || report["jit"].is_null());
    assert!(
        report["attach"]
            .as_str()
            .is_some_and(|a| a.contains("lan0")),
        "{}",
        report["attach"]
    );
    let programs = report["programs"].as_array().expect("programs");
    let names: Vec<&str> = programs.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "viscum_ingress",
            "viscum_reply",
            "viscum_icmp_ingress",
            "viscum_icmp_reply",
            "viscum_recover"
        ]
    );
    for p in programs {
        // This kernel (>= 5.16) reports verifier statistics; a JIT may or may not be on.
        assert!(p["verified_insns"].as_u64().is_some_and(|n| n > 0), "{p}");
        assert!(p["xlated_bytes"].as_u64().is_some_and(|n| n > 0), "{p}");
        assert!(
            p["jited_bytes"].is_u64() || p["jited_bytes"].is_null(),
            "{p}"
        );
    }
    let cases = report["cases"].as_array().expect("cases");
    for want in [
        "attach",
        "v4-tcp-syn-exact",
        "reply-v4-udp-source-restored",
        "smoke-tcp-v4",
        "smoke-udp-v6",
        "cgroup-limits",
        "seccomp",
        "detach-leaves-nothing",
        "teardown-leaves-nothing",
    ] {
        let case = cases
            .iter()
            .find(|c| c["name"] == want)
            .unwrap_or_else(|| panic!("no case {want} in the report"));
        assert_eq!(case["pass"], true, "{case}");
    }
    assert!(cases.len() >= 50, "{} cases", cases.len());
}

/// A panic, in a case or outside any, still ends the run with the report so far and a failed
/// result: the matrix harness must never wait for a runner that died silently.
#[test]
fn a_panic_still_ends_with_report_and_failure() {
    if skip_unless_root() {
        return;
    }
    for stage in ["runner", "case"] {
        let (status, out) = run_vmcheck(&[("VMCHECK_INJECT_PANIC", stage)]);
        assert_eq!(
            out.lines().last(),
            Some("VMCHECK-RESULT FAIL"),
            "{stage}: last line"
        );
        assert!(!status.success(), "{stage}: exit status {status}");
        let report = parse_report(&out);
        assert_eq!(report["vm"], "host-test", "{stage}");
        if stage == "case" {
            let cases = report["cases"].as_array().expect("cases");
            let injected = cases
                .iter()
                .find(|c| c["name"] == "injected-panic")
                .expect("the injected case is reported");
            assert_eq!(injected["pass"], false);
            assert!(
                injected["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("panic injected")),
                "{injected}"
            );
            // The run went on after the failed case: the datapath checks still passed.
            let attach = cases
                .iter()
                .find(|c| c["name"] == "attach")
                .expect("attach");
            assert_eq!(attach["pass"], true, "{attach}");
        }
    }
}
