//! Frames built byte by byte, for feeding the classifiers through `BPF_PROG_TEST_RUN`, and a
//! small reader to check what a program wrote back.
//!
//! Everything multi-byte is written in network byte order explicitly (`to_be_bytes`), never
//! through a native-endian struct, so the same frames come out on little- and big-endian
//! hosts (the s390x guest is big-endian). IPv4 header checksums and TCP/UDP checksums
//! (pseudo-header included) are computed, so a frame is exactly what a stack would send.
//!
//! ```text
//! Ethernet [802.1Q tag] ─ IPv4 (optional fragment fields)          ─ TCP | UDP | raw
//!                       └ IPv6 (optional extension headers, in order) ┘
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// EtherType (TPID) of an 802.1Q tag.
pub const ETH_P_8021Q: u16 = 0x8100;

/// IP protocol numbers used here (IANA "Assigned Internet Protocol Numbers"): IPv6
/// hop-by-hop options (RFC 8200 section 4.3).
pub const IPPROTO_HOPOPTS: u8 = 0;
/// ICMP for IPv4 (RFC 792).
pub const IPPROTO_ICMP: u8 = 1;
/// TCP (RFC 9293).
pub const IPPROTO_TCP: u8 = 6;
/// UDP (RFC 768).
pub const IPPROTO_UDP: u8 = 17;
/// The IPv6 fragment header (RFC 8200 section 4.5).
pub const IPPROTO_FRAGMENT: u8 = 44;
/// ICMPv6 (RFC 4443).
pub const IPPROTO_ICMPV6: u8 = 58;

/// TCP flag bits (the 14th header byte, RFC 9293 section 3.1): FIN, no more data.
pub const TCP_FIN: u8 = 0x01;
/// SYN: synchronize sequence numbers (opens a connection).
pub const TCP_SYN: u8 = 0x02;
/// RST: reset the connection.
pub const TCP_RST: u8 = 0x04;
/// PSH: push function.
pub const TCP_PSH: u8 = 0x08;
/// ACK: the acknowledgment number is significant.
pub const TCP_ACK: u8 = 0x10;

/// The source MAC frames carry unless told otherwise (locally administered).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
/// The destination MAC frames carry unless told otherwise (locally administered).
pub const EDGE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

/// The transport part of a [`Packet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4 {
    /// A 20-byte TCP header (no options) with these flags, then the payload.
    Tcp {
        /// Source port, host order here (written big-endian).
        sport: u16,
        /// Destination port, host order here (written big-endian).
        dport: u16,
        /// The flags byte: an OR of [`TCP_SYN`], [`TCP_ACK`], ...
        flags: u8,
        /// Sequence number, host order here (written big-endian).
        seq: u32,
        /// Acknowledgment number, host order here (written big-endian).
        ack: u32,
    },
    /// An 8-byte UDP header, then the payload.
    Udp {
        /// Source port, host order here (written big-endian).
        sport: u16,
        /// Destination port, host order here (written big-endian).
        dport: u16,
    },
    /// The payload as the whole transport part, under this protocol number (ICMP echo...).
    Raw {
        /// The IP protocol number (IPv4 protocol / IPv6 next header), e.g. [`IPPROTO_ICMP`].
        proto: u8,
    },
}

impl L4 {
    fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Raw { proto } => *proto,
        }
    }
}

/// An IPv6 extension header placed between the fixed header and the transport header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options (next header 0), padded with PadN to 8 bytes.
    HopByHop,
    /// A fragment header (next header 44): offset in 8-byte units, more-fragments flag.
    Fragment {
        /// Fragment offset in 8-byte units (13 bits; shifted into place when written).
        offset: u16,
        /// The M (more fragments) flag.
        more: bool,
        /// Identification, host order here (written big-endian).
        id: u32,
    },
}

impl Ext {
    fn number(&self) -> u8 {
        match self {
            Ext::HopByHop => IPPROTO_HOPOPTS,
            Ext::Fragment { .. } => IPPROTO_FRAGMENT,
        }
    }

