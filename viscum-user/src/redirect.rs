//! Redirect entries together with their side effects in service namespaces.
//!
//! An entry into a Viscum namespace (`--ns NAME`) translates by default: the
//! classifier rewrites each redirected packet's destination to the
//! namespace's own address (same port) and the reply path restores the cloud
//! address on the way back, so the namespace needs no route for the cloud
//! address. That keeps every other port of the cloud address reachable from
//! the edge copy (it can talk to its origin) and lets UDP servers that
//! `connect()` back to a client work unmodified; see "How a service answers as
//! the cloud address" in `docs/architecture.md`.
//!
//! AnyIP mode (`--anyip`, and mirror mode, whose clones keep the cloud
//! address) instead needs a `local ADDR dev lo` route inside the namespace so
//! the unmodified service accepts traffic for the cloud address and answers
//! from it. The route is added before the map entry (so the first redirected
//! packet already finds it) and removed with the last entry for that address.
//! The kernel is the only state: which namespace an entry goes to is read
//! back from its target ifindex.

pub mod request;

use std::{net::IpAddr, time::Duration};

use viscum_common::{
    ServiceEntry, TARGET_F_DRAINING, TARGET_F_MIRROR, TARGET_F_NAT, TARGET_F_PEER, TARGET_F_SET_MAC,
};

use crate::{
    endpoint::{Endpoint, Proto},
    engine::{self, Engine, EngineError, EntryView},
    netns::{self, NetnsError},
    spec::Mode,
};

/// How an entry treats its traffic beyond "redirect to the target": the per-entry part of a
/// [`crate::spec::RedirectSpec`] (which validates it; build it with
/// [`crate::spec::RedirectSpec::options`] or [`RedirectOptions::for_target`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedirectOptions {
    /// AnyIP, NAT (to the namespace's own address, or `nat_to`) or mirror.
    pub mode: Mode,
    /// Learning period before new flows go to the edge (`None` = the
    /// default: 0 for TCP, whose SYN marks new flows; 1 s for UDP, so
    /// datagram flows already talking to the cloud are recognised first).
    pub learn: Option<Duration>,
}

impl RedirectOptions {
    /// The target's default mode ([`Mode::default_for`]) and the default learning period.
    pub fn for_target(target: &Target) -> RedirectOptions {
        RedirectOptions {
            mode: Mode::default_for(target),
            learn: None,
        }
    }
}

/// The service's own address for NAT mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatTarget {
    /// The address packets are rewritten to (`None`: the namespace's own address of the
    /// match's family; required for a `--to` veth target).
    pub addr: Option<IpAddr>,
    /// The port, host byte order (`None`: each packet keeps its destination port).
    pub port: Option<u16>,
}

/// Default learning period for UDP entries.
pub const UDP_LEARN: Duration = Duration::from_secs(1);

/// Where a redirect sends its packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A namespace made by `viscum ns add`: Viscum manages its local routes.
    Namespace(String),
    /// The host side of any veth pair; the peer namespace's routes are the user's business.
    Veth(String),
}

