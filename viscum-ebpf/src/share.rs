//! Network shares: the HTB class of a service's replies.
//!
//! The daemon puts an HTB qdisc on the client-facing interface's egress with one class per
//! service (rate in proportion to its `[service.network] share`), and writes each service
//! veth's class handle here. `viscum_reply` sends a reply out of that interface with
//! `bpf_redirect`, which keeps `skb->priority` (unlike the kernel's IPv4 forwarding, which
//! sets it from the TOS byte), and HTB takes a priority that names one of its leaf classes
//! as the class (`htb_classify`). So the kernel divides the link; no packet meets user space.

use aya_ebpf::{macros::map, maps::HashMap, programs::TcContext};
use viscum_common::SHARES_ENTRIES;

/// Host-veth ifindex -> `skb->priority` (the service's HTB class handle).
#[map(name = "VISCUM_SHARES")]
static SHARES: HashMap<u32, u32> = HashMap::pinned(SHARES_ENTRIES, 0);

/// The class of replies that arrive on host veth `ifindex`; 0 for a veth without a share
/// (0 names no HTB class: such replies keep their priority).
#[inline(always)]
pub fn class_of(ifindex: u32) -> u32 {
    // SAFETY: a read of the map value the kernel returned, copied at once.
    unsafe { SHARES.get(ifindex).copied() }.unwrap_or(0)
}

/// Gives a reply its service's class `class` (from [`class_of`]); 0 leaves the packet's
/// priority as it is.
#[inline(always)]
pub fn classify(ctx: &TcContext, class: u32) {
    if class != 0 {
        // SAFETY: `priority` is a writable field of a TC program's __sk_buff.
        unsafe { (*ctx.skb.skb).priority = class };
    }
}
