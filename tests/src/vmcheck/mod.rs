//! `viscum-vmcheck`: the guest runner of the VM kernel matrix (and a quick self-check on any
//! machine).
//!
//! # As PID 1 of a VM guest
//!
//! The initramfs is `/init` (this program), `/bin/viscum` and `/modules/NN-<name>.ko`. The
//! runner mounts proc, sysfs, devtmpfs, tmpfs on `/run` and `/tmp`, bpffs on `/sys/fs/bpf` and
//! cgroup2 on `/sys/fs/cgroup` ([`init`]), loads the modules in name order, brings `lo` up,
//! runs the checks, prints its records and powers the machine off. The VM's name comes from
//! `vmcheck.name=` on the kernel command line.
//!
//! # Anywhere else
//!
//! Not PID 1, it skips mounting, modules and power-off, finds `viscum` through `--viscum PATH`,
//! `$VISCUM_BIN`, or next to its own executable, and exits 0 on success and 1 on failure.
//!
//! # Checks (all in one [`Lab`], loaded once: an emulated load takes a minute)
//!
//! * (a) `attach`: `viscum attach lan0`; the programs' verifier statistics and sizes. A failed
//!   load is a failed case carrying viscum's whole error (the verifier's last lines), and then
//!   `failed-attach-leaves-nothing` checks that nothing stayed pinned or attached;
//! * (b) the verdict fixtures of [`crate::verdicts`];
//! * (c) real traffic ([`checks::smoke`]): TCP and UDP over IPv4 and IPv6 go cloud, edge,
//!   cloud as an entry comes and goes;
//! * (e) `cgroup-limits` ([`limits`]): memory, cpu and pids limits through the real daemon,
//!   on the guest's cgroup v2 (v1 on a hybrid host): an OOM kill inside the service's group,
//!   its restart and `oom_kills` in `status`;
//! * (f) `seccomp` ([`seccomp`]): a service of the real daemon runs under its seccomp filter
//!   (`Seccomp: 2`, `NoNewPrivs: 1`; `bpf`, `unshare(CLONE_NEWUSER)` refused, `clone3`
//!   `ENOSYS`) — on s390x, the hand-built classic-BPF filter;
//! * (d) `detach-leaves-nothing` (`viscum detach lan0`) and `teardown-leaves-nothing`
//!   (`viscum detach --all --purge` with a service namespace still there, then `viscum ns
//!   del`): no pin, no clsact qdisc, no TCX program left.
//!
//! # Output (one record per line, stdout; stderr goes to the console too)
//!
//! ```text
//! VMCHECK <progress>
//! VMCHECK-CASE <name> pass|fail <ms> <detail on one line>
//! VMCHECK-REPORT {"vm": ..., "kernel": ..., "arch": ..., "attach": ..., "programs": [...],
//!                 "jit": "0|1|2"|null, "btf": bool, "cases": [...]}     (on one line)
//! VMCHECK-RESULT PASS|FAIL                                              (always last)
//! ```
//!
//! A panic still ends with the report so far and `VMCHECK-RESULT FAIL` (and the power-off):
//! with `panic = "unwind"` a panicking case just fails and the run goes on; with
//! `panic = "abort"` the panic hook prints the report and the result before the abort.

pub mod checks;
pub mod init;
pub mod limits;
pub mod seccomp;

use std::{
    ffi::CStr,
    io::Write as _,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Mutex, MutexGuard},
};

use crate::{
    cases::{CaseResult, one_line, panic_message, run_case},
    lab::Lab,
    verdicts,
};

/// Where the guest's initramfs puts the `viscum` binary.
pub const GUEST_VISCUM: &str = "/bin/viscum";

/// The report being built; global so that the panic hook can still print it.
static REPORT: Mutex<Option<Report>> = Mutex::new(None);

/// Everything `VMCHECK-REPORT` carries.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The VM's name: `--name`, else `vmcheck.name=` from the kernel command line, else "host".
    pub vm: String,
    /// The kernel release from uname(2), e.g. `6.1.0-28-amd64`.
    pub kernel: String,
    /// The machine from uname(2), e.g. `x86_64`, `s390x`.
    pub arch: String,
    /// `viscum attach`'s standard output.
    pub attach: String,
    /// Sizes of the pinned programs after `viscum attach` (see [`checks::program_stats`]).
    pub programs: Vec<checks::ProgramStats>,
    /// `/proc/sys/net/core/bpf_jit_enable`, when readable.
    pub jit: Option<String>,
    /// `/sys/kernel/btf/vmlinux` exists.
    pub btf: bool,
    /// Every finished case, in the order it ran.
    pub cases: Vec<CaseResult>,
}

