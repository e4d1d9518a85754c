//! Flow consistency: a flow keeps the decision taken at its first packet.
//!
//! Only flows towards a *matched* service are tracked, so unmanaged traffic
//! never touches these maps. An edge flow is one record in `VISCUM_REPLIES`,
//! keyed by what the service sees (`ReplyKey`: client, client port, the port the
//! service answers from, the target veth): the classifier builds that key from
//! the packet and its entry, the reply program from the reply, so one lookup
//! decides a client packet and one restores a reply's identity, and the two
//! directions can never disagree (two LRU tables could evict one half of a flow).
//!
//! TCP needs no state to decide for the cloud: a mid-connection packet without an edge
//! record belongs to a connection that began before the entry existed, i.e. with the
//! cloud, unless the service's stack holds it (its record was evicted; see [`recover`]).
//! The answer is kept a short while in `VISCUM_FLOWS` so the connection's later packets
//! need not ask again. UDP has no "first packet" marker, so its cloud decisions (taken
//! while an entry learns or drains) are kept there for the flow's life.

#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values go by reference: by value, a 40-byte record would be copied to the stack (and possibly through a memcpy call the 6.1 verifier refuses)"
)]

use aya_ebpf::{
    bindings::bpf_sock_tuple,
    helpers::{bpf_sk_release, bpf_skc_lookup_tcp},
    macros::map,
    maps::{LruHashMap, PerCpuArray},
    programs::TcContext,
};
use viscum_common::{
    DEFAULT_FLOW_ENTRIES, DatapathConfig, FAMILY_V4, FLOW_CLOUD, FlowKey, FlowState, GlobalCounter,
    PROTO_TCP, REPLY_F_DROP, REPLY_F_ESTABLISHED, REPLY_F_FIN_CLIENT, REPLY_F_FIN_SERVICE,
    ReplyKey, ReplyState, ServiceEntry, TARGET_F_DRAINING, TARGET_F_MIRROR, TARGET_F_NAT,
    close::{self, CloseStep},
};

use crate::{
    cache,
    counters::{self, Timeouts},
    parse::{Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    redirect,
};

/// Client-side 5-tuple -> cloud decision (UDP). LRU: under pressure the oldest
/// flows go first; the loader sizes it (`viscum attach --flow-table-size`).
#[map(name = "VISCUM_FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::pinned(DEFAULT_FLOW_ENTRIES, 0);

/// Edge flows, keyed as the service sees them (see the module docs). Sized like
/// `VISCUM_FLOWS`.
#[map(name = "VISCUM_REPLIES")]
static REPLIES: LruHashMap<ReplyKey, ReplyState> = LruHashMap::pinned(DEFAULT_FLOW_ENTRIES, 0);

/// Where a matched packet goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Edge,
    Cloud,
    /// A mid-connection TCP packet without an edge record, whose service namespace may
    /// still hold the connection: `viscum_recover` asks it (see [`recover`]).
    Recover,
}

/// `last_seen_ns` is refreshed only once it lags by more than this (capped by an eighth
/// of the idle timeout, so a short test timeout keeps its meaning): an established flow's
/// packets then mostly read the shared flow record instead of dirtying its cache line on
/// every packet from every CPU.
const LAST_SEEN_GRAIN_NS: u64 = 1_000_000_000;

/// Saturating, not wrapping: `now` is the coarse clock (up to a tick behind
/// `bpf_ktime_get_ns`, which user space uses), and a stamp a
/// little ahead of `now` means "just now", not "2^64 ns ago".
#[inline(always)]
fn is_live(last_seen_ns: u64, closing_at_ns: u64, now: u64, t: &Timeouts, tcp: bool) -> bool {
    if closing_at_ns != 0 && now.saturating_sub(closing_at_ns) > t.linger_ns {
        return false;
    }
    now.saturating_sub(last_seen_ns) <= idle_of(t, tcp)
}

#[inline(always)]
fn idle_of(t: &Timeouts, tcp: bool) -> u64 {
    if tcp { t.tcp_idle_ns } else { t.udp_idle_ns }
}

/// Whether `last_seen` is stale enough to be rewritten (see [`LAST_SEEN_GRAIN_NS`]).
#[inline(always)]
fn refresh_due(last_seen_ns: u64, now: u64, t: &Timeouts, tcp: bool) -> bool {
    now.saturating_sub(last_seen_ns) > grain(idle_of(t, tcp))
}

