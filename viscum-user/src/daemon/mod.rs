//! `viscum run`: the daemon that keeps a declarative set of services running at the edge and
//! redirects their cloud addresses to them only while they can answer.
//!
//! # Layout
//!
//! * this module: the supervisor ([`run`]): startup and adoption, the event loop (signals,
//!   control requests, load), reload as a diff, clean shutdown.
//! * [`service`]: one task per service: namespace, process, health checks, its entries.
//! * [`process`]: starting a process inside a namespace as another user; stopping it.
//! * [`health`]: tcp/http/exec checks run inside the service namespace.
//! * [`cgroup`]: memory/cpu/pids limits (cgroup v2, v1 where needed), reported per limit.
//! * [`logs`]: per-service log files, capped by rotation.
//! * [`load`]: pressure figures and the shed/resume decision.
//! * [`control`]: the line-delimited JSON control socket and the status types.
//! * [`links`]: link events from the kernel (interfaces deleted, re-created).
//! * [`metrics`]: the Prometheus exposition of a status snapshot.
//! * [`web`]: the HTTP listener of `engine.metrics`: `/metrics`, the status page, its JSON.
//! * [`state`]: run directory, ownership records, instance paths.
//!
//! # Restarting the daemon
//!
//! The datapath is pinned and needs no process: while the daemon is down, entries keep
//! redirecting and service processes keep running (they are in their own sessions and log to
//! files, not to pipes held by the daemon). A new daemon then takes over:
//!
//! * namespaces of configured services that this daemon instance created (a record in
//!   `state/`) are reused; a namespace of the same name made by someone else is refused;
//! * a service process is **adopted** only when it is provably the one the previous daemon
//!   started (pid *and* start time match the record, so a reused pid is never mistaken for
//!   it) and from the same configuration (fingerprint): it is then watched through a pidfd,
//!   and its entries stay while the new daemon's first checks run (the first failure removes
//!   them). Ongoing connections to the edge copy survive the restart. Anything else (spec
//!   changed, namespace recreated, pidfd unavailable) is not trusted: entries come out, the
//!   old process group gets SIGTERM then SIGKILL, and a fresh process starts;
//! * records of services no longer configured are cleaned up: entries, process group,
//!   namespace.
//!
//! A clean shutdown (SIGINT/SIGTERM, or the `shutdown` future) instead removes everything the
//! daemon made: entries (first, so traffic goes to the cloud), processes, namespaces, the
//! interfaces it attached, and the pins if it loaded the program.
//!
//! # Interfaces that come and go
//!
//! An attachment belongs to one instance of an interface: OpenWrt's `network restart` or a
//! re-created bridge or PPPoE link takes the classifier with it. The daemon watches link
//! events ([`links`]) and, on each batch and on a slow timer, brings the kernel back in line
//! with the configuration (`Daemon::check_links`): the classifier onto every configured
//! interface that exists without it, the reply classifier onto service veths that carry
//! entries, and entries whose target veth was re-created re-pointed at it
//! ([`crate::lifecycle`]). A service whose own veth vanished is rebuilt by its task: entries
//! out, process stopped, namespace re-created, process started again. `status` reports each
//! interface's attachment as the kernel has it, never from a record.

pub mod cgroup;
pub mod control;
mod fleet;
pub mod health;
pub mod links;
pub mod load;
pub mod logs;
pub mod metrics;
pub mod process;
mod redirects;
pub mod sandbox;
pub mod seccomp_bpf;
pub mod service;
pub mod shares;
pub mod state;
pub mod storage;
pub mod web;

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};

use self::{
    control::{DaemonStatus, Envelope, ReloadReport, Request, Response},
    health::SocketMaker,
    links::{LinkEvent, LinkWatcher},
    load::Shedder,
    service::Command,
    state::{DaemonRecord, RunPaths},
};
use crate::{
    config::Config,
    engine::{
        self, AttachOutcome, Engine, EngineError, MapSizes, Pins,
        attach::{AttachState, Attachment},
    },
    lifecycle, netns,
};

/// How often the daemon re-checks attachments and targets without a link event: the safety
/// net for events lost to a netlink overrun.
const LINK_RECHECK: Duration = Duration::from_secs(5);
/// How often the daemon hands freed heap back to the kernel ([`release_freed_heap`]).
const HEAP_TRIM: Duration = Duration::from_secs(60);

