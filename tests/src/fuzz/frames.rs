//! The packet generator: seeded, so a seed and a packet index name one frame.
//!
//! Every frame comes from one class (counted by the runner): random bytes; well-formed
//! TCP/UDP to matching and non-matching (protocol, address, port) with 0-3 VLAN tags, IPv4
//! options, IPv6 extension-header chains and every TCP flag combination; continuations of the
//! flows opened earlier (any flags, fragments first/middle/last and orphans); truncations at
//! every length; header mutations (IHL, total/payload length, version, data offset, ethertype,
//! protocol, extension lengths, single bytes); ICMP/ICMPv6 errors quoting redirected and
//! unrelated flows; replies on the service side.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::model::{self, Model};
use crate::packet::checksum;

/// splitmix64: tiny, seedable, good enough to spread packets; no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next_u64() % u64::from(hi - lo + 1)) as u32
    }
    /// True with probability `pct` percent.
    pub fn pct(&mut self, pct: u32) -> bool {
        self.next_u64() % 100 < u64::from(pct)
    }
    /// One of `xs`.
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    /// A random byte.
    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

/// Which program a frame is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prog {
    /// `viscum_ingress` on the client-facing interface.
    Ingress,
    /// `viscum_reply` on the namespace's host veth.
    Reply,
}

/// A 5-tuple, client to service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    /// 4 or 6.
    pub family: u8,
    /// 6 or 17.
    pub proto: u8,
    /// Client address.
    pub src: [u8; 16],
    /// Service address.
    pub dst: [u8; 16],
    /// Client port.
    pub sport: u16,
    /// Service port.
    pub dport: u16,
}

/// One generated frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The generator's class (for the per-class counts).
    pub class: &'static str,
    /// Which program runs it.
    pub prog: Prog,
    /// The bytes, from the Ethernet header.
    pub bytes: Vec<u8>,
    /// The device to run on (a reply's host veth); `None`: the program's default.
    pub ifindex: Option<u32>,
}

/// How the IP layer of a built frame looks.
#[derive(Debug, Clone, Default)]
struct Ip {
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
    proto: u8,
    ttl: u8,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    opts: Vec<u8>,
    /// IPv6 extension headers before the upper layer: (type, body without the next-header
    /// byte); a fragment header's body is built from `frag`.
    exts: Vec<(u8, Vec<u8>)>,
    /// (more fragments, offset in 8-byte units, id); `None` for a whole datagram (IPv6: no
    /// fragment header unless one is in `exts`).
    frag: Option<(bool, u16, u32)>,
    /// VLAN TPIDs, outermost first.
    vlans: Vec<u16>,
}

/// Offsets of a built frame.
#[derive(Debug, Clone, Copy)]
struct Offs {
    l3: usize,
    l4: usize,
}

fn a4(a: Ipv4Addr) -> [u8; 16] {
    let mut x = [0u8; 16];
    x[..4].copy_from_slice(&a.octets());
    x
}

fn a6(a: Ipv6Addr) -> [u8; 16] {
    a.octets()
}

