//! Finding the entry a packet matches.
//!
//! First the miss pre-filter: a bitmap over (protocol, destination port), built by user
//! space from every entry and rule, rejects a packet whose port nothing uses with one
//! array read, before any key is hashed (unmanaged traffic is most of a router's). While
//! there are no prefix rules, a second bitmap over a hash of the destination address
//! rejects misses on a managed port the same way (the cloud's HTTPS while the edge serves
//! one HTTPS address).
//!
//! Then precedence, most specific first:
//! 1. the exact-match hash: one address, one port, any source (the fast path);
//! 2. the LPM trie, longest address prefix first; under one prefix, rules are
//!    kept most specific first (source-restricted, then narrow port ranges,
//!    then "all ports"); if none of a prefix's rules matches, the walk goes on
//!    to the next shorter prefix.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    helpers::bpf_get_smp_processor_id,
    macros::map,
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
};
use viscum_common::{
    DEFAULT_MAX_ENTRIES, ENTRIES_GEN_WORD, EntryStats, FlowCacheSlot, MAX_PREFIX_LEVELS, MAX_RULES,
    PREFIX_KEY_FIXED_BITS, PortRule, PrefixData, PrefixNode, RULES_PER_PREFIX, ServiceEntry,
    ServiceKey, addr_filter_slot, entry_stats_slots, pending_bytes, pending_packets,
    port_filter_slot, ports_words,
};

use crate::parse::Parsed;

/// Targets only, one copy for all CPUs: the classifier never writes an entry (its counters
/// are in `ENTRY_STATS`). User space replaces a value whole, and a hash update swaps the
/// element, so a reader sees the old target or the new one, never a mix. The size here is a
/// default: the loader overrides it (`viscum attach --max-entries`).
#[map(name = "VISCUM_SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceEntry> = HashMap::pinned(DEFAULT_MAX_ENTRIES, 0);

#[map(name = "VISCUM_PREFIXES")]
static PREFIXES: LpmTrie<PrefixData, PrefixNode> = LpmTrie::pinned(MAX_RULES, 0);

/// Targets of prefix rules, by rule id (shared like `SERVICES`).
#[map(name = "VISCUM_RULES")]
static RULES: Array<ServiceEntry> = Array::pinned(MAX_RULES, 0);

/// Every entry's and rule's counters, one region per CPU (see
/// `viscum_common::ENTRY_STATS_MAP`), so each CPU counts without atomics. The size here is
/// one CPU's worth of the default; the loader sizes it for every possible CPU.
#[map(name = "VISCUM_ENTRY_STATS")]
static ENTRY_STATS: Array<EntryStats> =
    Array::pinned(entry_stats_slots(DEFAULT_MAX_ENTRIES), BPF_F_MMAPABLE);

/// This CPU's counters of `entry` (`None` before `attach` wrote the stride, or for a slot
/// past the array, which user space never assigns).
///
/// The config is looked up here again rather than passed in from the packet's one read: an
/// array lookup with a constant key costs no call (the verifier inlines it to an address),
/// while a map-value pointer kept live across the whole delivery measured 10 % more
/// verified instructions on 6.18.
#[inline(always)]
pub fn stats_of(entry: &ServiceEntry) -> Option<&'static mut EntryStats> {
    let stride = crate::counters::config()?.stats_stride;
    if stride == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // SAFETY: this CPU's region; nothing else runs on this CPU while we do.
    ENTRY_STATS
        .get_ptr_mut(cpu.wrapping_mul(stride).wrapping_add(entry.stats_id))
        .map(|s| unsafe { &mut *s })
}

/// Does the entry `slot` was filled for still own its counters, so that what the slot
/// counted may be added to them (see `crate::cache::flush`)? Asked only when the entries
/// changed since the fill, when the entry may be gone and its counter slot given to another:
/// an exact entry must still be the services map's entry for the slot's destination, a
/// prefix rule still in its rule slot (a removed rule's is cleared: no target veth), with the same counter
/// slot and epoch (`ServiceEntry::stats_epoch`: not the same match removed and added again).
#[inline(always)]
pub fn still_owns(slot: &FlowCacheSlot) -> bool {
    let t = &slot.target;
    if t.stats_id < MAX_RULES {
        return matches!(RULES.get(t.stats_id), Some(r) if r.ifindex != 0 && r.owns_counters_of(t));
    }
    // SAFETY: a map value the kernel keeps alive while the program runs.
    matches!(unsafe { SERVICES.get(slot.service_key()) }, Some(e) if e.owns_counters_of(t))
}

