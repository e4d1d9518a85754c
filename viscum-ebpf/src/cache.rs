//! The per-CPU flow cache: an established TCP edge flow's packets delivered without the
//! entry lookup or the hashed edge record.
//!
//! A two-way set-associative array per CPU (the exact-match cache of Open vSwitch's
//! userspace datapath, `dpif-netdev.c`, on the same principle): a slot holds one flow's
//! client-side 5-tuple, a copy of the entry it was decided for, and how long that decision
//! may be repeated. A flow may take either slot of a neighbouring pair, found by a
//! hash of the 5-tuple ([`mix`]) and compared word by word; a slot is two cache lines
//! of this CPU's region of one plain array (the 5-tuple and validity in the first, the entry
//! in the second), found by arithmetic alone (see `viscum_common::FLOW_CACHE_MAP`).
//! The classifier asks it right after the miss pre-filter, so a hit skips both hashed
//! lookups: the services map's (jhash of a
//! 20-byte key, its bucket and element, shared with every CPU) and `VISCUM_REPLIES`'
//! (jhash of a 28-byte key, the bucket, the element, the LRU's reference bit).
//!
//! The entries are obeyed exactly: a slot is filled under the entries' generation read
//! before the entry was looked up (`viscum_common::ENTRIES_GEN_WORD`), and used only while
//! it is unchanged. User space moves it after every change to an entry or a rule (and when
//! it forgets flows), so a removed, re-targeted or newly shadowed entry decides the next
//! packet.
//!
//! The edge record stays the truth: the cache repeats a decision the record gave less than
//! [`CACHE_LIFE_TICKS`] ago, and only for packets that change nothing in it: TCP segments
//! without SYN, FIN or RST. Whatever the record's checks would notice (an idle or closed
//! flow, a target veth that is gone) is noticed within that time, as the record itself
//! notices a vanished target only once a second. A FIN or RST takes the full path and
//! empties the slot; a closing record is never cached. A service's FIN that follows the
//! client's ends the slot of this CPU too, from the reply program ([`expire`]): a local
//! client's ACK of it, the connection's last segment, is sent from here, and the record
//! must see it to know the close finished (`viscum_common::close`).
//!
//! What may take a record away while a slot repeats it, and how the slot notices:
//! * eviction from the full LRU table, by new flows' inserts. Every insert moves the shared
//!   churn count ([`note_insert`]), and a slot is only used while fewer than
//!   [`INSERT_BUDGET`] inserts happened since it was filled: far fewer than the LRU needs to
//!   evict a record referenced at the fill (it evicts unreferenced records first, in
//!   batches, after rotating the referenced ones);
//! * anything else (a record evicted anyway from a table whose every flow is busy; user
//!   space removing records moves the generation instead): the flow's replies find no
//!   record, and the first such reply from a managed port moves the churn
//!   count by the whole budget ([`note_unknown_reply`]), emptying every slot of every CPU.
//!
//! Then the flow's next client packet finds its record missing and restores it
//! (`flow::recover`), as it did before the cache. TCP only: a UDP flow has no first
//! packet, so a new flow on a reused 5-tuple (a client's new socket given an earlier one's
//! port) would be served from the slot of an evicted record, its answer lost before any
//! reply could tell.
//!
//! A hit counts in its slot (`viscum_common::FlowCacheSlot::pending`), in the line it read
//! the entry's copy from, rather than in the entry's counter slot, a cold line per packet
//! once the entries are many; [`flush`] moves the counts to the entry when the slot is
//! filled again or emptied, and user space adds what slots still hold when it reads.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE, helpers::bpf_get_smp_processor_id, macros::map, maps::Array,
};
pub use viscum_common::hash::mix;
use viscum_common::{FLOW_CACHE_SLOTS, FlowCacheSlot, ServiceEntry, pending_add, pending_packets};

use crate::parse::Parsed;

/// How long a slot repeats its record's decision, in kernel ticks (`bpf_jiffies64`): 100 ms
/// at `CONFIG_HZ=250` (Debian's), 25 ms at 1000, 250 ms at 100. Short, because until it
/// lapses the record is not looked at, so an evicted record is restored (and its flow's
/// replies found again) only then; long enough that a busy flow pays the full path a few
/// times a second at most. Ticks rather than ns: a hit then reads no clock but the jiffies
/// counter.
pub const CACHE_LIFE_TICKS: u64 = 25;

