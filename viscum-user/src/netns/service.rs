//! The viscum service namespace: what `viscum ns add/del/list` manages.
//!
//! A service namespace `NAME` is a named network namespace plus a veth pair: `vh-NAME` in the
//! edge box's namespace (the one viscum runs in) and `eth0` inside. The classifier redirects
//! matching packets to `vh-NAME`'s peer, so `eth0` gets a fixed MAC derived from the name that
//! the classifier can write as destination. The pair is numbered from 169.254.128.0/17, one
//! /30 per namespace (host `.1`, namespace `.2`) plus `fe80::1`/`fe80::2`, and the namespace
//! routes everything back through the host side.
//!
//! A service answers as a cloud address through `local` routes on the namespace's loopback
//! ([`service_ns_add_local`]); see "How a service answers as the cloud address" in
//! `docs/architecture.md`. Everything is read back from the kernel: there are no state files.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rtnetlink::Handle;
use serde::{Serialize, Serializer};

use super::{
    AddrInfo, LinkInfo, NetnsError, add_address, add_route,
    addr::list_addresses_at,
    create_named, create_veth, delete_link, delete_named, handle_here, handle_here_strict,
    handle_in,
    link::link_by_name_at,
    link_by_index, link_by_name, list_addresses, list_links, list_local_routes, named_exists,
    route::{add_local_route, del_local_route},
    set_up, sysctl_set,
};

/// Longest service namespace name: `vh-` plus the name must fit IFNAMSIZ (15 characters).
pub const MAX_NAME_LEN: usize = 12;

/// The host-side veth of namespace NAME is `vh-NAME`.
pub const HOST_VETH_PREFIX: &str = "vh-";

/// The namespace-side veth's name, inside the namespace.
pub const NS_VETH_NAME: &str = "eth0";

/// The IPv4 pool the veth pairs are numbered from (network, prefix length): the upper half of
/// the link-local range, which nothing routes beyond a link and DHCP-less hosts (autoip)
/// rarely reach.
pub const LINK_POOL: (Ipv4Addr, u8) = (Ipv4Addr::new(169, 254, 128, 0), 17);

/// Prefix length of one pair's IPv4 subnet.
const LINK_PREFIX: u8 = 30;

/// The IPv6 prefix the pairs' unique-local addresses (RFC 4193) come from: one /126 per
/// pair whose last 32 bits are the pair's IPv4 addresses (`fd76:6973:6375::169.254.128.2`),
/// so the two families' numbering can never disagree. Redirected IPv6 flows are translated
/// to the namespace's address here, as IPv4 flows are to its link address: a global-scope
/// source the namespace's stack will pick for replies and `connect()`s (a link-local one it
/// would not use towards a global client).
pub const ULA_PREFIX: [u16; 6] = [0xfd76, 0x6973, 0x6375, 0, 0, 0];
const ULA_PAIR_PREFIX: u8 = 126;

/// The ULA of a pair end whose IPv4 link address is `v4`.
pub fn pair_ula(v4: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d, e, f] = ULA_PREFIX;
    let v = u32::from(v4);
    Ipv6Addr::new(a, b, c, d, e, f, (v >> 16) as u16, v as u16)
}

/// IPv6 link-local addresses of the pair. Link-local scope means every pair may reuse them.
const HOST_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const NS_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);
const LL_PREFIX: u8 = 64;

/// A service namespace as the kernel shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceNs {
    /// The namespace name (`/run/netns/NAME`).
    pub name: String,
    /// The host-side veth, `vh-NAME`, in viscum's namespace.
    pub host_veth: String,
    /// Its ifindex: the classifier's redirect target.
    pub host_ifindex: u32,
    /// The veth inside the namespace ([`NS_VETH_NAME`]).
    pub ns_veth: String,
    /// Its MAC, which redirected frames must carry as destination.
    #[serde(serialize_with = "serialize_mac")]
    pub ns_mac: [u8; 6],
    /// Host side IPv4 address with prefix, e.g. "169.254.128.1/30"; empty if missing.
    pub host_addr: String,
    /// Namespace side IPv4 address with prefix, e.g. "169.254.128.2/30"; empty if missing.
    pub ns_addr: String,
    /// Namespace side IPv6 unique-local address with prefix (see [`ULA_PREFIX`]), e.g.
    /// "fd76:6973:6375::a9fe:8002/126"; empty if missing (a namespace made by an older
    /// viscum).
    pub ns_addr6: String,
    /// The cloud addresses/prefixes the namespace answers as, e.g. "198.51.100.7/32".
    pub local_routes: Vec<String>,
}

