//! Steering a hit into its service namespace.

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_redirect_peer, bpf_skb_vlan_pop},
    programs::TcContext,
};
use viscum_common::{ServiceEntry, TARGET_F_PEER, TARGET_F_SET_MAC};

/// Redirects the packet to `entry`'s veth and returns the helper's verdict
/// (`TC_ACT_REDIRECT`, or `TC_ACT_SHOT` if the kernel refused).
#[inline(always)]
pub fn redirect(ctx: &TcContext, entry: &ServiceEntry, l2_vlan: bool) -> i32 {
    let skb = ctx.skb.skb;
    // The service namespace has no VLAN devices: a tag left in the skb
    // metadata (the kernel untags into it before TC ingress) or in the data
    // would make its veth treat the frame as PACKET_OTHERHOST and drop it.
    // SAFETY: reading a field of our own __sk_buff.
    let hw_vlan = unsafe { (*skb).vlan_present } != 0;
    if hw_vlan {
        // SAFETY: helper on our own skb; only fails on an skb without a tag.
        unsafe { bpf_skb_vlan_pop(skb) };
    }
    if l2_vlan {
        // SAFETY: as above; pops the in-data tag now that the metadata one is gone.
        unsafe { bpf_skb_vlan_pop(skb) };
    }
    if entry.flags & TARGET_F_SET_MAC != 0 {
        // Re-read the pointers: vlan_pop invalidated any earlier ones.
        let start = ctx.data();
        if start + 6 <= ctx.data_end() {
            // SAFETY: 6 bytes checked above; the TC prologue has made the
            // head writable.
            unsafe { core::ptr::write_unaligned(start as *mut [u8; 6], entry.mac) };
        }
    }
    // SAFETY: helper calls with a plain ifindex; flags must be 0.
    let ret = if entry.flags & TARGET_F_PEER != 0 {
        unsafe { bpf_redirect_peer(entry.ifindex, 0) }
    } else {
        unsafe { bpf_redirect(entry.ifindex, 0) }
    };
    ret as i32
}