/// Every CPU's slots, a region of [`FLOW_CACHE_SLOTS`] each (`viscum_common::FLOW_CACHE_MAP`;
/// the loader sizes it for every possible CPU). Not pinned: a cache private to each loaded
/// copy of the object, which a fresh load starts empty.
#[map(name = "VISCUM_FCACHE")]
static CACHE: Array<FlowCacheSlot> = Array::with_max_entries(FLOW_CACHE_SLOTS, BPF_F_MMAPABLE);

/// Inserts into the edge-flow table after which a slot is no longer used: 1/16 of the
/// smallest table the loader accepts (`viscum attach --flow-table-size`, 1024).
pub const INSERT_BUDGET: u64 = 64;

/// The churn count (see the module docs): one shared word, read by every packet the cache
/// serves and written by every edge-flow insert (a SYN's, already paying the LRU insert).
#[map(name = "VISCUM_FCHURN")]
static CHURN: Array<u64> = Array::with_max_entries(1, 0);

/// The current churn count.
#[inline(always)]
pub fn churn() -> u64 {
    count(&CHURN)
}

/// An edge-flow record was inserted (it may have evicted another). Not atomic: two CPUs
/// inserting at once may count one; the budget is far below what eviction needs.
#[inline(always)]
pub fn note_insert() {
    advance(&CHURN, 1);
}

/// A reply of a TCP flow from a managed port found no edge record: no slot of any CPU may
/// be used any more (see the module docs).
#[inline(always)]
pub fn note_unknown_reply() {
    advance(&CHURN, INSERT_BUDGET);
}

/// The count a one-word shared array holds (the caches' churn and generation counts).
#[inline(always)]
pub fn count(word: &Array<u64>) -> u64 {
    word.get(0).copied().unwrap_or(0)
}

/// Moves the count `word` holds by `n`, with a plain store: two CPUs at once may move it
/// by one `n` only, which still moves it (what a reader compares against).
#[inline(always)]
pub fn advance(word: &Array<u64>, n: u64) {
    if let Some(c) = word.get_ptr_mut(0) {
        // SAFETY: a plain store to the map's value.
        unsafe { *c = (*c).wrapping_add(n) };
    }
}

/// This CPU's slot of `p`'s flow, if it holds the flow with a decision that may still be
/// repeated at kernel tick `tick` (`bpf_jiffies64`) under entries' generation `generation`
/// (read before anything was looked up for this packet).
///
/// The packet is then delivered by the slot's copy of the entry (`target`): no services-map
/// lookup, no flow record; and counted in the slot ([`count_redirect`]). The slot is this
/// CPU's, and nothing else runs on this CPU while the program does.
#[inline(always)]
pub fn hit(p: &Parsed, tick: u64, generation: u64) -> Option<*mut FlowCacheSlot> {
    let probe = Probe::of(p);
    let (first, second) = probe.slots()?;
    let churn = churn();
    // SAFETY: this CPU's slots; nothing else runs on this CPU while we do.
    if usable(unsafe { &*first }, tick, generation, churn) && probe.holds(unsafe { &*first }) {
        return Some(first);
    }
    // SAFETY: as above.
    if usable(unsafe { &*second }, tick, generation, churn) && probe.holds(unsafe { &*second }) {
        return Some(second);
    }
    None
}

/// Counts a packet of `len` bytes (L2, as it arrived) that `slot`'s copy of its entry
/// redirected, in the slot (`viscum_common::FlowCacheSlot::pending`) rather than in the
/// entry's counters: the slot's line is in cache already, the entry's counter line, one per
/// entry and CPU, is not once there are many entries. Should a half of the word overflow, the
/// slot's counts go to the entry first (the slot was usable just now: the entry is the same).
///
/// A raw pointer, written through its `pending` field alone: the caller still holds a
/// shared reference to the slot's `target`.
#[inline(always)]
pub fn count_redirect(slot: *mut FlowCacheSlot, len: u32) {
    // SAFETY: this CPU's slot (see `hit`); only `pending` is written, and no reference to it
    // is live.
    unsafe {
        let pending = (*slot).pending;
        match pending_add(pending, len) {
            Some(next) => (*slot).pending = next,
            None => {
                crate::lookup::add_pending(&(*slot).target, pending);
                (*slot).pending = pending_add(0, len).unwrap_or(0);
            }
        }
    }
}

