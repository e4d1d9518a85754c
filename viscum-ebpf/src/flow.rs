//! Flow consistency: a flow keeps the decision taken at its first packet.
//!
//! Only flows towards a *matched* service are tracked, so unmanaged traffic
//! never touches these maps. TCP needs state only for edge flows: a
//! mid-connection packet without state belongs to a connection that began
//! before the entry existed, i.e. with the cloud. UDP has no "first packet"
//! marker, so cloud decisions are recorded too (while an entry learns or
//! drains).

#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values go by reference: by value, a 56-byte flow state would be copied to the stack (and possibly through a memcpy call the 6.1 verifier refuses)"
)]

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use viscum_common::{
    DEFAULT_FLOW_ENTRIES, DatapathConfig, FLOW_CLOUD, FLOW_EDGE, FlowKey, FlowState, GlobalCounter,
    PROTO_TCP, REPLY_F_DROP, ReplyKey, ReplyState, ServiceEntry, TARGET_F_DRAINING, TARGET_F_NAT,
};

use crate::{
    counters::{self, Timeouts},
    parse::{Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// 5-tuple -> decision. LRU: under pressure the oldest flows go first; the
/// loader sizes it (`viscum attach --flow-table-size`).
#[map(name = "VISCUM_FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::pinned(DEFAULT_FLOW_ENTRIES, 0);

/// Reverse index for the reply path (see `ReplyKey`).
#[map(name = "VISCUM_REPLIES")]
static REPLIES: LruHashMap<ReplyKey, ReplyState> = LruHashMap::pinned(DEFAULT_FLOW_ENTRIES, 0);

/// Where a matched packet goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Edge,
    Cloud,
}

/// `last_seen_ns` is refreshed only once it lags by more than this (capped by an eighth
/// of the idle timeout, so a short test timeout keeps its meaning): an established flow's
/// packets then mostly read the shared flow record instead of dirtying its cache line on
/// every packet from every CPU.
const LAST_SEEN_GRAIN_NS: u64 = 1_000_000_000;

/// Saturating, not wrapping: `now` is the coarse clock (up to a tick behind
/// `bpf_ktime_get_ns`, which `close_from_service` and user space use), and a stamp a
/// little ahead of `now` means "just now", not "2^64 ns ago".
#[inline(always)]
fn is_live(state: &FlowState, now: u64, t: &Timeouts, tcp: bool) -> bool {
    if state.closing_at_ns != 0 && now.saturating_sub(state.closing_at_ns) > t.linger_ns {
        return false;
    }
    now.saturating_sub(state.last_seen_ns) <= idle_of(t, tcp)
}

#[inline(always)]
fn idle_of(t: &Timeouts, tcp: bool) -> u64 {
    if tcp { t.tcp_idle_ns } else { t.udp_idle_ns }
}

/// Decides for a packet that matched `entry`, creating flow state for new flows.
#[inline(always)]
pub fn decide(
    p: &Parsed,
    entry: &mut ServiceEntry,
    fkey: &FlowKey,
    cfg: &DatapathConfig,
) -> Decision {
    // The coarse clock (CLOCK_MONOTONIC at tick resolution, bpf-helpers(7), 5.11+): flow
    // timeouts are seconds, the learning window milliseconds, and it costs a fraction of
    // the precise one.
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let t = counters::timeouts(cfg);
    let tcp = p.key.proto == PROTO_TCP;
    let syn = tcp && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let closing = tcp && p.tcp_flags & (TCP_FIN | TCP_RST) != 0;

    let rkey = reply_key(p, entry);
    if let Some(state) = FLOWS.get_ptr_mut(fkey) {
        // SAFETY: LRU value pointer from the kernel; races only lose a
        // timestamp update, never the decision.
        let state = unsafe { &mut *state };
        // A SYN on a flow that already finished starts a new connection
        // reusing the 5-tuple: decide afresh.
        let reused = syn && state.closing_at_ns != 0;
        // An edge flow whose entry now points at another target (the
        // namespace was re-created, the entry re-added): its old target is
        // gone, so the flow is over; never send it to the new one.
        let replaced = state.decision == FLOW_EDGE && state.ifindex != entry.ifindex;
        if !reused && !replaced && is_live(state, now, &t, tcp) {
            let grain = idle_of(&t, tcp) >> 3;
            let grain = if grain < LAST_SEEN_GRAIN_NS {
                grain
            } else {
                LAST_SEEN_GRAIN_NS
            };
            if now.saturating_sub(state.last_seen_ns) > grain {
                state.last_seen_ns = now;
            }
            if closing && state.closing_at_ns == 0 {
                state.closing_at_ns = now;
            }
            if state.decision != FLOW_EDGE {
                return Decision::Cloud;
            }
            // The two LRU tables evict independently: an edge flow whose
            // reply record went (a reused 5-tuple, table pressure) gets it
            // back before its next reply needs it.
            if REPLIES.get_ptr(&rkey).is_none() {
                remember_reply(p, entry, 0);
            }
            return Decision::Edge;
        }
    }

    if tcp && !syn {
        // Mid-connection without flow state. If its reply record survived
        // the flow's eviction, the connection is at the edge: restore it.
        // SAFETY: copied out of the map value at once.
        if let Some(r) = unsafe { REPLIES.get(&rkey).copied() }
            && r.flags & REPLY_F_DROP == 0
            && r.service == p.key.addr
            && r.service_port == p.key.port
        {
            put_state(fkey, FLOW_EDGE, entry, now);
            return Decision::Edge;
        }
        // Otherwise it began before the entry existed (or all its state
        // was evicted): the cloud has it.
        counters::bump(GlobalCounter::FlowOrphans);
        return Decision::Cloud;
    }

    let learning = now < entry.active_after_ns;
    if entry.flags & TARGET_F_DRAINING != 0 || learning {
        entry.cloud_flows += 1;
        counters::bump(GlobalCounter::FlowsCloud);
        if !tcp {
            put_state(fkey, FLOW_CLOUD, entry, now);
        }
        return Decision::Cloud;
    }

    put_state(fkey, FLOW_EDGE, entry, now);
    remember_reply(p, entry, 0);
    entry.new_flows += 1;
    counters::bump(GlobalCounter::FlowsEdge);
    Decision::Edge
}

/// One per-CPU slot in which a new flow's state is assembled: 56 bytes the
/// classifier's 512-byte stack cannot spare (the verifier refuses a frame
/// past the limit, and LLVM will not build one).
#[map(name = "VISCUM_SCRATCH")]
static SCRATCH: PerCpuArray<FlowState> = PerCpuArray::pinned(1, 0);

/// Records a new flow's decision, taken from `entry` at time `now`.
#[inline(always)]
fn put_state(fkey: &FlowKey, decision: u32, entry: &ServiceEntry, now: u64) {
    let Some(slot) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, nobody else writes it while we run.
    let st = unsafe { &mut *slot };
    st.last_seen_ns = now;
    st.closing_at_ns = 0;
    st.decision = decision;
    st.ifindex = entry.ifindex;
    st.flags = entry.flags;
    // Word by word, volatile: LLVM would otherwise turn these copies into
    // memset/memcpy subprogram calls, whose frames count against the
    // 512-byte stack (see redirect::write_mac).
    let m = &entry.mac;
    let a = &entry.nat_addr;
    // SAFETY: writes to fields of this CPU's scratch slot.
    unsafe {
        for i in 0..3 {
            core::ptr::write_volatile(
                &raw mut st.mac[i],
                u16::from_ne_bytes([m[2 * i], m[2 * i + 1]]),
            );
        }
        for i in 0..4 {
            core::ptr::write_volatile(
                &raw mut st.nat_addr[i],
                u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]),
            );
        }
    }
    st.nat_port = entry.nat_port;
    st._pad = 0;
    let _ = FLOWS.insert(fkey, &*st, 0);
}

