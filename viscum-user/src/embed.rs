//! Embedding Viscum: the engine inside another program (router firmware with a daemon of its
//! own), without `viscum run` or the CLI.
//!
//! A thin layer over the types the CLI and the daemon use, so an embedder gets the same
//! behaviour and the same errors:
//!
//! * [`Viscum::new`] names an instance by its bpffs directory (the CLI's `--bpffs`); every
//!   call below opens what is pinned there, so an embedder and the `viscum` CLI (`redirect
//!   list`, `stats`, `doctor`) see and manage the same datapath.
//! * [`Viscum::attach`] / [`Viscum::detach`] / [`Viscum::purge`]: the classifier on
//!   client-facing interfaces (`viscum attach|detach`).
//! * [`Viscum::add`] / [`Viscum::remove`] / [`Viscum::list`]: redirects, described by the
//!   same [`RedirectSpec`] as `viscum redirect add` and a `[[service]]` table (build one
//!   from [`SpecFields`] with [`RedirectSpec::new`]).
//! * [`Viscum::ns_add`] / [`Viscum::ns_del`]: service namespaces (`viscum ns add|del`).
//! * [`Viscum::supervise`]: services run, health-checked and redirected while healthy, as
//!   `viscum run` does, but under the embedder's control ([`Supervisor`]).
//!
//! Everything needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) and runs in the calling
//! thread's network namespace. The async functions need a Tokio runtime with I/O and time
//! enabled. `examples/embed.rs` is a complete program.
//!
//! ```no_run
//! use viscum::embed::{RedirectSpec, SpecFields, Target, Viscum};
//! # async fn demo() -> Result<(), viscum::embed::EmbedError> {
//! let viscum = Viscum::new("/sys/fs/bpf/viscum")?;
//! viscum.attach(&["br-lan"])?;
//! viscum.ns_add("speedtest").await?;
//! let fields = SpecFields {
//!     matches: vec!["tcp://198.51.100.7:5201".into()],
//!     ..SpecFields::default()
//! };
//! let spec = RedirectSpec::new(&fields, Target::Namespace("speedtest".into()))?;
//! let added = viscum.add(&spec).await?;
//! // ... the service in namespace `speedtest` now answers for 198.51.100.7:5201 ...
//! viscum.remove(&added, std::time::Duration::from_secs(10)).await?;
//! # Ok(())
//! # }
//! ```

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;

use crate::{
    bpffs::{self, BpffsError},
    daemon::{
        health::SocketMaker,
        service::{self, Context},
        state::RunPaths,
    },
    engine::{self, Engine, EngineError, MapSizes, Pins},
    entries::EntrySet,
    hostnames::HostError,
    netns::{self, NetnsError},
    redirect::{self, RedirectError},
};
pub use crate::{
    config::ServiceConfig,
    daemon::control::ServiceStatus,
    endpoint::Endpoint,
    engine::AttachOutcome,
    entries::Removed,
    netns::ServiceNs,
    redirect::{EntryRow, Target},
    spec::{Match, Mode, RedirectSpec, SpecErrors, SpecFields},
};

