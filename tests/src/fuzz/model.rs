//! The reference model: what the classifiers should do with a frame, written from the
//! documented semantics (`docs/architecture.md`, the module docs of `viscum-ebpf`), not from
//! the datapath's code.
//!
//! * [`parse`] says whether a frame is ours (TCP/UDP, or an ICMP error, over IPv4/IPv6 in
//!   Ethernet with at most one VLAN tag), not ours, or malformed; a frame that is not fully
//!   parsable is never acted on.
//! * [`Model`] holds the entry table (exact entries, then rules by longest destination prefix,
//!   source-restricted before port ranges before all ports) and the flow, reply and fragment
//!   tables, and predicts the verdict and the frame written back for each packet.
//!
//! # Known defects
//!
//! Where the datapath today deviates from the documented semantics, [`Kd`] names the deviation.
//! The runner predicts the kernel with [`Kd::CURRENT`] (so the model's tables follow what the
//! kernel really did) and also with [`Kd::NONE`], counting every packet whose verdict differs
//! as a hit of that known defect. When the datapath is fixed, set the matching field of
//! [`Kd::CURRENT`] to `false`; a fix without that change shows up as violations.

use std::collections::HashMap;

/// `TC_ACT_UNSPEC`.
pub const UNSPEC: i32 = -1;
/// `TC_ACT_SHOT`.
pub const SHOT: i32 = 2;
/// `TC_ACT_REDIRECT`.
pub const REDIRECT: i32 = 7;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;

/// Deviations of today's datapath from the documented semantics (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[expect(clippy::struct_excessive_bools, reason = "one switch per known defect")]
pub struct Kd {
    /// KD1: the IPv4 total length / IPv6 payload length is not checked against the frame or
    /// the headers (a datagram shorter than its own headers, or longer than the frame, is
    /// treated as whole).
    pub ip_len: bool,
    /// KD2: a TCP/UDP header is only read as far as the ports (and the TCP flags byte): a
    /// truncated L4 header, or a TCP data offset below 5, is matched and acted on.
    pub l4_short: bool,
    /// KD3: an IPv4 packet with protocol 58 (ICMPv6), or an IPv6 packet with next header 1
    /// (ICMP), is handled as an ICMP error of its own family.
    pub icmp_family: bool,
    /// KD4: an IPv6 extension header with length byte 255 ((255 + 1) * 8 = 2048 bytes) is
    /// taken as 0 bytes long (the `& 0x7f8` mask), so the next header is read in its place.
    pub ext_len_255: bool,
    /// KD5: an ICMP error from the network is sent into the namespace of the edge flow it
    /// quotes whatever its outer destination, not only when addressed to the flow's service
    /// address (the address the quoted packet came from).
    pub icmp_outer_dst: bool,
}

impl Kd {
    /// The documented semantics.
    pub const NONE: Kd = Kd {
        ip_len: false,
        l4_short: false,
        icmp_family: false,
        ext_len_255: false,
        icmp_outer_dst: false,
    };
    /// What the datapath does today: every known defect fixed (issue 13's fuzzing round).
    pub const CURRENT: Kd = Kd::NONE;
}

/// Where a packet sits in a fragmented datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// A whole datagram.
    None,
    /// Offset 0, more fragments.
    First,
    /// A non-zero offset.
    Later,
}

/// The parts of a frame the decision needs.
#[derive(Debug, Clone, Copy)]
pub struct Hdr {
    /// 4 or 6.
    pub family: u8,
    /// The upper-layer protocol.
    pub proto: u8,
    /// Source address (IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Ports (0 for a later fragment).
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// TCP flags (0 for UDP and later fragments).
    pub flags: u8,
    /// Fragment position.
    pub frag: Frag,
    /// Fragment identification.
    pub frag_id: u32,
    /// Offsets of the IP and L4 headers.
    pub l3: usize,
    /// Offset of the L4 (or ICMP) header.
    pub l4: usize,
    /// One VLAN tag in the frame's data.
    pub vlan: bool,
}

/// What [`parse`] found.
#[derive(Debug, Clone, Copy)]
pub enum Parsed {
    /// Not IP, or not TCP/UDP/ICMP: none of Viscum's business.
    NotOurs,
    /// Truncated or inconsistent headers.
    Malformed,
    /// TCP or UDP.
    L4(Hdr),
    /// An unfragmented ICMP/ICMPv6 packet.
    Icmp(Hdr),
}

fn be16(f: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(off)?, *f.get(off + 1)?]))
}

fn addr(f: &[u8], off: usize, n: usize) -> Option<[u8; 16]> {
    let mut a = [0u8; 16];
    a[..n].copy_from_slice(f.get(off..off + n)?);
    Some(a)
}

