//! Check (f) `seccomp`: a service started by the real daemon runs under its seccomp filter,
//! on whatever architecture the guest is: the `seccompiler` filter on x86_64 and aarch64, the
//! hand-built classic-BPF program (viscum-user's `daemon::seccomp_bpf`) on s390x, where this
//! is the only place it runs on a real kernel.
//!
//! The service is `viscum-vmcheck seccomp-probe` ([`probe_main`]), as `root` (the guest has no
//! other account; without capabilities it is no one special). It prints one line per
//! attempt and then waits to be stopped. What must be seen:
//!
//! * `/proc/self/status`: `Seccomp: 2` (a filter), `NoNewPrivs: 1`;
//! * `bpf(BPF_PROG_LOAD)`, `unshare(CLONE_NEWUSER)` and a raw `clone(CLONE_NEWUSER)` (the
//!   flags second on s390x) fail with `EPERM`;
//! * calls only the filter refuses: `process_vm_readv` of its own memory (allowed to any
//!   process otherwise) fails with `EPERM`, and `clone3` answers `ENOSYS` (a 6.x kernel has
//!   it, and `clone3(NULL, 0)` would be `EINVAL`);
//! * what the filter must let through: `unshare(CLONE_FILES)` (the same call without
//!   `CLONE_NEWUSER`) succeeds, a thread starts (the C library's `clone3` falls back to
//!   `clone`, whose flags the filter reads), and `getpid` works.

use std::{fs, io, path::Path, time::Duration};

use viscum_lab::daemon::{Daemon, DaemonFiles, Service};

use crate::{
    cases::{CaseResult, run_case},
    guard::wait_until,
    lab::Lab,
};

/// The argument that makes `viscum-vmcheck` the probe.
pub const PROBE_ARG: &str = "seccomp-probe";

/// Bound for the service to start and report (an emulated guest is slow).
const BOUND: Duration = Duration::from_secs(120);

/// The result of a raw system call, as the probe prints it: `ok` or `errno N`.
fn outcome(rc: libc::c_long) -> String {
    if rc < 0 {
        format!(
            "errno {}",
            io::Error::last_os_error().raw_os_error().unwrap_or(0)
        )
    } else {
        "ok".into()
    }
}

/// `bpf(BPF_PROG_LOAD)` of the smallest socket filter, `r0 = 0; exit`: the probes' test of
/// whether a service may load BPF (here and in `viscum-probe`). Returns the raw result (the
/// descriptor, closed at once, or -1 with `errno` set). The instructions are stored code
/// byte first on either byte order (`to_le`), so the same program is valid on s390x.
pub fn bpf_prog_load() -> libc::c_long {
    let insns: [u64; 2] = [
        0x0000_0000_0000_00b7u64.to_le(), // BPF_ALU64 | BPF_MOV | BPF_K, r0 = 0 (code byte first)
        0x0000_0000_0000_0095u64.to_le(), // BPF_JMP | BPF_EXIT
    ];
    let license = c"GPL";
    // union bpf_attr, BPF_PROG_LOAD: prog_type u32, insn_cnt u32, insns u64, license u64.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&1u32.to_ne_bytes()); // BPF_PROG_TYPE_SOCKET_FILTER
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // SAFETY: the attribute points at live buffers for the duration of the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 5, attr.as_ptr(), attr.len()) };
    if fd >= 0 {
        // SAFETY: a descriptor we just got.
        unsafe { libc::close(fd as libc::c_int) };
    }
    fd
}

/// `process_vm_readv` of 8 bytes of its own memory.
fn read_own_memory() -> libc::c_long {
    let src = [7u8; 8];
    let mut dst = [0u8; 8];
    let local = libc::iovec {
        iov_base: dst.as_mut_ptr().cast(),
        iov_len: dst.len(),
    };
    let remote = libc::iovec {
        iov_base: src.as_ptr().cast_mut().cast(),
        iov_len: src.len(),
    };
    // SAFETY: both vectors point at live buffers of the stated lengths.
    unsafe {
        libc::syscall(
            libc::SYS_process_vm_readv,
            libc::getpid(),
            &raw const local,
            1,
            &raw const remote,
            1,
            0,
        )
    }
}

/// A raw `clone(CLONE_NEWUSER | SIGCHLD)` without a new stack (a fork into a new user
/// namespace). s390x takes the stack first and the flags second (`CONFIG_CLONE_BACKWARDS2`),
/// the filter's hardest case. A child, were one made, leaves at once and is reaped.
fn clone_newuser() -> libc::c_long {
    let flags = libc::c_long::from(libc::CLONE_NEWUSER | libc::SIGCHLD);
    // SAFETY: fork semantics (no CLONE_VM); the child only calls _exit.
    unsafe {
        #[cfg(target_arch = "s390x")]
        let rc = libc::syscall(libc::SYS_clone, 0, flags, 0, 0, 0);
        #[cfg(not(target_arch = "s390x"))]
        let rc = libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0);
        if rc == 0 {
            libc::_exit(0);
        }
        if rc > 0 {
            libc::waitpid(rc as libc::pid_t, std::ptr::null_mut(), 0);
        }
        rc
    }
}

