//! Real `nats-server` processes with JetStream for the fleet tests and benchmark B10
//! (`docs/fleet.md`): one server, or a three-node JetStream cluster, each in network
//! namespaces of its own, with a generated configuration file, a private store directory,
//! and optional accounts with per-user permissions.
//!
//! Dev-only code: the product never starts a NATS server; boxes dial out to one the
//! operator runs. `nats-server` comes from Debian (`cargo xtask setup`; 2.9.x).
//!
//! # Topologies
//!
//! * [`NatsServer::start`]: a fresh namespace, the server on `127.0.0.1:4222` inside it.
//!   Clients run in the same namespace ([`NatsServer::client_netns`],
//!   [`NatsServer::command`], [`NatsServer::block_on`]).
//! * [`NatsServer::start_in`]: inside a namespace the caller owns (say the lab's cloud), on
//!   an address there, so boxes in other namespaces reach it over their links.
//! * [`NatsCluster::start`]: a hub namespace routing between three node namespaces:
//!
//! ```text
//!            hub (clients run here, forwards between the nodes)
//!   n0: 10.77.0.1/24   n1: 10.77.1.1/24   n2: 10.77.2.1/24
//!        |                  |                  |
//!   eth0 10.77.0.2     eth0 10.77.1.2     eth0 10.77.2.2    (one namespace per node,
//!   client 4222, route 6222, monitor 8222                     default route via the hub)
//! ```
//!
//! Every server is ready when its monitoring endpoint's `/healthz` answers 200 (for
//! JetStream that includes a known meta leader in a cluster); every process is killed and
//! every namespace and directory removed on drop, panics included.

use std::{
    fmt::Write as _,
    fs::{self, File},
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use viscum::netns::{self, NETNS_RUN_DIR};

use crate::guard::{Netns, block_on, unique_name, wait_until};

/// The client port every fixture server listens on (inside its own namespace).
pub const CLIENT_PORT: u16 = 4222;
/// The cluster (route) port.
pub const ROUTE_PORT: u16 = 6222;
/// The HTTP monitoring port (`/healthz`, `/varz`, `/jsz`).
pub const MONITOR_PORT: u16 = 8222;
/// How long a server (or a cluster) may take to answer `/healthz` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The account that holds every user when users are configured (JetStream enabled).
pub const FLEET_ACCOUNT: &str = "FLEET";

/// Why a server could not be started; what was made until then has been removed.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// `nats-server` is not installed (run `cargo xtask setup`).
    #[error("nats-server not found on PATH (install it with `cargo xtask setup`): {0}")]
    NotInstalled(io::Error),
    /// A namespace, link or address could not be made.
    #[error("{what}: {source}")]
    Netns {
        /// The step.
        what: String,
        /// From viscum's namespace layer.
        #[source]
        source: netns::NetnsError,
    },
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server did not become healthy in time, or exited.
    #[error("nats-server {name} not ready: {why}; its log ends with:\n{log}")]
    NotReady {
        /// The server's name.
        name: String,
        /// What was seen last (an HTTP status, "exited with ...").
        why: String,
        /// The last lines of its log.
        log: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NatsError {
    let what = what.into();
    move |source| NatsError::Io { what, source }
}

fn netns_err(what: impl Into<String>) -> impl FnOnce(netns::NetnsError) -> NatsError {
    let what = what.into();
    move |source| NatsError::Netns { what, source }
}

/// Subjects a user may publish and subscribe to (`allow` lists; everything else is denied).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects the user may publish to (requests included).
    pub publish: Vec<String>,
    /// Subjects the user may subscribe to.
    pub subscribe: Vec<String>,
}

/// A user of the [`FLEET_ACCOUNT`] account, authenticated by user name and password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUser {
    /// The user name.
    pub user: String,
    /// The password (plain text: test servers only).
    pub password: String,
    /// `None`: everything is allowed (the operator).
    pub permissions: Option<Permissions>,
}

impl NatsUser {
    /// A user allowed everything in the account: the operator's CLI.
    pub fn operator(user: &str, password: &str) -> NatsUser {
        NatsUser {
            user: user.to_string(),
            password: password.to_string(),
            permissions: None,
        }
    }

