//! Address and port rewrites with incremental checksum updates.
//!
//! Used for NAT-mode requests (destination -> the service's own address)
//! and for replies that must carry the cloud identity (source -> the cloud
//! address the client talked to). The helpers update the IPv4 header
//! checksum and the TCP/UDP checksum including the pseudo-header, so the
//! receiving stacks verify them without any offload shortcut; for
//! `CHECKSUM_PARTIAL` skbs the kernel adjusts only the pseudo-header part.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use viscum_common::{
    FAMILY_V4, PROTO_UDP,
    csum::{csum_diff16, ip_csum_replace4},
};

use crate::{
    parse::{Frag, Parsed},
    redirect::{Writes, put_header},
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

#[inline(always)]
fn l4_csum_off(p: &Parsed) -> u32 {
    if p.key.proto == PROTO_UDP {
        p.l4 + 6
    } else {
        p.l4 + 16
    }
}

#[inline(always)]
fn l4_flags(p: &Parsed) -> u64 {
    // An IPv4 UDP checksum of 0 means "none": keep it 0 rather than
    // producing a bogus one.
    if p.key.proto == PROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

/// Rewrites one end's address and port, and updates `p` to describe the packet as it now
/// is (that end's address and port, and [`Parsed::ip_check`]), so what follows (the TTL
/// decrement, a log line) cannot start from a stale header. `None` if a helper failed (the
/// packet is then dropped by the caller, never sent half-rewritten on purpose).
///
/// The TCP/UDP checksum goes through `bpf_l4_csum_replace`: only the kernel knows how the
/// skb carries it (`CHECKSUM_PARTIAL`: the field holds the pseudo-header sum alone and the
/// port is not in it; `CHECKSUM_COMPLETE`: `skb->csum` moves too), and `__sk_buff` does not
/// say. The IPv4 header checksum, which covers the header alone and is never offloaded, is
/// computed here from the parse (RFC 1624) instead of by `bpf_l3_csum_replace`, and written
/// with the addresses, and with the ports when no IP options lie between (`l4 == l3 + 20`),
/// in one write: IPv4 NAT of address and port is three helper calls, not five, and on the
/// reply side ([`Writes::Direct`], an untagged frame) one: the header goes through a packet
/// pointer ([`redirect::put_header`]).
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    p: &mut Parsed,
    end: End,
    new_addr: &[u8; 16],
    new_port: u16,
    how: Writes,
) -> Option<()> {
    let (old_addr, old_port) = match end {
        End::Source => (p.saddr, p.sport),
        End::Destination => (p.key.addr, p.key.port),
    };
    let csum = l4_csum_off(p) as usize;
    let l4f = l4_flags(p);
    let v4 = p.key.family == FAMILY_V4;
    // A later fragment has no L4 header: only its addresses change. The
    // datagram's L4 checksum sits in the first fragment, which gets the
    // whole pseudo-header update.
    let has_l4 = p.frag != Frag::Later;
    let addr_moves = old_addr != *new_addr;
    let port_moves = has_l4 && old_port != new_port;

    if addr_moves && has_l4 {
        let ok = if v4 {
            ctx.l4_csum_replace(
                csum,
                u64::from(v4_word(&old_addr)),
                u64::from(v4_word(new_addr)),
                l4f | u64::from(BPF_F_PSEUDO_HDR) | 4,
            )
            .is_ok()
        } else {
            ctx.l4_csum_replace(
                csum,
                0,
                u64::from(csum_diff16(&old_addr, new_addr)),
                l4f | u64::from(BPF_F_PSEUDO_HDR),
            )
            .is_ok()
        };
        if !ok {
            return None;
        }
    }
    if port_moves
        && ctx
            .l4_csum_replace(csum, u64::from(old_port), u64::from(new_port), l4f | 2)
            .is_err()
    {
        return None;
    }

    let mut ports_written = false;
    if addr_moves {
        if v4 {
            let check = u16::from_ne_bytes(ip_csum_replace4(
                p.ip_check.to_ne_bytes(),
                &old_addr,
                new_addr,
            ));
            let (src, dst, sport, dport) = match end {
                End::Source => (new_addr, &p.key.addr, new_port, p.key.port),
                End::Destination => (&p.saddr, new_addr, p.sport, new_port),
            };
            let c = check.to_ne_bytes();
            let sp = sport.to_ne_bytes();
            let dp = dport.to_ne_bytes();
            // The header from its checksum on (checksum, source, destination), then the
            // ports when they follow at once: every byte is the packet's own or its new value.
            let tail = [
                c[0], c[1], src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], sp[0],
                sp[1], dp[0], dp[1],
            ];
            let stored = if port_moves && p.l4 == p.l3 + 20 {
                ports_written = true;
                put_header(ctx, p, how, 10, &tail)
            } else {
                match tail.first_chunk::<10>() {
                    Some(head) => put_header(ctx, p, how, 10, head),
                    None => return None,
                }
            };
            if !stored {
                return None;
            }
            p.ip_check = check;
        } else {
            let off = if end == End::Source { 8 } else { 24 };
            if !put_header(ctx, p, how, off, new_addr) {
                return None;
            }
        }
    }
    if port_moves && !ports_written {
        let off = p.l4 as usize + if end == End::Source { 0 } else { 2 };
        if ctx.store(off, &new_port, 0).is_err() {
            return None;
        }
    }
    match end {
        End::Source => {
            p.saddr = *new_addr;
            p.sport = new_port;
        }
        End::Destination => {
            p.key.addr = *new_addr;
            p.key.port = new_port;
        }
    }
    Some(())
}

