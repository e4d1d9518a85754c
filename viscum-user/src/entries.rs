//! The lifecycle of one owner's set of redirect entries: the one implementation behind
//! `viscum redirect del|drain` and the daemon's services.
//!
//! An [`EntrySet`] installs its matches (adopting entries that already point at its owner's
//! target, replacing ones whose target is gone, refusing ones that point elsewhere), drains
//! them (no new flows; open edge flows continue) and waits for their edge flows to end, and
//! removes them, keeping their counters for whoever reports them.
//!
//! The engine comes in as `&mut Engine` for single steps, and as a
//! [`tokio::sync::Mutex`] for the wait, which takes the lock only for each poll so that
//! others (a daemon's other services) keep working meanwhile.

use std::time::{Duration, Instant};

use viscum_common::TARGET_F_DRAINING;

use crate::{
    endpoint::Endpoint,
    engine::{Engine, EngineError},
    redirect::{self, RedirectError, RedirectOptions, Target},
};

/// How often a drain looks at the flow table.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// Counters of entries that were removed (sums over the entries).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets redirected.
    pub packets: u64,
    /// Bytes redirected.
    pub bytes: u64,
    /// Flows started at the edge.
    pub edge_flows: u64,
    /// Matched flows that went to the cloud (learning, draining).
    pub cloud_flows: u64,
}

/// One removed entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    /// The entry's match.
    pub endpoint: Endpoint,
    /// Its final counters, read just before it was deleted.
    pub counters: Counters,
    /// Edge flows still open when it went (cut: they reach the cloud, which resets them).
    pub cut_flows: u64,
}

/// Which entries an [`EntrySet`] counts as its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// Entries into this target ifindex (`None`: not known yet, so none).
    Target(Option<u32>),
    /// Every entry of its endpoints, whatever its target (a `redirect del` of the user's own
    /// matches).
    Any,
}

/// The entries one owner has in the datapath, all to one target in one mode.
#[derive(Debug, Clone)]
pub struct EntrySet {
    /// Where and how [`EntrySet::install`] adds entries (`None`: a set of existing entries,
    /// to drain and remove only).
    adds: Option<(Target, RedirectOptions)>,
    /// Whose entries the set may remove.
    owner: Owner,
    installed: Vec<Endpoint>,
}

impl EntrySet {
    /// An empty set of entries to `target` with `opts`.
    pub fn new(target: Target, opts: RedirectOptions) -> EntrySet {
        EntrySet {
            adds: Some((target, opts)),
            owner: Owner::Target(None),
            installed: Vec::new(),
        }
    }

    /// A set made of entries that exist already (whoever added them), to drain and remove.
    ///
    /// # Errors
    /// [`EngineError::NoSuchEntry`] for the first endpoint without an entry (then nothing
    /// is taken), naming the entries of the same match for other clients (`?from=`) if
    /// there are any: the match a user meant, with or without the `--from` it needs.
    pub fn existing(engine: &Engine, endpoints: &[Endpoint]) -> Result<EntrySet, RedirectError> {
        for ep in endpoints {
            if engine.get(ep)?.is_none() {
                let any_clients = |e: &Endpoint| Endpoint { source: None, ..*e };
                let others: Vec<String> = engine
                    .entries()?
                    .into_iter()
                    .filter(|e| any_clients(&e.endpoint) == any_clients(ep))
                    .map(|e| e.endpoint.to_string())
                    .collect();
                let what = if others.is_empty() {
                    ep.to_string()
                } else {
                    format!(
                        "{ep} (that match exists for other clients as {}: give its --from)",
                        others.join(", ")
                    )
                };
                return Err(EngineError::NoSuchEntry(what).into());
            }
        }
        Ok(EntrySet {
            adds: None,
            owner: Owner::Any,
            installed: endpoints.to_vec(),
        })
    }

    /// Sets the owner's target ifindex (its namespace's host veth, once it exists).
    pub fn set_owner(&mut self, ifindex: Option<u32>) {
        self.owner = Owner::Target(ifindex);
    }

    /// The entries installed (or adopted) and not removed since.
    pub fn installed(&self) -> &[Endpoint] {
        &self.installed
    }