/// Why an entry could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// A map or attach operation failed (not attached, duplicate, full, no such entry).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The target namespace or veth could not be found, or a namespace route failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A `--to` target exists but is not a veth (its rtnetlink kind is another).
    #[error(
        "interface {name} is not a veth (it is {kind}): redirect targets must be the host side of a veth pair"
    )]
    NotVeth {
        /// The interface given.
        name: String,
        /// Its rtnetlink `IFLA_INFO_KIND` (`bridge`, `dummy`, ...), or
        /// `a device without a kind`.
        kind: String,
    },
    /// NAT of an IPv6 match into a `--to` veth without `--nat-to`: there is no
    /// namespace address to default to.
    #[error("NAT for {0} needs an explicit IPv6 service address (--nat-to [ADDR]:PORT)")]
    NatNeedsV6Address(String),
    /// NAT of an IPv6 match into a namespace that has no IPv6 address.
    #[error(
        "namespace {ns} has no IPv6 address to translate {endpoint} to (made by an older viscum: \
         re-create it with `viscum ns del/add`, or use --anyip)"
    )]
    NoNsAddress6 {
        /// The namespace name.
        ns: String,
        /// The match, as written.
        endpoint: String,
    },
    /// The `--nat-to` address is IPv4 for an IPv6 match, or the other way round.
    #[error("NAT address {nat} is not of the same family as {endpoint}")]
    NatFamily {
        /// The NAT address.
        nat: IpAddr,
        /// The match, as written.
        endpoint: String,
    },
    /// NAT of an IPv4 match into a `--to` veth without `--nat-to`: there is no
    /// namespace address to default to.
    #[error(
        "--nat-to needs a namespace target (--ns), or an address and a --to veth whose routes you manage"
    )]
    NatWithoutAddress,
    /// The namespace's veth has no IPv4 address from Viscum's link pool (removed by hand?).
    #[error("namespace {ns} has no usable IPv4 address ({addr}) to NAT to")]
    NoNsAddress {
        /// The namespace name.
        ns: String,
        /// What was found instead (empty: none).
        addr: String,
    },
    /// An entry for the match is still draining from an interrupted delete.
    #[error(
        "an entry for {0} exists and is draining (a `redirect del` was interrupted): wait for its \
         edge flows to end, or delete it at once with `viscum redirect del --now`"
    )]
    Draining(String),
}

/// An entry as shown by `redirect list` and `stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EntryRow {
    /// The match as written (`tcp://198.51.100.7:443`); `match` in JSON.
    #[serde(rename = "match")]
    pub endpoint: String,
    /// `tcp` or `udp`.
    pub proto: String,
    /// The destination address (a prefix's network address).
    pub addr: IpAddr,
    /// `None` = every port; for a range, its first port.
    pub port: Option<u16>,
    /// Host-side interface the entry redirects to.
    pub target: String,
    /// The target interface no longer exists: the cloud serves this match until it is back
    /// (`viscum attach`, `viscum ns add` or the daemon re-point the entry).
    pub target_gone: bool,
    /// The target's ifindex, in the classifier's namespace.
    pub ifindex: u32,
    /// The Viscum namespace behind `target`, if it is one.
    pub ns: Option<String>,
    /// Redirected with `bpf_redirect_peer` straight into the namespace (kernel >= 5.10);
    /// `false`: to the host veth's egress, MAC rewritten.
    pub peer_redirect: bool,
    /// "anyip", "nat" or "mirror" ([`Mode::name`]).
    pub mode: &'static str,
    /// NAT mode: where the service really listens.
    pub nat_to: Option<String>,
    /// The entry takes no new flows.
    pub draining: bool,
    /// Packets redirected, summed over CPUs.
    pub packets: u64,
    /// Bytes redirected (L2 length at ingress), summed over CPUs.
    pub bytes: u64,
    /// Flows started at the edge by this entry.
    pub edge_flows: u64,
    /// Matched flows that went to the cloud (learning/draining).
    pub cloud_flows: u64,
    /// Edge flows still alive in the flow table.
    pub live_flows: u64,
}

/// Resolved target: ifindex, flags and peer MAC, plus the namespace if Viscum owns it.
struct Resolved {
    ifindex: u32,
    ifname: String,
    flags: u32,
    mac: [u8; 6],
    ns: Option<netns::ServiceNs>,
    /// The target veth's `IFLA_LINK_NETNSID` (the peer's namespace), read with the link.
    peer_netnsid: Option<i32>,
}

