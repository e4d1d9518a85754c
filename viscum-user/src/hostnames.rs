//! Cloud services named by host name (`tcp://alpr.example.net:443`).
//!
//! The datapath matches addresses, so a host-name match stands for one entry
//! per address the name resolves to. [`HostTracker`] keeps those entries in
//! step with DNS: it re-resolves when the shortest TTL of the last answer
//! runs out, adds entries for new addresses and removes the ones DNS no
//! longer returns, so no stale address keeps being redirected. An answer
//! that fails (timeout, SERVFAIL) keeps the current entries until the next
//! try; an answer that says the name has no addresses removes them all.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::{Duration, Instant},
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
};

use crate::{
    endpoint::{Endpoint, EndpointError, Proto},
    engine::Engine,
    redirect::{self, RedirectError, RedirectOptions, Target},
};

/// Re-resolve at least this often, however long the TTL.
const MAX_REFRESH: Duration = Duration::from_secs(300);
/// ...and not more often than this, however short.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Retry interval after a failed lookup.
const RETRY: Duration = Duration::from_secs(5);

/// Why a host-name match could not be parsed, resolved or applied.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Not `PROTO://NAME[:PORT]`: no scheme, or the host part is an address
    /// or a prefix (those are [`Endpoint`]s); holds the input.
    #[error(
        "'{0}' is not a host name match: write PROTO://NAME[:PORT] (e.g. tcp://alpr.example.net:443)"
    )]
    NotAHost(String),
    /// Not a DNS host name: letter-digit-hyphen labels of 1-63 bytes, no hyphen at
    /// either end (RFC 1123 2.1), 253 bytes at most, one letter at least; holds it.
    #[error("'{0}' is not a valid host name")]
    BadName(String),
    /// The protocol or the port part is invalid (same rules as [`Endpoint`]).
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// No servers were given and `/etc/resolv.conf` cannot be read.
    #[error("cannot read the DNS servers from {path}")]
    ResolvConf {
        /// The file read (`/etc/resolv.conf`).
        path: String,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// No servers were given and resolv.conf has no usable `nameserver` line.
    #[error("no DNS server configured (none in /etc/resolv.conf; pass --dns ADDR)")]
    NoServers,
    /// hickory-resolver refused the configuration.
    #[error("cannot set up the DNS resolver")]
    Resolver(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The lookup failed (timeout, SERVFAIL, refused, no server reachable);
    /// unlike an answer without addresses, this says nothing about the name.
    #[error("cannot resolve {name}")]
    Lookup {
        /// The name looked up.
        name: String,
        /// hickory-resolver's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Adding or removing the entry for one of the addresses failed.
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    /// The name has no A or AAAA record where one address at least is needed
    /// (a one-shot `redirect add`); holds the match.
    #[error("{0} resolves to no address: nothing to redirect")]
    NoAddress(String),
}

/// A match whose destination is a host name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostMatch {
    /// The transport protocol matched.
    pub proto: Proto,
    /// The DNS name, lower case, without a trailing dot.
    pub host: String,
    /// As [`Endpoint::port`]: `None` matches every port; with `port_end`, the
    /// first port of a range.
    pub port: Option<u16>,
    /// Last port of a range (inclusive).
    pub port_end: Option<u16>,
}

impl HostMatch {
    /// The entry for one resolved address.
    pub fn endpoint(&self, addr: IpAddr) -> Endpoint {
        let prefix_len = if addr.is_ipv4() { 32 } else { 128 };
        Endpoint {
            proto: self.proto,
            addr,
            prefix_len,
            port: self.port,
            port_end: self.port_end,
            source: None,
        }
    }
}

impl FromStr for HostMatch {
    type Err = HostError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| HostError::NotAHost(s.to_owned()))?;
        let (host, ports) = match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest.trim_end_matches('/'), None),
        };
        // Anything that parses as an address is not a host name.
        if host.parse::<IpAddr>().is_ok() || host.starts_with('[') || host.contains('/') {
            return Err(HostError::NotAHost(s.to_owned()));
        }
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        let name = host.trim_end_matches('.');
        if name.len() > 253
            || !name.split('.').all(valid_label)
            || !name.bytes().any(|b| b.is_ascii_alphabetic())
        {
            return Err(HostError::BadName(host.to_owned()));
        }
        // Reuse the address parser for protocol and ports.
        let probe = match ports {
            Some(p) => format!("{scheme}://192.0.2.1:{p}"),
            None => format!("{scheme}://192.0.2.1"),
        };
        let e: Endpoint = probe.parse()?;
        Ok(HostMatch {
            proto: e.proto,
            host: name.to_ascii_lowercase(),
            port: e.port,
            port_end: e.port_end,
        })
    }
}

