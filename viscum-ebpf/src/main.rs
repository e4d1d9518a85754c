//! Viscum's TC classifiers.
//!
//! # Layout
//!
//! * [`parse`]: Ethernet / VLAN / IPv4 / IPv6 / TCP / UDP, every access bounds-checked.
//! * [`lookup`]: the services map and its exact-port-then-all-ports precedence.
//! * [`flow`]: per-flow decisions (cutover consistency) and the reply index.
//! * [`cache`], [`reply_cache`]: per-CPU copies of established TCP flows' decisions and
//!   records, which their packets are served from without the hashed lookups.
//! * [`nat`]: address/port rewrites with incremental checksums.
//! * [`redirect`]: into the service namespace, back to the client, mirrors.
//! * [`counters`]: global per-CPU counters and the runtime config.
//!
//! Two programs: `viscum_ingress` on client-facing interfaces and
//! `viscum_reply` on the host side of each service veth. Everything they do
//! not handle leaves unmodified with `TC_ACT_UNSPEC` ("no verdict"): the
//! kernel then lets it pass exactly as `TC_ACT_OK` would, but unlike
//! `TC_ACT_OK` (which under TCX ends the chain) it still runs whatever other
//! programs or tc filters the router has on the same hook (QoS, firewalls).
//! Viscum must never touch traffic that is not its own.
// no_std/no_main only for the bpf target: a host build (`cargo clippy --workspace
// --all-targets`) gets an ordinary std binary with an empty main, instead of a no_std one
// that the host's unwinding panics cannot build (as aya's own test programs do).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// aya's `#[classifier]` wraps each program in an exported function it generates without the
// item's attributes, so their doc comments (kept below for readers) cannot reach the item
// `missing_docs` checks. Lint attributes change nothing in the compiled object.
#![allow(
    missing_docs,
    reason = "aya's #[classifier] drops the programs' doc comments"
)]

// Every program is `#[inline(always)]`: `#[classifier]` makes the item a function nested in
// the exported one, which LLVM is otherwise free to leave out of line once the body is
// large (it did for `viscum_ingress` on bpfeb), and a BPF-to-BPF call next to tail calls is
// refused by a kernel without a JIT ("tail_calls are not allowed in non-JITed programs
// with bpf-to-bpf calls": s390x on Debian 6.1).
mod cache;
mod counters;
mod flow;
mod frag;
mod icmp;
mod lookup;
mod mss;
mod nat;
mod parse;
mod redirect;
mod reply_cache;
mod runtime;
mod share;

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use viscum_common::{
    DatapathConfig, FlowCacheSlot, GlobalCounter, JUMP_ICMP_INGRESS, JUMP_ICMP_REPLY, JUMP_RECOVER,
    PROTO_TCP, REPLY_F_DROP, ReplyState, ServiceEntry, TARGET_F_MIRROR, TARGET_F_NAT,
};

use crate::{
    flow::Decision,
    nat::End,
    parse::{Kind, ParseError, Parsed},
    redirect::Writes,
};

