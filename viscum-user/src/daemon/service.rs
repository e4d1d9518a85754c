//! One supervised service: a task that owns its namespace, process, health checks and
//! redirect entries.
//!
//! The rule it keeps: the service's entries are in the datapath only while its process runs,
//! its checks pass (`rise` in a row since it started) and the box is not shedding load.
//! Everything that breaks the rule removes the entries *first* (process exit at once, without
//! waiting for `fall` failed checks; `fall` failed checks; stop; shedding), so traffic falls
//! back to the cloud before anything else happens.
//!
//! The task reacts to one event at a time (a command, the process ending, a check finishing,
//! a timer), then brings the entries in line with the rule (`Actor::reconcile`) and
//! publishes its status for the supervisor. Being the only writer of its own entries, it needs
//! no coordination beyond the engine's lock.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    cgroup::{self, Placement},
    control::{Health, ServiceState, ServiceStatus},
    health::{self, CheckContext, SocketMaker, Tracker, Transition},
    logs,
    process::{self, Exit, Proc},
    state::{self, RunPaths, ServiceRecord},
    storage::{self, StorageStatus},
};
pub use crate::entries::error_chain;
use crate::{
    config::ServiceConfig,
    endpoint::Endpoint,
    engine::Engine,
    entries::{self, Counters, EntrySet},
    hostnames::HostSet,
    netns::{self, NetnsError},
    redirect::{self, Target},
};

/// Free space below which a service's log is not written at start (see `start`).
const LOG_MIN_FREE: u64 = 64 * 1024;

/// First restart delay; doubled for each failure in a row.
const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest restart delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run healthy for this long resets the restart delay.
const BACKOFF_RESET: Duration = Duration::from_secs(60);
/// The first check after a start comes sooner than `interval` (but not sooner than this), so
/// a fast service is redirected after about `rise` checks, not `rise` + 1 intervals.
const FIRST_CHECK: Duration = Duration::from_millis(100);

/// Daemon-wide things every service task uses.
pub struct Context {
    /// The datapath's pinned maps; held while a task changes its entries.
    pub engine: Arc<tokio::sync::Mutex<Engine>>,
    /// The instance's run directory (logs, ownership records).
    pub paths: RunPaths,
    /// The helper that makes health-check sockets inside service namespaces.
    pub sockets: SocketMaker,
    /// `true` while every service is held back because of load.
    pub shed: watch::Sender<bool>,
    /// Resolver for host-name matches (`None` if it could not be set up:
    /// such services then get no host-name entries, and say why).
    pub resolver: Option<Arc<crate::hostnames::Resolver>>,
    /// Bumped when links were deleted (or events lost): each task then checks that its
    /// namespace's veth still exists.
    pub links: watch::Sender<u64>,
    /// Where `[service.storage]` images live (`engine.storage_dir`).
    pub storage_dir: PathBuf,
}

/// The answer to start/stop/restart.
pub type Reply = oneshot::Sender<Result<String, String>>;

/// What the supervisor can ask of a service task.
pub enum Command {
    /// Start the process now (resetting the restart delay) unless it already runs.
    Start(Reply),
    /// Stop the process and keep it stopped (no restart) until `Start` or `Restart`.
    Stop(Reply),
    /// Stop the process if it runs, then start it at once.
    Restart(Reply),
    /// Stop for good; with `delete_namespace`, also remove the namespace and the record
    /// (service removed, daemon shutting down); without, keep them for a successor task with
    /// a changed configuration.
    Shutdown {
        /// Also remove the service's namespace and ownership record.
        delete_namespace: bool,
        /// Completed once the task has cleaned up.
        done: oneshot::Sender<()>,
    },
}

/// The part of a service's state the supervisor reads.
#[derive(Debug, Default)]
pub struct Shared {
    /// The status as last published by the task (uptime and counters are filled in by the
    /// reader).
    pub status: ServiceStatus,
    /// When the current process started (for adopted ones, its real start time); `None`
    /// while no process runs.
    pub started: Option<Instant>,
    /// When the next (re)start is due, if one is scheduled.
    pub next_start: Option<Instant>,
    /// Packets counted by entries this task installed and has since removed (live entries'
    /// counters are added by the reader).
    pub acc_packets: u64,
    /// Bytes (L2 length at ingress) counted by removed entries, like `acc_packets`.
    pub acc_bytes: u64,
    /// Flows sent to the edge by removed entries.
    pub acc_edge_flows: u64,
    /// Matched flows sent to the cloud (learning, draining) by removed entries.
    pub acc_cloud_flows: u64,
    /// The namespace's host veth: entries pointing there are this service's.
    pub host_ifindex: Option<u32>,
    /// The file counting the service's OOM kills ([`Placement::oom_events`]), read by
    /// the status reader, like the storage's use, so both are current at every request.
    pub oom_events: Option<PathBuf>,
    /// Entries in the datapath right now (updated under the engine lock, so counters read
    /// under the same lock add up).
    pub installed: Vec<Endpoint>,
    /// Entries installed for host-name matches (their current DNS answers).
    pub resolved: Vec<Endpoint>,
}

