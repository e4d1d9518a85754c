//! The per-CPU reply cache: an established TCP edge flow's replies sent out without the
//! edge-record lookup.
//!
//! The reply program's counterpart of the classifier's flow cache (`crate::cache`, laid out
//! the same way: one region per CPU of a plain array, two-way set-associative, 1 MiB per
//! CPU). A slot holds an edge record's key as a reply carries it (client, client port, the
//! service's local port, the host veth) and a copy of the record, FIB result included; a
//! reply found there is rewritten and sent out from the copy, without the jhash of a
//! 28-byte key, its bucket and the shared record (`VISCUM_REPLIES`), nor the clock.
//!
//! The record stays the truth, and a slot only repeats what it said while nothing can have
//! changed it unseen:
//! * filled from a record found established, not closing, not a mirror's, by a plain TCP
//!   segment (no SYN, FIN or RST) on the full path; a FIN or RST from the service takes the
//!   full path and empties this CPU's slot (another CPU's lapses within its life, while the
//!   record lingers and would send the same replies out anyway), and so does a client's FIN
//!   that follows the service's, on the CPU it comes in on, if that CPU filled a slot
//!   within a slot's life ([`forget_record`]): the service's ACK of it, the connection's
//!   last segment, leaves from there, and the record must see it to know the close
//!   finished (`viscum_common::close`);
//! * used for at most [`cache::CACHE_LIFE_TICKS`] (250 ms at `CONFIG_HZ=100`): the full
//!   path reuses a FIB result for [`FIB_REUSE_NS`] only, so a copy of it is never used past
//!   `viscum_common::FIB_CACHE_NS` from its lookup;
//! * only under the entries' generation it was filled in (user space moves it after every
//!   change to an entry or rule and when it forgets records);
//! * only for the record the key would find now. A record lost from the LRU table and
//!   restored, or replaced by a new connection on the same key, names the same cloud
//!   endpoint, unless two endpoints share the key: a client reusing its port for another
//!   cloud address that the same namespace port serves. A slot serves only replies from the
//!   source its flow's came from, which tells apart endpoints in AnyIP mode (each answers
//!   as itself) and an AnyIP endpoint from a NAT one; among NAT endpoints (all answering
//!   from the namespace's address) a slot is filled only while the namespace port is known
//!   to answer for one (`flow::learn_identity`), and every CPU's slots are retired
//!   ([`retire_all`]) the moment a second one appears on any port.
//!
//! No word that new connections write is read here: under a steady stream of them (a
//! connection per request) the cache must cost next to nothing. A CPU remembers the tick of
//! its latest fill, and looks at no slot unless that is recent; a flow is cached only once
//! its FIB result is [`FILL_AFTER_NS`] old, which such a connection never lives to see.

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use viscum_common::{
    FIB_CACHE_NS, REPLY_CACHE_FILL_AFTER_NS as FILL_AFTER_NS, REPLY_CACHE_SLOTS, REPLY_F_DROP,
    REPLY_F_ESTABLISHED, ReplyCacheSlot, ReplyKey, ReplyState,
};

use crate::{
    cache::{self, CACHE_LIFE_TICKS},
    parse::Parsed,
};

/// Every CPU's slots, a region of [`REPLY_CACHE_SLOTS`] each (`viscum_common::REPLY_CACHE_MAP`;
/// the loader sizes it for every possible CPU). Not pinned: private to each loaded copy of
/// the object, which a fresh load starts empty.
#[map(name = "VISCUM_RCACHE")]
static CACHE: Array<ReplyCacheSlot> = Array::with_max_entries(REPLY_CACHE_SLOTS, 0);

/// The kernel tick of this CPU's latest fill (see the module docs). Not pinned.
#[map(name = "VISCUM_RFILL")]
static FILLED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The identity generation (see the module docs): one shared word, written only when a
/// namespace port's cloud endpoint is learned or found ambiguous. Not pinned.
#[map(name = "VISCUM_RGEN")]
static IDENTITIES_GEN: Array<u64> = Array::with_max_entries(1, 0);

/// The lowest `CONFIG_HZ` the kernel offers (100): what bounds a slot's life in ns.
const MIN_HZ: u64 = 100;

/// How long the full path reuses a record's FIB result, ns: [`FIB_CACHE_NS`] less the longest
/// a slot lives ([`CACHE_LIFE_TICKS`] at [`MIN_HZ`]: 250 ms), so that a copy of the result
/// in a slot is never used past [`FIB_CACHE_NS`] from its lookup.
pub const FIB_REUSE_NS: u64 = FIB_CACHE_NS - CACHE_LIFE_TICKS * (1_000_000_000 / MIN_HZ);

/// The identity generation (see [`IDENTITIES_GEN`]): read before the record is looked up.
#[inline(always)]
pub fn identities() -> u64 {
    cache::count(&IDENTITIES_GEN)
}

