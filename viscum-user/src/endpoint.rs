//! Redirect matches as users write them (`tcp://198.51.100.7:80`,
//! `udp://[2001:db8::7]:53`, `tcp://198.51.100.7` for every port) and their
//! encoding as the classifier's [`ServiceKey`].

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use viscum_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, ServiceKey};

/// Transport protocols the classifier matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
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

    fn from_number(n: u8) -> Option<Self> {
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
    #[error("'{0}' has no protocol: write it as tcp://ADDR[:PORT] or udp://ADDR[:PORT]")]
    MissingScheme(String),
    #[error("unknown protocol '{0}': expected tcp or udp")]
    UnknownProto(String),
    #[error("'{0}' is not an IPv4 or IPv6 address")]
    BadAddress(String),
    #[error("port '{0}' is not a number between 1 and 65535")]
    BadPort(String),
    #[error("port 0 is not a valid port: leave the port out to match every port")]
    PortZero,
    #[error("'{0}' cannot be redirected: unspecified, multicast, broadcast and loopback addresses are not services")]
    UnusableAddress(IpAddr),
    #[error("IPv6 addresses must be bracketed: '{0}' (write tcp://[2001:db8::7]:443, or tcp://[2001:db8::7] for every port)")]
    Unbracketed(String),
}

/// One redirect match: protocol, destination address and optional port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub proto: Proto,
    pub addr: IpAddr,
    /// `None` matches every port of `addr`.
    pub port: Option<u16>,
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
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (host, after) = inner
                .split_once(']')
                .ok_or_else(|| EndpointError::BadAddress(rest.to_owned()))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| EndpointError::BadAddress(rest.to_owned()))?,
                ),
            };
            let addr = host
                .parse::<Ipv6Addr>()
                .map_err(|_| EndpointError::BadAddress(host.to_owned()))?;
            (IpAddr::V6(addr), port)
        } else if rest.matches(':').count() > 1 {
            // Always brackets for IPv6: `2001:db8::7:443` is itself a valid
            // address, so without them a port could silently become part of it.
            return Err(EndpointError::Unbracketed(rest.to_owned()));
        } else {
            let (host, port) = match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            };
            let addr = host
                .parse::<Ipv4Addr>()
                .map_err(|_| EndpointError::BadAddress(host.to_owned()))?;
            (IpAddr::V4(addr), port)
        };
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u32>() {
                Ok(0) => return Err(EndpointError::PortZero),
                Ok(n) if n <= 65535 && !p.starts_with('+') => Some(n as u16),
                _ => return Err(EndpointError::BadPort(p.to_owned())),
            },
        };
        let unusable = match host {
            IpAddr::V4(a) => a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback(),
            IpAddr::V6(a) => a.is_unspecified() || a.is_multicast() || a.is_loopback(),
        };
        if unusable {
            return Err(EndpointError::UnusableAddress(host));
        }
        Ok(Endpoint { proto, addr: host, port })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.addr, self.port) {
            (IpAddr::V4(a), Some(p)) => write!(f, "{}://{a}:{p}", self.proto),
            (IpAddr::V4(a), None) => write!(f, "{}://{a}", self.proto),
            (IpAddr::V6(a), Some(p)) => write!(f, "{}://[{a}]:{p}", self.proto),
            (IpAddr::V6(a), None) => write!(f, "{}://[{a}]", self.proto),
        }
    }
}

impl Endpoint {
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
        ServiceKey { addr, port: self.port.unwrap_or(0).to_be(), proto: self.proto.number(), family }
    }

    /// Decodes a key read back from the map; `None` for bytes no valid entry has.
    pub fn from_key(key: &ServiceKey) -> Option<Self> {
        let proto = Proto::from_number(key.proto)?;
        let addr = match key.family {
            FAMILY_V4 => IpAddr::V4(Ipv4Addr::new(key.addr[0], key.addr[1], key.addr[2], key.addr[3])),
            FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(key.addr)),
            _ => return None,
        };
        let port = match u16::from_be(key.port) {
            0 => None,
            p => Some(p),
        };
        Some(Endpoint { proto, addr, port })
    }

    /// Host prefix length of the address (32 or 128): the `local` route the
    /// service namespace needs to answer as this address.
    pub fn host_prefix(&self) -> u8 {
        match self.addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }
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
        assert_eq!((e.proto, e.addr.to_string(), e.port), (Proto::Tcp, "198.51.100.7".into(), Some(80)));
        let e = ep("UDP://198.51.100.7").unwrap();
        assert_eq!((e.proto, e.port), (Proto::Udp, None));
    }

    #[test]
    fn parses_ipv6_forms() {
        let e = ep("tcp://[2001:db8::7]:443").unwrap();
        assert_eq!((e.addr.to_string(), e.port), ("2001:db8::7".into(), Some(443)));
        assert_eq!(ep("udp://[2001:db8::7]").unwrap().port, None);
        assert_eq!(ep("udp://2001:db8::7"), Err(EndpointError::Unbracketed("2001:db8::7".into())));
    }

    #[test]
    fn rejects_bad_input_with_the_culprit_named() {
        assert_eq!(ep("198.51.100.7:80"), Err(EndpointError::MissingScheme("198.51.100.7:80".into())));
        assert_eq!(ep("sctp://198.51.100.7:80"), Err(EndpointError::UnknownProto("sctp".into())));
        assert_eq!(ep("tcp://198.51.100.300:80"), Err(EndpointError::BadAddress("198.51.100.300".into())));
        assert_eq!(ep("tcp://198.51.100.7:70000"), Err(EndpointError::BadPort("70000".into())));
        assert_eq!(ep("tcp://198.51.100.7:-1"), Err(EndpointError::BadPort("-1".into())));
        assert_eq!(ep("tcp://198.51.100.7:http"), Err(EndpointError::BadPort("http".into())));
        assert_eq!(ep("tcp://198.51.100.7:0"), Err(EndpointError::PortZero));
        assert!(matches!(ep("tcp://0.0.0.0:80"), Err(EndpointError::UnusableAddress(_))));
        assert!(matches!(ep("tcp://[ff02::1]:80"), Err(EndpointError::UnusableAddress(_))));
        assert!(matches!(ep("tcp://2001:db8::7:443"), Err(EndpointError::BadAddress(_) | EndpointError::Unbracketed(_))));
        assert!(ep("tcp://[2001:db8::7:443").is_err());
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