/// Is `entry`'s target veth still there? Counts `TargetGone` when it is not: the cloud
/// serves until user space points the entry at a live target again.
///
/// Asked for every packet that is not of an established edge flow, and for those only
/// when their record's `last_seen_ns` is due for a refresh (once a second at most): the
/// helper call costs ~17 ns of a ~130 ns hit (B1, hot), and a deleted veth takes its
/// namespace's end, hence the flow's socket, with it, so an established flow has nothing
/// left to lose in that second; new flows and UDP datagrams of new flows go to the cloud
/// at once.
#[inline(always)]
pub fn target_alive(ctx: &TcContext, entry: &ServiceEntry) -> bool {
    if redirect::target_alive(ctx, entry.ifindex) {
        return true;
    }
    counters::bump(GlobalCounter::TargetGone);
    false
}

/// Decides for a packet that matched `entry`, creating flow state for new flows (only
/// while the entry's target veth exists). `generation`: the entries' generation read before
/// `entry` was looked up (see `cache::fill`).
#[inline(always)]
pub fn decide(
    ctx: &TcContext,
    p: &Parsed,
    entry: &ServiceEntry,
    cfg: &DatapathConfig,
    generation: u64,
) -> Decision {
    // The coarse clock (CLOCK_MONOTONIC at tick resolution, cached per CPU per jiffy):
    // flow timeouts are seconds, the learning window milliseconds.
    let now = counters::now_coarse();
    let t = counters::timeouts(cfg);
    let tcp = p.key.proto == PROTO_TCP;
    let syn = tcp && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let closing = tcp && p.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    // A segment that changes nothing in its flow's record (TCP without SYN, FIN or RST)
    // fills the flow cache, which the classifier asks before the entry (see `cache`).
    let plain = crate::parse::plain_tcp(p);

    // The edge record: the key carries the entry's target veth, so an entry that now
    // points elsewhere (the namespace re-created, the entry re-added) finds none and
    // its old flows end; they are never sent to the new target.
    let rkey = reply_key(p, entry);

    // The usual SYN: a new connection to an entry that takes new flows, its target alive.
    // Its record is written only if the table holds none for the 5-tuple, so the key is
    // hashed once (in the update) instead of twice (a lookup's, then the update's). A SYN
    // that finds a record (a retransmission, a reused 5-tuple) takes the path below, as
    // does one the entry is not taking (learning, draining).
    if syn
        && takes_new_flows(entry, now)
        && target_alive(ctx, entry)
        && write_edge(&rkey, &p.key.addr, p.key.port, 0, now, 0, BPF_NOEXIST)
    {
        return new_edge_flow(entry);
    }

    if let Some(state) = REPLIES.get_ptr_mut(&rkey) {
        // SAFETY: LRU value pointer from the kernel; races only lose a
        // timestamp update, never the decision.
        let state = unsafe { &mut *state };
        // A SYN on a flow that already finished starts a new connection
        // reusing the 5-tuple: decide afresh. A mirror record, or one of
        // another cloud address answered from the same port, is not this flow.
        let reused = syn && state.closing_at_ns != 0;
        let ours = state.flags & REPLY_F_DROP == 0
            && state.service == p.key.addr
            && state.service_port == p.key.port;
        if ours && !reused && is_live(state.last_seen_ns, state.closing_at_ns, now, &t, tcp) {
            // The handshake's ACK (any client packet but a bare SYN): the flow is under way.
            // Written once per flow; afterwards only read.
            if !syn && state.flags & REPLY_F_ESTABLISHED == 0 {
                state.flags |= REPLY_F_ESTABLISHED;
            }
            if refresh_due(state.last_seen_ns, now, &t, tcp) {
                if !target_alive(ctx, entry) {
                    return Decision::Cloud;
                }
                state.last_seen_ns = now;
            }
            if closing && state.closing_at_ns == 0 {
                state.closing_at_ns = now;
            }
            if plain && state.flags & REPLY_F_ESTABLISHED != 0 && state.closing_at_ns == 0 {
                cache::fill(p, entry, counters::tick(), generation);
            } else if closing {
                cache::forget(p, generation);
            }
            // Last: the verifier then walks the code above once, whatever the close's state.
            if tcp {
                track_client_close(ctx, p, state, &rkey);
            }
            return Decision::Edge;
        }
    }

    // A cloud decision on record: for UDP, one taken while the entry learned or drained (it
    // holds for the flow's life); for TCP, a mid-connection flow the service's stack did not
    // hold (see `remember_cloud`). A TCP SYN decides afresh: a new connection on the 5-tuple.
    let fkey = flow_key(p);
    if !syn && let Some(state) = FLOWS.get_ptr_mut(&fkey) {
        // SAFETY: as above.
        let state = unsafe { &mut *state };
        let life = cloud_life(&t, tcp);
        if state.decision == FLOW_CLOUD && now.saturating_sub(state.last_seen_ns) <= life {
            if now.saturating_sub(state.last_seen_ns) > grain(life) {
                state.last_seen_ns = now;
            }
            return Decision::Cloud;
        }
    }

    if !target_alive(ctx, entry) {
        return Decision::Cloud;
    }
    if tcp && !syn {
        // Mid-connection without an edge record. Its record may have been
        // evicted (a SYN flood larger than the table) or expired while the
        // connection idled: the service's own stack knows (asked in a program
        // of its own, whose verifier budget the hot path does not share).
        if entry.peer_netns != 0 {
            return Decision::Recover;
        }
        // Otherwise it began before the entry existed: the cloud has it.
        counters::bump(GlobalCounter::FlowOrphans);
        remember_cloud(&fkey, now);
        return Decision::Cloud;
    }

    if !takes_new_flows(entry, now) {
        // Counted once, in the entry's counters (the global count is their sum).
        if let Some(s) = crate::lookup::stats_of(entry) {
            s.cloud_flows += 1;
        }
        if !tcp {
            remember_cloud(&fkey, now);
        }
        return Decision::Cloud;
    }

    // A UDP flow is under way from its first datagram; a TCP one once its handshake's ACK
    // follows the SYN (see REPLY_F_ESTABLISHED).
    let flags = if tcp { 0 } else { REPLY_F_ESTABLISHED };
    put_edge(&rkey, &p.key.addr, p.key.port, flags, now, 0);
    new_edge_flow(entry)
}

