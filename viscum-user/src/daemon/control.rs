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
    Status,
    Start { service: String },
    Stop { service: String },
    Restart { service: String },
    Reload,
}

/// A reply line. Fields that do not apply are left out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Every problem of a refused configuration, one per line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DaemonStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadReport>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Response {
            ok: true,
            message: Some(message.into()),
            ..Default::default()
        }
    }
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
    pub pid: u32,
    pub version: String,
    pub config: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub run_dir: PathBuf,
    pub control: PathBuf,
    /// Interfaces the classifier is really attached to (checked in the kernel).
    pub interfaces: Vec<String>,
    /// Every configured (or recorded) client-facing interface with its attachment as the
    /// kernel has it: `attached`, `interface-gone`, `missing` (re-created), ...
    #[serde(default)]
    pub attachments: Vec<crate::engine::attach::Attachment>,
    pub uptime_s: u64,
    /// Current load figure (see [`load`]), when `max_load` is set.
    pub load: Option<f64>,
    pub load_source: Option<load::Source>,
    pub max_load: Option<f64>,
    /// Every service is held back to the cloud because of load.
    pub shedding: bool,
    pub datapath: Option<DatapathCounters>,
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
    Stopping,
    /// Stopped on request (`viscum service stop`).
    Stopped,
    /// Ended successfully and not restarted (restart policy).
    Exited,
    /// Ended with a failure (or could not be started) and not restarted (restart policy).
    Failed,
}

impl ServiceState {
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
    Healthy,
    /// `fall` failures since it was healthy.
    Unhealthy,
}

impl Health {
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
    pub name: String,
    pub state: ServiceState,
    pub health: Health,
    /// Its entries are in the datapath right now.
    pub redirected: bool,
    pub pid: Option<i32>,
    /// The process was started by a previous daemon and adopted by this one.
    pub adopted: bool,
    pub uptime_s: Option<u64>,
    /// Automatic restarts since this daemon started.
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// Why the service is not running or not redirected, if something went wrong.
    pub error: Option<String>,
    pub check: String,
    pub checks_passed: u64,
    pub checks_failed: u64,
    pub last_check_error: Option<String>,
    /// Packets and bytes redirected to it (summed over entry generations).
    pub packets: u64,
    pub bytes: u64,
    /// Flows that started at the edge (each kept off the uplink).
    pub edge_flows: u64,
    /// Matched flows that went to the cloud (entry learning or draining).
    pub cloud_flows: u64,
    /// Edge flows open right now.
    pub live_flows: u64,
    pub matches: Vec<String>,
    pub netns: String,
    pub log: PathBuf,
    pub limits: LimitsReport,
    pub next_start_in_ms: Option<u64>,
}

/// What a reload did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    pub attached: Vec<String>,
    pub detached: Vec<String>,
}

/// A request with the way back to its connection.
pub type Envelope = (Request, oneshot::Sender<Response>);

/// Errors of a control client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot reach the viscum daemon at {path} (is `viscum run` running? pass --control or set VISCUM_CONTROL if it uses another socket)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket {path} is in use by another running daemon")]
    InUse { path: PathBuf },
    #[error("cannot talk to the daemon at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the daemon at {path} answered something unreadable")]
    Protocol {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the daemon at {path} closed the connection without answering")]
    Closed { path: PathBuf },
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
