//! Starting a service's process inside its namespace, watching it, and stopping it.
//!
//! A service process is started with `fork`/`exec` and, between the two (`pre_exec`, where
//! only async-signal-safe calls are allowed), enters the service's network namespace
//! (`setns` on the already open `/run/netns/NAME`), joins its cgroups, becomes a session and
//! process-group leader (`setsid`, so stopping can signal the whole group) and drops to the
//! configured account (`setgroups`, `setgid`, `setuid`, in that order: the later calls need
//! the privileges the earlier ones give up), inside the sandbox of [`super::sandbox`]: a
//! private `/tmp`, no capabilities in any set, `no_new_privs` and a seccomp filter. stdout and stderr go straight to the service's
//! log file, opened `O_APPEND`, so the process never depends on the daemon to drain a pipe:
//! it keeps running (and logging) while the daemon restarts, which is what makes adoption by
//! the next daemon possible.
//!
//! A process started by a previous daemon is not our child: it cannot be `wait`ed for, but a
//! pidfd (`pidfd_open`, Linux 5.3) becomes readable when it exits, which is all the daemon
//! needs to pull its redirect at once.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    process::Stdio,
    time::Duration,
};

use tokio::io::unix::AsyncFd;

use super::sandbox::Sandbox;
use crate::config::ServiceUser;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited by itself with this status (`WEXITSTATUS`, wait(2)).
    Code(i32),
    /// Killed by this signal number (`WTERMSIG`, signal(7)).
    Signal(i32),
    /// A process we did not start (adopted): its status went to its real parent.
    Unknown,
}

impl Exit {
    /// Exit status 0. An adopted process that vanished counts as a failure: we cannot tell.
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit status {c}"),
            Exit::Signal(s) => {
                let name = nix::sys::signal::Signal::try_from(*s)
                    .map(nix::sys::signal::Signal::as_str)
                    .unwrap_or("?");
                write!(f, "killed by signal {s} ({name})")
            }
            Exit::Unknown => f.write_str("exited (status unknown: started by a previous daemon)"),
        }
    }
}

/// A running service process.
pub enum Proc {
    /// Started by this daemon. The pid is kept: the child forgets it once reaped.
    Child {
        /// The tokio handle that reaps it.
        child: tokio::process::Child,
        /// Its pid (also its process group and session id: it runs `setsid`).
        pid: i32,
    },
    /// Started by a previous daemon and adopted; watched through a pidfd.
    Adopted {
        /// Its pid, as recorded by the previous daemon and checked against its start time.
        pid: i32,
        /// From `pidfd_open(2)`: readable once the process has exited.
        pidfd: AsyncFd<OwnedFd>,
    },
}

impl Proc {
    /// The process id (also its process group id), whichever way it was obtained.
    pub fn pid(&self) -> i32 {
        match self {
            Proc::Child { pid, .. } => *pid,
            Proc::Adopted { pid, .. } => *pid,
        }
    }

    /// Waits for the process to end. Cancel-safe (used in `select!`).
    pub async fn wait(&mut self) -> Exit {
        match self {
            Proc::Child { child, pid } => match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (status.code(), status.signal()) {
                        (Some(c), _) => Exit::Code(c),
                        (None, Some(s)) => Exit::Signal(s),
                        _ => Exit::Unknown,
                    }
                }
                Err(e) => {
                    log::warn!("cannot wait for process {pid}: {e}");
                    std::future::pending().await
                }
            },
            Proc::Adopted { pidfd, .. } => loop {
                match pidfd.readable().await {
                    // Readable means the process has exited (it stays readable).
                    Ok(_) => return Exit::Unknown,
                    Err(e) => {
                        log::warn!("cannot watch an adopted process: {e}");
                        std::future::pending::<()>().await;
                    }
                }
            },
        }
    }

    /// Adopts a process by pid through a pidfd. The caller has checked its identity.
    pub fn adopt(pid: i32) -> io::Result<Proc> {
        let pidfd = pidfd_open(pid)?;
        // SAFETY: `OwnedFd` keeps the descriptor open, and returns the same one, for as long as
        // the AsyncFd owns it.
        let pidfd =
            unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)?;
        Ok(Proc::Adopted { pid, pidfd })
    }
}