/// Parses `f` as the classifiers should (`kd` selects today's deviations).
pub fn parse(f: &[u8], kd: Kd) -> Parsed {
    match parse_inner(f, kd) {
        Some(p) => p,
        None => Parsed::Malformed,
    }
}

#[expect(clippy::too_many_lines, reason = "one header after the other")]
fn parse_inner(f: &[u8], kd: Kd) -> Option<Parsed> {
    let mut ethertype = be16(f, 12)?;
    let mut l3 = 14;
    let mut vlan = false;
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = be16(f, 16)?;
        l3 = 18;
        vlan = true;
    }
    let (family, mut proto, src, dst, frag, frag_id, l4, ip_end) = match ethertype {
        0x0800 => {
            let vihl = *f.get(l3)?;
            let ihl = usize::from(vihl & 0xf) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return Some(Parsed::Malformed);
            }
            let tot = usize::from(be16(f, l3 + 2)?);
            let fo = be16(f, l3 + 6)?;
            let frag = if fo & 0x1fff != 0 {
                Frag::Later
            } else if fo & 0x2000 != 0 {
                Frag::First
            } else {
                Frag::None
            };
            let id = u32::from(be16(f, l3 + 4)?);
            let proto = *f.get(l3 + 9)?;
            let src = addr(f, l3 + 12, 4)?;
            let dst = addr(f, l3 + 16, 4)?;
            if !kd.ip_len && (tot < ihl || l3 + tot > f.len()) {
                return Some(Parsed::Malformed);
            }
            let end = if kd.ip_len { f.len() } else { l3 + tot };
            (4, proto, src, dst, frag, id, l3 + ihl, end)
        }
        0x86dd => {
            let v = *f.get(l3)?;
            if v >> 4 != 6 {
                return Some(Parsed::Malformed);
            }
            if f.len() < l3 + 40 {
                return None;
            }
            let plen = usize::from(be16(f, l3 + 4)?);
            if !kd.ip_len && l3 + 40 + plen > f.len() {
                return Some(Parsed::Malformed);
            }
            let end = if kd.ip_len { f.len() } else { l3 + 40 + plen };
            let src = addr(f, l3 + 8, 16)?;
            let dst = addr(f, l3 + 24, 16)?;
            let mut next = f[l3 + 6];
            let mut off = l3 + 40;
            let mut frag = Frag::None;
            let mut id = 0;
            // At most four extension headers are walked (documented bound); a chain longer
            // than that ends in an extension header type, which is not ours.
            for _ in 0..4 {
                match next {
                    0 | 43 | 60 => {
                        let n = *f.get(off)?;
                        let len = *f.get(off + 1)?;
                        let size = (usize::from(len) + 1) * 8;
                        let size = if kd.ext_len_255 { size & 0x7f8 } else { size };
                        if !kd.ip_len && off + size > end {
                            return Some(Parsed::Malformed);
                        }
                        next = n;
                        off += size;
                    }
                    44 => {
                        let h = f.get(off..off + 8)?;
                        if !kd.ip_len && off + 8 > end {
                            return Some(Parsed::Malformed);
                        }
                        next = h[0];
                        let om = u16::from_be_bytes([h[2], h[3]]);
                        id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                        off += 8;
                        if om >> 3 != 0 {
                            frag = Frag::Later;
                            break;
                        }
                        if om & 1 != 0 {
                            frag = Frag::First;
                        }
                    }
                    _ => break,
                }
            }
            if off > 8 * 1024 {
                return Some(Parsed::Malformed);
            }
            (6, next, src, dst, frag, id, off, end)
        }
        _ => return Some(Parsed::NotOurs),
    };
    let mut hdr = Hdr {
        family,
        proto,
        src,
        dst,
        sport: 0,
        dport: 0,
        flags: 0,
        frag,
        frag_id,
        l3,
        l4,
        vlan,
    };
    if proto != TCP && proto != UDP {
        let own_icmp = if kd.icmp_family {
            proto == ICMP || proto == ICMPV6
        } else {
            (family == 4 && proto == ICMP) || (family == 6 && proto == ICMPV6)
        };
        if !own_icmp || frag != Frag::None {
            return Some(Parsed::NotOurs);
        }
        return Some(Parsed::Icmp(hdr));
    }
    if frag == Frag::Later {
        return Some(Parsed::L4(hdr));
    }
    // The L4 header: the datapath reads the ports (and TCP flags at offset 13).
    let need = if kd.l4_short {
        if proto == TCP { 14 } else { 4 }
    } else if proto == TCP {
        20
    } else {
        8
    };
    if l4 + need > ip_end || l4 + need > f.len() {
        return None;
    }
    hdr.sport = be16(f, l4)?;
    hdr.dport = be16(f, l4 + 2)?;
    if proto == TCP {
        hdr.flags = f[l4 + 13];
        if !kd.l4_short && f[l4 + 12] >> 4 < 5 {
            return Some(Parsed::Malformed);
        }
    }
    proto = hdr.proto;
    let _ = proto;
    Some(Parsed::L4(hdr))
}

