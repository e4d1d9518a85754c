//! Types shared by the kernel classifier (`viscum-ebpf`) and user space (`viscum-user`).
//!
//! Every type that crosses the map boundary is `#[repr(C)]`, has no implicit
//! padding (explicit `_pad` fields, `u32` flags instead of `bool`) and a
//! compile-time size assertion, because the kernel compares key bytes
//! verbatim: a stray padding byte would make two equal keys miss each other.
#![no_std]

pub mod close;
pub mod csum;
pub mod hash;

/// Name of the map holding redirect entries (`ServiceKey` -> `ServiceEntry`): one shared
/// hash (not per-CPU), read-only to the classifier.
pub const SERVICES_MAP: &str = "VISCUM_SERVICES";
/// Name of the array of entry counters ([`EntryStats`]): one region per possible CPU, of
/// [`DatapathConfig::stats_stride`] slots each, so CPU `c` counts entry `id` at index
/// `c * stride + id` and never shares a line with another CPU. Slot `id` is
/// [`ServiceEntry::stats_id`]: prefix rules by their rule id (`0..MAX_RULES`), exact entries
/// from [`MAX_RULES`] on. A plain array, not a per-CPU one: a per-CPU array's lookup loads
/// the element's per-CPU pointer from a table first, one more cache and TLB miss per packet
/// when the packets' entries are many (B2). `BPF_F_MMAPABLE`: user space reads it as memory,
/// a window at a time (a pass over every entry's counters maps each window once).
/// Sized by the loader to `possible CPUs * entry_stats_slots(max_entries)`.
pub const ENTRY_STATS_MAP: &str = "VISCUM_ENTRY_STATS";
/// Name of the per-CPU array of global counters, indexed by [`GlobalCounter`].
pub const GLOBAL_STATS_MAP: &str = "VISCUM_GLOBAL";
/// Name of the single-slot array holding the runtime [`DatapathConfig`].
pub const CONFIG_MAP: &str = "VISCUM_CONFIG";
/// Layout version of the pinned maps, recorded by user space in the pin directory at attach.
/// Bump it whenever a pinned map's key or value layout (or a fixed capacity, or a map flag user
/// space relies on) changes, and add a row naming the changed maps to `CHANGES` in
/// `viscum-user/src/engine/layout.rs`; a binary then migrates or refuses older pins instead of
/// misreading them. 1: pins without a marker.
pub const MAP_LAYOUT_VERSION: u32 = 6;
/// Name of the TC-ingress classifier program in the object file.
pub const INGRESS_PROG: &str = "viscum_ingress";

/// Default capacity of the services map.
pub const DEFAULT_MAX_ENTRIES: u32 = 16_384;

/// TCP's IP protocol number (IANA "Assigned Internet Protocol Numbers", RFC 9293).
pub const PROTO_TCP: u8 = 6;
/// UDP's IP protocol number (IANA, RFC 768).
pub const PROTO_UDP: u8 = 17;
/// ICMP's IP protocol number (IANA, RFC 792): errors quoting a redirected flow are translated.
pub const PROTO_ICMP: u8 = 1;
/// ICMPv6's next-header number (IANA, RFC 4443); errors are handled like ICMP's.
pub const PROTO_ICMPV6: u8 = 58;

/// Address family tag for IPv4, stored in the `family` byte of every map key
/// (e.g. [`ServiceKey::family`]). Our own value (not `AF_INET`), chosen so a
/// zeroed key is never a valid one.
pub const FAMILY_V4: u8 = 4;
/// Address family tag for IPv6 (our own value, not `AF_INET6`); see [`FAMILY_V4`].
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
    /// Destination address, network byte order; IPv4 in the first 4 bytes, rest zero.
    pub addr: [u8; 16],
    /// Destination port, network byte order; `0` = every port of `addr`.
    pub port: u16,
    /// IP protocol number ([`PROTO_TCP`] or [`PROTO_UDP`]).
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
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
/// Make the frame the namespace's own before redirecting, for the namespace's IP layer
/// drops a frame classified `PACKET_OTHERHOST` (one not addressed to the client-facing
/// interface's MAC, as on a bridge port whose MAC is not the bridge's). With
/// [`TARGET_F_PEER`] (kernels < 6.15; from 6.15 `bpf_redirect_peer` does it, commit
/// c4327229948879) the classifier marks the skb `PACKET_HOST` (`bpf_skb_change_type`);
/// without it, it rewrites the Ethernet destination to `mac`, which the peer veth then
/// classifies as its own.
pub const TARGET_F_SET_MAC: u32 = 1 << 1;

/// Destination rewrite on the way in and source restore on the way out
/// (NAT mode): the service keeps its own address (`nat_addr`, `nat_port`).
/// Without it (the default, "AnyIP"), packets keep the cloud address and the
/// namespace accepts them through a `local` route.
pub const TARGET_F_NAT: u32 = 1 << 2;
/// The entry takes no new flows; flows already at the edge stay there. Set
/// while a service drains before it is stopped.
pub const TARGET_F_DRAINING: u32 = 1 << 3;
/// Mirror (canary) mode: new flows are cloned to the edge copy while the
/// original continues to the cloud, which keeps serving the client.
pub const TARGET_F_MIRROR: u32 = 1 << 4;

/// Where a matching packet goes: the target only, written by user space and read by the
/// classifier (its counters are in [`EntryStats`], by [`ServiceEntry::stats_id`]).
///
/// One copy for every CPU (a shared hash, 56 bytes): the per-CPU 80-byte value it replaced
/// (target and counters together) cost every lookup the per-CPU indirection, one more cache
/// line and TLB entry at a million entries (B2), for counters only delivered packets need.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Host-side veth ifindex, in the namespace the classifier runs in.
    pub ifindex: u32,
    /// `TARGET_F_*` bits.
    pub flags: u32,
    /// MAC of the namespace-side veth (written with [`TARGET_F_SET_MAC`] when not
    /// [`TARGET_F_PEER`]; mirror mode clones to it).
    pub mac: [u8; 6],
    /// Explicit padding, always zero (see the crate docs).
    pub _pad: [u8; 2],
    /// NAT mode: the service's own address (same layout as `ServiceKey::addr`).
    pub nat_addr: [u8; 16],
    /// NAT mode: the service's own port, network byte order (0 = keep the port).
    pub nat_port: u16,
    /// Explicit padding, always zero.
    pub _pad2: [u8; 2],
    /// The namespace behind the veth, as its netns id in the classifier's namespace (the
    /// veth's `IFLA_LINK_NETNSID`, rtnetlink(7)) **plus one**; 0 = unknown. With it the
    /// classifier asks the service's stack whether it holds a connection
    /// (`bpf_skc_lookup_tcp`) before it gives up a mid-connection TCP packet that has no
    /// flow record.
    pub peer_netns: u32,
    /// `bpf_ktime_get_ns()` time (ns of `CLOCK_MONOTONIC`, bpf-helpers(7)) before which the
    /// entry only *learns*: new UDP 5-tuples are recorded as cloud flows, so datagram flows
    /// that were already talking to the cloud when the entry appeared stay there.
    pub active_after_ns: u64,
    /// Index of this entry's counters in [`ENTRY_STATS_MAP`] (see there), chosen by user
    /// space when the entry is added and kept for its life.
    pub stats_id: u32,
    /// Which owner of counter slot `stats_id` this entry is: chosen by user space when it
    /// gives the entry the slot (the entries' generation then, [`ENTRIES_GEN_WORD`], so two
    /// entries that hold the slot one after the other differ), kept for the entry's life.
    /// The classifier compares it before it adds a flow-cache slot's counts to the entry
    /// (see [`FlowCacheSlot::pending`]): an entry removed and added again under the same
    /// match, given the same counter slot, starts from zero. 0 in entries written before it
    /// (the field was padding).
    pub stats_epoch: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 56);