async fn resolve(target: &Target) -> Result<Resolved, RedirectError> {
    let flags = crate::features::entry_redirect_flags();
    let (peer, set_mac) = (flags & TARGET_F_PEER, flags & TARGET_F_SET_MAC);
    match target {
        Target::Namespace(name) => {
            netns::validate_name(name)?;
            // Complete, or refused: a half-made namespace (a `viscum ns add` killed half-way)
            // would swallow what is redirected into it.
            let (ns, peer_netnsid) = netns::service_ns_check_for_redirect(name).await?;
            Ok(Resolved {
                ifindex: ns.host_ifindex,
                ifname: ns.host_veth.clone(),
                flags: peer | set_mac,
                mac: ns.ns_mac,
                ns: Some(ns),
                peer_netnsid,
            })
        }
        Target::Veth(ifname) => {
            crate::engine::ifindex(ifname)?;
            let handle = netns::handle_here().await?;
            let link = netns::link_by_name(&handle, ifname).await?;
            if link.kind.as_deref() != Some("veth") {
                return Err(RedirectError::NotVeth {
                    name: ifname.clone(),
                    kind: link
                        .kind
                        .unwrap_or_else(|| "a device without a kind".into()),
                });
            }
            // If it happens to be one of ours we know the peer's MAC, and the namespace
            // gets the local route its mode needs, as with `--ns` (without it an AnyIP
            // entry into a Viscum namespace would deliver to an address nobody there
            // answers). For a foreign veth its routes are its owner's, and its peer's MAC is
            // unknown: a peer redirect still gets the PACKET_HOST mark (it needs no MAC),
            // a plain one goes without the rewrite.
            let ns = match netns::service_ns_by_host_ifindex(link.index).await? {
                Some(name) => Some(netns::service_ns_check_for_redirect(&name).await?.0),
                None => None,
            };
            let (flags, mac) = match &ns {
                Some(ns) => (peer | set_mac, ns.ns_mac),
                None if peer != 0 => (peer | set_mac, [0; 6]),
                None => (peer, [0; 6]),
            };
            Ok(Resolved {
                ifindex: link.index,
                ifname: link.name,
                flags,
                mac,
                ns,
                peer_netnsid: link.link_netnsid,
            })
        }
    }
}

/// Adds a redirect entry in the target's default mode ([`RedirectOptions::for_target`]).
///
/// # Errors
/// As [`add_with`].
pub async fn add(
    engine: &mut Engine,
    endpoint: &Endpoint,
    target: &Target,
) -> Result<(), RedirectError> {
    add_with(
        engine,
        endpoint,
        target,
        &RedirectOptions::for_target(target),
    )
    .await
}

/// The `local` route a namespace needs for an entry: the cloud address or
/// prefix (AnyIP), or the NAT address.
fn local_route(endpoint: &Endpoint, entry: &ServiceEntry) -> (IpAddr, u8) {
    if entry.flags & TARGET_F_NAT != 0 {
        let a = addr_from_key(&entry.nat_addr, endpoint.addr);
        (a, prefix_of(a))
    } else {
        (endpoint.addr, endpoint.prefix_len)
    }
}

fn addr_from_key(bytes: &[u8; 16], like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]),
        IpAddr::V6(_) => IpAddr::from(*bytes),
    }
}

