//! TCP MSS clamping for redirected connections.
//!
//! A router clamps the MSS option of forwarded SYNs to the route's MTU
//! (OpenWrt's fw4 `tcp option maxseg size set rt mtu` in its forward chain),
//! so hosts behind a small link (PPPoE, a tunnel) never send segments that
//! do not fit. Redirected SYNs never reach that forward chain, so the
//! classifiers do it: the client's SYN is clamped to the client-facing
//! interface's MTU before it enters the service namespace, and the edge
//! copy's SYN-ACK to the egress interface's MTU on its way out.
//!
//! Only an MSS option in the first option slot is looked at: every common
//! stack (Linux, Windows, the BSDs and Apple's) puts it there, and a fixed
//! offset keeps the verifier's work constant.

use aya_ebpf::{helpers::bpf_check_mtu, programs::TcContext};
use viscum_common::{FAMILY_V4, GlobalCounter};

use crate::{counters, parse::Parsed};

const TCPOPT_MSS: u8 = 2;
const TCPOLEN_MSS: u8 = 4;

/// The MTU of interface `ifindex` (0: the skb's current device).
#[inline(always)]
pub fn mtu_of(ctx: &TcContext, ifindex: u32) -> u32 {
    let mut mtu: u32 = 0;
    // SAFETY: helper on our own skb with a stack out-pointer; whatever the
    // verdict, it stores the device MTU in `mtu`.
    unsafe { bpf_check_mtu(ctx.skb.skb.cast(), ifindex, &raw mut mtu, 0, 0) };
    mtu
}

/// Lowers the SYN's MSS option to what fits `mtu`, keeping the checksum
/// right. No-op for packets without SYN or without an MSS option first.
#[inline(always)]
pub fn clamp(ctx: &TcContext, p: &Parsed, mtu: u32) {
    if mtu < 576 {
        return;
    }
    let l4 = p.l4 as usize;
    if l4 > 512 {
        return;
    }
    // Data offset, then the first option, in one load: bytes 12..24 of the TCP header.
    // Helper loads and stores at a scalar offset, not packet pointers (see
    // `Parsed::ip_check`).
    let Ok(hdr) = ctx.load::<[u8; 12]>(l4 + 12) else {
        return;
    };
    if (hdr[0] >> 4) < 6 {
        return;
    }
    let opt = [hdr[8], hdr[9], hdr[10], hdr[11]];
    if opt[0] != TCPOPT_MSS || opt[1] != TCPOLEN_MSS {
        return;
    }
    let ip_hdr: u32 = if p.key.family == FAMILY_V4 { 20 } else { 40 };
    let max = mtu - ip_hdr - 20;
    let mss = u32::from(u16::from_be_bytes([opt[2], opt[3]]));
    if mss <= max {
        return;
    }
    let old = (mss as u16).to_be();
    let new = (max as u16).to_be();
    if ctx
        .l4_csum_replace(l4 + 16, u64::from(old), u64::from(new), 2)
        .is_ok()
        && ctx.store(l4 + 22, &new, 0).is_ok()
    {
        counters::bump(GlobalCounter::MssClamped);
    }
}