/// Why the daemon could not start (once running, problems are logged and reported instead).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon holds the instance lock (`flock(2)`, `LOCK_EX|LOCK_NB` gave `EWOULDBLOCK`).
    #[error("another viscum daemon already runs for this instance (it holds {path})")]
    AlreadyRunning {
        /// The lock file, `<run_dir>/daemon.lock` (it holds the owner's pid).
        path: PathBuf,
    },
    /// The run directory or its lock file could not be created, opened or locked.
    #[error("cannot prepare {path}")]
    RunDir {
        /// The directory or file that failed.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Attaching the classifier to `engine.interfaces`, or opening its pinned maps, failed.
    #[error("cannot attach the classifier")]
    Engine(#[from] EngineError),
    /// The control socket could not be set up (another daemon answers on it, or an I/O error).
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// The metrics endpoint (`engine.metrics`) could not be bound.
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        /// The configured listen address.
        addr: std::net::SocketAddr,
        /// The OS error from `bind`/`listen`.
        #[source]
        source: io::Error,
    },
    /// Network shares (`[engine.network]`) could not be put on the interfaces: one has a
    /// root qdisc Viscum did not make, or the kernel refused the HTB qdisc.
    #[error("cannot set up network shares")]
    Shares(#[from] crate::shares::ShareError),
    /// A piece of the daemon's own machinery could not start.
    #[error("cannot start the daemon's {what}")]
    Setup {
        /// What failed, e.g. `"SIGHUP handler"` or `"socket helper thread"`.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Settings that do not come from the configuration file.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// bpffs directory when the file has no `engine.bpffs` (the CLI's `--bpffs`).
    pub bpffs: PathBuf,
}

/// Where an instance lives, resolved from the file and the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// bpffs directory of the pinned program, maps and links (`engine.bpffs`, else the CLI's).
    pub bpffs: PathBuf,
    /// State directory (`engine.run_dir`, else [`state::default_run_dir`] of `bpffs`).
    pub run_dir: PathBuf,
    /// Control socket path (`engine.control`, else [`state::default_control`] of `bpffs`).
    pub control: PathBuf,
}

impl Instance {
    /// Fills in each path from `config.engine`, falling back to the defaults derived from
    /// `default_bpffs` (the CLI's `--bpffs`) when the file does not set it.
    pub fn resolve(config: &Config, default_bpffs: &Path) -> Instance {
        let bpffs = config
            .engine
            .bpffs
            .clone()
            .unwrap_or_else(|| default_bpffs.to_owned());
        Instance {
            run_dir: config
                .engine
                .run_dir
                .clone()
                .unwrap_or_else(|| state::default_run_dir(&bpffs)),
            control: config
                .engine
                .control
                .clone()
                .unwrap_or_else(|| state::default_control(&bpffs)),
            bpffs,
        }
    }
}

/// Runs the daemon until `shutdown` completes (the binary passes SIGINT/SIGTERM; tests pass
/// whatever they like), then removes everything it made. SIGHUP reloads the configuration
/// file the config was loaded from.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let instance = Instance::resolve(&config, &options.bpffs);
    let paths = RunPaths::new(&instance.run_dir);
    paths.create().map_err(|source| DaemonError::RunDir {
        path: paths.run_dir.clone(),
        source,
    })?;
    let _lock = lock(&paths)?;
    // The fleet's checkpointed services run from the start, like the file's.
    let (config, boot_fleet) = fleet::boot(config, &paths);

    let control_listener = control::bind(&instance.control).await?;
    let _socket = RemoveOnDrop(instance.control.clone());
    // Dropped before `_socket` (declared after it): the link goes first.
    let _link = control::link_default(&instance.control, &state::default_control(&instance.bpffs));
    let metrics_listener = match config.engine.metrics {
        Some(addr) => Some(
            web::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?,
        ),
        None => None,
    };
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map_err(
        |source| DaemonError::Setup {
            what: "SIGHUP handler",
            source,
        },
    )?;

    let pins = Pins::new(&instance.bpffs);
    let mut record: DaemonRecord = state::read_record(&paths.daemon_record()).unwrap_or_default();
    // Before the attach: refused shares change nothing.
    let mut shares = shares::DaemonShares::start(&config).await?;
    let had_program = pins.program().exists();
    let outcomes = match engine::attach(&pins, &config.engine.interfaces, MapSizes::default()) {
        Ok(o) => o,
        Err(e) => {
            // A daemon that does not start leaves no qdisc behind.
            shares.stop(&pins).await;
            return Err(e.into());
        }
    };
    note_attached(&mut record, &outcomes);
    record.loaded_program |= !had_program;
    // Interfaces a previous daemon attached that the file no longer names.
    let dropped: Vec<String> = record
        .attached
        .iter()
        .filter(|i| !config.engine.interfaces.contains(i))
        .cloned()
        .collect();
    detach_ours(&pins, &mut record, &dropped);
    save_record(&paths, &record);
    let engine = Engine::open(&pins)?;
    log::info!(
        "attached to {} (pins in {})",
        if config.engine.interfaces.is_empty() {
            "no interface".into()
        } else {
            config.engine.interfaces.join(", ")
        },
        instance.bpffs.display()
    );
    for problem in crate::features::forwarding_problems() {
        log::warn!("{problem}");
    }

    let sockets = SocketMaker::start().map_err(|source| DaemonError::Setup {
        what: "socket helper thread",
        source,
    })?;
    let (shed, _) = watch::channel(false);
    let resolver = if config.services.iter().any(|s| !s.host_matches.is_empty()) {
        match crate::hostnames::Resolver::new(&config.engine.dns) {
            Ok(r) => Some(Arc::new(r)),
            Err(e) => {
                log::warn!("host-name matches will not be resolved: {e}");
                None
            }
        }
    } else {
        crate::hostnames::Resolver::new(&config.engine.dns)
            .ok()
            .map(Arc::new)
    };
    let (links_changed, _) = watch::channel(0u64);
    let ctx = Arc::new(service::Context {
        engine: Arc::new(tokio::sync::Mutex::new(engine)),
        paths,
        sockets,
        shed,
        resolver,
        links: links_changed,
        storage_dir: config.engine.storage_dir.clone(),
    });

    let owned = redirects::Owned::default();
    redirects::set_owned(&owned, &config);
    let mut daemon = Daemon {
        owned: owned.clone(),
        shedder: config.engine.max_load.map(Shedder::new),
        config,
        instance,
        pins,
        ctx,
        record,
        services: BTreeMap::new(),
        started: Instant::now(),
        load: None,
        load_unreadable_said: false,
        link_log: LinkLog::default(),
        fleet: boot_fleet,
        shares,
    };
    daemon.remove_stale().await;
    daemon.remove_half_built().await;
    daemon.end_orphaned_drains().await;
    for svc in daemon.config.services.clone() {
        let name = svc.name.clone();
        daemon
            .services
            .insert(name, service::spawn(svc, daemon.ctx.clone()));
    }

    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Envelope>(16);
    // `redirect-add`/`redirect-del` are served by their connections' tasks, never queued.
    let redirects = redirects::Redirects {
        engine: daemon.ctx.engine.clone(),
        pins: daemon.pins.clone(),
        owned,
    };
    let control_task = tokio::spawn(control::serve_direct(
        control_listener,
        ctl_tx,
        Some(redirects.direct()),
    ));
    let (scrape_tx, mut scrape_rx) = mpsc::channel::<web::Scrape>(16);
    let metrics_task = metrics_listener.map(|l| tokio::spawn(web::serve(l, scrape_tx)));
    let (fleet_tx, mut fleet_rx) = mpsc::channel::<fleet::FleetRequest>(4);
    let fleet_task = fleet::start(&daemon.config, &daemon.ctx.paths, fleet_tx);
    log::info!(
        "running {} service(s); control socket {}",
        daemon.services.len(),
        daemon.instance.control.display()
    );

    // Subscribed before the first check, so no change between the two goes unseen.
    let mut watcher = LinkWatcher::start();
    // The first tick is immediate: entries whose target came back while no daemon ran.
    let mut link_tick = tokio::time::interval(LINK_RECHECK);
    link_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut shutdown = std::pin::pin!(shutdown);
    // Control requests that arrived while another one was being handled (other than
    // `status`, which is answered at once), in arrival order.
    let mut deferred = std::collections::VecDeque::new();
    let mut load_tick = tokio::time::interval(Duration::from_secs(1));
    // The first tick is immediate: what start-up freed (the eBPF object's parse, most of it).
    let mut trim_tick = tokio::time::interval(HEAP_TRIM);
    trim_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = hup.recv() => {
                log::info!("SIGHUP: reloading the configuration");
                let response = handle_answering_status(
                    &mut daemon,
                    &redirects,
                    Request::Reload,
                    &mut ctl_rx,
                    &mut scrape_rx,
                    &mut deferred,
                )
                .await;
                if !response.ok {
                    log::error!(
                        "reload refused, keeping the running configuration: {}{}{}",
                        response.error.as_deref().unwrap_or("refused"),
                        if response.problems.is_empty() { "" } else { ": " },
                        response.problems.join("; ")
                    );
                }
            }
            Some(envelope) = next_request(&mut deferred, &mut ctl_rx) => {
                if let Some((request, reply)) = redirects.take(envelope) {
                    let response = handle_answering_status(
                        &mut daemon,
                        &redirects,
                        request,
                        &mut ctl_rx,
                        &mut scrape_rx,
                        &mut deferred,
                    )
                    .await;
                    let _ = reply.send(response);
                }
            }
            Some(reply) = scrape_rx.recv() => {
                let _ = reply.send(daemon.status().await);
            }
            Some(request) = fleet_rx.recv() => {
                let source = daemon.status_source();
                answering_status(
                    source,
                    &redirects,
                    daemon.on_fleet(request),
                    &mut ctl_rx,
                    &mut scrape_rx,
                    &mut deferred,
                )
                .await;
            }
            _ = load_tick.tick(), if daemon.shedder.is_some() => daemon.check_load(),
            events = watcher.next() => daemon.on_link_events(&events).await,
            _ = link_tick.tick() => daemon.check_links().await,
            _ = trim_tick.tick() => release_freed_heap(),
        }
    }

    control_task.abort();
    if let Some(t) = fleet_task {
        t.abort();
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    daemon.shutdown().await;
    Ok(())
}

