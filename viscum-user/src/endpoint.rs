//! Redirect matches as users write them and their encoding for the classifier.
//!
//! ```text
//! tcp://198.51.100.7:80                 one address, one port (the exact-match fast path)
//! udp://[2001:db8::7]:53                IPv6 addresses always in brackets
//! tcp://198.51.100.7                    every port of the address
//! tcp://203.0.113.0/24:443              a destination prefix ([2001:db8::]/64 for IPv6)
//! tcp://203.0.113.7:8000-8099           a port range
//! tcp://203.0.113.7:443?from=192.0.2.0/24   only for clients in a source prefix
//! ```

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use viscum_common::{
    FAMILY_V4, FAMILY_V6, PREFIX_KEY_FIXED_BITS, PROTO_TCP, PROTO_UDP, PortRule, PrefixData,
    ServiceKey,
};

/// Transport protocols the classifier matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP, IP protocol number 6 (RFC 9293).
    Tcp,
    /// UDP, IP protocol number 17 (RFC 768).
    Udp,
}

impl Proto {
    /// IANA protocol number, as found in the IP header.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }

    /// The protocol of IANA number `n`, if Viscum handles it.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            PROTO_TCP => Some(Proto::Tcp),
            PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// Why a match string was rejected. Each message quotes the offending part.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    /// No `PROTO://` prefix; holds the whole input.
    #[error("'{0}' has no protocol: write it as tcp://ADDR[:PORT] or udp://ADDR[:PORT]")]
    MissingScheme(String),
    /// The scheme is neither `tcp` nor `udp` (case-insensitive); holds the scheme.
    #[error("unknown protocol '{0}': expected tcp or udp")]
    UnknownProto(String),
    /// The host part is not an address of the expected family (IPv6 only inside
    /// brackets, IPv4 only outside), or a bracket is unbalanced; holds that part.
    #[error("'{0}' is not an IPv4 or IPv6 address")]
    BadAddress(String),
    /// The port is not a decimal number in 1-65535; holds the port text.
    #[error("port '{0}' is not a number between 1 and 65535")]
    BadPort(String),
    /// Port 0 was given; leaving the port out means every port.
    #[error("port 0 is not a valid port: leave the port out to match every port")]
    PortZero,
    /// The destination is multicast, loopback, IPv4 limited broadcast
    /// (255.255.255.255) or the unspecified address on its own: no service owns it.
    #[error(
        "'{0}' cannot be redirected: unspecified, multicast, broadcast and loopback addresses are not services"
    )]
    UnusableAddress(IpAddr),
    /// The prefix length after `/` is not 0-32 (IPv4) or 0-128 (IPv6); holds it.
    #[error("prefix length '{0}' is not valid (0-32 for IPv4, 0-128 for IPv6)")]
    BadPrefix(String),
    /// `ADDR/LEN` has bits set past the prefix length (`10.0.0.1/8`).
    #[error("{addr}/{len} has host bits set: write the network address ({net}/{len})")]
    HostBits {
        /// The address as written.
        addr: IpAddr,
        /// The prefix length as written, in bits.
        len: u8,
        /// The network address: `addr` with the host bits cleared.
        net: IpAddr,
    },
    /// A port range is not `LOW-HIGH` with 1 <= LOW < HIGH <= 65535; holds it.
    #[error("port range '{0}' is not LOW-HIGH with 1 <= LOW < HIGH <= 65535")]
    BadRange(String),
    /// The text after `?` is not `from=PREFIX`; holds it.
    #[error("'{0}' is not a source restriction: write ?from=PREFIX (e.g. ?from=192.0.2.0/24)")]
    BadQuery(String),
    /// The `?from=` prefix and the destination are of different IP families.
    #[error("source prefix {src} and destination {dst} are of different families")]
    MixedFamilies {
        /// The source prefix's network address.
        src: IpAddr,
        /// The destination address.
        dst: IpAddr,
    },
    /// An IPv6 address without brackets: `2001:db8::7:443` would be ambiguous
    /// (it is itself an address); holds the text after `PROTO://`.
    #[error(
        "IPv6 addresses must be bracketed: '{0}' (write tcp://[2001:db8::7]:443, or tcp://[2001:db8::7] for every port)"
    )]
    Unbracketed(String),
}