/// An IPv4 address (the first four bytes of the 16-byte layout) as the 32-bit word it is in
/// the packet, for the checksum helpers.
#[inline(always)]
pub fn v4_word(a: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([a[0], a[1], a[2], a[3]])
}

/// Rewrites the outer source or destination address of an ICMP (IPv4) or ICMPv6 packet,
/// and updates `p` to match (see [`rewrite`]). ICMPv4's checksum covers only the ICMP
/// message; ICMPv6's also covers the IPv6 pseudo-header (RFC 4443 section 2.3), so it
/// changes with the address. `None` if a helper failed.
#[inline(always)]
pub fn rewrite_icmp_outer(
    ctx: &TcContext,
    p: &mut Parsed,
    end: End,
    new_addr: &[u8; 16],
) -> Option<()> {
    let old_addr = match end {
        End::Source => p.saddr,
        End::Destination => p.key.addr,
    };
    if p.key.family == FAMILY_V4 {
        // The header checksum from the parse (RFC 1624), written in the same store as the
        // address where they touch (the source follows the checksum at once); the
        // destination, four bytes further on, gets a store of its own.
        let check = u16::from_ne_bytes(ip_csum_replace4(
            p.ip_check.to_ne_bytes(),
            &old_addr,
            new_addr,
        ));
        let c = check.to_ne_bytes();
        let base = p.l3 as usize + 10;
        match end {
            End::Source => {
                let head = [
                    c[0],
                    c[1],
                    new_addr[0],
                    new_addr[1],
                    new_addr[2],
                    new_addr[3],
                ];
                ctx.store(base, &head, 0).ok()?;
            }
            End::Destination => {
                ctx.store(base, &c, 0).ok()?;
                ctx.store(p.l3 as usize + 16, &v4_word(new_addr), 0).ok()?;
            }
        }
        p.ip_check = check;
    } else {
        ctx.l4_csum_replace(
            p.l4 as usize + 2,
            0,
            u64::from(csum_diff16(&old_addr, new_addr)),
            u64::from(BPF_F_PSEUDO_HDR),
        )
        .ok()?;
        let off = p.l3 as usize + if end == End::Source { 8 } else { 24 };
        ctx.store(off, new_addr, 0).ok()?;
    }
    match end {
        End::Source => p.saddr = *new_addr,
        End::Destination => p.key.addr = *new_addr,
    }
    Some(())
}