/// TC ingress of client-facing interfaces. Returns `TC_ACT_REDIRECT` for a
/// packet redirected into its service namespace (`TC_ACT_SHOT` if the
/// redirect helper or a NAT rewrite failed), `TC_ACT_UNSPEC` for everything
/// else (no match, cloud flow, mirror mode, not TCP/UDP over IP).
#[classifier]
#[inline(always)]
pub fn viscum_ingress(ctx: TcContext) -> i32 {
    // Counted by its exit only (`viscum_common::INGRESS_EXITS`): one bump per packet.
    match try_ingress(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

/// TC ingress of the host side of each service veth. Returns
/// `TC_ACT_REDIRECT` for a reply sent straight out towards the client,
/// `TC_ACT_SHOT` for a mirror-mode reply (or a failed rewrite),
/// `TC_ACT_UNSPEC` for the namespace's own traffic and what the FIB lookup
/// leaves to the kernel.
#[classifier]
#[inline(always)]
pub fn viscum_reply(ctx: TcContext) -> i32 {
    match try_reply(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

/// ICMP errors from the network, tail-called from `viscum_ingress` (same
/// hook). Returns `TC_ACT_REDIRECT` for an error about an edge flow, sent into
/// its service namespace (`TC_ACT_SHOT` if that failed), else `TC_ACT_UNSPEC`.
#[classifier]
#[inline(always)]
pub fn viscum_icmp_ingress(ctx: TcContext) -> i32 {
    let mut slot = MaybeUninit::uninit();
    match parse::parse(&ctx, &mut slot) {
        Ok(Kind::Icmp) => {
            // SAFETY: written by a successful parse.
            let p = unsafe { slot.assume_init_mut() };
            match icmp::to_edge(&ctx, p) {
                Some(action) => action,
                None => pass(),
            }
        }
        _ => pass(),
    }
}

/// ICMP errors from edge copies, tail-called from `viscum_reply` (same hook).
/// Returns `TC_ACT_REDIRECT` for an error about a client's flow, forwarded to
/// the client, `TC_ACT_SHOT` for a mirror-mode flow (or a failed rewrite),
/// else `TC_ACT_UNSPEC`.
#[classifier]
#[inline(always)]
pub fn viscum_icmp_reply(ctx: TcContext) -> i32 {
    // SAFETY: reading our own __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let mut slot = MaybeUninit::uninit();
    match parse::parse(&ctx, &mut slot) {
        Ok(Kind::Icmp) => {
            // SAFETY: written by a successful parse.
            let p = unsafe { slot.assume_init_ref() };
            icmp::to_client(&ctx, p, ifindex).unwrap_or(TC_ACT_UNSPEC)
        }
        _ => TC_ACT_UNSPEC,
    }
}

/// Parses, counting what cannot be handled; `Err` carries the verdict for
/// packets that are not TCP/UDP of a flow we can place (pass, or where an
/// ICMP error about an edge flow was sent).
#[inline(always)]
fn parse_or_pass(ctx: &TcContext) -> Result<Parsed, i32> {
    let mut slot = MaybeUninit::uninit();
    match parse::parse(ctx, &mut slot) {
        Ok(Kind::L4) => {
            // SAFETY: written by a successful parse.
            let mut p = unsafe { slot.assume_init() };
            // A later fragment of a datagram we never saw the start of passes.
            if frag::resolve(&mut p) {
                Ok(p)
            } else {
                Err(pass())
            }
        }
        Ok(Kind::Icmp) => {
            icmp::jump(ctx, JUMP_ICMP_INGRESS);
            Err(pass())
        }
        Err(ParseError::NotIp) => Err(pass()),
        Err(ParseError::Malformed) => {
            counters::bump(GlobalCounter::Unparsable);
            Err(pass())
        }
    }
}

/// Every exit names its TC action; `Err` carries the action for packets the
/// classifier could not or would not handle (always "no verdict", see `pass`).
#[inline(always)]
fn try_ingress(ctx: &TcContext) -> Result<i32, i32> {
    let mut p = parse_or_pass(ctx)?;
    // The miss pre-filter: no entry or rule has this protocol and destination port.
    // After the parse, so ICMP errors have gone to their own program and a later
    // fragment is judged by the ports its first fragment recorded.
    if lookup::unmanaged(&p) {
        return Ok(pass());
    }
    let Some(cfg) = counters::config() else {
        return Ok(pass());
    };
    let have_rules = counters::have_rules(cfg);
    if !have_rules && lookup::address_unmanaged(&p) {
        return Ok(pass());
    }
    let log = counters::log_enabled(cfg);
    // An established TCP segment (no SYN, FIN or RST) of a flow this CPU decided less than
    // `cache::CACHE_LIFE_TICKS` ago, under the same entries, is delivered by the flow cache's
    // copy of its entry, with no entry or flow lookup (see `cache`). The generation is read
    // before any lookup, so a fill never records an entry older than it.
    let generation = lookup::entries_generation();
    let cached = if parse::plain_tcp(&p) {
        cache::hit(&p, counters::tick(), generation)
    } else {
        None
    };
    let (entry, slot) = match cached {
        Some(slot) => {
            // A first fragment records its ports for the later ones, as on the full path.
            frag::remember(&p);
            // SAFETY: this CPU's slot (see `cache::hit`).
            (unsafe { &(*slot).target }, Some(slot))
        }
        None => (decide_edge(ctx, &p, cfg, log, generation)?, None),
    };
    let port = p.key.port;
    let action = deliver(ctx, &mut p, entry, slot)?;
    // Logged here, not in `deliver`: the log macro's closure, in a function two programs
    // inline, is left out of line by LLVM, and a BPF-to-BPF call is refused next to tail
    // calls on a kernel without a JIT. The port the client asked for, not the translated one.
    if log {
        debug!(
            ctx,
            "edge proto={} port={} -> ifindex {} action {}",
            p.key.proto,
            u16::from_be(port),
            entry.ifindex,
            action
        );
    }
    Ok(action)
}

/// The entry a packet is served at the edge by, when its flow is (or becomes) an edge flow
/// of it; `Err` carries the verdict otherwise (a miss, a mirror, a cloud flow, a recovery).
#[inline(always)]
fn decide_edge(
    ctx: &TcContext,
    p: &Parsed,
    cfg: &'static DatapathConfig,
    log: bool,
    generation: u64,
) -> Result<&'static ServiceEntry, i32> {
    let Some(entry) = lookup::find(p, counters::have_rules(cfg)) else {
        if log {
            debug!(
                ctx,
                "miss proto={} port={}",
                p.key.proto,
                u16::from_be(p.key.port)
            );
        }
        return Err(pass());
    };
    frag::remember(p);

    if entry.flags & TARGET_F_MIRROR != 0 {
        if !flow::target_alive(ctx, entry) {
            return Err(pass());
        }
        // The cloud keeps serving; the edge copy sees a clone and its
        // answers are dropped on the way back.
        flow::remember_mirror(p, entry);
        redirect::mirror(ctx, entry);
        return Err(pass());
    }

    match flow::decide(ctx, p, entry, cfg, generation) {
        Decision::Edge => Ok(entry),
        Decision::Cloud => {
            if log {
                debug!(
                    ctx,
                    "cloud flow proto={} port={}",
                    p.key.proto,
                    u16::from_be(p.key.port)
                );
            }
            Err(pass())
        }
        Decision::Recover => {
            icmp::jump(ctx, JUMP_RECOVER);
            // No recovery program in its slot: as before there was one.
            counters::bump(GlobalCounter::FlowOrphans);
            Err(pass())
        }
    }
}

/// Serves a packet of an edge flow of `entry`: translates it in NAT mode, clamps a SYN's
/// MSS, redirects it into the service namespace, and counts it once: in the entry's
/// counters when redirected (the global `redirected` is their sum, see
/// `viscum_common::GlobalCounter::Redirected`), or in the flow-cache slot `cached` that
/// `entry` is the copy of, which adds them to the entry's later (see
/// `cache::count_redirect`); as a redirect error otherwise.
///
/// In NAT mode `p` describes the translated packet afterwards (see [`nat::rewrite`]).
#[inline(always)]
fn deliver(
    ctx: &TcContext,
    p: &mut Parsed,
    entry: &ServiceEntry,
    cached: Option<*mut FlowCacheSlot>,
) -> Result<i32, i32> {
    // The length as it arrived: the redirect may strip a VLAN tag.
    let len = ctx.len();
    if entry.flags & TARGET_F_NAT != 0 {
        let port = if entry.nat_port != 0 {
            entry.nat_port
        } else {
            p.key.port
        };
        if nat::rewrite(
            ctx,
            p,
            End::Destination,
            &entry.nat_addr,
            port,
            Writes::Helper,
        )
        .is_none()
        {
            counters::bump(GlobalCounter::RedirectErrors);
            return Err(TC_ACT_SHOT);
        }
    }
    if p.key.proto == PROTO_TCP && p.tcp_flags & parse::TCP_SYN != 0 {
        // The client-facing interface's MTU bounds the segments the edge
        // copy may send back (fw4 clamps forwarded SYNs the same way).
        mss::clamp(ctx, p, mss::mtu_of(ctx, 0));
    }
    let action = redirect::to_service(ctx, entry, p.l2_vlan);
    if action == TC_ACT_REDIRECT {
        match cached {
            Some(slot) => cache::count_redirect(slot, len),
            None => {
                if let Some(s) = lookup::stats_of(entry) {
                    s.packets += 1;
                    s.bytes += u64::from(len);
                }
            }
        }
    } else {
        counters::bump(GlobalCounter::RedirectErrors);
    }
    Ok(action)
}

/// A mid-connection TCP packet without a flow record, tail-called from `viscum_ingress`
/// (same hook, same packet). Returns `TC_ACT_REDIRECT` when the service namespace's stack
/// holds its connection (the record is restored and the packet served at the edge,
/// `TC_ACT_SHOT` if that failed), else `TC_ACT_UNSPEC` (the cloud has the connection).
#[classifier]
#[inline(always)]
pub fn viscum_recover(ctx: TcContext) -> i32 {
    match try_recover(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

#[inline(always)]
fn try_recover(ctx: &TcContext) -> Result<i32, i32> {
    let mut slot = MaybeUninit::uninit();
    let Ok(Kind::L4) = parse::parse(ctx, &mut slot) else {
        return Ok(pass());
    };
    // SAFETY: written by a successful parse.
    let mut p = unsafe { slot.assume_init() };
    if !frag::resolve(&mut p) {
        return Ok(pass());
    }
    let Some(cfg) = counters::config() else {
        return Ok(pass());
    };
    let Some(entry) = lookup::find(&p, counters::have_rules(cfg)) else {
        return Ok(pass());
    };
    if !flow::recover(ctx, &p, entry) {
        return Ok(pass());
    }
    deliver(ctx, &mut p, entry, None)
}

/// Replies leaving a service namespace (TC ingress of its host veth).
#[inline(always)]
fn try_reply(ctx: &TcContext) -> Result<i32, i32> {
    // SAFETY: reading our own __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let mut slot = MaybeUninit::uninit();
    let mut p = match parse::parse(ctx, &mut slot) {
        Ok(Kind::L4) => {
            // SAFETY: written by a successful parse.
            let mut p = unsafe { slot.assume_init() };
            if !frag::resolve(&mut p) {
                return Err(TC_ACT_UNSPEC);
            }
            p
        }
        Ok(Kind::Icmp) => {
            icmp::jump(ctx, JUMP_ICMP_REPLY);
            return Err(TC_ACT_UNSPEC);
        }
        Err(_) => return Err(TC_ACT_UNSPEC),
    };
    // An established TCP reply (no SYN, FIN or RST) of a record this CPU copied less than
    // `cache::CACHE_LIFE_TICKS` ago, with no entry changed and no namespace port's cloud
    // endpoint learned or found ambiguous since, is sent out by the reply cache's copy (see
    // `reply_cache`). Both generations are read before any lookup, so a fill never records
    // a record older than them.
    let generation = lookup::entries_generation();
    let identities = reply_cache::identities();
    if parse::plain_tcp(&p)
        && redirect::untagged(&p)
        && let Some(copy) = reply_cache::hit(&p, ifindex, counters::tick(), generation, identities)
    {
        frag::remember(&p);
        rewrite_reply_source(ctx, &mut p, copy)?;
        return Ok(redirect::forward_known(ctx, &p, copy));
    }
    let id = match flow::reply_identity(&p, ifindex) {
        Some(id) => id,
        None => {
            match flow::restore_from_reply(ctx, &p, ifindex) {
                Some(id) => id,
                None => {
                    // The namespace's own traffic (DNS lookups, updates...): routed as usual.
                    counters::bump(GlobalCounter::RepliesUnknown);
                    if p.key.proto == PROTO_TCP
                        && p.tcp_flags & parse::TCP_SYN == 0
                        && !lookup::port_unmanaged(p.key.proto, p.sport)
                    {
                        // From a served port, it may be a flow whose record was lost: its
                        // next client packet must not be served from the flow cache (see
                        // `cache`).
                        cache::note_unknown_reply();
                    }
                    return Ok(TC_ACT_UNSPEC);
                }
            }
        }
    };
    // SAFETY: LRU value pointer from the kernel; the fields read below are
    // written only when a flow is created, and a race on `closing_at_ns` only
    // loses a timestamp.
    let id = unsafe { &mut *id };
    if id.flags & REPLY_F_DROP != 0 {
        return Ok(TC_ACT_SHOT);
    }
    // The port the record is keyed by, before a rewrite moves it.
    let local_port = p.sport;
    if p.key.proto == PROTO_TCP && p.tcp_flags & (parse::TCP_FIN | parse::TCP_RST) != 0 {
        // The service ends the connection (or refuses it: nothing listens):
        // the flow lingers and is then over, as when the client ends it.
        flow::close_from_service(id);
        reply_cache::forget(&p, ifindex);
    }
    frag::remember(&p);
    if id.fib_at_ns == 0 && flow::answered_elsewhere(id, &p) {
        // The flow's first reply (or first since its record was restored) that is rewritten
        // below: the reply path learns which cloud endpoint this namespace port answers for.
        flow::learn_identity(&p, ifindex, id);
    }
    if parse::plain_tcp(&p) {
        let now = counters::now_coarse();
        reply_cache::fill(&p, ifindex, id, now, generation, identities);
    }
    if !redirect::untagged(&p) {
        // A tag in the frame, which our veth never puts there (it carries tags in the skb):
        // the reply side writes headers at untagged offsets only (`redirect::Writes`), so
        // the kernel routes this one as it is.
        counters::bump(GlobalCounter::RepliesToStack);
        return Ok(TC_ACT_UNSPEC);
    }
    // Rewritten in place: a copy would not fit the 512-byte stack.
    rewrite_reply_source(ctx, &mut p, id)?;
    // Sent straight out to the client, a reply gets its service's network share (HTB class,
    // see `share`), cached in the flow record with the FIB result.
    let action = redirect::reply_to_client_cached(ctx, &p, id, ifindex);
    // Last: the verifier then walks the rewrite and the send once, whatever the close's
    // state (the rewrite moved nothing the close tracking reads).
    if p.key.proto == PROTO_TCP {
        flow::track_service_close(ctx, &p, id, local_port, ifindex);
    }
    Ok(action)
}

/// Makes reply `p` come from the cloud endpoint of its edge record `record`, as the client
/// expects: rewritten when the service answered from another address or port (NAT mode, or
/// a UDP server that answered from its veth address: plain sendto() on a 0.0.0.0 socket),
/// or a connected client drops it. `p` then describes the rewritten packet;
/// `Err(TC_ACT_SHOT)` if the rewrite failed.
#[inline(always)]
fn rewrite_reply_source(ctx: &TcContext, p: &mut Parsed, record: &ReplyState) -> Result<(), i32> {
    if flow::answered_elsewhere(record, p) {
        if nat::rewrite(
            ctx,
            p,
            End::Source,
            &record.service,
            record.service_port,
            Writes::Direct,
        )
        .is_none()
        {
            return Err(TC_ACT_SHOT);
        }
        counters::bump(GlobalCounter::RepliesRewritten);
    }
    Ok(())
}

/// Not ours: no verdict, so the packet continues as if Viscum were absent.
#[inline(always)]
fn pass() -> i32 {
    counters::bump(GlobalCounter::Passed);
    TC_ACT_UNSPEC
}

/// The host build's entry point (see the crate attributes); the programs only run in the
/// kernel.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
