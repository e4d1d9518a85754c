//! ICMP and ICMPv6 errors that concern redirected flows go where the flow
//! goes.
//!
//! An error quotes the start of the packet that caused it (RFC 792, RFC
//! 4443 section 2.4 c): its IP header and at least the first 8 bytes of
//! TCP/UDP, i.e. the ports. From the quote we rebuild the flow's key:
//!
//! * client side (`viscum_ingress`): a router between the edge and the
//!   client answers a packet the edge copy sent (source: the cloud address)
//!   with "fragmentation needed" / "packet too big", "unreachable" or "time
//!   exceeded", addressed to the cloud address. Without this module the
//!   kernel forwards it to the real cloud and the edge copy never learns the
//!   path MTU: a black hole for every segment larger than the path allows.
//!   The error is redirected into the flow's namespace, whose stack owns the
//!   socket (and, in AnyIP mode, the cloud address the error is sent to).
//! * service side (`viscum_reply`): the edge copy's stack answers a client's
//!   packet with an error (port unreachable, fragmentation needed). It goes
//!   back through the reply path like any reply, so strict firewalls and
//!   `rp_filter` never see it; errors about a mirrored flow are dropped,
//!   because the cloud, not the copy, answers the client.
//!
//! Only errors are handled (types that quote a packet); echo and neighbour
//! discovery are not ours and pass untouched, as does anything whose quote
//! cannot be parsed. For translated (NAT) flows the error is translated like
//! the flow's packets: the outer address and the quoted address and port,
//! with the quoted IPv4 header's checksum and the ICMP checksum kept right.

use aya_ebpf::{bindings::TC_ACT_SHOT, macros::map, maps::ProgramArray, programs::TcContext};
use viscum_common::{
    FAMILY_V4, GlobalCounter, PROTO_TCP, PROTO_UDP, REPLY_F_DROP, ReplyKey, ServiceKey,
    TARGET_F_NAT,
};

use crate::{counters, flow, lookup, nat, nat::End, parse::Parsed, redirect};

/// ICMP handling runs as its own programs, reached by tail call from the two
/// classifiers: each program gets its own 512-byte stack and its own
/// verifier budget, so the rare ICMP path neither crowds the hot path's
/// stack nor multiplies the states the verifier walks there. User space
/// fills the slots at load time ([`JUMP_ICMP_INGRESS`], [`JUMP_ICMP_REPLY`]).
#[map(name = "VISCUM_JUMP")]
static JUMP: ProgramArray = ProgramArray::pinned(viscum_common::JUMP_SLOTS, 0);

/// Continues in the ICMP program for `slot`; returns only if the tail call
/// failed (an empty slot), in which case the caller passes the packet.
#[inline(always)]
pub fn jump(ctx: &TcContext, slot: u32) {
    // SAFETY: a tail call with our own context into a program of our own
    // type; on success it does not return.
    unsafe { JUMP.tail_call(ctx, slot) };
}

/// The flow an ICMP error quotes: its inner IP source/destination and ports
/// (network order), protocol and family.
pub struct Quoted {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Offsets of the quoted IP header and of its TCP/UDP header.
    pub inner: u32,
    pub inner_l4: u32,
}

/// Reads through `bpf_skb_load_bytes`: ICMP errors are rare, and the
/// helper spares the verifier the variable offsets of a quoted header (and
/// works when the quote sits in paged data).
#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
}

/// Is this ICMP type an error that quotes the offending packet?
#[inline(always)]
fn is_error(family: u8, icmp_type: u8) -> bool {
    if family == FAMILY_V4 {
        // Destination unreachable (incl. fragmentation needed), source
        // quench, redirect, time exceeded, parameter problem.
        matches!(icmp_type, 3 | 4 | 5 | 11 | 12)
    } else {
        // Destination unreachable, packet too big, time exceeded, parameter
        // problem.
        matches!(icmp_type, 1..=4)
    }
}

