//! Steering packets: hits into their service namespace, replies straight
//! back out of the client-facing interface, mirrors as clones.

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, bpf_fib_lookup, bpf_redir_neigh},
    helpers::{
        bpf_check_mtu, bpf_clone_redirect, bpf_fib_lookup as fib_lookup, bpf_redirect,
        bpf_redirect_neigh, bpf_redirect_peer, bpf_skb_change_type, bpf_skb_vlan_pop,
    },
    programs::TcContext,
};
use viscum_common::{
    FAMILY_V4, GlobalCounter, PROTO_TCP, ReplyState, ServiceEntry, TARGET_F_PEER, TARGET_F_SET_MAC,
    csum::ip_csum_replace2,
};

use crate::{
    counters,
    parse::{ETH_HLEN, Parsed, TCP_SYN},
    share,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// The service namespace has no VLAN devices: a tag left in the skb
/// metadata (the kernel untags into it before TC ingress) or in the data
/// would make its veth treat the frame as PACKET_OTHERHOST and drop it.
#[inline(always)]
fn strip_vlan(ctx: &TcContext, l2_vlan: bool) {
    let skb = ctx.skb.skb;
    // SAFETY: reading a field of our own __sk_buff.
    if unsafe { (*skb).vlan_present } != 0 {
        // SAFETY: helper on our own skb; only fails on an skb without a tag.
        unsafe { bpf_skb_vlan_pop(skb) };
    }
    if l2_vlan {
        // SAFETY: as above; pops the in-data tag now that the metadata one is gone.
        unsafe { bpf_skb_vlan_pop(skb) };
    }
}

/// Writes the destination MAC with `bpf_skb_store_bytes`, never through a packet pointer:
/// one direct packet write anywhere in a program makes the verifier prepend an unclone to it
/// (`bpf_unclone_prologue`, net/core/filter.c): every cloned skb, which is every packet while
/// a packet tap such as tcpdump is open on the interface, would be copied with
/// `bpf_skb_pull_data` before the program runs, and dropped (`TC_ACT_SHOT`) if that
/// allocation failed, unmanaged traffic included. The helper makes the head private only
/// for the packets it writes. The client-facing programs (`viscum_ingress`,
/// `viscum_recover`, `viscum_icmp_ingress`) write nothing else directly.
#[inline(always)]
fn set_dst_mac(ctx: &TcContext, mac: &[u8; 6]) {
    let _ = ctx.store(0, mac, 0);
}

/// `N` byte stores (a MAC, both MACs, header fields). Volatile, so LLVM cannot merge them
/// into a `memmove` call: a BPF-to-BPF call adds its frame to ours, and the combined stack
/// must stay within 512 bytes (6.1 checks it strictly).
///
/// # Safety
/// `dst..dst + N` must be writable packet data, checked against `data_end`.
#[inline(always)]
unsafe fn write_bytes<const N: usize>(dst: *mut u8, bytes: &[u8; N]) {
    for (i, b) in bytes.iter().enumerate() {
        // SAFETY: the caller guarantees the N bytes.
        unsafe { core::ptr::write_volatile(dst.add(i), *b) };
    }
}

/// A `bpf_fib_lookup` on an 8-byte boundary: its own fields only make it 4-byte aligned, and
/// [`zero_fib`] stores u64 words, which the verifier refuses at a misaligned stack offset
/// (where LLVM puts the struct depends on the rest of the frame).
#[repr(C, align(8))]
struct FibSlot(bpf_fib_lookup);

/// Zeroes a `bpf_fib_lookup` in place with eight u64 stores (not a memset
/// call, see `write_bytes`; and in place, since returning it by value makes
/// LLVM zero a copy with a memset).
///
/// # Safety
/// `fib` must point to a writable, 8-byte aligned `bpf_fib_lookup`.
#[inline(always)]
unsafe fn zero_fib(fib: *mut bpf_fib_lookup) {
    const WORDS: usize = core::mem::size_of::<bpf_fib_lookup>() / 8;
    const _: () = assert!(core::mem::size_of::<bpf_fib_lookup>() == WORDS * 8);
    let words = fib.cast::<u64>();
    for i in 0..WORDS {
        // SAFETY: within the struct, which its `FibSlot` puts on an 8-byte boundary.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

/// Does interface `ifindex` still exist? `bpf_check_mtu` looks the device up
/// by index and fails with -ENODEV when it is gone (net/core/filter.c
/// `__dev_via_ifindex`): a cheap liveness test with a helper the datapath
/// needs anyway. A deleted target veth (namespace removed, `ip link del`)
/// would otherwise swallow every packet redirected to it.
#[inline(always)]
pub fn target_alive(ctx: &TcContext, ifindex: u32) -> bool {
    let mut mtu: u32 = 0;
    // SAFETY: helper on our own skb with a stack out-pointer.
    unsafe { bpf_check_mtu(ctx.skb.skb.cast(), ifindex, &raw mut mtu, 0, 0) >= 0 }
}

/// Redirects a hit to `entry`'s veth and returns the helper's verdict
/// (`TC_ACT_REDIRECT`, or `TC_ACT_SHOT` if the kernel refused).
#[inline(always)]
pub fn to_service(ctx: &TcContext, entry: &ServiceEntry, l2_vlan: bool) -> i32 {
    to_target(ctx, entry.ifindex, entry.flags, &entry.mac, l2_vlan)
}

/// Redirects into the namespace behind host veth `ifindex` (`flags`:
/// `TARGET_F_*`, `mac`: the namespace veth's MAC).
///
/// With [`TARGET_F_SET_MAC`] the frame is made the namespace's own, which it need not be at
/// L2: on a bridge port whose MAC is not the bridge's (a Wi-Fi interface under `br-lan`),
/// frames to the gateway arrive `PACKET_OTHERHOST`, and the namespace's IP layer drops those
/// (`ip_rcv`). How depends on the way in:
/// * a peer redirect skips the veth's transmit path, so nothing re-reads the destination
///   MAC: the classification is set directly with `bpf_skb_change_type(PACKET_HOST)`, as
///   the kernel does itself from 6.15 (commit c4327229948879; the helper: bpf-helpers(7),
///   4.8+). A field of the skb, not the packet: no copy of a cloned head, no helper store;
/// * a plain redirect goes out of the host veth, whose peer classifies the frame again
///   (`eth_type_trans`) by its destination MAC, which is rewritten to `mac`.
#[inline(always)]
pub fn to_target(ctx: &TcContext, ifindex: u32, flags: u32, mac: &[u8; 6], l2_vlan: bool) -> i32 {
    strip_vlan(ctx, l2_vlan);
    let ret = if flags & TARGET_F_PEER != 0 {
        if flags & TARGET_F_SET_MAC != 0 {
            // SAFETY: helper on our own skb; it only fails for a pkt_type above
            // PACKET_OTHERHOST (loopback, outgoing), which a frame at TC ingress does not have.
            unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
        }
        // SAFETY: helper call with a plain ifindex; flags must be 0.
        unsafe { bpf_redirect_peer(ifindex, 0) }
    } else {
        if flags & TARGET_F_SET_MAC != 0 {
            set_dst_mac(ctx, mac);
        }
        // SAFETY: as above.
        unsafe { bpf_redirect(ifindex, 0) }
    };
    ret as i32
}

/// `PACKET_HOST` of include/uapi/linux/if_packet.h.
const PACKET_HOST: u32 = 0;

/// Mirror mode: a clone goes to the edge copy, the original continues to
/// the cloud unchanged (the MAC is restored before returning).
#[inline(always)]
pub fn mirror(ctx: &TcContext, entry: &ServiceEntry) {
    let start = ctx.data();
    if start + 6 > ctx.data_end() {
        return;
    }
    // SAFETY: bounds checked above.
    let orig = unsafe { core::ptr::read_unaligned(start as *const [u8; 6]) };
    set_dst_mac(ctx, &entry.mac);
    // SAFETY: clone to the host veth's egress, which delivers to its peer.
    if unsafe { bpf_clone_redirect(ctx.skb.skb, entry.ifindex, 0) } == 0 {
        counters::bump(GlobalCounter::Mirrored);
    }
    set_dst_mac(ctx, &orig);
}

/// Sends a reply from a service namespace straight out of the interface
/// that leads to the client, as the kernel's forwarding would, but without
/// the forward chain, conntrack or reverse-path filtering: a router whose
/// firewall drops `ct state invalid` (it never saw the redirected request)
/// would otherwise drop every reply.
#[inline(always)]
pub fn reply_to_client(ctx: &TcContext, p: &Parsed) -> i32 {
    forward(ctx, p, None, 0)
}

/// [`reply_to_client`] for a reply of the edge flow `flow` that arrived on host veth
/// `veth`: reuses the flow's FIB result for `reply_cache::FIB_REUSE_NS` (recording it when it
/// had to look the route up), and gives a reply it sends out its service's network-share
/// class, cached alongside.
#[inline(always)]
pub fn reply_to_client_cached(
    ctx: &TcContext,
    p: &Parsed,
    flow: &mut ReplyState,
    veth: u32,
) -> i32 {
    forward(ctx, p, Some(flow), veth)
}

/// Sends reply `p` of an edge flow out by the FIB result in `flow`, taken less than
/// `viscum_common::FIB_CACHE_NS` ago (the caller's check; the reply cache's, see
/// `crate::reply_cache`), as the lookup's own path would: a packet too large for the egress
/// MTU, or whose TTL runs out, goes to the stack instead (`TC_ACT_UNSPEC`).
#[inline(always)]
pub fn forward_known(ctx: &TcContext, p: &Parsed, flow: &ReplyState) -> i32 {
    let skb = ctx.skb.skb;
    let ifindex = flow.fib_ifindex;
    // What the lookup's own check (is_skb_forwardable) did: a packet larger than the
    // egress MTU goes to the stack, which fragments it or answers "fragmentation
    // needed"; a GSO packet is judged by its segments.
    // SAFETY: reading our own __sk_buff.
    if unsafe { (*skb).gso_size } != 0 {
        if !gso_fits(ctx, ifindex) {
            counters::bump(GlobalCounter::RepliesToStack);
            return TC_ACT_UNSPEC;
        }
    } else if ctx.len() > (p.l3 & 0xff) + u32::from(flow.fib_mtu) {
        counters::bump(GlobalCounter::RepliesToStack);
        return TC_ACT_UNSPEC;
    }
    if p.key.proto == PROTO_TCP && p.tcp_flags & TCP_SYN != 0 {
        crate::mss::clamp(ctx, p, crate::mss::mtu_of(ctx, ifindex));
    }
    if !decrement_ttl(ctx, p) {
        counters::bump(GlobalCounter::RepliesToStack);
        return TC_ACT_UNSPEC;
    }
    counters::bump(GlobalCounter::RepliesForwarded);
    let macs = flow.fib_macs;
    let start = ctx.data();
    if start + 12 <= ctx.data_end() {
        // SAFETY: 12 bytes checked above.
        unsafe { write_bytes(start as *mut u8, &macs) };
    }
    share::classify(ctx, flow.fib_class);
    // SAFETY: egress redirect to the cached output device.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

#[inline(always)]
fn forward(ctx: &TcContext, p: &Parsed, flow: Option<&mut ReplyState>, veth: u32) -> i32 {
    let skb = ctx.skb.skb;
    let now = counters::now_coarse();
    if let Some(flow) = &flow
        && flow.fib_at_ns != 0
        && now.saturating_sub(flow.fib_at_ns) <= crate::reply_cache::FIB_REUSE_NS
    {
        return forward_known(ctx, p, flow);
    }
    let mut fib_slot = core::mem::MaybeUninit::<FibSlot>::uninit();
    let (rc, fib) = route(ctx, p, &mut fib_slot);
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        // No route, forwarding off, fragmentation needed...: the kernel's
        // own path knows how to answer those (ICMP errors and so on).
        counters::bump(GlobalCounter::RepliesToStack);
        return TC_ACT_UNSPEC;
    }
    // SAFETY: reading our own __sk_buff.
    if unsafe { (*skb).gso_size } != 0 && !gso_fits(ctx, fib.ifindex) {
        counters::bump(GlobalCounter::RepliesToStack);
        return TC_ACT_UNSPEC;
    }
    if p.key.proto == PROTO_TCP && p.tcp_flags & TCP_SYN != 0 {
        // The edge copy's SYN-ACK: bound the client's segments by the
        // egress interface's MTU.
        crate::mss::clamp(ctx, p, crate::mss::mtu_of(ctx, fib.ifindex));
    }
    if !decrement_ttl(ctx, p) {
        counters::bump(GlobalCounter::RepliesToStack);
        return TC_ACT_UNSPEC;
    }
    counters::bump(GlobalCounter::RepliesForwarded);
    let class = if flow.is_some() {
        share::class_of(veth)
    } else {
        0
    };
    share::classify(ctx, class);
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        if let Some(flow) = flow {
            // Invalidate first, so another CPU never takes half-written addresses for a
            // fresh result (it looks the route up itself meanwhile).
            flow.fib_at_ns = 0;
            flow.fib_ifindex = fib.ifindex;
            // SAFETY: on success the helper left the egress MTU in the union (tot_len was
            // 0: bpf_skb_fib_lookup, net/core/filter.c).
            flow.fib_mtu = unsafe { fib.__bindgen_anon_1.mtu_result };
            let dst = flow.fib_macs.as_mut_ptr();
            // SAFETY: 12 bytes of the record's own array.
            unsafe {
                write_bytes(dst, &fib.dmac);
                write_bytes(dst.add(6), &fib.smac);
            }
            flow.fib_class = class;
            flow.fib_at_ns = now;
        }
        let start = ctx.data();
        if start + 12 <= ctx.data_end() {
            // SAFETY: 12 bytes checked above.
            unsafe {
                write_bytes(start as *mut u8, &fib.dmac);
                write_bytes((start + 6) as *mut u8, &fib.smac);
            }
        }
        // SAFETY: egress redirect to the FIB's output device.
        return unsafe { bpf_redirect(fib.ifindex, 0) } as i32;
    }
    // The neighbour is not resolved yet: let the kernel resolve it.
    // SAFETY: a null neighbour asks the kernel to look the next hop up itself.
    unsafe {
        bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut::<bpf_redir_neigh>(), 0, 0) as i32
    }
}

/// Would the kernel forward `p` (a packet arriving on our device) rather than deliver it
/// locally or drop it? One `bpf_fib_lookup` (bpf-helpers(7), 4.18+): `SUCCESS` or `NO_NEIGH`
/// mean a forwarding route; a destination that is one of the box's own addresses gives
/// `NOT_FWDED`.
#[inline(always)]
pub fn forwarded(ctx: &TcContext, p: &Parsed) -> bool {
    let mut fib_slot = core::mem::MaybeUninit::<FibSlot>::uninit();
    let (rc, _) = route(ctx, p, &mut fib_slot);
    rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH
}

/// Asks the FIB for `p`'s route, from the device it arrived on, with parameters built in
/// `slot` (zeroed first): returns `bpf_fib_lookup`'s result code (bpf-helpers(7)) and the
/// parameters, which on success hold the egress device and MACs.
///
/// `tot_len` stays 0: the kernel then checks the skb itself against the egress MTU
/// (`is_skb_forwardable`) instead of comparing a length we pass. The IP header's length of a
/// GSO super-packet (up to 64 KiB) would always exceed it and send every bulk reply to the
/// slow path; a GSO packet's real test is its segment size (`gso_fits`).
#[inline(always)]
fn route<'a>(
    ctx: &TcContext,
    p: &Parsed,
    slot: &'a mut core::mem::MaybeUninit<FibSlot>,
) -> (i64, &'a mut bpf_fib_lookup) {
    // SAFETY: zeroes the slot; all-zero is a valid bpf_fib_lookup.
    let fib = unsafe {
        zero_fib(slot.as_mut_ptr().cast());
        &mut (*slot.as_mut_ptr()).0
    };
    fib.l4_protocol = p.key.proto;
    fib.sport = p.sport;
    fib.dport = p.key.port;
    // SAFETY: reading our own __sk_buff.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if p.key.family == FAMILY_V4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = crate::nat::v4_word(&p.saddr);
        fib.__bindgen_anon_4.ipv4_dst = crate::nat::v4_word(&p.key.addr);
    } else {
        fib.family = AF_INET6;
        // SAFETY: same size, plain bytes.
        fib.__bindgen_anon_3.ipv6_src =
            unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(p.saddr) };
        fib.__bindgen_anon_4.ipv6_dst =
            unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(p.key.addr) };
    }
    // SAFETY: the params struct lives on our stack with its real size.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    (rc, fib)
}