fn serialize_mac<S: Serializer>(mac: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_mac(mac))
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Checks a service namespace name: 1..=12 of `[a-z0-9_-]`, not starting with `-` (it would
/// read as an option on command lines).
///
/// # Errors
/// [`NetnsError::InvalidServiceName`] for any other name.
pub fn validate_name(name: &str) -> Result<(), NetnsError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(NetnsError::InvalidServiceName {
            name: name.to_string(),
        })
    }
}

/// The host-side veth name of namespace `name`.
pub fn host_veth_name(name: &str) -> String {
    format!("{HOST_VETH_PREFIX}{name}")
}

/// The MAC of the namespace-side veth: `02:` (locally administered, unicast) followed by 40
/// bits of FNV-1a over the name. Deterministic across runs and versions, so a restarted viscum
/// and the classifier agree on it without asking.
pub fn service_mac(name: &str) -> [u8; 6] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let h = hash.to_be_bytes();
    [0x02, h[0], h[1], h[2], h[3], h[4]]
}

/// The first /30 of [`LINK_POOL`] that no assigned address `used` (address, prefix) claims,
/// as its network address.
///
/// A /30 is taken when an assigned address lies in it, or when an assigned subnet at least as
/// narrow as the pool overlaps it (someone numbered part of the pool by hand). Broader subnets
/// such as an autoip `169.254.0.0/16` are ignored: they would otherwise fill the whole pool,
/// and the longer /30 routes win over them anyway.
pub fn allocate_link_subnet(used: &[(Ipv4Addr, u8)]) -> Option<Ipv4Addr> {
    let (pool, pool_prefix) = LINK_POOL;
    let pool = u32::from(pool);
    let block = 1u32 << (32 - LINK_PREFIX);
    let count = 1u32 << (LINK_PREFIX - pool_prefix);
    (0..count)
        .map(|i| pool + i * block)
        .find(|&start| {
            let end = start + block - 1;
            used.iter().all(|&(addr, prefix)| {
                let addr = u32::from(addr);
                if (start..=end).contains(&addr) {
                    return false;
                }
                if prefix < pool_prefix || prefix > 32 {
                    return true;
                }
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                let (net_start, net_end) = (addr & mask, addr | !mask);
                net_end < start || net_start > end
            })
        })
        .map(Ipv4Addr::from)
}

/// Creates service namespace `name`: the named namespace, the veth pair `vh-NAME`/`eth0` with
/// `eth0`'s MAC from [`service_mac`], the first free /30 of [`LINK_POOL`] (host `.1`,
/// namespace `.2`), `fe80::1`/`fe80::2`, default routes inside pointing at the host side, and
/// `net.ipv6.ip_nonlocal_bind=1` inside. Everything created is removed again if a later step
/// fails.
///
/// # Errors
/// [`NetnsError::InvalidServiceName`]; [`NetnsError::NamespaceExists`] or
/// [`NetnsError::InterfaceExists`] (`vh-NAME` taken) before anything is made;
/// [`NetnsError::NoFreeSubnet`] when every /30 of the pool is in use;
/// [`NetnsError::NamespaceOp`] when the host lock (`/run/viscum-netns.lock`, held throughout so that
/// concurrent `ns add`s pick distinct /30s) cannot be taken within 60 s; any netlink,
/// namespace or sysctl error of a later step (after the rollback).
pub async fn service_ns_add(name: &str) -> Result<ServiceNs, NetnsError> {
    validate_name(name)?;
    // From the existence checks through the /30 choice to the last address: another
    // `ns add` (of any instance: the pool is the host's) would otherwise see the same free
    // /30 before either has assigned it.
    let _lock = ns_lock(name).await?;
    if named_exists(name) {
        return Err(NetnsError::NamespaceExists {
            name: name.to_string(),
        });
    }
    let host = handle_here().await?;
    let host_veth = host_veth_name(name);
    match link_by_name(&host, &host_veth).await {
        Ok(_) => return Err(NetnsError::InterfaceExists { name: host_veth }),
        Err(NetnsError::UnknownInterface { .. }) => {}
        Err(e) => return Err(e),
    }
    let used: Vec<(Ipv4Addr, u8)> = list_addresses(&host, None)
        .await?
        .into_iter()
        .filter_map(|a| match a.addr {
            IpAddr::V4(v4) => Some((v4, a.prefix)),
            IpAddr::V6(_) => None,
        })
        .collect();
    let subnet = allocate_link_subnet(&used).ok_or_else(|| NetnsError::NoFreeSubnet {
        name: name.to_string(),
    })?;

    create_named(name)?;
    if let Err(e) = build(&host, name, subnet).await {
        rollback(&host, name).await;
        return Err(e);
    }
    service_ns_get(name).await
}