/// How an entry sends its packets.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Host veth of the namespace (also the reply program's device).
    pub ifindex: u32,
    /// `TARGET_F_*`.
    pub flags: u32,
    /// The namespace veth's MAC (written when `TARGET_F_SET_MAC` without `TARGET_F_PEER`).
    pub mac: [u8; 6],
    /// Translated to this address (and port, 0 = keep) when `Some`.
    pub nat: Option<([u8; 16], u16)>,
}

/// One installed entry, as its match says.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The match string (for messages).
    pub name: String,
    /// 6 or 17.
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// Destination prefix.
    pub addr: [u8; 16],
    /// Prefix length (32/128 for a single address).
    pub plen: u8,
    /// Port range (one port: lo == hi; all ports: 1-65535).
    pub ports: (u16, u16),
    /// Source restriction (prefix, length).
    pub from: Option<([u8; 16], u8)>,
    /// Draining or still learning: new flows go to the cloud, open edge flows stay.
    pub cloud_new: bool,
    /// Where it goes.
    pub target: Target,
}

impl Entry {
    fn exact(&self) -> bool {
        self.from.is_none() && self.ports.0 == self.ports.1 && self.plen == host_bits(self.family)
    }
}

fn host_bits(family: u8) -> u8 {
    if family == 4 { 32 } else { 128 }
}

/// Is `a` inside `p`/`len`?
pub fn in_prefix(a: &[u8; 16], p: &[u8; 16], len: u8) -> bool {
    let len = usize::from(len);
    let (bytes, bits) = (len / 8, len % 8);
    if a[..bytes] != p[..bytes] {
        return false;
    }
    if bits == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - bits);
    a[bytes] & mask == p[bytes] & mask
}

/// A flow key: (client, service, client port, service port, proto, family).
pub type FlowKey = ([u8; 16], [u8; 16], u16, u16, u8, u8);
/// A reply key: (client, client port, local port, proto, family, ifindex).
pub type ReplyKey = ([u8; 16], u16, u16, u8, u8, u32);
/// What a reply carries of its flow's target: (veth ifindex, local port, proto, family).
pub type IdentityKey = (u32, u16, u8, u8);
/// A learned cloud identity: (cloud address, cloud port, ambiguous).
pub type Identity = ([u8; 16], u16, bool);
/// A fragment key: (src, dst, id, proto, family).
pub type FragKey = ([u8; 16], [u8; 16], u32, u8, u8);

/// A tracked flow.
#[derive(Debug, Clone, Copy)]
pub struct FlowSt {
    /// Decided for the edge (never, here: only cloud decisions of UDP flows are recorded).
    pub edge: bool,
    /// A FIN or RST was seen.
    pub closing: bool,
    /// The target's ifindex.
    pub ifindex: u32,
    /// The target's flags and MAC, NAT address and port (for ICMP errors).
    pub target: Target,
}

/// An edge flow's record, keyed by its [`ReplyKey`] (what the service sees): the identity
/// its replies carry, and whether a FIN or RST was seen from either side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplySt {
    /// The cloud address the client talked to.
    pub svc: [u8; 16],
    /// The cloud port.
    pub port: u16,
    /// A FIN or RST was seen.
    pub closing: bool,
}

/// What the model predicts for one frame.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// The TC action.
    pub action: i32,
    /// The frame written back (checksum fields excepted, see `check`); `None`: anything
    /// (a dropped packet).
    pub out: Option<Vec<u8>>,
    /// Byte ranges of `out` that may hold anything (MACs a FIB lookup fills in).
    pub free: Vec<(usize, usize)>,
    /// Checksum fields the rewrite updates (input offsets, 2 bytes each): compared by
    /// recomputation ([`Sums`]), not byte for byte.
    pub csum_fields: Vec<usize>,
    /// Which checksums to verify on the output.
    pub sums: Sums,
}

/// Checksums the output must carry (each only if the input's was valid); offsets are the
/// input's, the output's are `shift` bytes lower (a stripped VLAN tag).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sums {
    /// The outer IPv4 header at this offset.
    pub ip: Option<usize>,
    /// The outer L4 (TCP/UDP/ICMP/ICMPv6) checksum over the whole datagram: (l3, l4, proto).
    pub l4: Option<(usize, usize, u8)>,
    /// A quoted IPv4 header at this offset.
    pub inner_ip: Option<usize>,
    /// Bytes removed in front of the IP header.
    pub shift: usize,
}