/// `viscum-vmcheck seccomp-probe`: the service side. Prints `probe NAME: ok|errno N` lines
/// and the status lines, then `probe done`, then waits to be stopped.
pub fn probe_main() -> ! {
    let mut lines = Vec::new();
    lines.push(format!("probe bpf_prog_load: {}", outcome(bpf_prog_load())));
    // SAFETY: plain system calls with constant arguments.
    unsafe {
        lines.push(format!(
            "probe unshare_user: {}",
            outcome(libc::unshare(libc::CLONE_NEWUSER).into())
        ));
        lines.push(format!("probe clone_user: {}", outcome(clone_newuser())));
        lines.push(format!(
            "probe unshare_files: {}",
            outcome(libc::unshare(libc::CLONE_FILES).into())
        ));
        lines.push(format!(
            "probe clone3: {}",
            outcome(libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0))
        ));
        lines.push(format!("probe getpid: {}", outcome(libc::getpid().into())));
    }
    lines.push(format!(
        "probe process_vm_readv_self: {}",
        outcome(read_own_memory())
    ));
    lines.push(format!(
        "probe thread: {}",
        match std::thread::Builder::new()
            .spawn(|| 7)
            .map(std::thread::JoinHandle::join)
        {
            Ok(Ok(7)) => "ok".to_string(),
            Ok(_) => "errno 0".to_string(),
            Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(0)),
        }
    ));
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    for line in status.lines() {
        if line.starts_with("Seccomp:") || line.starts_with("NoNewPrivs:") {
            lines.push(format!("status {line}"));
        }
    }
    lines.push("probe done".into());
    println!("{}", lines.join("\n"));
    loop {
        // SAFETY: waits for the daemon's stop signal.
        unsafe { libc::pause() };
    }
}

/// What the log must show, by line.
const WANT: &[&str] = &[
    "probe bpf_prog_load: errno 1",
    "probe unshare_user: errno 1",
    "probe clone_user: errno 1",
    "probe process_vm_readv_self: errno 1",
    "probe clone3: errno 38",
    "probe unshare_files: ok",
    "probe getpid: ok",
    "probe thread: ok",
];

/// Runs the check with the daemon attached to `interfaces` of `lab` (none in the VM runner,
/// where the lab's datapath is loaded already), the service running `probe` (this binary).
pub fn seccomp(lab: &Lab, probe: &Path, interfaces: &[&str]) -> CaseResult {
    run_case("seccomp", || {
        super::limits::ensure_accounts()?;
        let files = DaemonFiles::new();
        let probe = &super::limits::runnable_copy(probe, files.dir())
            .map_err(|e| format!("cannot copy {} for the service: {e}", probe.display()))?;
        let name = lab.service_ns_name();
        let mut config = files.config();
        config.engine.interfaces = interfaces.iter().map(ToString::to_string).collect();
        let mut svc = Service::new(&name, vec![probe.display().to_string(), PROBE_ARG.into()])
            .matches(&["tcp://198.51.100.8:9198".to_string()]);
        svc.user = Some("root".into());
        config.services.push(svc);
        files.write(&config);
        let daemon = Daemon::start(lab, &files);
        let log = files.run_dir().join("logs").join(format!("{name}.log"));
        let mut text = String::new();
        let done = wait_until(BOUND, || {
            text = fs::read_to_string(&log).unwrap_or_default();
            text.lines().any(|l| l == "probe done")
        });
        let _ = daemon.request(&format!(r#"{{"cmd":"stop","service":"{name}"}}"#));
        drop(daemon);
        if !done {
            return Err(format!(
                "the probe did not report within {BOUND:?}:\n{text}"
            ));
        }
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix("status ")?.strip_prefix(key))
                .map(str::trim)
                .unwrap_or("missing")
                .to_string()
        };
        let mut wrong = Vec::new();
        for (key, want) in [("Seccomp:", "2"), ("NoNewPrivs:", "1")] {
            if field(key) != want {
                wrong.push(format!("{key} {} (want {want})", field(key)));
            }
        }
        for want in WANT {
            if !text.lines().any(|l| l == *want) {
                wrong.push(format!("no '{want}'"));
            }
        }
        if !wrong.is_empty() {
            return Err(format!("{}; the probe said:\n{text}", wrong.join(", ")));
        }
        let (_, arch) = super::uname();
        Ok(format!(
            "{arch}: Seccomp 2, NoNewPrivs 1; bpf, unshare and clone with CLONE_NEWUSER, process_vm_readv EPERM; clone3 ENOSYS; unshare(CLONE_FILES), a thread, getpid allowed"
        ))
    })
}