/// `pidfd_open(2)`: a descriptor that becomes readable when `pid` exits.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success it returns a new descriptor that we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Start time of `pid` in clock ticks after boot (`/proc/PID/stat` field 22), `None` if
/// there is no such process.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces and ')', so count
    // fields from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); field 22 is the 20th after it.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Is `pid` still the very process that started at `start`, and not a zombie?
pub fn is_same_process(pid: i32, start: u64) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let zombie = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        == Some("Z");
    !zombie && start_time(pid) == Some(start)
}

/// Everything needed to start one service process.
pub struct Spec<'a> {
    /// Program and arguments, program first; must not be empty (the config validator ensures it).
    pub command: &'a [String],
    /// The account it runs as (uid, gid, supplementary groups; `HOME`, `USER`, `LOGNAME`).
    pub user: &'a ServiceUser,
    /// Extra environment on top of the fixed minimal one (it wins on a clash).
    pub env: &'a BTreeMap<String, String>,
    /// `/run/netns/NAME`, opened.
    pub netns: &'a OwnedFd,
    /// Where stdout and stderr go (`None`: /dev/null).
    pub output: Option<&'a File>,
    /// `cgroup.procs` files to write "0" to (join) before exec.
    pub cgroup_procs: &'a [std::path::PathBuf],
    /// Working directory (`None`: `/`); a fleet artifact's directory. Entered before the
    /// account changes, so only the directory itself must be open to the service's user.
    pub cwd: Option<&'a std::path::Path>,
    /// The service's storage to mount and work in ([`super::storage`]), if it has one.
    pub storage: Option<&'a super::storage::ChildMount>,
}

/// The environment a service starts with: a fixed minimal one plus its `env` table. The
/// daemon's own environment (VISCUM_*, whatever the init system set) is not passed on, so a
/// service behaves the same whoever started the daemon.
fn base_env(user: &ServiceUser) -> Vec<(String, String)> {
    vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), user.home.display().to_string()),
        ("USER".into(), user.name.clone()),
        ("LOGNAME".into(), user.name.clone()),
    ]
}

/// Starts a service process as described, in its own session and process group.
pub fn spawn(spec: &Spec<'_>) -> io::Result<Proc> {
    let child = spawn_child(spec)?;
    let pid = child
        .id()
        .map(|p| p as i32)
        .ok_or_else(|| io::Error::other("the new process has no pid"))?;
    Ok(Proc::Child { child, pid })
}

/// Starts a process as described, in its own session and process group.
pub fn spawn_child(spec: &Spec<'_>) -> io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&spec.command[0]);
    cmd.args(&spec.command[1..])
        .env_clear()
        .current_dir(spec.cwd.unwrap_or(std::path::Path::new("/")))
        .stdin(Stdio::null());
    for (k, v) in base_env(spec.user)
        .into_iter()
        .chain(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())))
    {
        cmd.env(k, v);
    }
    if let Some(storage) = spec.storage {
        // systemd's name for a service's state directory.
        cmd.env("STATE_DIRECTORY", &storage.path);
    }
    match spec.output {
        Some(file) => {
            cmd.stdout(file.try_clone()?).stderr(file.try_clone()?);
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    // Everything the child needs is prepared here: after fork only async-signal-safe calls
    // (no allocation) are allowed.
    let ns_fd = spec.netns.as_raw_fd();
    let procs: Vec<CString> = spec
        .cgroup_procs
        .iter()
        .map(|p| CString::new(p.as_os_str().as_encoded_bytes()).map_err(io::Error::other))
        .collect::<io::Result<_>>()?;
    let groups: Vec<libc::gid_t> = spec.user.groups.clone();
    let (uid, gid) = (spec.user.uid, spec.user.gid);
    let sandbox = Sandbox::prepare();
    let storage = spec.storage.cloned();
    // A fleet artifact's directory stays the working directory of a service that also has
    // storage (its command names the artifact's files relatively); the storage is then
    // reached through $STATE_DIRECTORY. Prepared here: no allocation after fork.
    // Without a directory of its own (an artifact's, its storage), a service starts in its
    // private, empty /tmp rather than in `/`: a file server started with no directory
    // argument (`python3 -m http.server`) would otherwise publish the box's root.
    let tmp_cwd = spec.cwd.is_none() && spec.storage.is_none();
    let artifact_cwd = match (spec.storage, spec.cwd) {
        (Some(_), Some(dir)) => Some(
            std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
                .map_err(|_| io::Error::other("working directory with a NUL byte"))?,
        ),
        _ => None,
    };
    // The daemon raised its own open-file limit for its control connections
    // (`control::ORIGINAL_NOFILE`); a service gets the limit the daemon was started with,
    // as Go does for its children: a program that still uses select(2) breaks on
    // descriptors past 1,024.
    let nofile = super::control::ORIGINAL_NOFILE.get().copied();
    // SAFETY: the closure only makes raw syscalls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(soft) = nofile {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && lim.rlim_cur > soft {
                    lim.rlim_cur = soft;
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            for file in &procs {
                let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let wrote = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if wrote != 1 {
                    return Err(err);
                }
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // Both need privileges the account change gives up (sandbox.rs has the order).
            sandbox.private_tmp()?;
            // In the new mount namespace, while still privileged.
            if let Some(storage) = &storage {
                storage.mount(uid, gid)?;
                if let Some(dir) = &artifact_cwd
                    && libc::chdir(dir.as_ptr()) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            } else if tmp_cwd && libc::chdir(c"/tmp".as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            sandbox.drop_bounding_set()?;
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
            sandbox.finish()
        });
    }
    // The process must outlive the daemon (see the module docs): never kill on drop.
    cmd.kill_on_drop(false);
    cmd.spawn()
}