impl ServiceEntry {
    /// Does this entry (as the maps hold it now) own the counters `copy` (an earlier copy of
    /// an entry) counted for: the same counter slot under the same
    /// [`ServiceEntry::stats_epoch`]?
    #[inline(always)]
    pub const fn owns_counters_of(&self, copy: &ServiceEntry) -> bool {
        self.stats_id == copy.stats_id && self.stats_epoch == copy.stats_epoch
    }

    /// A target (counters slot 0: user space assigns [`ServiceEntry::stats_id`] when it adds
    /// the entry).
    pub const fn new(ifindex: u32, flags: u32, mac: [u8; 6]) -> Self {
        ServiceEntry {
            ifindex,
            flags,
            mac,
            _pad: [0; 2],
            nat_addr: [0; 16],
            nat_port: 0,
            _pad2: [0; 2],
            peer_netns: 0,
            active_after_ns: 0,
            stats_id: 0,
            stats_epoch: 0,
        }
    }
}

/// One entry's counters on one CPU (a slot of one CPU's region of [`ENTRY_STATS_MAP`]);
/// user space sums the CPUs' copies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryStats {
    /// Packets redirected by the entry (a failed redirect counts as a redirect error only).
    pub packets: u64,
    /// Bytes (L2 length as seen at ingress) redirected by the entry.
    pub bytes: u64,
    /// Flows that started at the edge.
    pub new_flows: u64,
    /// New flows that matched but went to the cloud (learning or draining).
    pub cloud_flows: u64,
}
const _: () = assert!(core::mem::size_of::<EntryStats>() == 32);

/// The [`ENTRY_STATS_MAP`] index of exact entry number `slot` (a bit of the id bitmap, see
/// [`STATS_IDS_BASE`]).
#[inline(always)]
pub const fn entry_stats_id(slot: u32) -> u32 {
    MAX_RULES + slot
}

/// Slots of one CPU's region of [`ENTRY_STATS_MAP`] (its stride) for a services map of
/// `max_entries`.
pub const fn entry_stats_slots(max_entries: u32) -> u32 {
    MAX_RULES + max_entries
}

/// Slots per CPU region of [`ENTRY_STATS_MAP`] ([`DatapathConfig::stats_stride`]): the
/// array's `len` as loaded (every region the same size) over the `cpus` it was sized for,
/// the possible CPUs (`/sys/devices/system/cpu/possible`). CPU `c`'s counters of slot `id`
/// are at `c * stride + id`.
pub const fn stats_stride(len: u32, cpus: u32) -> u32 {
    len / if cpus == 0 { 1 } else { cpus }
}

/// Name of the LPM trie of prefix / port-range / source-restricted rules
/// (`lpm Key<PrefixData>` -> `PrefixNode`).
pub const PREFIXES_MAP: &str = "VISCUM_PREFIXES";
/// Name of the per-CPU array of rule targets and counters, indexed by rule id.
pub const RULES_MAP: &str = "VISCUM_RULES";
/// Capacity of the rules array (rule ids are `0..MAX_RULES`).
pub const MAX_RULES: u32 = 4096;
/// Rules one address prefix can hold (distinct port ranges / sources).
pub const RULES_PER_PREFIX: usize = 4;
/// Address prefixes walked from longest to shortest before giving up.
pub const MAX_PREFIX_LEVELS: usize = 8;

/// Data part of the LPM key. The fixed leading 32 bits (protocol, family,
/// padding) are always covered, so `prefix_len = 32 + address prefix`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PrefixData {
    /// IP protocol number ([`PROTO_TCP`] or [`PROTO_UDP`]).
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
    /// Destination address (lookups) or prefix (stored rules), network byte order,
    /// IPv4 in the first 4 bytes; the LPM trie ignores bits past the key's prefix length.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<PrefixData>() == 20);

/// Bits of the LPM key before the address.
pub const PREFIX_KEY_FIXED_BITS: u32 = 32;

/// One rule under an address prefix: a port range and an optional source
/// prefix, pointing at a slot of the rules array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRule {
    /// Source prefix (same layout as `ServiceKey::addr`), already masked to
    /// `src_prefix` bits.
    pub src: [u8; 16],
    /// `src_prefix` leading one bits (all zero for "any source"). Stored with
    /// the rule so the classifier compares a source with three branch-free
    /// byte operations per byte instead of a per-byte loop whose bound depends
    /// on the prefix length: that loop made the 6.1 and 6.12 verifiers walk
    /// past their 1M-instruction limit. See [`PortRule::source_mask`].
    pub src_mask: [u8; 16],
    /// First port of the inclusive destination port range, **host** byte order
    /// (compared, not hashed).
    pub port_lo: u16,
    /// Last port of the inclusive destination port range, host byte order.
    pub port_hi: u16,
    /// Source prefix length in bits (0..=32 for IPv4, 0..=128 for IPv6); 0 = any source.
    pub src_prefix: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
    /// Slot of the rule's [`ServiceEntry`] in the rules array ([`RULES_MAP`]),
    /// `0..MAX_RULES`.
    pub rule_id: u32,
}
const _: () = assert!(core::mem::size_of::<PortRule>() == 44);

impl PortRule {
    /// The mask of a `bits`-long source prefix (network order, `bits` clamped to 128).
    pub const fn source_mask(bits: u8) -> [u8; 16] {
        let mut mask = [0u8; 16];
        let mut i = 0;
        while i < 16 {
            let start = (i * 8) as u32;
            let bits = if bits > 128 { 128 } else { bits } as u32;
            mask[i] = if bits >= start + 8 {
                0xff
            } else if bits > start {
                0xffu8 << (8 - (bits - start))
            } else {
                0
            };
            i += 1;
        }
        mask
    }
}

/// Everything under one address prefix, most specific rule first (user space
/// keeps the order: source-restricted before unrestricted, narrow port
/// ranges before wide ones).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixNode {
    /// The rules, most specific first; only the first `count` are valid.
    pub rules: [PortRule; RULES_PER_PREFIX],
    /// Number of valid rules in `rules` (`0..=RULES_PER_PREFIX`).
    pub count: u32,
    /// This node's own key prefix length: an LPM lookup does not say which
    /// prefix matched, and the walk to shorter prefixes needs it.
    pub prefix_len: u32,
}
const _: () = assert!(core::mem::size_of::<PrefixNode>() == 184);

/// Name of the miss pre-filter: an array of [`PORT_FILTER_WORDS`] `u64` words, a bitmap over
/// (protocol, destination port) in which a **set** bit means "no entry or rule can match this
/// protocol and port" (see [`port_filter_slot`]). The classifier passes such packets before
/// it hashes a services-map key or walks the prefix trie: unmanaged traffic, most of a
/// router's, pays one array read.
///
/// The sense is inverted on purpose: a fresh (all-zero) map filters nothing, so a classifier
/// whose filter was never built, or was pinned by a version that did not know it, is only
/// slower, never wrong. User space builds it from the full contents of the services map and
/// the prefix table, clears an entry's bits before the entry can be looked up, and only
/// sets bits in a rebuild that read every entry.
pub const PORTS_MAP: &str = "VISCUM_PORTS";
/// Words of the port bitmap: 1024 per protocol (TCP, then UDP; 65,536 ports each).
pub const PORT_FILTER_BITMAP_WORDS: u32 = 2 * 1024;
/// Words of the address bitmap that follows the marker word in [`PORTS_MAP`] (65,536 bits,
/// see [`addr_filter_slot`]): a **set** bit means "no services-map key has an address with
/// this hash". It rejects misses on a managed port (the cloud's HTTPS while an edge copy
/// serves one HTTPS address) before the services-map hash; it cannot speak for prefix
/// rules, so the classifier consults it only while there are none.
pub const ADDR_FILTER_WORDS: u32 = 1024;
/// Index of the first word of the address bitmap in [`PORTS_MAP`].
pub const ADDR_FILTER_BASE: u32 = PORT_FILTER_BITMAP_WORDS + 1;
/// Words of the miss pre-filter, at the start of [`PORTS_MAP`]: the port bitmap, one marker word (index
/// [`PORT_FILTER_BITMAP_WORDS`]) that user space sets to [`PORT_FILTER_BUILT`] once it has built
/// the filter from the maps' contents (the classifier never reads it), then the address bitmap.
pub const PORT_FILTER_WORDS: u32 = ADDR_FILTER_BASE + ADDR_FILTER_WORDS;
/// First word, in [`PORTS_MAP`], of the bitmap of exact entries' counter slots in use (bit
/// `n` set: [`entry_stats_id`]`(n)` belongs to an entry). User space's bookkeeping, never read
/// by the classifier: it lives here for the shared mapping user space already has of this
/// map (a free slot is found by scanning words, not by a bpf(2) call per word), and like
/// the filter it is rebuilt from the entries when the map is new. The loader sizes the map
/// with [`ports_words`].
pub const STATS_IDS_BASE: u32 = STATS_HINT_WORD + 1;

