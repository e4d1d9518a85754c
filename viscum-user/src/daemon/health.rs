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

use tokio::{net::TcpSocket, sync::oneshot};

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

/// `GET path` with hyper's HTTP/1 client over a socket made in the namespace; a 2xx status
/// passes. Only the response head is awaited: the body is not read.
async fn http(ctx: &CheckContext, port: u16, path: &str) -> Result<(), String> {
    let stream = tcp(ctx, port).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
    // The connection is driven by its own task, ended with the check (a timeout drops this
    // future, and the guard with it).
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _connection = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
        .header(hyper::header::USER_AGENT, "viscum-health")
        .header(hyper::header::CONNECTION, "close")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("GET {path}: cannot make the request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET {path}: {}", error_chain(&e)))?;
    let code = response.status();
    if code.is_success() {
        Ok(())
    } else {
        Err(format!("GET {path} answered {}", code.as_u16()))
    }
}

/// An error and its sources, `: `-separated (hyper's own message is terse, e.g. "error
/// reading a body from connection", and the cause is in the source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

    /// The HTTP check against real servers in this namespace: 2xx passes, other codes and
    /// non-HTTP answers fail with the reason.
    #[test]
    fn http_check_reads_the_status() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: setns needs root");
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ctx = CheckContext {
                sockets: SocketMaker::start().unwrap(),
                netns: Arc::new(OwnedFd::from(
                    std::fs::File::open("/proc/self/ns/net").unwrap(),
                )),
            };
            for (answer, want) in [
                (
                    &b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n"[..],
                    Ok(()),
                ),
                (
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
                    Err("GET /healthz answered 503".to_string()),
                ),
                (b"SSH-2.0-OpenSSH_9.2\r\n", Err(String::new())),
            ] {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let port = listener.local_addr().unwrap().port();
                let server = tokio::spawn(async move {
                    let (mut s, _) = listener.accept().await.unwrap();
                    let mut head = Vec::new();
                    let mut buf = [0u8; 256];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut buf).await.unwrap();
                        assert_ne!(n, 0);
                        head.extend_from_slice(&buf[..n]);
                    }
                    s.write_all(answer).await.unwrap();
                    String::from_utf8(head).unwrap()
                });
                let got = http(&ctx, port, "/healthz").await;
                let head = server.await.unwrap();
                assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
                assert!(head.contains("user-agent: viscum-health"), "{head}");
                match want {
                    Ok(()) => assert_eq!(got, Ok(())),
                    Err(w) if w.is_empty() => {
                        let e = got.unwrap_err();
                        assert!(e.starts_with("GET /healthz: "), "{e}");
                    }
                    Err(w) => assert_eq!(got, Err(w)),
                }
            }
        });
    }
}
