//! Network namespaces, links, addresses and routes, all over netlink.
//!
//! # Layout
//!
//! * `named`: named namespaces the way iproute2 keeps them (a bind mount of the
//!   namespace file under [`NETNS_RUN_DIR`]), and running code inside one ([`in_netns`]).
//! * `handle`: rtnetlink handles bound to the current or to a named namespace.
//! * `link`: link lookup, veth and VLAN creation, up/down, deletion.
//! * `addr`: interface addresses.
//! * `route`: main-table routes and the `local` routes that let a service answer
//!   as a cloud address.
//! * `sysctl`: `/proc/sys` as seen from a namespace.
//! * `service`: the viscum service namespace (`viscum ns add/del/list`) built
//!   from the pieces above.
//!
//! Nothing here runs the `ip` or `tc` binaries: kernel state is read and written through
//! rtnetlink, and the kernel is the only source of truth (no state files).

use std::{io, net::IpAddr, path::PathBuf};

use thiserror::Error;

mod addr;
mod handle;
mod link;
mod named;
mod nsid;
mod route;
mod service;
mod sysctl;

pub use self::{
    addr::{AddrInfo, add_address, list_addresses},
    handle::{handle_here, handle_here_strict, handle_in},
    link::{
        LinkInfo, create_macvlan_passthru, create_veth, create_veth_indexed, create_vlan,
        delete_link, link_by_index, link_by_name, list_links, set_mtu, set_up,
    },
    named::{
        NETNS_RUN_DIR, create_named, delete_named, in_netns, in_netns_path, list_named,
        named_exists, pids_in,
    },
    nsid::peer_netnsid,
    route::{RTPROT_VISCUM, add_local_route, add_route, del_local_route, list_local_routes},
    service::{
        HOST_VETH_PREFIX, LINK_POOL, MAX_NAME_LEN, NS_VETH_NAME, ServiceNs, ULA_PREFIX,
        allocate_link_subnet, format_mac, host_veth_name, pair_ula, service_mac, service_ns_add,
        service_ns_add_local, service_ns_by_host_ifindex, service_ns_check,
        service_ns_check_for_redirect, service_ns_del, service_ns_del_local, service_ns_get,
        service_ns_list, validate_name,
    },
    sysctl::{sysctl_get, sysctl_set},
};

/// Everything that can go wrong while managing namespaces, links, addresses and routes.
#[derive(Debug, Error)]
pub enum NetnsError {
    /// A service namespace name outside the alphabet or length viscum allows.
    #[error("namespace name '{name}' is invalid: use 1-12 characters a-z 0-9 - _")]
    InvalidServiceName {
        /// The rejected name.
        name: String,
    },

    /// A namespace name that cannot be a file name under [`NETNS_RUN_DIR`].
    #[error("namespace name '{name}' is invalid: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// No `/run/netns/NAME` (or, for a service namespace, no host veth `vh-NAME`).
    #[error("namespace {name} does not exist")]
    UnknownNamespace {
        /// The namespace that was asked for.
        name: String,
    },

