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
//! Commands: `status`, `start`/`stop`/`restart` (with `service`), `reload`, and
//! `redirect-add`/`redirect-del` (the fields of [`AddRequest`] and [`DelRequest`]: what
//! `viscum redirect add/del` hand to a running daemon, which applies them with its engine
//! already open; a reply with `"declined":true` means the daemon did not act and the client
//! should apply the request itself). A connection may send several requests; each gets
//! exactly one reply line. The socket is created mode 0600
//! (root only): everything it offers, even status, is an administrator's business.
//!
//! Hostile or broken clients are expected ([`Limits`]; `docs/bad-input.md` lists every case
//! and its test): a line that is not a request gets `{"ok":false,"error":"bad request: ..."}`
//! naming the problem in the protocol's terms and the connection stays usable; a line over
//! 64 KiB, a client silent for 10 s or one that does not read its replies for 5 s is
//! disconnected (with a last error line where it can still be written); past 1,024
//! connections a new one is refused with an error line. Each connection has its own task, so
//! none of this delays another client.

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
};

use super::{cgroup::LimitsReport, load};
use crate::redirect::request::{AddRequest, DelRequest, Report};

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
    /// `{"cmd":"redirect-add","bpffs":..,"match":..,"ns":..}`: add entries as `viscum
    /// redirect add` does; answered with [`Response::redirect`], or `declined` when the
    /// client is in another network namespace or names another instance.
    RedirectAdd(AddRequest),
    /// `{"cmd":"redirect-del","bpffs":..,"match":..,"drain_timeout_s":..}`: delete entries
    /// as `viscum redirect del` does (draining first unless `now`); answered as
    /// [`Request::RedirectAdd`] is.
    RedirectDel(DelRequest),
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
    /// The answer to a successful [`Request::RedirectAdd`] or [`Request::RedirectDel`]: the
    /// lines `viscum redirect` prints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Report>,
    /// With `ok: false`: the daemon did not act on the request (it is not for this daemon:
    /// another network namespace or instance); `error` says why, and the client applies the
    /// request itself. A plain `ok: false` is a refusal: nothing was changed and the client
    /// must not try again on its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub declined: bool,
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

    /// A request this daemon leaves to the client, with the reason.
    pub fn declined(why: impl Into<String>) -> Self {
        Response {
            declined: true,
            ..Response::error(why)
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
    /// Automatic restarts since this daemon started, attempted (a start that fails counts).
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
    /// Processes of the service the kernel's OOM killer ended because of its `memory`
    /// limit, since its cgroup was made (`oom_kill` of cgroup v2 `memory.events`, or of v1
    /// `memory.oom_control`); `None` without a memory limit or where the kernel does not
    /// count them.
    #[serde(default)]
    pub oom_kills: Option<u64>,
    /// Its private working directory (`[service.storage]`), if it has one.
    #[serde(default)]
    pub storage: Option<super::storage::StorageStatus>,
    /// Its network share (`[service.network]`), if it has one.
    #[serde(default)]
    pub network: Option<NetworkReport>,
}

/// A service's `[service.network]` as configured (docs/multi-tenant.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkReport {
    /// Weight among the services on the client-facing link (1-100).
    pub share: u32,
    /// Its ceiling as written in tc's units (e.g. `20mbit`); `None`: the whole link when
    /// the others are idle.
    pub max: Option<String>,
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

/// A symbolic link at the instance's default control path ([`super::state::default_control`]
/// of its bpffs) to the socket the daemon's configuration names instead (`engine.control`),
/// removed when dropped if it still points there. The CLI derives the socket from `--bpffs`
/// alone: without the link, `viscum status` and `redirect add` of an instance configured with
/// its own `control` found no daemon (and `redirect add` applied the change itself, silently)
/// unless the operator passed `--control` or `VISCUM_CONTROL`.
#[derive(Debug)]
pub struct ControlLink {
    link: PathBuf,
    target: PathBuf,
    /// The link's directory and those made for it, deepest first: removed with it when
    /// empty.
    made_dirs: Vec<PathBuf>,
}

impl Drop for ControlLink {
    fn drop(&mut self) {
        if std::fs::read_link(&self.link).is_ok_and(|t| t == self.target) {
            let _ = std::fs::remove_file(&self.link);
        }
        for dir in &self.made_dirs {
            // Fails, leaving it, when something else is in it.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Links `default` to the bound socket `control` (see [`ControlLink`]); `None`, and nothing
/// made, when they are the same path, or when `default` holds something other than a link
/// (another instance's socket: left alone, with a warning). A link left by a daemon that
/// died is replaced.
pub fn link_default(control: &Path, default: &Path) -> Option<ControlLink> {
    let target = std::path::absolute(control).ok()?;
    if std::path::absolute(default).ok()? == target {
        return None;
    }
    match std::fs::symlink_metadata(default) {
        Ok(m) if m.file_type().is_symlink() => {
            let _ = std::fs::remove_file(default);
        }
        Ok(_) => {
            log::warn!(
                "{} exists and is not a link: commands without --control will not find this \
                 daemon (its socket is {})",
                default.display(),
                target.display()
            );
            return None;
        }
        Err(_) => {}
    }
    // The link's own directory (the instance's default run directory, which a daemon that
    // was killed may have left), then those made for it now.
    let made_dirs: Vec<PathBuf> = default
        .ancestors()
        .skip(1)
        .enumerate()
        .take_while(|(i, d)| !d.as_os_str().is_empty() && (*i == 0 || !d.exists()))
        .map(|(_, d)| d.to_path_buf())
        .collect();
    let made = default
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::os::unix::fs::symlink(&target, default));
    match made {
        Ok(()) => Some(ControlLink {
            link: default.to_owned(),
            target,
            made_dirs,
        }),
        Err(e) => {
            log::warn!(
                "cannot link {} to the control socket {}: {e}; commands without --control \
                 will not find this daemon",
                default.display(),
                target.display()
            );
            None
        }
    }
}

/// How much a control client may ask of the daemon: each connection is served by its own
/// task, within these bounds, so one client that misbehaves (never finishes a line, never
/// reads its replies, connects and says nothing, or opens connections by the thousand) costs
/// the daemon one bounded task and never holds up another client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest request line, in bytes (newline excluded). A longer one is answered with an
    /// error and the connection closed: nothing valid is that long.
    pub max_line: usize,
    /// Time a client has to send a complete request line, from connecting or from the last
    /// reply (so a client that connects and sends nothing, or dribbles a line byte by byte,
    /// is told and disconnected).
    pub read_timeout: Duration,
    /// Time one reply may take to be written (a client that never reads its replies is
    /// disconnected once its socket buffer is full for this long).
    pub write_timeout: Duration,
    /// Connections served at once; one more is answered with an error and closed at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line: MAX_LINE,
            read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(5),
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// Longest request line the daemon reads (64 KiB; a real request is under 100 bytes).
pub const MAX_LINE: usize = 64 * 1024;
/// Most control connections served at once (fewer if the daemon's file-descriptor limit is
/// low: at most half of it, so clients can never starve the daemon of descriptors).
pub const MAX_CONNECTIONS: usize = 1024;

/// The commands, as error messages list them.
const COMMANDS: &str = "status, start, stop, restart, reload, redirect-add, redirect-del";

/// Answers the requests it takes in the connection's own task, without the daemon's main
/// loop (which may be busy for a while: a reload's drain, a periodic scan of every entry);
/// hands any other request back (`Err`, boxed: a request is large next to a future) to go
/// through the channel.
pub type Direct = Arc<
    dyn Fn(Request) -> Result<futures::future::BoxFuture<'static, Response>, Box<Request>>
        + Send
        + Sync,
>;

/// Accepts connections and forwards each request line to `tx`, until `tx`'s receiver goes,
/// within the default [`Limits`] (the connection cap lowered to half the file-descriptor
/// limit, which is first raised to its hard limit).
pub async fn serve(listener: UnixListener, tx: mpsc::Sender<Envelope>) {
    serve_direct(listener, tx, None).await;
}

/// [`serve`], with the requests `direct` takes answered by it in each connection's task.
pub async fn serve_direct(
    listener: UnixListener,
    tx: mpsc::Sender<Envelope>,
    direct: Option<Direct>,
) {
    let fds = raise_fd_limit();
    let mut limits = Limits::default();
    if let Some(fds) = fds {
        let half = usize::try_from(fds / 2).unwrap_or(usize::MAX).max(1);
        limits.max_connections = limits.max_connections.min(half);
    }
    serve_inner(listener, tx, limits, direct).await;
}

/// The soft `RLIMIT_NOFILE` the daemon was started with, before [`serve`] raised it (`None`
/// until then, or if it could not be read). Services should be started with it again, as Go
/// does for its children: a program that still uses `select(2)` breaks on descriptors past
/// 1,024, and only the daemon needs the raised limit.
pub static ORIGINAL_NOFILE: std::sync::OnceLock<libc::rlim_t> = std::sync::OnceLock::new();

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (at most 65,536) and returns the soft
/// limit now in force, or `None` if it cannot be read.
fn raise_fd_limit() -> Option<libc::rlim_t> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return None;
    }
    let _ = ORIGINAL_NOFILE.set(lim.rlim_cur);
    let want = lim.rlim_max.min(65_536);
    if want > lim.rlim_cur {
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
            lim.rlim_cur = want;
        }
    }
    Some(lim.rlim_cur)
}

