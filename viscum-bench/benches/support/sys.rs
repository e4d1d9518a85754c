//! Process plumbing: the stop flag, CPU pinning, commands inside a network namespace, bounded
//! waits, peak RSS of a child and CPU accounting.

use std::{
    fs::File,
    io::Read as _,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal},
    unistd::Pid,
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM/SIGHUP set the stop flag; every loop polls it and unwinds normally, so the
/// guards remove namespaces, children and mounts on the way out.
pub fn install_signal_handlers() {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        if let Err(e) = unsafe { signal::sigaction(sig, &action) } {
            eprintln!("bench: cannot handle {sig}: {e}");
        }
    }
}

pub fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Fails once a stop was requested.
pub fn check_stop() -> Result<()> {
    if stopped() {
        bail!("interrupted");
    }
    Ok(())
}

/// Online CPUs.
pub fn ncpus() -> usize {
    thread::available_parallelism()
        .map(std::num::NonZero::get)
        .unwrap_or(1)
}

/// CPU the client side of a measurement runs on, and the one its server runs on.
pub fn client_cpu() -> usize {
    0
}
pub fn server_cpu() -> usize {
    usize::from(ncpus() > 1)
}

/// Pins the calling thread to `cpu` (best effort: a failure is reported, not fatal).
pub fn pin_current_thread(cpu: usize) {
    let mut set = CpuSet::new();
    if set.set(cpu).is_ok()
        && let Err(e) = sched_setaffinity(Pid::from_raw(0), &set)
    {
        eprintln!("bench: cannot pin to CPU {cpu}: {e}");
    }
}

/// `program` set up to run inside network namespace `ns` (setns on `/run/netns/NS` between
/// fork and exec, keeping our mount namespace so bpffs pins stay visible, unlike
/// `ip netns exec`) and optionally pinned to `cpu`.
pub fn command_in(
    ns: Option<&str>,
    cpu: Option<usize>,
    program: impl AsRef<std::ffi::OsStr>,
) -> Result<Command> {
    command_in_with(ns, cpu, None, program)
}

/// [`command_in`], plus a signal the child gets when this process dies
/// (`PR_SET_PDEATHSIG`), so a benchmark killed outright leaves no server behind. Only for
/// children spawned from the main thread: the signal fires when the spawning *thread* exits.
pub fn command_in_with(
    ns: Option<&str>,
    cpu: Option<usize>,
    death_signal: Option<Signal>,
    program: impl AsRef<std::ffi::OsStr>,
) -> Result<Command> {
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null());
    let file = match ns {
        Some(ns) => Some(
            File::open(Path::new("/run/netns").join(ns))
                .with_context(|| format!("namespace {ns} does not exist"))?,
        ),
        None => None,
    };
    // SAFETY: only async-signal-safe calls (setns, sched_setaffinity) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(f) = &file
                && libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(sig) = death_signal {
                libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong);
            }
            if let Some(cpu) = cpu {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                // Best effort, like taskset on a machine with fewer CPUs.
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set);
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Output of a finished command.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Peak resident set size of the child, KiB (from `wait4`).
    pub max_rss_kib: i64,
    /// Just before the child was spawned.
    pub started: Instant,
    /// From `started` until the child exited.
    pub elapsed: Duration,
}

impl Finished {
    /// Fails unless the command exited 0; the error carries its stderr.
    pub fn ok(self, what: &str) -> Result<Finished> {
        if !self.status.success() {
            bail!("{what} failed ({}): {}", self.status, self.stderr.trim());
        }
        Ok(self)
    }
}

fn reader(pipe: Option<impl std::io::Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf);
            s = String::from_utf8_lossy(&buf).into_owned();
        }
        s
    })
}

/// Runs `cmd` to completion with `stdin` fed to it, killing it (by its pid) after `timeout`.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Finished> {
    let what = format!("{:?}", cmd.get_program());
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let input = stdin.map(<[u8]>::to_vec);
    let writer = child.stdin.take().map(|mut w| {
        thread::spawn(move || {
            if let Some(data) = input {
                let _ = std::io::Write::write_all(&mut w, &data);
            }
        })
    });
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let (status, rss, ended) =
        wait_rusage(&mut child, timeout).with_context(|| format!("running {what}"))?;
    let elapsed = ended.saturating_duration_since(start);
    if let Some(w) = writer {
        let _ = w.join();
    }
    Ok(Finished {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        max_rss_kib: rss,
        started: start,
        elapsed,
    })
}