    /// Forgets the installed entries that are no longer in the datapath (another writer
    /// deleted them: `viscum redirect del`, `ns del`, a purge) and returns them, so that the
    /// next [`EntrySet::install`] puts them back. An entry read as present, or that cannot
    /// be read, is kept.
    pub fn forget_missing(&mut self, engine: &Engine) -> Vec<Endpoint> {
        let mut gone = Vec::new();
        self.installed.retain(|ep| match engine.get(ep) {
            Ok(None) => {
                gone.push(*ep);
                false
            }
            Ok(Some(_)) | Err(_) => true,
        });
        gone
    }

    /// Is `entry_ifindex` the owner's (or is there no owner to check)?
    fn owns(&self, entry_ifindex: u32) -> bool {
        match self.owner {
            Owner::Any => true,
            Owner::Target(t) => t == Some(entry_ifindex),
        }
    }

    /// Takes over the entries for `candidates` that already point at the owner's target (a
    /// previous daemon's), removes those whose target is gone (stale), and leaves entries
    /// into anything else alone. Returns the endpoints taken over; `log` hears about the
    /// others.
    pub fn adopt(
        &mut self,
        engine: &mut Engine,
        candidates: &[Endpoint],
        mut log: impl FnMut(String),
    ) -> Vec<Endpoint> {
        let mut ours = Vec::new();
        for ep in candidates {
            // The entry read and the stale one removed under one hold of the write lock.
            let _lock = match crate::engine::lock(engine.pins()) {
                Ok(l) => l,
                Err(e) => {
                    log(format!("cannot check the entry for {ep}: {e}"));
                    continue;
                }
            };
            match engine.get(ep) {
                Ok(Some(e)) if self.owner == Owner::Target(Some(e.ifindex)) => ours.push(*ep),
                Ok(Some(e)) if !crate::lifecycle::ifindex_alive(e.ifindex) => {
                    log(format!("removing stale entry {ep} (its target is gone)"));
                    let _ = engine.remove(ep);
                }
                Ok(Some(e)) => log(format!(
                    "{ep} is redirected elsewhere (ifindex {}); leaving that entry alone",
                    e.ifindex
                )),
                Ok(None) => {}
                Err(e) => log(format!("cannot read the entry for {ep}: {e}")),
            }
        }
        for ep in &ours {
            if !self.installed.contains(ep) {
                self.installed.push(*ep);
            }
        }
        ours
    }

    /// Installs every endpoint of `wanted` not installed yet ([`redirect::add_with`], which
    /// replaces an entry whose target is gone). An entry that exists and points at the
    /// owner's target is adopted. Returns one message per endpoint that could not be
    /// installed (the others are).
    pub async fn install(&mut self, engine: &mut Engine, wanted: &[Endpoint]) -> Vec<String> {
        let mut errors = Vec::new();
        let Some((target, opts)) = &self.adds else {
            return vec!["a set of existing entries installs nothing".into()];
        };
        for ep in wanted {
            if self.installed.contains(ep) {
                continue;
            }
            match redirect::add_with(engine, ep, target, opts).await {
                Ok(()) => self.installed.push(*ep),
                Err(RedirectError::Engine(EngineError::Duplicate(_))) => match engine.get(ep) {
                    Ok(Some(e)) if self.owner == Owner::Target(Some(e.ifindex)) => {
                        self.installed.push(*ep);
                    }
                    _ => errors.push(format!("{ep} is already redirected elsewhere")),
                },
                Err(e) => errors.push(format!("cannot redirect {ep}: {}", error_chain(&e))),
            }
        }
        errors
    }

    /// Live edge flows of the installed entries, in total.
    pub fn live_flows(&self, engine: &Engine) -> u64 {
        live_flows(engine, &self.installed)
    }

    /// Drains the installed entries and waits until their edge flows ended or `timeout`
    /// passed; returns the flows still open then. See [`drain_and_wait`].
    pub async fn drain_and_wait(
        &self,
        engine: &tokio::sync::Mutex<Engine>,
        timeout: Duration,
    ) -> u64 {
        drain_and_wait(engine, &self.installed, timeout).await
    }