/// Does `entry` give new flows to the edge at `now`: not draining, and past its learning
/// window (`active_after_ns`)? Asked where it is needed, not kept in a variable: a flag live
/// across the record lookup doubles the states the verifier walks.
#[inline(always)]
fn takes_new_flows(entry: &ServiceEntry, now: u64) -> bool {
    entry.flags & TARGET_F_DRAINING == 0 && now >= entry.active_after_ns
}

/// Counts a flow just given an edge record for `entry`.
#[inline(always)]
fn new_edge_flow(entry: &ServiceEntry) -> Decision {
    // Counted once, in the entry's counters (the global count is their sum).
    if let Some(s) = crate::lookup::stats_of(entry) {
        s.new_flows += 1;
    }
    Decision::Edge
}

/// For a TCP packet that [`decide`] could not place ([`Decision::Recover`]): if the
/// service's stack holds its connection, restores the flow's edge record (so its replies
/// find it again) and returns true; else counts an orphan (the connection began before the
/// entry existed: the cloud has it) and returns false.
#[inline(always)]
pub fn recover(ctx: &TcContext, p: &Parsed, entry: &ServiceEntry) -> bool {
    if let Some(sk_state) = service_holds(ctx, p, entry) {
        let now = counters::now_coarse();
        // The service's stack holds the connection: it is under way, or closing (a FIN or
        // RST now, or a socket whose close is over but for its last segments: the segment
        // of a close whose record was removed at its last ACK, see `viscum_common::close`),
        // when the record lingers. A half-closed connection (CLOSE_WAIT, FIN_WAIT) may go
        // on for long: restored as open, as before.
        let closing = p.tcp_flags & (TCP_FIN | TCP_RST) != 0 || socket_closed(sk_state);
        put_edge(
            &reply_key(p, entry),
            &p.key.addr,
            p.key.port,
            REPLY_F_ESTABLISHED,
            now,
            if closing { now } else { 0 },
        );
        counters::bump(GlobalCounter::FlowsRecovered);
        return true;
    }
    counters::bump(GlobalCounter::FlowOrphans);
    remember_cloud(&flow_key(p), counters::now_coarse());
    false
}

/// The client-side 5-tuple of `p`, as `VISCUM_FLOWS` keys it.
#[inline(always)]
fn flow_key(p: &Parsed) -> FlowKey {
    FlowKey {
        client: p.saddr,
        service: p.key.addr,
        client_port: p.sport,
        service_port: p.key.port,
        proto: p.key.proto,
        family: p.key.family,
        _pad: [0; 2],
    }
}

