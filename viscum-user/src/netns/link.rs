//! Links: lookup, veth pairs across namespaces, VLAN subinterfaces, up, delete.

use std::{fs::File, os::fd::AsRawFd};

use futures::TryStreamExt;
use netlink_packet_route::link::{
    self as nl, AfSpecInet, AfSpecUnspec, InfoData, InfoVeth, LinkAttribute, LinkFlags,
    LinkMessage, MacVlanMode,
};
use rtnetlink::{Handle, LinkMacVlan, LinkUnspec, LinkVlan};

use super::{NetnsError, errno_of, named::checked_path, netlink_err};

/// The longest interface name the kernel accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// What viscum needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index in the link's namespace.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// `IFLA_INFO_KIND`: "veth", "vlan", ...; `None` for physical devices and loopback.
    pub kind: Option<String>,
    /// Hardware address, when the link has a 6-byte one.
    pub mac: Option<[u8; 6]>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// `IFLA_LINK`: a veth's peer index (in the peer's namespace) or a VLAN's parent index.
    pub peer_index: Option<u32>,
    /// Operationally up (`IFF_RUNNING`): up, with carrier.
    pub running: bool,
    /// Kind of the root qdisc (`IFLA_QDISC`). It stays "noop", which drops everything, from
    /// the moment a link comes up without carrier until the kernel's deferred link-watch
    /// work activates it; a link is only ready to carry traffic once it is something else.
    pub qdisc: Option<String>,
    /// The link's IPv4 `arp_announce` setting (`IFLA_INET_CONF`, the value of
    /// `net.ipv4.conf.<link>.arp_announce`), when the kernel reports it: readable with the
    /// link, so a check needs no visit to the namespace's `/proc/sys`.
    pub arp_announce: Option<i32>,
    /// `IFLA_LINK_NETNSID`: the id, in this link's namespace, of the namespace its veth peer
    /// is in (`None` when the peer is in the same namespace, or none is assigned).
    pub link_netnsid: Option<i32>,
}

impl LinkInfo {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut info = LinkInfo {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            mac: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            peer_index: None,
            running: msg.header.flags.contains(LinkFlags::Running),
            qdisc: None,
            arp_announce: None,
            link_netnsid: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => info.name = name.clone(),
                LinkAttribute::Address(addr) => info.mac = <[u8; 6]>::try_from(&addr[..]).ok(),
                LinkAttribute::Link(index) => info.peer_index = Some(*index),
                LinkAttribute::Qdisc(qdisc) => info.qdisc = Some(qdisc.clone()),
                // Negative ids mean "none assigned" (NETNSA_NSID_NOT_ASSIGNED, -1).
                LinkAttribute::LinkNetNsId(id) if *id >= 0 => info.link_netnsid = Some(*id),
                LinkAttribute::AfSpecUnspec(specs) => {
                    info.arp_announce = specs
                        .iter()
                        .filter_map(|s| match s {
                            AfSpecUnspec::Inet(inet) => Some(inet),
                            _ => None,
                        })
                        .flatten()
                        .find_map(|a| match a {
                            AfSpecInet::DevConf(conf) => Some(conf.arp_announce),
                            _ => None,
                        });
                }
                LinkAttribute::LinkInfo(infos) => {
                    info.kind = infos.iter().find_map(|i| match i {
                        nl::LinkInfo::Kind(kind) => Some(kind.to_string()),
                        _ => None,
                    });
                }
                _ => {}
            }
        }
        info
    }
}

/// Looks a link up by name in the namespace of `handle`.
///
/// # Errors
/// [`NetnsError::UnknownInterface`] if there is no such link (or the name cannot be one);
/// [`NetnsError::Netlink`] if the request fails otherwise.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<LinkInfo, NetnsError> {
    link_by_name_at(handle, None, name).await
}

/// [`link_by_name`] in the namespace that `handle`'s own namespace knows by id `nsid`
/// (`IFLA_TARGET_NETNSID`, Linux 4.15), or in `handle`'s own for `None`: no socket inside
/// that namespace is needed.
///
/// # Errors
/// As [`link_by_name`].
pub(crate) async fn link_by_name_at(
    handle: &Handle,
    nsid: Option<i32>,
    name: &str,
) -> Result<LinkInfo, NetnsError> {
    let unknown = || NetnsError::UnknownInterface {
        name: name.to_string(),
    };
    // The kernel cannot hold such a name; asking would only earn an EINVAL.
    if name.is_empty() || name.len() > IFNAME_MAX {
        return Err(unknown());
    }
    let mut request = handle.link().get().match_name(name);
    if let Some(id) = nsid {
        request
            .message_mut()
            .attributes
            .push(LinkAttribute::IfNetnsId(id));
    }
    let mut links = request.execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(LinkInfo::from_message(&msg)),
        Ok(None) => Err(unknown()),
        Err(e) if errno_of(&e) == Some(libc::ENODEV) => Err(unknown()),
        Err(e) => Err(netlink_err(format!("look up interface {name}"), e)),
    }
}