    /// Removes every installed entry that is the owner's ([`redirect::del`]: its local route
    /// and reply path go with the last entry needing them). Entries gone already, or someone
    /// else's now, are only forgotten. Returns what was removed with its counters, and the
    /// failures (those entries stay in the set).
    pub async fn remove(&mut self, engine: &mut Engine) -> (Vec<Removed>, Vec<String>) {
        let mut removed = Vec::new();
        let mut errors = Vec::new();
        let mut kept = Vec::new();
        for ep in std::mem::take(&mut self.installed) {
            // Whose the entry is, and deleting it, under one hold of the write lock: another
            // writer could otherwise replace it in between and lose its entry to us.
            let _lock = match crate::engine::lock(engine.pins()) {
                Ok(l) => l,
                Err(e) => {
                    errors.push(format!("cannot remove {ep}: {}", error_chain(&e)));
                    kept.push(ep);
                    continue;
                }
            };
            let entry = match engine.get(&ep) {
                Ok(Some(e)) if self.owns(e.ifindex) => e,
                Ok(_) => continue, // gone already, or someone else's now
                Err(e) => {
                    errors.push(format!("cannot read the entry for {ep}: {e}"));
                    kept.push(ep);
                    continue;
                }
            };
            let cut_flows = engine.edge_flows_of(&ep, entry.ifindex).unwrap_or(0);
            match redirect::del_if_present(engine, &ep).await {
                Ok(()) => removed.push(Removed {
                    endpoint: ep,
                    counters: Counters {
                        packets: entry.packets,
                        bytes: entry.bytes,
                        edge_flows: entry.new_flows,
                        cloud_flows: entry.cloud_flows,
                    },
                    cut_flows,
                }),
                Err(e) => {
                    errors.push(format!("cannot remove {ep}: {}", error_chain(&e)));
                    kept.push(ep);
                }
            }
        }
        self.installed = kept;
        (removed, errors)
    }
}

impl Counters {
    /// The sums over `removed`.
    pub fn sum(removed: &[Removed]) -> Counters {
        removed.iter().fold(Counters::default(), |a, r| Counters {
            packets: a.packets + r.counters.packets,
            bytes: a.bytes + r.counters.bytes,
            edge_flows: a.edge_flows + r.counters.edge_flows,
            cloud_flows: a.cloud_flows + r.counters.cloud_flows,
        })
    }
}

/// Live edge flows of `endpoints`' entries, in total (entries that are gone count 0).
pub fn live_flows(engine: &Engine, endpoints: &[Endpoint]) -> u64 {
    let pairs: Vec<(Endpoint, u32)> = endpoints
        .iter()
        .filter_map(|ep| Some((*ep, engine.get(ep).ok()??.ifindex)))
        .collect();
    engine.live_edge_flows(&pairs).iter().sum()
}

/// Stops `endpoints`' entries from taking new flows (flows already at the edge stay).
///
/// # Errors
/// Writing an entry failed (the ones before it are draining).
pub fn drain(engine: &mut Engine, endpoints: &[Endpoint]) -> Result<(), EngineError> {
    let _lock = crate::engine::lock(engine.pins())?;
    for ep in endpoints {
        engine.update_flags(ep, |f| f | TARGET_F_DRAINING)?;
    }
    Ok(())
}

/// Ends the drain of `endpoints`' entries: they take new flows again.
///
/// # Errors
/// Writing an entry failed (the ones before it take new flows again).
pub fn undrain(engine: &mut Engine, endpoints: &[Endpoint]) -> Result<(), EngineError> {
    let _lock = crate::engine::lock(engine.pins())?;
    for ep in endpoints {
        engine.update_flags(ep, |f| f & !TARGET_F_DRAINING)?;
    }
    Ok(())
}

/// Drains `endpoints`' entries ([`drain`]; an entry that cannot be drained is skipped) and
/// waits, polling every 100 ms with the lock held only to look, until their edge flows have
/// ended or `timeout` has passed. Returns the edge flows still open at the end (0: all
/// ended). A zero `timeout` drains and returns at once.
pub async fn drain_and_wait(
    engine: &tokio::sync::Mutex<Engine>,
    endpoints: &[Endpoint],
    timeout: Duration,
) -> u64 {
    for ep in endpoints {
        let _ = drain(&mut *engine.lock().await, std::slice::from_ref(ep));
    }
    let deadline = Instant::now() + timeout;
    loop {
        let live = live_flows(&*engine.lock().await, endpoints);
        if live == 0 || Instant::now() >= deadline {
            return live;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// An error with its causes, on one line (like anyhow's `{:#}`).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}