/// Records a cloud decision for the flow of `fkey` in `VISCUM_FLOWS`: a UDP flow that began
/// while its entry learned or drained, or a TCP connection found mid-way without an edge
/// record whose service did not hold it (it began with the cloud before the entry existed).
///
/// The TCP memo spares the connection's every later packet the liveness check, the tail
/// call and the socket lookup in the service's namespace (a cloud transfer that outlives a
/// cutover would otherwise pay them per packet). It lives [`DatapathConfig::linger_ns`]
/// past the connection's last client packet, not the TCP idle timeout: a SYN decides afresh
/// without it, but a connection that reuses the 5-tuple and then loses its edge record
/// (evicted under a flood) is recovered only once the memo has lapsed, so the memo is kept
/// short. A connection idle for longer is asked about again, once.
#[inline(always)]
fn remember_cloud(fkey: &FlowKey, now: u64) {
    let state = FlowState {
        last_seen_ns: now,
        decision: FLOW_CLOUD,
        _pad: 0,
    };
    let _ = FLOWS.insert(fkey, &state, 0);
}

/// How long a cloud decision on record holds past the flow's last client packet, ns: a UDP
/// flow's idle timeout; a TCP memo's linger (see [`remember_cloud`]).
#[inline(always)]
fn cloud_life(t: &Timeouts, tcp: bool) -> u64 {
    if tcp { t.linger_ns } else { t.udp_idle_ns }
}

/// How stale a record's `last_seen_ns` may grow before it is rewritten, for a record that
/// lives `life` ns past it: an eighth of that, at most [`LAST_SEEN_GRAIN_NS`].
#[inline(always)]
fn grain(life: u64) -> u64 {
    let g = life >> 3;
    if g < LAST_SEEN_GRAIN_NS {
        g
    } else {
        LAST_SEEN_GRAIN_NS
    }
}

/// Does the stack of `entry`'s namespace hold a TCP socket for `p`'s connection (any
/// state but listening: established, a pending request, TIME_WAIT)? Asks it with
/// `bpf_skc_lookup_tcp` (bpf-helpers(7), 5.2+) in that namespace, by the netns id user
/// space recorded in the entry, with the tuple the service sees: the client's address
/// and port, and the address and port the service answers from (translated in NAT mode).
/// The socket's state (`TCP_*` of include/net/tcp_states.h) when it does; `None` when not,
/// or when the entry has no netns id (written by an older version).
#[inline(always)]
fn service_holds(ctx: &TcContext, p: &Parsed, entry: &ServiceEntry) -> Option<u32> {
    if entry.peer_netns == 0 {
        return None;
    }
    let nat = entry.flags & TARGET_F_NAT != 0;
    let local_port = if nat && entry.nat_port != 0 {
        entry.nat_port
    } else {
        p.key.port
    };
    // The tuple lives in the per-CPU scratch slot (its 36 bytes would not fit the
    // classifier's stack); put_edge only reuses the slot after the lookup is over.
    let slot = SCRATCH.get_ptr_mut(0)?;
    let tuple = slot.cast::<bpf_sock_tuple>();
    let local = if nat { &entry.nat_addr } else { &p.key.addr };
    let size = if p.key.family == FAMILY_V4 {
        // SAFETY: writes inside the 40-byte slot (the IPv4 tuple is 12 bytes).
        unsafe {
            let t = &raw mut (*tuple).__bindgen_anon_1.ipv4;
            (*t).saddr = crate::nat::v4_word(&p.saddr);
            (*t).daddr = crate::nat::v4_word(local);
            (*t).sport = p.sport;
            (*t).dport = local_port;
        }
        12
    } else {
        // SAFETY: writes inside the 40-byte slot (the IPv6 tuple is 36 bytes).
        unsafe {
            let t = &raw mut (*tuple).__bindgen_anon_1.ipv6;
            for i in 0..4 {
                (*t).saddr[i] = u32::from_ne_bytes([
                    p.saddr[4 * i],
                    p.saddr[4 * i + 1],
                    p.saddr[4 * i + 2],
                    p.saddr[4 * i + 3],
                ]);
                (*t).daddr[i] = u32::from_ne_bytes([
                    local[4 * i],
                    local[4 * i + 1],
                    local[4 * i + 2],
                    local[4 * i + 3],
                ]);
            }
            (*t).sport = p.sport;
            (*t).dport = local_port;
        }
        36
    };
    // SAFETY: a lookup with our own skb and a tuple of the size passed; the socket it
    // returns is released at once (the verifier insists).
    unsafe {
        let sk = bpf_skc_lookup_tcp(
            ctx.skb.skb.cast(),
            tuple,
            size,
            u64::from(entry.peer_netns - 1),
            0,
        );
        if sk.is_null() {
            return None;
        }
        // The lookup falls back to listening sockets (__inet_lookup): a listener on the
        // port says nothing about this connection, which may well be the cloud's (it began
        // before the entry existed). Only a socket of the connection itself counts
        // (established, a pending request, or TIME_WAIT).
        let state = (*sk).state;
        bpf_sk_release(sk.cast());
        (state != TCP_LISTEN).then_some(state)
    }
}