impl Report {
    /// The report as the single-line JSON object of the guest contract.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "vm": self.vm,
            "kernel": self.kernel,
            "arch": self.arch,
            "attach": self.attach,
            "programs": self.programs.iter().map(checks::ProgramStats::to_json).collect::<Vec<_>>(),
            "jit": self.jit,
            "btf": self.btf,
            "cases": self.cases.iter().map(CaseResult::to_json).collect::<Vec<_>>(),
        })
    }

    /// Passed: at least one case ran and none failed.
    pub fn passed(&self) -> bool {
        !self.cases.is_empty() && self.cases.iter().all(|c| c.pass)
    }
}

/// Command-line options.
#[derive(Debug, Default)]
struct Options {
    /// The `viscum` binary to drive.
    viscum: Option<PathBuf>,
    /// The name to report (default: `vmcheck.name=` from the kernel command line, or "host").
    name: Option<String>,
}

const USAGE: &str = "usage: viscum-vmcheck [--viscum PATH] [--name NAME]\n\
    Runs viscum's VM-matrix checks (attach, verdict fixtures, real traffic, teardown) in \
    namespaces it creates and prints VMCHECK records. As PID 1 of a VM guest it also mounts \
    the base file systems, loads /modules/*.ko and powers off at the end.";

fn parse_args() -> Result<Options, String> {
    let mut opts = Options::default();
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |what: &str| {
            args.next()
                .ok_or_else(|| format!("{what} needs a value\n{USAGE}"))
        };
        match arg.to_str() {
            Some("--viscum") => opts.viscum = Some(PathBuf::from(value("--viscum")?)),
            Some("--name") => {
                opts.name = Some(value("--name")?.to_string_lossy().into_owned());
            }
            Some("-h" | "--help") => return Err(USAGE.to_string()),
            // The kernel passes unknown command-line words on to init as arguments: ignore.
            _ if std::process::id() == 1 => {}
            _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
        }
    }
    Ok(opts)
}

/// Prints one line on stdout and flushes it, so the console shows it at once.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn progress(text: &str) {
    say(&format!("VMCHECK {}", one_line(text)));
}

fn case_line(c: &CaseResult) {
    say(&format!(
        "VMCHECK-CASE {} {} {} {}",
        c.name,
        if c.pass { "pass" } else { "fail" },
        c.ms,
        one_line(&c.detail)
    ));
}

fn report() -> MutexGuard<'static, Option<Report>> {
    REPORT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records a finished case: its console line, and the report.
fn record(c: CaseResult) {
    case_line(&c);
    if let Some(r) = report().as_mut() {
        r.cases.push(c);
    }
}

/// Prints the report and the result line; returns whether it passed. `extra_failure` forces a
/// failure (a panic outside any case).
fn finish(report: Option<Report>, extra_failure: bool) -> bool {
    let report = report.unwrap_or_default();
    say(&format!("VMCHECK-REPORT {}", report.to_json()));
    let pass = report.passed() && !extra_failure;
    say(&format!(
        "VMCHECK-RESULT {}",
        if pass { "PASS" } else { "FAIL" }
    ));
    pass
}

/// `(release, machine)` from uname(2), e.g. `("6.1.0-28-amd64", "x86_64")`.
pub fn uname() -> (String, String) {
    // SAFETY: utsname is plain bytes; uname fills it with NUL-terminated strings.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer.
    if unsafe { libc::uname(&raw mut u) } != 0 {
        return ("unknown".into(), "unknown".into());
    }
    let field = |f: &[libc::c_char]| {
        // SAFETY: uname NUL-terminates every field within its array.
        unsafe { CStr::from_ptr(f.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    (field(&u.release), field(&u.machine))
}

/// The `viscum` binary: `--viscum`, `$VISCUM_BIN`, [`GUEST_VISCUM`] (as PID 1), or `viscum`
/// next to this executable (`target/<profile>/`).
fn find_viscum(opts: &Options, pid1: bool) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = [
        opts.viscum.clone(),
        std::env::var_os("VISCUM_BIN").map(PathBuf::from),
        pid1.then(|| PathBuf::from(GUEST_VISCUM)),
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("viscum"))),
    ]
    .into_iter()
    .flatten()
    .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            format!(
                "no viscum binary (tried {}); pass --viscum PATH or set VISCUM_BIN",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// In a binary built with `panic = "abort"`, a panic ends the process before any
/// `catch_unwind` sees it: the hook then prints the report so far and the failed result, and
/// (as PID 1) powers off. Otherwise it only adds a `VMCHECK` line to the default message.
fn install_panic_hook(pid1: bool) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        progress(&format!(
            "panic{location}: {}",
            panic_message(info.payload())
        ));
        default(info);
        if cfg!(panic = "abort") {
            // try_lock: the panic may have happened while the report was locked.
            let report = REPORT.try_lock().ok().and_then(|r| r.clone());
            finish(report, true);
            if pid1 {
                init::power_off();
            }
        }
    }));
}

/// Test hook: `VMCHECK_INJECT_PANIC=case` panics inside a case, `=runner` outside any case, so
/// tests can check that a panic still ends with the report and `VMCHECK-RESULT FAIL`.
pub const INJECT_PANIC_ENV: &str = "VMCHECK_INJECT_PANIC";