/// Retires every CPU's slots: a namespace port's cloud endpoint was learned afresh or became
/// ambiguous.
#[inline(always)]
pub fn retire_all() {
    cache::advance(&IDENTITIES_GEN, 1);
}

/// The copy of the edge record reply `p` (arriving on host veth `ifindex`) belongs to, if
/// this CPU's cache holds it with a copy that may still be used at kernel tick `tick`
/// under entries' generation `generation` and identity generation `identities`.
#[inline(always)]
pub fn hit(
    p: &Parsed,
    ifindex: u32,
    tick: u64,
    generation: u64,
    identities: u64,
) -> Option<&'static ReplyState> {
    // No fill on this CPU for a slot's life: none of its slots can be used.
    if tick.wrapping_sub(FILLED.get(0).copied().unwrap_or(0)) >= CACHE_LIFE_TICKS {
        return None;
    }
    let probe = Probe::of(p, p.sport, ifindex);
    let (first, second) = probe.slots()?;
    // SAFETY: this CPU's slots; nothing else runs on this CPU while we do.
    let first = unsafe { &*first };
    if usable(first, tick, generation, identities) && probe.holds(first) {
        return serves(first, p);
    }
    // SAFETY: as above.
    let second = unsafe { &*second };
    if usable(second, tick, generation, identities) && probe.holds(second) {
        return serves(second, p);
    }
    None
}

#[inline(always)]
fn usable(slot: &ReplyCacheSlot, tick: u64, generation: u64, identities: u64) -> bool {
    tick < slot.valid_until_tick && slot.generation == generation && slot.identities == identities
}

/// `slot`'s copy, if reply `p` comes from the address the slot's flow answered from (its
/// namespace's in NAT mode, its cloud endpoint's in AnyIP mode): a reply from any other
/// source on the same key is another connection's (one to another endpoint that the same
/// namespace port serves, in the other mode).
#[inline(always)]
fn serves(slot: &'static ReplyCacheSlot, p: &Parsed) -> Option<&'static ReplyState> {
    let (a, b) = source_words(&p.saddr);
    let r = &slot.record;
    if r.last_seen_ns == a && r.closing_at_ns == b {
        Some(r)
    } else {
        None
    }
}

/// A source address as the slot keeps it: in the copy's two timestamps, which a hit never
/// reads (it sends the reply; it does not age the flow).
#[inline(always)]
fn source_words(a: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}

/// Records in this CPU's cache the edge record `record` that reply `p` (a plain segment, as
/// it arrived) found on the full path, if the record may be repeated (see the module docs):
/// `now`, the coarse clock; `generation` and `identities`, the entries' and the identity
/// generations read before the record was looked up (a change after that retires the
/// slot). Before the reply is sent: a FIB result the send refreshes is copied by a later
/// reply.
#[inline(always)]
pub fn fill(
    p: &Parsed,
    ifindex: u32,
    record: &ReplyState,
    now: u64,
    generation: u64,
    identities: u64,
) {
    if record.flags & (REPLY_F_DROP | REPLY_F_ESTABLISHED) != REPLY_F_ESTABLISHED
        || record.closing_at_ns != 0
        || record.fib_at_ns == 0
        || now.saturating_sub(record.fib_at_ns) < FILL_AFTER_NS
        || now - record.fib_at_ns > FIB_REUSE_NS
    {
        return;
    }
    if crate::flow::answered_elsewhere(record, p) && !crate::flow::sole_identity(p, ifindex, record)
    {
        return;
    }
    let probe = Probe::of(p, p.sport, ifindex);
    let Some((first, second)) = probe.slots() else {
        return;
    };
    let tick = crate::counters::tick();
    // SAFETY: as above.
    let (first, second) = unsafe { (&mut *first, &mut *second) };
    // As the flow cache chooses (`cache::fill`), written out: a shared helper taking the
    // tests as closures made the verifier walk `viscum_ingress` 1.7 times longer.
    let taken = |s: &ReplyCacheSlot| usable(s, tick, generation, identities) && !probe.holds(s);
    let slot = if !taken(first) {
        first
    } else if !taken(second) || second.valid_until_tick < first.valid_until_tick {
        second
    } else {
        first
    };
    probe.store(slot);
    slot.identities = identities;
    slot.generation = generation;
    copy_record(&mut slot.record, record);
    (slot.record.last_seen_ns, slot.record.closing_at_ns) = source_words(&p.saddr);
    slot.valid_until_tick = tick + CACHE_LIFE_TICKS;
    if let Some(filled) = FILLED.get_ptr_mut(0) {
        // SAFETY: this CPU's word; nothing else runs on this CPU while we do.
        unsafe { *filled = tick };
    }
}

/// Empties this CPU's slot of reply `p`'s flow, if it holds it (the flow is closing).
#[inline(always)]
pub fn forget(p: &Parsed, ifindex: u32) {
    forget_probe(&Probe::of(p, p.sport, ifindex));
}

/// Empties this CPU's slot of the flow whose edge record `rkey` names, if it holds it: the
/// client side saw the flow's FIN. The service's ACK of that FIN is sent from the CPU that
/// delivered it, this one, and must take the full path, where the record sees the close
/// (`viscum_common::close`), rather than a copy filled before it.
#[inline(always)]
pub fn forget_record(rkey: &ReplyKey) {
    // No fill on this CPU for a slot's life: none of its slots is in use, and their lines
    // (cold under a connection per request, which never fills) are left alone.
    let tick = crate::counters::tick();
    if tick.wrapping_sub(FILLED.get(0).copied().unwrap_or(0)) >= CACHE_LIFE_TICKS {
        return;
    }
    forget_probe(&Probe::new(
        &rkey.client,
        rkey.client_port,
        rkey.local_port,
        rkey.proto,
        rkey.family,
        rkey.ifindex,
    ));
}

#[inline(always)]
fn forget_probe(probe: &Probe<'_>) {
    let Some((first, second)) = probe.slots() else {
        return;
    };
    // SAFETY: as above.
    let (first, second) = unsafe { (&mut *first, &mut *second) };
    if probe.holds(first) {
        first.valid_until_tick = 0;
    }
    if probe.holds(second) {
        second.valid_until_tick = 0;
    }
}

/// Copies a 72-byte record word by word, volatile: a plain copy becomes a `memcpy`
/// subprogram call, refused next to tail calls on a kernel without a JIT
/// (viscum-user/tests/ebpf_object.rs).
#[inline(always)]
fn copy_record(dst: &mut ReplyState, src: &ReplyState) {
    const WORDS: usize = core::mem::size_of::<ReplyState>() / 8;
    let d = core::ptr::from_mut(dst).cast::<u64>();
    let s = core::ptr::from_ref(src).cast::<u64>();
    for i in 0..WORDS {
        // SAFETY: `WORDS` in-bounds, 8-byte aligned words of two records (repr(C), 8-byte
        // aligned, a multiple of 8 bytes long).
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
    }
}
const _: () = assert!(core::mem::size_of::<ReplyState>().is_multiple_of(8));

/// A reply's edge-record key as the cache compares it: read from the parsed packet where it
/// lies, not copied (the reply program's stack is nearly all taken).
struct Probe<'a> {
    client: &'a [u8; 16],
    tail: u64,
    ifindex: u32,
}