    /// Box `box_id`'s user (named after the box) with [`box_permissions`].
    pub fn fleet_box(box_id: &str, password: &str, groups: &[&str]) -> NatsUser {
        NatsUser {
            user: box_id.to_string(),
            password: password.to_string(),
            permissions: Some(box_permissions(box_id, groups)),
        }
    }
}

/// The inbox prefix a box's connection must use (`async_nats::ConnectOptions::
/// custom_inbox_prefix`) under [`box_permissions`]: `_INBOX_<box>`. With the shared
/// `_INBOX.>` any box could subscribe to every other box's watch deliveries.
pub fn box_inbox_prefix(box_id: &str) -> String {
    format!("_INBOX_{box_id}")
}

/// The least privilege of box `box_id` in groups `groups` (documented in `docs/fleet.md`,
/// proved by `tests/tests/fleet_ops.rs`):
///
/// * read its desired state only: ordered-consumer creation filtered on
///   `$KV.viscum_desired.group.<g>.>` and `$KV.viscum_desired.box.<box>.>` (the server
///   checks that the filter in the request matches the one in the subject), direct gets of
///   those keys, flow-control replies; never `STREAM.MSG.GET` (its subject names no key) nor
///   an unfiltered `CONSUMER.CREATE`;
/// * write its own status only: `$KV.viscum_status.status.<box>`;
/// * read artifacts: consumers and direct gets on the object store's stream;
/// * stream info of the three buckets (configuration and counts, no values);
/// * receive only on its own inbox prefix ([`box_inbox_prefix`]).
pub fn box_permissions(box_id: &str, groups: &[&str]) -> Permissions {
    const DESIRED: &str = "viscum_desired";
    const STATUS: &str = "viscum_status";
    const ARTIFACTS: &str = "viscum_artifacts";
    let mut publish = vec![
        format!("$JS.API.STREAM.INFO.KV_{DESIRED}"),
        format!("$JS.API.STREAM.INFO.KV_{STATUS}"),
        format!("$JS.API.STREAM.INFO.OBJ_{ARTIFACTS}"),
    ];
    let mut filters: Vec<String> = groups
        .iter()
        .map(|g| format!("$KV.{DESIRED}.group.{g}.>"))
        .collect();
    filters.push(format!("$KV.{DESIRED}.box.{box_id}.>"));
    for filter in &filters {
        publish.push(format!("$JS.API.CONSUMER.CREATE.KV_{DESIRED}.*.{filter}"));
        publish.push(format!("$JS.API.DIRECT.GET.KV_{DESIRED}.{filter}"));
    }
    publish.extend([
        // An ordered consumer deletes the consumer it replaces after a gap; the names are
        // random, and deleting another box's ephemeral consumer only makes it re-create one.
        format!("$JS.API.CONSUMER.DELETE.KV_{DESIRED}.*"),
        format!("$JS.FC.KV_{DESIRED}.>"),
        format!("$KV.{STATUS}.status.{box_id}"),
        // Every box may read every artifact: the unfiltered create (async-nats's object get
        // names no consumer) can only reach the store's own chunks and metadata.
        format!("$JS.API.CONSUMER.CREATE.OBJ_{ARTIFACTS}"),
        format!("$JS.API.CONSUMER.CREATE.OBJ_{ARTIFACTS}.>"),
        format!("$JS.API.CONSUMER.DELETE.OBJ_{ARTIFACTS}.>"),
        format!("$JS.API.DIRECT.GET.OBJ_{ARTIFACTS}.>"),
        format!("$JS.API.STREAM.MSG.GET.OBJ_{ARTIFACTS}"),
        format!("$JS.FC.OBJ_{ARTIFACTS}.>"),
    ]);
    Permissions {
        publish,
        subscribe: vec![format!("{}.>", box_inbox_prefix(box_id))],
    }
}

/// A string in the server's configuration syntax (double-quoted, escaped).
fn quoted(s: &str) -> String {
    format!("{s:?}")
}

fn subject_list(subjects: &[String]) -> String {
    let items: Vec<String> = subjects.iter().map(|s| quoted(s)).collect();
    format!("[{}]", items.join(", "))
}