/// Sends `sig` to process group `pgid`; a group that is already gone is fine.
pub fn signal_group(pgid: i32, sig: nix::sys::signal::Signal) {
    if pgid <= 1 {
        return; // never signal "every process" or init's group by accident
    }
    match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => log::warn!("cannot send {sig} to process group {pgid}: {e}"),
    }
}

/// Stops a service process: SIGTERM to its process group, up to `grace` for the leader to
/// exit, then SIGKILL to whatever is left of the group. Returns how the leader ended.
pub async fn stop(proc: &mut Proc, grace: Duration) -> Exit {
    use nix::sys::signal::Signal;
    let pgid = proc.pid();
    signal_group(pgid, Signal::SIGTERM);
    // A stopped (SIGSTOP) process only acts on SIGTERM once continued.
    signal_group(pgid, Signal::SIGCONT);
    let exit = match tokio::time::timeout(grace, proc.wait()).await {
        Ok(exit) => exit,
        Err(_) => {
            log::warn!(
                "process group {pgid} did not stop within {grace:?} of SIGTERM: sending SIGKILL"
            );
            signal_group(pgid, Signal::SIGKILL);
            proc.wait().await
        }
    };
    // Children that ignored SIGTERM or outlived their leader would keep ports and files busy
    // for the next start.
    signal_group(pgid, Signal::SIGKILL);
    exit
}

/// Stops a process left by a previous daemon that is not being adopted: same sequence as
/// [`stop`], watched through a pidfd.
pub async fn stop_stale(pid: i32, grace: Duration) {
    match Proc::adopt(pid) {
        Ok(mut proc) => {
            stop(&mut proc, grace).await;
        }
        Err(e) => {
            log::warn!("cannot watch old process {pid} ({e}): killing its group outright");
            signal_group(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Bytes an unprivileged writer may still add to the filesystem of `file`
/// (`fstatvfs(3)`: available blocks times the fragment size); `None` if it cannot be read.
pub fn free_bytes(file: &File) -> Option<u64> {
    let st = nix::sys::statvfs::fstatvfs(file).ok()?;
    #[allow(
        clippy::useless_conversion,
        reason = "the field types differ between targets"
    )]
    Some(u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size())))
}

/// Opens a log file for appending (created 0640 if missing).
pub fn open_log(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self() {
        let me = std::process::id() as i32;
        let t = start_time(me).expect("own start time");
        assert!(is_same_process(me, t));
        assert!(!is_same_process(me, t + 1));
        assert!(!is_same_process(0, t));
        assert_eq!(start_time(i32::MAX), None);
    }

    #[test]
    fn exit_display() {
        assert_eq!(Exit::Code(1).to_string(), "exit status 1");
        assert_eq!(Exit::Signal(9).to_string(), "killed by signal 9 (SIGKILL)");
        assert!(Exit::Code(0).success());
        assert!(!Exit::Unknown.success());
    }
}