/// Adds what `slot` counted ([`count_redirect`]) to its entry's counters and empties its
/// count, before the slot is filled again or emptied; `generation`: the entries' generation now.
/// Under the generation the slot was filled in, the entry is the one it copied; otherwise
/// it may be gone, its counter slot even given to another entry, so the entry's ownership
/// is checked (`crate::lookup::still_owns`), and counts of a gone entry go to the global
/// count of redirects alone (`viscum_common::LATE_REDIRECTS_SLOT`), as its other counts did
/// when user space removed it.
#[inline(always)]
fn flush(slot: &mut FlowCacheSlot, generation: u64) {
    let pending = slot.pending;
    if pending == 0 {
        return;
    }
    slot.pending = 0;
    if slot.generation == generation || crate::lookup::still_owns(slot) {
        crate::lookup::add_pending(&slot.target, pending);
    } else {
        crate::counters::add_late_redirects(pending_packets(pending));
    }
}

/// May `slot`'s decision be repeated at kernel tick `tick`, under `generation` and churn
/// count `churn`?
#[inline(always)]
fn usable(slot: &FlowCacheSlot, tick: u64, generation: u64, churn: u64) -> bool {
    tick < slot.valid_until_tick
        && slot.generation == generation
        && churn.wrapping_sub(slot.churn) < INSERT_BUDGET
}

/// Records in this CPU's cache that `p`'s flow was decided for `entry` at kernel tick `tick`
/// (its record found established and not closing), under entries' generation `generation`
/// (read before `entry` was looked up).
///
/// Into the flow's first slot, unless that one holds another flow whose decision is still
/// good: then the second, unless that too, in which case the one filled longer ago is
/// replaced. Two ways make two flows that hash alike share the cache instead of evicting
/// each other on every packet (4,096 flows in 16,384 single slots leave a fifth of them
/// colliding; in pairs of slots, a few in a thousand).
#[inline(always)]
pub fn fill(p: &Parsed, entry: &ServiceEntry, tick: u64, generation: u64) {
    let probe = Probe::of(p);
    let Some((first, second)) = probe.slots() else {
        return;
    };
    let churn = churn();
    // SAFETY: as above.
    let (first, second) = unsafe { (&mut *first, &mut *second) };
    let taken = |s: &FlowCacheSlot| usable(s, tick, generation, churn) && !probe.holds(s);
    let slot = if !taken(first) {
        first
    } else if !taken(second) || second.valid_until_tick < first.valid_until_tick {
        second
    } else {
        first
    };
    flush(slot, generation);
    slot.client = probe.client;
    slot.service = probe.service;
    slot.tail = probe.tail;
    slot.target = *entry;
    slot.churn = churn;
    slot.generation = generation;
    slot.valid_until_tick = tick + CACHE_LIFE_TICKS;
}

/// Empties this CPU's slot of `p`'s flow, if it holds it (the flow is closing), its counts
/// added to the entry ([`flush`]; `generation`: the entries' generation now).
#[inline(always)]
pub fn forget(p: &Parsed, generation: u64) {
    let probe = Probe::of(p);
    let Some((first, second)) = probe.slots() else {
        return;
    };
    // SAFETY: as above.
    let (first, second) = unsafe { (&mut *first, &mut *second) };
    if probe.holds(first) {
        flush(first, generation);
        first.valid_until_tick = 0;
    }
    if probe.holds(second) {
        flush(second, generation);
        second.valid_until_tick = 0;
    }
}