/// The reply-side key of the flow of `p` towards `entry`'s target.
#[inline(always)]
fn reply_key(p: &Parsed, entry: &ServiceEntry) -> ReplyKey {
    // In NAT mode the service answers from its own port.
    let local_port = if entry.flags & TARGET_F_NAT != 0 && entry.nat_port != 0 {
        entry.nat_port
    } else {
        p.key.port
    };
    ReplyKey {
        client: p.saddr,
        client_port: p.sport,
        local_port,
        proto: p.key.proto,
        family: p.key.family,
        _pad: [0; 2],
        ifindex: entry.ifindex,
    }
}

/// Records how replies of this flow come back from the service veth.
#[inline(always)]
pub fn remember_reply(p: &Parsed, entry: &ServiceEntry, flags: u32) {
    let rkey = reply_key(p, entry);
    let rstate = ReplyState {
        service: p.key.addr,
        service_port: p.key.port,
        _pad: [0; 2],
        flags,
    };
    let _ = REPLIES.insert(rkey, rstate, 0);
}

/// The identity a reply arriving on `ifindex` must carry, if it belongs to
/// an edge flow.
#[inline(always)]
pub fn reply_identity(p: &Parsed, ifindex: u32) -> Option<ReplyState> {
    let rkey = ReplyKey {
        client: p.key.addr,
        client_port: p.key.port,
        local_port: p.sport,
        proto: p.key.proto,
        family: p.key.family,
        _pad: [0; 2],
        ifindex,
    };
    // SAFETY: read-only copy out of the map value.
    unsafe { REPLIES.get(rkey).copied() }
}

/// The edge flow `fkey` belongs to, if it is one (for ICMP errors quoting it).
#[inline(always)]
pub fn edge_flow(fkey: &FlowKey) -> Option<FlowState> {
    // SAFETY: copied out of the map value at once.
    let state = unsafe { FLOWS.get(fkey).copied() }?;
    (state.decision == FLOW_EDGE).then_some(state)
}

/// The reply identity of a flow, by its reply-side key.
#[inline(always)]
pub fn reply_state(rkey: &ReplyKey) -> Option<ReplyState> {
    // SAFETY: copied out of the map value at once.
    unsafe { REPLIES.get(rkey).copied() }
}

/// Marks the flow of a service's FIN or RST (`p`, a reply with identity
/// `id`) as closing, so it lingers and then ends like a flow the client
/// closed; otherwise a refused or server-closed connection would count as
/// open until the idle timeout (hours for TCP).
#[inline(always)]
pub fn close_from_service(p: &Parsed, id: &ReplyState) {
    let fkey = FlowKey {
        client: p.key.addr,
        service: id.service,
        client_port: p.key.port,
        service_port: id.service_port,
        proto: p.key.proto,
        family: p.key.family,
        _pad: [0; 2],
    };
    if let Some(state) = FLOWS.get_ptr_mut(&fkey) {
        // SAFETY: LRU value pointer from the kernel; a race only loses a
        // timestamp.
        let state = unsafe { &mut *state };
        if state.closing_at_ns == 0 {
            // SAFETY: helper without arguments.
            state.closing_at_ns = unsafe { bpf_ktime_get_ns() };
        }
    }
}