/// Looks a link up by index in the namespace of `handle`.
///
/// # Errors
/// [`NetnsError::UnknownIfindex`] if there is no such link (index 0 included);
/// [`NetnsError::Netlink`] if the request fails otherwise.
pub async fn link_by_index(handle: &Handle, index: u32) -> Result<LinkInfo, NetnsError> {
    let unknown = || NetnsError::UnknownIfindex { index };
    // Index 0 would turn the request into "any link" on some kernels.
    if index == 0 {
        return Err(unknown());
    }
    let mut links = handle.link().get().match_index(index).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(LinkInfo::from_message(&msg)),
        Ok(None) => Err(unknown()),
        Err(e) if errno_of(&e) == Some(libc::ENODEV) => Err(unknown()),
        Err(e) => Err(netlink_err(
            format!("look up interface with index {index}"),
            e,
        )),
    }
}

/// All links in the namespace of `handle`, in index order.
///
/// # Errors
/// [`NetnsError::Netlink`] if the dump fails.
pub async fn list_links(handle: &Handle) -> Result<Vec<LinkInfo>, NetnsError> {
    let mut links: Vec<LinkInfo> = handle
        .link()
        .get()
        .execute()
        .map_ok(|msg| LinkInfo::from_message(&msg))
        .try_collect()
        .await
        .map_err(|e| netlink_err("list interfaces", e))?;
    links.sort_by_key(|l| l.index);
    Ok(links)
}

/// Sets a link administratively up.
///
/// # Errors
/// [`NetnsError::UnknownIfindex`] on `ENODEV`; [`NetnsError::Netlink`] otherwise.
pub async fn set_up(handle: &Handle, index: u32) -> Result<(), NetnsError> {
    handle
        .link()
        .change(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| match errno_of(&e) {
            Some(libc::ENODEV) => NetnsError::UnknownIfindex { index },
            _ => netlink_err(format!("set interface with index {index} up"), e),
        })
}

/// Sets a link's MTU (bytes of L3 payload, as `ip link set mtu`).
///
/// # Errors
/// [`NetnsError::UnknownIfindex`] on `ENODEV`; [`NetnsError::Netlink`] otherwise
/// (`EINVAL` for an MTU outside the device's range).
pub async fn set_mtu(handle: &Handle, index: u32, mtu: u32) -> Result<(), NetnsError> {
    handle
        .link()
        .change(LinkUnspec::new_with_index(index).mtu(mtu).build())
        .execute()
        .await
        .map_err(|e| match errno_of(&e) {
            Some(libc::ENODEV) => NetnsError::UnknownIfindex { index },
            _ => netlink_err(format!("set the MTU of interface {index} to {mtu}"), e),
        })
}

/// Creates a veth pair: `host` stays in the handle's namespace, `peer_name` is created
/// directly inside the named namespace `peer_ns`, with `peer_mac` as its address if given.
///
/// Creating the peer in place (`IFLA_NET_NS_FD` inside the peer's `VETH_INFO_PEER`) instead of
/// moving it afterwards means a name such as `eth0` never has to be free in the host's
/// namespace, and nothing is left half-moved on failure.
///
/// # Errors
/// As [`create_veth_indexed`].
pub async fn create_veth(
    handle: &Handle,
    host: &str,
    peer_name: &str,
    peer_ns: &str,
    peer_mac: Option<[u8; 6]>,
) -> Result<(), NetnsError> {
    create_veth_indexed(handle, host, 0, peer_name, peer_ns, 0, peer_mac).await
}

