//! The control socket: one JSON object per line each way.
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"ok":true,"status":{"pid":..,"services":[{"name":"speedtest","state":"running",..}]}}
//! -> {"cmd":"restart","service":"speedtest"}
//! <- {"ok":true,"message":"speedtest restarted"}
//! -> {"cmd":"reload"}
//! <- {"ok":false,"error":"...: 2 problems","problems":["service a: match[0]: ..", ..]}
//! ```
//!
//! Commands: `status`, `start`/`stop`/`restart` (with `service`), `reload`. A connection may
//! send several requests; each gets exactly one reply line. The socket is created mode 0600
//! (root only): everything it offers, even status, is an administrator's business.

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use super::{cgroup::LimitsReport, load};

/// A request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// `{"cmd":"status"}`: answered with [`Response::status`].
    Status,
    /// `{"cmd":"start","service":NAME}`: start a stopped (or failed) service now.
    Start {
        /// The service's `name` in the configuration.
        service: String,
    },
    /// `{"cmd":"stop","service":NAME}`: stop it and keep it stopped.
    Stop {
        /// The service's `name` in the configuration.
        service: String,
    },
    /// `{"cmd":"restart","service":NAME}`: stop it if running, then start it.
    Restart {
        /// The service's `name` in the configuration.
        service: String,
    },
    /// `{"cmd":"reload"}`: re-read the configuration file and apply the difference (as SIGHUP
    /// does); answered with [`Response::reload`], or `problems` if the file is refused.
    Reload,
}

/// A reply line. Fields that do not apply are left out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded; when `false`, `error` says why.
    pub ok: bool,
    /// What went wrong (with `ok: false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Every problem of a refused configuration, one per line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// A one-line human summary of what was done, e.g. `speedtest restarted (pid 1234)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The answer to [`Request::Status`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DaemonStatus>,
    /// The answer to a successful [`Request::Reload`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadReport>,
}

impl Response {
    /// A success carrying only `message`.
    pub fn ok(message: impl Into<String>) -> Self {
        Response {
            ok: true,
            message: Some(message.into()),
            ..Default::default()
        }
    }

    /// A failure carrying only `error`.
    pub fn error(error: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(error.into()),
            ..Default::default()
        }
    }
}

/// The daemon as `viscum status --json` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The daemon's process id.
    pub pid: u32,
    /// The daemon's version (`CARGO_PKG_VERSION` of viscum-user).
    pub version: String,
    /// The configuration file it runs (and reloads) from; `None` when the configuration was
    /// not read from a file.
    pub config: Option<PathBuf>,
    /// bpffs directory of the instance's pins (see [`super::Instance`]).
    pub bpffs: PathBuf,
    /// The instance's run directory (locks, records, logs).
    pub run_dir: PathBuf,
    /// The control socket this status was asked on.
    pub control: PathBuf,
    /// Interfaces the classifier is really attached to (checked in the kernel).
    pub interfaces: Vec<String>,
    /// Every configured (or recorded) client-facing interface with its attachment as the
    /// kernel has it: `attached`, `interface-gone`, `missing` (re-created), ...
    #[serde(default)]
    pub attachments: Vec<crate::engine::attach::Attachment>,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    /// Current load figure (see [`load`]), when `max_load` is set.
    pub load: Option<f64>,
    /// Where `load` came from (PSI or loadavg), with it.
    pub load_source: Option<load::Source>,
    /// The configured `engine.max_load` threshold (a fraction), if any.
    pub max_load: Option<f64>,
    /// Every service is held back to the cloud because of load.
    pub shedding: bool,
    /// Global classifier counters summed over CPUs; `None` if the map could not be read.
    pub datapath: Option<DatapathCounters>,
    /// Every configured service, in name order.
    pub services: Vec<ServiceStatus>,
}

/// Global datapath counters as the control API reports them.
pub type DatapathCounters = crate::engine::GlobalStats;