/// Do a GSO packet's segments fit the MTU of `ifindex`? `bpf_check_mtu` with length 0
/// validates the skb's segments (skb_gso_validate_network_len).
#[inline(always)]
fn gso_fits(ctx: &TcContext, ifindex: u32) -> bool {
    let mut mtu_len: u32 = 0;
    // SAFETY: helper on our own skb with a stack out-pointer.
    unsafe { bpf_check_mtu(ctx.skb.skb.cast(), ifindex, &raw mut mtu_len, 0, 0) == 0 }
}

/// Forwarding decrements the TTL / hop limit like any router hop; a packet
/// about to expire is left to the stack, which sends the ICMP error.
///
/// From the parse (`p.ttl`, and `p.ip_check` as the rewrites left it): TTL, protocol and
/// the header checksum updated in place (RFC 1624) for IPv4, the hop limit for IPv6, in one
/// write ([`put_header`]). Reply side only: see [`Writes::Direct`].
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, p: &Parsed) -> bool {
    let ttl = p.ttl;
    if ttl <= 1 {
        return false;
    }
    if p.key.family == FAMILY_V4 {
        // TTL and protocol share one 16-bit word of the header checksum.
        let check = ip_csum_replace2(
            p.ip_check.to_ne_bytes(),
            [ttl, p.key.proto],
            [ttl - 1, p.key.proto],
        );
        put_header(
            ctx,
            p,
            Writes::Direct,
            8,
            &[ttl - 1, p.key.proto, check[0], check[1]],
        )
    } else {
        put_header(ctx, p, Writes::Direct, 7, &[ttl - 1])
    }
}