/// Index, in [`PORTS_MAP`], of the slot bitmap's search hint: the first of its words that
/// may hold a free bit (every word before it is full). A claim starts there and a release
/// below it moves it back, so adding an entry scans a word or two, not the whole bitmap
/// (16,384 words at a million entries).
pub const STATS_HINT_WORD: u32 = ENTRIES_GEN_WORD + 1;

/// Index, in [`PORTS_MAP`], of the entries' generation: a count user space moves after
/// every change to an entry or rule (its store is the change's last write). The flow cache
/// repeats a decision only under the generation it was taken in, so an entry removed,
/// re-targeted or shadowed by a new one is obeyed from the next packet on.
pub const ENTRIES_GEN_WORD: u32 = PORT_FILTER_WORDS;

/// Size of [`PORTS_MAP`] for a services map of `max_entries`: the filter, the entries'
/// generation, the slot bitmap's hint, then one bit per possible exact entry.
pub const fn ports_words(max_entries: u32) -> u32 {
    STATS_IDS_BASE + max_entries.div_ceil(64)
}

/// The word index (into [`PORTS_MAP`]) and bit of destination address `addr` (16 bytes,
/// network order, IPv4 in the first four, the rest zero) in the address bitmap: the four
/// big-endian words XORed, times the 32-bit golden-ratio constant (Fibonacci hashing,
/// Knuth TAOCP vol. 3, 6.4), top 16 bits. The same arithmetic on any byte order.
#[inline(always)]
pub const fn addr_filter_slot(addr: &[u8; 16]) -> (u32, u64) {
    let w0 = u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]);
    let w1 = u32::from_be_bytes([addr[4], addr[5], addr[6], addr[7]]);
    let w2 = u32::from_be_bytes([addr[8], addr[9], addr[10], addr[11]]);
    let w3 = u32::from_be_bytes([addr[12], addr[13], addr[14], addr[15]]);
    let idx = (w0 ^ w1 ^ w2 ^ w3).wrapping_mul(0x9E37_79B1) >> 16;
    (ADDR_FILTER_BASE + (idx >> 6), 1u64 << (idx & 63))
}
/// Value of the marker word once the filter has been built.
pub const PORT_FILTER_BUILT: u64 = 1;

/// The word index and bit of (`proto`, `port`) in the port bitmap; `port` in **host** byte
/// order. UDP uses the second half, every other protocol the first (only TCP and UDP ever
/// reach the lookup).
#[inline(always)]
pub const fn port_filter_slot(proto: u8, port: u16) -> (u32, u64) {
    let base = if proto == PROTO_UDP { 1024 } else { 0 };
    (base + (port as u32 >> 6), 1u64 << (port & 63))
}

/// A port bitmap being built in user space (see [`PORTS_MAP`]): starts with every port
/// unmanaged; [`PortFilter::manage`] clears the bits an entry or rule can match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortFilter {
    /// The words, indexed as [`port_filter_slot`] says.
    pub words: [u64; PORT_FILTER_BITMAP_WORDS as usize],
    /// The address bitmap, indexed as [`addr_filter_slot`] says minus [`ADDR_FILTER_BASE`].
    pub addrs: [u64; ADDR_FILTER_WORDS as usize],
}

impl Default for PortFilter {
    fn default() -> Self {
        Self::new()
    }
}

impl PortFilter {
    /// Every (protocol, port) unmanaged: the filter of empty maps.
    pub const fn new() -> Self {
        PortFilter {
            words: [!0; PORT_FILTER_BITMAP_WORDS as usize],
            addrs: [!0; ADDR_FILTER_WORDS as usize],
        }
    }

    /// Marks ports `lo..=hi` (host order) of `proto` as managed.
    pub fn manage(&mut self, proto: u8, lo: u16, hi: u16) {
        let mut port = lo;
        while port <= hi {
            let (w, bit) = port_filter_slot(proto, port);
            if port & 63 == 0 && hi - port >= 63 {
                self.words[w as usize] = 0;
                port = port.saturating_add(64);
                if port == 0 {
                    break;
                }
                continue;
            }
            self.words[w as usize] &= !bit;
            if port == u16::MAX {
                break;
            }
            port += 1;
        }
    }

    /// The value of [`PORTS_MAP`] word `index`: a port or address word, `None` for the
    /// marker word and past the end.
    pub const fn word(&self, index: u32) -> Option<u64> {
        if index < PORT_FILTER_BITMAP_WORDS {
            Some(self.words[index as usize])
        } else if index >= ADDR_FILTER_BASE && index < PORT_FILTER_WORDS {
            Some(self.addrs[(index - ADDR_FILTER_BASE) as usize])
        } else {
            None
        }
    }

    /// Marks what services-map key `key` matches: its address, and its port or every
    /// port of its protocol for an "all ports" key (`port` 0).
    pub fn manage_key(&mut self, key: &ServiceKey) {
        let (w, bit) = addr_filter_slot(&key.addr);
        self.addrs[(w - ADDR_FILTER_BASE) as usize] &= !bit;
        let port = u16::from_be(key.port);
        if port == 0 {
            self.manage(key.proto, 0, u16::MAX);
        } else {
            self.manage(key.proto, port, port);
        }
    }

    /// Is (`proto`, `port`) unmanaged (host-order port)?
    pub const fn unmanaged(&self, proto: u8, port: u16) -> bool {
        let (w, bit) = port_filter_slot(proto, port);
        self.words[w as usize] & bit != 0
    }

    /// Is no services-map key's address hashed to the bit of `addr`?
    pub const fn addr_unmanaged(&self, addr: &[u8; 16]) -> bool {
        let (w, bit) = addr_filter_slot(addr);
        self.addrs[(w - ADDR_FILTER_BASE) as usize] & bit != 0
    }
}

/// Name of the LRU table of cloud decisions (`FlowKey` -> `FlowState`): UDP flows that
/// matched an entry while it was learning or draining, so they stay with the cloud.
pub const FLOWS_MAP: &str = "VISCUM_FLOWS";
/// Name of the LRU table of edge flows (`ReplyKey` -> `ReplyState`): one record per flow
/// served at the edge, read by both directions (the classifier's decision and the reply
/// path's identity), so the two can never disagree.
pub const REPLIES_MAP: &str = "VISCUM_REPLIES";
/// Name of the reply-path classifier attached to service veths.
pub const REPLY_PROG: &str = "viscum_reply";
/// Default capacity of the flow and reply tables.
pub const DEFAULT_FLOW_ENTRIES: u32 = 65_536;