/// `TCP_*` states of include/net/tcp_states.h, as `bpf_sock.state` reports them.
const TCP_TIME_WAIT: u32 = 6;
const TCP_LAST_ACK: u32 = 9;
const TCP_LISTEN: u32 = 10;
const TCP_CLOSING: u32 = 11;

/// Is a socket in `state` a connection both of whose sides sent their FIN (what follows a
/// removal at the last ACK: `TIME_WAIT`, `LAST_ACK`, `CLOSING`)?
#[inline(always)]
fn socket_closed(state: u32) -> bool {
    state == TCP_TIME_WAIT || state == TCP_LAST_ACK || state == TCP_CLOSING
}

/// Follows the orderly close of edge flow `p` (`from_client`: a client segment, else the
/// service's) in its record `state` (see `viscum_common::close`), reading the segment's
/// sequence numbers only for a FIN or when the last ACK is due; true when `p` is the
/// connection's last segment, after which the record goes.
///
/// The programs ask it last, once they no longer read the record: a result carried across
/// the rest of a program (or a branch on the segment's flags before it) makes the verifier
/// walk all of that twice.
#[inline(always)]
fn is_last(ctx: &TcContext, p: &Parsed, state: &mut ReplyState, from_client: bool) -> bool {
    if !close::concerns(state.flags, p.tcp_flags) {
        return false;
    }
    let Some(seg) = crate::parse::tcp_segment(ctx, p, from_client) else {
        return false;
    };
    match close::step(state.flags, state.fin_seq, &seg) {
        CloseStep::Keep => false,
        CloseStep::Update { flags, fin_seq } => {
            // The number first: the other program, reading the record at the same time,
            // then never pairs a new flag with the old number.
            state.fin_seq = fin_seq;
            state.flags = flags;
            false
        }
        CloseStep::Remove => true,
    }
}

/// The close as client segment `p` shows it, for the record `state` of key `rkey`, once
/// nothing reads the record any more (see [`is_last`]): the connection's last segment,
/// delivered by the entry alone, removes the record (an LRU record may be reused as soon as
/// it is removed). A client FIN after the service's empties this CPU's reply-cache slot of
/// the flow: the service's ACK of it, the connection's last segment, leaves from this CPU,
/// and must take the full path, where the record sees the close, not a copy.
#[inline(always)]
fn track_client_close(ctx: &TcContext, p: &Parsed, state: &mut ReplyState, rkey: &ReplyKey) {
    if p.tcp_flags & TCP_FIN != 0 && state.flags & REPLY_F_FIN_SERVICE != 0 {
        crate::reply_cache::forget_record(rkey);
    }
    if is_last(ctx, p, state, true) {
        let _ = REPLIES.remove(rkey);
    }
}

/// The close as reply `p` shows it (sent on from host veth `ifindex`, answered from
/// namespace port `local_port`, network order: `p`'s source port before a rewrite), for its
/// record `state`, once nothing reads the record any more (see [`is_last`]): the
/// connection's last segment, already sent, removes the record. A service FIN after the
/// client's ends this CPU's flow-cache slot of the flow: the client's ACK of it, the
/// connection's last segment, comes in on this CPU, and must take the full path, where the
/// record sees the close, not a copy. (The first FIN's side leaves the other cache alone: the
/// line of a slot the flow most likely never had here would cost a cache miss per
/// connection.)
#[inline(always)]
pub fn track_service_close(
    ctx: &TcContext,
    p: &Parsed,
    state: &mut ReplyState,
    local_port: u16,
    ifindex: u32,
) {
    if p.tcp_flags & TCP_FIN != 0 && state.flags & REPLY_F_FIN_CLIENT != 0 {
        cache::expire(
            &p.key.addr,
            p.key.port,
            &state.service,
            state.service_port,
            p.key.proto,
            p.key.family,
        );
    }
    if is_last(ctx, p, state, false) {
        let mut rkey = reply_key_of(p, ifindex);
        rkey.local_port = local_port;
        let _ = REPLIES.remove(&rkey);
    }
}

/// The reply-side key of the flow of `p` towards `entry`'s target.
#[inline(always)]
fn reply_key(p: &Parsed, entry: &ServiceEntry) -> ReplyKey {
    edge_key(
        &p.saddr,
        p.sport,
        p.key.port,
        p.key.proto,
        p.key.family,
        entry,
    )
}