impl fmt::Display for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.proto, self.host)?;
        match (self.port, self.port_end) {
            (Some(lo), Some(hi)) => write!(f, ":{lo}-{hi}"),
            (Some(p), None) => write!(f, ":{p}"),
            _ => Ok(()),
        }
    }
}

/// DNS servers from resolv.conf-style text.
pub fn servers_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// A resolver for cloud host names, bound to explicit servers (the box's
/// resolv.conf by default) and without a cache of its own: TTLs are
/// honoured by [`HostTracker`], which needs to see them.
pub struct Resolver {
    inner: TokioResolver,
}

/// One answer: the addresses and how long they are valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The A and AAAA addresses; empty when the name has none (NXDOMAIN or NODATA).
    pub addrs: BTreeSet<IpAddr>,
    /// Time left until the shortest TTL of the records runs out; 5 s for an
    /// empty answer (so a name that appears later is picked up soon).
    pub ttl: Duration,
}

impl Resolver {
    /// Uses `servers`, or the nameservers of /etc/resolv.conf when empty.
    ///
    /// # Errors
    /// [`HostError::ResolvConf`] if `servers` is empty and /etc/resolv.conf cannot be read;
    /// [`HostError::NoServers`] if it lists none; [`HostError::Resolver`] if hickory refuses
    /// the configuration.
    pub fn new(servers: &[SocketAddr]) -> Result<Self, HostError> {
        let servers = if servers.is_empty() {
            let path = "/etc/resolv.conf";
            let text = std::fs::read_to_string(path).map_err(|source| HostError::ResolvConf {
                path: path.into(),
                source,
            })?;
            servers_from_resolv_conf(&text)
        } else {
            servers.to_vec()
        };
        if servers.is_empty() {
            return Err(HostError::NoServers);
        }
        let name_servers = servers
            .iter()
            .map(|s| {
                let mut udp = ConnectionConfig::udp();
                udp.port = s.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = s.port();
                NameServerConfig::new(s.ip(), true, vec![udp, tcp])
            })
            .collect();
        let config = ResolverConfig::from_parts(None, vec![], name_servers);
        let mut opts = ResolverOpts::default();
        opts.cache_size = 0;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
        opts.ndots = 0;
        let inner = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| HostError::Resolver(Box::new(e)))?;
        Ok(Resolver { inner })
    }

    /// A and AAAA records of `name`. A name without addresses is an empty
    /// answer, not an error.
    ///
    /// # Errors
    /// [`HostError::Lookup`] when no server gives an answer (timeout, SERVFAIL, refused).
    pub async fn lookup(&self, name: &str) -> Result<Answer, HostError> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.inner.lookup_ip(fqdn.as_str()).await {
            Ok(lookup) => {
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(Instant::now());
                Ok(Answer {
                    addrs: lookup.iter().collect(),
                    ttl,
                })
            }
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(Answer {
                addrs: BTreeSet::new(),
                ttl: RETRY,
            }),
            Err(e) => Err(HostError::Lookup {
                name: name.to_owned(),
                source: Box::new(e),
            }),
        }
    }
}