/// How a program writes the IP header: see [`put_header`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// `bpf_skb_store_bytes`: the client-facing programs (`viscum_ingress`, `viscum_recover`,
    /// `viscum_icmp_ingress`), which must not write through packet pointers (see
    /// [`set_dst_mac`]).
    Helper,
    /// Through packet pointers, at offsets from an untagged Ethernet header: the reply-side
    /// programs, which write the MACs that way already (the verifier's unclone prologue is
    /// theirs anyway) and whose packets come from our own veth, whose VLAN tags (if a
    /// service used any) travel in the skb, not in the frame ([`untagged`]). Each
    /// `bpf_skb_store_bytes` saved is a helper call: 40-50 ns of a reply in B1 on a kernel
    /// with return-thunk mitigations, which pay for every nested return.
    Direct,
}

/// Does `p`'s IP header follow an untagged Ethernet header (`l3` = [`ETH_HLEN`]), where
/// [`Writes::Direct`] writes it? The reply programs leave any other frame to the stack.
#[inline(always)]
pub fn untagged(p: &Parsed) -> bool {
    p.l3 as usize == ETH_HLEN
}

/// Writes `bytes` at offset `off` of `p`'s IP header, as `how` says. [`Writes::Direct`]
/// writes at a constant offset from the frame's start, which the verifier checks once,
/// rather than at `l3`, a scalar it would then track through the rest of the program (see
/// [`Parsed::ip_check`]); it fails on a frame that is not [`untagged`]. False if the write
/// failed.
#[inline(always)]
pub fn put_header<const N: usize>(
    ctx: &TcContext,
    p: &Parsed,
    how: Writes,
    off: usize,
    bytes: &[u8; N],
) -> bool {
    match how {
        Writes::Helper => ctx.store(p.l3 as usize + off, bytes, 0).is_ok(),
        Writes::Direct => {
            let start = ctx.data();
            let at = ETH_HLEN + off;
            if !untagged(p) || start + at + N > ctx.data_end() {
                return false;
            }
            // SAFETY: `at + N` bytes checked against data_end above.
            unsafe { write_bytes((start + at) as *mut u8, bytes) };
            true
        }
    }
}