/// The supervisor's handle on a service task.
pub struct Handle {
    /// The configuration the task runs (a changed one means a new task).
    pub config: Arc<ServiceConfig>,
    /// State the task publishes for status requests.
    pub shared: Arc<Mutex<Shared>>,
    tx: mpsc::Sender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl Handle {
    /// Sends start/stop/restart and waits for the answer.
    pub async fn request(&self, make: impl FnOnce(Reply) -> Command) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| "the service task is gone".to_string())?;
        rx.await
            .map_err(|_| "the service task is gone".to_string())?
    }

    /// Stops the service task for good and waits until it has cleaned up.
    pub async fn shutdown(self, delete_namespace: bool) {
        let (done, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Shutdown {
                delete_namespace,
                done,
            })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }

    /// The published state: the status (counters not yet filled in) plus what the supervisor
    /// needs to fill them in.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Starts the task of one service.
pub fn spawn(config: ServiceConfig, ctx: Arc<Context>) -> Handle {
    let config = Arc::new(config);
    let shared = Arc::new(Mutex::new(Shared::default()));
    let (tx, rx) = mpsc::channel(8);
    let ctx_storage_dir = ctx.storage_dir.clone();
    let actor = Actor {
        log_path: ctx.paths.log(&config.name),
        shed: ctx.shed.subscribe(),
        links: ctx.links.subscribe(),
        cfg: config.clone(),
        ctx,
        shared: shared.clone(),
        ns: None,
        placement: Placement::default(),
        proc: None,
        adopted: false,
        started: None,
        state: ServiceState::Starting,
        tracker: Tracker::default(),
        healthy_since: None,
        provisional: false,
        entries: EntrySet::new(Target::Namespace(config.name.clone()), config.redirect),
        hosts: HostSet::new(
            &config.host_matches,
            &Target::Namespace(config.name.clone()),
            config.redirect,
        ),
        want_running: true,
        backoff_step: 0,
        restart_pending: false,
        restarts: 0,
        next_start: None,
        next_check: None,
        check_started: None,
        check: None,
        error: None,
        last_exit: None,
        last_check_error: None,
        last_logged_install_error: None,
        storage: config.storage.as_ref().map(|st| StorageStatus {
            path: storage::mount_point(&ctx_storage_dir, &config.name),
            size_bytes: st.size,
            keep: st.keep,
            ..StorageStatus::default()
        }),
        shed_draining: false,
    };
    // Visible in `status` from the start, before the task has done anything.
    actor.publish();
    let task = tokio::spawn(actor.run(rx));
    Handle {
        config,
        shared,
        tx,
        task,
    }
}

/// The service namespace as the task needs it.
struct Ns {
    host_ifindex: u32,
    fd: Arc<std::os::fd::OwnedFd>,
}

struct Actor {
    cfg: Arc<ServiceConfig>,
    ctx: Arc<Context>,
    shared: Arc<Mutex<Shared>>,
    log_path: PathBuf,
    shed: watch::Receiver<bool>,
    links: watch::Receiver<u64>,
    ns: Option<Ns>,
    /// Host-name matches and the address entries they currently have.
    hosts: HostSet,
    placement: Placement,
    proc: Option<Proc>,
    /// The running process was started by a previous daemon.
    adopted: bool,
    started: Option<Instant>,
    state: ServiceState,
    tracker: Tracker,
    healthy_since: Option<Instant>,
    /// Entries adopted from a previous daemon, kept while this daemon's first checks run;
    /// the first failure removes them.
    provisional: bool,
    /// The entries for `cfg.matches`, into the namespace's host veth.
    entries: EntrySet,
    /// Not stopped by request.
    want_running: bool,
    backoff_step: u32,
    /// The next start is an automatic restart (counted in `restarts`).
    restart_pending: bool,
    restarts: u32,
    next_start: Option<Instant>,
    next_check: Option<Instant>,
    check_started: Option<Instant>,
    check: Option<BoxFuture<'static, Result<(), String>>>,
    error: Option<String>,
    last_exit: Option<String>,
    last_check_error: Option<String>,
    /// Install errors are retried at every event; log each distinct one once.
    last_logged_install_error: Option<String>,
    /// `[service.storage]` as `status` shows it (its use is filled in by the status reader).
    storage: Option<StorageStatus>,
    /// The entries are draining because the box sheds load (open edge flows continue).
    shed_draining: bool,
}

/// Completes when the process ends; never if there is none.
async fn wait_proc(proc: &mut Option<Proc>) -> Exit {
    match proc {
        Some(p) => p.wait().await,
        None => std::future::pending().await,
    }
}