/// The host-wide lock of service namespace creation and removal: an exclusive `flock(2)` on
/// [`NS_LOCK_FILE`] (the link pool and the `vh-` names are the host's, shared by every
/// instance), after this process's own turn ([`NS_TURN`]: two tasks of one daemon would
/// otherwise each open the file and one would poll while the other, on the same thread,
/// could not finish).
struct NsLock {
    _turn: tokio::sync::MutexGuard<'static, ()>,
    _flock: nix::fcntl::Flock<std::fs::File>,
}

/// See [`NsLock`]: beside [`super::NETNS_RUN_DIR`], which `ip netns` may turn into a mount
/// point (a lock on the directory itself could then be taken on two different inodes).
const NS_LOCK_FILE: &str = "/run/viscum-netns.lock";

/// How long `ns add/del` waits for another process's to finish.
const NS_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

static NS_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn ns_lock(name: &str) -> Result<NsLock, NetnsError> {
    use nix::fcntl::{Flock, FlockArg};
    let err = |source: std::io::Error| NetnsError::NamespaceOp {
        action: "lock the namespaces for",
        name: name.to_string(),
        source,
    };
    let turn = NS_TURN.lock().await;
    // `/run` exists wherever `/run/netns` can (`create_named` makes both if need be).
    if let Some(dir) = std::path::Path::new(NS_LOCK_FILE).parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let deadline = tokio::time::Instant::now() + NS_LOCK_TIMEOUT;
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(NS_LOCK_FILE)
            .map_err(err)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(flock) => {
                return Ok(NsLock {
                    _turn: turn,
                    _flock: flock,
                });
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK | nix::errno::Errno::EINTR)) => {}
            Err((_, e)) => return Err(err(e.into())),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "another viscum has held {NS_LOCK_FILE} for {} s",
                    NS_LOCK_TIMEOUT.as_secs()
                ),
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// Everything after the namespace exists; [`service_ns_add`] undoes it all on error.
async fn build(host: &Handle, name: &str, subnet: Ipv4Addr) -> Result<(), NetnsError> {
    let host_veth = host_veth_name(name);
    let base = u32::from(subnet);
    let host_v4 = IpAddr::V4(Ipv4Addr::from(base + 1));
    let ns_v4 = IpAddr::V4(Ipv4Addr::from(base + 2));
    let host_v6 = IpAddr::V6(pair_ula(Ipv4Addr::from(base + 1)));
    let ns_v6 = IpAddr::V6(pair_ula(Ipv4Addr::from(base + 2)));

    create_veth(
        host,
        &host_veth,
        NS_VETH_NAME,
        name,
        Some(service_mac(name)),
    )
    .await?;

    let host_link = link_by_name(host, &host_veth).await?;
    add_address(host, host_link.index, host_v4, LINK_PREFIX).await?;
    add_address(host, host_link.index, IpAddr::V6(HOST_LL), LL_PREFIX).await?;
    add_address(host, host_link.index, host_v6, ULA_PAIR_PREFIX).await?;
    // Up before the inside, so eth0 has carrier by the time its routes go in.
    set_up(host, host_link.index).await?;

    let ns = handle_in(name).await?;
    let lo = link_by_name(&ns, "lo").await?;
    set_up(&ns, lo.index).await?;
    let eth0 = link_by_name(&ns, NS_VETH_NAME).await?;
    add_address(&ns, eth0.index, ns_v4, LINK_PREFIX).await?;
    add_address(&ns, eth0.index, IpAddr::V6(NS_LL), LL_PREFIX).await?;
    add_address(&ns, eth0.index, ns_v6, ULA_PAIR_PREFIX).await?;
    // IPv4 installs the /30's connected route only once the link is up, and the default
    // route's gateway must resolve through it.
    set_up(&ns, eth0.index).await?;
    add_route(
        &ns,
        Ipv4Addr::UNSPECIFIED.into(),
        0,
        Some(host_v4),
        Some(eth0.index),
    )
    .await?;
    add_route(
        &ns,
        Ipv6Addr::UNSPECIFIED.into(),
        0,
        Some(IpAddr::V6(HOST_LL)),
        Some(eth0.index),
    )
    .await?;

    // Without it a UDP server answering through IPV6_PKTINFO from a cloud address it only has
    // a local route for gets EINVAL (see docs/architecture.md).
    sysctl_set(Some(name), "net/ipv6/ip_nonlocal_bind", "1")?;
    // ARP for the gateway from the namespace's own address, not from the cloud address the
    // packet being sent carries (the kernel's default): a router with strict reverse-path
    // filtering drops an ARP request "tell 198.51.100.7" arriving on the service veth, and
    // every reply from the namespace then waits forever on an INCOMPLETE neighbour.
    sysctl_set(Some(name), "net/ipv4/conf/all/arp_announce", "2")?;
    sysctl_set(
        Some(name),
        &format!("net/ipv4/conf/{NS_VETH_NAME}/arp_announce"),
        "2",
    )?;
    Ok(())
}