/// The edge-record key of the flow from `client`:`client_port` to `service_port`
/// (all network order) towards `entry`'s target.
#[inline(always)]
pub fn edge_key(
    client: &[u8; 16],
    client_port: u16,
    service_port: u16,
    proto: u8,
    family: u8,
    entry: &ServiceEntry,
) -> ReplyKey {
    let local_port = local_port_of(service_port, entry);
    ReplyKey {
        client: *client,
        client_port,
        local_port,
        proto,
        family,
        _pad: [0; 2],
        ifindex: entry.ifindex,
    }
}

/// The port `entry`'s service answers from for a flow to `service_port` (network order):
/// in NAT mode its own port, when the entry names one.
#[inline(always)]
fn local_port_of(service_port: u16, entry: &ServiceEntry) -> u16 {
    if entry.flags & TARGET_F_NAT != 0 && entry.nat_port != 0 {
        entry.nat_port
    } else {
        service_port
    }
}

/// One per-CPU slot in which a new flow's record is assembled: the
/// classifier's 512-byte stack cannot spare its 40 bytes on top of the keys
/// and the parsed headers (LLVM refuses to build such a frame).
#[map(name = "VISCUM_SCRATCH")]
static SCRATCH: PerCpuArray<ReplyState> = PerCpuArray::pinned(1, 0);

/// Writes the edge record of a new flow (`flags`: `REPLY_F_*`), replacing any record of
/// the key.
#[inline(always)]
fn put_edge(
    rkey: &ReplyKey,
    service: &[u8; 16],
    service_port: u16,
    flags: u32,
    now: u64,
    closing_at_ns: u64,
) {
    write_edge(
        rkey,
        service,
        service_port,
        flags,
        now,
        closing_at_ns,
        BPF_ANY,
    );
}

/// [`put_edge`] under the map update's `map_flags` (`BPF_ANY`, or `BPF_NOEXIST` to write
/// only a record the table does not hold yet); true when the record was written.
#[inline(always)]
fn write_edge(
    rkey: &ReplyKey,
    service: &[u8; 16],
    service_port: u16,
    flags: u32,
    now: u64,
    closing_at_ns: u64,
    map_flags: u64,
) -> bool {
    let Some(slot) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot, nobody else writes it while we run.
    let st = unsafe { &mut *slot };
    st.last_seen_ns = now;
    st.closing_at_ns = closing_at_ns;
    // Word by word, volatile: LLVM would otherwise turn the copy into a
    // memcpy subprogram call, whose frame counts against the 512-byte stack
    // (see redirect::write_bytes).
    let a = service;
    let dst = st.service.as_mut_ptr().cast::<u32>();
    for i in 0..4 {
        // SAFETY: four in-bounds u32 writes into the slot's 16-byte array; BPF
        // allows unaligned stores to map values.
        unsafe {
            core::ptr::write_unaligned(
                dst.add(i),
                u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]),
            );
        }
    }
    st.service_port = service_port;
    st.fib_mtu = 0;
    st.flags = flags;
    // No FIB result yet: the first reply looks its route up. (The MACs are left as they
    // are: nothing reads them while `fib_at_ns` is 0.) Volatile: LLVM merges adjacent zero
    // stores into a memset subprogram call, which a kernel without a JIT refuses next to
    // tail calls (viscum-user/tests/ebpf_object.rs).
    // SAFETY: writes to fields of this CPU's slot.
    unsafe {
        core::ptr::write_volatile(&raw mut st.fib_at_ns, 0);
        core::ptr::write_volatile(&raw mut st.fib_ifindex, 0);
        core::ptr::write_volatile(&raw mut st.fib_class, 0);
        core::ptr::write_volatile(&raw mut st.fin_seq, 0);
    }
    if REPLIES.insert(rkey, &*st, map_flags).is_err() {
        return false;
    }
    cache::note_insert();
    true
}

/// `BPF_ANY` and `BPF_NOEXIST` of include/uapi/linux/bpf.h (map update flags).
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// Records a mirrored flow: its edge copy's replies are dropped on the way back.
#[inline(always)]
pub fn remember_mirror(p: &Parsed, entry: &ServiceEntry) {
    let now = counters::now_coarse();
    put_edge(
        &reply_key(p, entry),
        &p.key.addr,
        p.key.port,
        REPLY_F_DROP,
        now,
        0,
    );
}

/// The edge record a reply arriving on `ifindex` belongs to, if any: a pointer into
/// the map value (the reply path marks it closing on the service's FIN/RST).
#[inline(always)]
pub fn reply_identity(p: &Parsed, ifindex: u32) -> Option<*mut ReplyState> {
    REPLIES.get_ptr_mut(&reply_key_of(p, ifindex))
}