/// One redirect match: protocol, destination (address or prefix), ports,
/// and optionally the clients it applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The transport protocol matched.
    pub proto: Proto,
    /// The address, or the network address of a prefix.
    pub addr: IpAddr,
    /// Prefix length in bits: 32 / 128 for a single address.
    pub prefix_len: u8,
    /// Destination port, host byte order ([`Endpoint::key`] converts). `None` matches every port;
    /// with `port_end`, the first port of a range.
    pub port: Option<u16>,
    /// Last port of a range (inclusive), host byte order; always above `port`.
    pub port_end: Option<u16>,
    /// Only clients in this source prefix: (network address, length in bits), of the
    /// destination's family.
    pub source: Option<(IpAddr, u8)>,
}

fn max_prefix(a: IpAddr) -> u8 {
    if a.is_ipv4() { 32 } else { 128 }
}

fn mask(a: IpAddr, len: u8) -> IpAddr {
    match a {
        IpAddr::V4(v) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(v) & m))
        }
        IpAddr::V6(v) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(v) & m))
        }
    }
}

/// Parses `ADDR/LEN` (IPv6 without brackets) into (network address, length in bits); with
/// no `/LEN`, a single address.
///
/// # Errors
/// [`EndpointError::BadAddress`], [`EndpointError::BadPrefix`] (length above 32 / 128
/// or not a number) or [`EndpointError::HostBits`] (bits set past the length).
pub fn parse_prefix(s: &str) -> Result<(IpAddr, u8), EndpointError> {
    let (a, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = a
        .parse()
        .map_err(|_| EndpointError::BadAddress(a.to_owned()))?;
    let len = match len {
        None => max_prefix(addr),
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max_prefix(addr) => n,
            _ => return Err(EndpointError::BadPrefix(l.to_owned())),
        },
    };
    let net = mask(addr, len);
    if net != addr {
        return Err(EndpointError::HostBits { addr, len, net });
    }
    Ok((addr, len))
}