/// Best-effort removal of a half-built service namespace. Failures are only logged: the
/// caller is already returning the error that made the rollback necessary.
async fn rollback(host: &Handle, name: &str) {
    let host_veth = host_veth_name(name);
    if let Ok(link) = link_by_name(host, &host_veth).await
        && let Err(e) = delete_link(host, link.index).await
    {
        log::warn!("rolling back namespace {name}: {e:#}");
    }
    if let Err(e) = delete_named(name) {
        log::warn!("rolling back namespace {name}: {e:#}");
    }
}

/// Removes service namespace `name`: the host veth (which takes `eth0` with it) and the named
/// namespace. Whatever half of it is left is removed too; only when neither exists is it an
/// [`NetnsError::UnknownNamespace`].
///
/// # Errors
/// [`NetnsError::InvalidServiceName`]; [`NetnsError::UnknownNamespace`] as above;
/// [`NetnsError::NotAServiceNamespace`] for a namespace without its veth that `viscum ns
/// add` did not make; netlink or namespace errors of the removal.
pub async fn service_ns_del(name: &str) -> Result<(), NetnsError> {
    validate_name(name)?;
    let _lock = ns_lock(name).await?;
    let host = handle_here().await?;
    let ns_exists = named_exists(name);
    let link = match link_by_name(&host, &host_veth_name(name)).await {
        Ok(link) if is_service_veth(&link) => Some(link),
        Ok(_) | Err(NetnsError::UnknownInterface { .. }) => None,
        Err(e) => return Err(e),
    };
    if !ns_exists && link.is_none() {
        return Err(NetnsError::UnknownNamespace {
            name: name.to_string(),
        });
    }
    // Without its veth, a namespace is ours only if it carries the settings
    // `build` gives every service namespace; anything else is somebody
    // else's (`ip netns add`), and deleting it would take their interfaces.
    if ns_exists
        && link.is_none()
        && super::sysctl_get(Some(name), "net/ipv4/conf/all/arp_announce")
            .is_ok_and(|v| v.trim() != "2")
    {
        return Err(NetnsError::NotAServiceNamespace {
            name: name.to_string(),
        });
    }
    // The veth first: a process still inside keeps the namespace alive after its file is
    // gone, and without the pair no traffic can reach it any more.
    if let Some(link) = link {
        match delete_link(&host, link.index).await {
            Ok(()) | Err(NetnsError::UnknownIfindex { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    if ns_exists {
        match delete_named(name) {
            Ok(()) | Err(NetnsError::UnknownNamespace { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Service namespace `name` as the kernel has it. [`NetnsError::UnknownNamespace`] if
/// `/run/netns/NAME` or `vh-NAME` is missing.
///
/// # Errors
/// [`NetnsError::InvalidServiceName`]; [`NetnsError::UnknownNamespace`] as above;
/// [`NetnsError::Incomplete`] if the inside is not finished (no `eth0`, no MAC);
/// netlink or namespace errors of the queries.
pub async fn service_ns_get(name: &str) -> Result<ServiceNs, NetnsError> {
    Ok(service_ns_read(name, Routes::Read).await?.ns)
}

/// Whether [`service_ns_read`] reads the namespace's local routes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Routes {
    /// Into [`ServiceNs::local_routes`].
    Read,
    /// Left empty: a route dump needs a socket inside the namespace (a thread entering it),
    /// and a redirect needs the routes only in the modes that add one.
    Skip,
}

/// How [`service_ns_read`] asks about the inside of the namespace.
enum Inside {
    /// Through viscum's own socket, naming the namespace by the id viscum's namespace knows
    /// it by (the host veth's `IFLA_LINK_NETNSID`): no thread, no second socket.
    ById(i32),
    /// Through a socket opened inside it (a thread entering it), when the host veth reports
    /// no id.
    Entered(Handle),
}

impl Inside {
    async fn link(&self, host: &Handle, name: &str) -> Result<LinkInfo, NetnsError> {
        match self {
            Inside::ById(id) => link_by_name_at(host, Some(*id), name).await,
            Inside::Entered(inside) => link_by_name(inside, name).await,
        }
    }

    async fn addresses(&self, host: &Handle, index: u32) -> Result<Vec<AddrInfo>, NetnsError> {
        match self {
            Inside::ById(id) => list_addresses_at(host, Some(*id), Some(index)).await,
            Inside::Entered(inside) => list_addresses(inside, Some(index)).await,
        }
    }
}

/// What [`service_ns_get`] reads, with what [`service_ns_check`] judges besides: the links at
/// both ends and the way inside, so the check needs no second visit to the namespace (a
/// visit through a socket inside it is a thread entering it: a third of a `redirect add`'s
/// own time, B7).
struct ServiceNsRead {
    ns: ServiceNs,
    host_link: LinkInfo,
    eth0: LinkInfo,
    host: Handle,
    inside: Inside,
}

async fn service_ns_read(name: &str, routes: Routes) -> Result<ServiceNsRead, NetnsError> {
    validate_name(name)?;
    let unknown = || NetnsError::UnknownNamespace {
        name: name.to_string(),
    };
    if !named_exists(name) {
        return Err(unknown());
    }
    // Strict checking, so that the address dump of the inside below honours its target id.
    let host = handle_here_strict().await?;
    let host_veth = host_veth_name(name);
    let host_link = match link_by_name(&host, &host_veth).await {
        Ok(link) if is_service_veth(&link) => link,
        Ok(_) | Err(NetnsError::UnknownInterface { .. }) => return Err(unknown()),
        Err(e) => return Err(e),
    };
    let host_addr = pool_address_of(&list_addresses(&host, Some(host_link.index)).await?);

    // The kernel gives the peer's namespace an id as it reports the veth (peernet2id_alloc in
    // net/core/rtnetlink.c), so there is one whenever the peer is in another namespace.
    let inside = match host_link.link_netnsid {
        Some(id) => Inside::ById(id),
        None => Inside::Entered(handle_in(name).await?),
    };
    let incomplete = |detail: &str| NetnsError::Incomplete {
        name: name.to_string(),
        detail: detail.to_string(),
    };
    let eth0 = match inside.link(&host, NS_VETH_NAME).await {
        Ok(link) => link,
        Err(NetnsError::UnknownInterface { .. }) => {
            return Err(incomplete("no eth0 inside"));
        }
        Err(e) => return Err(e),
    };
    let ns_mac = eth0
        .mac
        .ok_or_else(|| incomplete("eth0 has no MAC address"))?;
    // One dump for both families' addresses.
    let inside_addrs = inside.addresses(&host, eth0.index).await?;
    let ns_addr = pool_address_of(&inside_addrs);
    let ns_addr6 = ula_address_of(&inside_addrs);
    let local_routes = match (routes, &inside) {
        (Routes::Skip, _) => Vec::new(),
        (Routes::Read, Inside::Entered(handle)) => list_local_routes(handle).await?,
        (Routes::Read, Inside::ById(_)) => list_local_routes(&handle_in(name).await?).await?,
    }
    .into_iter()
    .map(|(addr, prefix)| format!("{addr}/{prefix}"))
    .collect();

    Ok(ServiceNsRead {
        ns: ServiceNs {
            name: name.to_string(),
            host_veth,
            host_ifindex: host_link.index,
            ns_veth: NS_VETH_NAME.to_string(),
            ns_mac,
            host_addr,
            ns_addr,
            ns_addr6,
            local_routes,
        },
        host_link,
        eth0,
        host,
        inside,
    })
}

/// Service namespace `name` as [`service_ns_get`] reads it, checked to be complete: every
/// step of `viscum ns add` done (addresses on both ends, the host veth, `lo` and `eth0` up,
/// the namespace's ARP settings applied, the last step). A namespace left half-built by a
/// `viscum` killed while making it passes [`service_ns_get`] yet drops traffic; redirecting
/// into it must be refused, and the daemon makes its own again.
///
/// # Errors
/// As [`service_ns_get`]; [`NetnsError::Incomplete`] naming the first missing step.
pub async fn service_ns_check(name: &str) -> Result<ServiceNs, NetnsError> {
    Ok(check(name, Routes::Read).await?.0)
}

/// [`service_ns_check`] for a redirect into the namespace: its [`ServiceNs::local_routes`]
/// are left empty (not read: a route dump needs a socket inside the namespace, a thread
/// entering it, and only a redirect whose mode adds a route needs them; see
/// [`list_local_routes`]), and it comes with the id under which viscum's namespace knows the
/// service namespace (the host veth's `IFLA_LINK_NETNSID`, read with it; `None`: none
/// assigned), which the entry records ([`viscum_common::ServiceEntry::peer_netns`]).
///
/// # Errors
/// As [`service_ns_check`].
pub async fn service_ns_check_for_redirect(
    name: &str,
) -> Result<(ServiceNs, Option<i32>), NetnsError> {
    check(name, Routes::Skip).await
}

async fn check(name: &str, routes: Routes) -> Result<(ServiceNs, Option<i32>), NetnsError> {
    let read = service_ns_read(name, routes).await?;
    let nsid = read.host_link.link_netnsid;
    let ns = read.ns;
    let incomplete = |detail: String| NetnsError::Incomplete {
        name: name.to_string(),
        detail,
    };
    if ns.ns_addr.is_empty() || ns.ns_addr6.is_empty() || ns.host_addr.is_empty() {
        return Err(incomplete("addresses missing".into()));
    }
    if !read.host_link.up {
        return Err(incomplete(format!("{} is down", ns.host_veth)));
    }
    if !read.inside.link(&read.host, "lo").await?.up {
        return Err(incomplete("lo is down inside".into()));
    }
    if !read.eth0.up {
        return Err(incomplete(format!("{NS_VETH_NAME} is down inside")));
    }
    // The ARP settings are the build's last step. Read with the link (IFLA_INET_CONF); a
    // kernel that did not report them is asked through the namespace's /proc/sys.
    let arp_announce = read.eth0.arp_announce.or_else(|| {
        super::sysctl_get(
            Some(name),
            &format!("net/ipv4/conf/{NS_VETH_NAME}/arp_announce"),
        )
        .ok()
        .and_then(|v| v.trim().parse().ok())
    });
    if arp_announce == Some(2) {
        Ok((ns, nsid))
    } else {
        Err(incomplete("its settings were never applied".into()))
    }
}

/// The IPv6 address under [`ULA_PREFIX`] among a link's `addrs` as "addr/p", or "" if it
/// has none.
fn ula_address_of(addrs: &[AddrInfo]) -> String {
    addrs
        .iter()
        .find_map(|a| match a.addr {
            IpAddr::V6(v6) if v6.segments()[..6] == ULA_PREFIX => {
                Some(format!("{v6}/{}", a.prefix))
            }
            _ => None,
        })
        .unwrap_or_default()
}

/// The IPv4 address from [`LINK_POOL`] among a link's `addrs` as "a.b.c.d/p", or "" if it
/// has none.
fn pool_address_of(addrs: &[AddrInfo]) -> String {
    let (pool, pool_prefix) = LINK_POOL;
    let pool_mask = u32::MAX << (32 - pool_prefix);
    addrs
        .iter()
        .find_map(|a| match a.addr {
            IpAddr::V4(v4) if u32::from(v4) & pool_mask == u32::from(pool) => {
                Some(format!("{v4}/{}", a.prefix))
            }
            _ => None,
        })
        .unwrap_or_default()
}

/// Whether a link in viscum's namespace is the host veth of a service namespace, and which.
fn service_name_of(link: &LinkInfo) -> Option<String> {
    if !is_service_veth(link) {
        return None;
    }
    let name = link.name.strip_prefix(HOST_VETH_PREFIX)?;
    (validate_name(name).is_ok() && named_exists(name)).then(|| name.to_string())
}

fn is_service_veth(link: &LinkInfo) -> bool {
    link.kind.as_deref() == Some("veth") && link.name.starts_with(HOST_VETH_PREFIX)
}

/// The service namespaces of viscum's namespace: those with a `vh-NAME` veth here and a
/// `/run/netns/NAME`, sorted by name.
///
/// # Errors
/// Netlink or namespace errors of the queries (a namespace deleted meanwhile is skipped).
pub async fn service_ns_list() -> Result<Vec<ServiceNs>, NetnsError> {
    let host = handle_here().await?;
    let mut names: Vec<String> = list_links(&host)
        .await?
        .iter()
        .filter_map(service_name_of)
        .collect();
    names.sort();
    let mut found = Vec::with_capacity(names.len());
    for name in names {
        match service_ns_get(&name).await {
            Ok(ns) => found.push(ns),
            // Deleted between the listing and now.
            Err(NetnsError::UnknownNamespace { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(found)
}

/// Makes service namespace `name` answer as `addr/prefix` (`local ADDR/PREFIX dev lo` in its
/// local table). Idempotent.
///
/// # Errors
/// [`NetnsError::InvalidServiceName`]; as [`handle_in`] and [`add_local_route`].
pub async fn service_ns_add_local(name: &str, addr: IpAddr, prefix: u8) -> Result<(), NetnsError> {
    validate_name(name)?;
    let ns = handle_in(name).await?;
    add_local_route(&ns, addr, prefix).await
}

/// Stops service namespace `name` answering as `addr/prefix`. Removing a route that is not
/// there is not an error.
///
/// # Errors
/// [`NetnsError::InvalidServiceName`]; as [`handle_in`] and [`del_local_route`].
pub async fn service_ns_del_local(name: &str, addr: IpAddr, prefix: u8) -> Result<(), NetnsError> {
    validate_name(name)?;
    let ns = handle_in(name).await?;
    del_local_route(&ns, addr, prefix).await
}

/// If `ifindex` (in the current namespace) is the host veth of a viscum service namespace,
/// that namespace's name.
///
/// # Errors
/// [`NetnsError::Socket`] or [`NetnsError::Netlink`] if the lookup fails (no such index is
/// `Ok(None)`).
pub async fn service_ns_by_host_ifindex(ifindex: u32) -> Result<Option<String>, NetnsError> {
    let host = handle_here().await?;
    match link_by_index(&host, ifindex).await {
        Ok(link) => Ok(service_name_of(&link)),
        Err(NetnsError::UnknownIfindex { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "web", "speedtest", "iot_gw-2", "abcdefghijkl", "0"] {
            assert!(validate_name(good).is_ok(), "{good} refused");
        }
        for bad in ["", "Foo!", "abcdefghijklm", "-x", "a.b", "a/b", "Web", "é"] {
            assert!(validate_name(bad).is_err(), "{bad} accepted");
        }
        // The host veth name always fits IFNAMSIZ.
        assert!(host_veth_name("abcdefghijkl").len() <= 15);
    }

    #[test]
    fn macs_are_stable_local_unicast_and_distinct() {
        let a = service_mac("speedtest");
        assert_eq!(a, service_mac("speedtest"));
        assert_eq!(a[0] & 0x01, 0, "multicast bit set");
        assert_eq!(a[0] & 0x02, 0x02, "not locally administered");
        assert_ne!(a, service_mac("speedtest2"));
        assert_ne!(service_mac("a"), service_mac("b"));
        // Pinned: the classifier and older viscum versions must keep deriving the same MAC.
        assert_eq!(format_mac(&service_mac("web")), "02:5e:a0:e1:19:48");
        assert_eq!(
            format_mac(&[0x02, 0, 0xab, 1, 2, 0xff]),
            "02:00:ab:01:02:ff"
        );
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn first_subnet_when_nothing_is_used() {
        let used = [(v4("127.0.0.1"), 8), (v4("192.0.2.1"), 24)];
        assert_eq!(allocate_link_subnet(&used), Some(v4("169.254.128.0")));
        assert_eq!(allocate_link_subnet(&[]), Some(v4("169.254.128.0")));
    }

    #[test]
    fn skips_subnets_holding_assigned_addresses() {
        let used = [(v4("169.254.128.1"), 30), (v4("169.254.128.5"), 30)];
        assert_eq!(allocate_link_subnet(&used), Some(v4("169.254.128.8")));
        // A gap left by a deleted namespace is reused.
        let used = [(v4("169.254.128.1"), 30), (v4("169.254.128.9"), 30)];
        assert_eq!(allocate_link_subnet(&used), Some(v4("169.254.128.4")));
    }

    #[test]
    fn skips_narrow_subnets_overlapping_the_pool_but_not_broad_ones() {
        // Someone numbered 169.254.128.0/24 by hand on another link.
        let used = [(v4("169.254.128.200"), 24)];
        assert_eq!(allocate_link_subnet(&used), Some(v4("169.254.129.0")));
        // An autoip /16 covering the whole pool does not block it; its own address does.
        let used = [(v4("169.254.128.2"), 16)];
        assert_eq!(allocate_link_subnet(&used), Some(v4("169.254.128.4")));
    }

    #[test]
    fn exhausted_pool() {
        let used: Vec<_> = (0..8192u32)
            .map(|i| (Ipv4Addr::from(u32::from(v4("169.254.128.1")) + i * 4), 30))
            .collect();
        assert_eq!(allocate_link_subnet(&used), None);
        let used = [(v4("169.254.128.0"), 17)];
        assert_eq!(allocate_link_subnet(&used), None);
    }

    #[test]
    fn pair_ulas_carry_the_ipv4_link_address() {
        assert_eq!(
            pair_ula(v4("169.254.128.2")),
            "fd76:6973:6375::a9fe:8002".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn serializes_mac_as_text() {
        let ns = ServiceNs {
            name: "web".into(),
            host_veth: "vh-web".into(),
            host_ifindex: 7,
            ns_veth: "eth0".into(),
            ns_mac: [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee],
            host_addr: "169.254.128.1/30".into(),
            ns_addr: "169.254.128.2/30".into(),
            ns_addr6: "fd76:6973:6375::a9fe:8002/126".into(),
            local_routes: vec!["198.51.100.7/32".into()],
        };
        let json = serde_json::to_value(&ns).unwrap();
        assert_eq!(json["ns_mac"], "02:aa:bb:cc:dd:ee");
        assert_eq!(json["local_routes"][0], "198.51.100.7/32");
    }
}