/// Whether service namespace `name` was built to the end (`netns::service_ns_add`): its
/// host veth and `eth0` exist with their pool addresses, the host veth, `lo` and `eth0` are
/// up, and the build's last step (`arp_announce` on `eth0`) is done. `Err` says what is
/// missing.
async fn namespace_complete(name: &str) -> Result<(), String> {
    netns::service_ns_check(name)
        .await
        .map(|_| ())
        .map_err(|e| service::error_chain(&e))
}

/// The next control request: one deferred earlier, else the next from the socket.
async fn next_request(
    deferred: &mut std::collections::VecDeque<Envelope>,
    ctl_rx: &mut mpsc::Receiver<Envelope>,
) -> Option<Envelope> {
    match deferred.pop_front() {
        Some(e) => Some(e),
        None => ctl_rx.recv().await,
    }
}

/// Handles one control request, answering `status` requests and scrapes meanwhile
/// ([`answering_status`]); a `status` request itself is answered at once.
async fn handle_answering_status(
    daemon: &mut Daemon,
    redirects: &redirects::Redirects,
    request: Request,
    ctl_rx: &mut mpsc::Receiver<Envelope>,
    scrape_rx: &mut mpsc::Receiver<web::Scrape>,
    deferred: &mut std::collections::VecDeque<Envelope>,
) -> Response {
    if matches!(request, Request::Status) {
        return daemon.handle(request).await;
    }
    let source = daemon.status_source();
    answering_status(
        source,
        redirects,
        daemon.handle(request),
        ctl_rx,
        scrape_rx,
        deferred,
    )
    .await
}

/// Runs `work`, a change to the daemon (a control request, a fleet apply) that may take long:
/// a `reload` or `service stop` may wait for a drain, up to `drain_timeout_ms`. Meanwhile
/// `status` requests and metric scrapes from other clients are answered from `source`, taken
/// before `work` started: the service list as it was, each service's live state and counters
/// as they are now. Redirect requests are served at once by `redirects`, as a CLI applying
/// them itself would be. Other control requests wait in `deferred` and are handled in order
/// afterwards, so the daemon's own changes stay serialised. Returns `work`'s output.
async fn answering_status<T>(
    source: StatusSource,
    redirects: &redirects::Redirects,
    work: impl Future<Output = T>,
    ctl_rx: &mut mpsc::Receiver<Envelope>,
    scrape_rx: &mut mpsc::Receiver<web::Scrape>,
    deferred: &mut std::collections::VecDeque<Envelope>,
) -> T {
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            output = &mut work => return output,
            Some((request, reply)) = ctl_rx.recv() => {
                if matches!(request, Request::Status) {
                    let _ = reply.send(Response {
                        ok: true,
                        status: Some(source.status().await),
                        ..Default::default()
                    });
                } else if let Some(envelope) = redirects.take((request, reply)) {
                    deferred.push_back(envelope);
                }
            }
            Some(reply) = scrape_rx.recv() => {
                let _ = reply.send(source.status().await);
            }
        }
    }
}