/// Parses the error's quote; `None` if this is no error or the quote is not
/// a TCP/UDP packet of the same family.
#[inline(always)]
pub fn quoted(ctx: &TcContext, p: &Parsed) -> Option<Quoted> {
    let l4 = p.l4 as usize;
    if l4 > 512 {
        return None;
    }
    let icmp_type: u8 = load(ctx, l4)?;
    if !is_error(p.key.family, icmp_type) {
        return None;
    }
    // The ICMP header is 8 bytes; the quoted IP header follows.
    let inner = l4 + 8;
    // Word arrays: zeroing a byte array becomes a memset call (see
    // redirect::write_bytes for why that matters).
    let mut src = [0u32; 4];
    let mut dst = [0u32; 4];
    let proto: u8;
    let inner_l4 = if p.key.family == FAMILY_V4 {
        let vihl: u8 = load(ctx, inner)?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        proto = load(ctx, inner + 9)?;
        src[0] = load(ctx, inner + 12)?;
        dst[0] = load(ctx, inner + 16)?;
        inner + (ihl & 0x3c)
    } else {
        let vtc: u8 = load(ctx, inner)?;
        if vtc >> 4 != 6 {
            return None;
        }
        // Extension headers in the quote are not walked: a quoted TCP/UDP
        // packet of ours carries none.
        proto = load(ctx, inner + 6)?;
        src = load(ctx, inner + 8)?;
        dst = load(ctx, inner + 24)?;
        inner + 40
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let ports: [u16; 2] = load(ctx, inner_l4)?;
    Some(Quoted {
        // SAFETY: same size, plain bytes (network order either way).
        src: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(src) },
        dst: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(dst) },
        sport: ports[0],
        dport: ports[1],
        proto,
        inner: inner as u32,
        inner_l4: inner_l4 as u32,
    })
}

/// Client side: an error about a packet the edge copy sent. Returns the TC
/// action if the error was ours, `None` to pass it on.
#[inline(always)]
pub fn to_edge(ctx: &TcContext, p: &mut Parsed) -> Option<i32> {
    let q = quoted(ctx, p)?;
    // An error about a packet the edge sent as the cloud address is addressed to that
    // address; one addressed elsewhere is not about this flow's packets.
    if p.key.addr != q.src {
        return None;
    }
    // The quoted packet went from the service (the cloud address) to the
    // client: the entry is found by its source, the edge record by the quote
    // reversed, as the classifier keys the flow's own packets.
    let cfg = counters::config()?;
    let key = ServiceKey {
        addr: q.src,
        port: q.sport,
        proto: q.proto,
        family: p.key.family,
    };
    let entry = lookup::find_key(&key, &q.dst, counters::have_rules(cfg))?;
    let rkey = flow::edge_key(&q.dst, q.dport, q.sport, q.proto, p.key.family, entry);
    let state = flow::reply_state(&rkey)?;
    if state.flags & REPLY_F_DROP != 0 || state.service != q.src || state.service_port != q.sport {
        return None;
    }
    if entry.flags & TARGET_F_NAT != 0 {
        // The edge copy knows the flow by its own address and port.
        let nat_port = if entry.nat_port != 0 {
            entry.nat_port
        } else {
            q.sport
        };
        if nat::rewrite_icmp_outer(ctx, p, End::Destination, &entry.nat_addr).is_none()
            || !rewrite_quote(ctx, p, &q, true, &q.src, &entry.nat_addr, q.sport, nat_port)
        {
            // An exit of the ingress classifier: counted as one (see `INGRESS_EXITS`).
            counters::bump(GlobalCounter::RedirectErrors);
            return Some(TC_ACT_SHOT);
        }
    }
    counters::bump(GlobalCounter::IcmpToEdge);
    Some(redirect::to_service(ctx, entry, p.l2_vlan))
}