    fn bytes(&self, next: u8) -> [u8; 8] {
        match self {
            // next, hdr ext len 0 (8 bytes), PadN option of 4 zero bytes.
            Ext::HopByHop => [next, 0, 1, 4, 0, 0, 0, 0],
            Ext::Fragment { offset, more, id } => {
                let off = (offset << 3) | u16::from(*more);
                let [o0, o1] = off.to_be_bytes();
                let [i0, i1, i2, i3] = id.to_be_bytes();
                [next, 0, o0, o1, i0, i1, i2, i3]
            }
        }
    }
}

/// One Ethernet frame carrying IPv4 or IPv6. Build it with [`Packet::tcp`] / [`Packet::udp`],
/// adjust the public fields, and serialise it with [`Packet::build`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Destination MAC, in wire order (default [`EDGE_MAC`]).
    pub dst_mac: [u8; 6],
    /// Source MAC, in wire order (default [`CLIENT_MAC`]).
    pub src_mac: [u8; 6],
    /// An 802.1Q tag in the frame's data (VLAN id, priority 0).
    pub vlan: Option<u16>,
    /// Source address; its family decides IPv4 or IPv6 (`dst` must match).
    pub src: IpAddr,
    /// Destination address, same family as `src`.
    pub dst: IpAddr,
    /// TTL / hop limit.
    pub ttl: u8,
    /// IPv4 only: the identification field (what groups the fragments of a datagram).
    pub id: u16,
    /// IPv4 only: the flags-and-fragment-offset word as on the wire (`0x4000` = DF, `0x2000`
    /// = MF, low 13 bits the offset in 8-byte units).
    pub frag: u16,
    /// IPv6 only: extension headers, in order.
    pub ext: Vec<Ext>,
    /// TCP only: an MSS option (kind 2, length 4) as the first option, making the header 24
    /// bytes long.
    pub tcp_mss: Option<u16>,
    /// The transport header to build (its protocol number goes into the IP header).
    pub l4: L4,
    /// Bytes after the transport header, copied as is (the whole transport part for
    /// [`L4::Raw`]).
    pub payload: Vec<u8>,
}

impl Packet {
    /// A TCP segment from `src` to `dst` with `flags` (e.g. [`TCP_SYN`]), TTL 64, DF set.
    pub fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Packet {
        Packet::new(
            src.ip(),
            dst.ip(),
            L4::Tcp {
                sport: src.port(),
                dport: dst.port(),
                flags,
                seq: 0x1000_0000,
                ack: if flags & TCP_ACK != 0 { 0x2000_0000 } else { 0 },
            },
        )
    }

    /// A UDP datagram from `src` to `dst` with a short payload.
    pub fn udp(src: SocketAddr, dst: SocketAddr) -> Packet {
        let mut p = Packet::new(
            src.ip(),
            dst.ip(),
            L4::Udp {
                sport: src.port(),
                dport: dst.port(),
            },
        );
        p.payload = b"viscum fixture\n".to_vec();
        p
    }

    /// An IP packet whose whole payload is `payload` under protocol `proto`, with no transport
    /// header built: a later fragment of a TCP/UDP datagram (set [`Packet::frag`] or a
    /// [`Ext::Fragment`]), for instance.
    pub fn raw(src: IpAddr, dst: IpAddr, proto: u8, payload: Vec<u8>) -> Packet {
        let mut p = Packet::new(src, dst, L4::Raw { proto });
        p.payload = payload;
        p
    }

    /// An ICMP echo request (IPv4 only: the classifier ignores it as not TCP/UDP).
    pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Packet {
        let mut p = Packet::new(
            src.into(),
            dst.into(),
            L4::Raw {
                proto: IPPROTO_ICMP,
            },
        );
        // type 8, code 0, checksum, id 1, seq 1, 8 bytes of data; checksum over all of it.
        let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
        icmp.extend_from_slice(b"fixture!");
        let sum = checksum(&[&icmp]);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        p.payload = icmp;
        p
    }