    /// A namespace `viscum ns del` must not remove: `viscum ns add` did not make it.
    #[error(
        "namespace {name} was not made by `viscum ns add` (no {HOST_VETH_PREFIX}{name} veth, none \
         of its settings): viscum leaves it alone; remove it with `ip netns del {name}`"
    )]
    NotAServiceNamespace {
        /// The namespace that was asked for.
        name: String,
    },

    /// `/run/netns/NAME` is already there.
    #[error("namespace {name} already exists")]
    NamespaceExists {
        /// The namespace that was to be created.
        name: String,
    },

    /// A link looked up by name is missing.
    #[error("interface {name} does not exist")]
    UnknownInterface {
        /// The interface name that was asked for.
        name: String,
    },

    /// A link looked up by index is missing.
    #[error("interface with index {index} does not exist")]
    UnknownIfindex {
        /// The interface index that was asked for.
        index: u32,
    },

    /// A link that was to be created is already there.
    #[error("interface {name} already exists")]
    InterfaceExists {
        /// The interface that was to be created.
        name: String,
    },

    /// Opening or `setns()`-ing into a namespace file failed.
    #[error("cannot enter network namespace {path}")]
    Enter {
        /// The namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`, ...).
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// Creating or removing the namespace file or its mount failed.
    #[error("cannot {action} namespace {name}")]
    NamespaceOp {
        /// What was being done ("create", "delete", "list").
        action: &'static str,
        /// The namespace concerned.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// The helper thread that enters a namespace could not be started.
    #[error("cannot start a thread for network namespace {path}")]
    Thread {
        /// The namespace file the thread was to enter.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// Opening the rtnetlink socket failed.
    #[error("cannot open a netlink socket{}", in_ns(.ns))]
    Socket {
        /// The namespace the socket was for (`None`: the current one).
        ns: Option<String>,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// The kernel refused or failed a netlink request.
    #[error("cannot {action}")]
    Netlink {
        /// What was being done, naming the objects ("add address 10.0.0.1/24 to vh-web").
        action: String,
        /// The kernel's answer (an errno) or the transport failure.
        #[source]
        source: io::Error,
    },

    /// A sysctl key that does not name a file under `/proc/sys`.
    #[error("sysctl key '{key}' is invalid: use a relative path such as net/ipv4/ip_forward")]
    InvalidSysctlKey {
        /// The rejected key.
        key: String,
    },

    /// Reading or writing `/proc/sys/KEY` failed.
    #[error("cannot {op} sysctl {key}{}", in_ns(.ns))]
    Sysctl {
        /// "read" or "write".
        op: &'static str,
        /// The key, as a path under `/proc/sys`.
        key: String,
        /// The namespace (`None`: the current one).
        ns: Option<String>,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// A prefix length longer than the address family allows.
    #[error("prefix length /{prefix} is invalid for {addr}")]
    InvalidPrefix {
        /// The address.
        addr: IpAddr,
        /// The prefix length.
        prefix: u8,
    },

    /// A route destination with bits set beyond its prefix (the kernel rejects these).
    #[error("{addr}/{prefix} is not a network address: host bits are set")]
    HostBitsSet {
        /// The address.
        addr: IpAddr,
        /// The prefix length.
        prefix: u8,
    },

    /// A route whose gateway is not of the destination's address family.
    #[error("gateway {gateway} is not of the same address family as {dst}")]
    FamilyMismatch {
        /// The route's destination.
        dst: IpAddr,
        /// The gateway given for it.
        gateway: IpAddr,
    },

    /// Every /30 of the link pool is assigned already.
    #[error("no free /30 left in 169.254.128.0/17 for namespace {name}")]
    NoFreeSubnet {
        /// The namespace that needed one.
        name: String,
    },

    /// The namespace and its host veth exist but something viscum creates with them is missing.
    #[error(
        "namespace {name} is not a complete viscum service namespace: {detail} (left half-made by a viscum that stopped while making it: `viscum ns del {name}`, then `viscum ns add {name}`)"
    )]
    Incomplete {
        /// The namespace.
        name: String,
        /// What is missing.
        detail: String,
    },
}

/// " in namespace NAME" for messages about work done in another namespace.
fn in_ns(ns: &Option<String>) -> String {
    match ns {
        Some(name) => format!(" in namespace {name}"),
        None => String::new(),
    }
}

/// The errno carried by a netlink error answer, as a positive number.
fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => Some(msg.raw_code().abs()),
        _ => None,
    }
}

/// Wraps an rtnetlink failure, naming what was being done.
///
/// The kernel's errno becomes an [`io::Error`] so that the message chain reads
/// "cannot add route ...: File exists (os error 17)" rather than rtnetlink's debug text.
fn netlink_err(action: impl Into<String>, e: rtnetlink::Error) -> NetnsError {
    let source = match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other),
    };
    NetnsError::Netlink {
        action: action.into(),
        source,
    }
}

/// Checks a prefix length against the address family.
fn check_prefix(addr: IpAddr, prefix: u8) -> Result<(), NetnsError> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(NetnsError::InvalidPrefix { addr, prefix });
    }
    Ok(())
}

/// The network address of `addr/prefix` (host bits cleared). `prefix` must be valid.
fn network_of(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_of_clears_host_bits() {
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(network_of(a, 24), "198.51.100.0".parse::<IpAddr>().unwrap());
        assert_eq!(network_of(a, 32), a);
        assert_eq!(network_of(a, 0), "0.0.0.0".parse::<IpAddr>().unwrap());
        let b: IpAddr = "2001:db8::7".parse().unwrap();
        assert_eq!(network_of(b, 64), "2001:db8::".parse::<IpAddr>().unwrap());
        assert_eq!(network_of(b, 128), b);
        assert_eq!(network_of(b, 0), "::".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn prefix_is_checked_per_family() {
        assert!(check_prefix("10.0.0.0".parse().unwrap(), 32).is_ok());
        assert!(check_prefix("10.0.0.0".parse().unwrap(), 33).is_err());
        assert!(check_prefix("::".parse().unwrap(), 128).is_ok());
        assert!(check_prefix("::".parse().unwrap(), 129).is_err());
    }

    #[test]
    fn messages_name_the_thing() {
        let e = NetnsError::UnknownNamespace {
            name: "edge1".into(),
        };
        assert_eq!(e.to_string(), "namespace edge1 does not exist");
        let e = NetnsError::UnknownInterface {
            name: "eth9".into(),
        };
        assert_eq!(e.to_string(), "interface eth9 does not exist");
        let e = NetnsError::InvalidServiceName {
            name: "Foo!".into(),
        };
        assert_eq!(
            e.to_string(),
            "namespace name 'Foo!' is invalid: use 1-12 characters a-z 0-9 - _"
        );
    }
}
