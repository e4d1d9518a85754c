//! The box side of the fleet: watch this box's keys, apply them, checkpoint, report.
//!
//! [`run`] drives one box:
//!
//! 1. **Checkpoint first.** If a checkpoint exists (the key → value snapshot and revision of
//!    the last successful apply, written atomically after each), it is applied at once,
//!    before any server is reached: a box that boots while the servers are unreachable
//!    serves its last known state.
//! 2. **Connect** with a bounded exponential backoff (100 ms doubling up to 5 s), for ever.
//! 3. **Resynchronise completely** on every (re)connection: one ordered consumer per
//!    filter, `group.<g>.svc.>` per group and `box.<id>.svc.>` (never the whole bucket, so
//!    a box's credentials can be limited to its own keys), delivering the last message of
//!    every key, delete and purge markers included. The snapshot so built *replaces* the
//!    applied set, so a key deleted or purged while the box was away is gone from it even
//!    if its marker was since compacted away: what counts is the fresh snapshot, not the
//!    events. Each request of this setup (opening the bucket, creating a consumer) is
//!    bounded and made again when it fails or goes unanswered, one consumer at a time, until
//!    30 s: on nats-server 2.9 a new consumer may be placed on an offline server of a
//!    cluster, and its creation then goes unanswered (see `WATCH_REQUEST_TIMEOUT`).
//! 4. **Follow**: every later put, delete or purge updates the snapshot (changes arriving
//!    together are applied together) and the whole desired set is applied again. When the
//!    connection drops, back to 3 once it is up again.
//!
//! Applying a snapshot ([`Agent::converge`]): every value is decoded and validated
//! ([`schema::service_from_value`]); a box override (`box.<id>.svc.<name>`) replaces the
//! group service of the same name; the same name from two groups is an error naming both
//! keys; artifacts are fetched, verified and installed ([`super::artifact`]); then the
//! [`Apply`]er gets the whole set. Any error refuses the whole snapshot: nothing changes,
//! the services keep running as they were, the checkpoint and the reported `revision` stay
//! those of the last good apply, and the reason goes into the status's `error`.
//!
//! The status ([`schema::BoxStatus`]) is put right after every apply attempt and every
//! `status_interval` while connected, also while the watches are being set up again or
//! waiting to be: a box that is up keeps its status key from expiring even when its watch
//! cannot be re-established for a while (say a node of a cluster is down).
//!
//! # Appliers
//!
//! The agent does not know what a service is made of: it hands each desired set to an
//! [`Apply`]. The daemon implements it with its reload diff (`viscum run`, in
//! `crate::daemon`); [`DryRun`] validates and records without any datapath, for simulated
//! boxes (tests, the fleet benchmark): many agents with a `DryRun` each can run in one
//! process against a real server, with artifacts not fetched and no checkpoint
//! ([`AgentSettings::dry_run`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, ReplayPolicy, push},
};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{
    artifact::Installer,
    connect::{ConnectSettings, Fleet, connect},
    schema::{self, ArtifactStatus, BoxStatus, DesiredKey, Scope, ServiceStatus},
};
use crate::config::{Config, FleetConfig, FleetService, fleet::merge};

/// First wait after a failed connection or session; doubled after each failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two connection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bound on setting up the watches, and on receiving the initial snapshot, of one session.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the first tries of a request while setting up the watches (opening the bucket,
/// creating one consumer); a try that fails or times out is made again until
/// [`SNAPSHOT_TIMEOUT`], and after [`WATCH_SHORT_TRIES`] tries that timed out the bound
/// doubles up to [`WATCH_REQUEST_TIMEOUT_MAX`]. Why short first: on nats-server 2.9 an
/// ordered consumer of a replicated stream is placed on a random peer of the stream, offline
/// ones included (fixed in 2.12, nats-server PRs #7083 and #7165), and its creation then goes
/// unanswered; each new try has another chance of a live peer (two in three with one node of
/// three down). Why growing later: a server merely slow to answer still gets the time it
/// needs.
const WATCH_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Tries that time out before [`WATCH_REQUEST_TIMEOUT`] starts to grow (three unanswered in a
/// row by chance: one in 27 with one node of three down).
const WATCH_SHORT_TRIES: u32 = 3;
/// Longest bound on one try of a watch request.
const WATCH_REQUEST_TIMEOUT_MAX: Duration = Duration::from_secs(8);
/// Bound on opening the status bucket and on one status put.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// What the agent asks an [`Apply`] to run: the fleet's services for this box.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredSet {
    /// The newest [`schema::DESIRED_BUCKET`] revision (stream sequence) among the keys this
    /// box watches, deletions included.
    pub revision: u64,
    /// The services, overrides resolved, in name order; artifacts installed (`workdir`
    /// set) unless the agent does not fetch artifacts.
    pub services: Vec<FleetService>,
}

/// Something that runs desired sets: the daemon, or [`DryRun`].
pub trait Apply: Send {
    /// Makes `desired.services` the fleet services that run, next to the local ones: all of
    /// the set or, on error, nothing of it.
    ///
    /// # Errors
    /// Every problem, one line each (a name or match clash with a local service, an engine
    /// that refused the change); the services then run as before.
    fn apply(
        &mut self,
        desired: &DesiredSet,
    ) -> impl Future<Output = Result<(), Vec<String>>> + Send;

    /// Every service that runs, local and fleet, for the box's status.
    fn status(&mut self) -> impl Future<Output = Vec<ServiceStatus>> + Send;
}