/// Builds the frame: Ethernet, tags, IP (+ options / extension headers), `l4` (with its
/// checksum field filled in for TCP/UDP/ICMP at `csum_at` when given, over the pseudo-header
/// as its protocol needs).
fn build(ip: &Ip, l4: &[u8], csum_at: Option<usize>) -> (Vec<u8>, Offs) {
    let mut f = Vec::with_capacity(128 + l4.len());
    f.extend_from_slice(&crate::packet::EDGE_MAC);
    f.extend_from_slice(&crate::packet::CLIENT_MAC);
    for (i, tpid) in ip.vlans.iter().enumerate() {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(100 + i as u16).to_be_bytes());
    }
    f.extend_from_slice(&(if ip.family == 4 { 0x0800u16 } else { 0x86dd }).to_be_bytes());
    let l3 = f.len();
    let mut l4b = l4.to_vec();
    if ip.family == 4 {
        let ihl = 20 + ip.opts.len();
        let tot = ihl + l4.len();
        let (mf, off, id) = ip.frag.unwrap_or((false, 0, 0));
        let fo = (u16::from(mf) << 13) | (off & 0x1fff);
        let mut h = vec![0x40 | (ihl / 4) as u8, 0];
        h.extend_from_slice(&(tot as u16).to_be_bytes());
        h.extend_from_slice(&(id as u16).to_be_bytes());
        h.extend_from_slice(&fo.to_be_bytes());
        h.extend_from_slice(&[ip.ttl, ip.proto, 0, 0]);
        h.extend_from_slice(&ip.src[..4]);
        h.extend_from_slice(&ip.dst[..4]);
        h.extend_from_slice(&ip.opts);
        let c = checksum(&[&h]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        if let Some(at) = csum_at {
            let pseudo = pseudo(ip, l4.len());
            let c = if ip.proto == 1 {
                checksum(&[&l4b])
            } else {
                checksum(&[&pseudo, &l4b])
            };
            let c = if ip.proto == 17 && c == 0 { 0xffff } else { c };
            l4b[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        f.extend_from_slice(&h);
    } else {
        let mut ext = Vec::new();
        let mut types: Vec<u8> = ip.exts.iter().map(|e| e.0).collect();
        types.push(ip.proto);
        for (i, (_, body)) in ip.exts.iter().enumerate() {
            ext.push(types[i + 1]);
            ext.extend_from_slice(body);
        }
        if let Some(at) = csum_at {
            let pseudo = pseudo(ip, l4.len());
            let c = checksum(&[&pseudo, &l4b]);
            let c = if ip.proto == 17 && c == 0 { 0xffff } else { c };
            l4b[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        let plen = ext.len() + l4.len();
        f.push(0x60);
        f.extend_from_slice(&[0, 0, 0]);
        f.extend_from_slice(&(plen as u16).to_be_bytes());
        f.push(types[0]);
        f.push(ip.ttl);
        f.extend_from_slice(&ip.src);
        f.extend_from_slice(&ip.dst);
        f.extend_from_slice(&ext);
    }
    let l4off = f.len();
    f.extend_from_slice(&l4b);
    (f, Offs { l3, l4: l4off })
}

fn pseudo(ip: &Ip, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    if ip.family == 4 {
        p.extend_from_slice(&ip.src[..4]);
        p.extend_from_slice(&ip.dst[..4]);
        p.extend_from_slice(&[0, ip.proto]);
        p.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        p.extend_from_slice(&ip.src);
        p.extend_from_slice(&ip.dst);
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, ip.proto]);
    }
    p
}

fn tcp(sport: u16, dport: u16, flags: u8, mss: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let opts: Vec<u8> = match mss {
        Some(m) => {
            let b = m.to_be_bytes();
            vec![2, 4, b[0], b[1]]
        }
        None => Vec::new(),
    };
    let doff = (20 + opts.len()) / 4;
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.push((doff as u8) << 4);
    t.push(flags);
    t.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(&opts);
    t.extend_from_slice(payload);
    t
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// The generator: its random source and the flows it opened this epoch.
#[derive(Debug)]
pub struct Gen {
    rng: Rng,
    /// Flows opened (or tried) this epoch, for continuations, errors and replies.
    flows: Vec<Tuple>,
    /// Fragmented datagrams started this epoch: (tuple, id, ip template).
    frags: Vec<(Tuple, u32)>,
}

const SERVICES_V4: [[u8; 4]; 9] = [
    [203, 0, 113, 10],
    [203, 0, 113, 11],
    [203, 0, 113, 12],
    [203, 0, 113, 13],
    [203, 0, 113, 14],
    [203, 0, 113, 20],
    [203, 0, 113, 70],
    [203, 0, 113, 200],
    [198, 51, 100, 1],
];

const PORTS: [u16; 22] = [
    80, 53, 443, 22, 20, 30, 19, 31, 400, 450, 500, 401, 7999, 8000, 8050, 8099, 8100, 5000, 5010,
    0, 0x5000, 0xbb01,
];

impl Gen {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Gen {
        Gen {
            rng: Rng::new(seed),
            flows: Vec::new(),
            frags: Vec::new(),
        }
    }

    /// Forgets the epoch's flows (the runner clears the tables at the same time).
    pub fn clear(&mut self) {
        self.flows.clear();
        self.frags.clear();
    }

    fn service(&mut self, family: u8) -> [u8; 16] {
        let r = &mut self.rng;
        if family == 4 {
            let mut a = r.pick(&SERVICES_V4);
            if r.pct(30) {
                a[3] = r.byte();
            }
            a4(Ipv4Addr::from(a))
        } else {
            let mut a = r
                .pick(&[
                    Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0x10),
                    Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0x13),
                    Ipv6Addr::new(0x2001, 0xdb8, 0xe, 1, 0, 0, 0, 0x99),
                    Ipv6Addr::new(0x2001, 0xdb8, 0xe, 2, 0, 0, 0, 0x22),
                    Ipv6Addr::new(0x2001, 0xdb8, 0xe, 3, 0, 0, 0, 1),
                ])
                .octets();
            if r.pct(20) {
                a[15] = r.byte();
            }
            if r.pct(5) {
                a[7] = r.byte();
            }
            a
        }
    }

    fn client(&mut self, family: u8) -> [u8; 16] {
        let r = &mut self.rng;
        if family == 4 {
            // Never the network, the edge's own or the broadcast address (see the model's
            // `routable`).
            let last = if r.pct(40) {
                r.range(2, 15) as u8
            } else {
                r.range(2, 254) as u8
            };
            if r.pct(90) {
                a4(Ipv4Addr::new(192, 0, 2, last))
            } else {
                a4(Ipv4Addr::new(r.byte(), r.byte(), r.byte(), last))
            }
        } else {
            let sub = if r.pct(80) {
                r.range(0, 15) as u16
            } else {
                r.range(16, 0xffff) as u16
            };
            let mut a = Ipv6Addr::new(0x2001, 0xdb8, 0xc, sub, 0, 0, 0, 0).octets();
            a[15] = r.range(2, 255) as u8;
            a[14] = r.byte();
            a
        }
    }

    fn port(&mut self) -> u16 {
        if self.rng.pct(85) {
            self.rng.pick(&PORTS)
        } else {
            self.rng.next_u64() as u16
        }
    }

    fn tuple(&mut self) -> Tuple {
        let family = if self.rng.pct(60) { 4 } else { 6 };
        let proto = if self.rng.pct(70) { 6 } else { 17 };
        Tuple {
            family,
            proto,
            src: self.client(family),
            dst: self.service(family),
            sport: self.rng.range(1024, 65535) as u16,
            dport: self.port(),
        }
    }

    fn ip_of(&mut self, t: &Tuple) -> Ip {
        let r = &mut self.rng;
        let vlans = match r.below(10) {
            0..=5 => Vec::new(),
            6 | 7 => vec![r.pick(&[0x8100, 0x88a8])],
            8 => vec![0x88a8, 0x8100],
            _ => vec![0x8100, 0x8100, 0x8100],
        };
        let mut ip = Ip {
            family: t.family,
            src: t.src,
            dst: t.dst,
            proto: t.proto,
            ttl: if r.pct(5) { r.range(0, 2) as u8 } else { 64 },
            vlans,
            ..Ip::default()
        };
        if t.family == 4 {
            if r.pct(15) {
                // NOPs and an end-of-list: valid options of random length.
                let n = r.range(1, 10) as usize * 4;
                ip.opts = vec![1; n];
                ip.opts[n - 1] = 0;
            }
        } else if r.pct(25) {
            for _ in 0..r.range(1, 5) {
                let ty = r.pick(&[0u8, 43, 60, 60, 51, 253]);
                let body = match ty {
                    // AH: payload length in 4-byte units minus 2; 12 bytes + ICV.
                    51 => vec![1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
                    _ => {
                        let units = r.range(0, 2) as usize;
                        let mut b = vec![units as u8];
                        b.resize(7 + units * 8, 0);
                        if ty == 0 || ty == 60 {
                            // PadN filling the header.
                            b[1] = 1;
                            b[2] = (4 + units * 8) as u8;
                        }
                        b
                    }
                };
                ip.exts.push((ty, body));
            }
        }
        ip
    }

    /// Builds `t` with `flags` (TCP), payload, IP shape from `ip`; returns the frame and its
    /// offsets.
    fn l4_frame(&mut self, t: &Tuple, ip: &Ip, flags: u8) -> (Vec<u8>, Offs) {
        let plen = if self.rng.pct(50) {
            0
        } else {
            self.rng.range(1, 64) as usize
        };
        let payload = self.rng.bytes(plen);
        if t.proto == 6 {
            let mss = if self.rng.pct(50) {
                Some(self.rng.pick(&[536, 1220, 1400, 1460, 1500, 8960, 65495]))
            } else {
                None
            };
            build(ip, &tcp(t.sport, t.dport, flags, mss, &payload), Some(16))
        } else if self.rng.pct(10) && t.family == 4 {
            // An IPv4 UDP datagram without checksum (0: none).
            build(ip, &udp(t.sport, t.dport, &payload), None)
        } else {
            build(ip, &udp(t.sport, t.dport, &payload), Some(6))
        }
    }

    fn flags(&mut self) -> u8 {
        match self.rng.below(4) {
            0 => 0x02,
            1 => 0x10,
            _ => self.rng.byte(),
        }
    }

    /// The next frame; `model` supplies the entries (for replies) and nothing else.
    pub fn next(&mut self, model: &Model) -> Frame {
        match self.rng.below(100) {
            0..=4 => self.random_bytes(),
            5..=29 => self.new_flow(),
            30..=44 => self.continuation(),
            45..=54 => self.fragment(),
            55..=69 => self.truncated(),
            70..=81 => self.mutated(),
            82..=87 => self.icmp(),
            88 | 89 => self.ext_len_255(),
            _ => self.reply(model),
        }
    }

    fn random_bytes(&mut self) -> Frame {
        let n = self.rng.range(14, 200) as usize;
        let mut b = self.rng.bytes(n);
        if self.rng.pct(60) {
            let (et, v) = self.rng.pick(&[(0x0800u16, 0x45u8), (0x86dd, 0x60)]);
            b[12..14].copy_from_slice(&et.to_be_bytes());
            if n > 14 {
                b[14] = (b[14] & 0x0f) | (v & 0xf0);
            }
        }
        Frame {
            class: "random-bytes",
            prog: Prog::Ingress,
            bytes: b,
            ifindex: None,
        }
    }

    fn remember(&mut self, t: Tuple) {
        if self.flows.len() >= 512 {
            let i = self.rng.below(self.flows.len());
            self.flows[i] = t;
        } else {
            self.flows.push(t);
        }
    }

    fn new_flow(&mut self) -> Frame {
        let t = self.tuple();
        let ip = self.ip_of(&t);
        let flags = if self.rng.pct(70) { 0x02 } else { self.flags() };
        let (b, _) = self.l4_frame(&t, &ip, flags);
        self.remember(t);
        Frame {
            class: "new-flow",
            prog: Prog::Ingress,
            bytes: b,
            ifindex: None,
        }
    }

    fn known(&mut self) -> Tuple {
        if self.flows.is_empty() {
            let t = self.tuple();
            self.remember(t);
        }
        self.flows[self.rng.below(self.flows.len())]
    }

    fn continuation(&mut self) -> Frame {
        let t = self.known();
        let ip = self.ip_of(&t);
        // Every flag combination over the run, with the common ones more often.
        let flags = match self.rng.below(6) {
            0 => 0x10,
            1 => 0x18,
            2 => 0x11,
            3 => 0x04,
            _ => self.rng.byte(),
        };
        let (b, _) = self.l4_frame(&t, &ip, flags);
        Frame {
            class: "continuation",
            prog: Prog::Ingress,
            bytes: b,
            ifindex: None,
        }
    }

    /// First, middle and last fragments; later ones of started datagrams or of unknown ones.
    fn fragment(&mut self) -> Frame {
        let later = !self.frags.is_empty() && self.rng.pct(60);
        let (t, id, class) = if later {
            let (t, id) = self.frags[self.rng.below(self.frags.len())];
            (t, id, "fragment-later")
        } else if self.rng.pct(20) {
            let t = self.tuple();
            (t, self.rng.next_u64() as u32, "fragment-orphan")
        } else {
            let t = if self.rng.pct(50) {
                self.known()
            } else {
                self.tuple()
            };
            let id = self.rng.next_u64() as u32 & if t.family == 4 { 0xffff } else { u32::MAX };
            (t, id, "fragment-first")
        };
        let mut ip = self.ip_of(&t);
        let first = class == "fragment-first";
        let mf = first || self.rng.pct(50);
        let off = if first {
            0
        } else {
            self.rng.range(1, 200) as u16
        };
        if t.family == 4 {
            ip.frag = Some((mf, off, id));
        } else {
            let b = (off << 3) | u16::from(mf);
            let mut body = vec![0];
            body.extend_from_slice(&b.to_be_bytes());
            body.extend_from_slice(&id.to_be_bytes());
            let at = if ip.exts.is_empty() {
                0
            } else {
                self.rng.below(ip.exts.len() + 1)
            };
            ip.exts.insert(at, (44, body));
        }
        let b = if first {
            let flags = if self.rng.pct(50) { 0x02 } else { self.flags() };
            let (b, _) = self.l4_frame(&t, &ip, flags);
            self.frags.push((t, id));
            if self.frags.len() > 256 {
                self.frags.remove(0);
            }
            b
        } else {
            let n = self.rng.range(1, 64) as usize;
            let payload = self.rng.bytes(n);
            build(&ip, &payload, None).0
        };
        Frame {
            class,
            prog: Prog::Ingress,
            bytes: b,
            ifindex: None,
        }
    }

    fn valid_any(&mut self) -> (Vec<u8>, Offs, Tuple) {
        let t = if self.rng.pct(50) {
            self.known()
        } else {
            self.tuple()
        };
        let ip = self.ip_of(&t);
        let flags = self.flags();
        let (b, o) = self.l4_frame(&t, &ip, flags);
        (b, o, t)
    }

    /// Every truncation length of every header (uniform over the frame).
    fn truncated(&mut self) -> Frame {
        let (mut b, o, _) = if self.rng.pct(30) {
            let f = self.icmp_frame();
            (f.0, f.1, self.known())
        } else {
            self.valid_any()
        };
        // Bias towards the header boundaries, where the interesting lengths are.
        let n = if self.rng.pct(50) {
            let lo = o.l4.saturating_sub(4).max(14);
            self.rng.range(lo as u32, (o.l4 + 24).min(b.len()) as u32) as usize
        } else {
            self.rng.range(14, b.len() as u32) as usize
        };
        b.truncate(n.max(14));
        Frame {
            class: "truncated",
            prog: Prog::Ingress,
            bytes: b,
            ifindex: None,
        }
    }

    fn mutated(&mut self) -> Frame {
        let (mut b, o, t) = self.valid_any();
        let l3 = o.l3;
        let v4 = t.family == 4;
        let class = match self.rng.below(11) {
            0 if v4 => {
                b[l3] = 0x40 | (self.rng.byte() & 0xf);
                "bad-ihl"
            }
            1 if v4 => {
                let any = self.rng.next_u64() as u16;
                let tot = self.rng.pick(&[
                    0u16,
                    19,
                    20,
                    27,
                    (o.l4 - l3) as u16,
                    (b.len() - l3 + 1) as u16,
                    0xffff,
                    any,
                ]);
                b[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
                "bad-total-length"
            }
            1 => {
                let pl = self
                    .rng
                    .pick(&[0u16, 1, 8, (b.len() - l3 - 40 + 1) as u16, 0xffff]);
                b[l3 + 4..l3 + 6].copy_from_slice(&pl.to_be_bytes());
                "bad-payload-length"
            }
            2 => {
                b[l3] = (self.rng.byte() & 0xf0) | (b[l3] & 0x0f);
                "bad-version"
            }
            3 if t.proto == 6 => {
                b[o.l4 + 12] = self.rng.byte() & 0xf0;
                "bad-data-offset"
            }
            4 => {
                let et = self
                    .rng
                    .pick(&[0x0800u16, 0x86dd, 0x8100, 0x88a8, 0x0806, 0x8847]);
                b[l3 - 2..l3].copy_from_slice(&et.to_be_bytes());
                "bad-ethertype"
            }
            5 => {
                let p = self
                    .rng
                    .pick(&[6u8, 17, 1, 58, 0, 43, 44, 51, 60, 132, 255]);
                if v4 {
                    b[l3 + 9] = p;
                } else {
                    b[l3 + 6] = p;
                }
                "bad-protocol"
            }
            7 => {
                let at = self.rng.below(b.len());
                b[at] = self.rng.byte();
                "byte-flip"
            }
            8 => {
                let n = self.rng.range(1, 64) as usize;
                let g = self.rng.bytes(n);
                b.extend_from_slice(&g);
                "trailing-garbage"
            }
            9 => {
                // Zero-length L4: the IP header (and its extensions) only.
                b.truncate(o.l4);
                "zero-length-l4"
            }
            _ => {
                let at = self.rng.range(l3 as u32, b.len() as u32 - 1) as usize;
                b[at] ^= 1 << self.rng.below(8);
                "bit-flip"
            }
        };
        Frame {
            class,
            prog: Prog::Ingress,
            bytes: b,
            ifindex: None,
        }
    }

    /// An IPv6 hop-by-hop header with length byte 255 ((255 + 1) * 8 = 2048 bytes) in front of
    /// TCP/UDP, whose first bytes after the length hold the real destination port or a matched
    /// one (80, 53): read as ports where the header stands, they match. Half of them carry the
    /// whole 2048 bytes (with a SYN where a TCP header read there has its flags).
    fn ext_len_255(&mut self) -> Frame {
        let mut t = self.tuple();
        t.family = 6;
        t.src = self.client(6);
        (t.dst, t.dport) = if self.rng.pct(50) {
            t.proto = self.rng.pick(&[6, 17]);
            let svc = a6(Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0x10));
            (svc, if t.proto == 6 { 80 } else { 53 })
        } else {
            (self.service(6), self.port())
        };
        let mut ip = self.ip_of(&t);
        ip.exts.clear();
        ip.vlans.clear();
        let flags = self.flags();
        let (b, o) = self.l4_frame(&t, &ip, flags);
        let l3 = o.l3;
        let mut nb = b[..l3 + 40].to_vec();
        let next = nb[l3 + 6];
        nb[l3 + 6] = 0;
        nb.extend_from_slice(&[next, 255]);
        // The real destination port, or a matched one while the real port is anything.
        let fake = if self.rng.pct(50) {
            t.dport
        } else {
            self.rng.pick(&[80u16, 53])
        };
        nb.extend_from_slice(&fake.to_be_bytes());
        if self.rng.pct(50) {
            nb.resize(nb.len() + 2044, 0);
            nb[l3 + 40 + 13] = 0x02;
        }
        nb.extend_from_slice(&b[o.l4..]);
        let pl = (nb.len() - l3 - 40) as u16;
        nb[l3 + 4..l3 + 6].copy_from_slice(&pl.to_be_bytes());
        Frame {
            class: "ext-len-255",
            prog: Prog::Ingress,
            bytes: nb,
            ifindex: None,
        }
    }

    /// An ICMP error the namespace's stack sends about a client's packet of a flow opened
    /// earlier (port unreachable, packet too big...), from the address the entry translates to
    /// (or the service address), quoting the packet as the namespace received it; or about an
    /// unknown flow.
    fn icmp_from_namespace(&mut self, model: &Model) -> Frame {
        let (t, ns_addr, local_port, ifindex, class) = self.reply_identity(model);
        let v4 = t.family == 4;
        let qip = Ip {
            family: t.family,
            src: t.src,
            dst: ns_addr,
            proto: t.proto,
            ttl: 63,
            ..Ip::default()
        };
        let ql4 = if t.proto == 6 {
            tcp(t.sport, local_port, 0x02, Some(1460), &[])
        } else {
            udp(t.sport, local_port, &[9, 9, 9, 9])
        };
        let (qf, qo) = build(&qip, &ql4, Some(if t.proto == 6 { 16 } else { 6 }));
        let mut quote = qf[qo.l3..].to_vec();
        if self.rng.pct(20) {
            let n = self.rng.range(0, quote.len() as u32) as usize;
            quote.truncate(n);
        }
        let ty = if v4 {
            self.rng.pick(&[3u8, 3, 11, 12, 0])
        } else {
            self.rng.pick(&[1u8, 1, 2, 3, 4, 129])
        };
        let mut msg = vec![ty, 3, 0, 0, 0, 0, 0x05, 0x00];
        msg.extend_from_slice(&quote);
        let ip = Ip {
            family: t.family,
            src: ns_addr,
            dst: t.src,
            proto: if v4 { 1 } else { 58 },
            ttl: if self.rng.pct(10) {
                self.rng.range(0, 2) as u8
            } else {
                64
            },
            ..Ip::default()
        };
        let (b, _) = build(&ip, &msg, Some(2));
        Frame {
            class: if class == "reply-known" {
                "icmp-from-namespace"
            } else {
                "icmp-from-ns-unknown"
            },
            prog: Prog::Reply,
            bytes: b,
            ifindex: Some(ifindex),
        }
    }

    /// A flow opened earlier and how its namespace sees it: (flow, the namespace's address
    /// for it, its local port, the namespace's host veth, class).
    fn reply_identity(&mut self, model: &Model) -> (Tuple, [u8; 16], u16, u32, &'static str) {
        let t = self.known();
        let h = model::Hdr {
            family: t.family,
            proto: t.proto,
            src: t.src,
            dst: t.dst,
            sport: t.sport,
            dport: t.dport,
            flags: 0,
            frag: model::Frag::None,
            frag_id: 0,
            l3: 0,
            l4: 0,
            vlan: false,
        };
        match model.find(&h).map(|e| e.target) {
            Some(tg) => match tg.nat {
                Some((a, p)) => (
                    t,
                    a,
                    if p != 0 { p } else { t.dport },
                    tg.ifindex,
                    "reply-known",
                ),
                None => (t, t.dst, t.dport, tg.ifindex, "reply-known"),
            },
            None => (t, t.dst, t.dport, model.reply_ifindex, "reply-unknown"),
        }
    }

    /// An ICMP error from the network: quoting a flow opened earlier (as the edge copy sent
    /// it: from the service to the client) or an unrelated one; to the service address or
    /// elsewhere; sometimes with the other family's ICMP protocol number or a non-error type.
    fn icmp_frame(&mut self) -> (Vec<u8>, Offs, &'static str) {
        let (t, class) = if self.rng.pct(75) {
            (self.known(), "icmp-quoting-flow")
        } else {
            (self.tuple(), "icmp-unrelated")
        };
        let v4 = t.family == 4;
        // The quoted packet: service -> client.
        let qt = Tuple {
            src: t.dst,
            dst: t.src,
            sport: t.dport,
            dport: t.sport,
            ..t
        };
        let qip = Ip {
            family: t.family,
            src: qt.src,
            dst: qt.dst,
            proto: t.proto,
            ttl: 1,
            ..Ip::default()
        };
        let ql4 = if t.proto == 6 {
            tcp(qt.sport, qt.dport, 0x10, None, &[])
        } else {
            udp(qt.sport, qt.dport, &[1, 2, 3, 4])
        };
        let (qf, qo) = build(&qip, &ql4, Some(if t.proto == 6 { 16 } else { 6 }));
        let mut quote = qf[qo.l3..].to_vec();
        if self.rng.pct(30) {
            let n = self.rng.range(0, quote.len() as u32) as usize;
            quote.truncate(n);
        }
        let ty = if v4 {
            self.rng.pick(&[3u8, 3, 11, 12, 4, 5, 0, 8])
        } else {
            self.rng.pick(&[1u8, 2, 2, 3, 4, 128, 135])
        };
        let mut msg = vec![ty, if v4 { 4 } else { 0 }, 0, 0, 0, 0, 0x05, 0xdc];
        msg.extend_from_slice(&quote);
        let router = if v4 {
            a4(Ipv4Addr::new(192, 0, 2, 254))
        } else {
            a6(Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0xfe))
        };
        let outer_dst = if self.rng.pct(80) {
            t.dst
        } else {
            self.service(t.family)
        };
        let mut ip = Ip {
            family: t.family,
            src: router,
            dst: outer_dst,
            proto: if v4 { 1 } else { 58 },
            ttl: 64,
            vlans: if self.rng.pct(20) {
                vec![0x8100]
            } else {
                Vec::new()
            },
            ..Ip::default()
        };
        let mut class = class;
        if self.rng.pct(10) {
            ip.proto = if v4 { 58 } else { 1 };
            class = "icmp-other-family";
        }
        let (b, o) = build(&ip, &msg, Some(2));
        (b, o, class)
    }

    fn icmp(&mut self) -> Frame {
        let (bytes, _, class) = self.icmp_frame();
        Frame {
            class,
            prog: Prog::Ingress,
            bytes,
            ifindex: None,
        }
    }

    /// A reply leaving the namespace: of a flow opened earlier (from the address and port the
    /// entry translates to), or unknown.
    fn reply(&mut self, model: &Model) -> Frame {
        if self.rng.pct(25) {
            return self.icmp_from_namespace(model);
        }
        let (t, src, sport, ifindex, class) = self.reply_identity(model);
        let rt = Tuple {
            src,
            dst: t.src,
            sport,
            dport: t.sport,
            ..t
        };
        let mut ip = self.ip_of(&rt);
        ip.vlans.clear();
        if self.rng.pct(10) {
            ip.ttl = self.rng.range(0, 2) as u8;
        }
        let flags = match self.rng.below(5) {
            0 => 0x12,
            1 => 0x10,
            2 => 0x11,
            3 => 0x14,
            _ => self.rng.byte(),
        };
        let (mut b, o) = self.l4_frame(&rt, &ip, flags);
        let mut class = class;
        if self.rng.pct(15) {
            let n = self.rng.range(o.l3 as u32 + 20, b.len() as u32) as usize;
            b.truncate(n);
            class = "reply-truncated";
        }
        Frame {
            class,
            prog: Prog::Reply,
            bytes: b,
            ifindex: Some(ifindex),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::model::{Kd, Parsed, parse};

    fn v6_syn() -> (Vec<u8>, Offs) {
        let ip = Ip {
            family: 6,
            src: a6(Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 5)),
            dst: a6(Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0x10)),
            proto: 6,
            ttl: 64,
            ..Ip::default()
        };
        build(&ip, &tcp(40000, 80, 0x02, None, &[]), Some(16))
    }

    #[test]
    fn model_parses_built_frames() {
        let (f, o) = v6_syn();
        match parse(&f, Kd::NONE) {
            Parsed::L4(h) => {
                assert_eq!((h.sport, h.dport, h.flags, h.l4), (40000, 80, 0x02, o.l4));
            }
            other => panic!("{other:?}"),
        }
        // Every truncation inside the headers is malformed under the documented semantics.
        for n in 14..f.len() {
            assert!(
                matches!(parse(&f[..n], Kd::NONE), Parsed::Malformed),
                "length {n}"
            );
        }
    }

    #[test]
    fn ext_len_255_reads_ports_from_the_extension_header() {
        let (b, o) = v6_syn();
        let l3 = o.l3;
        let mut nb = b[..l3 + 40].to_vec();
        nb[l3 + 6] = 0;
        nb.extend_from_slice(&[6, 255]);
        nb.extend_from_slice(&b[o.l4 + 2..o.l4 + 4]);
        nb.resize(nb.len() + 2044, 0);
        nb[l3 + 40 + 13] = 0x02;
        nb.extend_from_slice(&b[o.l4..]);
        let pl = (nb.len() - l3 - 40) as u16;
        nb[l3 + 4..l3 + 6].copy_from_slice(&pl.to_be_bytes());
        // The defect as it was (the datapath fixed it; the switch stays for the record).
        let kd4 = Kd {
            ip_len: true,
            l4_short: true,
            icmp_family: true,
            ext_len_255: true,
            icmp_outer_dst: true,
        };
        match parse(&nb, kd4) {
            Parsed::L4(h) => assert_eq!((h.sport, h.dport, h.flags), (0x06ff, 80, 0x02)),
            other => panic!("{other:?}"),
        }
        match parse(&nb, Kd::NONE) {
            Parsed::L4(h) => assert_eq!((h.sport, h.dport), (40000, 80)),
            other => panic!("{other:?}"),
        }
    }
}