fn inject_panic_for_test() {
    match std::env::var(INJECT_PANIC_ENV).as_deref() {
        Ok("case") => record(run_case("injected-panic", || {
            panic!("panic injected by {INJECT_PANIC_ENV}=case")
        })),
        Ok("runner") => panic!("panic injected by {INJECT_PANIC_ENV}=runner"),
        _ => {}
    }
}

/// Entry point of the `viscum-vmcheck` binary.
pub fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    if !pid1 && std::env::args().nth(1).as_deref() == Some(seccomp::PROBE_ARG) {
        seccomp::probe_main();
    }
    let opts = match parse_args() {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    install_panic_hook(pid1);
    let outcome = catch_unwind(AssertUnwindSafe(|| run(&opts, pid1)));
    let panicked = outcome.is_err();
    if let Err(panic) = &outcome {
        progress(&format!(
            "the runner panicked outside any case: {}",
            panic_message(&**panic)
        ));
    }
    let report = report().take();
    let pass = finish(report, panicked);
    if pid1 {
        init::power_off();
    }
    if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Everything between start and the final records.
fn run(opts: &Options, pid1: bool) {
    let mut early = Vec::new();
    if pid1 {
        // Mounts first: until /dev is there, there may be no console to print on.
        early.push(init::setup());
    }
    let (kernel, arch) = uname();
    let vm = opts
        .name
        .clone()
        .or_else(init::cmdline_name)
        .unwrap_or_else(|| "host".into());
    *report() = Some(Report {
        vm: vm.clone(),
        kernel: kernel.clone(),
        arch: arch.clone(),
        jit: std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
            .ok()
            .map(|s| s.trim().to_string()),
        btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        ..Report::default()
    });
    progress(&format!(
        "viscum-vmcheck on {vm}: kernel {kernel}, {arch}, {}",
        if pid1 { "PID 1" } else { "not PID 1" }
    ));
    for c in early {
        record(c);
    }
    if pid1 {
        record(init::load_modules(&mut |line| progress(line)));
    }
    inject_panic_for_test();

    let viscum = match find_viscum(opts, pid1) {
        Ok(p) => p,
        Err(e) => {
            record(CaseResult {
                name: "viscum-binary".into(),
                pass: false,
                ms: 0,
                detail: e,
            });
            return;
        }
    };
    progress(&format!("using {}", viscum.display()));
    // SAFETY: no other thread exists yet that could read the environment concurrently (the
    // checks' threads all start later); the lab finds the binary through this variable.
    unsafe { std::env::set_var("VISCUM_BIN", &viscum) };

    let mut lab = None;
    record(run_case("lab-setup", || {
        let l = Lab::new();
        let detail = format!(
            "client {}, edge {}, cloud {}, bpffs {}",
            l.client.name(),
            l.edge.name(),
            l.cloud.name(),
            l.bpffs.path().display()
        );
        lab = Some(l);
        Ok(detail)
    }));
    let Some(lab) = lab else { return };

    progress("attaching (under emulation the verifier may take minutes)");
    let attached = checks::attach(&lab);
    for line in &attached.error_lines {
        progress(&format!("attach: {line}"));
    }
    if let Some(r) = report().as_mut() {
        r.attach = attached.stdout.clone();
        r.programs = attached.programs.clone();
    }
    let loaded = attached.case.pass;
    record(attached.case);
    if !loaded {
        record(checks::failed_attach_leftovers(&lab));
        progress("the datapath is not loaded: skipping the fixtures, traffic and teardown checks");
        return;
    }

    progress("verdict fixtures (BPF_PROG_TEST_RUN)");
    let fixtures = verdicts::run(&lab, &mut |c| case_line(c));
    if let Some(r) = report().as_mut() {
        r.cases.extend(fixtures);
    }

    progress("real traffic through namespaces");
    let (smoke, smoke_ns) = checks::smoke(&lab, &mut |c| case_line(c));
    if let Some(r) = report().as_mut() {
        r.cases.extend(smoke);
    }

    progress("cgroup limits through the daemon");
    match std::env::current_exe() {
        Ok(hog) => record(limits::cgroup_limits(&lab, &hog, &[])),
        Err(e) => record(CaseResult {
            name: "cgroup-limits".into(),
            pass: false,
            ms: 0,
            detail: format!("cannot find this executable (the hog): {e}"),
        }),
    }

    progress("the services' seccomp filter through the daemon");
    match std::env::current_exe() {
        Ok(probe) => record(seccomp::seccomp(&lab, &probe, &[])),
        Err(e) => record(CaseResult {
            name: "seccomp".into(),
            pass: false,
            ms: 0,
            detail: format!("cannot find this executable (the probe): {e}"),
        }),
    }

    progress("detach and teardown");
    record(checks::detach(&lab));
    record(checks::teardown(&lab, smoke_ns.as_slice()));
    drop(lab);
}