impl Prediction {
    fn pass(frame: &[u8]) -> Prediction {
        Prediction {
            action: UNSPEC,
            out: Some(frame.to_vec()),
            free: Vec::new(),
            csum_fields: Vec::new(),
            sums: Sums::default(),
        }
    }
}

/// The model's state: entries (fixed) and the flow, reply and fragment tables.
#[derive(Debug, Clone, Default)]
pub struct Model {
    /// Installed entries.
    pub entries: Vec<Entry>,
    /// Cloud decisions: UDP flows that began while their entry drained or learned.
    pub flows: HashMap<FlowKey, FlowSt>,
    /// Edge flows, one record each, read by both directions.
    pub replies: HashMap<ReplyKey, ReplySt>,
    /// Fragment table.
    pub frags: HashMap<FragKey, (u16, u16)>,
    /// The MTU of the client-facing interface (MSS clamping).
    pub mtu: u32,
    /// Reply program's device (the namespace's host veth).
    pub reply_ifindex: u32,
    /// Cloud identities the reply path learned, by (veth, local port, proto, family): the
    /// cloud address and port, and whether two differed (ambiguous). Not cleared with the
    /// tables: the kernel's map is not pinned, so the runner cannot clear it either.
    pub identities: HashMap<IdentityKey, Identity>,
}

fn frag_key(h: &Hdr) -> FragKey {
    (h.src, h.dst, h.frag_id, h.proto, h.family)
}

fn put(out: &mut [u8], off: usize, bytes: &[u8]) {
    if off + bytes.len() <= out.len() {
        out[off..off + bytes.len()].copy_from_slice(bytes);
    }
}

impl Model {
    /// Clears the flow, reply and fragment tables (the runner clears the kernel's too).
    pub fn clear(&mut self) {
        self.flows.clear();
        self.replies.clear();
        self.frags.clear();
    }

    /// The entry `h` matches: exact entries first, then rules by longest destination prefix;
    /// under one prefix source-restricted rules first, then by narrowest port range.
    pub fn find(&self, h: &Hdr) -> Option<&Entry> {
        let fam = |e: &&Entry| e.proto == h.proto && e.family == h.family;
        if let Some(e) = self
            .entries
            .iter()
            .filter(fam)
            .find(|e| e.exact() && e.addr == h.dst && e.ports.0 == h.dport)
        {
            return Some(e);
        }
        let mut cands: Vec<&Entry> = self
            .entries
            .iter()
            .filter(fam)
            .filter(|e| !e.exact() && in_prefix(&h.dst, &e.addr, e.plen))
            .collect();
        cands.sort_by_key(|e| {
            (
                std::cmp::Reverse(e.plen),
                e.from.is_none(),
                std::cmp::Reverse(e.from.map_or(0, |f| f.1)),
                u32::from(e.ports.1 - e.ports.0),
            )
        });
        cands.into_iter().find(|e| {
            h.dport >= e.ports.0
                && h.dport <= e.ports.1
                && e.from.is_none_or(|(p, l)| in_prefix(&h.src, &p, l))
        })
    }

    /// `viscum_ingress` on `f`.
    pub fn ingress(&mut self, f: &[u8], kd: Kd) -> Prediction {
        match parse(f, kd) {
            Parsed::NotOurs | Parsed::Malformed => Prediction::pass(f),
            Parsed::Icmp(h) => self.icmp_to_edge(f, &h, kd),
            Parsed::L4(mut h) => {
                if h.frag == Frag::Later {
                    let Some(&(s, d)) = self.frags.get(&frag_key(&h)) else {
                        return Prediction::pass(f);
                    };
                    h.sport = s;
                    h.dport = d;
                }
                let Some(e) = self.find(&h).cloned() else {
                    return Prediction::pass(f);
                };
                if h.frag == Frag::First {
                    self.frags.insert(frag_key(&h), (h.sport, h.dport));
                }
                if !self.decide(&h, &e) {
                    return Prediction::pass(f);
                }
                self.redirect(f, &h, &e)
            }
        }
    }

    fn reply_key(h: &Hdr, e: &Entry) -> ReplyKey {
        let local = match e.target.nat {
            Some((_, p)) if p != 0 => p,
            _ => h.dport,
        };
        (h.src, h.sport, local, h.proto, h.family, e.target.ifindex)
    }