/// Takes the instance lock (an `flock` on `<run_dir>/daemon.lock`, released by the kernel
/// however the daemon ends, so a crashed daemon never blocks its successor).
fn lock(paths: &RunPaths) -> Result<nix::fcntl::Flock<std::fs::File>, DaemonError> {
    use nix::fcntl::{Flock, FlockArg};
    let path = paths.lock();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| DaemonError::RunDir {
            path: path.clone(),
            source,
        })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            let _ = lock.set_len(0);
            let _ =
                io::Write::write_all(&mut &*lock, format!("{}\n", std::process::id()).as_bytes());
            Ok(lock)
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(DaemonError::AlreadyRunning { path }),
        Err((_, e)) => Err(DaemonError::RunDir {
            path,
            source: e.into(),
        }),
    }
}

/// Removes a file when dropped (the control socket, however `run` returns).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn note_attached(record: &mut DaemonRecord, outcomes: &[(String, AttachOutcome)]) {
    for (iface, outcome) in outcomes {
        if *outcome != AttachOutcome::AlreadyAttached && !record.attached.contains(iface) {
            record.attached.push(iface.clone());
        }
    }
}

/// Detaches those of `ifaces` this daemon attached (and that are still attached, or have a
/// stale record left by a deleted interface).
fn detach_ours(pins: &Pins, record: &mut DaemonRecord, ifaces: &[String]) -> Vec<String> {
    let attached = engine::attach::recorded_interfaces(pins);
    let mut done = Vec::new();
    for iface in ifaces {
        if !record.attached.contains(iface) {
            continue;
        }
        if attached.contains(iface) {
            match engine::detach(pins, std::slice::from_ref(iface)) {
                Ok(()) => {
                    log::info!("detached from {iface}");
                    done.push(iface.clone());
                }
                Err(e) => {
                    log::warn!("cannot detach from {iface}: {}", service::error_chain(&e));
                    continue;
                }
            }
        }
        record.attached.retain(|i| i != iface);
    }
    done
}

fn save_record(paths: &RunPaths, record: &DaemonRecord) {
    if let Err(e) = state::write_record(&paths.daemon_record(), record) {
        log::warn!("cannot write {}: {e}", paths.daemon_record().display());
    }
}

/// The supervisor's state.
struct Daemon {
    config: Config,
    /// The configuration's exact matches by service, for `redirect-del` to refuse deleting
    /// an entry a service would restore ([`redirects::Redirects`]).
    owned: redirects::Owned,
    instance: Instance,
    pins: Pins,
    ctx: Arc<service::Context>,
    record: DaemonRecord,
    /// Service tasks by name.
    services: BTreeMap<String, service::Handle>,
    started: Instant,
    /// Present when `max_load` is set.
    shedder: Option<Shedder>,
    load: Option<(f64, load::Source)>,
    /// That the load cannot be read was logged already.
    load_unreadable_said: bool,
    /// What has been said about interfaces and targets, so each change is logged once.
    link_log: LinkLog,
    /// The fleet services among `config.services`, as last applied ([`fleet`]).
    fleet: Vec<crate::config::FleetService>,
    /// Network shares' qdiscs and map entries ([`shares`]).
    shares: shares::DaemonShares,
}

/// Everything `status` reads, owned: the daemon's settings as they were when it was taken,
/// the services' published state and the datapath's counters as they are when
/// [`StatusSource::status`] runs.
struct StatusSource {
    ctx: Arc<service::Context>,
    /// Each service's published state, in name order.
    services: Vec<Arc<std::sync::Mutex<service::Shared>>>,
    config: Option<PathBuf>,
    instance: Instance,
    pins: Pins,
    interfaces: Vec<String>,
    started: Instant,
    load: Option<(f64, load::Source)>,
    max_load: Option<f64>,
}

impl StatusSource {
    /// A consistent snapshot: service counters are read under the engine lock, the same lock
    /// service tasks hold while they move entries in and out.
    async fn status(&self) -> DaemonStatus {
        let engine = self.ctx.engine.lock().await;
        let now = Instant::now();
        let mut services = Vec::new();
        let live = engine.edge_flows().unwrap_or_default();
        for shared in &self.services {
            let shared = shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut s = shared.status.clone();
            s.uptime_s = shared
                .started
                .map(|t| now.saturating_duration_since(t).as_secs());
            s.next_start_in_ms = shared
                .next_start
                .map(|t| t.saturating_duration_since(now).as_millis() as u64);
            let (mut packets, mut bytes) = (shared.acc_packets, shared.acc_bytes);
            let (mut edge_flows, mut cloud_flows) = (shared.acc_edge_flows, shared.acc_cloud_flows);
            for ep in shared.installed.iter().chain(&shared.resolved) {
                if let Ok(Some(e)) = engine.get(ep)
                    && Some(e.ifindex) == shared.host_ifindex
                {
                    packets += e.packets;
                    bytes += e.bytes;
                    edge_flows += e.new_flows;
                    cloud_flows += e.cloud_flows;
                }
            }
            s.oom_kills = shared.oom_events.as_deref().and_then(cgroup::oom_kills_in);
            if let (Some(st), Some(pid)) = (s.storage.as_mut(), s.pid)
                && let Some((total, used)) = storage::usage(pid, &st.path)
            {
                st.total_bytes = Some(total);
                st.used_bytes = Some(used);
            }
            s.packets = packets;
            s.bytes = bytes;
            s.edge_flows = edge_flows;
            s.cloud_flows = cloud_flows;
            s.live_flows = shared
                .host_ifindex
                .and_then(|i| live.get(&i).copied())
                .unwrap_or(0);
            services.push(s);
        }
        let datapath = engine.global_stats().ok();
        drop(engine);
        DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            config: self.config.clone(),
            bpffs: self.instance.bpffs.clone(),
            run_dir: self.instance.run_dir.clone(),
            control: self.instance.control.clone(),
            interfaces: engine::attached_interfaces(&self.pins),
            attachments: self.attachments(),
            uptime_s: self.started.elapsed().as_secs(),
            load: self.load.map(|l| l.0),
            load_source: self.load.map(|l| l.1),
            max_load: self.max_load,
            shedding: *self.ctx.shed.borrow(),
            datapath,
            services,
        }
    }

    /// Every configured interface, plus any other this instance has a record for, with its
    /// attachment as the kernel has it.
    fn attachments(&self) -> Vec<Attachment> {
        let mut names: BTreeSet<String> = self.interfaces.iter().cloned().collect();
        names.extend(engine::attach::recorded_interfaces(&self.pins));
        names
            .iter()
            .map(|n| engine::attach::attachment(&self.pins, n))
            .collect()
    }
}

