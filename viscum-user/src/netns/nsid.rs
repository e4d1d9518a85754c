//! Which namespace a veth leads to, as the kernel numbers it for this one.

use futures::TryStreamExt as _;
use netlink_packet_route::link::LinkAttribute;

use super::{NetnsError, errno_of, handle_here, netlink_err};

/// The netns id (in the calling thread's namespace) of the namespace that veth `ifindex`'s
/// peer lives in: the link's `IFLA_LINK_NETNSID` (rtnetlink(7)). The kernel assigns the id
/// when it first reports a link whose peer is in another namespace (`peernet2id_alloc`,
/// net/core/rtnetlink.c), so any veth whose peer was moved away has one. This is the
/// `netns` argument `bpf_skc_lookup_tcp` and friends expect (bpf-helpers(7)).
///
/// `Ok(None)` when the link has no peer in another namespace (a veth pair inside one
/// namespace, or not a veth).
///
/// # Errors
/// [`NetnsError::UnknownIfindex`] if there is no such link; [`NetnsError::Netlink`] or
/// [`NetnsError::Socket`] if asking fails.
pub async fn peer_netnsid(ifindex: u32) -> Result<Option<i32>, NetnsError> {
    if ifindex == 0 {
        return Err(NetnsError::UnknownIfindex { index: ifindex });
    }
    let handle = handle_here().await?;
    let mut links = handle.link().get().match_index(ifindex).execute();
    let msg = match links.try_next().await {
        Ok(Some(msg)) => msg,
        Ok(None) => return Err(NetnsError::UnknownIfindex { index: ifindex }),
        Err(e) if errno_of(&e) == Some(libc::ENODEV) => {
            return Err(NetnsError::UnknownIfindex { index: ifindex });
        }
        Err(e) => return Err(netlink_err(format!("look up interface {ifindex}"), e)),
    };
    Ok(msg.attributes.iter().find_map(|a| match a {
        // Negative ids mean "none assigned" (NETNSA_NSID_NOT_ASSIGNED, -1).
        LinkAttribute::LinkNetNsId(id) if *id >= 0 => Some(*id),
        _ => None,
    }))
}
