//! Header parsing with direct packet access.
//!
//! Every read goes through [`load`], which checks `offset + size <= data_end`
//! right before the access: the verifier only accepts packet reads it can see
//! bounded against `data_end`. Offsets derived from packet bytes (IHL, IPv6
//! extension header lengths) are masked to small ranges first so the
//! verifier can track them.

use aya_ebpf::{helpers::bpf_skb_pull_data, programs::TcContext};
use viscum_common::{
    FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ServiceKey, close,
};

/// Length of an untagged Ethernet header: where `l3` is in a frame without a VLAN tag.
pub const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPV6_HLEN: usize = 40;
/// Enough linear bytes for Ethernet + VLAN + IPv6 + a few extension headers + ports.
const MAX_HEADERS: u32 = 192;
/// IPv6 extension headers walked before giving up (verifier needs a bound).
const MAX_V6_EXT: usize = 4;

/// What a successful parse found (the headers are in the caller's `Parsed`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TCP or UDP (possibly a fragment of it).
    L4,
    /// An unfragmented ICMP (IPv4) or ICMPv6 packet: the outer headers,
    /// with `key.proto` the ICMP protocol, ports 0 and `l4` the ICMP header.
    /// It may be an error about one of our flows (see `icmp`).
    Icmp,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Not IPv4/IPv6 over Ethernet, or not TCP/UDP/ICMP: none of our business.
    NotIp,
    /// Truncated or inconsistent headers.
    Malformed,
}

/// Where a packet sits in a fragmented datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Frag {
    /// A whole datagram.
    None,
    /// The fragment at offset 0: it carries the L4 header.
    First,
    /// A later fragment: no L4 header, so no ports (`sport`/`key.port` are 0
    /// until the fragment table fills them in).
    Later,
}

/// What the classifiers need from a packet.
///
/// `repr(C)` with every byte a field: copies of it (and of structs holding
/// it) must never read uninitialised padding, which the 6.1 verifier refuses
/// ("invalid read from stack") where LLVM copies it in 8-byte words, as it
/// does for the big-endian object.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Parsed {
    /// Destination as a services-map key (proto, family, daddr, dport).
    pub key: ServiceKey,
    /// Source address (same layout as `key.addr`).
    pub saddr: [u8; 16],
    /// Offsets of the IP and TCP/UDP headers from the start of the frame.
    pub l3: u32,
    pub l4: u32,
    /// The datagram's identification when `frag` is not `None` (IPv4: the
    /// 16-bit ID, IPv6: the fragment header's 32-bit one; host order).
    pub frag_id: u32,
    /// Source port, network order.
    pub sport: u16,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// The frame carries an 802.1Q/802.1ad tag in its data (not only in the
    /// skb metadata); the redirect path must strip it.
    pub l2_vlan: bool,
    /// Fragment position.
    pub frag: Frag,
    /// IPv4 TTL or IPv6 hop limit, as parsed.
    pub ttl: u8,
    /// IPv4 header checksum as it lies in the packet (its two bytes read in native order; 0
    /// for IPv6). Kept, with `ttl`, so rewrites compute the new header fields from the
    /// parse and write them with one `bpf_skb_store_bytes` at a scalar offset: pointer
    /// arithmetic with `l3` after the parse makes the verifier track `l3` precisely through
    /// the whole program, which cost a third more verified instructions (see `nat`).
    pub ip_check: u16,
}
const _: () = assert!(core::mem::size_of::<Parsed>() == 56);

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Is `p` a TCP segment without SYN, FIN or RST: one that changes nothing in its flow's
/// record, which the caches (`crate::cache`, `crate::reply_cache`) may serve?
#[inline(always)]
pub fn plain_tcp(p: &Parsed) -> bool {
    p.key.proto == viscum_common::PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
}

/// The sequence numbers and payload length of TCP segment `p` from `from_client`'s side, for
/// the close tracking (`viscum_common::close`); `None` for a fragment (its IP length is not
/// the segment's), a header that cannot be read, or a length field of 0 (a BIG TCP
/// super-packet, RFC 2675 and kernel commit 7c4e983c4f3c: its length is the skb's, which
/// the close tracking does without). A length that does not cover the headers gives a
/// payload that matches no acknowledgment. Read with helper loads at scalar offsets, as
/// the rewrites write (see `Parsed::ip_check`): only FINs and a due last ACK pay for them.
#[inline(always)]
pub fn tcp_segment(ctx: &TcContext, p: &Parsed, from_client: bool) -> Option<close::Segment> {
    if p.frag != Frag::None {
        return None;
    }
    let (l3, l4) = (p.l3 as usize, p.l4 as usize);
    // The datagram's length from the IP header on: IPv4's total length (bytes 2..4); IPv6's
    // payload length (bytes 4..6) does not count the 40-byte fixed header. Arithmetic, not
    // a branch on the family: each branch here is walked again by the verifier for every
    // state that reaches it.
    let v6 = u32::from(p.key.family != FAMILY_V4);
    let len = u32::from(u16::from_be_bytes(
        ctx.load::<[u8; 2]>(l3 + 2 + 2 * v6 as usize).ok()?,
    ));
    if len == 0 {
        return None;
    }
    let ip_len = len + 40 * v6;
    // Sequence number, acknowledgment number, data offset and flags: the TCP header's words
    // 1 to 3.
    let w = ctx.load::<[u32; 3]>(l4 + 4).ok()?;
    let w3 = u32::from_be(w[2]);
    let headers = (l4 - l3) as u32 + (w3 >> 28) * 4;
    Some(close::Segment {
        from_client,
        // Read again rather than taken from `p`: branches on `p.tcp_flags`, whose bits
        // earlier tests made known on some paths, would make the verifier track it
        // precisely back through the whole program.
        flags: (w3 >> 16) as u8,
        seq: u32::from_be(w[0]),
        ack: u32::from_be(w[1]),
        payload: ip_len.wrapping_sub(headers),
    })
}