/// A client's flow towards a matched service, as seen on the way in.
/// Addresses and ports in network byte order, IPv4 in the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client (source) address.
    pub client: [u8; 16],
    /// Service (destination) address the client sent to.
    pub service: [u8; 16],
    /// Client (source) port.
    pub client_port: u16,
    /// Service (destination) port.
    pub service_port: u16,
    /// IP protocol number ([`PROTO_TCP`] or [`PROTO_UDP`]).
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Name of the classifier's flow cache: an array of [`FlowCacheSlot`]s, one region of
/// [`FLOW_CACHE_SLOTS`] per possible CPU (CPU `c`'s slot `i` at index
/// `c * FLOW_CACHE_SLOTS + i`), not pinned. A plain array rather than a per-CPU one: a
/// per-CPU array's lookup first reads the element's pointer from a table of 16,384 (128 KiB,
/// a cache line and often a TLB entry of its own on every packet) before the slot itself.
/// The loader sizes it for every possible CPU; the object's own size is one CPU's worth (a
/// loader that does not size it leaves the other CPUs without a cache: their packets take
/// the full path).
pub const FLOW_CACHE_MAP: &str = "VISCUM_FCACHE";

/// Slots per CPU of the classifier's flow cache ([`FLOW_CACHE_MAP`]): 16,384 × 128 bytes
/// = 2 MiB per CPU. A power of two (the slot index is the top bits of a hash).
pub const FLOW_CACHE_SLOTS: u32 = 16_384;

/// Entries of the flow cache ([`FLOW_CACHE_MAP`]) for `cpus` possible CPUs.
pub const fn flow_cache_entries(cpus: u32) -> u32 {
    FLOW_CACHE_SLOTS.saturating_mul(cpus)
}

/// One slot of the classifier's per-CPU flow cache (128 bytes: two cache lines): an
/// established TCP edge flow's client-side 5-tuple, until when its decision may be repeated
/// without looking anything up, and a copy of the entry it was decided for, which the
/// packet is then delivered by (no services-map lookup).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowCacheSlot {
    /// Client address as four native-order words of its network-order bytes.
    pub client: [u32; 4],
    /// Service (destination) address, as `client`.
    pub service: [u32; 4],
    /// Client port | service port << 16 | protocol << 32 | family << 40 (ports in network
    /// order).
    pub tail: u64,
    /// The kernel tick (`bpf_jiffies64`, 5.5+) before which the slot may be used; 0 =
    /// empty. Ticks, not ns: a packet served from the slot then reads no clock but the
    /// jiffies counter (the coarse clock costs a per-CPU cache of it, two more lines).
    pub valid_until_tick: u64,
    /// The classifier's churn count (edge-flow inserts, and replies that found no record)
    /// when the slot was filled.
    pub churn: u64,
    /// The entries' generation ([`ENTRIES_GEN_WORD`]) read before the entry was looked up.
    pub generation: u64,
    /// The entry the flow's record was found for, as it was at the fill.
    pub target: ServiceEntry,
    /// Redirects delivered from this slot and not yet added to the entry's counters
    /// ([`ENTRY_STATS_MAP`]): packets in the low 32 bits, bytes in the high 32 (see
    /// [`pending_packets`], [`pending_bytes`]). A hit counts here, in the line it already
    /// read the entry from, instead of in the entry's own counter line, a cache and TLB miss
    /// per packet once the entries outnumber the cache (B2, a million entries). The
    /// classifier adds them to the entry when the slot is filled again or emptied (a flow's
    /// slot is refilled by its first packet after the slot's life, a fraction of a second),
    /// and user space adds what is still here when it reads the counters.
    pub pending: u64,
}
const _: () = assert!(core::mem::size_of::<FlowCacheSlot>() == 128);

impl FlowCacheSlot {
    /// [`FlowCacheSlot::tail`] of a flow: client port, service port (both network order),
    /// protocol and family.
    #[inline(always)]
    pub const fn tail_of(client_port: u16, service_port: u16, proto: u8, family: u8) -> u64 {
        client_port as u64
            | (service_port as u64) << 16
            | (proto as u64) << 32
            | (family as u64) << 40
    }

    /// The services-map key of the slot's destination (what an exact entry for its flow is
    /// found by).
    #[inline(always)]
    pub fn service_key(&self) -> ServiceKey {
        ServiceKey {
            // SAFETY: same size, plain bytes: the words are the address's bytes in order.
            addr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(self.service) },
            port: (self.tail >> 16) as u16,
            proto: (self.tail >> 32) as u8,
            family: (self.tail >> 40) as u8,
        }
    }
}

/// Packets of a [`FlowCacheSlot::pending`] word.
#[inline(always)]
pub const fn pending_packets(pending: u64) -> u64 {
    pending & 0xffff_ffff
}

/// Bytes (L2 length at ingress, as [`EntryStats::bytes`]) of a [`FlowCacheSlot::pending`]
/// word.
#[inline(always)]
pub const fn pending_bytes(pending: u64) -> u64 {
    pending >> 32
}

/// One more redirect of `len` bytes in a [`FlowCacheSlot::pending`] word, or `None` when
/// either half would overflow (the slot's counts must then go to the entry first).
#[inline(always)]
pub const fn pending_add(pending: u64, len: u32) -> Option<u64> {
    if pending_packets(pending) == 0xffff_ffff || pending_bytes(pending) + len as u64 > 0xffff_ffff
    {
        return None;
    }
    Some(pending + 1 + ((len as u64) << 32))
}

/// Word of a [`FlowCacheSlot`] (as `u64`s, native order) holding [`FlowCacheSlot::pending`].
pub const FLOW_CACHE_PENDING_WORD: usize = 15;
const _: () = assert!(core::mem::offset_of!(FlowCacheSlot, pending) == FLOW_CACHE_PENDING_WORD * 8);

/// The slot of the global counter array ([`GLOBAL_STATS_MAP`]) where the classifier adds
/// redirects a flow-cache slot held (see [`FlowCacheSlot::pending`]) whose entry was gone
/// by the time they were added: the packets still count in the global `redirected`, which
/// user space reads as the entries' counters, plus the removed entries' (its own slot), plus
/// this. It is [`GlobalCounter::Seen`]'s slot, which nothing else writes (`seen` is computed,
/// see [`INGRESS_EXITS`]).
pub const LATE_REDIRECTS_SLOT: u32 = GlobalCounter::Seen as u32;

/// Name of the reply program's cache: an array of [`ReplyCacheSlot`]s, one region of
/// [`REPLY_CACHE_SLOTS`] per possible CPU, laid out and sized like [`FLOW_CACHE_MAP`], not
/// pinned.
pub const REPLY_CACHE_MAP: &str = "VISCUM_RCACHE";

/// Slots per CPU of the reply cache ([`REPLY_CACHE_MAP`]): 8,192 × 128 bytes = 1 MiB per
/// CPU. A power of two.
pub const REPLY_CACHE_SLOTS: u32 = 8_192;

/// How old an edge flow's FIB result (taken by its first reply) must be, ns, before the reply
/// program caches the flow ([`REPLY_CACHE_MAP`]): longer than a connection-per-request
/// exchange lives, so that such a load, which the cache could not serve, pays for no fills.
pub const REPLY_CACHE_FILL_AFTER_NS: u64 = 10_000_000;

/// Entries of the reply cache ([`REPLY_CACHE_MAP`]) for `cpus` possible CPUs.
pub const fn reply_cache_entries(cpus: u32) -> u32 {
    REPLY_CACHE_SLOTS.saturating_mul(cpus)
}

