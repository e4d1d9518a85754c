//! Health checks, run *inside* the service namespace.
//!
//! A check must see the service the way redirected clients will: through the namespace's
//! own stack, not the host's (where 127.0.0.1:PORT may be something else entirely). A socket
//! belongs to the network namespace it was created in, so TCP and HTTP checks only need their
//! socket made inside the namespace; connecting and talking then happen on the daemon's
//! tokio runtime like any other I/O. Sockets are made by one long-lived helper thread
//! ([`SocketMaker`]) that `setns`es into the requested namespace before each `socket()`:
//! cheaper than a fresh thread per check, and it never touches the runtime's threads.
//!
//! `exec` checks are processes started like the service itself (namespace, account), minus
//! the log and cgroups, and killed with their process group on timeout.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsFd, FromRawFd, OwnedFd},
    sync::{Arc, mpsc},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
    sync::oneshot,
};

use super::process;
use crate::config::{HealthCheck, ServiceConfig};

/// A request to the socket-making thread.
struct SocketRequest {
    netns: Arc<OwnedFd>,
    reply: oneshot::Sender<io::Result<OwnedFd>>,
}

/// Makes TCP sockets inside network namespaces, on a dedicated thread.
#[derive(Clone)]
pub struct SocketMaker {
    tx: mpsc::Sender<SocketRequest>,
}

impl SocketMaker {
    /// Starts the helper thread. It ends when the last `SocketMaker` clone is dropped.
    pub fn start() -> io::Result<SocketMaker> {
        let (tx, rx) = mpsc::channel::<SocketRequest>();
        std::thread::Builder::new()
            .name("viscum-sockets".into())
            .spawn(move || {
                for req in rx {
                    let made =
                        nix::sched::setns(req.netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(io::Error::from)
                            .and_then(|()| {
                                // SAFETY: plain syscall; a non-negative result is a new descriptor we own.
                                let fd = unsafe {
                                    libc::socket(
                                        libc::AF_INET,
                                        libc::SOCK_STREAM
                                            | libc::SOCK_NONBLOCK
                                            | libc::SOCK_CLOEXEC,
                                        0,
                                    )
                                };
                                if fd < 0 {
                                    Err(io::Error::last_os_error())
                                } else {
                                    // SAFETY: fresh descriptor, owned by nobody else.
                                    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
                                }
                            });
                    let _ = req.reply.send(made);
                }
            })?;
        Ok(SocketMaker { tx })
    }

    /// A non-blocking, unconnected IPv4 TCP socket in the namespace behind `netns`.
    pub async fn tcp_socket(&self, netns: &Arc<OwnedFd>) -> io::Result<TcpSocket> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(SocketRequest {
                netns: netns.clone(),
                reply,
            })
            .map_err(|_| io::Error::other("the socket helper thread is gone"))?;
        let fd = rx
            .await
            .map_err(|_| io::Error::other("the socket helper thread is gone"))??;
        // SAFETY: `fd` is an unconnected TCP socket we own; TcpSocket takes it over.
        let std =
            unsafe { std::net::TcpStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
        Ok(TcpSocket::from_std_stream(std))
    }
}

/// What a check needs besides its definition.
pub struct CheckContext {
    /// The helper that makes TCP/HTTP check sockets inside `netns`.
    pub sockets: SocketMaker,
    /// The service's network namespace, from [`open_netns`].
    pub netns: Arc<OwnedFd>,
}

/// Runs one check of `service` within its timeout. `Err` says why it failed.
pub async fn run_check(service: &ServiceConfig, ctx: &CheckContext) -> Result<(), String> {
    let timeout = service.health.timeout;
    let work = async {
        match &service.health.check {
            HealthCheck::Tcp { port } => tcp(ctx, *port).await.map(drop),
            HealthCheck::Http { path, port } => http(ctx, *port, path).await,
            HealthCheck::Exec { command } => exec(service, ctx, command).await,
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
    }
}

async fn tcp(ctx: &CheckContext, port: u16) -> Result<tokio::net::TcpStream, String> {
    let socket = ctx
        .sockets
        .tcp_socket(&ctx.netns)
        .await
        .map_err(|e| format!("cannot make a socket: {e}"))?;
    socket
        .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .map_err(|e| format!("connect to 127.0.0.1:{port}: {e}"))
}

async fn http(ctx: &CheckContext, port: u16, path: &str) -> Result<(), String> {
    let mut stream = tcp(ctx, port).await?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: viscum-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send request: {e}"))?;
    // Only the status line matters: "HTTP/1.x NNN ...".
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 128];
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read response: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.lines().next().unwrap_or("");
    match parse_status(line) {
        Some(code) if (200..300).contains(&code) => Ok(()),
        Some(code) => Err(format!("GET {path} answered {code}")),
        None => Err(format!(
            "GET {path}: not an HTTP answer: {:?}",
            line.chars().take(60).collect::<String>()
        )),
    }
}

/// The status code of an HTTP status line.
fn parse_status(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

async fn exec(
    service: &ServiceConfig,
    ctx: &CheckContext,
    command: &[String],
) -> Result<(), String> {
    let spec = process::Spec {
        command,
        user: &service.user,
        env: &service.env,
        netns: &ctx.netns,
        output: None,
        cgroup_procs: &[],
        cwd: service.workdir.as_deref(),
        storage: None,
    };
    let mut child =
        process::spawn_child(&spec).map_err(|e| format!("cannot run {}: {e}", command[0]))?;
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    // The caller's timeout would drop this future; make sure the check's processes go with it.
    struct KillGroup(i32);
    impl Drop for KillGroup {
        fn drop(&mut self) {
            process::signal_group(self.0, nix::sys::signal::Signal::SIGKILL);
        }
    }
    let _guard = KillGroup(pgid);
    let status = child
        .wait()
        .await
        .map_err(|e| format!("cannot wait for {}: {e}", command[0]))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} failed: {status}", command[0]))
    }
}