/// Lifecycle state of a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceState {
    /// Namespace being prepared or process being started.
    #[default]
    Starting,
    /// The process runs (whether healthy is [`Health`]'s business).
    Running,
    /// The process ended; it is restarted after a delay.
    Backoff,
    /// Being stopped: entries draining (`drain_timeout`), then SIGTERM and, after
    /// `stop_grace`, SIGKILL.
    Stopping,
    /// Stopped on request (`viscum service stop`).
    Stopped,
    /// Ended successfully and not restarted (restart policy).
    Exited,
    /// Ended with a failure (or could not be started) and not restarted (restart policy).
    Failed,
}

impl ServiceState {
    /// The kebab-case name, as in JSON and `viscum status` (e.g. `"backoff"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Starting => "starting",
            ServiceState::Running => "running",
            ServiceState::Backoff => "backoff",
            ServiceState::Stopping => "stopping",
            ServiceState::Stopped => "stopped",
            ServiceState::Exited => "exited",
            ServiceState::Failed => "failed",
        }
    }
}

/// Health as the checks see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// Not (yet) `rise` successes since the process started.
    #[default]
    Unknown,
    /// `rise` consecutive successes, and not `fall` failures since.
    Healthy,
    /// `fall` failures since it was healthy.
    Unhealthy,
}

impl Health {
    /// The kebab-case name, as in JSON and `viscum status` (e.g. `"healthy"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// One service as `viscum status --json` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The service's name (also its namespace's).
    pub name: String,
    /// Where its process is in its lifecycle.
    pub state: ServiceState,
    /// What its health checks say.
    pub health: Health,
    /// Its entries are in the datapath right now.
    pub redirected: bool,
    /// Its process's pid (also its process group id), while one runs.
    pub pid: Option<i32>,
    /// The process was started by a previous daemon and adopted by this one.
    pub adopted: bool,
    /// Seconds since the current process started; `None` while none runs.
    pub uptime_s: Option<u64>,
    /// Automatic restarts since this daemon started.
    pub restarts: u32,
    /// How the last process ended, e.g. `exit status 1` or `killed by signal 9 (SIGKILL)`.
    pub last_exit: Option<String>,
    /// Why the service is not running or not redirected, if something went wrong.
    pub error: Option<String>,
    /// The health check, e.g. `tcp 127.0.0.1:8080` or `exec /usr/bin/probe`.
    pub check: String,
    /// Checks passed since this configuration of the service was started.
    pub checks_passed: u64,
    /// Checks failed since this configuration of the service was started.
    pub checks_failed: u64,
    /// Why the latest failed check failed.
    pub last_check_error: Option<String>,
    /// Packets and bytes redirected to it (summed over entry generations).
    pub packets: u64,
    /// Bytes redirected to it (L2 length at ingress), summed like `packets`.
    pub bytes: u64,
    /// Flows that started at the edge (each kept off the uplink).
    pub edge_flows: u64,
    /// Matched flows that went to the cloud (entry learning or draining).
    pub cloud_flows: u64,
    /// Edge flows open right now.
    pub live_flows: u64,
    /// Its address matches (e.g. `tcp://203.0.113.10:443`), then its host-name matches with
    /// their current addresses (`tcp://name:443 -> [192.0.2.7, ...]`).
    pub matches: Vec<String>,
    /// The network namespace it runs in (`/run/netns/<netns>`).
    pub netns: String,
    /// The file its stdout and stderr go to.
    pub log: PathBuf,
    /// How each configured cgroup limit fared.
    pub limits: LimitsReport,
    /// Milliseconds until the next scheduled (re)start, if one is pending.
    pub next_start_in_ms: Option<u64>,
}

/// What a reload did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReloadReport {
    /// Services new in the file (started).
    pub added: Vec<String>,
    /// Services no longer in the file (stopped, namespace removed).
    pub removed: Vec<String>,
    /// Services whose configuration changed (stopped, then started with the new one).
    pub changed: Vec<String>,
    /// Services left running untouched.
    pub unchanged: Vec<String>,
    /// Interfaces newly in `engine.interfaces` that the classifier was attached to.
    pub attached: Vec<String>,
    /// Interfaces dropped from `engine.interfaces` that this daemon detached from.
    pub detached: Vec<String>,
}

/// A request with the way back to its connection.
pub type Envelope = (Request, oneshot::Sender<Response>);

