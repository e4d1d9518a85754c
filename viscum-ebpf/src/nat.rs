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
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use viscum_common::{FAMILY_V4, PROTO_UDP};

use crate::parse::{Frag, Parsed};

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

/// Rewrites one end's address and port. Returns false if a helper failed
/// (the packet is then left to the stack, never sent half-rewritten on purpose).
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    p: &Parsed,
    end: End,
    old_addr: &[u8; 16],
    new_addr: &[u8; 16],
    old_port: u16,
    new_port: u16,
) -> bool {
    let csum = l4_csum_off(p);
    let l4f = l4_flags(p);
    // A later fragment has no L4 header: only its addresses change. The
    // datagram's L4 checksum sits in the first fragment, which gets the
    // whole pseudo-header update.
    let has_l4 = p.frag != Frag::Later;
    if old_addr != new_addr {
        if p.key.family == FAMILY_V4 {
            let off = p.l3 + if end == End::Source { 12 } else { 16 };
            let old = u32::from_ne_bytes([old_addr[0], old_addr[1], old_addr[2], old_addr[3]]);
            let new = u32::from_ne_bytes([new_addr[0], new_addr[1], new_addr[2], new_addr[3]]);
            if ctx
                .l3_csum_replace(p.l3 as usize + 10, u64::from(old), u64::from(new), 4)
                .is_err()
                || (has_l4
                    && ctx
                        .l4_csum_replace(
                            csum as usize,
                            u64::from(old),
                            u64::from(new),
                            l4f | u64::from(BPF_F_PSEUDO_HDR) | 4,
                        )
                        .is_err())
                || ctx.store(off as usize, &new, 0).is_err()
            {
                return false;
            }
        } else {
            let off = p.l3 + if end == End::Source { 8 } else { 24 };
            // bpf_csum_diff wants 4-byte aligned words.
            let mut old: [u32; 4] = unsafe { core::mem::transmute(*old_addr) };
            let mut new: [u32; 4] = unsafe { core::mem::transmute(*new_addr) };
            if has_l4 {
                // SAFETY: two 16-byte stack buffers.
                let diff = unsafe { bpf_csum_diff(old.as_mut_ptr(), 16, new.as_mut_ptr(), 16, 0) };
                if diff < 0
                    || ctx
                        .l4_csum_replace(
                            csum as usize,
                            0,
                            diff as u64,
                            l4f | u64::from(BPF_F_PSEUDO_HDR),
                        )
                        .is_err()
                {
                    return false;
                }
            }
            if ctx.store(off as usize, &new, 0).is_err() {
                return false;
            }
        }
    }
    if has_l4 && old_port != new_port {
        let off = p.l4 + if end == End::Source { 0 } else { 2 };
        if ctx
            .l4_csum_replace(
                csum as usize,
                u64::from(old_port),
                u64::from(new_port),
                l4f | 2,
            )
            .is_err()
            || ctx.store(off as usize, &new_port, 0).is_err()
        {
            return false;
        }
    }
    true
}

/// Rewrites the outer source (`src`) or destination address of an ICMP
/// (IPv4) or ICMPv6 packet. ICMPv4's checksum covers only the ICMP message;
/// ICMPv6's also covers the IPv6 pseudo-header (RFC 4443 section 2.3), so it
/// changes with the address.
#[inline(always)]
pub fn rewrite_icmp_outer(
    ctx: &TcContext,
    p: &Parsed,
    src: bool,
    old_addr: &[u8; 16],
    new_addr: &[u8; 16],
) -> bool {
    if p.key.family == FAMILY_V4 {
        let off = p.l3 as usize + if src { 12 } else { 16 };
        let old = u32::from_ne_bytes([old_addr[0], old_addr[1], old_addr[2], old_addr[3]]);
        let new = u32::from_ne_bytes([new_addr[0], new_addr[1], new_addr[2], new_addr[3]]);
        ctx.l3_csum_replace(p.l3 as usize + 10, u64::from(old), u64::from(new), 4)
            .is_ok()
            && ctx.store(off, &new, 0).is_ok()
    } else {
        let off = p.l3 as usize + if src { 8 } else { 24 };
        // SAFETY: plain byte reinterpretation of 16-byte arrays.
        let mut old: [u32; 4] = unsafe { core::mem::transmute(*old_addr) };
        let mut new: [u32; 4] = unsafe { core::mem::transmute(*new_addr) };
        // SAFETY: two 16-byte stack buffers.
        let diff = unsafe { bpf_csum_diff(old.as_mut_ptr(), 16, new.as_mut_ptr(), 16, 0) };
        diff >= 0
            && ctx
                .l4_csum_replace(
                    p.l4 as usize + 2,
                    0,
                    diff as u64,
                    u64::from(BPF_F_PSEUDO_HDR),
                )
                .is_ok()
            && ctx.store(off, &new, 0).is_ok()
    }
}