/// The edge record key of reply `p` (the client is its destination) arriving on host veth
/// `ifindex`.
#[inline(always)]
fn reply_key_of(p: &Parsed, ifindex: u32) -> ReplyKey {
    ReplyKey {
        client: p.key.addr,
        client_port: p.key.port,
        local_port: p.sport,
        proto: p.key.proto,
        family: p.key.family,
        _pad: [0; 2],
        ifindex,
    }
}

/// What a reply carries of its flow's target: the host veth it arrives on, the port the
/// service answers from, the protocol and family.
#[repr(C)]
pub struct IdentityKey {
    ifindex: u32,
    local_port: u16,
    proto: u8,
    family: u8,
}

/// The cloud endpoint the flows of an [`IdentityKey`] were served for; `ambiguous` once two
/// flows there were served for two different ones (two cloud endpoints translated to one
/// namespace port), after which no reply is given an identity from here.
#[repr(C)]
pub struct Identity {
    service: [u8; 16],
    service_port: u16,
    ambiguous: u16,
}

/// Cloud identities learned from edge records by the reply path (see [`restore_from_reply`]).
/// Not pinned: learned again by each loaded copy of the object, from its flows' first
/// replies. One key per served port of each target: small.
#[map(name = "VISCUM_IDENTITIES")]
static IDENTITIES: LruHashMap<IdentityKey, Identity> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn identity_key(p: &Parsed, ifindex: u32) -> IdentityKey {
    IdentityKey {
        ifindex,
        local_port: p.sport,
        proto: p.key.proto,
        family: p.key.family,
    }
}

/// Are two addresses equal? Word by word: an array comparison may become a `bcmp` call.
#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let w = |x: &[u8; 16], i: usize| {
        u32::from_ne_bytes([x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]])
    };
    ((w(a, 0) ^ w(b, 0)) | (w(a, 1) ^ w(b, 1)) | (w(a, 2) ^ w(b, 2)) | (w(a, 3) ^ w(b, 3))) == 0
}

/// Records, from the first reply of an edge flow whose source the reply path rewrites (NAT
/// mode, or a UDP server answering from its veth address), which cloud endpoint the
/// service's `(veth, local port)` answers for; marks it ambiguous if another flow there was
/// served for another one.
#[inline(always)]
pub fn learn_identity(p: &Parsed, ifindex: u32, state: &ReplyState) {
    let key = identity_key(p, ifindex);
    if let Some(known) = IDENTITIES.get_ptr_mut(&key) {
        // SAFETY: LRU value pointer from the kernel; a racing writer can only set the flag.
        let known = unsafe { &mut *known };
        if known.ambiguous == 0
            && (known.service_port != state.service_port
                || !same_addr(&known.service, &state.service))
        {
            known.ambiguous = 1;
            // Slots filled while the port looked unambiguous may hold the other endpoint's
            // record for this flow's key.
            crate::reply_cache::retire_all();
        }
        return;
    }
    let id = Identity {
        service: state.service,
        service_port: state.service_port,
        ambiguous: 0,
    };
    let _ = IDENTITIES.insert(&key, &id, 0);
    // Learned afresh (first reply, or the entry was evicted and with it what was known of
    // the port): slots filled under what is now forgotten are retired.
    crate::reply_cache::retire_all();
}

/// Does reply `p` come from elsewhere than its edge record's cloud endpoint `record` (NAT
/// mode, or a UDP server that answered from its veth address), so that the reply path
/// rewrites its source?
#[inline(always)]
pub fn answered_elsewhere(record: &ReplyState, p: &Parsed) -> bool {
    record.service != p.saddr || record.service_port != p.sport
}

/// Is `record`'s cloud endpoint the only one known for reply `p`'s namespace port on host
/// veth `ifindex` (learned by [`learn_identity`], never found ambiguous)? The reply cache
/// repeats a rewritten flow's record only then.
#[inline(always)]
pub fn sole_identity(p: &Parsed, ifindex: u32, record: &ReplyState) -> bool {
    // SAFETY: LRU value pointer from the kernel, read at once.
    match IDENTITIES.get_ptr(&identity_key(p, ifindex)) {
        Some(known) => unsafe {
            (*known).ambiguous == 0
                && (*known).service_port == record.service_port
                && same_addr(&(*known).service, &record.service)
        },
        None => false,
    }
}