fn fmt_prefix(a: IpAddr, len: u8) -> String {
    if len == max_prefix(a) {
        a.to_string()
    } else {
        format!("{a}/{len}")
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| EndpointError::MissingScheme(s.to_owned()))?;
        let proto = match scheme.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(EndpointError::UnknownProto(scheme.to_owned())),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        // Host part (with an optional /LEN) and the port part after it.
        let (host, prefix_len, ports) = if let Some(inner) = rest.strip_prefix('[') {
            // [V6], [V6]:P, [V6/LEN]:P, [V6]/LEN:P
            let (inside, after) = inner
                .split_once(']')
                .ok_or_else(|| EndpointError::BadAddress(rest.to_owned()))?;
            let (inside, after) = match after.strip_prefix('/') {
                Some(a) => {
                    let (len, ports) = match a.split_once(':') {
                        Some((l, p)) => (l, Some(p)),
                        None => (a, None),
                    };
                    (
                        format!("{inside}/{len}"),
                        ports.map(|p| format!(":{p}")).unwrap_or_default(),
                    )
                }
                None => (inside.to_owned(), after.to_owned()),
            };
            let ports = match after.as_str() {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| EndpointError::BadAddress(rest.to_owned()))?
                        .to_owned(),
                ),
            };
            let (addr, len) = parse_prefix(&inside)?;
            if addr.is_ipv4() {
                return Err(EndpointError::BadAddress(inside));
            }
            (addr, len, ports)
        } else if rest.matches(':').count() > 1 {
            // Always brackets for IPv6: `2001:db8::7:443` is itself a valid
            // address, so without them a port could silently become part of it.
            return Err(EndpointError::Unbracketed(rest.to_owned()));
        } else {
            let (h, p) = match rest.split_once(':') {
                Some((h, p)) => (h, Some(p.to_owned())),
                None => (rest, None),
            };
            let (addr, len) = parse_prefix(h)?;
            if !addr.is_ipv4() {
                return Err(EndpointError::BadAddress(h.to_owned()));
            }
            (addr, len, p)
        };
        let (port, port_end) = match ports.as_deref() {
            None => (None, None),
            Some(p) if p.contains('-') && !p.starts_with('-') => {
                let (lo, hi) = p.split_once('-').unwrap_or_default();
                match (lo.parse::<u16>(), hi.parse::<u16>()) {
                    (Ok(lo), Ok(hi)) if lo >= 1 && lo < hi && !p.contains('+') => {
                        (Some(lo), Some(hi))
                    }
                    _ => return Err(EndpointError::BadRange(p.to_owned())),
                }
            }
            Some(p) => match p.parse::<u32>() {
                Ok(0) => return Err(EndpointError::PortZero),
                Ok(n) if n <= 65535 && !p.starts_with('+') => (Some(n as u16), None),
                _ => return Err(EndpointError::BadPort(p.to_owned())),
            },
        };
        let unusable = match host {
            IpAddr::V4(a) => {
                a.is_multicast()
                    || a.is_broadcast()
                    || a.is_loopback()
                    || (a.is_unspecified() && prefix_len == 32)
            }
            IpAddr::V6(a) => {
                a.is_multicast() || a.is_loopback() || (a.is_unspecified() && prefix_len == 128)
            }
        };
        if unusable {
            return Err(EndpointError::UnusableAddress(host));
        }
        let source = match query {
            None => None,
            Some(q) => {
                let v = q
                    .strip_prefix("from=")
                    .ok_or_else(|| EndpointError::BadQuery(q.to_owned()))?;
                let (src, len) = parse_prefix(v)?;
                if src.is_ipv4() != host.is_ipv4() {
                    return Err(EndpointError::MixedFamilies { src, dst: host });
                }
                Some((src, len))
            }
        };
        Ok(Endpoint {
            proto,
            addr: host,
            prefix_len,
            port,
            port_end,
            source,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match self.addr {
            IpAddr::V4(_) => fmt_prefix(self.addr, self.prefix_len),
            IpAddr::V6(a) if self.prefix_len == 128 => format!("[{a}]"),
            IpAddr::V6(a) => format!("[{a}]/{}", self.prefix_len),
        };
        write!(f, "{}://{host}", self.proto)?;
        match (self.port, self.port_end) {
            (Some(lo), Some(hi)) => write!(f, ":{lo}-{hi}")?,
            (Some(p), None) => write!(f, ":{p}")?,
            _ => {}
        }
        if let Some((src, len)) = self.source {
            write!(f, "?from={}", fmt_prefix(src, len))?;
        }
        Ok(())
    }
}

impl Endpoint {
    /// Would this match take a packet of `proto` from `client` to `dst`:`port`?
    /// The user-space twin of the classifier's decision, for counting an
    /// entry's flows.
    pub fn matches(&self, proto: Proto, dst: IpAddr, port: u16, client: IpAddr) -> bool {
        let in_prefix = |net: IpAddr, len: u8, a: IpAddr| {
            net.is_ipv4() == a.is_ipv4() && mask(a, len) == mask(net, len)
        };
        let ports = match (self.port, self.port_end) {
            (None, _) => true,
            (Some(p), None) => p == port,
            (Some(lo), Some(hi)) => (lo..=hi).contains(&port),
        };
        self.proto == proto
            && ports
            && in_prefix(self.addr, self.prefix_len, dst)
            && self
                .source
                .is_none_or(|(net, len)| in_prefix(net, len, client))
    }

