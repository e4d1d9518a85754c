//! Redirect entries whose target interface went away, and came back.
//!
//! Entries name their target by ifindex. When the target veth is deleted (`ip link del`,
//! `ip netns del` of a namespace nothing else holds, a container runtime re-creating its
//! pair), the ifindex is dead: the datapath sends the entry's traffic to the cloud (a check
//! in the classifier). Interface indexes are never handed out again soon, so a re-created
//! veth of the same name has a new one, and nothing in the kernel links the two.
//!
//! [`crate::engine::attach::attach_reply`] records the name behind each target ifindex when
//! an entry is added; [`recover_targets`] uses it to re-point an entry whose target is gone at
//! the interface that now has that name, with everything a fresh `viscum redirect add` sets up
//! (reply classifier, the namespace's local routes). Entries follow their target's *name*.
//!
//! Who calls it: `viscum run` on every link event, so recovery needs no command; without a
//! daemon, `viscum attach` (any interface) and `viscum ns add NAME` (entries into NAME).

use std::{collections::HashSet, net::IpAddr, time::Duration};

use viscum_common::{TARGET_F_DRAINING, TARGET_F_MIRROR, TARGET_F_NAT};

use crate::{
    endpoint::Endpoint,
    engine::{self, Engine, EngineError, EntryView},
    netns,
    redirect::{self, NatTarget, RedirectOptions, Target},
    spec::Mode,
};

/// An entry whose target interface no longer exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoneTarget {
    /// The entry's match.
    pub endpoint: Endpoint,
    /// The dead ifindex the entry still points at.
    pub ifindex: u32,
    /// The target's name when the entry was added, if recorded (entries of older versions
    /// have none and cannot be recovered by name).
    pub name: Option<String>,
}

/// An entry re-pointed at a re-created target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The entry's match.
    pub endpoint: Endpoint,
    /// The target's name (`vh-NAME` for a service namespace).
    pub target: String,
    /// The dead ifindex the entry pointed at before.
    pub old_ifindex: u32,
    /// The ifindex of the interface that now has the name, which the entry points at.
    pub new_ifindex: u32,
}

/// What [`recover_targets`] did.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Entries re-pointed at their re-created target.
    pub recovered: Vec<Recovered>,
    /// Still gone: no interface of the recorded name (yet), the name is unknown, or the
    /// namespace behind it is not complete yet.
    pub waiting: Vec<GoneTarget>,
    /// Re-pointing failed; the entry was put back as it was. (Entry, error chain.)
    pub failed: Vec<(Endpoint, String)>,
}

/// Does interface index `ifindex` exist in this thread's network namespace?
pub fn ifindex_alive(ifindex: u32) -> bool {
    crate::engine::interface_name(ifindex).is_some()
}

/// Entries whose target interface is gone, with the name it had.
///
/// # Errors
/// Reading the maps failed.
pub fn gone_targets(engine: &Engine) -> Result<Vec<GoneTarget>, EngineError> {
    Ok(engine
        .entries()?
        .into_iter()
        .filter(|e| !ifindex_alive(e.ifindex))
        .map(|e| GoneTarget {
            endpoint: e.endpoint,
            ifindex: e.ifindex,
            name: engine::attach::target_name(engine.pins(), e.ifindex),
        })
        .collect())
}

/// Re-points every entry whose target is gone at the interface that now carries the
/// target's recorded name, except targets `skip` claims (the daemon's own service veths,
/// whose entries their service task manages, health-gated).
///
/// Per entry: the old entry is removed and the same match re-added through
/// [`redirect::add_with`] with the same mode (NAT address and port, mirror), so the reply
/// classifier and, for a service namespace, its local route are set up again; a draining
/// entry stays draining. Counters restart from zero. UDP entries get the usual learning
/// period, so datagram flows that went to the cloud while the target was gone stay there. If
/// re-adding fails, the old entry is put back (its traffic keeps going to the cloud) and
/// the failure reported; the next call tries again.
///
/// # Errors
/// Reading the maps failed; failures of single entries are in [`Recovery::failed`].
pub async fn recover_targets(
    engine: &mut Engine,
    skip: &(dyn Fn(&str) -> bool + Sync),
) -> Result<Recovery, EngineError> {
    // Which entries are gone and re-pointing them, as one change (see `engine::lock`).
    let _lock = engine::lock(engine.pins())?;
    let mut report = Recovery::default();
    let (gone, alive): (Vec<EntryView>, Vec<EntryView>) = engine
        .entries()?
        .into_iter()
        .partition(|e| !ifindex_alive(e.ifindex));
    // Nothing gone, nothing re-pointed: the scan above already names every referenced
    // target. Scanning again read every entry's per-CPU value a second time under the
    // engine and the write lock (tens of ms among 10k entries, every `LINK_RECHECK`), which
    // a `redirect add` arriving then at a daemon, or from the CLI, waited out.
    let unchanged = gone
        .is_empty()
        .then(|| alive.iter().map(|e| e.ifindex).collect::<HashSet<u32>>());
    for old in gone {
        let waiting = GoneTarget {
            endpoint: old.endpoint,
            ifindex: old.ifindex,
            name: engine::attach::target_name(engine.pins(), old.ifindex),
        };
        let Some(name) = waiting.name.clone() else {
            report.waiting.push(waiting);
            continue;
        };
        if skip(&name) {
            continue;
        }
        let Ok(new_ifindex) = nix::net::if_::if_nametoindex(name.as_str()) else {
            report.waiting.push(waiting);
            continue;
        };
        let Some(target) = target_for(&name).await else {
            report.waiting.push(waiting);
            continue;
        };
        match repoint(engine, &old, &target).await {
            Ok(()) => report.recovered.push(Recovered {
                endpoint: old.endpoint,
                target: name,
                old_ifindex: old.ifindex,
                new_ifindex,
            }),
            Err(e) => report.failed.push((old.endpoint, e)),
        }
    }
    let referenced = match unchanged {
        Some(r) => r,
        None => engine.entries()?.iter().map(|e| e.ifindex).collect(),
    };
    engine::attach::prune_targets(engine.pins(), &referenced);
    Ok(report)
}