/// One slot of the reply program's per-CPU cache (128 bytes: two cache lines): the edge
/// record key of an established TCP flow's replies, until when the slot may be used, and a
/// copy of the record with its FIB result, which such a reply is then sent out by (no
/// edge-record lookup).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyCacheSlot {
    /// The client (the reply's destination) as four native-order words of its
    /// network-order bytes.
    pub client: [u32; 4],
    /// Client port | service's local port << 16 | protocol << 32 | family << 40 (ports in
    /// network order).
    pub tail: u64,
    /// The host veth the replies arrive on.
    pub ifindex: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// The kernel tick (`bpf_jiffies64`) before which the slot may be used; 0 = empty.
    pub valid_until_tick: u64,
    /// The reply program's identity generation (moved when a namespace port's cloud
    /// endpoint becomes ambiguous or is learned afresh) when the slot was filled.
    pub identities: u64,
    /// The entries' generation ([`ENTRIES_GEN_WORD`]) when the slot was filled.
    pub generation: u64,
    /// The flow's edge record as it was at the fill, FIB result included, but for its two
    /// timestamps, which a hit never reads: they hold the source address the flow's replies
    /// come from (as sent by the service, before any rewrite), which a reply must match.
    pub record: ReplyState,
}
const _: () = assert!(core::mem::size_of::<ReplyCacheSlot>() == 128);

/// [`FlowState::decision`]: the flow went to the cloud.
pub const FLOW_CLOUD: u32 = 2;

/// A cloud decision for a flow that matched an entry, and when it was last seen: a UDP flow
/// that began while its entry learned or drained (kept for the flow's life), or a TCP
/// connection found mid-way that the service's stack did not hold (kept for
/// [`DatapathConfig::linger_ns`] past its last packet, so its later packets skip the socket
/// lookup; see the classifier's flow module).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowState {
    /// `bpf_ktime_get_coarse_ns()` (ns of `CLOCK_MONOTONIC`, tick resolution) of the flow's
    /// last packet, refreshed at most about once a second.
    pub last_seen_ns: u64,
    /// [`FLOW_CLOUD`] (the only decision kept here; edge flows live in [`REPLIES_MAP`]).
    pub decision: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<FlowState>() == 16);

/// A reply leaving a service namespace, keyed as it arrives on the host veth:
/// the client is the destination; `local_port` is the source port the
/// service answers from (the cloud port, or the NAT port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReplyKey {
    /// Client address (the reply's destination), network byte order, IPv4 in the first 4 bytes.
    pub client: [u8; 16],
    /// Client port (the reply's destination port), network byte order.
    pub client_port: u16,
    /// Port the service answers from (the reply's source port), network byte order.
    pub local_port: u16,
    /// IP protocol number ([`PROTO_TCP`] or [`PROTO_UDP`]).
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
    /// Host veth the reply arrives on.
    pub ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<ReplyKey>() == 28);

/// An edge flow, keyed by what the service sees ([`ReplyKey`]): the identity its replies
/// must carry (the cloud address and port the client talked to; a reply from any other
/// source, a UDP server answering from its veth address or NAT mode, is rewritten to it),
/// and the flow's timestamps. The classifier finds it from the client's packets (key built
/// from the packet and its entry), the reply program from the service's: one record, one
/// lookup per packet each way, one insert per new flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyState {
    /// `bpf_ktime_get_coarse_ns()` (ns of `CLOCK_MONOTONIC`, tick resolution) of the flow's
    /// last client packet, refreshed at most about once a second.
    pub last_seen_ns: u64,
    /// `bpf_ktime_get_ns()` of the first FIN/RST from either side (0 = still open); the
    /// flow is forgotten [`DatapathConfig::linger_ns`] later.
    pub closing_at_ns: u64,
    /// Cloud address the client talked to, network byte order, IPv4 in the first 4 bytes.
    pub service: [u8; 16],
    /// Cloud port the client talked to, network byte order.
    pub service_port: u16,
    /// MTU of [`fib_ifindex`](Self::fib_ifindex) as the FIB lookup reported it (bytes from
    /// the network header on); meaningful only with `fib_at_ns`.
    pub fib_mtu: u16,
    /// `REPLY_F_*` bits.
    pub flags: u32,
    /// The reply program's FIB result for this flow, used for at most a second
    /// ([`FIB_CACHE_NS`]: the record reuses it for 750 ms, its copies in the reply cache for
    /// the rest): when it was taken (the coarse clock; 0 = none yet), the egress interface
    /// and the Ethernet addresses (destination first, as on the wire). Replies of an
    /// established flow then skip `bpf_fib_lookup` (the route, nexthop and neighbour lookups
    /// and their cache misses) but for about one a second: a route or neighbour change
    /// reaches the flow within that second.
    pub fib_at_ns: u64,
    /// Egress ifindex of the cached FIB result.
    pub fib_ifindex: u32,
    /// Destination then source MAC of the cached FIB result.
    pub fib_macs: [u8; 12],
    /// The service's network-share class (`skb->priority`, see [`SHARES_MAP`]) as it was
    /// when the FIB result was taken; 0 = none.
    pub fib_class: u32,
    /// The sequence number (host order) just past the close's latest FIN: the first one
    /// until the other side's FIN acknowledges it ([`REPLY_F_LAST_ACK`]), then the second.
    /// Meaningful only with [`REPLY_F_FIN_CLIENT`] or [`REPLY_F_FIN_SERVICE`]; see
    /// [`close`]. (Padding, always zero, in records written before 2026-12-03.)
    pub fin_seq: u32,
}

/// The longest the reply program uses a flow's FIB result ([`ReplyState::fib_at_ns`]) for,
/// ns: the record's own reuse ends earlier, so that the reply cache's copies end by then.
pub const FIB_CACHE_NS: u64 = 1_000_000_000;

/// The flow is mirrored: the cloud answers the client, so the edge copy's
/// replies are dropped on the service veth.
pub const REPLY_F_DROP: u32 = 1 << 0;
/// The flow is under way: for TCP, a client packet other than a bare SYN arrived on the
/// record (the handshake's ACK), or the record was restored from the service's stack, which
/// held the connection; UDP flows have it from their first datagram. A TCP record without it
/// is a half-open flow, a SYN nobody followed (a scan, a spoofed SYN of a flood, a client
/// that gave up): it is no open flow for `stats`, and no drain waits for it. Records written
/// by a version without the bit get it with their flow's next client packet.
pub const REPLY_F_ESTABLISHED: u32 = 1 << 1;
/// The client sent the connection's first FIN (see [`close`]).
pub const REPLY_F_FIN_CLIENT: u32 = 1 << 2;
/// The service sent the connection's first FIN (see [`close`]).
pub const REPLY_F_FIN_SERVICE: u32 = 1 << 3;
/// The other side's FIN acknowledged the first one: the first side's ACK of
/// [`ReplyState::fin_seq`] is the connection's last segment, after which the record is removed
/// (see [`close`]).
pub const REPLY_F_LAST_ACK: u32 = 1 << 4;
const _: () = assert!(core::mem::size_of::<ReplyState>() == 72);

/// Name of the program array the classifiers tail-call into for ICMP errors.
pub const JUMP_MAP: &str = "VISCUM_JUMP";
/// Slots of [`JUMP_MAP`].
pub const JUMP_SLOTS: u32 = 3;
/// Slot of `viscum_icmp_ingress` (errors from the network about edge flows).
pub const JUMP_ICMP_INGRESS: u32 = 0;
/// Slot of `viscum_icmp_reply` (errors from edge copies about client flows).
pub const JUMP_ICMP_REPLY: u32 = 1;
/// Slot of `viscum_recover` (a mid-connection TCP packet whose flow record is gone).
pub const JUMP_RECOVER: u32 = 2;
/// Name of the program that asks a service namespace's stack whether it holds the
/// connection of a TCP packet that has no flow record (evicted, or expired while idle), and
/// serves it at the edge if so; tail-called from `viscum_ingress`.
pub const RECOVER_PROG: &str = "viscum_recover";
/// Name of the ICMP program of the client-facing side.
pub const ICMP_INGRESS_PROG: &str = "viscum_icmp_ingress";
/// Name of the ICMP program of the service side.
pub const ICMP_REPLY_PROG: &str = "viscum_icmp_reply";

