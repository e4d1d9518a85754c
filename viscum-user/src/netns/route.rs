//! Routes: main-table routes for a namespace's own connectivity, and the `local` routes that
//! make a service namespace accept (and answer from) cloud addresses it does not own.
//!
//! Every route viscum adds carries the protocol [`RTPROT_VISCUM`]. That is how viscum tells
//! its own routes from the kernel's (`local 127.0.0.0/8`, the `local` route of every assigned
//! address, ...) when it lists or deletes them, without keeping any state of its own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::{NetnsError, check_prefix, errno_of, netlink_err, network_of};

/// Route protocol number marking routes viscum added (`proto 190` in `ip route`). 190 is not
/// assigned in `rtnetlink.h` nor in iproute2's `rt_protos`.
pub const RTPROT_VISCUM: u8 = 0xbe;

/// The kernel's local table (`RT_TABLE_LOCAL`), consulted before main for every lookup and the
/// one the kernel checks when it accepts an address as local (`__ip_dev_find`).
const RT_TABLE_LOCAL: u8 = 255;

/// The loopback device's index: fixed at 1 in every network namespace since Linux 4.0
/// (`LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: u32 = 1;

/// An empty route message of the family of `addr`, tagged as ours.
fn builder_for(addr: IpAddr) -> RouteMessage {
    let mut msg = match addr {
        IpAddr::V4(_) => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        IpAddr::V6(_) => RouteMessageBuilder::<Ipv6Addr>::new().build(),
    };
    msg.header.protocol = RouteProtocol::Other(RTPROT_VISCUM);
    msg
}

/// Sets the destination; prefix 0 leaves `RTA_DST` out, as iproute2 does for `default`.
fn set_destination(msg: &mut RouteMessage, dst: IpAddr, prefix: u8) {
    msg.header.destination_prefix_length = prefix;
    if prefix > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    }
}

/// Rejects prefixes longer than the family allows and destinations with host bits set (the
/// kernel refuses those with a bare EINVAL).
fn check_destination(dst: IpAddr, prefix: u8) -> Result<(), NetnsError> {
    check_prefix(dst, prefix)?;
    if network_of(dst, prefix) != dst {
        return Err(NetnsError::HostBitsSet { addr: dst, prefix });
    }
    Ok(())
}

/// Adds `dst/prefix` (prefix 0 = default) to the main table, via `gateway` and/or out of
/// `oif`.
///
/// If the kernel finds the gateway unreachable (no connected route covers it) and an `oif`
/// is given, the route is added again with `onlink`, which tells the kernel the gateway sits
/// on that link anyway.
///
/// # Errors
/// [`NetnsError::InvalidPrefix`] / [`NetnsError::HostBitsSet`] for a bad destination and
/// [`NetnsError::FamilyMismatch`] for a gateway of the other family (nothing is sent);
/// [`NetnsError::Netlink`] if the kernel refuses (`EEXIST`: the route is there).
pub async fn add_route(
    handle: &Handle,
    dst: IpAddr,
    prefix: u8,
    gateway: Option<IpAddr>,
    oif: Option<u32>,
) -> Result<(), NetnsError> {
    check_destination(dst, prefix)?;
    let via = gateway.map_or(String::new(), |gw| format!(" via {gw}"));
    let dev = oif.map_or(String::new(), |i| format!(" dev index {i}"));
    let action = format!("add route {dst}/{prefix}{via}{dev}");
    if let Some(gw) = gateway.filter(|gw| gw.is_ipv4() != dst.is_ipv4()) {
        return Err(NetnsError::FamilyMismatch { dst, gateway: gw });
    }

    let mut msg = builder_for(dst);
    set_destination(&mut msg, dst, prefix);
    match gateway {
        Some(gw) => msg
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gw))),
        // A route with no gateway is a directly connected one (`ip route add X dev Y`).
        None => msg.header.scope = RouteScope::Link,
    }
    if let Some(oif) = oif {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }

    let first = handle.route().add(msg.clone()).execute().await;
    match first {
        Err(e) if errno_of(&e) == Some(libc::ENETUNREACH) && gateway.is_some() && oif.is_some() => {
            msg.header.flags |= netlink_packet_route::route::RouteFlags::Onlink;
            handle
                .route()
                .add(msg)
                .execute()
                .await
                .map_err(|e| netlink_err(action, e))
        }
        other => other.map_err(|e| netlink_err(action, e)),
    }
}

/// The `local ADDR/PREFIX dev lo` route of the local table (type local, scope host), tagged
/// [`RTPROT_VISCUM`].
fn local_route(addr: IpAddr, prefix: u8) -> RouteMessage {
    let mut msg = builder_for(addr);
    set_destination(&mut msg, addr, prefix);
    msg.header.table = RT_TABLE_LOCAL;
    msg.header.kind = RouteType::Local;
    msg.header.scope = RouteScope::Host;
    msg.attributes.push(RouteAttribute::Oif(LOOPBACK_IFINDEX));
    msg
}