/// Errors of a control client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// `connect(2)` to the socket failed: no daemon, or another socket path.
    #[error(
        "cannot reach the viscum daemon at {path} (is `viscum run` running? pass --control or set VISCUM_CONTROL if it uses another socket)"
    )]
    Connect {
        /// The control socket.
        path: PathBuf,
        /// The OS error (typically `ENOENT` or `ECONNREFUSED`).
        #[source]
        source: io::Error,
    },
    /// [`bind`] found a socket at `path` that still answers: another daemon owns it.
    #[error("control socket {path} is in use by another running daemon")]
    InUse {
        /// The control socket.
        path: PathBuf,
    },
    /// Reading, writing, creating or binding the socket failed.
    #[error("cannot talk to the daemon at {path}")]
    Io {
        /// The control socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The request could not be encoded, or the reply line is not a [`Response`] in JSON.
    #[error("the daemon at {path} answered something unreadable")]
    Protocol {
        /// The control socket.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The daemon closed the connection before sending a reply line.
    #[error("the daemon at {path} closed the connection without answering")]
    Closed {
        /// The control socket.
        path: PathBuf,
    },
}

/// Binds the control socket, mode 0600. A leftover socket file from a daemon that died is
/// replaced; one that still answers is someone else's and is left alone.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::InUse {
                path: path.to_owned(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ControlError::Io {
            path: path.to_owned(),
            source,
        })?;
    }
    // The umask closes the window between bind() creating the file and chmod() tightening it.
    // SAFETY: umask cannot fail; nothing else creates files at this point of startup.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| ControlError::Io {
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::Io {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// Accepts connections and forwards each request line to `tx`, until `tx`'s receiver goes.
pub async fn serve(listener: UnixListener, tx: mpsc::Sender<Envelope>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, tx).await {
                log::debug!("control connection ended: {e}");
            }
        });
    }
}

async fn connection(stream: UnixStream, tx: mpsc::Sender<Envelope>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::error(format!("bad request: {e}")),
            Ok(request) => {
                let (reply, rx) = oneshot::channel();
                if tx.send((request, reply)).await.is_err() {
                    Response::error("the daemon is shutting down")
                } else {
                    rx.await
                        .unwrap_or_else(|_| Response::error("the daemon is shutting down"))
                }
            }
        };
        let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

/// Sends one request to the daemon at `path` and returns its reply.
pub async fn request(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let io_err = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.to_owned(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(|source| ControlError::Protocol {
        path: path.to_owned(),
        source,
    })?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(io_err)?;
    let mut lines = BufReader::new(read).lines();
    let answer = lines
        .next_line()
        .await
        .map_err(io_err)?
        .ok_or_else(|| ControlError::Closed {
            path: path.to_owned(),
        })?;
    serde_json::from_str(&answer).map_err(|source| ControlError::Protocol {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"restart","service":"web"}"#).unwrap(),
            Request::Restart {
                service: "web".into()
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
    }

    #[test]
    fn response_leaves_out_what_does_not_apply() {
        assert_eq!(
            serde_json::to_string(&Response::ok("done")).unwrap(),
            r#"{"ok":true,"message":"done"}"#
        );
        let r: Response = serde_json::from_str(r#"{"ok":false,"error":"x"}"#).unwrap();
        assert_eq!(r.error.as_deref(), Some("x"));
    }

    #[tokio::test]
    async fn round_trip_over_a_socket() {
        let path =
            std::env::temp_dir().join(format!("viscum-control-test-{}.sock", std::process::id()));
        let listener = bind(&path).await.unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (tx, mut rx) = mpsc::channel::<Envelope>(4);
        tokio::spawn(serve(listener, tx));
        tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                let _ = reply.send(Response::ok(format!("{req:?}")));
            }
        });
        let r = request(&path, &Request::Reload).await.unwrap();
        assert_eq!(r.message.as_deref(), Some("Reload"));
        // A second bind while the first still answers must refuse.
        assert!(matches!(bind(&path).await, Err(ControlError::InUse { .. })));
        std::fs::remove_file(&path).unwrap();
    }
}