fn prefix_of(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// Adds a redirect entry: the target and the options are checked before the reply path,
/// the namespace's local route and the entry are set up, in that order.
///
/// # Errors
/// [`RedirectError::Netns`] if the target namespace or veth is missing;
/// [`RedirectError::NotVeth`]; [`RedirectError::Draining`] or
/// [`EngineError::Duplicate`] if a live entry has this match; the NAT errors
/// ([`RedirectError::NatWithoutAddress`], [`RedirectError::NatFamily`], ...); then
/// [`RedirectError::Engine`] if attaching the reply path or inserting fails (a local route
/// added for the entry is removed again). An entry whose target is gone is replaced
/// before the NAT checks, so it stays deleted if they fail.
pub async fn add_with(
    engine: &mut Engine,
    endpoint: &Endpoint,
    target: &Target,
    opts: &RedirectOptions,
) -> Result<(), RedirectError> {
    // One writer from the first read to the last write: the check for an existing entry,
    // the local route and the reply path another writer's delete could otherwise release
    // between our check and our insert (see `engine::lock`).
    let _lock = engine::lock(engine.pins())?;
    let r = resolve(target).await?;
    if let Some(old) = engine.get(endpoint)? {
        if old.flags & TARGET_F_DRAINING != 0 && crate::lifecycle::ifindex_alive(old.ifindex) {
            return Err(RedirectError::Draining(endpoint.to_string()));
        }
        if crate::lifecycle::ifindex_alive(old.ifindex) {
            return Err(EngineError::Duplicate(endpoint.to_string()).into());
        }
        // Its target is gone: the entry serves nobody, so adding the match
        // again replaces it (what a user re-running `redirect add` means).
        del(engine, endpoint).await?;
    }
    let mut entry = ServiceEntry::new(r.ifindex, r.flags, r.mac);
    // Lets the classifier ask the service's stack about a TCP packet whose flow record
    // was evicted (see `ServiceEntry::peer_netns`); without one it only falls back to
    // the cloud, as before.
    // The id comes with the target's link, read by `resolve`: no second request.
    entry.peer_netns = r
        .peer_netnsid
        .and_then(|id| u32::try_from(id).ok())
        .map_or(0, |id| id + 1);
    if opts.mode == Mode::Mirror {
        entry.flags |= TARGET_F_MIRROR;
    }
    // AnyIP and mirror keep the cloud address; NAT (the default into a Viscum
    // namespace) translates to the service's own.
    if let Mode::Nat { to: nat } = opts.mode {
        let addr = match (nat.addr, &r.ns, endpoint.addr) {
            (Some(a), _, _) => a,
            (None, Some(ns), IpAddr::V4(_)) => {
                let a = ns.ns_addr.split('/').next().unwrap_or_default();
                a.parse().map_err(|_| RedirectError::NoNsAddress {
                    ns: ns.name.clone(),
                    addr: ns.ns_addr.clone(),
                })?
            }
            (None, Some(ns), IpAddr::V6(_)) => {
                let a = ns.ns_addr6.split('/').next().unwrap_or_default();
                a.parse().map_err(|_| RedirectError::NoNsAddress6 {
                    ns: ns.name.clone(),
                    endpoint: endpoint.to_string(),
                })?
            }
            (None, None, IpAddr::V6(_)) => {
                return Err(RedirectError::NatNeedsV6Address(endpoint.to_string()));
            }
            (None, None, _) => return Err(RedirectError::NatWithoutAddress),
        };
        if addr.is_ipv4() != endpoint.addr.is_ipv4() {
            return Err(RedirectError::NatFamily {
                nat: addr,
                endpoint: endpoint.to_string(),
            });
        }
        entry.flags |= TARGET_F_NAT;
        let key = Endpoint { addr, ..*endpoint }.key();
        entry.nat_addr = key.addr;
        // 0 keeps each packet's own port: right for ranges and all-ports entries.
        entry.nat_port = nat.port.unwrap_or(0).to_be();
    }
    let learn = opts.learn.unwrap_or(if endpoint.proto == Proto::Udp {
        UDP_LEARN
    } else {
        Duration::ZERO
    });
    if !learn.is_zero() {
        entry.active_after_ns = crate::engine::maps::monotonic_ns() + learn.as_nanos() as u64;
    }

    // Side effects, in an order that never exposes a half-made entry: the
    // reply path and the local route exist before the first packet can be
    // redirected.
    if !reply_path_in_place(engine.pins(), &r.ifname, r.ifindex) {
        engine::attach_reply(engine.pins(), &r.ifname)?;
    }
    let mut added_route = None;
    if let Some(ns) = &r.ns {
        let (addr, len) = local_route(endpoint, &entry);
        let own = |a: &str| a.split('/').next() == Some(addr.to_string().as_str());
        // NAT to the namespace's own address (the default) needs no route, and then nothing
        // here enters the namespace; the other modes read its routes (the check above left
        // them out) and add theirs through the same socket inside.
        if !own(&ns.ns_addr) && !own(&ns.ns_addr6) {
            let inside = netns::handle_in(&ns.name).await?;
            if !netns::list_local_routes(&inside)
                .await?
                .contains(&(addr, len))
            {
                netns::add_local_route(&inside, addr, len).await?;
                added_route = Some((ns.name.clone(), addr, len));
            }
        }
    }
    if let Err(e) = engine.insert(endpoint, entry) {
        if let Some((ns, addr, len)) = added_route {
            let _ = netns::service_ns_del_local(&ns, addr, len).await;
        }
        return Err(e.into());
    }
    Ok(())
}

/// Whether [`engine::attach_reply`] has run to its end for this very interface: its link
/// (or clsact record) is pinned and its last step recorded `ifname` as the name of `ifindex`
/// ([`engine::attach::target_name`]). A veth re-created under the same name has another
/// ifindex, so it is attached again. Checked here because the reply path stays on a service
/// veth from the first entry into it until its namespace goes (see [`release_reply_path`]),
/// and re-attaching it for every entry cost the critical path of each `redirect add` some
/// forty system calls (every map of the layout check, the pinned program, the TCX query;
/// in a fresh process also aya's feature probes): more than half of what the daemon spends
/// on a request, before the entry can take effect (B7).
fn reply_path_in_place(pins: &engine::Pins, ifname: &str, ifindex: u32) -> bool {
    pins.reply_link(ifname).exists()
        && engine::attach::target_name(pins, ifindex).as_deref() == Some(ifname)
}

/// [`del`], where an entry that is gone already counts as deleted.
///
/// # Errors
/// As [`del`], except for a missing entry.
pub async fn del_if_present(engine: &mut Engine, endpoint: &Endpoint) -> Result<(), RedirectError> {
    match del(engine, endpoint).await {
        Ok(()) | Err(RedirectError::Engine(EngineError::NoSuchEntry(_))) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes a redirect entry, and the namespace's local route if no other
/// entry into that namespace needs the address any more.
///
/// # Errors
/// [`EngineError::NoSuchEntry`] (as [`RedirectError::Engine`]) if there is none; map,
/// netlink or detach errors after the entry itself is deleted leave its route or reply
/// path behind.
pub async fn del(engine: &mut Engine, endpoint: &Endpoint) -> Result<(), RedirectError> {
    // Held until the route and the reply path are released: a concurrent add that still
    // finds them in place must not have them taken away after its check.
    let _lock = engine::lock(engine.pins())?;
    let Some(entry) = engine.get(endpoint)? else {
        return Err(EngineError::NoSuchEntry(endpoint.to_string()).into());
    };
    engine.remove(endpoint)?;
    // Its flows are over (drained, or cut): they must neither count as open
    // nor decide for a later entry of the same match.
    engine.forget_flows(endpoint, entry.ifindex)?;
    release_route(engine, &entry).await?;
    release_reply_path(engine, entry.ifindex).await
}

/// Detaches the reply classifier from a `--to` target no entry uses any more (a veth
/// Viscum does not own would otherwise keep it, seeing every packet it carries).
///
/// The host veth of a Viscum service namespace keeps it until the namespace is deleted
/// (`viscum ns del`, or the daemon removing its service): creating a TCX link waits for an
/// RCU grace period (`tcx_entry_sync()` in kernel/bpf/tcx.c), milliseconds that would
/// otherwise be paid again by the next `redirect add` into the namespace, or by every
/// health flap of a daemon's service; the namespace's own traffic meanwhile costs the
/// program one flow-table miss.
async fn release_reply_path(engine: &Engine, ifindex: u32) -> Result<(), RedirectError> {
    // The namespace test first: it is one netlink request, where the entries' scan reads
    // every entry's per-CPU value (74 ms of a `redirect del` among 10k entries).
    if netns::service_ns_by_host_ifindex(ifindex).await?.is_some() {
        return Ok(());
    }
    if engine.entries()?.iter().any(|e| e.ifindex == ifindex) {
        return Ok(());
    }
    let handle = netns::handle_here().await?;
    if let Ok(link) = netns::link_by_index(&handle, ifindex).await {
        engine::detach_reply(engine.pins(), &link.name)?;
    }
    Ok(())
}

async fn release_route(engine: &Engine, removed: &EntryView) -> Result<(), RedirectError> {
    let Some(ns) = netns::service_ns_by_host_ifindex(removed.ifindex).await? else {
        return Ok(());
    };
    let route = local_route(&removed.endpoint, &removed.target);
    // Most entries have no route to release: NAT to the namespace's own address (the
    // default) adds none. One dump of the namespace's Viscum routes tells; the entries' scan
    // below reads every entry's per-CPU value (tens of ms of a `redirect del` among 10k
    // entries).
    let ours = netns::list_local_routes(&netns::handle_in(&ns).await?).await?;
    if !ours.contains(&route) {
        return Ok(());
    }
    let still_needed = engine
        .entries()?
        .iter()
        .any(|e| e.ifindex == removed.ifindex && local_route(&e.endpoint, &e.target) == route);
    if !still_needed {
        netns::service_ns_del_local(&ns, route.0, route.1).await?;
    }
    Ok(())
}

/// Removes every entry that redirects into `ifindex` (a namespace going away).
///
/// # Errors
/// [`RedirectError::Engine`] if reading or deleting fails; the entries before it are gone.
pub async fn del_all_to(engine: &mut Engine, ifindex: u32) -> Result<Vec<Endpoint>, RedirectError> {
    let _lock = engine::lock(engine.pins())?;
    let mut removed = Vec::new();
    for e in engine.entries()? {
        if e.ifindex == ifindex {
            engine.remove(&e.endpoint)?;
            removed.push(e.endpoint);
        }
    }
    Ok(removed)
}

/// Every entry with its target's name, for display.
///
/// # Errors
/// [`RedirectError::Netns`] if netlink cannot be opened; [`RedirectError::Engine`] if the
/// maps cannot be read.
pub async fn list(engine: &Engine) -> Result<Vec<EntryRow>, RedirectError> {
    let handle = netns::handle_here().await?;
    let entries = engine.entries()?;
    // One pass over the flow table for every entry's LIVE count.
    let live = engine.live_edge_flows(
        &entries
            .iter()
            .map(|e| (e.endpoint, e.ifindex))
            .collect::<Vec<_>>(),
    );
    let mut rows = Vec::new();
    for (e, live_flows) in entries.into_iter().zip(live) {
        let (target, target_gone) = match netns::link_by_index(&handle, e.ifindex).await {
            Ok(l) => (l.name, false),
            Err(_) => (
                match engine::attach::target_name(engine.pins(), e.ifindex) {
                    Some(name) => format!("{name} (target gone)"),
                    None => format!("<gone: ifindex {}>", e.ifindex),
                },
                true,
            ),
        };
        let ns = target
            .strip_prefix(netns::HOST_VETH_PREFIX)
            .map(str::to_owned);
        rows.push(EntryRow {
            endpoint: e.endpoint.to_string(),
            proto: e.endpoint.proto.to_string(),
            addr: e.endpoint.addr,
            port: e.endpoint.port,
            target,
            target_gone,
            ifindex: e.ifindex,
            ns,
            peer_redirect: e.flags & TARGET_F_PEER != 0,
            mode: if e.flags & TARGET_F_MIRROR != 0 {
                "mirror"
            } else if e.flags & TARGET_F_NAT != 0 {
                "nat"
            } else {
                "anyip"
            },
            nat_to: (e.flags & TARGET_F_NAT != 0).then(|| {
                let a = addr_from_key(&e.target.nat_addr, e.endpoint.addr);
                match (a, u16::from_be(e.target.nat_port)) {
                    (IpAddr::V4(a), 0) => a.to_string(),
                    (IpAddr::V6(a), 0) => format!("[{a}]"),
                    (IpAddr::V4(a), p) => format!("{a}:{p}"),
                    (IpAddr::V6(a), p) => format!("[{a}]:{p}"),
                }
            }),
            draining: e.flags & TARGET_F_DRAINING != 0,
            packets: e.packets,
            bytes: e.bytes,
            edge_flows: e.new_flows,
            cloud_flows: e.cloud_flows,
            live_flows,
        });
    }
    Ok(rows)
}
