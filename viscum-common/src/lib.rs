//! Types shared by the kernel classifier (`viscum-ebpf`) and user space (`viscum-user`).
//!
//! Every type that crosses the map boundary is `#[repr(C)]`, has no implicit
//! padding (explicit `_pad` fields, `u32` flags instead of `bool`) and a
//! compile-time size assertion, because the kernel compares key bytes
//! verbatim: a stray padding byte would make two equal keys miss each other.
#![no_std]

/// Name of the map holding redirect entries (`ServiceKey` -> `ServiceEntry`).
pub const SERVICES_MAP: &str = "VISCUM_SERVICES";
/// Name of the per-CPU array of global counters, indexed by [`GlobalCounter`].
pub const GLOBAL_STATS_MAP: &str = "VISCUM_GLOBAL";
/// Name of the single-slot array holding the runtime [`DatapathConfig`].
pub const CONFIG_MAP: &str = "VISCUM_CONFIG";
/// Name of the TC-ingress classifier program in the object file.
pub const INGRESS_PROG: &str = "viscum_ingress";

/// Default capacity of the services map.
pub const DEFAULT_MAX_ENTRIES: u32 = 16_384;

/// IP protocol numbers (IANA) the classifier understands.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Address family tags stored in [`ServiceKey::family`]. These are our own
/// values (not `AF_*`), chosen so a zeroed key is never a valid one.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// A redirect entry's match: protocol, destination address and destination port.
///
/// * `addr` holds the address in network byte order; IPv4 uses the first four
///   bytes and leaves the other twelve zero.
/// * `port` is in **network byte order**, exactly as it sits in the TCP/UDP
///   header, so the classifier can copy it without swapping. `0` means
///   "every port of this address"; an exact-port entry wins over it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

impl ServiceKey {
    /// The same key with the port cleared: the "all ports" entry it falls back to.
    #[inline(always)]
    pub const fn any_port(mut self) -> Self {
        self.port = 0;
        self
    }
}

/// The entry uses `bpf_redirect_peer` into the veth's peer (the fast path).
/// Without it the classifier rewrites the destination MAC and uses
/// `bpf_redirect` to the host-side veth's egress, which still arrives on the
/// peer but costs a second trip through the stack (kernels < 5.10).
pub const TARGET_F_PEER: u32 = 1 << 0;
/// `mac` is valid: rewrite the Ethernet destination to it before redirecting.
/// Needed for plain redirect, and for `bpf_redirect_peer` on kernels < 6.15,
/// where the peer would otherwise drop the frame as `PACKET_OTHERHOST`.
pub const TARGET_F_SET_MAC: u32 = 1 << 1;

/// Where a matching packet goes, plus the entry's counters.
///
/// The map holding it is per-CPU, so each CPU bumps its own `packets`/`bytes`
/// without atomics; user space writes the same target to every CPU's copy
/// and sums the counters when it reads them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Host-side veth ifindex, in the namespace the classifier runs in.
    pub ifindex: u32,
    /// `TARGET_F_*` bits.
    pub flags: u32,
    /// MAC of the namespace-side veth (valid with [`TARGET_F_SET_MAC`]).
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Packets redirected by this entry (this CPU's share).
    pub packets: u64,
    /// Bytes (L2 length as seen at ingress) redirected by this entry.
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 32);

/// Indices into the global per-CPU counter array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalCounter {
    /// Every packet the classifier ran on.
    Seen = 0,
    /// Packets redirected into a service namespace.
    Redirected = 1,
    /// Packets left to the normal stack (misses and non-IP).
    Passed = 2,
    /// IPv4/IPv6 fragments, always passed.
    Fragments = 3,
    /// Truncated or malformed headers, always passed.
    Unparsable = 4,
    /// A hit whose redirect helper failed (target gone): passed to the cloud.
    RedirectErrors = 5,
}

/// Number of slots in the global counter array.
pub const GLOBAL_COUNTERS: u32 = 6;

/// Runtime knobs read by the classifier on every packet (one array slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Non-zero: emit aya-log debug records for every decision.
    pub log_debug: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are repr(C), contain only integers and byte arrays,
    // and have no implicit padding (asserted above).
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceEntry {}
    unsafe impl aya::Pod for super::DatapathConfig {}
}