/// Name of the hash of network shares (`u32` host-veth ifindex -> `u32` `skb->priority`),
/// written by the daemon (`[service.network]`, `viscum-user/src/shares`): `viscum_reply` gives
/// a reply it sends out to the client the priority of its service's veth, which is the
/// service's HTB class handle (`major << 16 | minor`) on the client-facing interface, so the
/// kernel's HTB qdisc there divides the link among services by their shares. A veth without
/// an entry leaves the priority alone.
pub const SHARES_MAP: &str = "VISCUM_SHARES";
/// Capacity of [`SHARES_MAP`]: service veths with a share at once.
pub const SHARES_ENTRIES: u32 = 1024;

/// Name of the LRU fragment table (`FragKey` -> `FragPorts`).
pub const FRAGS_MAP: &str = "VISCUM_FRAGS";
/// Capacity of the fragment table: datagrams in reassembly at once.
pub const FRAG_ENTRIES: u32 = 8192;

/// One fragmented datagram, as its fragments identify it (RFC 791 / RFC
/// 8200: source, destination, protocol and identification). Addresses in
/// network order, IPv4 in the first 4 bytes; `id` in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address of the datagram.
    pub src: [u8; 16],
    /// Destination address of the datagram.
    pub dst: [u8; 16],
    /// Fragment identification, host byte order (16 bits widened for IPv4,
    /// 32 bits for the IPv6 Fragment header).
    pub id: u32,
    /// Upper-layer protocol ([`PROTO_TCP`] or [`PROTO_UDP`]).
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// The L4 ports of a fragmented datagram, learnt from its first fragment so
/// the later ones (which carry no L4 header) take the same flow's decision,
/// as Cilium's IPv4/IPv6 fragment tracking does. Network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragPorts {
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
}
const _: () = assert!(core::mem::size_of::<FragPorts>() == 4);

/// The registry of global counters: the one place each counter is spelled.
///
/// Every row is `Variant = slot, json_name, "COLUMN", StatsRow, FAMILY, "label", "help";`:
/// the [`GlobalCounter`] variant and its slot in the per-CPU array (the kernel bumps it by
/// slot, so a slot never moves), the snake_case name (a field of user space's `GlobalStats`
/// and its key in `viscum stats --json` and the daemon's status), the column header and row of
/// the `viscum stats` table, the Prometheus family ([`MetricFamily`]) and label value under
/// which the daemon's metrics endpoint exports it, and the help text. Rows are in display
/// order (JSON keys, table columns and metric samples follow it), not slot order.
///
/// `global_counters!(m)` invokes the macro `m` with the whole table, so each consumer
/// generates its own view (the enum and [`GLOBAL_COUNTER_INFO`] here, `GlobalStats` in
/// user space) and a new counter is one new row. As with Cilium's single list of drop
/// reasons, nothing else needs to learn of it.
#[macro_export]
macro_rules! global_counters {
    ($m:ident) => {
        $m! {
            Seen = 0, seen, "SEEN", Packets, DATAPATH_PACKETS, "seen",
                "Every packet the classifier ran on: the sum of its exits (INGRESS_EXITS), each counted once by the packet that takes it.";
            Redirected = 1, redirected, "REDIRECTED", Packets, DATAPATH_PACKETS, "redirected",
                "Packets redirected into a service namespace: the sum of every entry's and rule's packets, counted once by the classifier in the entry's counters (a flow-cache hit first in its cache slot); the slot keeps what removed entries counted (user space moves it there).";
            Passed = 2, passed, "PASSED", Packets, DATAPATH_PACKETS, "passed",
                "Packets left to the normal stack (misses and non-IP).";
            Fragments = 3, fragments, "FRAGMENTS", Packets, DATAPATH_PACKETS, "fragments",
                "IPv4/IPv6 fragments of TCP/UDP datagrams seen (first or later).";
            FragmentsUnknown = 14, fragments_unknown, "FRAGS_UNKNOWN", Packets, DATAPATH_PACKETS,
                "fragments_unknown",
                "Later fragments whose first fragment was never seen (out of order, or evicted): their ports are unknown, so they are passed untouched.";
            Unparsable = 4, unparsable, "UNPARSABLE", Packets, DATAPATH_PACKETS, "unparsable",
                "Truncated or malformed headers, always passed.";
            RedirectErrors = 5, redirect_errors, "REDIRECT_ERRORS", Packets, DATAPATH_PACKETS,
                "redirect_errors",
                "A hit whose redirect helper failed (target gone).";
            FlowsEdge = 6, flows_edge, "EDGE_FLOWS", Flows, DATAPATH_FLOWS, "edge",
                "Flows that started at the edge: the sum of every entry's and rule's edge_flows, counted once by the classifier in the entry's counters; the slot keeps what removed entries counted.";
            FlowsCloud = 7, flows_cloud, "CLOUD_FLOWS", Flows, DATAPATH_FLOWS, "cloud",
                "Matched flows sent to the cloud (entry learning or draining): the sum of every entry's and rule's cloud_flows, counted as edge_flows is.";
            FlowOrphans = 8, flow_orphans, "ORPHANS", Flows, DATAPATH_FLOW_ORPHANS, "",
                "Mid-flow TCP packets for a matched service with no flow state: flows opened before the entry, or evicted from a full flow table.";
            RepliesForwarded = 9, replies_forwarded, "REPLIES_FWD", Flows, DATAPATH_REPLIES,
                "forwarded",
                "Replies forwarded straight to the client-facing interface.";
            RepliesRewritten = 10, replies_rewritten, "REPLIES_REWRITTEN", Flows,
                DATAPATH_REPLIES_REWRITTEN, "",
                "Replies whose source was rewritten to the cloud identity.";
            RepliesToStack = 11, replies_to_stack, "REPLIES_TO_STACK", Flows, DATAPATH_REPLIES,
                "to_stack",
                "Replies left to the kernel's routing (no FIB result, too large for the egress MTU, TTL expiring, or a VLAN tag in the frame).";
            RepliesUnknown = 12, replies_unknown, "REPLIES_UNKNOWN", Flows, DATAPATH_REPLIES,
                "unknown",
                "Packets from service namespaces that belong to no known flow.";
            Mirrored = 13, mirrored, "MIRRORED", Flows, DATAPATH_MIRRORED, "",
                "Packets cloned to a mirror (canary) target.";
            IcmpToEdge = 15, icmp_to_edge, "ICMP_TO_EDGE", Icmp, DATAPATH_ICMP_ERRORS, "to_edge",
                "ICMP/ICMPv6 errors from the network about an edge flow, sent to the edge copy (path MTU, unreachable...).";
            IcmpToClient = 16, icmp_to_client, "ICMP_TO_CLIENT", Icmp, DATAPATH_ICMP_ERRORS,
                "to_client",
                "ICMP/ICMPv6 errors from an edge copy about a client's flow, sent to the client through the reply path.";
            IcmpDropped = 17, icmp_dropped, "ICMP_DROPPED", Icmp, DATAPATH_ICMP_ERRORS,
                "dropped",
                "ICMP errors about a mirrored flow, dropped (the cloud answers).";
            MssClamped = 18, mss_clamped, "MSS_CLAMPED", Icmp, DATAPATH_MSS_CLAMPED, "",
                "Redirected TCP SYNs (and edge SYN-ACKs) whose MSS option was lowered to fit the interface MTU.";
            FlowsRecovered = 20, flows_recovered, "RECOVERED", Flows, DATAPATH_FLOWS_RECOVERED,
                "",
                "Edge flows whose lost record (evicted, e.g. by a SYN flood, or expired) was restored: by a mid-flow TCP packet whose connection the service's own stack holds, or by a reply that answers for a live entry of its veth and port; the flow stays at the edge.";
            TargetGone = 19, target_gone, "TARGET_GONE", Icmp, DATAPATH_TARGET_GONE, "",
                "Hits whose target interface no longer exists (namespace or veth deleted): passed to the cloud instead of being black-holed.";
        }
    };
}