/// Adds `local ADDR/PREFIX dev lo` to the local table (table 255, type local, scope host) of
/// the namespace of `handle`: the namespace then accepts packets to those addresses and may
/// send from them. Adding a route that is already there is not an error.
///
/// # Errors
/// [`NetnsError::InvalidPrefix`] / [`NetnsError::HostBitsSet`] (nothing is sent);
/// [`NetnsError::Netlink`] if the kernel refuses.
pub async fn add_local_route(handle: &Handle, addr: IpAddr, prefix: u8) -> Result<(), NetnsError> {
    check_destination(addr, prefix)?;
    match handle
        .route()
        .add(local_route(addr, prefix))
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if errno_of(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(netlink_err(
            format!("add local route {addr}/{prefix} dev lo"),
            e,
        )),
    }
}

/// Removes viscum's `local ADDR/PREFIX dev lo` route; a route that is not there is not an
/// error. Because the request names [`RTPROT_VISCUM`], the kernel's own local routes (for
/// addresses assigned to interfaces) are never touched.
///
/// # Errors
/// [`NetnsError::InvalidPrefix`] / [`NetnsError::HostBitsSet`] (nothing is sent);
/// [`NetnsError::Netlink`] if the kernel refuses otherwise.
pub async fn del_local_route(handle: &Handle, addr: IpAddr, prefix: u8) -> Result<(), NetnsError> {
    check_destination(addr, prefix)?;
    let mut msg = local_route(addr, prefix);
    // NOWHERE is "any scope" to the IPv4 delete lookup; the protocol still pins it to ours.
    msg.header.scope = RouteScope::NoWhere;
    match handle.route().del(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno_of(&e), Some(libc::ESRCH | libc::ENOENT)) => Ok(()),
        Err(e) => Err(netlink_err(
            format!("delete local route {addr}/{prefix} dev lo"),
            e,
        )),
    }
}

/// The local routes on `lo` that viscum added (tagged [`RTPROT_VISCUM`]) in the namespace of
/// `handle`, IPv4 first, each family sorted.
///
/// # Errors
/// [`NetnsError::Netlink`] if a dump fails.
pub async fn list_local_routes(handle: &Handle) -> Result<Vec<(IpAddr, u8)>, NetnsError> {
    let mut found = Vec::new();
    for probe in [
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    ] {
        // Without NETLINK_GET_STRICT_CHK the kernel ignores the filter fields and dumps every
        // table of the family; the filtering happens here.
        let routes: Vec<RouteMessage> = handle
            .route()
            .get(builder_for(probe))
            .execute()
            .try_collect()
            .await
            .map_err(|e| netlink_err("list routes", e))?;
        let mut family: Vec<(IpAddr, u8)> = routes
            .iter()
            .filter(|r| is_viscum_local(r))
            .map(|r| {
                (
                    destination_of(r).unwrap_or(probe),
                    r.header.destination_prefix_length,
                )
            })
            .collect();
        family.sort();
        found.extend(family);
    }
    Ok(found)
}

/// Whether a dumped route is one of viscum's local routes on lo.
fn is_viscum_local(route: &RouteMessage) -> bool {
    let table = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table));
    table == u32::from(RT_TABLE_LOCAL)
        && route.header.kind == RouteType::Local
        && route.header.protocol == RouteProtocol::Other(RTPROT_VISCUM)
        && route
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Oif(LOOPBACK_IFINDEX)))
}

/// The `RTA_DST` of a route, if it has one (a /0 route has none).
fn destination_of(route: &RouteMessage) -> Option<IpAddr> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viscum_protocol_survives_the_packet_types() {
        // RouteProtocol maps known numbers to named variants; ours must stay Other(190) so
        // the comparison in is_viscum_local holds for dumped routes.
        assert_eq!(
            RouteProtocol::from(RTPROT_VISCUM),
            RouteProtocol::Other(RTPROT_VISCUM)
        );
    }

    #[test]
    fn local_route_message_is_tagged_and_on_lo() {
        let msg = local_route("198.51.100.7".parse().unwrap(), 32);
        assert!(is_viscum_local(&msg));
        assert_eq!(msg.header.scope, RouteScope::Host);
        assert_eq!(destination_of(&msg), Some("198.51.100.7".parse().unwrap()));
    }

    #[test]
    fn destinations_with_host_bits_are_refused() {
        let err = check_destination("198.51.100.7".parse().unwrap(), 24).unwrap_err();
        assert_eq!(
            err.to_string(),
            "198.51.100.7/24 is not a network address: host bits are set"
        );
        assert!(check_destination("203.0.113.0".parse().unwrap(), 24).is_ok());
        assert!(check_destination("::".parse().unwrap(), 0).is_ok());
    }
}
