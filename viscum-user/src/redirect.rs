//! Redirect entries together with their side effects in service namespaces.
//!
//! An entry into a Viscum namespace (`--ns NAME`) needs a `local ADDR dev lo`
//! route inside that namespace so the unmodified service accepts traffic for
//! the cloud address and answers from it. The route is added before the map
//! entry (so the first redirected packet already finds it) and removed with
//! the last entry for that address. The kernel is the only state: which
//! namespace an entry goes to is read back from its target ifindex.

use std::net::IpAddr;

use viscum_common::{TARGET_F_PEER, TARGET_F_SET_MAC};

use crate::{
    endpoint::Endpoint,
    engine::{Engine, EngineError, EntryView, attach::kernel_at_least},
    netns::{self, NetnsError},
};

/// Where a redirect sends its packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A namespace made by `viscum ns add`: Viscum manages its local routes.
    Namespace(String),
    /// The host side of any veth pair; the peer namespace's routes are the user's business.
    Veth(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("interface {name} is not a veth (it is {kind}): redirect targets must be the host side of a veth pair")]
    NotVeth { name: String, kind: String },
}

/// An entry as shown by `redirect list` and `stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EntryRow {
    #[serde(rename = "match")]
    pub endpoint: String,
    pub proto: String,
    pub addr: IpAddr,
    /// `None` = every port.
    pub port: Option<u16>,
    /// Host-side interface the entry redirects to.
    pub target: String,
    pub ifindex: u32,
    /// The Viscum namespace behind `target`, if it is one.
    pub ns: Option<String>,
    pub peer_redirect: bool,
    pub packets: u64,
    pub bytes: u64,
}

/// Resolved target: ifindex, flags and peer MAC, plus the namespace if Viscum owns it.
struct Resolved {
    ifindex: u32,
    flags: u32,
    mac: [u8; 6],
    ns: Option<String>,
}

async fn resolve(target: &Target) -> Result<Resolved, RedirectError> {
    // bpf_redirect_peer exists from 5.10; older kernels take the slower
    // redirect to the host veth's egress (with the MAC rewritten).
    let peer = if kernel_at_least(5, 10) { TARGET_F_PEER } else { 0 };
    match target {
        Target::Namespace(name) => {
            netns::validate_name(name)?;
            let ns = netns::service_ns_get(name).await?;
            Ok(Resolved { ifindex: ns.host_ifindex, flags: peer | TARGET_F_SET_MAC, mac: ns.ns_mac, ns: Some(ns.name) })
        }
        Target::Veth(ifname) => {
            crate::engine::ifindex(ifname)?;
            let handle = netns::handle_here().await?;
            let link = netns::link_by_name(&handle, ifname).await?;
            if link.kind.as_deref() != Some("veth") {
                return Err(RedirectError::NotVeth {
                    name: ifname.clone(),
                    kind: link.kind.unwrap_or_else(|| "a device without a kind".into()),
                });
            }
            // If it happens to be one of ours we know the peer's MAC; for a
            // foreign veth we rely on the kernel (>= 6.15 marks peer-redirected
            // frames PACKET_HOST) and skip the rewrite.
            let ns = netns::service_ns_by_host_ifindex(link.index).await?;
            let (flags, mac) = match &ns {
                Some(name) => (peer | TARGET_F_SET_MAC, netns::service_ns_get(name).await?.ns_mac),
                None => (peer, [0; 6]),
            };
            Ok(Resolved { ifindex: link.index, flags, mac, ns: None })
        }
    }
}

/// Adds a redirect entry. Validates everything first; on failure nothing changed.
pub async fn add(engine: &mut Engine, endpoint: &Endpoint, target: &Target) -> Result<(), RedirectError> {
    if engine.get(endpoint)?.is_some() {
        return Err(EngineError::Duplicate(endpoint.to_string()).into());
    }
    let r = resolve(target).await?;
    let mut added_route = false;
    if let Some(ns) = &r.ns {
        let had = has_local_route(ns, endpoint).await?;
        if !had {
            netns::service_ns_add_local(ns, endpoint.addr, endpoint.host_prefix()).await?;
            added_route = true;
        }
    }
    if let Err(e) = engine.insert(endpoint, r.ifindex, r.flags, r.mac) {
        if added_route && let Some(ns) = &r.ns {
            let _ = netns::service_ns_del_local(ns, endpoint.addr, endpoint.host_prefix()).await;
        }
        return Err(e.into());
    }
    Ok(())
}

async fn has_local_route(ns: &str, endpoint: &Endpoint) -> Result<bool, RedirectError> {
    let want = format!("{}/{}", endpoint.addr, endpoint.host_prefix());
    Ok(netns::service_ns_get(ns).await?.local_routes.iter().any(|r| *r == want))
}

/// Deletes a redirect entry, and the namespace's local route if no other
/// entry into that namespace needs the address any more.
pub async fn del(engine: &mut Engine, endpoint: &Endpoint) -> Result<(), RedirectError> {
    let Some(entry) = engine.get(endpoint)? else {
        return Err(EngineError::NoSuchEntry(endpoint.to_string()).into());
    };
    engine.remove(endpoint)?;
    release_route(engine, &entry).await
}

async fn release_route(engine: &Engine, removed: &EntryView) -> Result<(), RedirectError> {
    let Some(ns) = netns::service_ns_by_host_ifindex(removed.ifindex).await? else {
        return Ok(());
    };
    let still_needed = engine
        .entries()?
        .iter()
        .any(|e| e.ifindex == removed.ifindex && e.endpoint.addr == removed.endpoint.addr);
    if !still_needed {
        netns::service_ns_del_local(&ns, removed.endpoint.addr, removed.endpoint.host_prefix()).await?;
    }
    Ok(())
}

/// Removes every entry that redirects into `ifindex` (a namespace going away).
pub async fn del_all_to(engine: &mut Engine, ifindex: u32) -> Result<Vec<Endpoint>, RedirectError> {
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
pub async fn list(engine: &Engine) -> Result<Vec<EntryRow>, RedirectError> {
    let handle = netns::handle_here().await?;
    let mut rows = Vec::new();
    for e in engine.entries()? {
        let target = match netns::link_by_index(&handle, e.ifindex).await {
            Ok(l) => l.name,
            Err(_) => format!("<gone: ifindex {}>", e.ifindex),
        };
        let ns = target.strip_prefix(netns::HOST_VETH_PREFIX).map(str::to_owned);
        rows.push(EntryRow {
            endpoint: e.endpoint.to_string(),
            proto: e.endpoint.proto.to_string(),
            addr: e.endpoint.addr,
            port: e.endpoint.port,
            target,
            ifindex: e.ifindex,
            ns,
            peer_redirect: e.flags & TARGET_F_PEER != 0,
            packets: e.packets,
            bytes: e.bytes,
        });
    }
    Ok(rows)
}