/// Ends this CPU's slot of the client-side flow (`client`:`client_port` to
/// `service`:`service_port`, network order) if it holds it, its pending counts left in it
/// (the next fill of the slot, or a reader, takes them): the reply program saw the service's
/// FIN after the client's. A local client's ACK of that FIN is sent from the CPU that
/// delivered it, this one (a LAN client's comes in wherever the NIC's receive hashing puts
/// it), and must take the full path, where the record sees the close
/// (`viscum_common::close`). Nothing is looked up: the reply program does not carry a
/// flush's ownership check.
#[inline(always)]
pub fn expire(
    client: &[u8; 16],
    client_port: u16,
    service: &[u8; 16],
    service_port: u16,
    proto: u8,
    family: u8,
) {
    let probe = Probe::new(client, client_port, service, service_port, proto, family);
    let Some((first, second)) = probe.slots() else {
        return;
    };
    // SAFETY: this CPU's slots; nothing else runs on this CPU while we do.
    let (first, second) = unsafe { (&mut *first, &mut *second) };
    if probe.holds(first) {
        first.valid_until_tick = 0;
    }
    if probe.holds(second) {
        second.valid_until_tick = 0;
    }
}

/// `p`'s flow as the cache compares it: both addresses as words, and the ports,
/// protocol and family in one.
struct Probe {
    client: [u32; 4],
    service: [u32; 4],
    tail: u64,
}

impl Probe {
    #[inline(always)]
    fn of(p: &Parsed) -> Self {
        Probe::new(
            &p.saddr,
            p.sport,
            &p.key.addr,
            p.key.port,
            p.key.proto,
            p.key.family,
        )
    }

    /// The flow from `client`:`client_port` to `service`:`service_port` (network order).
    #[inline(always)]
    fn new(
        client: &[u8; 16],
        client_port: u16,
        service: &[u8; 16],
        service_port: u16,
        proto: u8,
        family: u8,
    ) -> Self {
        Probe {
            client: words(client),
            service: words(service),
            tail: FlowCacheSlot::tail_of(client_port, service_port, proto, family),
        }
    }

    /// This CPU's two slots for the flow: a pair of neighbours in its region, chosen by
    /// [`mix`] of the 5-tuple (each address folded to a word, then both with the ports,
    /// protocol and family).
    ///
    /// Not a defence against chosen collisions, and it need not be one: a collision only
    /// sends a flow down the full path.
    #[inline(always)]
    fn slots(&self) -> Option<(*mut FlowCacheSlot, *mut FlowCacheSlot)> {
        let s = &self.client;
        let d = &self.service;
        let i = region_index(
            FLOW_CACHE_SLOTS,
            mix([
                s[0] ^ s[1] ^ s[2] ^ s[3],
                d[0] ^ d[1] ^ d[2] ^ d[3],
                self.tail as u32,
                (self.tail >> 32) as u32,
            ]),
        );
        Some((CACHE.get_ptr_mut(i)?, CACHE.get_ptr_mut(i ^ 1)?))
    }

    /// Does `slot` hold this flow?
    #[inline(always)]
    fn holds(&self, slot: &FlowCacheSlot) -> bool {
        let (c, s) = (&slot.client, &slot.service);
        slot.tail == self.tail
            && ((c[0] ^ self.client[0])
                | (c[1] ^ self.client[1])
                | (c[2] ^ self.client[2])
                | (c[3] ^ self.client[3])
                | (s[0] ^ self.service[0])
                | (s[1] ^ self.service[1])
                | (s[2] ^ self.service[2])
                | (s[3] ^ self.service[3]))
                == 0
    }
}

const _: () = assert!(FLOW_CACHE_SLOTS.is_power_of_two());

/// The index, in an array of one region of `slots` per CPU (`slots` a power of two), of this
/// CPU's slot for a key hashed to `h` by [`mix`]: its top bits. The reply cache
/// (`crate::reply_cache`) is laid out the same way.
#[inline(always)]
pub fn region_index(slots: u32, h: u32) -> u32 {
    let bits = slots.trailing_zeros();
    // SAFETY: helper without arguments.
    let base = unsafe { bpf_get_smp_processor_id() }.wrapping_mul(slots);
    base | (h >> (32 - bits))
}

/// An address as four native-order words of its network-order bytes (how the caches keep
/// and compare addresses: four loads, no byte loop).
#[inline(always)]
pub fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}