/// Which row of the `viscum stats` table a counter is shown in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsRow {
    /// What happened to packets at the client-facing classifier.
    Packets,
    /// Flow decisions, and the reply path out of service namespaces.
    Flows,
    /// ICMP errors, MSS clamping, and hits on vanished targets.
    Icmp,
}

impl StatsRow {
    /// The rows, top to bottom.
    pub const ALL: [StatsRow; 3] = [StatsRow::Packets, StatsRow::Flows, StatsRow::Icmp];
}

/// A Prometheus metric family that global counters are exported in (all of type `counter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricFamily {
    /// The metric name, e.g. `viscum_datapath_packets_total`.
    pub name: &'static str,
    /// The label that tells the family's counters apart (`result`, `where`...); empty for
    /// a family of one counter, which is exported without labels.
    pub label: &'static str,
    /// The `# HELP` text.
    pub help: &'static str,
}

/// `viscum_datapath_flows_recovered_total`.
pub const DATAPATH_FLOWS_RECOVERED: MetricFamily = MetricFamily {
    name: "viscum_datapath_flows_recovered_total",
    label: "",
    help: "Edge flows whose evicted or expired record was restored because the service namespace still held the connection.",
};

/// `viscum_datapath_packets_total{result=...}`.
pub const DATAPATH_PACKETS: MetricFamily = MetricFamily {
    name: "viscum_datapath_packets_total",
    label: "result",
    help: "Packets seen by the classifier, by outcome.",
};
/// `viscum_datapath_flows_total{where=...}`.
pub const DATAPATH_FLOWS: MetricFamily = MetricFamily {
    name: "viscum_datapath_flows_total",
    label: "where",
    help: "Matched flows, by where they went.",
};
/// `viscum_datapath_flow_orphans_total`.
pub const DATAPATH_FLOW_ORPHANS: MetricFamily = MetricFamily {
    name: "viscum_datapath_flow_orphans_total",
    label: "",
    help: "Mid-connection packets of matched services with no flow state: connections older \
           than their entry, or flow-table evictions (raise --flow-table-size if this grows).",
};
/// `viscum_datapath_replies_total{result=...}`.
pub const DATAPATH_REPLIES: MetricFamily = MetricFamily {
    name: "viscum_datapath_replies_total",
    label: "result",
    help: "Packets from service namespaces at the reply classifier, by outcome (forwarded \
           straight to the client-facing interface, left to the kernel's routing, or no known \
           flow).",
};
/// `viscum_datapath_replies_rewritten_total`.
pub const DATAPATH_REPLIES_REWRITTEN: MetricFamily = MetricFamily {
    name: "viscum_datapath_replies_rewritten_total",
    label: "",
    help: "Replies whose source was rewritten to the cloud identity.",
};
/// `viscum_datapath_mirrored_packets_total`.
pub const DATAPATH_MIRRORED: MetricFamily = MetricFamily {
    name: "viscum_datapath_mirrored_packets_total",
    label: "",
    help: "Packets cloned to a mirror (canary) target.",
};
/// `viscum_datapath_icmp_errors_total{action=...}`.
pub const DATAPATH_ICMP_ERRORS: MetricFamily = MetricFamily {
    name: "viscum_datapath_icmp_errors_total",
    label: "action",
    help: "ICMP/ICMPv6 errors about redirected flows, by what was done with them.",
};
/// `viscum_datapath_mss_clamped_total`.
pub const DATAPATH_MSS_CLAMPED: MetricFamily = MetricFamily {
    name: "viscum_datapath_mss_clamped_total",
    label: "",
    help: "Redirected SYNs and edge SYN-ACKs whose MSS was lowered to the interface MTU.",
};
/// `viscum_datapath_target_gone_total`.
pub const DATAPATH_TARGET_GONE: MetricFamily = MetricFamily {
    name: "viscum_datapath_target_gone_total",
    label: "",
    help: "Hits whose target interface no longer exists, passed to the cloud instead.",
};

/// One row of the counter registry ([`global_counters!`]), for code that iterates counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterInfo {
    /// The counter, whose `as u32` value is its slot in [`GLOBAL_STATS_MAP`].
    pub counter: GlobalCounter,
    /// snake_case: the `GlobalStats` field and JSON key.
    pub name: &'static str,
    /// Column header in `viscum stats`.
    pub column: &'static str,
    /// The `viscum stats` row the column is in.
    pub row: StatsRow,
    /// The Prometheus family the counter is exported in.
    pub family: &'static MetricFamily,
    /// Value of `family.label` for this counter (empty when the family has no label).
    pub label: &'static str,
    /// One-line description (also the enum variant's docs).
    pub help: &'static str,
}

macro_rules! define_global_counters {
    ($($variant:ident = $slot:literal, $name:ident, $column:literal, $row:ident, $family:ident,
       $label:literal, $help:literal;)*) => {
        /// Indices into the global per-CPU counter array (see [`global_counters!`]).
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum GlobalCounter {
            $(#[doc = $help] $variant = $slot,)*
        }

        /// Every global counter, in display order.
        pub const GLOBAL_COUNTER_INFO: &[CounterInfo] = &[$(CounterInfo {
            counter: GlobalCounter::$variant,
            name: stringify!($name),
            column: $column,
            row: StatsRow::$row,
            family: &$family,
            label: $label,
            help: $help,
        },)*];
    };
}
global_counters!(define_global_counters);

/// Where a packet leaves the client-facing classifier (`viscum_ingress` and the programs
/// it tail-calls): every packet takes exactly one of these exits and bumps its counter once,
/// so [`GlobalCounter::Seen`] is their sum, computed by user space, instead of a second
/// per-CPU counter every packet would bump (a map lookup and a store per packet, measured
/// at ~6 % of a hit's program time on 6.18). The slot of `Seen` stays in the array, for [`LATE_REDIRECTS_SLOT`].
pub const INGRESS_EXITS: [GlobalCounter; 4] = [
    GlobalCounter::Passed,
    GlobalCounter::Redirected,
    GlobalCounter::RedirectErrors,
    GlobalCounter::IcmpToEdge,
];

/// Number of slots in the global counter array.
pub const GLOBAL_COUNTERS: u32 = GLOBAL_COUNTER_INFO.len() as u32;

/// The registry is consistent: slots are exactly `0..GLOBAL_COUNTERS` (so the map holds them
/// all and none is counted twice), and a family's counters are labelled iff it has a label.
const _: () = {
    let n = GLOBAL_COUNTER_INFO.len();
    let mut seen = [false; 64];
    assert!(n <= 64);
    let mut i = 0;
    while i < n {
        let c = &GLOBAL_COUNTER_INFO[i];
        let slot = c.counter as usize;
        assert!(slot < n, "a counter slot is outside 0..GLOBAL_COUNTERS");
        assert!(!seen[slot], "two counters share a slot");
        seen[slot] = true;
        assert!(
            c.family.label.is_empty() == c.label.is_empty(),
            "a counter's label does not fit its metric family"
        );
        i += 1;
    }
};

/// Runtime knobs read by the classifier on every packet (one array slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Non-zero: emit aya-log debug records for every decision.
    pub log_debug: u32,
    /// Number of prefix rules: 0 lets unmatched traffic skip the LPM lookup.
    pub prefix_rules: u32,
    /// A TCP flow idle this long is forgotten (0 = default 2 h).
    pub tcp_idle_ns: u64,
    /// A UDP flow idle this long is forgotten (0 = default 30 s).
    pub udp_idle_ns: u64,
    /// How long a TCP flow is remembered after its first FIN/RST (0 = 10 s).
    pub linger_ns: u64,
    /// Slots per CPU in [`ENTRY_STATS_MAP`], written by `attach` before the programs are
    /// attached (0: nothing is counted).
    pub stats_stride: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 40);