/// Waits for `child` with `wait4` (for its peak RSS) and returns when it ended. A helper
/// thread blocks in `waitid(WNOWAIT)` and stamps the moment the child exits, so a command's
/// wall time is not rounded up to a polling step (B7 times commands of ~2 ms: polling with a
/// growing sleep reported 3.2 ms for a 1.6 ms exit). Only this thread reaps the child, after
/// the helper saw it exit, so a kill on the deadline or the stop flag can never hit a reused
/// pid; either kills it and fails.
pub fn wait_rusage(child: &mut Child, timeout: Duration) -> Result<(ExitStatus, i64, Instant)> {
    use std::os::unix::process::ExitStatusExt as _;
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = thread::spawn(move || {
        // SAFETY: waitid on our own child with a valid out-pointer; WNOWAIT leaves it
        // unreaped (a zombie) for wait4 below.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &raw mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        let ended = Instant::now();
        let _ = tx.send((r, ended));
    });
    let deadline = Instant::now() + timeout;
    let ended = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok((0, ended)) => break ended,
            Ok((_, _)) => bail!("waitid: {}", std::io::Error::last_os_error()),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => bail!("waitid thread died"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() >= deadline || stopped() {
            let _ = child.kill();
            let _ = waiter.join();
            let _ = child.wait();
            if stopped() {
                bail!("interrupted");
            }
            bail!("timed out after {timeout:?}");
        }
    };
    let _ = waiter.join();
    let mut status: libc::c_int = 0;
    // SAFETY: plain wait4 on our own child, which has exited, with valid out-pointers.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut usage) };
    if r != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    Ok((ExitStatus::from_raw(status), usage.ru_maxrss, ended))
}

/// A long-running child (a server, a proxy) stopped when dropped: SIGTERM, a short grace
/// period, then SIGKILL, always by its own pid.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn spawn(name: impl Into<String>, mut cmd: Command) -> Result<Proc> {
        let name = name.into();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Proc { name, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status})", self.name);
        }
        Ok(())
    }

    /// Waits until the process listens on TCP `port` (read from its own `/proc/PID/net/tcp*`,
    /// which shows the sockets of its network namespace).
    pub fn wait_listening(&mut self, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if listens(self.pid(), port) {
                return Ok(());
            }
            check_stop()?;
            if Instant::now() >= deadline {
                bail!(
                    "{} does not listen on port {port} after {timeout:?}",
                    self.name
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = signal::kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Does the network namespace of `pid` have a TCP socket listening on `port`?
pub fn listens(pid: u32, port: u16) -> bool {
    let want = format!(":{port:04X} ");
    ["tcp", "tcp6"].iter().any(|f| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .map(|t| {
                t.lines().skip(1).any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() > 3 && format!("{} ", cols[1]).ends_with(&want) && cols[3] == "0A"
                })
            })
            .unwrap_or(false)
    })
}

/// Busy and total time of every CPU, from `/proc/stat` (in USER_HZ ticks).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

pub fn cpu_times() -> CpuTimes {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return CpuTimes::default();
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let idle = get(3) + get(4);
    // guest time is already included in user; steal is time we did not get.
    let total = get(0) + get(1) + get(2) + idle + get(5) + get(6);
    CpuTimes {
        busy: total - idle,
        total,
    }
}

/// Busy CPUs (0..=ncpus) between two readings.
pub fn busy_cores(a: CpuTimes, b: CpuTimes) -> f64 {
    let total = b.total.saturating_sub(a.total) as f64;
    if total == 0.0 {
        return f64::NAN;
    }
    b.busy.saturating_sub(a.busy) as f64 / total * ncpus() as f64
}

/// Reads a small text file, trimmed.
pub fn read_trim(path: &str) -> Option<String> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    Some(s.trim().to_owned())
}

/// Sleeps up to `d`, waking early on a stop request.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_stop()?;
        thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}