    /// The flow decision: true for the edge. One record per edge flow, keyed as the service
    /// sees it; a mid-connection TCP packet without one is the cloud's (the service
    /// namespaces hold no socket of a fuzzed flow: test runs deliver nothing, so the
    /// classifier's socket lookup never finds one).
    ///
    /// A record is never removed here: the datapath removes one at its connection's last
    /// ACK (`viscum_common::close`), which takes a FIN acknowledging the other side's FIN by
    /// its exact sequence number, and the generator's segments all carry sequence number
    /// 0x01020304 and acknowledgment number 0 (`frames::tcp`), so no fuzzed close finishes.
    /// (Modelling it would mean modelling the per-CPU caches, which may serve a segment of a
    /// close without the record.)
    fn decide(&mut self, h: &Hdr, e: &Entry) -> bool {
        let tcp = h.proto == TCP;
        let syn = tcp && h.flags & (SYN | ACK) == SYN;
        let closing = tcp && h.flags & (FIN | RST) != 0;
        let rkey = Self::reply_key(h, e);
        if let Some(r) = self.replies.get_mut(&rkey) {
            // A SYN on a finished flow starts a new connection on the same 5-tuple; a
            // record of another cloud address answered from the same port is not this flow.
            let reused = syn && r.closing;
            if (r.svc, r.port) == (h.dst, h.dport) && !reused {
                if closing {
                    r.closing = true;
                }
                return true;
            }
        }
        if tcp && !syn {
            return false;
        }
        // UDP has no first packet: a cloud decision, taken while the entry drained or
        // learned, holds for the flow's life.
        let fkey = (h.src, h.dst, h.sport, h.dport, h.proto, h.family);
        if !tcp && self.flows.get(&fkey).is_some_and(|f| !f.edge) {
            return false;
        }
        if e.cloud_new {
            if !tcp {
                self.flows.insert(
                    fkey,
                    FlowSt {
                        edge: false,
                        closing: false,
                        ifindex: e.target.ifindex,
                        target: e.target,
                    },
                );
            }
            return false;
        }
        self.replies.insert(
            rkey,
            ReplySt {
                svc: h.dst,
                port: h.dport,
                closing: false,
            },
        );
        true
    }

    /// A redirected packet: NAT, MSS clamp, VLAN strip, MAC.
    fn redirect(&self, f: &[u8], h: &Hdr, e: &Entry) -> Prediction {
        let mut out = f.to_vec();
        let alen = if h.family == 4 { 4 } else { 16 };
        let daddr_off = h.l3 + if h.family == 4 { 16 } else { 24 };
        let has_l4 = h.frag != Frag::Later;
        if let Some((naddr, nport)) = e.target.nat {
            let csum_end = h.l4 + if h.proto == UDP { 8 } else { 18 };
            if has_l4 && csum_end > f.len() {
                // The checksum field is outside the frame: the rewrite fails, dropped.
                return Prediction {
                    action: SHOT,
                    out: None,
                    free: Vec::new(),
                    csum_fields: Vec::new(),
                    sums: Sums::default(),
                };
            }
            out[daddr_off..daddr_off + alen].copy_from_slice(&naddr[..alen]);
            if has_l4 && nport != 0 {
                put(&mut out, h.l4 + 2, &nport.to_be_bytes());
            }
        }
        if h.proto == TCP && h.flags & SYN != 0 {
            clamp(&mut out, h, self.mtu);
        }
        Self::finish(out, h, &e.target, f.len())
    }

    /// VLAN strip and MAC of a redirect into a namespace; the checksums to verify.
    fn finish(mut out: Vec<u8>, h: &Hdr, t: &Target, _len: usize) -> Prediction {
        let shift = if h.vlan {
            out.drain(12..16);
            4
        } else {
            0
        };
        // A peer redirect marks the skb PACKET_HOST instead (not visible in the frame).
        if t.flags & viscum_common::TARGET_F_SET_MAC != 0
            && t.flags & viscum_common::TARGET_F_PEER == 0
        {
            out[..6].copy_from_slice(&t.mac);
        }
        Prediction {
            action: REDIRECT,
            out: Some(out),
            free: Vec::new(),
            csum_fields: csum_fields(h),
            sums: sums(h, shift),
        }
    }