/// What went wrong, with the same messages as the CLI.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The bpffs directory could not be created or mounted ([`Viscum::new`]).
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    /// Loading, attaching, pinning or a map operation failed; also "not attached".
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// An entry could not be added or removed (duplicate, missing, bad target, NAT).
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    /// A host-name match could not be resolved or has no address.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A namespace, veth, address or route operation failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The redirect spec is invalid; every problem is listed.
    #[error(transparent)]
    Spec(#[from] SpecErrors),
    /// [`Viscum::supervise`] could not create the run directory's `logs/` and
    /// `state/`, or could not start its socket helper thread.
    #[error("cannot prepare {path}")]
    RunDir {
        /// The run directory given to [`Viscum::supervise`].
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// [`Viscum::remove`] could not remove some entries (the others are removed): the
    /// failures, joined with `; `.
    #[error("cannot remove every entry: {0}")]
    Remove(String),
}

/// One Viscum instance: the datapath pinned under one bpffs directory.
#[derive(Debug, Clone)]
pub struct Viscum {
    pins: Pins,
}

impl Viscum {
    /// The instance pinned under `bpffs` (a directory on a bpffs: it is created, and bpffs
    /// mounted there if it is not on one yet). Nothing is loaded until [`Viscum::attach`].
    ///
    /// # Errors
    /// [`EmbedError::Bpffs`]: the directory cannot be created or bpffs mounted there.
    pub fn new(bpffs: impl AsRef<Path>) -> Result<Viscum, EmbedError> {
        bpffs::ensure(bpffs.as_ref())?;
        Ok(Viscum {
            pins: Pins::new(bpffs.as_ref()),
        })
    }

    /// The pins' directory, as given to [`Viscum::new`].
    pub fn bpffs(&self) -> &Path {
        &self.pins.dir
    }

    /// Loads the classifier (once per instance; default map sizes) and attaches it at TC
    /// ingress of each interface (TCX from kernel 6.6, clsact before). Interfaces attached
    /// already are left as they are. Returns what happened per interface, in order.
    ///
    /// # Errors
    /// [`EmbedError::Engine`]: an interface does not exist, the kernel refused the program.
    /// Nothing is attached to the interfaces after a failed one.
    pub fn attach(&self, ifaces: &[&str]) -> Result<Vec<(String, AttachOutcome)>, EmbedError> {
        let ifaces: Vec<String> = ifaces.iter().map(ToString::to_string).collect();
        Ok(engine::attach(&self.pins, &ifaces, MapSizes::default())?)
    }

    /// Detaches the classifier from each interface; entries and pins stay.
    ///
    /// # Errors
    /// [`EmbedError::Engine`]: the classifier is not attached to one of them.
    pub fn detach(&self, ifaces: &[&str]) -> Result<(), EmbedError> {
        let ifaces: Vec<String> = ifaces.iter().map(ToString::to_string).collect();
        Ok(engine::detach(&self.pins, &ifaces)?)
    }

    /// Detaches from every interface and removes the pinned programs and maps: every entry
    /// is lost (`viscum detach --all --purge`).
    ///
    /// # Errors
    /// [`EmbedError::Engine`]: a detach or an unpin failed.
    pub fn purge(&self) -> Result<(), EmbedError> {
        let attached = engine::attached_interfaces(&self.pins);
        if !attached.is_empty() {
            engine::detach(&self.pins, &attached)?;
        }
        Ok(engine::purge(&self.pins)?)
    }

    fn engine(&self) -> Result<Engine, EmbedError> {
        Ok(Engine::open(&self.pins)?)
    }

    /// Adds `spec`'s entries (one per address match; host names are resolved once with the
    /// system's DNS servers). Returns the entries added, in order: pass them to
    /// [`Viscum::remove`].
    ///
    /// # Errors
    /// As `viscum redirect add`: not attached, a match already redirected, a target that
    /// does not exist or is not a veth, NAT without an address to translate to, a host name
    /// without an address. On an error the entries this call added are removed again.
    pub async fn add(&self, spec: &RedirectSpec) -> Result<Vec<Endpoint>, EmbedError> {
        let mut engine = self.engine()?;
        Ok(crate::spec::add_entries(&mut engine, spec, &[]).await?)
    }

    /// Removes entries: each stops taking new flows at once, and goes once the edge flows
    /// it has open have ended or `drain` has passed (zero: at once). Returns each removed
    /// entry with its final counters and the flows it still had open (cut).
    ///
    /// # Errors
    /// [`EmbedError::Redirect`] if an endpoint has no entry (then nothing changes);
    /// [`EmbedError::Remove`] if one could not be removed (the others are).
    pub async fn remove(
        &self,
        endpoints: &[Endpoint],
        drain: Duration,
    ) -> Result<Vec<Removed>, EmbedError> {
        let engine = self.engine()?;
        let mut set = EntrySet::existing(&engine, endpoints)?;
        let shared = tokio::sync::Mutex::new(engine);
        if !drain.is_zero() {
            set.drain_and_wait(&shared, drain).await;
        }
        let mut engine = shared.into_inner();
        let (removed, errors) = set.remove(&mut engine).await;
        if !errors.is_empty() {
            return Err(EmbedError::Remove(errors.join("; ")));
        }
        Ok(removed)
    }

    /// Every entry with its target, mode and counters (`viscum redirect list`).
    ///
    /// # Errors
    /// Not attached, or netlink failed.
    pub async fn list(&self) -> Result<Vec<EntryRow>, EmbedError> {
        Ok(redirect::list(&self.engine()?).await?)
    }

    /// Creates service namespace `name` (1-12 of `a-z 0-9 - _`) with its veth pair `vh-NAME`
    /// and addresses (`viscum ns add`).
    ///
    /// # Errors
    /// [`EmbedError::Netns`]: an invalid or taken name, netlink failures.
    pub async fn ns_add(&self, name: &str) -> Result<ServiceNs, EmbedError> {
        let ns = netns::service_ns_add(name).await?;
        // Entries into a namespace of this name whose veth was re-created follow it.
        if let Ok(mut engine) = self.engine() {
            let veth = ns.host_veth.clone();
            let _ = crate::lifecycle::recover_targets(&mut engine, &|name| name != veth).await;
        }
        Ok(ns)
    }

    /// Deletes service namespace `name` and the entries into it (`viscum ns del`).
    ///
    /// # Errors
    /// [`EmbedError::Netns`]: no such Viscum namespace, netlink failures.
    pub async fn ns_del(&self, name: &str) -> Result<(), EmbedError> {
        let ns = netns::service_ns_get(name).await?;
        if let Ok(mut engine) = self.engine() {
            redirect::del_all_to(&mut engine, ns.host_ifindex).await?;
            let _ = engine::detach_reply(&self.pins, &ns.host_veth);
        }
        Ok(netns::service_ns_del(name).await?)
    }

    /// Runs `services` as `viscum run` runs its `[[service]]`s (namespace, process as its
    /// user with its limits, health checks, restarts with back-off, entries only while
    /// healthy), each in its own task, until [`Supervisor::stop`]. Logs and state records go
    /// under `run_dir`, and the images of services with `[service.storage]` under
    /// `run_dir/storage`. The classifier must be attached ([`Viscum::attach`]); services come
    /// from [`crate::config::Config::parse`] or are built by hand.
    ///
    /// # Errors
    /// Not attached, `run_dir` cannot be created, the socket helper thread cannot start.
    pub fn supervise(
        &self,
        run_dir: impl AsRef<Path>,
        services: Vec<ServiceConfig>,
    ) -> Result<Supervisor, EmbedError> {
        let paths = RunPaths::new(run_dir.as_ref());
        let dir_error = |source| EmbedError::RunDir {
            path: run_dir.as_ref().to_owned(),
            source,
        };
        paths.create().map_err(dir_error)?;
        let sockets = SocketMaker::start().map_err(dir_error)?;
        let (shed, _) = watch::channel(false);
        let (links, _) = watch::channel(0u64);
        let ctx = Arc::new(Context {
            engine: Arc::new(tokio::sync::Mutex::new(self.engine()?)),
            paths,
            sockets,
            shed,
            resolver: crate::hostnames::Resolver::new(&[]).ok().map(Arc::new),
            links,
            storage_dir: run_dir.as_ref().join("storage"),
        });
        let handles = services
            .into_iter()
            .map(|s| service::spawn(s, ctx.clone()))
            .collect();
        Ok(Supervisor { ctx, handles })
    }
}

/// Services supervised by [`Viscum::supervise`].
pub struct Supervisor {
    ctx: Arc<Context>,
    handles: Vec<service::Handle>,
}

impl Supervisor {
    /// Each service's state, health and whether it is redirected now.
    pub fn status(&self) -> Vec<ServiceStatus> {
        self.handles
            .iter()
            .map(|h| h.lock().status.clone())
            .collect()
    }

    /// Sends every service's traffic to the cloud (`true`) or lets healthy ones have it
    /// again (`false`): load shedding, the embedder's way.
    pub fn shed(&self, shed: bool) {
        self.ctx.shed.send_replace(shed);
    }

    /// Stops every service (entries drained and removed first, then the process) and
    /// deletes their namespaces.
    pub async fn stop(self) {
        for h in self.handles {
            h.shutdown(true).await;
        }
    }
}