/// [`serve`] within `limits`.
pub async fn serve_with(listener: UnixListener, tx: mpsc::Sender<Envelope>, limits: Limits) {
    serve_inner(listener, tx, limits, None).await;
}

async fn serve_inner(
    listener: UnixListener,
    tx: mpsc::Sender<Envelope>,
    limits: Limits,
    direct: Option<Direct>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: wait for descriptors to free up rather than spin.
                log::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let busy = Response::error(format!(
                "too many control connections ({} open): try again later",
                limits.max_connections
            ));
            // A fresh socket's buffer is empty: this cannot block.
            let _ = stream.try_write(&reply_line(&busy));
            continue;
        };
        let tx = tx.clone();
        let direct = direct.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, tx, limits, direct).await {
                log::debug!("control connection ended: {e}");
            }
            drop(slot);
        });
    }
}

/// One reply as its line.
fn reply_line(response: &Response) -> Vec<u8> {
    let mut out = serde_json::to_vec(response)
        .unwrap_or_else(|_| br#"{"ok":false,"error":"the reply could not be encoded"}"#.to_vec());
    out.push(b'\n');
    out
}

/// What reading one request line found.
enum Line {
    /// A complete line (without its newline), or the last bytes before end of file.
    Text(Vec<u8>),
    /// The client closed the connection between requests.
    End,
    /// Longer than [`Limits::max_line`].
    TooLong,
    /// No complete line within [`Limits::read_timeout`].
    TimedOut,
}

/// Reads one line of at most `max` bytes, buffering nothing beyond it.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
    timeout: Duration,
) -> io::Result<Line> {
    let read = async {
        let mut line = Vec::new();
        loop {
            let buf = reader.fill_buf().await?;
            if buf.is_empty() {
                return Ok(if line.is_empty() {
                    Line::End
                } else {
                    Line::Text(line)
                });
            }
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (buf.len(), false),
            };
            if line.len() + take > max {
                return Ok(Line::TooLong);
            }
            line.extend_from_slice(&buf[..take]);
            reader.consume(if done { take + 1 } else { take });
            if done {
                return Ok(Line::Text(line));
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r,
        Err(_) => Ok(Line::TimedOut),
    }
}

async fn connection(
    stream: UnixStream,
    tx: mpsc::Sender<Envelope>,
    limits: Limits,
    direct: Option<Direct>,
) -> io::Result<()> {
    // Who is asking, for the redirect requests: they act in the daemon's network namespace
    // and instance, which the daemon checks are the client's too (SO_PEERCRED).
    let peer = Some(crate::redirect::request::Peer::of(&stream));
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut send = async |response: &Response| -> io::Result<()> {
        let out = reply_line(response);
        match tokio::time::timeout(limits.write_timeout, write.write_all(&out)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client does not read its replies",
            )),
        }
    };
    loop {
        let line = match read_line(&mut reader, limits.max_line, limits.read_timeout).await? {
            Line::End => return Ok(()),
            Line::Text(line) => line,
            Line::TooLong => {
                let msg = format!(
                    "bad request: line longer than {} bytes: closing the connection",
                    limits.max_line
                );
                return send(&Response::error(msg)).await;
            }
            Line::TimedOut => {
                let msg = format!(
                    "no complete request line within {} s: closing the connection",
                    limits.read_timeout.as_secs()
                );
                return send(&Response::error(msg)).await;
            }
        };
        if line.trim_ascii().is_empty() {
            continue;
        }
        let response = match parse_request(&line) {
            Err(e) => Response::error(format!("bad request: {e}")),
            Ok(mut request) => {
                match &mut request {
                    Request::RedirectAdd(r) => r.peer = peer,
                    Request::RedirectDel(r) => r.peer = peer,
                    _ => {}
                }
                let taken = match &direct {
                    Some(d) => d(request),
                    None => Err(Box::new(request)),
                };
                match taken {
                    Ok(answer) => answer.await,
                    Err(request) => {
                        let (reply, rx) = oneshot::channel();
                        if tx.send((*request, reply)).await.is_err() {
                            Response::error("the daemon is shutting down")
                        } else {
                            rx.await
                                .unwrap_or_else(|_| Response::error("the daemon is shutting down"))
                        }
                    }
                }
            }
        };
        send(&response).await?;
    }
}