/// Idle timeout of a TCP flow, in seconds, when [`DatapathConfig::tcp_idle_ns`] is 0.
pub const DEFAULT_TCP_IDLE_SECS: u64 = 7200;
/// Idle timeout of a UDP flow, in seconds, when [`DatapathConfig::udp_idle_ns`] is 0.
pub const DEFAULT_UDP_IDLE_SECS: u64 = 30;
/// How long a closing TCP flow is kept, in seconds, when [`DatapathConfig::linger_ns`] is 0.
pub const DEFAULT_LINGER_SECS: u64 = 10;
const NS_PER_SEC: u64 = 1_000_000_000;

const fn or_default(ns: u64, default_secs: u64) -> u64 {
    if ns == 0 {
        default_secs * NS_PER_SEC
    } else {
        ns
    }
}

impl DatapathConfig {
    /// How long an idle flow of `proto` keeps its decision, defaults filled
    /// in. Kernel and user space both use this, so they agree on which
    /// flows are alive.
    #[inline(always)]
    pub const fn idle_ns(&self, proto: u8) -> u64 {
        if proto == PROTO_TCP {
            or_default(self.tcp_idle_ns, DEFAULT_TCP_IDLE_SECS)
        } else {
            or_default(self.udp_idle_ns, DEFAULT_UDP_IDLE_SECS)
        }
    }

    /// How long a TCP flow is remembered after its first FIN/RST.
    #[inline(always)]
    pub const fn linger_ns(&self) -> u64 {
        or_default(self.linger_ns, DEFAULT_LINGER_SECS)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), contain only integers and byte arrays,
    // and have no implicit padding (asserted above).
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceEntry {}
    unsafe impl aya::Pod for super::EntryStats {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::ReplyKey {}
    unsafe impl aya::Pod for super::ReplyState {}
    unsafe impl aya::Pod for super::PrefixData {}
    unsafe impl aya::Pod for super::PrefixNode {}
    unsafe impl aya::Pod for super::FlowCacheSlot {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragPorts {}
}

#[cfg(test)]
mod tests {
    use super::PortRule;

    /// A flow-cache slot's count word: packets and bytes add up in their halves, and an add
    /// that would carry out of either half is refused (the slot's counts must go to the
    /// entry first), never wrapped into the other.
    #[test]
    fn pending_counts_add_up_and_refuse_to_overflow() {
        use super::{pending_add, pending_bytes, pending_packets};
        let mut w = 0;
        for len in [54, 1514, 65_226] {
            w = pending_add(w, len).unwrap();
        }
        assert_eq!(
            (pending_packets(w), pending_bytes(w)),
            (3, 54 + 1514 + 65_226)
        );
        let full_bytes = (0xffff_ff00u64 << 32) | 7;
        assert_eq!(
            pending_add(full_bytes, 0xff),
            Some(full_bytes + 1 + (0xff << 32))
        );
        assert_eq!(pending_add(full_bytes, 0x100), None);
        assert_eq!(pending_add(0xffff_ffff, 1), None);
        assert_eq!(
            pending_add(0, u32::MAX).map(pending_bytes),
            Some(u64::from(u32::MAX))
        );
    }

    #[test]
    fn port_filter_marks_exactly_the_managed_ports() {
        use super::{FAMILY_V4, PROTO_TCP, PROTO_UDP, PortFilter, ServiceKey};
        let mut f = PortFilter::new();
        assert!(f.unmanaged(PROTO_TCP, 80) && f.unmanaged(PROTO_UDP, 0));
        f.manage_key(&ServiceKey {
            addr: [0; 16],
            port: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
        });
        assert!(!f.unmanaged(PROTO_TCP, 80));
        assert!(f.unmanaged(PROTO_TCP, 79) && f.unmanaged(PROTO_TCP, 81));
        assert!(f.unmanaged(PROTO_UDP, 80), "protocols are separate");
        // A range crossing word boundaries, with whole words in the middle.
        f.manage(PROTO_UDP, 60, 300);
        for port in 0..=u16::MAX {
            assert_eq!(
                f.unmanaged(PROTO_UDP, port),
                !(60..=300).contains(&port),
                "udp {port}"
            );
        }
        // The top of the range, and "all ports".
        f.manage(PROTO_UDP, 65_500, u16::MAX);
        assert!(!f.unmanaged(PROTO_UDP, u16::MAX) && f.unmanaged(PROTO_UDP, 65_499));
        f.manage_key(&ServiceKey {
            addr: [0; 16],
            port: 0,
            proto: PROTO_TCP,
            family: FAMILY_V4,
        });
        assert!((0..=u16::MAX).all(|p| !f.unmanaged(PROTO_TCP, p)));
    }

    #[test]
    fn address_filter_marks_the_keys_addresses_and_indexes_past_the_marker() {
        use super::{
            ADDR_FILTER_BASE, FAMILY_V4, FAMILY_V6, PORT_FILTER_BITMAP_WORDS, PORT_FILTER_WORDS,
            PROTO_TCP, PortFilter, ServiceKey, addr_filter_slot,
        };
        let v4 = |a: [u8; 4]| {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&a);
            b
        };
        let mut f = PortFilter::new();
        let edge = v4([198, 51, 100, 7]);
        assert!(f.addr_unmanaged(&edge));
        f.manage_key(&ServiceKey {
            addr: edge,
            port: 443u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
        });
        assert!(!f.addr_unmanaged(&edge));
        // Neighbours of the address spread over other bits (no run of a /24 collides).
        let others = (0..=255u8)
            .filter(|&i| i != 7)
            .filter(|&i| !f.addr_unmanaged(&v4([198, 51, 100, i])))
            .count();
        assert_eq!(others, 0, "a /24's other addresses share the bit");
        let mut v6 = [0u8; 16];
        v6[..2].copy_from_slice(&[0x20, 0x01]);
        v6[15] = 1;
        f.manage_key(&ServiceKey {
            addr: v6,
            port: 0,
            proto: PROTO_TCP,
            family: FAMILY_V6,
        });
        assert!(!f.addr_unmanaged(&v6));
        // Every slot lies in the address words, never on the marker.
        for a in [edge, v6, [0xff; 16], [0; 16]] {
            let (w, _) = addr_filter_slot(&a);
            assert!((ADDR_FILTER_BASE..PORT_FILTER_WORDS).contains(&w));
        }
        assert_eq!(f.word(PORT_FILTER_BITMAP_WORDS), None);
        assert_eq!(f.word(PORT_FILTER_WORDS), None);
        assert_eq!(
            f.word(addr_filter_slot(&edge).0)
                .map(|w| w & addr_filter_slot(&edge).1),
            Some(0)
        );
    }

    #[test]
    fn source_masks() {
        assert_eq!(PortRule::source_mask(0), [0; 16]);
        assert_eq!(PortRule::source_mask(128), [0xff; 16]);
        assert_eq!(PortRule::source_mask(200), [0xff; 16]);
        let m = PortRule::source_mask(20);
        assert_eq!(&m[..4], &[0xff, 0xff, 0xf0, 0]);
        assert!(m[4..].iter().all(|&b| b == 0));
        let m = PortRule::source_mask(64);
        assert!(m[..8].iter().all(|&b| b == 0xff) && m[8..].iter().all(|&b| b == 0));
    }
}