/// Service side: an error the edge copy's stack sent about a client's
/// packet, arriving on host veth `ifindex`. Returns the TC action if the
/// error concerns one of our flows, `None` to leave it to the kernel.
#[inline(always)]
pub fn to_client(ctx: &TcContext, p: &Parsed, ifindex: u32) -> Option<i32> {
    let q = quoted(ctx, p)?;
    // The quoted packet went from the client to the service.
    let rkey = ReplyKey {
        client: q.src,
        client_port: q.sport,
        local_port: q.dport,
        proto: q.proto,
        family: p.key.family,
        _pad: [0; 2],
        ifindex,
    };
    let id = flow::reply_state(&rkey)?;
    if id.flags & REPLY_F_DROP != 0 {
        counters::bump(GlobalCounter::IcmpDropped);
        return Some(TC_ACT_SHOT);
    }
    // The packet as it leaves: the outer rewrite keeps its header checksum current for the
    // TTL decrement that follows.
    let mut fwd = *p;
    if id.service != p.saddr {
        // Sent from the namespace's own address: the client must see the
        // error come from the address it talked to.
        if nat::rewrite_icmp_outer(ctx, &mut fwd, End::Source, &id.service).is_none() {
            return Some(TC_ACT_SHOT);
        }
    }
    if (id.service != q.dst || id.service_port != q.dport)
        && !rewrite_quote(
            ctx,
            p,
            &q,
            false,
            &q.dst,
            &id.service,
            q.dport,
            id.service_port,
        )
    {
        // A translated flow: the client's stack matches the error to its
        // socket by the quote, which must name the cloud address and port.
        return Some(TC_ACT_SHOT);
    }
    counters::bump(GlobalCounter::IcmpToClient);
    Some(redirect::reply_to_client(ctx, &fwd))
}

/// Rewrites the quoted packet's source (`src`) or destination address and
/// port. The quoted IPv4 header's checksum is updated with the address, which
/// leaves the ICMP checksum's sum over that header unchanged; ICMPv6 has no
/// inner header checksum, so its checksum takes the address change. The
/// quoted TCP/UDP checksum is left alone: nobody verifies it in an error.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one rewrite, spelled out")]
fn rewrite_quote(
    ctx: &TcContext,
    p: &Parsed,
    q: &Quoted,
    src: bool,
    old_addr: &[u8; 16],
    new_addr: &[u8; 16],
    old_port: u16,
    new_port: u16,
) -> bool {
    let inner = q.inner as usize;
    let icmp_csum = p.l4 as usize + 2;
    if old_addr != new_addr {
        if p.key.family == FAMILY_V4 {
            let off = inner + if src { 12 } else { 16 };
            let old = nat::v4_word(old_addr);
            let new = nat::v4_word(new_addr);
            if ctx
                .l3_csum_replace(inner + 10, u64::from(old), u64::from(new), 4)
                .is_err()
                || ctx.store(off, &new, 0).is_err()
            {
                return false;
            }
        } else {
            let off = inner + if src { 8 } else { 24 };
            // SAFETY: plain byte reinterpretation of 16-byte arrays.
            let mut old: [u32; 4] = unsafe { core::mem::transmute(*old_addr) };
            let mut new: [u32; 4] = unsafe { core::mem::transmute(*new_addr) };
            // SAFETY: two 16-byte stack buffers.
            let diff = unsafe {
                aya_ebpf::helpers::bpf_csum_diff(old.as_mut_ptr(), 16, new.as_mut_ptr(), 16, 0)
            };
            if diff < 0
                || ctx.l4_csum_replace(icmp_csum, 0, diff as u64, 0).is_err()
                || ctx.store(off, &new, 0).is_err()
            {
                return false;
            }
        }
    }
    if old_port != new_port {
        let off = q.inner_l4 as usize + if src { 0 } else { 2 };
        if ctx
            .l4_csum_replace(icmp_csum, u64::from(old_port), u64::from(new_port), 2)
            .is_err()
            || ctx.store(off, &new_port, 0).is_err()
        {
            return false;
        }
    }
    true
}