/// What `name` is as a redirect target now: a Viscum service namespace's host veth
/// (`vh-NAME` with `/run/netns/NAME`), or any other veth. `None` while a service namespace
/// of that name is still being built (its veth exists before its addresses and routes do).
async fn target_for(name: &str) -> Option<Target> {
    let ns = name
        .strip_prefix(netns::HOST_VETH_PREFIX)
        .filter(|ns| netns::validate_name(ns).is_ok() && netns::named_exists(ns));
    match ns {
        Some(ns) => {
            let complete = netns::service_ns_check(ns).await.is_ok();
            complete.then(|| Target::Namespace(ns.to_owned()))
        }
        None => Some(Target::Veth(name.to_owned())),
    }
}

/// The options that re-create `old`'s mode.
fn options_of(old: &EntryView, target: &Target) -> RedirectOptions {
    let nat = (old.flags & TARGET_F_NAT != 0).then(|| {
        let addr = match old.endpoint.addr {
            IpAddr::V4(_) => {
                let b = &old.target.nat_addr;
                IpAddr::from([b[0], b[1], b[2], b[3]])
            }
            IpAddr::V6(_) => IpAddr::from(old.target.nat_addr),
        };
        // NAT to "the namespace's own address" stored that address; a re-created namespace
        // may have another one, so let it be derived again.
        let derived = matches!((target, addr), (Target::Namespace(_), IpAddr::V4(a))
            if in_link_pool(a))
            || matches!((target, addr), (Target::Namespace(_), IpAddr::V6(a))
            if a.segments()[..6] == netns::ULA_PREFIX);
        let port = u16::from_be(old.target.nat_port);
        NatTarget {
            addr: (!derived).then_some(addr),
            port: (port != 0).then_some(port),
        }
    });
    let mode = match nat {
        Some(to) => Mode::Nat { to },
        None if old.flags & TARGET_F_MIRROR != 0 => Mode::Mirror,
        None => Mode::AnyIp,
    };
    RedirectOptions {
        mode,
        learn: None::<Duration>,
    }
}

fn in_link_pool(a: std::net::Ipv4Addr) -> bool {
    let (pool, len) = netns::LINK_POOL;
    let mask = u32::MAX << (32 - u32::from(len));
    u32::from(a) & mask == u32::from(pool)
}

/// Replaces `old` by the same match into `target`; puts `old` back on failure.
async fn repoint(engine: &mut Engine, old: &EntryView, target: &Target) -> Result<(), String> {
    let chain = |e: &(dyn std::error::Error + 'static)| crate::daemon::service::error_chain(e);
    let opts = options_of(old, target);
    engine.remove(&old.endpoint).map_err(|e| chain(&e))?;
    match redirect::add_with(engine, &old.endpoint, target, &opts).await {
        Ok(()) => {
            if old.flags & TARGET_F_DRAINING != 0 {
                engine
                    .update_flags(&old.endpoint, |f| f | TARGET_F_DRAINING)
                    .map_err(|e| chain(&e))?;
            }
            Ok(())
        }
        Err(e) => {
            let why = chain(&e);
            if let Err(e) = engine.insert(&old.endpoint, old.target) {
                return Err(format!(
                    "{why}; and the old entry could not be put back: {}",
                    chain(&e)
                ));
            }
            Err(why)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pool_addresses_are_recognised() {
        assert!(in_link_pool("169.254.128.2".parse().unwrap()));
        assert!(in_link_pool("169.254.255.254".parse().unwrap()));
        assert!(!in_link_pool("169.254.1.2".parse().unwrap()));
        assert!(!in_link_pool("10.0.0.2".parse().unwrap()));
    }
}