    /// An ICMP (IPv4) or ICMPv6 error from `src` to `dst` of `icmp_type`/`code` (e.g. 3/4
    /// "fragmentation needed", ICMPv6 2/0 "packet too big"), whose second header word is
    /// `word` (the MTU for those two, 0 otherwise) and which quotes `quote`: the start of the
    /// offending packet, its IP header and at least 8 bytes of transport header. The checksum
    /// is computed (over the ICMPv6 pseudo-header for IPv6).
    pub fn icmp_error(
        src: IpAddr,
        dst: IpAddr,
        icmp_type: u8,
        code: u8,
        word: u32,
        quote: &[u8],
    ) -> Packet {
        let mut msg = vec![icmp_type, code, 0, 0];
        msg.extend_from_slice(&word.to_be_bytes());
        msg.extend_from_slice(quote);
        let proto = if src.is_ipv4() {
            IPPROTO_ICMP
        } else {
            IPPROTO_ICMPV6
        };
        let sum = if src.is_ipv4() {
            checksum(&[&msg])
        } else {
            checksum(&[&pseudo_header(src, dst, proto, msg.len()), &msg])
        };
        msg[2..4].copy_from_slice(&sum.to_be_bytes());
        Packet::raw(src, dst, proto, msg)
    }

    fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Packet {
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "packet from {src} to {dst}: mixed families"
        );
        Packet {
            dst_mac: EDGE_MAC,
            src_mac: CLIENT_MAC,
            vlan: None,
            src,
            dst,
            ttl: 64,
            id: 0x1234,
            frag: if src.is_ipv4() { 0x4000 } else { 0 },
            ext: Vec::new(),
            tcp_mss: None,
            l4,
            payload: Vec::new(),
        }
    }

    /// The transport header and payload, checksummed over the pseudo-header of `src`/`dst`.
    fn transport(&self) -> Vec<u8> {
        let mut seg = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
                ack,
            } => {
                let words: u8 = if self.tcp_mss.is_some() { 6 } else { 5 };
                let mut h = Vec::with_capacity(usize::from(words) * 4);
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&seq.to_be_bytes());
                h.extend_from_slice(&ack.to_be_bytes());
                h.push(words << 4); // data offset in 32-bit words
                h.push(*flags);
                h.extend_from_slice(&64240u16.to_be_bytes()); // window
                h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                if let Some(mss) = self.tcp_mss {
                    h.extend_from_slice(&[2, 4]);
                    h.extend_from_slice(&mss.to_be_bytes());
                }
                h
            }
            L4::Udp { sport, dport } => {
                let len = 8 + self.payload.len() as u16;
                let mut h = Vec::with_capacity(8);
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&len.to_be_bytes());
                h.extend_from_slice(&[0, 0]);
                h
            }
            L4::Raw { .. } => Vec::new(),
        };
        seg.extend_from_slice(&self.payload);
        let csum_at = match self.l4 {
            L4::Tcp { .. } => Some(16),
            L4::Udp { .. } => Some(6),
            L4::Raw { .. } => None,
        };
        if let Some(at) = csum_at {
            let pseudo = pseudo_header(self.src, self.dst, self.l4.proto(), seg.len());
            let mut sum = checksum(&[&pseudo, &seg]);
            // UDP sends a computed 0 as 0xffff: 0 means "no checksum" (RFC 768).
            if sum == 0 && matches!(self.l4, L4::Udp { .. }) {
                sum = 0xffff;
            }
            seg[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        }
        seg
    }

    /// The IP header(s) and everything after them.
    pub fn ip(&self) -> Vec<u8> {
        let seg = self.transport();
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let total = 20 + seg.len() as u16;
                let mut h = Vec::with_capacity(total as usize);
                h.push(0x45); // version 4, IHL 5
                h.push(0); // DSCP/ECN
                h.extend_from_slice(&total.to_be_bytes());
                h.extend_from_slice(&self.id.to_be_bytes());
                h.extend_from_slice(&self.frag.to_be_bytes());
                h.push(self.ttl);
                h.push(self.l4.proto());
                h.extend_from_slice(&[0, 0]); // checksum
                h.extend_from_slice(&src.octets());
                h.extend_from_slice(&dst.octets());
                let sum = checksum(&[&h]);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                h.extend_from_slice(&seg);
                h
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let payload_len = (self.ext.len() * 8 + seg.len()) as u16;
                let first = self.ext.first().map(Ext::number).unwrap_or(self.l4.proto());
                let mut h = Vec::with_capacity(40 + payload_len as usize);
                h.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, class 0, flow 0
                h.extend_from_slice(&payload_len.to_be_bytes());
                h.push(first);
                h.push(self.ttl);
                h.extend_from_slice(&src.octets());
                h.extend_from_slice(&dst.octets());
                for (i, ext) in self.ext.iter().enumerate() {
                    let next = self
                        .ext
                        .get(i + 1)
                        .map(Ext::number)
                        .unwrap_or(self.l4.proto());
                    h.extend_from_slice(&ext.bytes(next));
                }
                h.extend_from_slice(&seg);
                h
            }
            _ => unreachable!("families checked in Packet::new"),
        }
    }

    /// The whole frame: Ethernet header, the tag if any, then [`Packet::ip`].
    pub fn build(&self) -> Vec<u8> {
        let ethertype = if self.src.is_ipv4() {
            ETH_P_IP
        } else {
            ETH_P_IPV6
        };
        let mut f = ethernet(self.dst_mac, self.src_mac, self.vlan, ethertype);
        f.extend_from_slice(&self.ip());
        f
    }
}

