//! Interface addresses.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::Handle;

use super::{NetnsError, check_prefix, errno_of, netlink_err};

/// One address assigned to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrInfo {
    /// The interface it is assigned to.
    pub index: u32,
    /// The address itself (`IFA_LOCAL` for IPv4, `IFA_ADDRESS` for IPv6).
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
}

/// Assigns `addr/prefix` to the link `index` in the namespace of `handle`.
///
/// IPv6 addresses get `IFA_F_NODAD`: duplicate address detection would keep them tentative
/// (unusable as a source, unbindable) for a second or more, and on a veth viscum made itself
/// there is nobody to collide with.
///
/// # Errors
/// [`NetnsError::InvalidPrefix`] if `prefix` exceeds 32 / 128 (nothing is sent);
/// [`NetnsError::UnknownIfindex`] on `ENODEV`; [`NetnsError::Netlink`] for any other
/// refusal (`EEXIST` when the address is there already).
pub async fn add_address(
    handle: &Handle,
    index: u32,
    addr: IpAddr,
    prefix: u8,
) -> Result<(), NetnsError> {
    check_prefix(addr, prefix)?;
    let mut request = handle.address().add(index, addr, prefix);
    if addr.is_ipv6() {
        let message = request.message_mut();
        message.header.flags |= AddressHeaderFlags::Nodad;
        message
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    request.execute().await.map_err(|e| match errno_of(&e) {
        Some(libc::ENODEV) => NetnsError::UnknownIfindex { index },
        _ => netlink_err(
            format!("add address {addr}/{prefix} to interface with index {index}"),
            e,
        ),
    })
}

/// The addresses in the namespace of `handle`, of one link or (`None`) of all of them.
///
/// # Errors
/// [`NetnsError::Netlink`] if the dump fails.
pub async fn list_addresses(
    handle: &Handle,
    index: Option<u32>,
) -> Result<Vec<AddrInfo>, NetnsError> {
    list_addresses_at(handle, None, index).await
}

/// [`list_addresses`] in the namespace that `handle`'s own namespace knows by id `nsid`
/// (`IFA_TARGET_NETNSID`, Linux 4.20), or in `handle`'s own for `None`: no socket inside
/// that namespace is needed. The kernel reads the attribute of a dump request only from a
/// socket with `NETLINK_GET_STRICT_CHK` on ([`super::handle_here_strict`]).
///
/// # Errors
/// As [`list_addresses`].
pub(crate) async fn list_addresses_at(
    handle: &Handle,
    nsid: Option<i32>,
    index: Option<u32>,
) -> Result<Vec<AddrInfo>, NetnsError> {
    let mut request = handle.address().get();
    if let Some(id) = nsid {
        request
            .message_mut()
            .attributes
            .push(AddressAttribute::TargetNetNsId(id));
    }
    if let Some(index) = index {
        request = request.set_link_index_filter(index);
    }
    let messages: Vec<_> = request
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink_err("list addresses", e))?;
    Ok(messages
        .iter()
        .filter_map(|msg| {
            // On point-to-point links IFA_ADDRESS is the peer and IFA_LOCAL ours; IPv6
            // messages usually carry IFA_ADDRESS only.
            let local = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            Some(AddrInfo {
                index: msg.header.index,
                addr: local.or(address)?,
                prefix: msg.header.prefix_len,
            })
        })
        .collect())
}