    /// An ICMP error from the network about an edge flow goes into its namespace.
    fn icmp_to_edge(&mut self, f: &[u8], h: &Hdr, kd: Kd) -> Prediction {
        let Some(q) = quoted(f, h) else {
            return Prediction::pass(f);
        };
        // The entry of the quoted flow (from the service to the client), then its record.
        let Some(e) = self.edge_entry_of(&q, h.family) else {
            return Prediction::pass(f);
        };
        if !kd.icmp_outer_dst && h.dst != q.src {
            return Prediction::pass(f);
        }
        let st = FlowSt {
            edge: true,
            closing: false,
            ifindex: e.target.ifindex,
            target: e.target,
        };
        let mut out = f.to_vec();
        let alen = if h.family == 4 { 4 } else { 16 };
        if let Some((naddr, nport)) = st.target.nat {
            let daddr_off = h.l3 + if h.family == 4 { 16 } else { 24 };
            out[daddr_off..daddr_off + alen].copy_from_slice(&naddr[..alen]);
            let qsrc = q.inner + if h.family == 4 { 12 } else { 8 };
            out[qsrc..qsrc + alen].copy_from_slice(&naddr[..alen]);
            let p = if nport != 0 { nport } else { q.sport };
            put(&mut out, q.inner_l4, &p.to_be_bytes());
        }
        let mut pred = Self::finish(out, h, &st.target, f.len());
        if (h.family == 4) != (h.proto == ICMP) {
            // KD3: ICMPv6 in IPv4 (or ICMP in IPv6) has no defined checksum to keep.
            pred.sums.l4 = None;
        }
        if h.family == 4 {
            pred.sums.inner_ip = Some(q.inner);
            pred.csum_fields.push(q.inner + 10);
        }
        pred
    }

    /// The entry whose edge flow the quote `q` of an ICMP error from the network names
    /// (the quoted packet went from the cloud address to the client), if that flow has a
    /// record.
    pub fn edge_entry_of(&self, q: &Quote, family: u8) -> Option<Entry> {
        let hq = Hdr {
            family,
            proto: q.proto,
            src: q.dst,
            dst: q.src,
            sport: q.dport,
            dport: q.sport,
            flags: 0,
            frag: Frag::None,
            frag_id: 0,
            l3: 0,
            l4: 0,
            vlan: false,
        };
        let e = self.find(&hq)?.clone();
        let r = self.replies.get(&Self::reply_key(&hq, &e))?;
        ((r.svc, r.port) == (q.src, q.sport)).then_some(e)
    }

    /// `viscum_reply` on `f`, arriving on the host veth `ifindex`.
    pub fn reply(&mut self, f: &[u8], ifindex: u32, kd: Kd) -> Option<Prediction> {
        let mut h = match parse(f, kd) {
            Parsed::NotOurs | Parsed::Malformed => return Some(Prediction::pass(f)),
            Parsed::Icmp(h) => return Some(self.icmp_to_client(f, &h, ifindex)),
            Parsed::L4(h) => h,
        };
        if h.frag == Frag::Later {
            let Some(&(s, d)) = self.frags.get(&frag_key(&h)) else {
                return Some(Prediction::pass(f));
            };
            h.sport = s;
            h.dport = d;
        }
        let rkey: ReplyKey = (h.dst, h.dport, h.sport, h.proto, h.family, ifindex);
        if !self.replies.contains_key(&rkey) && !self.restore_from_reply(&h, ifindex, rkey) {
            return Some(Prediction::pass(f));
        }
        let r = self.replies.get_mut(&rkey)?;
        if h.proto == TCP && h.flags & (FIN | RST) != 0 {
            r.closing = true;
        }
        let (svc, svc_port) = (r.svc, r.port);
        if svc != h.src || svc_port != h.sport {
            // The reply path learns which cloud endpoint this namespace port answers for.
            let ikey = (ifindex, h.sport, h.proto, h.family);
            let known = self
                .identities
                .entry(ikey)
                .or_insert((svc, svc_port, false));
            if (known.0, known.1) != (svc, svc_port) {
                known.2 = true;
            }
        }
        if h.frag == Frag::First {
            self.frags.insert(frag_key(&h), (h.sport, h.dport));
        }
        let mut out = f.to_vec();
        let alen = if h.family == 4 { 4 } else { 16 };
        let has_l4 = h.frag != Frag::Later;
        if svc != h.src || svc_port != h.sport {
            let csum_end = h.l4 + if h.proto == UDP { 8 } else { 18 };
            if has_l4 && csum_end > f.len() {
                return Some(Prediction {
                    action: SHOT,
                    out: None,
                    free: Vec::new(),
                    csum_fields: Vec::new(),
                    sums: Sums::default(),
                });
            }
            let saddr_off = h.l3 + if h.family == 4 { 12 } else { 8 };
            out[saddr_off..saddr_off + alen].copy_from_slice(&svc[..alen]);
            if has_l4 {
                put(&mut out, h.l4, &svc_port.to_be_bytes());
            }
        }
        if !routable(&h.dst, h.family) {
            // No route to the client: left to the stack (which answers with an ICMP error),
            // rewritten as far as it got.
            return Some(Prediction {
                action: UNSPEC,
                out: Some(out),
                free: Vec::new(),
                csum_fields: csum_fields(&h),
                sums: sums(&h, 0),
            });
        }
        if h.proto == TCP && h.flags & SYN != 0 {
            clamp(&mut out, &h, self.mtu);
        }
        // One hop less; a packet about to expire is left to the stack (rewritten as far as
        // it got).
        let ttl_off = h.l3 + if h.family == 4 { 8 } else { 7 };
        if out[ttl_off] <= 1 {
            return Some(Prediction {
                action: UNSPEC,
                out: Some(out),
                free: Vec::new(),
                csum_fields: csum_fields(&h),
                sums: sums(&h, 0),
            });
        }
        out[ttl_off] -= 1;
        Some(Prediction {
            action: REDIRECT,
            out: Some(out),
            free: vec![(0, 12)],
            csum_fields: csum_fields(&h),
            sums: sums(&h, 0),
        })
    }
}