enum Short {
    Yes,
}

#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, Short> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return Err(Short::Yes);
    }
    // SAFETY: bounds checked just above; unaligned because headers are not
    // naturally aligned after a 14-byte Ethernet header.
    Ok(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
}

/// Parses the packet's headers into `out` (written only on success).
#[inline(always)]
pub fn parse(
    ctx: &TcContext,
    out: &mut core::mem::MaybeUninit<Parsed>,
) -> Result<Kind, ParseError> {
    match parse_linear(ctx, out) {
        Ok(r) => r,
        Err(Short::Yes) => {
            // Headers may sit partly in paged data (GRO, some drivers): pull
            // them into the linear area once and retry. A packet that is
            // genuinely shorter than its headers fails again and is malformed.
            let len = ctx.len();
            let want = if len < MAX_HEADERS { len } else { MAX_HEADERS };
            // SAFETY: plain helper call on our own skb.
            if unsafe { bpf_skb_pull_data(ctx.skb.skb.cast(), want) } != 0 {
                return Err(ParseError::Malformed);
            }
            match parse_linear(ctx, out) {
                Ok(r) => r,
                Err(Short::Yes) => Err(ParseError::Malformed),
            }
        }
    }
}

#[inline(always)]
fn parse_linear(
    ctx: &TcContext,
    out: &mut core::mem::MaybeUninit<Parsed>,
) -> Result<Result<Kind, ParseError>, Short> {
    let mut ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    let mut l3 = ETH_HLEN;
    let mut l2_vlan = false;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be(load::<u16>(ctx, ETH_HLEN + 2)?);
        l3 += VLAN_HLEN;
        l2_vlan = true;
    }
    let mut key = ServiceKey {
        addr: [0; 16],
        port: 0,
        proto: 0,
        family: 0,
    };
    let saddr: [u8; 16];
    let mut frag = Frag::None;
    let mut frag_id: u32 = 0;
    let ttl: u8;
    let mut ip_check: u16 = 0;
    // The datagram's end by its own length field, which every header must lie within
    // (RFC 791 total length, RFC 8200 payload length): a frame shorter than its datagram
    // is malformed; one longer (Ethernet padding) is fine. A GSO packet may carry 0 there
    // (BIG TCP, RFC 2675 jumbograms): its end is then the skb's.
    let len = ctx.len() as usize;
    // SAFETY: reading our own __sk_buff.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    let end;
    let l4 = match ethertype {
        ETH_P_IP => {
            let vihl = load::<u8>(ctx, l3)?;
            if vihl >> 4 != 4 {
                return Ok(Err(ParseError::Malformed));
            }
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < 20 {
                return Ok(Err(ParseError::Malformed));
            }
            let tot = u16::from_be(load::<u16>(ctx, l3 + 2)?) as usize;
            if tot == 0 && gso {
                end = len;
            } else if tot < ihl || l3 + tot > len {
                return Ok(Err(ParseError::Malformed));
            } else {
                end = l3 + tot;
            }
            let flags_off = u16::from_be(load::<u16>(ctx, l3 + 6)?);
            // RFC 791: a non-zero offset is a later fragment; offset 0 with
            // MF set is the first one, which still carries the L4 header.
            if flags_off & 0x1fff != 0 {
                frag = Frag::Later;
            } else if flags_off & 0x2000 != 0 {
                frag = Frag::First;
            }
            if frag != Frag::None {
                frag_id = u32::from(u16::from_be(load::<u16>(ctx, l3 + 4)?));
            }
            // TTL, protocol and header checksum: one load.
            let tpc = load::<[u8; 4]>(ctx, l3 + 8)?;
            ttl = tpc[0];
            key.proto = tpc[1];
            ip_check = u16::from_ne_bytes([tpc[2], tpc[3]]);
            // Whole 16-byte values built from words: byte-wise writes into the
            // zeroed arrays let LLVM fold the untouched 12-byte tails into
            // memset calls, and a BPF-to-BPF call is refused in a program
            // that also tail-calls when the kernel has no JIT (s390x 6.1).
            let src = load::<u32>(ctx, l3 + 12)?;
            // SAFETY: same size, plain bytes.
            saddr = unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>([src, 0, 0, 0]) };
            let daddr = load::<u32>(ctx, l3 + 16)?;
            // SAFETY: as above.
            key.addr = unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>([daddr, 0, 0, 0]) };
            key.family = FAMILY_V4;
            // ihl <= 60: bounded for the verifier.
            l3 + (ihl & 0x3c)
        }
        ETH_P_IPV6 => {
            let vtc = load::<u8>(ctx, l3)?;
            if vtc >> 4 != 6 {
                return Ok(Err(ParseError::Malformed));
            }
            let plen = u16::from_be(load::<u16>(ctx, l3 + 4)?) as usize;
            if plen == 0 && gso {
                end = len;
            } else if l3 + IPV6_HLEN + plen > len {
                return Ok(Err(ParseError::Malformed));
            } else {
                end = l3 + IPV6_HLEN + plen;
            }
            ttl = load::<u8>(ctx, l3 + 7)?;
            saddr = load::<[u8; 16]>(ctx, l3 + 8)?;
            key.addr = load::<[u8; 16]>(ctx, l3 + 24)?;
            key.family = FAMILY_V6;
            let mut next = load::<u8>(ctx, l3 + 6)?;
            let mut off = l3 + IPV6_HLEN;
            for _ in 0..MAX_V6_EXT {
                match next {
                    // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
                    0 | 43 | 60 => {
                        let hdr = load::<[u8; 2]>(ctx, off)?;
                        next = hdr[0];
                        // Up to 256 * 8 = 2048 bytes; the mask only bounds it for the
                        // verifier (0x7f8 wrapped 2048 to 0 and read the header as the next).
                        let size = (((hdr[1] as usize) + 1) * 8) & 0xff8;
                        if off + size > end {
                            return Ok(Err(ParseError::Malformed));
                        }
                        off += size;
                    }
                    // RFC 8200 section 4.5: next header, reserved, 13-bit
                    // offset + M flag, 32-bit identification.
                    44 => {
                        let hdr = load::<[u8; 8]>(ctx, off)?;
                        next = hdr[0];
                        let off_m = u16::from_be_bytes([hdr[2], hdr[3]]);
                        frag_id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                        if off + 8 > end {
                            return Ok(Err(ParseError::Malformed));
                        }
                        off += 8;
                        if off_m >> 3 != 0 {
                            frag = Frag::Later;
                            break;
                        }
                        if off_m & 1 != 0 {
                            frag = Frag::First;
                        }
                    }
                    _ => break,
                }
            }
            key.proto = next;
            // Bound for the verifier: Ethernet + VLAN + 40 + 4 * 2040 max.
            if off > 8 * 1024 {
                return Ok(Err(ParseError::Malformed));
            }
            off
        }
        _ => return Ok(Err(ParseError::NotIp)),
    };
    let (kind, sport, tcp_flags) = if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
        // Only the family's own ICMP: ICMPv6 inside IPv4 (or ICMP inside IPv6) is no
        // error message of that packet's network.
        let icmp = if key.family == FAMILY_V4 {
            PROTO_ICMP
        } else {
            PROTO_ICMPV6
        };
        if key.proto != icmp || frag != Frag::None {
            return Ok(Err(ParseError::NotIp));
        }
        (Kind::Icmp, 0, 0)
    } else if frag == Frag::Later {
        // No L4 header: the fragment table supplies the ports.
        (Kind::L4, 0, 0)
    } else {
        // The whole fixed header must be there, inside the datagram: the NAT rewrite
        // updates the checksum at its end, and a first fragment too short to hold it
        // (RFC 1858's tiny fragment) is no packet to decide on.
        let hlen = if key.proto == PROTO_TCP { 20 } else { 8 };
        if l4 + hlen > end {
            return Ok(Err(ParseError::Malformed));
        }
        let _tail = load::<u32>(ctx, l4 + hlen - 4)?;
        // Ports, left in network byte order (see ServiceKey::port).
        let ports = load::<[u16; 2]>(ctx, l4)?;
        key.port = ports[1];
        let tcp_flags = if key.proto == PROTO_TCP {
            // Data offset in 32-bit words: less than the fixed header is malformed.
            if load::<u8>(ctx, l4 + 12)? >> 4 < 5 {
                return Ok(Err(ParseError::Malformed));
            }
            load::<u8>(ctx, l4 + 13)?
        } else {
            0
        };
        (Kind::L4, ports[0], tcp_flags)
    };
    out.write(Parsed {
        key,
        saddr,
        l3: l3 as u32,
        l4: l4 as u32,
        frag_id,
        sport,
        tcp_flags,
        l2_vlan,
        frag,
        ttl,
        ip_check,
    });
    Ok(Ok(kind))
}