/// An [`Apply`] without a datapath, for simulated boxes: it validates each set as the
/// daemon would (merged with its local configuration: name and match clashes) and records
/// it, but starts nothing. Its status reports every service as state `dry-run`, health
/// `unknown`, with zero counters.
#[derive(Debug, Clone)]
pub struct DryRun {
    local: Config,
    applied: Option<DesiredSet>,
    applies: u64,
}

impl DryRun {
    /// A dry run whose local services are `local`'s (`Config::parse("")` for none).
    pub fn new(local: Config) -> DryRun {
        DryRun {
            local,
            applied: None,
            applies: 0,
        }
    }

    /// The last set applied.
    pub fn applied(&self) -> Option<&DesiredSet> {
        self.applied.as_ref()
    }

    /// How many sets were applied.
    pub fn applies(&self) -> u64 {
        self.applies
    }
}

impl Apply for DryRun {
    async fn apply(&mut self, desired: &DesiredSet) -> Result<(), Vec<String>> {
        merge(&self.local, &desired.services)?;
        self.applied = Some(desired.clone());
        self.applies += 1;
        Ok(())
    }

    async fn status(&mut self) -> Vec<ServiceStatus> {
        let mut out: Vec<ServiceStatus> = self
            .local
            .services
            .iter()
            .map(|s| dry_status(s, "local".into()))
            .chain(
                self.applied
                    .iter()
                    .flat_map(|a| &a.services)
                    .map(|f| dry_status(&f.config, f.source.clone())),
            )
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

fn dry_status(s: &crate::config::ServiceConfig, source: String) -> ServiceStatus {
    ServiceStatus {
        name: s.name.clone(),
        source,
        state: "dry-run".into(),
        health: "unknown".into(),
        edge_flows: 0,
        cloud_flows: None,
        bytes_kept_off_uplink: 0,
        artifact: artifact_status(s),
    }
}

/// The artifact a service names, for its status.
pub fn artifact_status(s: &crate::config::ServiceConfig) -> Option<ArtifactStatus> {
    s.artifact.as_ref().map(|a| ArtifactStatus {
        name: a.name.clone(),
        sha256: a.sha256.clone(),
    })
}

/// How one agent runs.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// How to reach the servers.
    pub connect: ConnectSettings,
    /// This box's id.
    pub box_id: String,
    /// Its groups.
    pub groups: Vec<String>,
    /// Time between status puts.
    pub status_interval: Duration,
    /// The checkpoint file; `None`: none kept.
    pub checkpoint: Option<PathBuf>,
    /// Root of the installed artifacts; `None`: artifacts are not fetched (dry run).
    pub artifacts: Option<PathBuf>,
}

impl AgentSettings {
    /// A daemon's agent: `[fleet]` with its defaults under `run_dir` (checkpoint
    /// `<run_dir>/fleet/checkpoint.json`, artifacts `<run_dir>/fleet/artifacts`).
    pub fn from_config(fleet: &FleetConfig, run_dir: &Path) -> AgentSettings {
        AgentSettings {
            connect: ConnectSettings::from_fleet(fleet),
            box_id: fleet.box_id.clone(),
            groups: fleet.groups.clone(),
            status_interval: fleet.status_interval,
            checkpoint: Some(
                fleet
                    .checkpoint
                    .clone()
                    .unwrap_or_else(|| run_dir.join("fleet").join("checkpoint.json")),
            ),
            artifacts: Some(run_dir.join("fleet").join("artifacts")),
        }
    }

    /// A simulated box: no checkpoint, no artifacts fetched.
    pub fn dry_run(
        connect: ConnectSettings,
        box_id: &str,
        groups: &[String],
        status_interval: Duration,
    ) -> AgentSettings {
        AgentSettings {
            connect,
            box_id: box_id.to_owned(),
            groups: groups.to_vec(),
            status_interval,
            checkpoint: None,
            artifacts: None,
        }
    }

    /// The watch filters: one per group, then the box's own.
    pub fn filters(&self) -> Vec<String> {
        self.groups
            .iter()
            .map(|g| schema::group_filter(g))
            .chain([schema::box_filter(&self.box_id)])
            .collect()
    }

    /// Is `key` one this box watches?
    fn wants(&self, key: &DesiredKey) -> bool {
        match &key.scope {
            Scope::Group(g) => self.groups.contains(g),
            Scope::Box(b) => *b == self.box_id,
        }
    }
}

/// The checkpoint file: the last applied snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The box it was written by.
    pub box_id: String,
    /// [`DesiredSet::revision`] of the snapshot.
    pub revision: u64,
    /// When it was applied, ms since the Unix epoch.
    pub applied_at_ms: u64,
    /// Key → value (TOML text) of every key of the snapshot.
    pub entries: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Reads a checkpoint; `None` if there is none or it cannot be read (logged).
    pub fn read(path: &Path) -> Option<Checkpoint> {
        crate::daemon::state::read_record(path)
    }

    /// Writes it atomically (a temporary file, synced, renamed over the old one).
    ///
    /// # Errors
    /// The directory cannot be created or the file written.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::daemon::state::write_record(path, self)
    }
}

/// Why a session ended.
enum End {
    Shutdown,
    Disconnected,
    Failed(String),
}

/// One box's agent state.
pub struct Agent<A: Apply> {
    settings: AgentSettings,
    applier: A,
    installer: Option<Installer>,
    /// The snapshot last applied (key → value).
    applied: BTreeMap<String, String>,
    applied_revision: u64,
    applied_at_ms: u64,
    /// Why the newest snapshot is not applied.
    error: Option<String>,
    /// The status bucket, once opened (the handle outlives sessions and reconnections).
    status_kv: Option<jetstream::kv::Store>,
    /// Why the status bucket could not be opened, last time (logged once).
    status_unavailable: Option<String>,
}