impl Model {
    /// `viscum_reply` for a reply without a record (`flow::restore_from_reply`): restores
    /// the record of `rkey` when the reply answers for an exact entry whose target is this
    /// veth and port (in NAT mode, from the namespace address), by the identity learned for
    /// the port or, unlearned, by its own source, towards a destination the edge forwards to.
    /// Never for a SYN, nor an ambiguous port.
    fn restore_from_reply(&mut self, h: &Hdr, ifindex: u32, rkey: ReplyKey) -> bool {
        if h.proto == TCP && h.flags & SYN != 0 {
            return false;
        }
        let (svc, port) = match self.identities.get(&(ifindex, h.sport, h.proto, h.family)) {
            Some(&(_, _, true)) => return false,
            Some(&(s, p, false)) => (s, p),
            None => (h.src, h.sport),
        };
        let Some(e) = self.entries.iter().find(|e| {
            e.exact()
                && e.proto == h.proto
                && e.family == h.family
                && e.addr == svc
                && e.ports.0 == port
        }) else {
            return false;
        };
        let local = match e.target.nat {
            Some((_, p)) if p != 0 => p,
            _ => port,
        };
        if e.target.ifindex != ifindex || local != h.sport {
            return false;
        }
        if let Some((naddr, _)) = e.target.nat
            && naddr != h.src
        {
            return false;
        }
        // Only towards a destination the edge forwards to (not one of its own addresses).
        if !routable(&h.dst, h.family) {
            return false;
        }
        self.replies.insert(
            rkey,
            ReplySt {
                svc,
                port,
                closing: false,
            },
        );
        true
    }
}

/// Does the edge have a forwarding route to `dst`? The lab's edge has its two connected
/// subnets (clients 192.0.2.0/24 and 2001:db8:c::/64, cloud 198.51.100.0/24 and
/// 2001:db8:f::/64) and no default route; the generator never uses the edge's own, network
/// or broadcast addresses as clients.
fn routable(dst: &[u8; 16], family: u8) -> bool {
    if family == 4 {
        matches!(dst[..3], [192, 0, 2] | [198, 51, 100])
    } else {
        dst[..8] == [0x20, 0x01, 0x0d, 0xb8, 0, 0x0c, 0, 0]
            || dst[..8] == [0x20, 0x01, 0x0d, 0xb8, 0, 0x0f, 0, 0]
    }
}

/// The checksum fields a rewrite of `h` may update.
fn csum_fields(h: &Hdr) -> Vec<usize> {
    let mut v = Vec::new();
    if h.family == 4 {
        v.push(h.l3 + 10);
    }
    if h.frag != Frag::Later {
        v.push(
            h.l4 + match h.proto {
                TCP => 16,
                UDP => 6,
                _ => 2,
            },
        );
    }
    v
}

/// The checksums a rewrite of `h` must keep valid.
fn sums(h: &Hdr, shift: usize) -> Sums {
    Sums {
        ip: (h.family == 4).then_some(h.l3),
        // A fragment's L4 checksum covers the whole datagram: not verifiable here.
        l4: (h.frag == Frag::None).then_some((h.l3, h.l4, h.proto)),
        inner_ip: None,
        shift,
    }
}