/// At most the first 64 characters of a client's string, quoted, for an error message.
fn quote(s: &str) -> String {
    let mut q: String = s.chars().take(64).collect();
    if q.len() < s.len() {
        q.push_str("...");
    }
    format!("{q:?}")
}

/// What a JSON value is, in JSON's words.
fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Decodes one request line, or says what is wrong with it in the protocol's terms (the
/// JSON keys and commands), never in Rust's.
///
/// # Errors
/// Not UTF-8, not JSON, not an object, `cmd` missing, not a string or unknown, `service`
/// missing or not a service name, or a key the command does not take.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8 text".to_owned())?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let serde_json::Value::Object(obj) = value else {
        return Err(format!(
            "expected a JSON object such as {{\"cmd\":\"status\"}}, got {}",
            json_kind(&value)
        ));
    };
    let cmd = match obj.get("cmd") {
        None => return Err(format!("missing \"cmd\": one of {COMMANDS}")),
        Some(serde_json::Value::String(c)) => c.as_str(),
        Some(other) => {
            return Err(format!(
                "\"cmd\" must be a string (one of {COMMANDS}), got {}",
                json_kind(other)
            ));
        }
    };
    if let Some(request) = parse_redirect(cmd, &obj)? {
        return Ok(request);
    }
    let takes_service = match cmd {
        "status" | "reload" => false,
        "start" | "stop" | "restart" => true,
        other => {
            return Err(format!(
                "unknown command {}: expected one of {COMMANDS}",
                quote(other)
            ));
        }
    };
    for key in obj.keys() {
        if key != "cmd" && !(takes_service && key == "service") {
            let takes = if takes_service {
                "it takes \"service\""
            } else {
                "it takes no other key"
            };
            return Err(format!(
                "unknown key {} for \"{cmd}\" ({takes})",
                quote(key)
            ));
        }
    }
    if !takes_service {
        return Ok(if cmd == "status" {
            Request::Status
        } else {
            Request::Reload
        });
    }
    let service = match obj.get("service") {
        None => {
            return Err(format!(
                "\"{cmd}\" needs \"service\": the name of a configured service"
            ));
        }
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(format!(
                "\"service\" must be a string (a service name), got {}",
                json_kind(other)
            ));
        }
    };
    if crate::netns::validate_name(&service).is_err() {
        return Err(format!(
            "{} is not a service name (1-12 characters a-z 0-9 - _)",
            quote(&service)
        ));
    }
    Ok(match cmd {
        "start" => Request::Start { service },
        "stop" => Request::Stop { service },
        _ => Request::Restart { service },
    })
}