/// Adds a flow-cache slot's `pending` redirects (`viscum_common::FlowCacheSlot::pending`) to
/// this CPU's counters of `entry`.
#[inline(always)]
pub fn add_pending(entry: &ServiceEntry, pending: u64) {
    if let Some(s) = stats_of(entry) {
        s.packets += pending_packets(pending);
        s.bytes += pending_bytes(pending);
    }
}

/// The miss pre-filter (see `viscum_common::PORTS_MAP`): a set bit means no entry or rule
/// matches that (protocol, destination port). Shared, not per-CPU: only user space writes it,
/// through a shared mapping of its memory (`BPF_F_MMAPABLE`, 5.5+: a word is a store, not a
/// system call, in every entry change).
#[map(name = "VISCUM_PORTS")]
static PORTS: Array<u64> = Array::pinned(ports_words(DEFAULT_MAX_ENTRIES), BPF_F_MMAPABLE);

/// True when no entry or rule can match `p`'s protocol and destination port, so the
/// packet can pass without a hash or trie lookup. An unbuilt (zero) filter says false.
#[inline(always)]
pub fn unmanaged(p: &Parsed) -> bool {
    port_unmanaged(p.key.proto, p.key.port)
}

/// True when no entry or rule can match protocol `proto` and destination port `port`
/// (network order); see [`unmanaged`].
#[inline(always)]
pub fn port_unmanaged(proto: u8, port: u16) -> bool {
    let (word, bit) = port_filter_slot(proto, u16::from_be(port));
    match PORTS.get(word) {
        Some(w) => *w & bit != 0,
        None => false,
    }
}

/// The entries' generation (`viscum_common::ENTRIES_GEN_WORD`): read before an entry is
/// looked up for a decision the flow cache may repeat, compared by every repetition.
#[inline(always)]
pub fn entries_generation() -> u64 {
    PORTS.get(ENTRIES_GEN_WORD).copied().unwrap_or(0)
}

/// True when no services-map key has `p`'s destination address (its bit in the address
/// half of the filter is set). Only meaningful while there are no prefix rules, which the
/// bitmap cannot describe: the caller checks that.
#[inline(always)]
pub fn address_unmanaged(p: &Parsed) -> bool {
    let (word, bit) = addr_filter_slot(&p.key.addr);
    match PORTS.get(word) {
        Some(w) => *w & bit != 0,
        None => false,
    }
}

#[inline(always)]
pub fn find(p: &Parsed, have_rules: bool) -> Option<&'static ServiceEntry> {
    find_key(&p.key, &p.saddr, have_rules)
}

/// The entry for destination `key` and source `saddr` (see the module docs).
#[inline(always)]
pub fn find_key(
    key: &ServiceKey,
    saddr: &[u8; 16],
    have_rules: bool,
) -> Option<&'static ServiceEntry> {
    // SAFETY: a map value the kernel keeps alive while the program runs (RCU), never
    // written by the classifier.
    if let Some(e) = unsafe { SERVICES.get(key) } {
        return Some(e);
    }
    if have_rules {
        return find_rule(key, saddr);
    }
    None
}

#[inline(always)]
fn find_rule(key: &ServiceKey, saddr: &[u8; 16]) -> Option<&'static ServiceEntry> {
    let data = PrefixData {
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
        addr: key.addr,
    };
    let host_bits: u32 = if key.family == viscum_common::FAMILY_V4 {
        32
    } else {
        128
    };
    let mut prefix_len = PREFIX_KEY_FIXED_BITS + host_bits;
    let port = u16::from_be(key.port);
    for _ in 0..MAX_PREFIX_LEVELS {
        let node = PREFIXES.get(Key::new(prefix_len, data))?;
        for i in 0..RULES_PER_PREFIX {
            if (i as u32) < node.count && rule_matches(&node.rules[i], port, saddr) {
                return RULES.get(node.rules[i].rule_id);
            }
        }
        if node.prefix_len <= PREFIX_KEY_FIXED_BITS {
            return None;
        }
        prefix_len = node.prefix_len - 1;
    }
    None
}

#[inline(always)]
fn rule_matches(rule: &PortRule, port: u16, saddr: &[u8; 16]) -> bool {
    if port < rule.port_lo || port > rule.port_hi {
        return false;
    }
    // Branch-free: the mask (all zero for "any source") was computed by user
    // space, so the verifier sees straight-line code rather than a loop
    // whose exit depends on the prefix length (that loop, inlined under
    // eight prefix levels and four rules, exhausted the 1M-instruction
    // budget on 6.1 and 6.12).
    let mut diff = 0u8;
    #[expect(
        clippy::needless_range_loop,
        reason = "a plain counted loop unrolls into straight-line code"
    )]
    for i in 0..16 {
        diff |= (saddr[i] ^ rule.src[i]) & rule.src_mask[i];
    }
    diff == 0
}