    /// A single address and port for every client: the classifier's
    /// exact-match hash. Everything else is a prefix rule.
    pub fn is_exact(&self) -> bool {
        self.prefix_len == max_prefix(self.addr)
            && self.port.is_some()
            && self.port_end.is_none()
            && self.source.is_none()
    }

    /// The `VISCUM_PREFIXES` LPM trie key of a prefix rule: (length in bits, counting the
    /// [`PREFIX_KEY_FIXED_BITS`] of protocol, family and padding before the address; data).
    pub fn prefix_key(&self) -> (u32, PrefixData) {
        let k = self.key();
        (
            PREFIX_KEY_FIXED_BITS + u32::from(self.prefix_len),
            PrefixData {
                proto: k.proto,
                family: k.family,
                _pad: [0; 2],
                addr: k.addr,
            },
        )
    }

    /// The port/source part of a prefix rule (rule id left 0).
    pub fn port_rule(&self) -> PortRule {
        let (lo, hi) = match (self.port, self.port_end) {
            (Some(lo), Some(hi)) => (lo, hi),
            (Some(p), None) => (p, p),
            _ => (1, 65535),
        };
        let (src, src_prefix) = match self.source {
            Some((a, len)) => (addr_bytes(a), len),
            None => ([0; 16], 0),
        };
        let src_mask = PortRule::source_mask(src_prefix);
        PortRule {
            src: std::array::from_fn(|i| src[i] & src_mask[i]),
            src_mask,
            port_lo: lo,
            port_hi: hi,
            src_prefix,
            _pad: [0; 3],
            rule_id: 0,
        }
    }

    /// Rebuilds a prefix rule's match from its LPM key and rule.
    pub fn from_rule(prefix_len: u32, data: &PrefixData, rule: &PortRule) -> Option<Self> {
        let key = ServiceKey {
            addr: data.addr,
            port: 0,
            proto: data.proto,
            family: data.family,
        };
        let base = Endpoint::from_key(&key)?;
        let len = prefix_len.checked_sub(PREFIX_KEY_FIXED_BITS)? as u8;
        let (port, port_end) = match (rule.port_lo, rule.port_hi) {
            (1, 65535) => (None, None),
            (lo, hi) if lo == hi => (Some(lo), None),
            (lo, hi) => (Some(lo), Some(hi)),
        };
        let source = (rule.src_prefix != 0).then(|| {
            let a = match base.addr {
                IpAddr::V4(_) => IpAddr::from([rule.src[0], rule.src[1], rule.src[2], rule.src[3]]),
                IpAddr::V6(_) => IpAddr::from(rule.src),
            };
            (a, rule.src_prefix)
        });
        Some(Endpoint {
            prefix_len: len,
            port,
            port_end,
            source,
            ..base
        })
    }

    /// Specificity for ordering rules under one prefix: source-restricted
    /// first (longer source prefixes first), then narrower port ranges.
    pub fn rule_rank(rule: &PortRule) -> (u8, u32) {
        (
            128 - rule.src_prefix.min(128),
            u32::from(rule.port_hi - rule.port_lo),
        )
    }

    /// The classifier's key for this match (port in network byte order, 0 = all ports).
    pub fn key(&self) -> ServiceKey {
        let mut addr = [0u8; 16];
        let family = match self.addr {
            IpAddr::V4(a) => {
                addr[..4].copy_from_slice(&a.octets());
                FAMILY_V4
            }
            IpAddr::V6(a) => {
                addr = a.octets();
                FAMILY_V6
            }
        };
        ServiceKey {
            addr,
            port: self.port.unwrap_or(0).to_be(),
            proto: self.proto.number(),
            family,
        }
    }