/// An Ethernet header (with an 802.1Q tag of VLAN `vlan` when given) announcing `ethertype`.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], vlan: Option<u16>, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(18);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(vid) = vlan {
        f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// A broadcast ARP request "who has `target`? tell `sender`".
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet([0xff; 6], CLIENT_MAC, None, ETH_P_ARP);
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&ETH_P_IP.to_be_bytes()); // protocol: IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&1u16.to_be_bytes()); // request
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// The TCP/UDP pseudo-header of RFC 793 / RFC 8200 section 8.1.
fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.push(0);
            p.push(proto);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => unreachable!("mixed families"),
    }
    p
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts`: the one's complement
/// of the one's-complement sum of big-endian 16-bit words, an odd last byte padded with zero.
/// Over data that includes a correct checksum field it returns 0.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What [`inspect`] reads back from a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    /// Destination MAC, in wire order.
    pub dst_mac: [u8; 6],
    /// Source MAC, in wire order.
    pub src_mac: [u8; 6],
    /// The VLAN id (low 12 bits of the TCI) of an 802.1Q tag in the frame's data, if any.
    pub vlan: Option<u16>,
    /// Source address from the IP header.
    pub src: IpAddr,
    /// Destination address from the IP header.
    pub dst: IpAddr,
    /// TTL / hop limit.
    pub ttl: u8,
    /// The transport protocol (after IPv6 extension headers).
    pub proto: u8,
    /// Fragment offset in 8-byte units and the more-fragments flag (0 and false for a whole
    /// datagram).
    pub frag_offset: u16,
    /// The more-fragments flag (IPv4 MF, IPv6 fragment header M).
    pub more_fragments: bool,
    /// Ports, host order (0 for a later fragment, which carries no transport header, and for
    /// ICMP).
    pub sport: u16,
    /// Destination port, host order (0 as for `sport`).
    pub dport: u16,
    /// TCP: the MSS option, when it is the first option.
    pub mss: Option<u16>,
    /// The IPv4 header checksum verifies (always true for IPv6, which has none).
    pub ip_checksum_ok: bool,
    /// The TCP/UDP/ICMPv6 checksum verifies over the pseudo-header (a UDP checksum of 0 counts
    /// as "none", valid over IPv4 only), the ICMP one over the message; `None` for fragments,
    /// whose checksum covers the whole datagram.
    pub l4_checksum_ok: Option<bool>,
    /// Everything after the IP header(s).
    pub l4: Vec<u8>,
}

/// Reads an Ethernet / [802.1Q] / IPv4 or IPv6 (hop-by-hop, routing, destination-options and
/// fragment headers skipped) / TCP, UDP, ICMP or ICMPv6 frame, verifying its checksums. Errors name what is
/// missing or unexpected.
pub fn inspect(frame: &[u8]) -> Result<Inspected, String> {
    let need = |n: usize, what: &str| {
        if frame.len() < n {
            Err(format!(
                "frame of {} bytes is too short for {what}",
                frame.len()
            ))
        } else {
            Ok(())
        }
    };
    let be16 = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    need(14, "an Ethernet header")?;
    let mut dst_mac = [0; 6];
    let mut src_mac = [0; 6];
    dst_mac.copy_from_slice(&frame[0..6]);
    src_mac.copy_from_slice(&frame[6..12]);
    let mut l3 = 14;
    let mut ethertype = be16(12);
    let mut vlan = None;
    if ethertype == ETH_P_8021Q {
        need(18, "an 802.1Q tag")?;
        vlan = Some(be16(14) & 0x0fff);
        ethertype = be16(16);
        l3 = 18;
    }
    let mut frag_offset = 0;
    let mut more_fragments = false;
    let (src, dst, ttl, proto, l4, ip_checksum_ok, end) = match ethertype {
        ETH_P_IP => {
            need(l3 + 20, "an IPv4 header")?;
            let ihl = usize::from(frame[l3] & 0x0f) * 4;
            need(l3 + ihl, "the IPv4 options")?;
            let total = usize::from(be16(l3 + 2));
            need(l3 + total, "the IPv4 total length")?;
            let flags_off = be16(l3 + 6);
            frag_offset = flags_off & 0x1fff;
            more_fragments = flags_off & 0x2000 != 0;
            let src: [u8; 4] = frame[l3 + 12..l3 + 16].try_into().expect("4 bytes");
            let dst: [u8; 4] = frame[l3 + 16..l3 + 20].try_into().expect("4 bytes");
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                frame[l3 + 8],
                frame[l3 + 9],
                l3 + ihl,
                checksum(&[&frame[l3..l3 + ihl]]) == 0,
                l3 + total,
            )
        }
        ETH_P_IPV6 => {
            need(l3 + 40, "an IPv6 header")?;
            let end = l3 + 40 + usize::from(be16(l3 + 4));
            need(end, "the IPv6 payload length")?;
            let src: [u8; 16] = frame[l3 + 8..l3 + 24].try_into().expect("16 bytes");
            let dst: [u8; 16] = frame[l3 + 24..l3 + 40].try_into().expect("16 bytes");
            let mut next = frame[l3 + 6];
            let mut off = l3 + 40;
            while matches!(next, 0 | 43 | 60 | IPPROTO_FRAGMENT) {
                need(off + 8, "an IPv6 extension header")?;
                if next == IPPROTO_FRAGMENT {
                    let off_m = be16(off + 2);
                    frag_offset = off_m >> 3;
                    more_fragments = off_m & 1 != 0;
                    next = frame[off];
                    off += 8;
                } else {
                    next = frame[off];
                    off += (usize::from(frame[off + 1]) + 1) * 8;
                }
            }
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                frame[l3 + 7],
                next,
                off,
                true,
                end,
            )
        }
        other => return Err(format!("EtherType {other:#06x} is neither IPv4 nor IPv6")),
    };
    need(end, "the IP payload")?;
    let seg = &frame[l4.min(end)..end];
    let csum_at = match proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        IPPROTO_ICMP | IPPROTO_ICMPV6 if frag_offset == 0 && !more_fragments => {
            // No ports; the checksum covers the message (and, for ICMPv6, the pseudo-header).
            need(l4 + 4, "the ICMP header")?;
            let ok = if proto == IPPROTO_ICMP {
                checksum(&[seg]) == 0
            } else {
                checksum(&[&pseudo_header(src, dst, proto, seg.len()), seg]) == 0
            };
            return Ok(Inspected {
                dst_mac,
                src_mac,
                vlan,
                src,
                dst,
                ttl,
                proto,
                frag_offset,
                more_fragments,
                sport: 0,
                dport: 0,
                mss: None,
                ip_checksum_ok,
                l4_checksum_ok: Some(ok),
                l4: seg.to_vec(),
            });
        }
        other => return Err(format!("IP protocol {other} is neither TCP, UDP nor ICMP")),
    };
    let (sport, dport, l4_checksum_ok) = if frag_offset != 0 {
        (0, 0, None)
    } else {
        need(l4 + csum_at + 2, "the transport header")?;
        let ok = if more_fragments {
            None
        } else if proto == IPPROTO_UDP && be16(l4 + csum_at) == 0 {
            Some(src.is_ipv4())
        } else {
            Some(checksum(&[&pseudo_header(src, dst, proto, seg.len()), seg]) == 0)
        };
        (be16(l4), be16(l4 + 2), ok)
    };
    let mss = (proto == IPPROTO_TCP
        && frag_offset == 0
        && seg.len() >= 24
        && seg[12] >> 4 >= 6
        && seg[20] == 2
        && seg[21] == 4)
        .then(|| u16::from_be_bytes([seg[22], seg[23]]));
    Ok(Inspected {
        dst_mac,
        src_mac,
        vlan,
        src,
        dst,
        ttl,
        proto,
        frag_offset,
        more_fragments,
        sport,
        dport,
        mss,
        ip_checksum_ok,
        l4_checksum_ok,
        l4: seg.to_vec(),
    })
}

/// The start of the packet an ICMP error quotes: its IP header and first transport bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// Source address of the quoted packet.
    pub src: IpAddr,
    /// Destination address of the quoted packet.
    pub dst: IpAddr,
    /// The quoted IP header's protocol / next header field (extension headers not followed).
    pub proto: u8,
    /// The first two bytes after the quoted IP header as a big-endian port, host order.
    pub sport: u16,
    /// The next two bytes after the quoted IP header as a big-endian port, host order.
    pub dport: u16,
    /// The quoted IPv4 header's checksum verifies (always true for IPv6).
    pub ip_checksum_ok: bool,
}

/// Reads the quote of the ICMP/ICMPv6 error `i` (see [`inspect`]): the IP header after the
/// 8-byte ICMP header, then the ports.
pub fn quote_of(i: &Inspected) -> Result<Quote, String> {
    if i.proto != IPPROTO_ICMP && i.proto != IPPROTO_ICMPV6 {
        return Err(format!("protocol {} is not ICMP", i.proto));
    }
    let q = i.l4.get(8..).unwrap_or_default();
    let short = || format!("a quote of {} bytes is too short", q.len());
    let (src, dst, proto, l4, ip_checksum_ok) = if i.src.is_ipv4() {
        let ihl = usize::from(q.first().ok_or_else(short)? & 0x0f) * 4;
        if q.len() < ihl.max(20) + 4 {
            return Err(short());
        }
        let src: [u8; 4] = q[12..16].try_into().expect("4 bytes");
        let dst: [u8; 4] = q[16..20].try_into().expect("4 bytes");
        (
            IpAddr::from(src),
            IpAddr::from(dst),
            q[9],
            ihl,
            checksum(&[&q[..ihl]]) == 0,
        )
    } else {
        if q.len() < 44 {
            return Err(short());
        }
        let src: [u8; 16] = q[8..24].try_into().expect("16 bytes");
        let dst: [u8; 16] = q[24..40].try_into().expect("16 bytes");
        (IpAddr::from(src), IpAddr::from(dst), q[6], 40, true)
    };
    Ok(Quote {
        src,
        dst,
        proto,
        sport: u16::from_be_bytes([q[l4], q[l4 + 1]]),
        dport: u16::from_be_bytes([q[l4 + 2], q[l4 + 3]]),
        ip_checksum_ok,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    #[test]
    fn ipv4_header_checksum_matches_a_known_header() {
        // The worked example of RFC 1071 style checksums: 192.168.0.1 -> 192.168.0.199, UDP.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&[&h]), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(checksum(&[&h]), 0);
        // Odd lengths pad with a zero byte, and the split between parts does not matter.
        assert_eq!(checksum(&[&[0x01]]), checksum(&[&[0x01, 0x00]]));
        assert_eq!(checksum(&[&h[..7], &h[7..]]), 0);
    }

    #[test]
    fn tcp_frames_round_trip_with_valid_checksums() {
        let src: SocketAddr = "192.0.2.2:40000".parse().unwrap();
        let dst: SocketAddr = "203.0.113.10:80".parse().unwrap();
        let mut p = Packet::tcp(src, dst, TCP_SYN);
        p.vlan = Some(100);
        let f = p.build();
        assert_eq!(f.len(), 18 + 20 + 20);
        assert_eq!(&f[12..16], &[0x81, 0x00, 0x00, 100]);
        let i = inspect(&f).unwrap();
        assert_eq!((i.src, i.dst), (src.ip(), dst.ip()));
        assert_eq!(
            (i.sport, i.dport, i.ttl, i.vlan),
            (40000, 80, 64, Some(100))
        );
        assert!(i.ip_checksum_ok && i.l4_checksum_ok == Some(true), "{i:?}");
        // Ports sit in network order right after the IP header.
        assert_eq!(&f[38..42], &[0x9c, 0x40, 0x00, 0x50]);
        assert_eq!(i.mss, None);
        let mut with_mss = p.clone();
        with_mss.tcp_mss = Some(1460);
        let f2 = with_mss.build();
        assert_eq!(f2.len(), f.len() + 4);
        let i2 = inspect(&f2).unwrap();
        assert_eq!((i2.mss, i2.l4_checksum_ok), (Some(1460), Some(true)));
        // A flipped bit is caught.
        let mut bad = f.clone();
        bad[45] ^= 1;
        assert_eq!(inspect(&bad).unwrap().l4_checksum_ok, Some(false));
    }

    #[test]
    fn udp_over_ipv6_with_extension_headers() {
        let src = SocketAddr::new(
            Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 2).into(),
            5353,
        );
        let dst = SocketAddr::new(
            Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0x10).into(),
            53,
        );
        let p = Packet::udp(src, dst);
        let i = inspect(&p.build()).unwrap();
        assert_eq!(i.l4_checksum_ok, Some(true), "{i:?}");
        assert_eq!((i.proto, i.sport, i.dport), (IPPROTO_UDP, 5353, 53));

        let mut p = Packet::tcp(src, dst, TCP_SYN);
        p.ext = vec![Ext::HopByHop];
        let f = p.build();
        assert_eq!(
            f[14 + 6],
            IPPROTO_HOPOPTS,
            "next header of the fixed header"
        );
        assert_eq!(
            f[14 + 40],
            IPPROTO_TCP,
            "next header of the hop-by-hop header"
        );
        assert_eq!(u16::from_be_bytes([f[18], f[19]]), 8 + 20, "payload length");

        let mut p = Packet::udp(src, dst);
        p.ext = vec![Ext::Fragment {
            offset: 0,
            more: true,
            id: 7,
        }];
        let f = p.build();
        assert_eq!(f[14 + 6], IPPROTO_FRAGMENT);
        assert_eq!(&f[14 + 40..14 + 44], &[IPPROTO_UDP, 0, 0, 1]);
        let i = inspect(&f).unwrap();
        assert_eq!((i.frag_offset, i.more_fragments, i.dport), (0, true, 53));
        assert_eq!(
            i.l4_checksum_ok, None,
            "a fragment's checksum covers the datagram"
        );

        let mut later = Packet::raw(src.ip(), dst.ip(), IPPROTO_UDP, vec![7; 16]);
        later.ext = vec![Ext::Fragment {
            offset: 185,
            more: false,
            id: 7,
        }];
        let i = inspect(&later.build()).unwrap();
        assert_eq!((i.frag_offset, i.more_fragments, i.sport), (185, false, 0));
        assert_eq!((i.proto, i.l4.clone()), (IPPROTO_UDP, vec![7; 16]));
    }

    #[test]
    fn ipv4_fragments() {
        let src: SocketAddr = "192.0.2.2:40000".parse().unwrap();
        let dst: SocketAddr = "203.0.113.10:53".parse().unwrap();
        let mut first = Packet::udp(src, dst);
        first.frag = 0x2000;
        first.id = 0xbeef;
        let f = first.build();
        assert_eq!(&f[18..22], &[0xbe, 0xef, 0x20, 0x00], "ID, MF, offset 0");
        let i = inspect(&f).unwrap();
        assert!(i.more_fragments && i.ip_checksum_ok && i.l4_checksum_ok.is_none());
        let mut later = Packet::raw(src.ip(), dst.ip(), IPPROTO_UDP, vec![1, 2, 3, 4]);
        later.frag = 185;
        let i = inspect(&later.build()).unwrap();
        assert_eq!((i.frag_offset, i.sport, i.dport), (185, 0, 0));
        assert_eq!(i.l4, [1, 2, 3, 4]);
        assert!(i.ip_checksum_ok);
    }

    #[test]
    fn icmp_errors_quote_and_verify() {
        let offending = Packet::tcp(
            "203.0.113.10:80".parse().unwrap(),
            "192.0.2.2:40001".parse().unwrap(),
            TCP_ACK,
        );
        let quote = &offending.ip()[..28];
        let e = Packet::icmp_error(
            Ipv4Addr::new(192, 0, 2, 254).into(),
            Ipv4Addr::new(203, 0, 113, 10).into(),
            3,
            4,
            1400,
            quote,
        );
        let i = inspect(&e.build()).unwrap();
        assert_eq!((i.proto, i.l4_checksum_ok), (IPPROTO_ICMP, Some(true)));
        assert_eq!(&i.l4[..8], &[3, 4, i.l4[2], i.l4[3], 0, 0, 0x05, 0x78]);
        assert_eq!(&i.l4[8..], quote);
        let q = quote_of(&i).unwrap();
        assert_eq!((q.src, q.dst), (offending.src, offending.dst));
        assert_eq!(
            (q.proto, q.sport, q.dport, q.ip_checksum_ok),
            (IPPROTO_TCP, 80, 40001, true)
        );

        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let offending6 = Packet::tcp(
            SocketAddr::new(v6("2001:db8:e::10"), 80),
            SocketAddr::new(v6("2001:db8:c::2"), 40002),
            TCP_ACK,
        );
        let e6 = Packet::icmp_error(
            v6("2001:db8:c::fe"),
            v6("2001:db8:e::10"),
            2,
            0,
            1280,
            &offending6.ip()[..48],
        );
        let mut f = e6.build();
        let i = inspect(&f).unwrap();
        assert_eq!((i.proto, i.l4_checksum_ok), (IPPROTO_ICMPV6, Some(true)));
        let q = quote_of(&i).unwrap();
        assert_eq!((q.src, q.dport), (offending6.src, 40002));
        // The ICMPv6 checksum covers the addresses: another source breaks it.
        f[14 + 8 + 15] ^= 1;
        assert_eq!(inspect(&f).unwrap().l4_checksum_ok, Some(false));
    }

    #[test]
    fn arp_and_icmp() {
        let a = arp_request(Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(a.len(), 14 + 28);
        assert_eq!(&a[12..14], &[0x08, 0x06]);
        let p = Packet::icmp_echo(Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(203, 0, 113, 10));
        let f = p.build();
        assert_eq!(f[14 + 9], IPPROTO_ICMP);
        assert_eq!(checksum(&[&f[34..]]), 0, "ICMP checksum");
        assert_eq!(checksum(&[&f[14..34]]), 0, "IPv4 header checksum");
    }
}