/// Link-related conditions already logged.
#[derive(Default)]
struct LinkLog {
    /// Configured interfaces known to be gone.
    gone: BTreeSet<String>,
    /// Last attach error per interface.
    attach_errors: BTreeMap<String, String>,
    /// Entries known to wait for their target.
    waiting: BTreeSet<String>,
    /// Last re-point error per entry.
    failed: BTreeMap<String, String>,
}

impl Daemon {
    /// Cleans up services a previous daemon ran that the configuration no longer has:
    /// entries into their namespaces, their processes, the namespaces, the records.
    async fn remove_stale(&mut self) {
        let recorded = match self.ctx.paths.recorded_services() {
            Ok(r) => r,
            Err(e) => {
                log::warn!("cannot list {}: {e}", self.ctx.paths.state_dir().display());
                return;
            }
        };
        for name in recorded {
            if self.config.service(&name).is_some() {
                continue;
            }
            log::info!(
                "service {name}: no longer configured; removing what a previous daemon left"
            );
            let path = self.ctx.paths.service_record(&name);
            let rec: Option<state::ServiceRecord> = state::read_record(&path);
            if let Ok(ns) = crate::netns::service_ns_get(&name).await {
                let mut engine = self.ctx.engine.lock().await;
                let _ = engine::detach_reply(&self.pins, &ns.host_veth);
                match crate::redirect::del_all_to(&mut engine, ns.host_ifindex).await {
                    Ok(removed) if !removed.is_empty() => log::info!(
                        "service {name}: removed {}",
                        removed
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    Ok(_) => {}
                    Err(e) => log::warn!("service {name}: cannot remove its entries: {e}"),
                }
            }
            if let Some(rec) = rec
                && let (Some(pid), Some(start)) = (rec.pid, rec.start_time)
                && process::is_same_process(pid, start)
            {
                process::stop_stale(
                    pid,
                    Duration::from_millis(crate::config::DEFAULT_STOP_GRACE_MS),
                )
                .await;
            }
            match crate::netns::service_ns_del(&name).await {
                Ok(()) | Err(crate::netns::NetnsError::UnknownNamespace { .. }) => {}
                Err(e) => log::warn!(
                    "service {name}: cannot delete its namespace: {}",
                    service::error_chain(&e)
                ),
            }
            cgroup::remove_named(&name);
            storage::remove(&self.ctx.storage_dir, &name);
            let _ = state::remove_record(&path);
        }
    }

    /// Deletes the namespaces of configured services that a previous daemon died while
    /// building (killed between `create_named` and the last step of the build), so their
    /// tasks make them again. Ownership is the service's record, written before the
    /// namespace is created. Without this, a namespace with its veth but without, say, its
    /// loopback up passes for a finished one and the service never turns healthy; one killed
    /// before its veth was made is refused as "not a service namespace" and the service
    /// fails for good.
    async fn remove_half_built(&mut self) {
        let recorded = self.ctx.paths.recorded_services().unwrap_or_default();
        for name in recorded {
            if self.config.service(&name).is_none() || !netns::named_exists(&name) {
                continue;
            }
            let Err(why) = namespace_complete(&name).await else {
                continue;
            };
            log::warn!(
                "service {name}: its namespace was left half-built ({why}), by a daemon that died while making it; deleting it so it is made again"
            );
            if let Ok(host) = netns::handle_here().await
                && let Ok(link) = netns::link_by_name(&host, &netns::host_veth_name(&name)).await
            {
                {
                    let mut engine = self.ctx.engine.lock().await;
                    let _ = crate::redirect::del_all_to(&mut engine, link.index).await;
                }
                if let Err(e) = netns::delete_link(&host, link.index).await {
                    log::warn!("service {name}: cannot delete its half-built veth: {e}");
                }
            }
            if let Err(e) = netns::delete_named(&name) {
                log::warn!("service {name}: cannot delete its half-built namespace: {e}");
            }
        }
    }

    /// Clears the draining mark of entries into configured services' namespaces. A drain is
    /// the work of one daemon (a `service stop`, a reload): killed during it, the daemon
    /// leaves its entries taking no new flows, and the next one would adopt them as they
    /// are, reporting the service redirected while all its new traffic goes to the cloud,
    /// for good. With the mark cleared, the service's task adopts them like any other
    /// (health-gated) or removes them.
    async fn end_orphaned_drains(&mut self) {
        let Ok(host) = netns::handle_here().await else {
            return;
        };
        for svc in &self.config.services {
            let Ok(link) = netns::link_by_name(&host, &netns::host_veth_name(&svc.name)).await
            else {
                continue;
            };
            let mut engine = self.ctx.engine.lock().await;
            for ep in &svc.matches {
                let Ok(Some(e)) = engine.get(ep) else {
                    continue;
                };
                if e.ifindex != link.index || e.flags & viscum_common::TARGET_F_DRAINING == 0 {
                    continue;
                }
                match engine.update_flags(ep, |f| f & !viscum_common::TARGET_F_DRAINING) {
                    Ok(()) => log::info!(
                        "service {}: {ep} was left draining by a previous daemon; the drain ended with it",
                        svc.name
                    ),
                    Err(e) => log::warn!(
                        "service {}: cannot end the drain of {ep}: {}",
                        svc.name,
                        service::error_chain(&e)
                    ),
                }
            }
        }
    }

    async fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Status => Response {
                ok: true,
                status: Some(self.status().await),
                ..Default::default()
            },
            Request::Reload => self.reload().await,
            Request::Start { service } => self.forward(&service, Command::Start).await,
            Request::Stop { service } => self.forward(&service, Command::Stop).await,
            Request::Restart { service } => self.forward(&service, Command::Restart).await,
            // Served by `redirects::Redirects::take` before they get here.
            r @ (Request::RedirectAdd(_) | Request::RedirectDel(_)) => {
                redirects::Redirects {
                    engine: self.ctx.engine.clone(),
                    pins: self.pins.clone(),
                    owned: self.owned.clone(),
                }
                .serve(r)
                .await
            }
        }
    }

    async fn forward(&self, name: &str, make: impl FnOnce(service::Reply) -> Command) -> Response {
        let Some(handle) = self.services.get(name) else {
            let known = self.services.keys().cloned().collect::<Vec<_>>().join(", ");
            return Response::error(format!(
                "no service named {name} (configured: {})",
                if known.is_empty() { "none" } else { &known }
            ));
        };
        match handle.request(make).await {
            Ok(msg) => Response::ok(msg),
            Err(e) => Response::error(e),
        }
    }

    /// A consistent snapshot: service counters are read under the engine lock, the same lock
    /// service tasks hold while they move entries in and out.
    async fn status(&self) -> DaemonStatus {
        self.status_source().status().await
    }

    /// What [`StatusSource::status`] reads, detached from `self` so that status can be
    /// answered while `self` is busy with a long request.
    fn status_source(&self) -> StatusSource {
        StatusSource {
            ctx: self.ctx.clone(),
            services: self.services.values().map(|h| h.shared.clone()).collect(),
            config: self.config.source.clone(),
            instance: self.instance.clone(),
            pins: self.pins.clone(),
            interfaces: self.config.engine.interfaces.clone(),
            started: self.started,
            load: self.load,
            max_load: self.config.engine.max_load,
        }
    }

    /// [`Engine::repin`] under the instance's write lock, after mounting the bpffs if it is
    /// gone; failures are logged (the attach that follows then starts from fresh maps, and
    /// the services' tasks put their entries back as they re-check their targets).
    async fn repin(&self) {
        let result = async {
            crate::bpffs::ensure(&self.pins.dir).map_err(|e| e.to_string())?;
            let _lock = engine::lock(&self.pins).map_err(|e| e.to_string())?;
            self.ctx
                .engine
                .lock()
                .await
                .repin()
                .map_err(|e| service::error_chain(&e))
        }
        .await;
        match result {
            Ok(0) => {}
            Ok(n) => log::info!(
                "pinned {n} map(s) again in {} (its pins were gone)",
                self.pins.dir.display()
            ),
            Err(e) => log::warn!(
                "cannot pin the maps again in {}: {e}",
                self.pins.dir.display()
            ),
        }
    }

    /// A batch of link events: service tasks check their veths, then everything else is
    /// brought in line with the kernel ([`Daemon::check_links`]). An empty batch means
    /// events may have been lost: same thing.
    async fn on_link_events(&mut self, events: &[LinkEvent]) {
        for ev in events {
            log::debug!("link event: {ev:?}");
        }
        if events.is_empty() || events.iter().any(|e| matches!(e, LinkEvent::Del { .. })) {
            self.ctx.links.send_modify(|g| *g = g.wrapping_add(1));
        }
        self.check_links().await;
    }

    /// Makes the kernel match the configuration again where interfaces came and went: the
    /// classifier onto every configured interface that exists without it (re-created), the
    /// reply classifier onto service veths that carry entries, and entries whose target veth
    /// was re-created re-pointed at it. Each change of condition is logged once.
    async fn check_links(&mut self) {
        for iface in self.config.engine.interfaces.clone() {
            let a = engine::attach::attachment(&self.pins, &iface);
            match a.state {
                AttachState::Attached => {
                    self.link_log.attach_errors.remove(&iface);
                    if self.link_log.gone.remove(&iface) {
                        log::info!("{iface} is back, with the classifier attached");
                    }
                }
                AttachState::InterfaceGone => {
                    if self.link_log.gone.insert(iface.clone()) {
                        log::warn!(
                            "{iface} is gone: its clients' traffic is not classified until it is back (the classifier is re-attached when it re-appears)"
                        );
                    }
                }
                AttachState::Missing | AttachState::NotAttached => {
                    if !self.pins.program().exists() {
                        // The pins are gone (the bpffs unmounted or the directory removed
                        // behind our back) while this daemon still holds the maps: pin them
                        // again first, so the classifier is loaded over them and the
                        // entries this daemon keeps writing are the ones it reads.
                        self.repin().await;
                    }
                    match engine::attach(
                        &self.pins,
                        std::slice::from_ref(&iface),
                        MapSizes::default(),
                    ) {
                        Ok(outcomes) => {
                            self.link_log.gone.remove(&iface);
                            self.link_log.attach_errors.remove(&iface);
                            note_attached(&mut self.record, &outcomes);
                            save_record(&self.ctx.paths, &self.record);
                            log::info!(
                                "re-attached to {iface}: the classifier was missing ({})",
                                a.describe()
                            );
                        }
                        Err(e) => {
                            let msg = service::error_chain(&e);
                            if self.link_log.attach_errors.get(&iface) != Some(&msg) {
                                log::warn!("cannot re-attach to {iface}: {msg}");
                                self.link_log.attach_errors.insert(iface.clone(), msg);
                            }
                        }
                    }
                }
                AttachState::OtherNetns => {
                    // Not ours to re-attach: this daemon runs in another namespace than
                    // the instance it shares a bpffs with.
                    if self.link_log.gone.insert(iface.clone()) {
                        log::warn!(
                            "{iface}: the classifier of this bpffs is attached to an {iface} in another network namespace; this daemon runs in the wrong one"
                        );
                    }
                }
                AttachState::Unknown => log::debug!("{iface}: {}", a.describe()),
            }
        }

        // Reply classifiers: service tasks attach them with their entries; one that vanished
        // while its veth stayed (removed behind our back) comes back here.
        for (name, handle) in &self.services {
            let (has_entries, ifindex) = {
                let s = handle.lock();
                (
                    !s.installed.is_empty() || !s.resolved.is_empty(),
                    s.host_ifindex,
                )
            };
            if !has_entries || !ifindex.is_some_and(lifecycle::ifindex_alive) {
                continue;
            }
            let veth = netns::host_veth_name(name);
            if !engine::attach::reply_attached(&self.pins, &veth) {
                match engine::attach_reply(&self.pins, &veth) {
                    Ok(_) => log::info!("re-attached the reply classifier to {veth}"),
                    Err(e) => log::warn!(
                        "cannot re-attach the reply classifier to {veth}: {}",
                        service::error_chain(&e)
                    ),
                }
            }
        }

        self.sync_shares().await;

        // Entries whose target came back. The daemon's own services are their tasks'
        // business (health-gated), so their veths are skipped.
        let managed: BTreeSet<String> = self
            .services
            .keys()
            .map(|n| netns::host_veth_name(n))
            .collect();
        let report = {
            let mut engine = self.ctx.engine.lock().await;
            lifecycle::recover_targets(&mut engine, &|n| managed.contains(n)).await
        };
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                log::warn!(
                    "cannot check redirect targets: {}",
                    service::error_chain(&e)
                );
                return;
            }
        };
        for r in &report.recovered {
            let ep = r.endpoint.to_string();
            self.link_log.waiting.remove(&ep);
            self.link_log.failed.remove(&ep);
            log::info!(
                "{ep}: its target {} is back (ifindex {} -> {}): redirecting again",
                r.target,
                r.old_ifindex,
                r.new_ifindex
            );
        }
        for w in &report.waiting {
            if self.link_log.waiting.insert(w.endpoint.to_string()) {
                log::warn!(
                    "{}: its target {} is gone: its traffic goes to the cloud until it is back",
                    w.endpoint,
                    w.name
                        .clone()
                        .unwrap_or_else(|| format!("(ifindex {})", w.ifindex))
                );
            }
        }
        for (ep, why) in &report.failed {
            let ep = ep.to_string();
            if self.link_log.failed.get(&ep) != Some(why) {
                log::warn!("{ep}: cannot redirect to its re-created target: {why}");
                self.link_log.failed.insert(ep, why.clone());
            }
        }
    }

    fn check_load(&mut self) {
        let Some(shedder) = &mut self.shedder else {
            return;
        };
        let scope = self.config.engine.load_scope;
        let Some((value, source)) = load::current_for(scope) else {
            if self.load.is_some() || !self.load_unreadable_said {
                log::warn!(
                    "cannot read the load ({scope:?} scope: no PSI nor /proc/loadavg, or no cgroup v2 group of the services with PSI yet): not shedding on it"
                );
                self.load_unreadable_said = true;
            }
            self.load = None;
            return;
        };
        self.load = Some((value, source));
        if let Some(shedding) = shedder.update(value) {
            if shedding {
                log::warn!(
                    "load {value:.2} ({source:?}) is above max_load {:.2}: shedding every service to the cloud",
                    shedder.max_load
                );
            } else {
                log::warn!(
                    "load {value:.2} ({source:?}) is back below {:.2}: services may be redirected again",
                    shedder.max_load * load::RESUME_RATIO
                );
            }
            self.ctx.shed.send_replace(shedding);
        }
    }

    /// Re-reads the file and applies it as a diff; an invalid file changes nothing.
    async fn reload(&mut self) -> Response {
        let Some(path) = self.config.source.clone() else {
            return Response::error(
                "the daemon was started without a configuration file: nothing to reload",
            );
        };
        let new = match Config::load(&path) {
            Ok(c) => c,
            // Logged by a SIGHUP's caller; a control request's client shows it.
            Err(e) => {
                return Response {
                    ok: false,
                    error: Some(format!(
                        "{path}: invalid configuration, nothing changed",
                        path = path.display()
                    )),
                    problems: e.problems(),
                    ..Default::default()
                };
            }
        };
        // The fleet's services join the file's.
        let new = match self.with_fleet(new) {
            Ok(c) => c,
            Err(response) => return *response,
        };
        self.apply(new, &path).await
    }

    /// Applies a validated configuration (the file's services and the fleet's) as a diff
    /// against the running one; what cannot change while running refuses it whole. `path`
    /// names the file in messages.
    async fn apply(&mut self, new: Config, path: &Path) -> Response {
        // What only a restart can change, and interfaces that do not exist: refuse up front,
        // before anything is touched.
        let mut problems = Vec::new();
        let next = Instance::resolve(&new, &self.instance.bpffs);
        for (field, old, new) in [
            ("bpffs", &self.instance.bpffs, &next.bpffs),
            ("run_dir", &self.instance.run_dir, &next.run_dir),
            ("control", &self.instance.control, &next.control),
        ] {
            if old != new {
                problems.push(format!(
                    "engine: {field}: cannot change while running (restart the daemon)"
                ));
            }
        }
        if new.engine.metrics != self.config.engine.metrics {
            problems
                .push("engine: metrics: cannot change while running (restart the daemon)".into());
        }
        if new.engine.storage_dir != self.config.engine.storage_dir {
            problems.push(
                "engine: storage_dir: cannot change while running (restart the daemon)".into(),
            );
        }
        for (i, iface) in new.engine.interfaces.iter().enumerate() {
            if !self.config.engine.interfaces.contains(iface)
                && let Err(e) = engine::ifindex(iface)
            {
                problems.push(format!("engine: interfaces[{i}]: {e}"));
            }
        }
        if let Err(e) = self.shares.check(&new).await {
            problems.push(e);
        }
        if !problems.is_empty() {
            log::error!(
                "reload: keeping the running configuration: {}",
                problems.join("; ")
            );
            return Response {
                ok: false,
                error: Some(format!("{}: cannot apply, nothing changed", path.display())),
                problems,
                ..Default::default()
            };
        }

        let mut report = ReloadReport::default();
        let old_names: BTreeSet<String> = self.services.keys().cloned().collect();
        let new_names: BTreeSet<String> = new.services.iter().map(|s| s.name.clone()).collect();
        let mut stopping = Vec::new();
        for name in &old_names {
            match new.service(name) {
                None => {
                    report.removed.push(name.clone());
                    stopping.push((self.services.remove(name).expect("listed"), true));
                }
                Some(cfg) if !shares::same_but_network(cfg, &self.services[name].config) => {
                    report.changed.push(name.clone());
                    stopping.push((self.services.remove(name).expect("listed"), false));
                }
                Some(_) => report.unchanged.push(name.clone()),
            }
        }
        // Removed and changed services release their entries before anyone else may need
        // their matches.
        futures::future::join_all(stopping.into_iter().map(|(h, delete)| h.shutdown(delete))).await;
        // Their data goes with them, unless configured with `keep = true`.
        for name in &report.removed {
            storage::remove(&self.ctx.storage_dir, name);
        }
        // The rest of the apply is one change of the instance: CLI writers wait for it, and it
        // for them (see `engine::lock`). Not taken before: removed services drain for up to
        // their `drain_timeout_ms`, and each of their steps takes the lock on its own, so CLI
        // commands are not held up by a drain. Released when the reload returns, never held
        // while idle. Half a reload would leave the daemon out of step with its file, so
        // without the lock (another writer held it for a minute) it goes on step by step,
        // each step still under the lock.
        let _write = engine::lock(&self.pins)
            .inspect_err(|e| {
                log::warn!("reload: applying step by step: {}", service::error_chain(e));
            })
            .ok();
        for svc in &new.services {
            if !self.services.contains_key(&svc.name) {
                if !old_names.contains(&svc.name) {
                    report.added.push(svc.name.clone());
                }
                self.services.insert(
                    svc.name.clone(),
                    service::spawn(svc.clone(), self.ctx.clone()),
                );
            }
        }
        debug_assert_eq!(
            self.services.keys().cloned().collect::<BTreeSet<_>>(),
            new_names
        );

        // Interfaces.
        let added: Vec<String> = new
            .engine
            .interfaces
            .iter()
            .filter(|i| !self.config.engine.interfaces.contains(i))
            .cloned()
            .collect();
        if !added.is_empty() {
            match engine::attach(&self.pins, &added, MapSizes::default()) {
                Ok(outcomes) => {
                    note_attached(&mut self.record, &outcomes);
                    report.attached = added;
                }
                Err(e) => log::error!(
                    "reload: cannot attach to {}: {}",
                    added.join(", "),
                    service::error_chain(&e)
                ),
            }
        }
        let gone: Vec<String> = self
            .config
            .engine
            .interfaces
            .iter()
            .filter(|i| !new.engine.interfaces.contains(i))
            .cloned()
            .collect();
        report.detached = detach_ours(&self.pins, &mut self.record, &gone);
        save_record(&self.ctx.paths, &self.record);
        self.shares.reload(&self.pins, &new).await;

        // Load shedding.
        if new.engine.max_load != self.config.engine.max_load {
            let was = self.shedder.as_ref().is_some_and(|s| s.shedding);
            self.shedder = new.engine.max_load.map(|m| Shedder {
                max_load: m,
                shedding: was,
            });
            if self.shedder.is_none() {
                self.load = None;
                if was {
                    log::warn!("max_load removed: services may be redirected again");
                    self.ctx.shed.send_replace(false);
                }
            }
        }

        redirects::set_owned(&self.owned, &new);
        self.config = new;
        // A reload is also the operator's way of saying "look again": re-attach where the
        // kernel lost the classifier, re-point entries at re-created targets.
        self.check_links().await;
        log::info!(
            "reloaded: added [{}], removed [{}], changed [{}], unchanged [{}]",
            report.added.join(", "),
            report.removed.join(", "),
            report.changed.join(", "),
            report.unchanged.join(", ")
        );
        Response {
            ok: true,
            message: Some(format!(
                "reloaded: {} added, {} removed, {} changed, {} unchanged",
                report.added.len(),
                report.removed.len(),
                report.changed.len(),
                report.unchanged.len()
            )),
            reload: Some(report),
            ..Default::default()
        }
    }

    /// Clean shutdown: every service's entries, process and namespace, then the interfaces
    /// this daemon attached, then the pins if it loaded the program and nothing else uses it.
    async fn shutdown(mut self) {
        log::info!("shutting down: removing {} service(s)", self.services.len());
        let handles: Vec<_> = std::mem::take(&mut self.services).into_values().collect();
        futures::future::join_all(handles.into_iter().map(|h| h.shutdown(true))).await;
        cgroup::remove_bases();
        self.shares.stop(&self.pins).await;
        let ours = self.record.attached.clone();
        detach_ours(&self.pins, &mut self.record, &ours);
        let leftover = self
            .ctx
            .engine
            .lock()
            .await
            .entries()
            .map(|e| e.len())
            .unwrap_or(usize::MAX);
        if self.record.loaded_program
            && leftover == 0
            && engine::attach::recorded_interfaces(&self.pins).is_empty()
        {
            match engine::purge(&self.pins) {
                Ok(()) => log::info!("removed the pins in {}", self.pins.dir.display()),
                Err(e) => log::warn!("cannot remove the pins: {}", service::error_chain(&e)),
            }
        } else if leftover > 0 {
            log::info!(
                "leaving the datapath pinned: {leftover} entries were not made by this daemon"
            );
        }
        let _ = state::remove_record(&self.ctx.paths.daemon_record());
        log::info!("stopped");
    }
}

/// Hands freed heap pages back to the kernel: glibc's malloc_trim(3), which since glibc 2.8
/// also releases whole free pages inside the heap, not only at its top. Start-up frees
/// 2.4 MiB (the embedded eBPF object's parse, the configuration's) that glibc would keep
/// resident for the daemon's life: an idle daemon's RSS 12.8 -> 10.4 MiB on this machine
/// (B9, `docs/benchmarks.md`). musl's allocator returns freed memory itself and has no
/// malloc_trim.
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