/// For a reply `p` on host veth `ifindex` that found no edge record: if it answers for a
/// live entry whose target is this veth, restores the record and returns it; else `None`
/// (the namespace's own traffic, or nothing to go by).
///
/// A record can be lost while its flow lives (evicted from the full LRU table by a SYN
/// flood, or expired while the connection idled). The client side restores it from the
/// service's socket on the flow's next client packet (`recover`); a reply that comes first
/// (a server push, a delayed ACK) would otherwise leave with the namespace's own address,
/// and the client's answer to that stranger, a RST routed into the namespace, would kill
/// the connection. The cloud endpoint is the reply's own source (AnyIP mode), or the one
/// learned for this `(veth, local port)` ([`learn_identity`], NAT mode), checked against
/// the entry the services map holds for it now: same target veth, same local port, and in
/// NAT mode the namespace's address as the reply's source. A mirror's record is restored as
/// one, so the copy's answer is dropped.
///
/// Not for a SYN: neither the namespace's own connections out nor a SYN-ACK (a flood's
/// SYN-ACKs to spoofed sources would put back the records the flood evicts, as established
/// flows; a real client retries its SYN). Nor where two cloud endpoints
/// share the namespace port (ambiguous), nor for flows of prefix rules or all-ports entries
/// (exact entries only, see below), nor for a reply to one of the box's own addresses (a
/// connection made straight to the namespace from the box: the FIB would deliver it
/// locally). Limitation: a connection made straight to a namespace's NAT address on a served
/// port from elsewhere (a LAN host routing to it) is taken for an edge flow whose record was
/// lost.
#[inline(always)]
pub fn restore_from_reply(ctx: &TcContext, p: &Parsed, ifindex: u32) -> Option<*mut ReplyState> {
    if p.key.proto == PROTO_TCP && p.tcp_flags & TCP_SYN != 0 {
        return None;
    }
    // SAFETY: LRU value pointer from the kernel, read at once.
    let (service, service_port) = match IDENTITIES.get_ptr(&identity_key(p, ifindex)) {
        Some(known) => unsafe {
            if (*known).ambiguous != 0 {
                return None;
            }
            ((*known).service, (*known).service_port)
        },
        None => (p.saddr, p.sport),
    };
    let skey = viscum_common::ServiceKey {
        addr: service,
        port: service_port,
        proto: p.key.proto,
        family: p.key.family,
    };
    // The exact-match entries only: a prefix rule's walk would not fit the reply program's
    // stack beside its FIB lookup, and its cloud addresses are many behind one namespace port.
    let entry = crate::lookup::find_key(&skey, &p.key.addr, false)?;
    if entry.ifindex != ifindex || local_port_of(service_port, entry) != p.sport {
        return None;
    }
    if entry.flags & TARGET_F_NAT != 0 && !same_addr(&entry.nat_addr, &p.saddr) {
        return None;
    }
    // A destination the box delivers locally (one of its own addresses) is not a client:
    // a connection made straight to the namespace from the box itself.
    if !redirect::forwarded(ctx, p) {
        return None;
    }
    let flags = if entry.flags & TARGET_F_MIRROR != 0 {
        REPLY_F_DROP
    } else {
        REPLY_F_ESTABLISHED
    };
    let rkey = reply_key_of(p, ifindex);
    put_edge(
        &rkey,
        &service,
        service_port,
        flags,
        counters::now_coarse(),
        0,
    );
    counters::bump(GlobalCounter::FlowsRecovered);
    REPLIES.get_ptr_mut(&rkey)
}

/// The edge record of `rkey`, by reference into the map value: copied out whole, the
/// 72-byte record made LLVM emit `memmove` subprogram calls (refused next to tail calls on
/// a kernel without a JIT; viscum-user/tests/ebpf_object.rs). Callers read a few fields.
#[inline(always)]
pub fn reply_state(rkey: &ReplyKey) -> Option<&'static ReplyState> {
    // SAFETY: a value pointer from the kernel, valid while this program runs (RCU); the
    // fields read are written only when the flow is created.
    unsafe { REPLIES.get(rkey) }
}

/// Marks a flow whose service sent a FIN or RST as closing, so it lingers and
/// then ends like a flow the client closed; otherwise a refused or
/// server-closed connection would count as open until the idle timeout
/// (hours for TCP).
#[inline(always)]
pub fn close_from_service(state: &mut ReplyState) {
    if state.closing_at_ns == 0 {
        // The coarse clock, as the client side's stamps: the linger is seconds, and the
        // per-jiffy cache spares the precise clock's ~30 ns on every service FIN.
        state.closing_at_ns = counters::now_coarse();
    }
}