/// [`create_veth`], also choosing both ends' interface indexes (`0`: the kernel picks). The
/// kernel honours the peer's index only when the host end's is given as well
/// (`veth_newlink`).
///
/// Why it matters: the kernel reports a link's carrier change at once only if it deems it
/// urgent, and for a veth it does so when the link's index differs from its peer's
/// (`linkwatch_urgent_event`); otherwise the link may stay operationally down for up to a
/// second, and IPv6 addresses on it stay tentative that long. Two fresh namespaces both
/// number their first device 2, so topologies built from fresh namespaces (the test lab)
/// pick distinct indexes.
///
/// # Errors
/// [`NetnsError::InvalidName`] / [`NetnsError::UnknownNamespace`] /
/// [`NetnsError::Enter`] for `peer_ns`; [`NetnsError::InterfaceExists`] on `EEXIST` (either
/// name, or a requested index, is taken); [`NetnsError::Netlink`] otherwise. Nothing is
/// created on failure.
pub async fn create_veth_indexed(
    handle: &Handle,
    host: &str,
    host_index: u32,
    peer_name: &str,
    peer_ns: &str,
    peer_index: u32,
    peer_mac: Option<[u8; 6]>,
) -> Result<(), NetnsError> {
    let ns_path = checked_path(peer_ns)?;
    let ns_file = File::open(&ns_path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => NetnsError::UnknownNamespace {
            name: peer_ns.to_string(),
        },
        _ => NetnsError::Enter {
            path: ns_path,
            source,
        },
    })?;

    // veth_newlink takes the peer's ifindex from the peer's own ifinfomsg header.
    let mut peer = LinkUnspec::new_with_name(peer_name)
        .index(peer_index)
        .setns_by_fd(ns_file.as_raw_fd());
    if let Some(mac) = peer_mac {
        peer = peer.address(mac.to_vec());
    }
    let message = rtnetlink::LinkVeth::new(host, peer_name)
        .index(host_index)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
        .build();

    // The kernel resolves the fd while handling the request (synchronously, in this
    // process's fd table), so the file must stay open until the answer arrives.
    let result = handle.link().add(message).execute().await;
    drop(ns_file);
    result.map_err(|e| match errno_of(&e) {
        Some(libc::EEXIST) => NetnsError::InterfaceExists {
            name: format!("{host} (or {peer_name} in namespace {peer_ns})"),
        },
        _ => netlink_err(
            format!("create veth {host} with peer {peer_name} in namespace {peer_ns}"),
            e,
        ),
    })
}

/// Creates an 802.1Q VLAN subinterface `name` with id `vlan_id` on the link `parent` (same
/// namespace), and returns its index.
///
/// # Errors
/// [`NetnsError::InterfaceExists`] if `name` is taken; [`NetnsError::Netlink`] otherwise
/// (`EOPNOTSUPP` on kernels without 802.1Q).
pub async fn create_vlan(
    handle: &Handle,
    name: &str,
    parent: u32,
    vlan_id: u16,
) -> Result<u32, NetnsError> {
    let what = format!("create vlan {name} (id {vlan_id}) on interface with index {parent}");
    add_link(
        handle,
        LinkVlan::new(name, parent, vlan_id).build(),
        name,
        what,
    )
    .await
}

/// Creates a passthru macvlan `name` on the link `parent` (same namespace) and returns its
/// index. In passthru mode the macvlan takes over its parent's MAC address and receives all
/// of its traffic after the parent's TC ingress hook, so it can stand in for an upper device
/// such as a VLAN subinterface (the test lab does so on kernels built without 802.1Q).
///
/// # Errors
/// [`NetnsError::InterfaceExists`] if `name` is taken; [`NetnsError::Netlink`] otherwise.
pub async fn create_macvlan_passthru(
    handle: &Handle,
    name: &str,
    parent: u32,
) -> Result<u32, NetnsError> {
    let what = format!("create macvlan {name} on interface with index {parent}");
    let message = LinkMacVlan::new(name, parent, MacVlanMode::Passthrough).build();
    add_link(handle, message, name, what).await
}

/// Creates the link `message` describes and returns its index; an existing
/// `name` is reported as such, any other failure as `what`.
async fn add_link(
    handle: &Handle,
    message: LinkMessage,
    name: &str,
    what: String,
) -> Result<u32, NetnsError> {
    handle
        .link()
        .add(message)
        .execute()
        .await
        .map_err(|e| match errno_of(&e) {
            Some(libc::EEXIST) => NetnsError::InterfaceExists {
                name: name.to_string(),
            },
            _ => netlink_err(what, e),
        })?;
    Ok(link_by_name(handle, name).await?.index)
}

/// Deletes a link. Deleting either end of a veth pair removes both.
///
/// # Errors
/// [`NetnsError::UnknownIfindex`] on `ENODEV`; [`NetnsError::Netlink`] otherwise.
pub async fn delete_link(handle: &Handle, index: u32) -> Result<(), NetnsError> {
    handle
        .link()
        .del(index)
        .execute()
        .await
        .map_err(|e| match errno_of(&e) {
            Some(libc::ENODEV) => NetnsError::UnknownIfindex { index },
            _ => netlink_err(format!("delete interface with index {index}"), e),
        })
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::link::InfoKind;

    #[test]
    fn veth_kind_name_is_what_the_kernel_reports() {
        // LinkInfo::kind relies on InfoKind's Display matching IFLA_INFO_KIND strings.
        assert_eq!(InfoKind::Veth.to_string(), "veth");
        assert_eq!(InfoKind::Vlan.to_string(), "vlan");
    }
}