/// `redirect-add` / `redirect-del`: their keys are [`AddRequest`]'s and [`DelRequest`]'s
/// (checked by serde, whose messages name the keys); `None` for other commands. The values
/// themselves are validated where the request is applied.
fn parse_redirect(
    cmd: &str,
    obj: &serde_json::Map<String, serde_json::Value>,
) -> Result<Option<Request>, String> {
    let mut fields = obj.clone();
    fields.remove("cmd");
    let fields = serde_json::Value::Object(fields);
    let named = |e: serde_json::Error| format!("\"{cmd}\": {e}");
    Ok(Some(match cmd {
        "redirect-add" => Request::RedirectAdd(serde_json::from_value(fields).map_err(named)?),
        "redirect-del" => Request::RedirectDel(serde_json::from_value(fields).map_err(named)?),
        _ => return Ok(None),
    }))
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

    #[test]
    fn bad_requests_are_named_in_the_protocols_terms() {
        for (line, want) in [
            (&b"\xff\xfe"[..], "not UTF-8 text"),
            (b"{\"cmd\":", "not JSON: EOF while parsing"),
            (
                b"[1,2]",
                "expected a JSON object such as {\"cmd\":\"status\"}, got an array",
            ),
            (
                b"{}",
                "missing \"cmd\": one of status, start, stop, restart, reload",
            ),
            (b"{\"cmd\":7}", "\"cmd\" must be a string (one of status"),
            (
                b"{\"cmd\":\"explode\"}",
                "unknown command \"explode\": expected one of",
            ),
            (b"{\"cmd\":\"stop\"}", "\"stop\" needs \"service\""),
            (
                b"{\"cmd\":\"stop\",\"service\":1}",
                "\"service\" must be a string",
            ),
            (
                b"{\"cmd\":\"stop\",\"service\":\"../x\"}",
                "\"../x\" is not a service name",
            ),
            (
                b"{\"cmd\":\"reload\",\"service\":\"web\"}",
                "unknown key \"service\" for \"reload\"",
            ),
            (
                b"{\"cmd\":\"stop\",\"service\":\"web\",\"now\":true}",
                "unknown key \"now\" for \"stop\" (it takes \"service\")",
            ),
            (
                b"{\"cmd\":\"redirect-add\",\"bpffs\":\"/b\"}",
                "\"redirect-add\": missing field `match`",
            ),
            (
                b"{\"cmd\":\"redirect-del\",\"bpffs\":\"/b\",\"match\":\"tcp://198.51.100.7:80\",\"drain_timeout_s\":\"10\"}",
                "\"redirect-del\": invalid type: string \"10\", expected u64",
            ),
            (
                b"{\"cmd\":\"redirect-add\",\"bpffs\":\"/b\",\"match\":\"tcp://198.51.100.7:80\",\"ns\":\"web\",\"peer\":1}",
                "\"redirect-add\": unknown field `peer`",
            ),
        ] {
            let e = parse_request(line).unwrap_err();
            assert!(
                e.starts_with(want),
                "{line:?}: {e:?} does not start with {want:?}"
            );
            assert!(!e.contains("Request") && !e.contains("enum"), "{e}");
        }
        let deep = "[".repeat(10_000);
        assert!(
            parse_request(deep.as_bytes())
                .unwrap_err()
                .contains("recursion limit")
        );
        let long = format!("{{\"cmd\":\"{}\"}}", "x".repeat(1000));
        assert!(parse_request(long.as_bytes()).unwrap_err().len() < 200);
        assert_eq!(
            parse_request(br#"{"service":"web","cmd":"restart"}"#).unwrap(),
            Request::Restart {
                service: "web".into()
            }
        );
    }

    /// A daemon stand-in answering every request with its debug form, within `limits`.
    async fn echo_daemon(limits: Limits) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "viscum-control-limits-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let listener = bind(&path).await.unwrap();
        let (tx, mut rx) = mpsc::channel::<Envelope>(4);
        tokio::spawn(serve_with(listener, tx, limits));
        tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                let _ = reply.send(Response::ok(format!("{req:?}")));
            }
        });
        path
    }

    async fn read_all(s: &mut UnixStream) -> String {
        use tokio::io::AsyncReadExt as _;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn limits_hold_and_other_clients_are_served() {
        let limits = Limits {
            max_line: 100,
            read_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_millis(300),
            max_connections: 3,
        };
        let path = echo_daemon(limits).await;
        // A line over the limit: an error, then the connection is closed.
        let mut long = UnixStream::connect(&path).await.unwrap();
        long.write_all(&[b'x'; 101]).await.unwrap();
        let got = read_all(&mut long).await;
        assert!(
            got.contains("bad request: line longer than 100 bytes"),
            "{got}"
        );
        // Silence: told and disconnected after the read timeout.
        let mut silent = UnixStream::connect(&path).await.unwrap();
        let got = read_all(&mut silent).await;
        assert!(got.contains("no complete request line within 0 s"), "{got}");
        // A bad line leaves the connection usable; a request split into pieces is whole.
        let mut c = UnixStream::connect(&path).await.unwrap();
        c.write_all(b"nonsense\n{\"cmd\":").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.write_all(b"\"status\"}\n").await.unwrap();
        c.shutdown().await.unwrap();
        let got = read_all(&mut c).await;
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(lines.len(), 2, "{got}");
        assert!(lines[0].contains("bad request: not JSON"), "{got}");
        assert!(lines[1].contains("\"message\":\"Status\""), "{got}");
        // Connections past the cap are refused with a reason, and served again once one
        // closes.
        let held: Vec<UnixStream> =
            futures::future::join_all((0..3).map(|_| UnixStream::connect(&path)))
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
        let mut extra = UnixStream::connect(&path).await.unwrap();
        let got = read_all(&mut extra).await;
        assert!(
            got.contains("too many control connections (3 open)"),
            "{got}"
        );
        drop(held);
        let mut r = Response::default();
        for _ in 0..500 {
            r = request(&path, &Request::Status).await.unwrap();
            if r.ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(r.message.as_deref(), Some("Status"), "{r:?}");
        // A client that never reads: disconnected once its replies stop fitting, while
        // another is served.
        let mut greedy = UnixStream::connect(&path).await.unwrap();
        let flood = b"{\"cmd\":\"status\"}\n".repeat(20_000);
        let writer = tokio::spawn(async move {
            let _ = greedy.write_all(&flood).await;
            greedy
        });
        let r = request(&path, &Request::Status).await.unwrap();
        assert!(r.ok);
        let greedy = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the daemon stops reading a client that does not read, then drops it")
            .unwrap();
        drop(greedy);
        std::fs::remove_file(&path).unwrap();
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