async fn wait_check(
    check: &mut Option<BoxFuture<'static, Result<(), String>>>,
) -> Result<(), String> {
    match check {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// `BACKOFF_START * 2^step`, at most `BACKOFF_MAX`.
pub fn backoff(step: u32) -> Duration {
    BACKOFF_START
        .saturating_mul(1u32.checked_shl(step.min(16)).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX)
}

impl Actor {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        self.setup().await;
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.reconcile().await;
            self.publish();
            let host_refresh = self.next_host_refresh();
            let check_due = if self.check.is_none() {
                self.next_check
            } else {
                None
            };
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    // The supervisor vanished without a shutdown (it panicked): leave things
                    // running, as a crashed daemon would; the next one adopts them.
                    None => return,
                    Some(Command::Shutdown { delete_namespace, done }) => {
                        self.teardown(delete_namespace).await;
                        let _ = done.send(());
                        return;
                    }
                    Some(cmd) => self.command(cmd).await,
                },
                exit = wait_proc(&mut self.proc) => self.on_exit(exit).await,
                result = wait_check(&mut self.check) => self.on_check(result),
                () = sleep_until(check_due) => self.begin_check(),
                () = sleep_until(host_refresh) => {}
                () = sleep_until(self.next_start) => {
                    self.next_start = None;
                    self.start().await;
                }
                _ = self.shed.changed() => {}
                Ok(()) = self.links.changed() => self.check_host_veth().await,
                _ = housekeeping.tick() => self.housekeeping(),
            }
        }
    }

    // ----- setup and adoption ---------------------------------------------------------------

    /// Prepares the namespace and cgroups, then adopts or replaces what a previous daemon
    /// left, and schedules the first start.
    async fn setup(&mut self) {
        if self.cfg.user.uid == 0 {
            // Without capabilities, yet the owner of every root file: the control socket,
            // the pins, the daemon's records (docs/operations.md, "Least privilege").
            log::warn!(
                "service {}: runs as {} (uid 0): it gets no capabilities, but still owns root's files; configure an unprivileged user",
                self.name(),
                self.cfg.user.name
            );
        }
        let record: Option<ServiceRecord> =
            state::read_record(&self.ctx.paths.service_record(self.name()));
        let created = match self.ensure_namespace(record.is_some()).await {
            Ok(created) => created,
            Err(msg) => {
                self.fail_setup(msg);
                return;
            }
        };
        self.prepare_cgroups();

        let existing = self.existing_entries().await;
        if let Some(rec) = &record
            && let (Some(pid), Some(start)) = (rec.pid, rec.start_time)
            && process::is_same_process(pid, start)
        {
            let why_not = if created {
                Some("its namespace had to be recreated")
            } else if rec.fingerprint != self.cfg.fingerprint() {
                Some("its configuration changed while no daemon was running")
            } else {
                None
            };
            if why_not.is_none() {
                match Proc::adopt(pid) {
                    Ok(proc) => {
                        log::info!(
                            "service {}: adopted process {pid} left by a previous daemon{}",
                            self.name(),
                            if existing.is_empty() {
                                ""
                            } else {
                                "; its redirect stays while the first checks run"
                            }
                        );
                        self.proc = Some(proc);
                        self.adopted = true;
                        self.started =
                            Some(Instant::now().checked_sub(process_age(start)).unwrap());
                        self.state = ServiceState::Running;
                        self.publish_installed();
                        self.provisional = !self.entries.installed().is_empty();
                        self.next_check = Some(Instant::now());
                        return;
                    }
                    Err(e) => {
                        log::warn!("service {}: cannot watch process {pid}: {e}", self.name());
                    }
                }
            }
            // Not adoptable: traffic to the cloud first, then replace the process.
            self.remove_entries().await;
            log::info!(
                "service {}: replacing process {pid} left by a previous daemon ({})",
                self.name(),
                why_not.unwrap_or("it cannot be watched")
            );
            process::stop_stale(pid, self.cfg.stop_grace).await;
        } else if !existing.is_empty() {
            // Entries into our namespace but no process of ours behind them: nothing answers.
            self.remove_entries().await;
        }
        self.write_record(None);
        self.next_start = Some(Instant::now());
    }

    /// Makes sure the service namespace exists; returns whether it was (re)created now.
    /// A namespace of this name that this daemon did not create (no record) is not touched.
    async fn ensure_namespace(&mut self, owned: bool) -> Result<bool, String> {
        let name = self.cfg.name.clone();
        let mut created = false;
        let ns = if netns::named_exists(&name) {
            if !owned {
                return Err(format!(
                    "namespace {name} exists but was not created by this daemon (no record in {}): delete it with `viscum ns del {name}` or rename the service",
                    self.ctx.paths.state_dir().display()
                ));
            }
            match netns::service_ns_check(&name).await {
                Ok(ns) => ns,
                Err(e) => {
                    log::warn!("service {name}: namespace is incomplete ({e}); recreating it");
                    let _ = netns::service_ns_del(&name).await;
                    created = true;
                    self.create_namespace().await?
                }
            }
        } else {
            created = true;
            self.create_namespace().await?
        };
        // Services run unprivileged, yet answer on the cloud's ports (80, 443, 53...): in a
        // namespace of its own, letting any user bind any port gives nothing away.
        if let Err(e) = netns::sysctl_set(Some(&name), "net/ipv4/ip_unprivileged_port_start", "0") {
            log::warn!("service {name}: cannot allow low ports for unprivileged users: {e}");
        }
        let fd =
            health::open_netns(&name).map_err(|e| format!("cannot open namespace {name}: {e}"))?;
        self.ns = Some(Ns {
            host_ifindex: ns.host_ifindex,
            fd,
        });
        self.lock().host_ifindex = Some(ns.host_ifindex);
        self.entries.set_owner(Some(ns.host_ifindex));
        Ok(created)
    }

    async fn create_namespace(&mut self) -> Result<netns::ServiceNs, String> {
        let name = self.cfg.name.clone();
        // Claim ownership before creating, so a crash in between leaves a record, not an
        // orphan namespace the next daemon would refuse to touch.
        self.write_record(None);
        match netns::service_ns_add(&name).await {
            Ok(ns) => Ok(ns),
            Err(NetnsError::InterfaceExists { .. }) => {
                // A leftover host veth without its namespace: ours by name (vh-NAME).
                let _ = netns::service_ns_del(&name).await;
                netns::service_ns_add(&name)
                    .await
                    .map_err(|e| format!("cannot create namespace {name}: {e:#}"))
            }
            Err(e) => Err(format!(
                "cannot create namespace {name}: {}",
                error_chain(&e)
            )),
        }
    }

    /// The namespace's host veth vanished (`ip link del vh-NAME`, the namespace destroyed):
    /// the entries point at nothing (the datapath already sends their traffic to the cloud)
    /// and the process has no way out any more. Entries out, process stopped, and the
    /// namespace rebuilt and the process started again, like a restart.
    async fn check_host_veth(&mut self) {
        let Some(ns) = &self.ns else { return };
        if crate::lifecycle::ifindex_alive(ns.host_ifindex) {
            return;
        }
        let veth = netns::host_veth_name(&self.cfg.name);
        log::warn!(
            "service {}: its veth {veth} is gone, its traffic goes to the cloud; rebuilding its namespace and restarting it",
            self.cfg.name
        );
        self.remove_entries().await;
        self.clear_hosts().await;
        if let Some(mut proc) = self.proc.take() {
            let pid = proc.pid();
            let exit = process::stop(&mut proc, self.cfg.stop_grace).await;
            cgroup::kill_all(&self.placement);
            logs::note(
                &self.log_path,
                &format!("stopped process {pid} (its namespace lost its veth {veth}): {exit}"),
            );
            log::info!("service {}: stopped process {pid} ({exit})", self.cfg.name);
            self.last_exit = Some(exit.to_string());
        }
        self.after_stop();
        if let Err(e) = crate::engine::detach_reply(self.ctx.engine.lock().await.pins(), &veth) {
            log::debug!("service {}: {}", self.cfg.name, error_chain(&e));
        }
        self.ns = None;
        self.lock().host_ifindex = None;
        self.entries.set_owner(None);
        self.write_record(None);
        if self.want_running {
            self.restart_pending = true;
            self.next_start = Some(Instant::now());
            self.state = ServiceState::Starting;
        }
    }

    /// Setup failed (namespace): retried with back-off like a failed start, so a transient
    /// netlink error or a foreign namespace that an operator removes heals by itself.
    fn fail_setup(&mut self, msg: String) {
        log::error!("service {}: {msg}", self.name());
        self.error = Some(msg);
        let delay = backoff(self.backoff_step);
        self.backoff_step = self.backoff_step.saturating_add(1);
        self.next_start = Some(Instant::now() + delay);
        self.state = ServiceState::Backoff;
    }

    fn prepare_cgroups(&mut self) {
        if !self.placement.dirs.is_empty() {
            return;
        }
        self.placement = cgroup::prepare(&self.cfg.name, &self.cfg.limits);
        for (limit, st) in &self.placement.report {
            if st.enforced {
                log::info!(
                    "service {}: {limit} limit {} enforced by {}",
                    self.name(),
                    st.value,
                    st.detail
                );
            } else {
                log::warn!(
                    "service {}: {limit} limit {} NOT enforced: {}",
                    self.name(),
                    st.value,
                    st.detail
                );
            }
        }
    }

    /// This service's matches that already have an entry into its namespace, taken over
    /// ([`EntrySet::adopt`]: stale entries for its matches are removed, others' left alone).
    async fn existing_entries(&mut self) -> Vec<Endpoint> {
        if self.ns.is_none() {
            return Vec::new();
        }
        let mut engine = self.ctx.engine.lock().await;
        let name = self.cfg.name.clone();
        self.entries.adopt(&mut engine, &self.cfg.matches, |m| {
            log::warn!("service {name}: {m}");
        })
    }

    // ----- entries ----------------------------------------------------------------------------

    /// Should the entries be in the datapath right now?
    fn wants_entries(&self) -> bool {
        self.ready_for_entries() && !*self.shed.borrow()
    }

    /// Would the entries be in the datapath if the box were not shedding load?
    fn ready_for_entries(&self) -> bool {
        self.proc.is_some()
            && self.want_running
            && self.ns.is_some()
            && (self.tracker.healthy || self.provisional)
    }

    /// Drains (shedding) or un-drains the installed entries, host-name ones included.
    async fn set_shed_draining(&mut self, on: bool) {
        let mut eps = self.entries.installed().to_vec();
        eps.extend(self.hosts.endpoints());
        let mut engine = self.ctx.engine.lock().await;
        let result = if on {
            entries::drain(&mut engine, &eps)
        } else {
            entries::undrain(&mut engine, &eps)
        };
        drop(engine);
        match result {
            Ok(()) => log::info!(
                "service {}: {}",
                self.cfg.name,
                if on {
                    "load shedding: new flows go to the cloud, open edge flows continue"
                } else {
                    "load shedding over: new flows go to the edge again"
                }
            ),
            Err(e) => log::warn!(
                "service {}: cannot {} its entries: {}",
                self.cfg.name,
                if on { "drain" } else { "un-drain" },
                error_chain(&e)
            ),
        }
        self.shed_draining = on;
    }

    async fn reconcile(&mut self) {
        // Shedding load: a running, healthy service keeps its entries, draining: flows open
        // at the edge continue (cutting them would reset them), new ones go to the cloud.
        let shed = *self.shed.borrow();
        let has_entries = !self.entries.installed().is_empty() || self.hosts.any_installed();
        if shed && self.ready_for_entries() && has_entries {
            if !self.shed_draining {
                self.set_shed_draining(true).await;
            }
            return;
        }
        if self.shed_draining {
            if !shed && self.ready_for_entries() {
                self.set_shed_draining(false).await;
            } else {
                // The entries go below; removed entries need no un-draining.
                self.shed_draining = false;
            }
        }
        if self.wants_entries() {
            // The configuration is what holds: an entry of this service deleted behind the
            // daemon's back (a one-shot `viscum redirect del`) is put back, and `status`
            // never reports an entry the datapath does not have.
            let gone = {
                let engine = self.ctx.engine.lock().await;
                self.entries.forget_missing(&engine)
            };
            if !gone.is_empty() {
                log::warn!(
                    "service {}: {} removed from the datapath by another writer; restoring (the configuration decides what is redirected: change it and reload, or `viscum service stop`)",
                    self.name(),
                    gone.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                self.publish_installed();
            }
            if self.entries.installed().len() < self.cfg.matches.len() {
                self.install_entries().await;
            }
            self.refresh_hosts().await;
        } else {
            if !self.entries.installed().is_empty() {
                self.remove_entries().await;
            }
            self.clear_hosts().await;
        }
    }

    /// When the next host name is due for re-resolution (only while entries are wanted).
    fn next_host_refresh(&self) -> Option<Instant> {
        self.wants_entries()
            .then(|| self.hosts.next_refresh())
            .flatten()
    }

    /// Re-resolves the host names that are due and applies the differences.
    async fn refresh_hosts(&mut self) {
        let Some(resolver) = self.ctx.resolver.clone() else {
            if !self.hosts.is_empty() && self.error.is_none() {
                self.error =
                    Some("host-name matches need a DNS resolver, and none could be set up".into());
            }
            return;
        };
        let name = &self.cfg.name;
        self.hosts
            .refresh_due(&self.ctx.engine, &resolver, |failed, msg| {
                if failed {
                    log::warn!("service {name}: {msg}");
                } else {
                    log::info!("service {name}: {msg}");
                }
            })
            .await;
        self.publish_hosts();
    }

    async fn clear_hosts(&mut self) {
        if !self.hosts.any_installed() {
            return;
        }
        let name = &self.cfg.name;
        let mut engine = self.ctx.engine.lock().await;
        self.hosts
            .clear(&mut engine, |msg| log::warn!("service {name}: {msg}"))
            .await;
        drop(engine);
        self.publish_hosts();
    }

    fn publish_hosts(&self) {
        let resolved = self.hosts.endpoints();
        self.lock().resolved = resolved;
    }

    fn publish_installed(&self) {
        self.lock().installed = self.entries.installed().to_vec();
    }

    async fn install_entries(&mut self) {
        if self.ns.is_none() {
            return;
        }
        let mut engine = self.ctx.engine.lock().await;
        let was_empty = self.entries.installed().is_empty();
        let errors = self.entries.install(&mut engine, &self.cfg.matches).await;
        // Under the engine lock, so counters read under the same lock add up.
        self.publish_installed();
        drop(engine);
        let installed = self.entries.installed();
        if was_empty && !installed.is_empty() {
            log::info!(
                "service {}: redirecting {}",
                self.name(),
                installed
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        if error.is_some() && error != self.last_logged_install_error {
            log::warn!(
                "service {}: {}",
                self.name(),
                error.as_deref().unwrap_or_default()
            );
        }
        self.last_logged_install_error = error.clone();
        self.error = error;
    }

    /// Takes every entry of this service out of the datapath, keeping their counters.
    async fn remove_entries(&mut self) {
        if self.entries.installed().is_empty() {
            return;
        }
        let mut engine = self.ctx.engine.lock().await;
        let (removed, errors) = self.entries.remove(&mut engine).await;
        for e in errors {
            log::warn!("service {}: {e}", self.cfg.name);
        }
        let c = Counters::sum(&removed);
        {
            let mut shared = self.lock();
            shared.installed = self.entries.installed().to_vec();
            shared.acc_packets += c.packets;
            shared.acc_bytes += c.bytes;
            shared.acc_edge_flows += c.edge_flows;
            shared.acc_cloud_flows += c.cloud_flows;
        }
        drop(engine);
        self.provisional = false;
        log::info!(
            "service {}: redirect removed: its traffic goes to the cloud",
            self.cfg.name
        );
    }

    // ----- process ------------------------------------------------------------------------------

    async fn start(&mut self) {
        if !self.want_running || self.proc.is_some() {
            return;
        }
        if self.ns.is_none() {
            // Setup failed earlier (or the namespace vanished): try again from scratch.
            let owned =
                state::read_record::<ServiceRecord>(&self.ctx.paths.service_record(self.name()))
                    .is_some();
            if let Err(msg) = self.ensure_namespace(owned).await {
                self.fail_setup(msg);
                return;
            }
            self.prepare_cgroups();
        }
        let attached = match self.prepare_storage().await {
            Ok(a) => a,
            Err(msg) => {
                logs::note(&self.log_path, &msg);
                self.error = Some(msg.clone());
                self.schedule_restart(false, &msg);
                return;
            }
        };
        let Some(ns) = &self.ns else { return };
        let output = match process::open_log(&self.log_path) {
            // A full log filesystem would fail the copy's first write to stdout or stderr,
            // and many programs die of that (Python exits 120): the copy then never comes
            // up, its traffic stays with the cloud. Its output is worth less than the
            // service: it goes to /dev/null until there is room again (checked at each start).
            Ok(f) if process::free_bytes(&f).is_some_and(|free| free < LOG_MIN_FREE) => {
                log::warn!(
                    "service {}: the filesystem of {} is full: the copy's output is discarded until there is room",
                    self.cfg.name,
                    self.log_path.display()
                );
                None
            }
            Ok(f) => Some(f),
            Err(e) => {
                log::warn!(
                    "service {}: cannot open log {}: {e}",
                    self.cfg.name,
                    self.log_path.display()
                );
                None
            }
        };
        let spec = process::Spec {
            command: &self.cfg.command,
            user: &self.cfg.user,
            env: &self.cfg.env,
            netns: &ns.fd,
            output: output.as_ref(),
            cgroup_procs: &self.placement.procs,
            cwd: self.cfg.workdir.as_deref(),
            storage: attached.as_ref().map(|a| &a.child),
        };
        // An automatic restart counts when it is attempted, not only when it succeeds: a
        // command that cannot start, retried with back-off, shows its attempts (it read 0).
        if self.restart_pending {
            self.restarts += 1;
            self.restart_pending = false;
        }
        let spawned = process::spawn(&spec);
        // The child's mount holds the loop device now (or the start failed: then the
        // device detaches itself as this last holder closes it).
        drop(attached);
        match spawned {
            Ok(proc) => {
                let pid = proc.pid();
                logs::note(
                    &self.log_path,
                    &format!(
                        "started process {pid}: {} (as {})",
                        self.cfg.command.join(" "),
                        self.cfg.user.name
                    ),
                );
                log::info!("service {}: started process {pid}", self.cfg.name);
                self.proc = Some(proc);
                self.adopted = false;
                self.started = Some(Instant::now());
                self.state = ServiceState::Running;
                self.error = None;
                self.tracker.reset();
                self.next_check = Some(Instant::now() + FIRST_CHECK.min(self.cfg.health.interval));
                self.write_record(Some(pid));
            }
            Err(e) => {
                let msg = format!("cannot start {}: {e}", self.cfg.command[0]);
                logs::note(&self.log_path, &msg);
                self.error = Some(msg.clone());
                self.schedule_restart(false, &msg);
            }
        }
    }

    /// Makes the service's storage ready for a start (see [`storage`]); `Ok(None)` without
    /// `[service.storage]`. The error says why the service cannot start.
    async fn prepare_storage(&mut self) -> Result<Option<storage::Attached>, String> {
        let Some(cfg) = self.cfg.storage.clone() else {
            return Ok(None);
        };
        let root = self.ctx.storage_dir.clone();
        let name = self.cfg.name.clone();
        let result =
            tokio::task::spawn_blocking(move || storage::prepare(&root, &name, &cfg)).await;
        let st = self.storage.get_or_insert_with(StorageStatus::default);
        match result {
            Ok(Ok(attached)) => {
                st.device = Some(attached.device_path.display().to_string());
                if attached.warning != st.error
                    && let Some(w) = &attached.warning
                {
                    log::warn!("service {}: storage: {w}", self.cfg.name);
                }
                st.error = attached.warning.clone();
                Ok(Some(attached))
            }
            Ok(Err(e)) => {
                let msg = format!("storage: {}", error_chain(&e));
                st.error = Some(msg.clone());
                Err(msg)
            }
            Err(e) => Err(format!("storage: {e}")),
        }
    }

    /// After a process ended or failed to start: schedule the next start as the restart
    /// policy and back-off say, or settle in `exited`.
    fn schedule_restart(&mut self, success: bool, what: &str) {
        if self
            .healthy_since
            .is_some_and(|t| t.elapsed() >= BACKOFF_RESET)
        {
            self.backoff_step = 0;
        }
        self.healthy_since = None;
        if self.want_running && self.cfg.restart.restarts(success) {
            let delay = backoff(self.backoff_step);
            self.backoff_step = self.backoff_step.saturating_add(1);
            self.next_start = Some(Instant::now() + delay);
            self.restart_pending = true;
            self.state = ServiceState::Backoff;
            log::warn!(
                "service {}: {what}; restarting in {} ms",
                self.cfg.name,
                delay.as_millis()
            );
        } else {
            self.state = match (self.want_running, success) {
                (false, _) => ServiceState::Stopped,
                (true, true) => ServiceState::Exited,
                (true, false) => ServiceState::Failed,
            };
            log::warn!(
                "service {}: {what}; not restarting (restart = {:?})",
                self.cfg.name,
                self.cfg.restart
            );
        }
    }

    async fn on_exit(&mut self, exit: Exit) {
        let pid = self.proc.as_ref().map(Proc::pid).unwrap_or(0);
        self.proc = None;
        // Nothing answers in the namespace any more: the cloud must, right now.
        self.remove_entries().await;
        // Whatever the leader left behind (children) would keep its ports busy.
        process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
        cgroup::kill_all(&self.placement);
        self.after_stop();
        let what = format!("process {pid} {exit}");
        logs::note(&self.log_path, &what);
        self.last_exit = Some(exit.to_string());
        self.write_record(None);
        self.schedule_restart(exit.success(), &what);
    }

    /// Health and check state that only makes sense while a process runs.
    fn after_stop(&mut self) {
        self.tracker.reset();
        self.provisional = false;
        self.check = None;
        self.next_check = None;
        self.started = None;
        self.adopted = false;
    }

    /// A deliberate stop lets flows finish first: the entries stop taking
    /// new flows (which go to the cloud), and open edge flows continue until
    /// they end or `drain_timeout` runs out.
    async fn drain(&mut self) {
        let mut draining = self.entries.installed().to_vec();
        draining.extend(self.hosts.endpoints());
        if draining.is_empty()
            || self.proc.is_none()
            || self.ns.is_none()
            || self.cfg.drain_timeout.is_zero()
        {
            return;
        }
        self.state = ServiceState::Stopping;
        self.publish();
        let live =
            entries::drain_and_wait(&self.ctx.engine, &draining, self.cfg.drain_timeout).await;
        if live > 0 {
            log::warn!(
                "service {}: {live} edge flow(s) still open after draining for {:?}; stopping anyway",
                self.cfg.name,
                self.cfg.drain_timeout
            );
        }
    }

    /// Drain, entries out, then SIGTERM, grace, SIGKILL.
    async fn stop_process(&mut self) {
        self.drain().await;
        self.remove_entries().await;
        self.clear_hosts().await;
        if let Some(mut proc) = self.proc.take() {
            self.state = ServiceState::Stopping;
            self.publish();
            let pid = proc.pid();
            let exit = process::stop(&mut proc, self.cfg.stop_grace).await;
            cgroup::kill_all(&self.placement);
            logs::note(&self.log_path, &format!("stopped process {pid}: {exit}"));
            log::info!("service {}: stopped process {pid} ({exit})", self.cfg.name);
            self.last_exit = Some(exit.to_string());
            self.write_record(None);
        }
        self.after_stop();
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Start(reply) => {
                self.want_running = true;
                let msg = if self.proc.is_some() {
                    format!("{} is already running", self.cfg.name)
                } else {
                    self.backoff_step = 0;
                    self.restart_pending = false;
                    self.next_start = None;
                    self.start().await;
                    match &self.proc {
                        Some(p) => format!("{} started (pid {})", self.cfg.name, p.pid()),
                        None => {
                            let _ = reply.send(Err(self
                                .error
                                .clone()
                                .unwrap_or_else(|| "did not start".into())));
                            return;
                        }
                    }
                };
                let _ = reply.send(Ok(msg));
            }
            Command::Stop(reply) => {
                self.want_running = false;
                self.next_start = None;
                self.restart_pending = false;
                self.stop_process().await;
                self.state = ServiceState::Stopped;
                let _ = reply.send(Ok(format!("{} stopped", self.cfg.name)));
            }
            Command::Restart(reply) => {
                self.want_running = true;
                self.next_start = None;
                self.restart_pending = false;
                self.stop_process().await;
                self.backoff_step = 0;
                self.start().await;
                let _ = reply.send(match &self.proc {
                    Some(p) => Ok(format!("{} restarted (pid {})", self.cfg.name, p.pid())),
                    None => Err(self.error.clone().unwrap_or_else(|| "did not start".into())),
                });
            }
            Command::Shutdown { .. } => unreachable!("handled by the loop"),
        }
    }

    async fn teardown(&mut self, delete_namespace: bool) {
        self.want_running = false;
        self.next_start = None;
        self.stop_process().await;
        self.state = ServiceState::Stopped;
        cgroup::remove(&self.placement);
        if delete_namespace {
            if let Some(ns) = &self.ns {
                // Entries someone else added into this namespace would point into nothing.
                let mut engine = self.ctx.engine.lock().await;
                if let Err(e) = redirect::del_all_to(&mut engine, ns.host_ifindex).await {
                    log::warn!(
                        "service {}: cannot remove entries into its namespace: {e}",
                        self.cfg.name
                    );
                }
                // The reply classifier on its host veth goes with the veth; its pin must too.
                if let Err(e) = crate::engine::detach_reply(
                    engine.pins(),
                    &netns::host_veth_name(&self.cfg.name),
                ) {
                    log::warn!(
                        "service {}: cannot detach the reply classifier: {e}",
                        self.cfg.name
                    );
                }
            }
            self.ns = None;
            match netns::service_ns_del(&self.cfg.name).await {
                Ok(()) | Err(NetnsError::UnknownNamespace { .. }) => {}
                Err(e) => log::warn!(
                    "service {}: cannot delete its namespace: {}",
                    self.cfg.name,
                    error_chain(&e)
                ),
            }
            if let Err(e) = state::remove_record(&self.ctx.paths.service_record(&self.cfg.name)) {
                log::warn!("service {}: cannot remove its record: {e}", self.cfg.name);
            }
            log::info!("service {}: removed", self.cfg.name);
        }
        self.publish();
    }

    // ----- health ---------------------------------------------------------------------------------

    fn begin_check(&mut self) {
        self.next_check = None;
        let (Some(_), Some(ns)) = (&self.proc, &self.ns) else {
            return;
        };
        let cfg = self.cfg.clone();
        let ctx = CheckContext {
            sockets: self.ctx.sockets.clone(),
            netns: ns.fd.clone(),
        };
        self.check_started = Some(Instant::now());
        self.check = Some(Box::pin(async move { health::run_check(&cfg, &ctx).await }));
    }

    fn on_check(&mut self, result: Result<(), String>) {
        self.check = None;
        if self.proc.is_none() {
            return; // the process ended while the check ran; on_exit has dealt with it
        }
        let h = &self.cfg.health;
        let ok = result.is_ok();
        if let Err(why) = &result {
            self.last_check_error = Some(why.clone());
            if self.provisional {
                log::warn!(
                    "service {}: first check after adoption failed ({why}): removing the redirect it inherited",
                    self.cfg.name
                );
                self.provisional = false;
            }
        }
        match self.tracker.record(ok, h.rise, h.fall) {
            Transition::BecameHealthy => {
                self.provisional = false;
                self.healthy_since = Some(Instant::now());
                self.last_check_error = None;
                log::info!(
                    "service {}: healthy ({} checks passed)",
                    self.cfg.name,
                    h.rise
                );
            }
            Transition::BecameUnhealthy => {
                self.healthy_since = None;
                log::warn!(
                    "service {}: unhealthy ({} checks failed, last: {})",
                    self.cfg.name,
                    h.fall,
                    self.last_check_error.as_deref().unwrap_or("?")
                );
            }
            Transition::None => {}
        }
        // Fixed rate: the next check is due one interval after this one began.
        let began = self.check_started.unwrap_or_else(Instant::now);
        self.next_check = Some((began + h.interval).max(Instant::now()));
    }

    // ----- bookkeeping ----------------------------------------------------------------------------

    fn housekeeping(&mut self) {
        match logs::rotate_if_needed(&self.log_path, logs::MAX_LOG_BYTES) {
            Ok(true) => log::debug!("service {}: log rotated", self.cfg.name),
            Ok(false) => {}
            Err(e) => log::debug!("service {}: cannot rotate its log: {e}", self.cfg.name),
        }
    }

    fn write_record(&self, pid: Option<i32>) {
        let rec = ServiceRecord {
            name: self.cfg.name.clone(),
            pid,
            start_time: pid.and_then(process::start_time),
            fingerprint: self.cfg.fingerprint(),
        };
        if let Err(e) = state::write_record(&self.ctx.paths.service_record(&self.cfg.name), &rec) {
            log::warn!("service {}: cannot write its record: {e}", self.cfg.name);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish(&self) {
        let h = &self.cfg.health;
        let health = if self.tracker.healthy {
            Health::Healthy
        } else if self.tracker.failures >= h.fall {
            Health::Unhealthy
        } else {
            Health::Unknown
        };
        let status = ServiceStatus {
            name: self.cfg.name.clone(),
            state: self.state,
            health,
            redirected: !self.entries.installed().is_empty() || self.hosts.any_installed(),
            pid: self.proc.as_ref().map(Proc::pid),
            adopted: self.adopted,
            uptime_s: None,
            restarts: self.restarts,
            last_exit: self.last_exit.clone(),
            error: self.error.clone(),
            check: h.check.to_string(),
            checks_passed: self.tracker.passed_total,
            checks_failed: self.tracker.failed_total,
            last_check_error: self.last_check_error.clone(),
            packets: 0,
            bytes: 0,
            edge_flows: 0,
            cloud_flows: 0,
            live_flows: 0,
            matches: self
                .cfg
                .matches
                .iter()
                .map(ToString::to_string)
                .chain(self.hosts.describe())
                .collect(),
            netns: self.cfg.name.clone(),
            log: self.log_path.clone(),
            limits: self.placement.report.clone(),
            next_start_in_ms: None,
            oom_kills: None,
            storage: self.storage.clone(),
            network: self
                .cfg
                .network
                .as_ref()
                .map(|n| super::control::NetworkReport {
                    share: n.share,
                    max: n.max.map(|m| m.to_string()),
                }),
        };
        let mut shared = self.lock();
        shared.status = status;
        shared.oom_events.clone_from(&self.placement.oom_events);
        shared.started = self.started;
        shared.next_start = self.next_start;
    }
}

/// How long ago a process with this start time (clock ticks after boot) started.
fn process_age(start_ticks: u64) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    Duration::from_secs_f64((uptime - start_ticks as f64 / hz).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(0), Duration::from_millis(500));
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(6), Duration::from_secs(30));
        assert_eq!(backoff(100), Duration::from_secs(30));
    }
}