/// Opens `/run/netns/NAME` (kept open for the service's lifetime: checks and spawns `setns`
/// into it without looking the name up again).
pub fn open_netns(name: &str) -> io::Result<Arc<OwnedFd>> {
    let file = std::fs::File::open(std::path::Path::new(crate::netns::NETNS_RUN_DIR).join(name))?;
    Ok(Arc::new(OwnedFd::from(file)))
}

/// Consecutive-result bookkeeping: `rise` successes make a service healthy, `fall` failures
/// unhealthy.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    /// Current verdict; starts (and restarts, see [`Tracker::reset`]) unhealthy.
    pub healthy: bool,
    /// Consecutive passed checks (saturating).
    pub successes: u32,
    /// Consecutive failed checks (saturating).
    pub failures: u32,
    /// Checks passed since the service's task was spawned ([`Tracker::reset`] keeps it;
    /// a changed configuration spawns a new task).
    pub passed_total: u64,
    /// Checks failed since the service's task was spawned.
    pub failed_total: u64,
}

/// What one result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The verdict did not change.
    None,
    /// `rise` consecutive successes turned an unhealthy service healthy.
    BecameHealthy,
    /// `fall` consecutive failures turned a healthy service unhealthy.
    BecameUnhealthy,
}

impl Tracker {
    /// Counts one check result (`ok` = passed) against the `rise`/`fall` thresholds and
    /// says whether it flipped the verdict.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Transition {
        if ok {
            self.passed_total += 1;
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
            if !self.healthy && self.successes >= rise {
                self.healthy = true;
                return Transition::BecameHealthy;
            }
        } else {
            self.failed_total += 1;
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
            if self.healthy && self.failures >= fall {
                self.healthy = false;
                return Transition::BecameUnhealthy;
            }
        }
        Transition::None
    }

    /// Back to "unknown" (a new process).
    pub fn reset(&mut self) {
        self.healthy = false;
        self.successes = 0;
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall() {
        let mut t = Tracker::default();
        assert_eq!(t.record(true, 2, 3), Transition::None);
        assert_eq!(t.record(false, 2, 3), Transition::None);
        assert_eq!(t.record(true, 2, 3), Transition::None);
        assert_eq!(t.record(true, 2, 3), Transition::BecameHealthy);
        assert!(t.healthy);
        assert_eq!(t.record(false, 2, 3), Transition::None);
        assert_eq!(t.record(false, 2, 3), Transition::None);
        assert_eq!(t.record(true, 2, 3), Transition::None);
        assert_eq!(t.record(false, 2, 3), Transition::None);
        assert_eq!(t.record(false, 2, 3), Transition::None);
        assert_eq!(t.record(false, 2, 3), Transition::BecameUnhealthy);
        assert_eq!((t.passed_total, t.failed_total), (4, 6));
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status("HTTP/1.0 200 OK"), Some(200));
        assert_eq!(parse_status("HTTP/1.1 503 Service Unavailable"), Some(503));
        assert_eq!(parse_status("SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status(""), None);
    }
}