impl<'a> Probe<'a> {
    #[inline(always)]
    fn of(p: &'a Parsed, local_port: u16, ifindex: u32) -> Self {
        Probe::new(
            &p.key.addr,
            p.key.port,
            local_port,
            p.key.proto,
            p.key.family,
            ifindex,
        )
    }

    /// The key of the edge record (client, client port, the port the service answers from,
    /// protocol, family, host veth; ports in network order).
    #[inline(always)]
    fn new(
        client: &'a [u8; 16],
        client_port: u16,
        local_port: u16,
        proto: u8,
        family: u8,
        ifindex: u32,
    ) -> Self {
        Probe {
            client,
            tail: u64::from(client_port)
                | (u64::from(local_port) << 16)
                | (u64::from(proto) << 32)
                | (u64::from(family) << 40),
            ifindex,
        }
    }

    /// Word `i` of the client's address (see [`cache::words`]).
    #[inline(always)]
    fn client(&self, i: usize) -> u32 {
        let a = self.client;
        u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
    }

    /// This CPU's two slots for the key: a pair of neighbours in its region, chosen by
    /// [`cache::mix`] of the key.
    #[inline(always)]
    fn slots(&self) -> Option<(*mut ReplyCacheSlot, *mut ReplyCacheSlot)> {
        let i = cache::region_index(
            REPLY_CACHE_SLOTS,
            cache::mix([
                self.client(0) ^ self.client(1) ^ self.client(2) ^ self.client(3),
                self.tail as u32,
                (self.tail >> 32) as u32,
                self.ifindex,
            ]),
        );
        Some((CACHE.get_ptr_mut(i)?, CACHE.get_ptr_mut(i ^ 1)?))
    }

    /// Does `slot` hold this key?
    #[inline(always)]
    fn holds(&self, slot: &ReplyCacheSlot) -> bool {
        let c = &slot.client;
        slot.tail == self.tail
            && slot.ifindex == self.ifindex
            && ((c[0] ^ self.client(0))
                | (c[1] ^ self.client(1))
                | (c[2] ^ self.client(2))
                | (c[3] ^ self.client(3)))
                == 0
    }

    /// Writes the key into `slot`.
    #[inline(always)]
    fn store(&self, slot: &mut ReplyCacheSlot) {
        for i in 0..4 {
            slot.client[i] = self.client(i);
        }
        slot.tail = self.tail;
        slot.ifindex = self.ifindex;
    }
}

const _: () = assert!(REPLY_CACHE_SLOTS.is_power_of_two());