/// The `accounts { ... }` block for `users` (empty string without users: the server then
/// runs without authentication, JetStream in its global account).
pub fn accounts_block(users: &[NatsUser]) -> String {
    if users.is_empty() {
        return String::new();
    }
    let mut out =
        format!("accounts {{\n  {FLEET_ACCOUNT} {{\n    jetstream: enabled\n    users: [\n");
    for u in users {
        let _ = write!(
            out,
            "      {{ user: {}, password: {}",
            quoted(&u.user),
            quoted(&u.password)
        );
        if let Some(p) = &u.permissions {
            let _ = write!(
                out,
                ", permissions: {{ publish: {{ allow: {} }}, subscribe: {{ allow: {} }} }}",
                subject_list(&p.publish),
                subject_list(&p.subscribe)
            );
        }
        out.push_str(" }\n");
    }
    out.push_str("    ]\n  }\n}\n");
    out
}

/// What a server is started with.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// Users of the [`FLEET_ACCOUNT`] account; empty: no authentication.
    pub users: Vec<NatsUser>,
    /// Extra top-level configuration lines (e.g. `max_payload: 2MB`).
    pub extra: String,
}

/// A private directory under the system's temp dir, removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, NatsError> {
        let path = std::env::temp_dir().join(unique_name("viscum-nats-"));
        fs::create_dir_all(&path).map_err(io_err(format!("create {}", path.display())))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One `nats-server` process: its namespace, configuration and store; restartable.