/// The entries of one host-name match, kept in step with DNS.
pub struct HostTracker {
    /// The host-name match this tracker keeps entries for.
    pub matched: HostMatch,
    /// Where each address's entry redirects to.
    pub target: Target,
    /// Mode and learning period of the entries.
    pub opts: RedirectOptions,
    /// Addresses that currently have an entry.
    pub installed: BTreeSet<IpAddr>,
    /// When to resolve again.
    pub next_refresh: Instant,
}

/// What one refresh changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Entries added for addresses new in the answer (or adopted: already there).
    pub added: Vec<Endpoint>,
    /// Entries removed for addresses no longer in the answer.
    pub removed: Vec<Endpoint>,
}

impl HostTracker {
    /// A tracker with no entries yet, due for its first resolution now.
    pub fn new(matched: HostMatch, target: Target, opts: RedirectOptions) -> Self {
        HostTracker {
            matched,
            target,
            opts,
            installed: BTreeSet::new(),
            next_refresh: Instant::now(),
        }
    }

    /// Resolves and applies the difference. Stale addresses are removed
    /// before new ones are added, so an address that moved to another
    /// service's match is never redirected twice.
    ///
    /// # Errors
    /// [`HostError::Lookup`] if the lookup fails (nothing changes; the next try is due in
    /// 5 s); [`HostError::Redirect`] if removing or adding an entry fails (the changes
    /// before it stay, and `installed` says which).
    pub async fn refresh(
        &mut self,
        engine: &mut Engine,
        resolver: &Resolver,
    ) -> Result<Changes, HostError> {
        let answer = match resolver.lookup(&self.matched.host).await {
            Ok(a) => a,
            Err(e) => {
                self.next_refresh = Instant::now() + RETRY;
                return Err(e);
            }
        };
        self.next_refresh = Instant::now() + answer.ttl.clamp(MIN_REFRESH, MAX_REFRESH);
        let mut changes = Changes::default();
        // Computed before either changes `installed`.
        let gone: Vec<IpAddr> = self.installed.difference(&answer.addrs).copied().collect();
        let new: Vec<IpAddr> = answer.addrs.difference(&self.installed).copied().collect();
        for gone in gone {
            let ep = self.matched.endpoint(gone);
            redirect::del_if_present(engine, &ep).await?;
            self.installed.remove(&gone);
            changes.removed.push(ep);
        }
        for new in new {
            let ep = self.matched.endpoint(new);
            match redirect::add_with(engine, &ep, &self.target, &self.opts).await {
                Ok(()) => {}
                // Already there (e.g. left by an earlier run for the same target): adopt it.
                Err(RedirectError::Engine(crate::engine::EngineError::Duplicate(_))) => {}
                Err(e) => return Err(e.into()),
            }
            self.installed.insert(new);
            changes.added.push(ep);
        }
        Ok(changes)
    }

    /// Removes every entry this tracker installed.
    ///
    /// # Errors
    /// [`HostError::Redirect`] if an entry cannot be removed; `installed` is emptied all the
    /// same, so the entries not yet removed are no longer tracked.
    pub async fn clear(&mut self, engine: &mut Engine) -> Result<Vec<Endpoint>, HostError> {
        let mut removed = Vec::new();
        for addr in std::mem::take(&mut self.installed) {
            let ep = self.matched.endpoint(addr);
            redirect::del_if_present(engine, &ep).await?;
            removed.push(ep);
        }
        Ok(removed)
    }
}

/// Every host-name match of one owner (a daemon service), each with its [`HostTracker`]:
/// re-resolved when due, cleared together, described together.
pub struct HostSet {
    trackers: Vec<HostTracker>,
}

impl HostSet {
    /// One tracker per match, all to `target` with `opts`; nothing resolved yet.
    pub fn new(matches: &[HostMatch], target: &Target, opts: RedirectOptions) -> HostSet {
        HostSet {
            trackers: matches
                .iter()
                .map(|h| HostTracker::new(h.clone(), target.clone(), opts))
                .collect(),
        }
    }