    /// Decodes a key read back from the map; `None` for bytes no valid entry has.
    pub fn from_key(key: &ServiceKey) -> Option<Self> {
        let proto = Proto::from_number(key.proto)?;
        let addr = match key.family {
            FAMILY_V4 => IpAddr::V4(Ipv4Addr::new(
                key.addr[0],
                key.addr[1],
                key.addr[2],
                key.addr[3],
            )),
            FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(key.addr)),
            _ => return None,
        };
        let port = match u16::from_be(key.port) {
            0 => None,
            p => Some(p),
        };
        Some(Endpoint {
            proto,
            addr,
            prefix_len: max_prefix(addr),
            port,
            port_end: None,
            source: None,
        })
    }

    /// Prefix length of the `local` route the service namespace needs to
    /// answer as this destination (32/128 for one address, or the prefix).
    pub fn host_prefix(&self) -> u8 {
        self.prefix_len
    }
}

fn addr_bytes(a: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match a {
        IpAddr::V4(v) => out[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => out = v.octets(),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Result<Endpoint, EndpointError> {
        s.parse()
    }

    #[test]
    fn parses_ipv4_with_and_without_port() {
        let e = ep("tcp://198.51.100.7:80").unwrap();
        assert_eq!(
            (e.proto, e.addr.to_string(), e.port),
            (Proto::Tcp, "198.51.100.7".into(), Some(80))
        );
        let e = ep("UDP://198.51.100.7").unwrap();
        assert_eq!((e.proto, e.port), (Proto::Udp, None));
    }

    #[test]
    fn parses_ipv6_forms() {
        let e = ep("tcp://[2001:db8::7]:443").unwrap();
        assert_eq!(
            (e.addr.to_string(), e.port),
            ("2001:db8::7".into(), Some(443))
        );
        assert_eq!(ep("udp://[2001:db8::7]").unwrap().port, None);
        assert_eq!(
            ep("udp://2001:db8::7"),
            Err(EndpointError::Unbracketed("2001:db8::7".into()))
        );
    }

    #[test]
    fn rejects_bad_input_with_the_culprit_named() {
        assert_eq!(
            ep("198.51.100.7:80"),
            Err(EndpointError::MissingScheme("198.51.100.7:80".into()))
        );
        assert_eq!(
            ep("sctp://198.51.100.7:80"),
            Err(EndpointError::UnknownProto("sctp".into()))
        );
        assert_eq!(
            ep("tcp://198.51.100.300:80"),
            Err(EndpointError::BadAddress("198.51.100.300".into()))
        );
        assert_eq!(
            ep("tcp://198.51.100.7:70000"),
            Err(EndpointError::BadPort("70000".into()))
        );
        assert_eq!(
            ep("tcp://198.51.100.7:-1"),
            Err(EndpointError::BadPort("-1".into()))
        );
        assert_eq!(
            ep("tcp://198.51.100.7:http"),
            Err(EndpointError::BadPort("http".into()))
        );
        assert_eq!(ep("tcp://198.51.100.7:0"), Err(EndpointError::PortZero));
        assert!(matches!(
            ep("tcp://0.0.0.0:80"),
            Err(EndpointError::UnusableAddress(_))
        ));
        assert!(matches!(
            ep("tcp://[ff02::1]:80"),
            Err(EndpointError::UnusableAddress(_))
        ));
        assert!(matches!(
            ep("tcp://2001:db8::7:443"),
            Err(EndpointError::BadAddress(_) | EndpointError::Unbracketed(_))
        ));
        assert!(ep("tcp://[2001:db8::7:443").is_err());
    }

    #[test]
    fn parses_prefixes_ranges_and_sources() {
        let e = ep("tcp://203.0.113.0/24:443").unwrap();
        assert_eq!((e.prefix_len, e.port, e.is_exact()), (24, Some(443), false));
        assert_eq!(e.to_string(), "tcp://203.0.113.0/24:443");
        let e = ep("tcp://[2001:db8::]/64:443").unwrap();
        assert_eq!(
            (e.prefix_len, e.to_string()),
            (64, "tcp://[2001:db8::]/64:443".to_string())
        );
        assert_eq!(ep("tcp://[2001:db8::/64]:443").unwrap(), e);
        let e = ep("tcp://203.0.113.7:8000-8099").unwrap();
        assert_eq!((e.port, e.port_end), (Some(8000), Some(8099)));
        let r = e.port_rule();
        assert_eq!((r.port_lo, r.port_hi), (8000, 8099));
        let e = ep("udp://203.0.113.7:53?from=192.0.2.0/24").unwrap();
        assert_eq!(e.source, Some(("192.0.2.0".parse().unwrap(), 24)));
        assert_eq!(e.to_string(), "udp://203.0.113.7:53?from=192.0.2.0/24");
        assert!(ep("tcp://198.51.100.7:80").unwrap().is_exact());
        assert!(!ep("tcp://198.51.100.7").unwrap().is_exact());
        // Round trip through the rule encoding.
        for s in [
            "tcp://203.0.113.0/24:443",
            "tcp://203.0.113.7:8000-8099",
            "udp://[2001:db8::]/48?from=2001:db8:c::/64",
            "tcp://198.51.100.7",
        ] {
            let e = ep(s).unwrap();
            let (len, data) = e.prefix_key();
            assert_eq!(
                Endpoint::from_rule(len, &data, &e.port_rule()),
                Some(e),
                "{s}"
            );
        }
    }

    #[test]
    fn rejects_bad_prefixes_ranges_and_sources() {
        assert!(matches!(
            ep("tcp://203.0.113.7/24:443"),
            Err(EndpointError::HostBits { .. })
        ));
        assert_eq!(
            ep("tcp://203.0.113.0/33:443"),
            Err(EndpointError::BadPrefix("33".into()))
        );
        assert_eq!(
            ep("tcp://203.0.113.7:8099-8000"),
            Err(EndpointError::BadRange("8099-8000".into()))
        );
        assert_eq!(
            ep("tcp://203.0.113.7:0-10"),
            Err(EndpointError::BadRange("0-10".into()))
        );
        assert_eq!(
            ep("tcp://203.0.113.7:1-70000"),
            Err(EndpointError::BadRange("1-70000".into()))
        );
        assert_eq!(
            ep("tcp://203.0.113.7:80?to=x"),
            Err(EndpointError::BadQuery("to=x".into()))
        );
        assert!(matches!(
            ep("tcp://203.0.113.7:80?from=2001:db8::/32"),
            Err(EndpointError::MixedFamilies { .. })
        ));
    }

    #[test]
    fn rules_rank_most_specific_first() {
        let rank = |s: &str| Endpoint::rule_rank(&ep(s).unwrap().port_rule());
        assert!(
            rank("tcp://203.0.113.0/24:80?from=192.0.2.0/24") < rank("tcp://203.0.113.0/24:80")
        );
        assert!(rank("tcp://203.0.113.0/24:80") < rank("tcp://203.0.113.0/24:80-90"));
        assert!(rank("tcp://203.0.113.0/24:80-90") < rank("tcp://203.0.113.0/24"));
    }

    #[test]
    fn key_encoding_is_network_order_and_round_trips() {
        let e = ep("udp://198.51.100.7:5201").unwrap();
        let k = e.key();
        assert_eq!(&k.addr[..4], &[198, 51, 100, 7]);
        assert!(k.addr[4..].iter().all(|b| *b == 0));
        // The port's bytes must be what sits in the UDP header: 0x14 0x51.
        assert_eq!(k.port.to_ne_bytes(), [0x14, 0x51]);
        assert_eq!((k.proto, k.family), (PROTO_UDP, FAMILY_V4));
        assert_eq!(Endpoint::from_key(&k), Some(e));
        let all = ep("tcp://[2001:db8::7]").unwrap();
        assert_eq!(all.key().port, 0);
        assert_eq!(Endpoint::from_key(&all.key()), Some(all));
        assert_eq!(all.to_string(), "tcp://[2001:db8::7]");
    }
}