#[derive(Debug)]
pub struct NatsNode {
    name: String,
    netns: String,
    addr: IpAddr,
    /// The client port ([`CLIENT_PORT`] unless [`NatsNode::set_client_port`] moved it).
    port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsNode {
    /// Writes the configuration into `dir` (store under `dir/store`) and returns the node,
    /// not started.
    fn prepare(
        name: &str,
        netns: &str,
        addr: IpAddr,
        dir: &Path,
        options: &NatsOptions,
        cluster: Option<(&str, Vec<SocketAddr>)>,
    ) -> Result<NatsNode, NatsError> {
        let store = dir.join("store");
        fs::create_dir_all(&store).map_err(io_err(format!("create {}", store.display())))?;
        let mut config = String::new();
        let _ = writeln!(config, "server_name: {}", quoted(name));
        let _ = writeln!(
            config,
            "listen: {}",
            quoted(&format!("{addr}:{CLIENT_PORT}"))
        );
        let _ = writeln!(
            config,
            "http: {}",
            quoted(&format!("{addr}:{MONITOR_PORT}"))
        );
        let _ = writeln!(
            config,
            "jetstream {{\n  store_dir: {}\n  max_memory_store: 256MB\n  max_file_store: 2GB\n}}",
            quoted(&store.display().to_string())
        );
        if let Some((cluster_name, routes)) = cluster {
            let routes: Vec<String> = routes.iter().map(|r| format!("nats-route://{r}")).collect();
            let _ = writeln!(
                config,
                "cluster {{\n  name: {}\n  listen: {}\n  routes: {}\n}}",
                quoted(cluster_name),
                quoted(&format!("{addr}:{ROUTE_PORT}")),
                subject_list(&routes)
            );
        }
        config.push_str(&accounts_block(&options.users));
        config.push_str(&options.extra);
        let path = dir.join("nats-server.conf");
        fs::write(&path, config).map_err(io_err(format!("write {}", path.display())))?;
        Ok(NatsNode {
            name: name.to_string(),
            netns: netns.to_string(),
            addr,
            port: CLIENT_PORT,
            config: path,
            log: dir.join("nats-server.log"),
            child: None,
        })
    }

    /// The server's name (`server_name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `nats://ADDR:PORT` (port 4222 unless moved).
    pub fn url(&self) -> String {
        format!("nats://{}", SocketAddr::new(self.addr, self.port))
    }

    /// Moves the client listener to `port` from the next [`NatsNode::start`] on (the
    /// configuration file is rewritten; the store stays): a server its clients cannot reach
    /// for a while, which an operator can still use on the other port.
    ///
    /// # Errors
    /// When the configuration cannot be rewritten.
    pub fn set_client_port(&mut self, port: u16) -> Result<(), NatsError> {
        let what = format!("rewrite {}", self.config.display());
        let config = fs::read_to_string(&self.config).map_err(io_err(what.clone()))?;
        let listen = format!(
            "listen: {}",
            quoted(&SocketAddr::new(self.addr, port).to_string())
        );
        let config: Vec<String> = config
            .lines()
            .map(|l| {
                if l.starts_with("listen: ") {
                    listen.clone()
                } else {
                    l.to_owned()
                }
            })
            .collect();
        fs::write(&self.config, config.join("\n") + "\n").map_err(io_err(what))?;
        self.port = port;
        Ok(())
    }

    /// The process id while it runs (for `/proc/PID/stat` and `status`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The generated configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The server's log file (its stdout and stderr, appended across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Spawns the process in its namespace (output appended to its log). Does not wait.
    fn spawn(&mut self) -> Result<(), NatsError> {
        if self.is_running() {
            return Ok(());
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io_err(format!("open {}", self.log.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io_err("duplicate the log descriptor"))?;
        let mut cmd = netns_command("nats-server", &self.netns)?;
        cmd.arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd.spawn().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => NatsError::NotInstalled(e),
            _ => NatsError::Io {
                what: format!("start nats-server {}", self.name),
                source: e,
            },
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts the server (again, with the same store) and waits until it is healthy.
    ///
    /// # Errors
    /// [`NatsError::NotReady`] with the log's tail if `/healthz` does not answer 200 in 30 s
    /// or the process exits.
    pub fn start(&mut self) -> Result<(), NatsError> {
        self.spawn()?;
        self.wait_healthy(READY_TIMEOUT)
    }

    /// Kills the server (SIGKILL: a crash, no goodbye to the cluster) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Polls `/healthz` until it answers 200.
    fn wait_healthy(&mut self, timeout: Duration) -> Result<(), NatsError> {
        let deadline = Instant::now() + timeout;
        let monitor = SocketAddr::new(self.addr, MONITOR_PORT);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(self.not_ready(format!("exited with {status}")));
            }
            let why = match http_get_in(&self.netns, monitor, "/healthz") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("/healthz answered {code}: {}", body.trim()),
                Err(e) => format!("/healthz: {e}"),
            };
            if Instant::now() >= deadline {
                return Err(self.not_ready(why));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn not_ready(&self, why: String) -> NatsError {
        NatsError::NotReady {
            name: self.name.clone(),
            why,
            log: self.log_tail(20),
        }
    }

    /// `GET path` from the server's monitoring port (`/varz`, `/jsz?streams=true`, ...): the
    /// body, JSON.
    ///
    /// # Errors
    /// When the server does not answer.
    pub fn monitor(&self, path: &str) -> io::Result<String> {
        http_get_in(&self.netns, SocketAddr::new(self.addr, MONITOR_PORT), path).map(|r| r.1)
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CPU time (user + system) and resident memory of a process, from `/proc/PID/stat` and
/// `/proc/PID/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcUsage {
    /// utime + stime.
    pub cpu: Duration,
    /// `VmRSS`, in bytes.
    pub rss_bytes: u64,
    /// `VmHWM` (peak resident set), in bytes.
    pub peak_rss_bytes: u64,
}

/// Reads [`ProcUsage`] of `pid`.
///
/// # Errors
/// When the process is gone or `/proc` cannot be parsed.
pub fn proc_usage(pid: u32) -> io::Result<ProcUsage> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/PID/stat");
    // Fields after the command (which may hold spaces) start at state, field 3.
    let rest = stat.rsplit_once(')').ok_or_else(bad)?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> io::Result<u64> {
        fields.get(i).and_then(|f| f.parse().ok()).ok_or_else(bad)
    };
    // utime is field 14 and stime 15 (1-based); `fields[0]` is field 3.
    let cpu_ticks = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok(ProcUsage {
        cpu: Duration::from_nanos(cpu_ticks * 1_000_000_000 / hz.max(1)),
        rss_bytes: kib("VmRSS:"),
        peak_rss_bytes: kib("VmHWM:"),
    })
}

/// A `Command` for `program` that runs in namespace `netns` (setns before exec; the mount
/// namespace stays the caller's).
///
/// # Errors
/// When the namespace cannot be opened.
pub fn netns_command(
    program: impl AsRef<std::ffi::OsStr>,
    netns: &str,
) -> Result<Command, NatsError> {
    let path = PathBuf::from(NETNS_RUN_DIR).join(netns);
    let file = File::open(&path).map_err(io_err(format!("open {}", path.display())))?;
    let mut cmd = Command::new(program);
    // SAFETY: only setns(2), async-signal-safe, runs between fork and exec; the file moves
    // into the closure, so its descriptor lives as long as the Command (O_CLOEXEC).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// `GET path` over HTTP/1.0 to `addr` from inside namespace `netns`: (status, body).
fn http_get_in(netns: &str, addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let path = path.to_string();
    netns::in_netns(netns, move || -> io::Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        let code = reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an HTTP reply"))?;
        let body = reply
            .split_once("\r\n\r\n")
            .map_or(String::new(), |b| b.1.to_string());
        Ok((code, body))
    })
    .map_err(|e| io::Error::other(e.to_string()))?
}

/// Brings `lo` up in namespace `name` (a fresh namespace has it down).
fn loopback_up(name: &str) -> Result<(), NatsError> {
    let ns = name.to_string();
    netns::in_netns(name, move || {
        block_on(async move {
            let handle = netns::handle_here().await?;
            let lo = netns::link_by_name(&handle, "lo").await?;
            netns::set_up(&handle, lo.index).await
        })
    })
    .map_err(netns_err(format!("enter {ns}")))?
    .map_err(netns_err(format!("bring lo up in {name}")))
}

/// One JetStream server in a namespace.
#[derive(Debug)]
pub struct NatsServer {
    // Field order is drop order: the process, then its directory, then its namespace.
    node: NatsNode,
    dir: TempDir,
    netns: Option<Netns>,
    netns_name: String,
}

impl NatsServer {
    /// Starts a server in a fresh namespace on `127.0.0.1:4222`, healthy on return.
    ///
    /// # Errors
    /// See [`NatsError`]; nothing is left behind.
    pub fn start(options: &NatsOptions) -> Result<NatsServer, NatsError> {
        NatsServer::start_named(&unique_name("vn"), options)
    }

    /// [`NatsServer::start`] in a fresh namespace named `name` (which must not exist; the
    /// benchmarks name theirs after their run id so that a sweep finds leftovers).
    ///
    /// # Errors
    /// See [`NatsError`]; nothing is left behind.
    pub fn start_named(name: &str, options: &NatsOptions) -> Result<NatsServer, NatsError> {
        let ns = Netns::create(name).map_err(netns_err(format!("create namespace {name}")))?;
        loopback_up(name)?;
        let mut server = NatsServer::prepare(name, IpAddr::V4(Ipv4Addr::LOCALHOST), options)?;
        server.netns = Some(ns);
        server.node.start()?;
        Ok(server)
    }

    /// Starts a server in namespace `netns` (which the caller owns and which must have
    /// `addr` on an interface that is up), listening on `addr`. Healthy on return.
    ///
    /// # Errors
    /// See [`NatsError`].
    pub fn start_in(
        netns: &str,
        addr: IpAddr,
        options: &NatsOptions,
    ) -> Result<NatsServer, NatsError> {
        let mut server = NatsServer::prepare(netns, addr, options)?;
        server.node.start()?;
        Ok(server)
    }

    fn prepare(netns: &str, addr: IpAddr, options: &NatsOptions) -> Result<NatsServer, NatsError> {
        let dir = TempDir::new()?;
        let node = NatsNode::prepare(&unique_name("nats"), netns, addr, &dir.0, options, None)?;
        Ok(NatsServer {
            node,
            dir,
            netns: None,
            netns_name: netns.to_string(),
        })
    }

    /// `nats://ADDR:4222`.
    pub fn url(&self) -> String {
        self.node.url()
    }

    /// The namespace clients run in to reach [`NatsServer::url`] (the server's own).
    pub fn client_netns(&self) -> &str {
        &self.netns_name
    }

    /// The process and its configuration.
    pub fn node(&mut self) -> &mut NatsNode {
        &mut self.node
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.node.pid()
    }

    /// A directory private to this server (removed on drop), for test files.
    pub fn scratch_dir(&self) -> &Path {
        &self.dir.0
    }

    /// A `Command` for `program` in [`NatsServer::client_netns`]. Panics if it cannot open it.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(program, &self.netns_name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs the future `f` makes on a thread in [`NatsServer::client_netns`], on a
    /// multi-threaded tokio runtime there.
    pub fn block_on<T, F>(&self, f: impl FnOnce() -> F + Send + 'static) -> T
    where
        T: Send + 'static,
        F: Future<Output = T>,
    {
        block_on_in(&self.netns_name, f)
    }
}

/// Runs the future `f` makes on a thread inside namespace `netns` with a multi-threaded
/// tokio runtime (its workers are spawned from that thread, so they share the namespace).
pub fn block_on_in<T, F>(netns: &str, f: impl FnOnce() -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: Future<Output = T>,
{
    netns::in_netns(netns, move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("build a tokio runtime")
            .block_on(f())
    })
    .unwrap_or_else(|e| panic!("enter namespace {netns}: {e}"))
}

/// A three-node JetStream cluster, a namespace per node, clients in a hub namespace that
/// routes between them (module docs).
#[derive(Debug)]
pub struct NatsCluster {
    // Drop order: processes, directory, node namespaces, hub.
    nodes: Vec<NatsNode>,
    _dir: TempDir,
    _node_ns: Vec<Netns>,
    hub: Netns,
}

/// The address of cluster node `i` (`10.77.i.2`).
fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, u8::try_from(i).expect("few nodes"), 2)
}

impl NatsCluster {
    /// Starts three nodes (cluster `viscum`), every one healthy on return.
    ///
    /// # Errors
    /// See [`NatsError`]; nothing is left behind.
    pub fn start(options: &NatsOptions) -> Result<NatsCluster, NatsError> {
        const NODES: usize = 3;
        let hub_name = unique_name("vn");
        let hub =
            Netns::create(&hub_name).map_err(netns_err(format!("create namespace {hub_name}")))?;
        netns::sysctl_set(Some(&hub_name), "net/ipv4/ip_forward", "1")
            .map_err(netns_err("enable forwarding in the hub"))?;
        let mut node_ns = Vec::new();
        for _ in 0..NODES {
            let name = unique_name("vn");
            node_ns
                .push(Netns::create(&name).map_err(netns_err(format!("create namespace {name}")))?);
        }
        let names: Vec<String> = node_ns.iter().map(|n| n.name().to_string()).collect();
        let hub_ns = hub_name.clone();
        netns::in_netns(&hub_name, move || {
            block_on(async move { link_cluster(&hub_ns, &names).await })
        })
        .map_err(netns_err("enter the hub"))??;

        let dir = TempDir::new()?;
        let mut nodes = Vec::new();
        for (i, ns) in node_ns.iter().enumerate() {
            let routes = (0..NODES)
                .filter(|&j| j != i)
                .map(|j| SocketAddr::new(IpAddr::V4(node_addr(j)), ROUTE_PORT))
                .collect();
            let node_dir = dir.0.join(format!("n{i}"));
            fs::create_dir_all(&node_dir)
                .map_err(io_err(format!("create {}", node_dir.display())))?;
            nodes.push(NatsNode::prepare(
                &format!("n{i}"),
                ns.name(),
                IpAddr::V4(node_addr(i)),
                &node_dir,
                options,
                Some(("viscum", routes)),
            )?);
        }
        let mut cluster = NatsCluster {
            nodes,
            _dir: dir,
            _node_ns: node_ns,
            hub,
        };
        for node in &mut cluster.nodes {
            node.spawn()?;
        }
        for node in &mut cluster.nodes {
            node.wait_healthy(READY_TIMEOUT)?;
        }
        Ok(cluster)
    }

    /// Every node's URL, node 0 first.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsNode::url).collect()
    }

    /// Node `i`.
    pub fn node(&mut self, i: usize) -> &mut NatsNode {
        &mut self.nodes[i]
    }

    /// Kills node `i` (SIGKILL).
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts node `i` again with its store and waits until it is healthy.
    ///
    /// # Errors
    /// See [`NatsNode::start`].
    pub fn start_node(&mut self, i: usize) -> Result<(), NatsError> {
        self.nodes[i].start()
    }

    /// What a failing test should show: for every node, whether it runs, its JetStream
    /// view of the streams and consumers (`/jsz`, with their cluster and leader), and the
    /// last `log_lines` lines of its log.
    pub fn diagnostics(&mut self, log_lines: usize) -> String {
        let mut out = String::new();
        for node in &mut self.nodes {
            let running = node.is_running();
            let _ = writeln!(
                out,
                "==== node {} ({}) ====",
                node.name,
                if running { "running" } else { "down" }
            );
            if running {
                let jsz = node
                    .monitor("/jsz?streams=true&consumers=true&config=true")
                    .unwrap_or_else(|e| format!("/jsz: {e}"));
                let _ = writeln!(out, "-- /jsz --\n{jsz}");
            }
            let _ = writeln!(out, "-- log --\n{}", node.log_tail(log_lines));
        }
        out
    }

    /// The hub namespace, where clients reach every node.
    pub fn client_netns(&self) -> &str {
        self.hub.name()
    }

    /// A `Command` for `program` in the hub namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(program, self.hub.name()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs the future `f` makes in the hub namespace (see [`block_on_in`]).
    pub fn block_on<T, F>(&self, f: impl FnOnce() -> F + Send + 'static) -> T
    where
        T: Send + 'static,
        F: Future<Output = T>,
    {
        block_on_in(self.hub.name(), f)
    }
}

/// Links the hub (this thread's namespace) to every node namespace: veth `n<i>` here,
/// `eth0` there, `10.77.i.0/24`, default route of each node via the hub.
async fn link_cluster(hub: &str, nodes: &[String]) -> Result<(), NatsError> {
    let handle = netns::handle_here()
        .await
        .map_err(netns_err(format!("netlink in {hub}")))?;
    let lo = netns::link_by_name(&handle, "lo")
        .await
        .map_err(netns_err("find lo in the hub"))?;
    netns::set_up(&handle, lo.index)
        .await
        .map_err(netns_err("bring lo up in the hub"))?;
    for (i, node) in nodes.iter().enumerate() {
        let host = format!("n{i}");
        let octet = u8::try_from(i).expect("few nodes");
        // Distinct indexes on both ends, so carrier comes up at once (see create_veth_indexed).
        let index = 100 + u32::from(octet) * 2;
        netns::create_veth_indexed(&handle, &host, index, "eth0", node, index + 1, None)
            .await
            .map_err(netns_err(format!("create veth {host} to {node}")))?;
        let link = netns::link_by_name(&handle, &host)
            .await
            .map_err(netns_err(format!("find {host}")))?;
        netns::add_address(
            &handle,
            link.index,
            IpAddr::V4(Ipv4Addr::new(10, 77, octet, 1)),
            24,
        )
        .await
        .map_err(netns_err(format!("address {host}")))?;
        netns::set_up(&handle, link.index)
            .await
            .map_err(netns_err(format!("bring {host} up")))?;
        let node = node.clone();
        netns::in_netns(&node.clone(), move || {
            block_on(async move {
                let h = netns::handle_here().await?;
                for name in ["lo", "eth0"] {
                    let l = netns::link_by_name(&h, name).await?;
                    netns::set_up(&h, l.index).await?;
                }
                let eth0 = netns::link_by_name(&h, "eth0").await?;
                netns::add_address(&h, eth0.index, IpAddr::V4(node_addr(i)), 24).await?;
                netns::add_route(
                    &h,
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    0,
                    Some(IpAddr::V4(Ipv4Addr::new(10, 77, octet, 1))),
                    Some(eth0.index),
                )
                .await
            })
        })
        .map_err(netns_err(format!("enter {node}")))?
        .map_err(netns_err(format!("address and route in {node}")))?;
    }
    // Wait for carrier on the hub's ends (the nodes' come up with them).
    for i in 0..nodes.len() {
        let addr = SocketAddr::new(IpAddr::V4(node_addr(i)), 9);
        let _ = wait_until(Duration::from_secs(5), || {
            // A refused connection means the path works (nothing listens on port 9 yet).
            matches!(
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
            )
        });
    }
    Ok(())
}