/// Runs a box's agent until `shutdown` completes: checkpoint, connect, resynchronise,
/// follow (see the module docs). Never returns an error: problems are logged and reported
/// in the box's status.
pub async fn run<A: Apply>(
    settings: AgentSettings,
    applier: A,
    shutdown: impl Future<Output = ()>,
) {
    let mut agent = Agent::new(settings, applier);
    let mut shutdown = std::pin::pin!(shutdown);
    agent.boot_from_checkpoint().await;
    let mut backoff = BACKOFF_MIN;
    let (tx, mut events) = mpsc::unbounded_channel();
    let fleet = loop {
        let attempt = tokio::select! {
            r = connect(&agent.settings.connect, Some(tx.clone())) => r,
            () = &mut shutdown => return,
        };
        match attempt {
            Ok(f) => break f,
            Err(e) => {
                log::warn!(
                    "fleet: {}; retrying in {} ms",
                    crate::daemon::service::error_chain(&e),
                    backoff.as_millis()
                );
                if sleep_or(&mut shutdown, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    };
    log::info!(
        "fleet: connected as box {} (groups: {})",
        agent.settings.box_id,
        agent.settings.groups.join(", ")
    );
    backoff = BACKOFF_MIN;
    // One heartbeat for the whole run, sessions and the waits between them alike.
    // The first status goes out with the first apply; the first tick one interval later.
    let mut tick = tokio::time::interval(agent.settings.status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    loop {
        match agent
            .session(&fleet, &mut events, &mut tick, &mut shutdown)
            .await
        {
            End::Shutdown => return,
            End::Disconnected => {
                log::warn!("fleet: disconnected; resynchronising once connected again");
                backoff = BACKOFF_MIN;
            }
            End::Failed(e) => {
                log::warn!("fleet: {e}; resynchronising in {} ms", backoff.as_millis());
                if agent.idle(&fleet, &mut tick, backoff, &mut shutdown).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        // The client reconnects by itself; wait for it.
        while fleet.client.connection_state() != async_nats::connection::State::Connected {
            tokio::select! {
                _ = events.recv() => {}
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = &mut shutdown => return,
            }
        }
        // Events from before the reconnection are history.
        while events.try_recv().is_ok() {}
    }
}

/// Sleeps `d`; true if `shutdown` completed first.
async fn sleep_or(shutdown: &mut Pin<&mut impl Future<Output = ()>>, d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = shutdown.as_mut() => true,
    }
}

/// A number no other watch of this process, nor of an earlier one, had: the time in
/// milliseconds, plus a counter for watches made within one millisecond.
fn next_watch_id() -> u64 {
    // A mutex, not an AtomicU64: 32-bit MIPS and PowerPC (router targets) have no 64-bit
    // atomics, and this runs once per watch.
    static LAST: std::sync::Mutex<u64> = std::sync::Mutex::new(0);
    let now = now_ms();
    let mut last = LAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *last = now.max(*last + 1);
    *last
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A message's key and value (`None`: deleted or purged).
fn decode(prefix: &str, msg: &async_nats::Message) -> Option<(String, Option<Bytes>)> {
    let key = msg.subject.as_str().strip_prefix(prefix)?.to_owned();
    let removed = msg.headers.as_ref().is_some_and(|h| {
        matches!(
            h.get("KV-Operation").map(async_nats::HeaderValue::as_str),
            Some("DEL" | "PURGE")
        ) || h.get("Nats-Marker-Reason").is_some()
    });
    Some((key, (!removed).then(|| msg.payload.clone())))
}

/// The services of snapshot `entries` for the box of `settings`: every value decoded and
/// validated, keys of other boxes and groups skipped, box overrides in place of the group
/// services they name; in name order. Artifacts are not looked at.
///
/// # Errors
/// Every problem: bad keys or values, the same name from two groups without an override.
pub fn resolve(
    settings: &AgentSettings,
    entries: &BTreeMap<String, Bytes>,
) -> Result<Vec<FleetService>, Vec<String>> {
    let mut problems = Vec::new();
    // Name → (is a box override, service).
    let mut by_name: BTreeMap<String, (bool, FleetService)> = BTreeMap::new();
    for (key, value) in entries {
        let parsed = match DesiredKey::parse(key) {
            Ok(k) if settings.wants(&k) => k,
            Ok(_) => continue,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        let config = match schema::service_from_value(key, value) {
            Ok(c) => c,
            Err(e) => {
                problems.extend(e.problems().into_iter().map(|p| {
                    if p.starts_with(key.as_str()) {
                        p
                    } else {
                        format!("{key}: {p}")
                    }
                }));
                continue;
            }
        };
        let is_box = matches!(parsed.scope, Scope::Box(_));
        let svc = FleetService {
            key: key.clone(),
            source: parsed.source(),
            config,
        };
        match by_name.get(&svc.config.name) {
            None => {
                by_name.insert(svc.config.name.clone(), (is_box, svc));
            }
            Some((true, _)) => {} // the box's override stays
            Some((false, _)) if is_box => {
                by_name.insert(svc.config.name.clone(), (true, svc));
            }
            Some((false, other)) => {
                // Two groups, no override: which one would be arbitrary. Unless the box
                // overrides the name (a later key), this is an error.
                let override_key = schema::DesiredKey::for_box(&settings.box_id, &svc.config.name)
                    .map(|k| k.to_string())
                    .unwrap_or_default();
                if !entries.contains_key(&override_key) {
                    problems.push(format!(
                        "service {}: defined by {} ({}) and by {} ({}): this box is in both \
                             groups; give it an override {override_key} or rename one",
                        svc.config.name, other.source, other.key, svc.source, svc.key
                    ));
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(by_name.into_values().map(|(_, s)| s).collect())
}

/// The installer of a box's artifacts, if it fetches them: `<run_dir>/fleet/artifacts`, with
/// the run directory and `fleet` made searchable for the services' users.
fn installer_for(settings: &AgentSettings) -> Option<Installer> {
    settings.artifacts.clone().map(|root| {
        let dirs: Vec<PathBuf> = root
            .ancestors()
            .skip(1)
            .take(2)
            .map(Path::to_path_buf)
            .collect();
        Installer::new(root).searchable(&dirs)
    })
}

/// The services of the box's checkpoint, ready to run (artifacts installed), for a daemon
/// that starts: it runs them from the start, so it adopts their processes like the file's.
/// `None` without a checkpoint of this box.
///
/// # Errors
/// As [`resolve`], and artifacts no longer installed.
pub fn checkpointed(settings: &AgentSettings) -> Option<Result<Vec<FleetService>, Vec<String>>> {
    let cp = Checkpoint::read(settings.checkpoint.as_ref()?)?;
    if cp.box_id != settings.box_id {
        return None;
    }
    let entries = cp
        .entries
        .into_iter()
        .map(|(k, v)| (k, Bytes::from(v)))
        .collect();
    let installer = installer_for(settings);
    Some(resolve(settings, &entries).and_then(|mut services| {
        let mut problems = Vec::new();
        for svc in &mut services {
            let Some(artifact) = &svc.config.artifact else {
                continue;
            };
            match installer
                .as_ref()
                .and_then(|i| i.installed(&svc.config.name, artifact))
            {
                Some(dir) => svc.config.workdir = Some(dir),
                None if installer.is_none() => {}
                None => problems.push(format!(
                    "{} ({}): artifact {} is not installed",
                    svc.config.name, svc.key, artifact.name
                )),
            }
        }
        if problems.is_empty() {
            Ok(services)
        } else {
            Err(problems)
        }
    }))
}

type Messages = futures::stream::SelectAll<
    Pin<Box<dyn futures::Stream<Item = Result<jetstream::Message, String>> + Send>>,
>;

/// `request` made again until it succeeds or `deadline` passes, each try bounded by
/// [`WATCH_REQUEST_TIMEOUT`] (growing after [`WATCH_SHORT_TRIES`] timeouts), with a pause
/// after a try that failed at once (250 ms, doubling up to 2 s). Its error: the last try's.
async fn retried<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    deadline: tokio::time::Instant,
    what: &str,
    mut request: impl FnMut() -> F,
) -> Result<T, String> {
    let mut bound = WATCH_REQUEST_TIMEOUT;
    let mut timeouts = 0u32;
    let mut pause = Duration::from_millis(250);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let error = match tokio::time::timeout(bound.min(left), request()).await {
            Ok(Ok(x)) => return Ok(x),
            Ok(Err(e)) => {
                // Answered, with an error (no stream leader yet, say): wait a little.
                if tokio::time::Instant::now() + pause < deadline {
                    tokio::time::sleep(pause).await;
                }
                pause = (pause * 2).min(Duration::from_secs(2));
                e.to_string()
            }
            Err(_) => {
                timeouts += 1;
                if timeouts >= WATCH_SHORT_TRIES {
                    bound = (bound * 2).min(WATCH_REQUEST_TIMEOUT_MAX);
                }
                "timed out".to_owned()
            }
        };
        if tokio::time::Instant::now() + Duration::from_millis(100) >= deadline {
            return Err(format!("{what}: {error}"));
        }
        log::debug!("fleet: {what}: {error}; trying again");
    }
}

/// Opens the desired-state bucket and watches `filters` of box `box_id`: one ordered
/// consumer each, delivering the last message of every key and then every change. Returns
/// the bucket's subject prefix, the merged messages and how many messages the snapshot has
/// (as of the consumers' creation). Every request is tried again until `deadline` (see
/// [`WATCH_REQUEST_TIMEOUT`]), one consumer at a time, so a consumer made is kept while the
/// next one is tried again.
async fn watch(
    fleet: Fleet,
    box_id: String,
    filters: Vec<String>,
    deadline: tokio::time::Instant,
) -> Result<(String, Messages, u64), String> {
    let what = format!("cannot open bucket {}", schema::DESIRED_BUCKET);
    let desired = retried(deadline, &what, || fleet.desired()).await?;
    let mut messages: Messages = futures::stream::SelectAll::new();
    let mut initial = 0u64;
    for filter in filters {
        let what = format!("cannot watch {filter}");
        let consumer = retried(deadline, &what, || {
            desired.stream.create_consumer(push::OrderedConfig {
                name: Some(schema::watch_consumer_name(&box_id, next_watch_id())),
                deliver_subject: fleet.client.new_inbox(),
                description: Some(format!("viscum box {box_id}")),
                filter_subject: format!("{}{filter}", desired.prefix),
                replay_policy: ReplayPolicy::Instant,
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
        })
        .await?;
        initial += consumer.cached_info().num_pending;
        let stream = consumer
            .messages()
            .await
            .map_err(|e| format!("{what}: {e}"))?
            .map(|m| m.map_err(|e| e.to_string()));
        messages.push(Box::pin(stream));
    }
    Ok((desired.prefix.clone(), messages, initial))
}

impl<A: Apply> Agent<A> {
    /// An agent that has applied nothing yet.
    pub fn new(settings: AgentSettings, applier: A) -> Agent<A> {
        Agent {
            installer: installer_for(&settings),
            settings,
            applier,
            applied: BTreeMap::new(),
            applied_revision: 0,
            applied_at_ms: 0,
            error: None,
            status_kv: None,
            status_unavailable: None,
        }
    }

    /// Applies the checkpoint, if there is one for this box.
    async fn boot_from_checkpoint(&mut self) {
        let Some(path) = self.settings.checkpoint.clone() else {
            return;
        };
        let Some(cp) = Checkpoint::read(&path) else {
            return;
        };
        if cp.box_id != self.settings.box_id {
            log::warn!(
                "fleet: ignoring checkpoint {} of box {} (this is box {})",
                path.display(),
                cp.box_id,
                self.settings.box_id
            );
            return;
        }
        log::info!(
            "fleet: applying checkpoint {} (revision {}, {} keys)",
            path.display(),
            cp.revision,
            cp.entries.len()
        );
        let entries = cp
            .entries
            .into_iter()
            .map(|(k, v)| (k, Bytes::from(v)))
            .collect();
        self.converge(&entries, cp.revision, None).await;
        if self.error.is_none() {
            self.applied_at_ms = cp.applied_at_ms;
        }
    }

    /// Waits `d`, putting the status at every `tick`; true if `shutdown` completed first.
    async fn idle(
        &mut self,
        fleet: &Fleet,
        tick: &mut tokio::time::Interval,
        d: Duration,
        shutdown: &mut Pin<&mut impl Future<Output = ()>>,
    ) -> bool {
        let until = tokio::time::Instant::now() + d;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return false,
                _ = tick.tick() => self.put_status(fleet).await,
                () = shutdown.as_mut() => return true,
            }
        }
    }

    /// One connected session: full snapshot, apply, then follow until disconnected. The
    /// status is put at every `tick` throughout.
    async fn session(
        &mut self,
        fleet: &Fleet,
        events: &mut mpsc::UnboundedReceiver<async_nats::Event>,
        tick: &mut tokio::time::Interval,
        shutdown: &mut Pin<&mut impl Future<Output = ()>>,
    ) -> End {
        // Bounded: a cluster without a leader for the stream may leave requests unanswered.
        let deadline = tokio::time::Instant::now() + SNAPSHOT_TIMEOUT;
        let mut setup = std::pin::pin!(watch(
            fleet.clone(),
            self.settings.box_id.clone(),
            self.settings.filters(),
            deadline,
        ));
        let (prefix, mut messages, initial) = loop {
            tokio::select! {
                r = &mut setup => match r {
                    Ok(x) => break x,
                    Err(e) => return End::Failed(e),
                },
                _ = tick.tick() => self.put_status(fleet).await,
                () = shutdown.as_mut() => return End::Shutdown,
            }
        };

        // The snapshot: the last message of every key. `initial` counts them as of the
        // consumers' creation; later ones are changes, applied with the rest.
        let mut snapshot: BTreeMap<String, Option<Bytes>> = BTreeMap::new();
        let mut revision = 0u64;
        let mut received = 0u64;
        let deadline = tokio::time::Instant::now() + SNAPSHOT_TIMEOUT;
        while received < initial {
            let next = tokio::select! {
                m = messages.next() => m,
                () = tokio::time::sleep_until(deadline) => {
                    return End::Failed(format!(
                        "timed out receiving the snapshot ({received} of {initial} keys)"
                    ));
                }
                _ = tick.tick() => {
                    self.put_status(fleet).await;
                    continue;
                }
                () = shutdown.as_mut() => return End::Shutdown,
            };
            match next {
                Some(Ok(msg)) => {
                    received += 1;
                    self.note(&prefix, &msg, &mut snapshot, &mut revision);
                }
                Some(Err(e)) => return End::Failed(format!("watch failed: {e}")),
                None => return End::Failed("watch ended".into()),
            }
        }
        let mut artifacts = None;
        let mut store_retry = self
            .converge_snapshot(&snapshot, revision, fleet, &mut artifacts)
            .await;
        self.put_status(fleet).await;
        tick.reset();
        loop {
            tokio::select! {
                m = messages.next() => {
                    match m {
                        Some(Ok(msg)) => self.note(&prefix, &msg, &mut snapshot, &mut revision),
                        Some(Err(e)) => return End::Failed(format!("watch failed: {e}")),
                        None => return End::Failed("watch ended".into()),
                    }
                    // Changes that arrived together are applied together.
                    while let Some(Some(m)) = messages.next().now_or_never() {
                        match m {
                            Ok(msg) => self.note(&prefix, &msg, &mut snapshot, &mut revision),
                            Err(e) => return End::Failed(format!("watch failed: {e}")),
                        }
                    }
                    store_retry = self
                        .converge_snapshot(&snapshot, revision, fleet, &mut artifacts)
                        .await;
                    self.put_status(fleet).await;
                }
                _ = tick.tick() => {
                    if store_retry {
                        store_retry = self
                            .converge_snapshot(&snapshot, revision, fleet, &mut artifacts)
                            .await;
                    }
                    self.put_status(fleet).await;
                }
                e = events.recv() => {
                    if matches!(e, Some(async_nats::Event::Disconnected) | None) {
                        return End::Disconnected;
                    }
                    if let Some(e) = e {
                        log::info!("fleet: {e}");
                    }
                }
                () = shutdown.as_mut() => return End::Shutdown,
            }
        }
    }

    /// Records one message in the snapshot.
    fn note(
        &self,
        prefix: &str,
        msg: &jetstream::Message,
        snapshot: &mut BTreeMap<String, Option<Bytes>>,
        revision: &mut u64,
    ) {
        if let Ok(info) = msg.info() {
            *revision = (*revision).max(info.stream_sequence);
        }
        if let Some((key, value)) = decode(prefix, msg) {
            snapshot.insert(key, value);
        }
    }

    /// Converges to `snapshot`, opening the artifact store first if a new or changed key
    /// may need it. True when the revision was refused because the store could not be
    /// opened: the session retries at its next status tick.
    async fn converge_snapshot(
        &mut self,
        snapshot: &BTreeMap<String, Option<Bytes>>,
        revision: u64,
        fleet: &Fleet,
        artifacts: &mut Option<jetstream::object_store::ObjectStore>,
    ) -> bool {
        let entries: BTreeMap<String, Bytes> = snapshot
            .iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
            .collect();
        // Opened once per session, the first time a key is new or has a new value (which may
        // name an artifact not installed yet).
        let needs_store = self.installer.is_some()
            && artifacts.is_none()
            && entries
                .iter()
                .any(|(k, v)| self.applied.get(k).is_none_or(|a| a.as_bytes() != &v[..]));
        if needs_store {
            *artifacts = match fleet.artifacts().await {
                Ok(store) => Some(store),
                Err(e) => {
                    log::warn!("fleet: cannot open {}: {e}", schema::ARTIFACT_BUCKET);
                    None
                }
            };
        }
        self.converge(&entries, revision, artifacts.as_ref()).await;
        // The store could not be opened (a slow or failing server) and the revision was
        // refused for it: worth another try, unlike a refusal of the state itself.
        needs_store && artifacts.is_none() && self.error.is_some()
    }

    /// Applies the snapshot `entries` (key → value of every present key) at `revision`; on
    /// any problem, nothing changes and [`Agent::error`] says why.
    pub async fn converge(
        &mut self,
        entries: &BTreeMap<String, Bytes>,
        revision: u64,
        store: Option<&jetstream::object_store::ObjectStore>,
    ) {
        let same = entries.len() == self.applied.len()
            && entries
                .iter()
                .all(|(k, v)| self.applied.get(k).is_some_and(|a| a.as_bytes() == &v[..]));
        if same && self.applied_at_ms != 0 {
            // Nothing this box runs changed (a change was undone, or the keys that changed
            // were refused before): the newest revision is applied as it is.
            self.applied_revision = self.applied_revision.max(revision);
            self.error = None;
            return;
        }
        match self.build(entries, store).await {
            Err(problems) => {
                let error = problems.join("; ");
                log::error!("fleet: revision {revision} not applied: {error}");
                self.error = Some(error);
            }
            Ok(services) => {
                let set = DesiredSet { revision, services };
                match self.applier.apply(&set).await {
                    Err(problems) => {
                        let error = problems.join("; ");
                        log::error!("fleet: revision {revision} not applied: {error}");
                        self.error = Some(error);
                    }
                    Ok(()) => self.applied_ok(entries, set),
                }
            }
        }
    }

    fn applied_ok(&mut self, entries: &BTreeMap<String, Bytes>, set: DesiredSet) {
        self.applied = entries
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        self.applied_revision = set.revision;
        self.applied_at_ms = now_ms();
        self.error = None;
        log::info!(
            "fleet: applied revision {} ({} service(s): {})",
            set.revision,
            set.services.len(),
            set.services
                .iter()
                .map(|s| s.key.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(path) = &self.settings.checkpoint {
            let cp = Checkpoint {
                box_id: self.settings.box_id.clone(),
                revision: set.revision,
                applied_at_ms: self.applied_at_ms,
                entries: self.applied.clone(),
            };
            if let Err(e) = cp.write(path) {
                log::error!("fleet: cannot write checkpoint {}: {e}", path.display());
            }
        }
        if let Some(installer) = &self.installer {
            let keep: BTreeSet<(String, String)> = set
                .services
                .iter()
                .filter_map(|s| {
                    s.config
                        .artifact
                        .as_ref()
                        .map(|a| (s.config.name.clone(), a.sha256.clone()))
                })
                .collect();
            installer.prune(&keep);
        }
    }

    /// Decodes, resolves and installs: the set to apply, or every problem.
    async fn build(
        &self,
        entries: &BTreeMap<String, Bytes>,
        store: Option<&jetstream::object_store::ObjectStore>,
    ) -> Result<Vec<FleetService>, Vec<String>> {
        let mut services = resolve(&self.settings, entries)?;
        let mut problems = Vec::new();
        if let Some(installer) = &self.installer {
            for svc in &mut services {
                let Some(artifact) = svc.config.artifact.clone() else {
                    continue;
                };
                let dir = match (installer.installed(&svc.config.name, &artifact), store) {
                    (Some(dir), _) => Ok(dir),
                    (None, Some(store)) => installer
                        .install(store, &svc.config.name, &artifact)
                        .await
                        .map_err(|e| e.to_string()),
                    (None, None) => Err(format!(
                        "artifact {}: not installed and the object store {} is not reachable",
                        artifact.name,
                        schema::ARTIFACT_BUCKET
                    )),
                };
                match dir {
                    Ok(dir) => svc.config.workdir = Some(dir),
                    Err(e) => problems.push(format!("{} ({}): {e}", svc.config.name, svc.key)),
                }
            }
        }
        if problems.is_empty() {
            Ok(services)
        } else {
            Err(problems)
        }
    }

    /// The status as it would be put now.
    pub async fn box_status(&mut self) -> BoxStatus {
        BoxStatus {
            box_id: self.settings.box_id.clone(),
            revision: self.applied_revision,
            applied_at_ms: self.applied_at_ms,
            heartbeat_ms: now_ms(),
            viscum_version: env!("CARGO_PKG_VERSION").into(),
            error: self.error.clone(),
            services: self.applier.status().await,
        }
    }

    /// Why the newest snapshot is not applied, if it is not.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// The applier.
    pub fn applier(&self) -> &A {
        &self.applier
    }

    /// Puts the status, opening the status bucket first if this run has not yet; nothing
    /// while disconnected. Bounded by [`STATUS_TIMEOUT`] (each of opening and putting), so a
    /// stalled server never holds up the watch: the next tick tries again.
    async fn put_status(&mut self, fleet: &Fleet) {
        if fleet.client.connection_state() != async_nats::connection::State::Connected {
            return;
        }
        if self.status_kv.is_none() {
            let why = match tokio::time::timeout(STATUS_TIMEOUT, fleet.status()).await {
                Ok(Ok(kv)) => {
                    self.status_kv = Some(kv);
                    None
                }
                Ok(Err(e)) => Some(format!("cannot open bucket {}: {e}", schema::STATUS_BUCKET)),
                Err(_) => Some(format!(
                    "opening bucket {} timed out",
                    schema::STATUS_BUCKET
                )),
            };
            if let Some(why) = why {
                // Once per reason, not at every tick (the bucket may not exist yet).
                if self.status_unavailable.as_ref() != Some(&why) {
                    log::warn!("fleet: no status report: {why}");
                    self.status_unavailable = Some(why);
                }
                return;
            }
            self.status_unavailable = None;
        }
        let status = self.box_status().await;
        let json = match serde_json::to_vec(&status) {
            Ok(j) => j,
            Err(e) => {
                log::error!("fleet: cannot encode the status: {e}");
                return;
            }
        };
        let Some(kv) = &self.status_kv else { return };
        let key = schema::status_key(&self.settings.box_id);
        match tokio::time::timeout(STATUS_TIMEOUT, kv.put(&key, json.into())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => log::warn!("fleet: cannot put {key}: {e}"),
            Err(_) => log::warn!("fleet: putting {key} timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(checkpoint: Option<PathBuf>) -> AgentSettings {
        let connect = ConnectSettings {
            servers: vec!["nats://192.0.2.1:4222".into()],
            name: "b1".into(),
            credentials: crate::config::fleet::Credentials::None,
            tls: None,
            connect_timeout: Duration::from_secs(1),
            max_reconnect_delay: Duration::from_secs(1),
            inbox_prefix: None,
        };
        let mut s = AgentSettings::dry_run(
            connect,
            "b1",
            &["lab".into(), "eu".into()],
            Duration::from_secs(1),
        );
        s.checkpoint = checkpoint;
        s
    }

    fn svc(name: &str, port: u16, command: &str) -> Bytes {
        Bytes::from(format!(
            "[[service]]\nname = \"{name}\"\nmatch = [\"tcp://198.51.100.7:{port}\"]\ncommand = [\"{command}\"]\n"
        ))
    }

    fn agent(local: &str, checkpoint: Option<PathBuf>) -> Agent<DryRun> {
        Agent::new(
            settings(checkpoint),
            DryRun::new(Config::parse(local).unwrap()),
        )
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn box_overrides_replace_group_services() {
        let mut a = agent("", None);
        let entries = BTreeMap::from([
            ("group.lab.svc.web".to_string(), svc("web", 80, "group")),
            ("box.b1.svc.web".to_string(), svc("web", 80, "box")),
            ("group.eu.svc.api".to_string(), svc("api", 81, "api")),
            // Not this box's: ignored.
            ("group.other.svc.x".to_string(), svc("x", 82, "x")),
            ("box.b2.svc.web".to_string(), svc("web", 80, "b2")),
        ]);
        block_on(a.converge(&entries, 7, None));
        assert_eq!(a.error(), None);
        let applied = a.applier().applied().unwrap();
        assert_eq!(applied.revision, 7);
        let by_name: BTreeMap<&str, &FleetService> = applied
            .services
            .iter()
            .map(|s| (s.config.name.as_str(), s))
            .collect();
        assert_eq!(by_name.len(), 2, "{by_name:?}");
        assert_eq!(by_name["web"].source, "box:b1");
        assert_eq!(by_name["web"].config.command, ["box"]);
        assert_eq!(by_name["api"].source, "group:eu");
        let st = block_on(a.box_status());
        assert_eq!(st.revision, 7);
        assert_eq!(st.services.len(), 2);
        assert_eq!(st.services[0].name, "api");
        assert_eq!(st.services[0].state, "dry-run");
    }

    #[test]
    fn a_bad_snapshot_changes_nothing() {
        let mut a = agent(
            "[[service]]\nname = \"local\"\nmatch = [\"tcp://198.51.100.7:90\"]\ncommand = [\"l\"]\n",
            None,
        );
        let good = BTreeMap::from([("group.lab.svc.web".to_string(), svc("web", 80, "v1"))]);
        block_on(a.converge(&good, 3, None));
        assert_eq!(a.applier().applies(), 1);

        // The same name in two groups, a value that does not validate, a clash with the
        // local service: each refused, naming what clashed; v1 stays applied.
        for (entries, needle) in [
            (
                vec![
                    ("group.lab.svc.web", svc("web", 80, "v2")),
                    ("group.eu.svc.web", svc("web", 80, "v2")),
                ],
                "service web: defined by group:eu (group.eu.svc.web) and by group:lab \
                 (group.lab.svc.web)",
            ),
            (
                vec![("group.lab.svc.web", svc("web", 0, "v2"))],
                "group.lab.svc.web: ",
            ),
            (
                vec![("group.lab.svc.web", svc("other", 80, "v2"))],
                "the service block is named 'other', but the key names 'web'",
            ),
            (
                vec![("group.lab.svc.local", svc("local", 91, "v2"))],
                "service local: defined by the local configuration and by group:lab",
            ),
            (
                vec![("group.lab.svc.web", svc("web", 90, "v2"))],
                "tcp://198.51.100.7:90 is already matched by service local",
            ),
        ] {
            let entries: BTreeMap<String, Bytes> = entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            block_on(a.converge(&entries, 9, None));
            let error = a.error().unwrap_or_default().to_string();
            assert!(error.contains(needle), "{needle:?} not in {error:?}");
            assert_eq!(a.applier().applies(), 1);
            let st = block_on(a.box_status());
            assert_eq!(st.revision, 3);
            assert_eq!(st.error.as_deref(), Some(error.as_str()));
        }
        // Back to what runs: no error, the newer revision counts as applied.
        block_on(a.converge(&good, 11, None));
        assert_eq!(a.error(), None);
        assert_eq!(block_on(a.box_status()).revision, 11);
        assert_eq!(a.applier().applies(), 1);
    }

    #[test]
    fn checkpoint_is_written_and_booted_from() {
        let dir = std::env::temp_dir().join(format!("viscum-agent-test-{}", std::process::id()));
        let path = dir.join("sub/checkpoint.json");
        let mut a = agent("", Some(path.clone()));
        let entries = BTreeMap::from([("box.b1.svc.web".to_string(), svc("web", 80, "v1"))]);
        block_on(a.converge(&entries, 5, None));
        let cp = Checkpoint::read(&path).unwrap();
        assert_eq!(cp.revision, 5);
        assert_eq!(cp.box_id, "b1");
        assert_eq!(cp.entries.len(), 1);

        let mut booted = agent("", Some(path.clone()));
        block_on(booted.boot_from_checkpoint());
        let applied = booted.applier().applied().unwrap();
        assert_eq!(applied.revision, 5);
        assert_eq!(applied.services[0].config.command, ["v1"]);
        assert_eq!(
            block_on(booted.box_status()).applied_at_ms,
            cp.applied_at_ms
        );

        // Another box's checkpoint is not applied.
        let mut other = Agent::new(
            AgentSettings {
                box_id: "b2".into(),
                ..settings(Some(path))
            },
            DryRun::new(Config::parse("").unwrap()),
        );
        block_on(other.boot_from_checkpoint());
        assert!(other.applier().applied().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_artifact_needs_the_store_or_an_installed_copy() {
        let dir = std::env::temp_dir().join(format!("viscum-agent-art-{}", std::process::id()));
        let mut s = settings(None);
        s.artifacts = Some(dir.join("artifacts"));
        let mut a = Agent::new(s, DryRun::new(Config::parse("").unwrap()));
        let sha = "ab".repeat(32);
        let value = format!(
            "[[service]]\nname = \"web\"\nmatch = [\"tcp://198.51.100.7:80\"]\ncommand = [\"./web\"]\nartifact = {{ name = \"web\", sha256 = \"{sha}\" }}\n"
        );
        let entries = BTreeMap::from([("group.lab.svc.web".to_string(), Bytes::from(value))]);
        block_on(a.converge(&entries, 2, None));
        let e = a.error().unwrap_or_default();
        assert!(e.contains("artifact web: not installed"), "{e}");
        // Installed (a directory by its final name): used as the working directory.
        let installed = dir.join("artifacts/web").join(&sha);
        std::fs::create_dir_all(&installed).unwrap();
        block_on(a.converge(&entries, 2, None));
        assert_eq!(a.error(), None);
        let applied = a.applier().applied().unwrap();
        assert_eq!(
            applied.services[0].config.workdir.as_ref(),
            Some(&installed)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn watch_requests_are_tried_again_until_the_deadline() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        // Refused twice (no stream leader yet, say), then answered.
        let tries = std::cell::Cell::new(0);
        let r = rt.block_on(retried(
            tokio::time::Instant::now() + Duration::from_secs(10),
            "cannot watch x",
            || {
                tries.set(tries.get() + 1);
                let n = tries.get();
                async move { if n < 3 { Err("no leader") } else { Ok(n) } }
            },
        ));
        assert_eq!(r, Ok(3));
        // Never answered (a consumer placed on a dead server): the deadline ends it, with
        // what went wrong.
        let r: Result<(), String> = rt.block_on(retried(
            tokio::time::Instant::now() + Duration::from_millis(300),
            "cannot watch y",
            std::future::pending::<Result<(), &str>>,
        ));
        assert_eq!(r, Err("cannot watch y: timed out".to_string()));
    }

    #[test]
    fn filters_are_narrow() {
        assert_eq!(
            settings(None).filters(),
            ["group.lab.svc.>", "group.eu.svc.>", "box.b1.svc.>"]
        );
    }
}