impl Model {
    /// An ICMP error the namespace's stack sends about a client's packet goes back to the
    /// client like a reply: from the cloud address, quoting the cloud address and port.
    fn icmp_to_client(&self, f: &[u8], h: &Hdr, ifindex: u32) -> Prediction {
        let Some(q) = quoted(f, h) else {
            return Prediction::pass(f);
        };
        let rkey: ReplyKey = (q.src, q.sport, q.dport, q.proto, h.family, ifindex);
        let Some(&ReplySt {
            svc,
            port: svc_port,
            ..
        }) = self.replies.get(&rkey)
        else {
            return Prediction::pass(f);
        };
        let mut out = f.to_vec();
        let alen = if h.family == 4 { 4 } else { 16 };
        let mut csum_fields = vec![h.l4 + 2];
        if h.family == 4 {
            csum_fields.push(h.l3 + 10);
            csum_fields.push(q.inner + 10);
        }
        if svc != h.src {
            let off = h.l3 + if h.family == 4 { 12 } else { 8 };
            out[off..off + alen].copy_from_slice(&svc[..alen]);
        }
        if svc != q.dst {
            let off = q.inner + if h.family == 4 { 16 } else { 24 };
            out[off..off + alen].copy_from_slice(&svc[..alen]);
        }
        if svc_port != q.dport {
            put(&mut out, q.inner_l4 + 2, &svc_port.to_be_bytes());
        }
        let mut sums = sums(h, 0);
        if (h.family == 4) != (h.proto == ICMP) {
            // KD3: ICMPv6 in IPv4 (or ICMP in IPv6) has no defined checksum to keep.
            sums.l4 = None;
        }
        if h.family == 4 {
            sums.inner_ip = Some(q.inner);
        }
        let ttl_off = h.l3 + if h.family == 4 { 8 } else { 7 };
        if !routable(&h.dst, h.family) || out[ttl_off] <= 1 {
            return Prediction {
                action: UNSPEC,
                out: Some(out),
                free: Vec::new(),
                csum_fields,
                sums,
            };
        }
        out[ttl_off] -= 1;
        Prediction {
            action: REDIRECT,
            out: Some(out),
            free: vec![(0, 12)],
            csum_fields,
            sums,
        }
    }
}

/// Lowers an MSS option in the first option slot to what `mtu` allows.
fn clamp(out: &mut [u8], h: &Hdr, mtu: u32) {
    if mtu < 576 || h.l4 > 512 || out.len() < h.l4 + 24 {
        return;
    }
    if out[h.l4 + 12] >> 4 < 6 || out[h.l4 + 20] != 2 || out[h.l4 + 21] != 4 {
        return;
    }
    let max = mtu - if h.family == 4 { 20 } else { 40 } - 20;
    let mss = u32::from(u16::from_be_bytes([out[h.l4 + 22], out[h.l4 + 23]]));
    if mss > max {
        #[expect(clippy::cast_possible_truncation, reason = "max < mtu <= 65535")]
        put(out, h.l4 + 22, &(max as u16).to_be_bytes());
    }
}

/// The flow an ICMP error quotes.
#[derive(Debug, Clone, Copy)]
pub struct Quote {
    /// Quoted source and destination.
    pub src: [u8; 16],
    /// Quoted destination.
    pub dst: [u8; 16],
    /// Quoted ports.
    pub sport: u16,
    /// Quoted destination port.
    pub dport: u16,
    /// TCP or UDP.
    pub proto: u8,
    /// Offsets of the quoted IP and L4 headers.
    pub inner: usize,
    /// Offset of the quoted L4 header.
    pub inner_l4: usize,
}

/// Parses an ICMP error's quote: an error type of the packet's family quoting a TCP/UDP
/// packet of the same family whose ports are present.
pub fn quoted(f: &[u8], h: &Hdr) -> Option<Quote> {
    if h.l4 > 512 {
        return None;
    }
    let t = *f.get(h.l4)?;
    let error = if h.family == 4 {
        matches!(t, 3 | 4 | 5 | 11 | 12)
    } else {
        matches!(t, 1..=4)
    };
    if !error {
        return None;
    }
    let inner = h.l4 + 8;
    let (proto, src, dst, inner_l4) = if h.family == 4 {
        let vihl = *f.get(inner)?;
        let ihl = usize::from(vihl & 0xf) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        (
            *f.get(inner + 9)?,
            addr(f, inner + 12, 4)?,
            addr(f, inner + 16, 4)?,
            inner + ihl,
        )
    } else {
        if *f.get(inner)? >> 4 != 6 {
            return None;
        }
        (
            *f.get(inner + 6)?,
            addr(f, inner + 8, 16)?,
            addr(f, inner + 24, 16)?,
            inner + 40,
        )
    };
    if proto != TCP && proto != UDP {
        return None;
    }
    Some(Quote {
        src,
        dst,
        sport: be16(f, inner_l4)?,
        dport: be16(f, inner_l4 + 2)?,
        proto,
        inner,
        inner_l4,
    })
}