    /// No host-name match at all.
    pub fn is_empty(&self) -> bool {
        self.trackers.is_empty()
    }

    /// Does any match have an entry now?
    pub fn any_installed(&self) -> bool {
        self.trackers.iter().any(|h| !h.installed.is_empty())
    }

    /// When the next match is due for re-resolution (`None`: no match).
    pub fn next_refresh(&self) -> Option<Instant> {
        self.trackers.iter().map(|h| h.next_refresh).min()
    }

    /// The entries the matches have now.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.trackers
            .iter()
            .flat_map(|h| h.installed.iter().map(|a| h.matched.endpoint(*a)))
            .collect()
    }

    /// Each match with its current addresses: `tcp://name:443 -> [192.0.2.7, ...]`.
    pub fn describe(&self) -> Vec<String> {
        self.trackers
            .iter()
            .map(|h| {
                let addrs: Vec<String> = h.installed.iter().map(ToString::to_string).collect();
                format!("{} -> [{}]", h.matched, addrs.join(", "))
            })
            .collect()
    }

    /// Re-resolves the matches that are due and applies the differences, taking the engine's
    /// lock for each. `log` hears each change (`false`) and each failure (`true`); a failed
    /// lookup keeps the entries a match has.
    pub async fn refresh_due(
        &mut self,
        engine: &tokio::sync::Mutex<Engine>,
        resolver: &Resolver,
        mut log: impl FnMut(bool, String),
    ) {
        let now = Instant::now();
        for h in self.trackers.iter_mut().filter(|h| h.next_refresh <= now) {
            let mut engine = engine.lock().await;
            match h.refresh(&mut engine, resolver).await {
                Ok(ch) => {
                    for ep in ch.removed {
                        log(false, format!("{ep} left DNS, entry removed"));
                    }
                    for ep in ch.added {
                        log(false, format!("redirecting {ep} ({})", h.matched));
                    }
                }
                Err(e) => log(
                    true,
                    format!("{}: {}", h.matched, crate::entries::error_chain(&e)),
                ),
            }
        }
    }

    /// Removes every match's entries; each resolves afresh when refreshed next. `log` hears
    /// the failures.
    pub async fn clear(&mut self, engine: &mut Engine, mut log: impl FnMut(String)) {
        for h in &mut self.trackers {
            if let Err(e) = h.clear(engine).await {
                log(format!(
                    "{}: {}",
                    h.matched,
                    crate::entries::error_chain(&e)
                ));
            }
            h.next_refresh = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_matches_and_rejects_addresses() {
        let m: HostMatch = "tcp://ALPR.example.net:443".parse().unwrap();
        assert_eq!((m.host.as_str(), m.port), ("alpr.example.net", Some(443)));
        assert_eq!(m.to_string(), "tcp://alpr.example.net:443");
        let m: HostMatch = "udp://cdn.example.org:5000-5010".parse().unwrap();
        assert_eq!((m.port, m.port_end), (Some(5000), Some(5010)));
        assert!("tcp://198.51.100.7:80".parse::<HostMatch>().is_err());
        assert!("tcp://[2001:db8::7]:80".parse::<HostMatch>().is_err());
        assert!(matches!(
            "tcp://bad_name.example:80".parse::<HostMatch>(),
            Err(HostError::BadName(_))
        ));
        assert!(matches!(
            "tcp://-x.example:80".parse::<HostMatch>(),
            Err(HostError::BadName(_))
        ));
        assert!(matches!(
            "tcp://ok.example:70000".parse::<HostMatch>(),
            Err(HostError::Endpoint(_))
        ));
    }

    #[test]
    fn reads_nameservers() {
        let s = servers_from_resolv_conf(
            "# x\nnameserver 192.0.2.53\nsearch lan\nnameserver fe80::1%eth0\n",
        );
        assert_eq!(
            s,
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
