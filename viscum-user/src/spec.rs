//! One redirect spec for `viscum redirect add`, the daemon's `[[service]]` tables and the
//! embedding API ([`crate::embed`]).
//!
//! A [`RedirectSpec`] says what is matched (`match`, narrowed by `from`), where it goes
//! (`target`), how ([`Mode`]: AnyIP, NAT with an optional `nat_to`, or mirror) and when new
//! flows start going there (`learn`). It is built from the same fields whichever way it comes
//! in ([`SpecFields`]: the CLI's flags `--from --nat --nat-to --anyip --mirror --learn-ms` and
//! the config keys `from nat nat_to anyip mirror learn_ms`), by one validation
//! ([`RedirectSpec::new`]) that reports every problem as a [`SpecError`] naming its field.
//! Nothing is applied by validation; [`RedirectSpec::options`] is what
//! [`crate::redirect::add_with`] then applies per address.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::{
    endpoint::{self, Endpoint},
    engine::Engine,
    hostnames::{HostError, HostMatch, HostTracker, Resolver},
    redirect::{self, NatTarget, RedirectOptions, Target},
};

/// Longest learning period `learn_ms` accepts (ten minutes).
pub const MAX_LEARN_MS: i64 = 600_000;

/// What an entry does with matched traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No translation: the target answers as the cloud address (a `local` route for it in a
    /// Viscum namespace, which also claims the address's other ports there). The default for
    /// `--to` veth targets.
    AnyIp,
    /// Rewrite the destination to the service's own address and port (`to`; its empty fields
    /// mean the namespace's own address / the packet's own port) and replies back. The
    /// default for namespace targets.
    Nat {
        /// The service's own address and port; `NatTarget::default()` for the
        /// namespace's address and the packet's port.
        to: NatTarget,
    },
    /// Clone matching traffic to the target while the cloud keeps serving the client; the
    /// target's replies are dropped.
    Mirror,
}

impl Mode {
    /// The mode an entry gets when none is asked for: NAT into a Viscum namespace, AnyIP
    /// into a veth whose routes the user manages.
    pub fn default_for(target: &Target) -> Mode {
        match target {
            Target::Namespace(_) => Mode::Nat {
                to: NatTarget::default(),
            },
            Target::Veth(_) => Mode::AnyIp,
        }
    }

    /// `anyip`, `nat` or `mirror`, as `redirect list` shows it.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::AnyIp => "anyip",
            Mode::Nat { .. } => "nat",
            Mode::Mirror => "mirror",
        }
    }
}

/// One thing matched: an address match or a cloud host name (one entry per address it
/// resolves to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// An address or prefix match: one entry.
    Addr(Endpoint),
    /// A host-name match: one entry per A/AAAA address, kept in step with DNS.
    Host(HostMatch),
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::Addr(e) => e.fmt(f),
            Match::Host(h) => h.fmt(f),
        }
    }
}

impl std::str::FromStr for Match {
    type Err = String;

    /// `PROTO://ADDR[/LEN][:PORT[-END]][?from=PREFIX]` or `PROTO://NAME[:PORT]`; the error
    /// says why it is neither.
    fn from_str(s: &str) -> Result<Match, String> {
        match s.parse::<Endpoint>() {
            Ok(e) => Ok(Match::Addr(e)),
            Err(addr_err) => match s.parse::<HostMatch>() {
                Ok(h) => Ok(Match::Host(h)),
                Err(HostError::NotAHost(_)) => Err(addr_err.to_string()),
                Err(host_err) => Err(format!("{addr_err}; as a host name: {host_err}")),
            },
        }
    }
}

/// The fields of a spec as written: CLI flags or config keys of the same names
/// (`--nat-to` is `nat_to`). All optional, so that every problem is reported at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecFields {
    /// `match`: what to redirect (see [`Match`]); at least one.
    pub matches: Vec<String>,
    /// `from`: only clients in this source prefix (`ADDR[/LEN]`), for every address match.
    pub from: Option<String>,
    /// `nat`: NAT mode to the namespace's own address (the default for namespace targets).
    pub nat: bool,
    /// `nat_to`: NAT mode to `ADDR`, `ADDR:PORT` or `[V6ADDR]:PORT`.
    pub nat_to: Option<String>,
    /// `anyip`: AnyIP mode.
    pub anyip: bool,
    /// `mirror`: mirror (canary) mode.
    pub mirror: bool,
    /// `learn_ms`: learning period in milliseconds, 0 to [`MAX_LEARN_MS`] (default: 0 for
    /// TCP, 1000 for UDP).
    pub learn_ms: Option<i64>,
}

/// One problem with a spec: the field (config key, `match[1]` for one match) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", self.flag())]
pub struct SpecError {
    /// The config key: `match[1]`, `from`, `nat_to`, `learn_ms`, `mode`.
    pub field: String,
    /// What is wrong, in words (no field name: [`SpecError::flag`] or `field` gives it).
    pub message: String,
}

impl SpecError {
    fn new(field: impl Into<String>, message: impl fmt::Display) -> SpecError {
        SpecError {
            field: field.into(),
            message: message.to_string(),
        }
    }

    /// The field as the CLI spells it: `--nat-to`, `--learn-ms`, or the match argument.
    pub fn flag(&self) -> String {
        if self.field.starts_with("match") {
            "PROTO://ADDR[:PORT]".into()
        } else if self.field == "mode" {
            "mode".into()
        } else {
            format!("--{}", self.field.replace('_', "-"))
        }
    }
}

/// Every problem of one spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct SpecErrors(pub Vec<SpecError>);

/// A validated redirect: built only by [`RedirectSpec::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectSpec {
    /// What is matched, in the order given; `from` is already folded into address matches.
    pub matches: Vec<Match>,
    /// The source restriction given with `from` (address matches carry it).
    pub from: Option<(IpAddr, u8)>,
    /// Where matched traffic goes.
    pub target: Target,
    /// How (always explicit: the target's default is filled in).
    pub mode: Mode,
    /// Learning period before new flows go to the target (`None`: the protocol's default).
    pub learn: Option<Duration>,
}

impl RedirectSpec {
    /// Validates `fields` for `target`.
    ///
    /// # Errors
    /// Every problem found, each naming its field: a match that is neither an address match
    /// nor a host name (or is listed twice), a `from` that is no prefix, of the other family,
    /// given twice (`?from=` and `from`) or with a host name, modes that exclude each other
    /// (`anyip`, `mirror`, `nat`/`nat_to`), `anyip` or an address-less `nat` with a
    /// [`Target::Veth`] (neither can work into a namespace Viscum did not make), a `nat_to`
    /// that does not parse or is of the other family, a `learn_ms` out of range.
    pub fn new(fields: &SpecFields, target: Target) -> Result<RedirectSpec, SpecErrors> {
        let mut errors = Vec::new();
        let from = match fields.from.as_deref().map(endpoint::parse_prefix) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                errors.push(SpecError::new("from", e));
                None
            }
        };
        let nat_to = match fields.nat_to.as_deref().map(parse_nat_to) {
            None => None,
            Some(Ok(n)) => Some(n),
            Some(Err(e)) => {
                errors.push(SpecError::new("nat_to", e));
                None
            }
        };

        if fields.matches.is_empty() {
            errors.push(SpecError::new(
                "match",
                "empty: list at least one tcp:// or udp:// endpoint",
            ));
        }
        let mut matches: Vec<Match> = Vec::new();
        for (i, text) in fields.matches.iter().enumerate() {
            let field = format!("match[{i}]");
            let m = match text.parse::<Match>() {
                Ok(m) => m,
                Err(e) => {
                    errors.push(SpecError::new(field, e));
                    continue;
                }
            };
            if let (Match::Addr(ep), Some(NatTarget { addr: Some(a), .. })) = (&m, nat_to)
                && a.is_ipv4() != ep.addr.is_ipv4()
            {
                errors.push(SpecError::new(
                    "nat_to",
                    format!("NAT address {a} is not of the same family as {ep}"),
                ));
            }
            let m = match (m, from) {
                (Match::Addr(ep), Some((src, len))) => {
                    if src.is_ipv4() != ep.addr.is_ipv4() {
                        errors.push(SpecError::new(
                            "from",
                            endpoint::EndpointError::MixedFamilies { src, dst: ep.addr },
                        ));
                        continue;
                    }
                    if ep.source.is_some() {
                        errors.push(SpecError::new(
                            "from",
                            format!("{ep} has ?from= already: give the source restriction once"),
                        ));
                        continue;
                    }
                    Match::Addr(Endpoint {
                        source: Some((src, len)),
                        ..ep
                    })
                }
                (Match::Host(h), Some(_)) => {
                    errors.push(SpecError::new(
                        "from",
                        format!("not supported with host names ({h})"),
                    ));
                    continue;
                }
                (m, None) => m,
            };
            if matches.contains(&m) {
                errors.push(SpecError::new(field, format!("{m} is listed twice")));
            } else {
                matches.push(m);
            }
        }

        let nat = fields.nat || fields.nat_to.is_some();
        let mut conflict = |a: &str, b: &str| {
            errors.push(SpecError::new(
                "mode",
                format!("{a} and {b} cannot be combined: give one mode"),
            ));
        };
        if fields.anyip && nat {
            conflict("anyip", "NAT (nat, nat_to)");
        }
        if fields.mirror && nat {
            conflict("mirror", "NAT (nat, nat_to)");
        }
        if fields.anyip && fields.mirror {
            conflict("anyip", "mirror");
        }
        // A `--to` veth is not a namespace Viscum made: it has no address of its own to NAT
        // to, and no local route Viscum would add for AnyIP (its entries keep the cloud
        // address anyway). Saying so beats accepting a flag that does nothing.
        if matches!(target, Target::Veth(ref v) if !v.is_empty()) {
            if fields.anyip {
                errors.push(SpecError::new(
                    "mode",
                    "anyip does not apply to a --to veth: its entries keep the cloud address \
                     already and its namespace's routes are yours (anyip is for --ns targets): \
                     drop --anyip",
                ));
            }
            if fields.nat && fields.nat_to.is_none() {
                errors.push(SpecError::new(
                    "mode",
                    "nat translates to the address of a namespace made by `viscum ns add` \
                     (--ns); a --to veth has none: give the service's address with --nat-to \
                     ADDR[:PORT]",
                ));
            }
        }
        let mode = if nat {
            Mode::Nat {
                to: nat_to.unwrap_or_default(),
            }
        } else if fields.anyip {
            Mode::AnyIp
        } else if fields.mirror {
            Mode::Mirror
        } else {
            Mode::default_for(&target)
        };

        let learn = match fields.learn_ms {
            None => None,
            Some(ms) if (0..=MAX_LEARN_MS).contains(&ms) => Some(Duration::from_millis(ms as u64)),
            Some(ms) => {
                errors.push(SpecError::new(
                    "learn_ms",
                    format!("{ms} must be between 0 and {MAX_LEARN_MS} (milliseconds)"),
                ));
                None
            }
        };

        if !errors.is_empty() {
            return Err(SpecErrors(errors));
        }
        Ok(RedirectSpec {
            matches,
            from,
            target,
            mode,
            learn,
        })
    }

    /// The per-entry options [`crate::redirect::add_with`] applies.
    pub fn options(&self) -> RedirectOptions {
        RedirectOptions {
            mode: self.mode,
            learn: self.learn,
        }
    }

    /// The address matches (with `from` folded in).
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.matches
            .iter()
            .filter_map(|m| match m {
                Match::Addr(e) => Some(*e),
                Match::Host(_) => None,
            })
            .collect()
    }

    /// The host-name matches.
    pub fn hosts(&self) -> Vec<HostMatch> {
        self.matches
            .iter()
            .filter_map(|m| match m {
                Match::Host(h) => Some(h.clone()),
                Match::Addr(_) => None,
            })
            .collect()
    }
}

/// Adds `spec`'s entries once: one per address match, and one per address each host name
/// resolves to now (through the DNS servers `dns`, or /etc/resolv.conf's when empty; the
/// entries do not follow DNS afterwards: that is [`HostTracker`]'s job). Returns the entries
/// added, in order.
///
/// # Errors
/// The first failure ([`redirect::add_with`]'s errors, a lookup that failed or found no
/// address); the entries this call added before it are removed again.
pub async fn add_entries(
    engine: &mut Engine,
    spec: &RedirectSpec,
    dns: &[SocketAddr],
) -> Result<Vec<Endpoint>, HostError> {
    let mut added = Vec::new();
    let mut failure = None;
    for m in &spec.matches {
        let result = match m {
            Match::Addr(ep) => redirect::add_with(engine, ep, &spec.target, &spec.options())
                .await
                .map(|()| vec![*ep])
                .map_err(HostError::from),
            Match::Host(h) => add_host_once(engine, spec, h, dns).await,
        };
        match result {
            Ok(eps) => added.extend(eps),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let Some(e) = failure else {
        return Ok(added);
    };
    for ep in &added {
        let _ = redirect::del(engine, ep).await;
    }
    Err(e)
}

async fn add_host_once(
    engine: &mut Engine,
    spec: &RedirectSpec,
    host: &HostMatch,
    dns: &[SocketAddr],
) -> Result<Vec<Endpoint>, HostError> {
    let resolver = Resolver::new(dns)?;
    let mut tracker = HostTracker::new(host.clone(), spec.target.clone(), spec.options());
    let changes = tracker.refresh(engine, &resolver).await?;
    if changes.added.is_empty() {
        return Err(HostError::NoAddress(host.to_string()));
    }
    Ok(changes.added)
}

/// `ADDR`, `ADDR:PORT` or `[V6ADDR]:PORT`.
///
/// # Errors
/// A message naming the part that is wrong: the whole text if it has none of these shapes,
/// the address if it is no IP address, the port if it is not 1-65535.
pub fn parse_nat_to(s: &str) -> Result<NatTarget, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(NatTarget {
            addr: Some(ip),
            port: None,
        });
    }
    let split = match s.strip_prefix('[') {
        Some(rest) => rest.split_once("]:"),
        None => s.rsplit_once(':').filter(|(a, _)| !a.contains(':')),
    };
    let Some((addr, port)) = split else {
        return Err(format!("'{s}' is not ADDR, ADDR:PORT or [V6ADDR]:PORT"));
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("'{addr}' in '{s}' is not an IP address"))?;
    if s.starts_with('[') != addr.is_ipv6() {
        return Err(format!("'{s}' is not ADDR, ADDR:PORT or [V6ADDR]:PORT"));
    }
    match port.parse::<u32>() {
        Ok(0) => Err("port 0 is not a valid port".into()),
        Ok(p @ 1..=65535) => Ok(NatTarget {
            addr: Some(addr),
            port: Some(p as u16),
        }),
        _ => Err(format!(
            "port '{port}' in '{s}' is not a number between 1 and 65535"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> Target {
        Target::Namespace("web".into())
    }

    fn fields(matches: &[&str]) -> SpecFields {
        SpecFields {
            matches: matches.iter().map(ToString::to_string).collect(),
            ..SpecFields::default()
        }
    }

    fn errors(f: &SpecFields, target: Target) -> Vec<String> {
        RedirectSpec::new(f, target)
            .unwrap_err()
            .0
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }

    #[test]
    fn defaults_follow_the_target() {
        let f = fields(&["tcp://198.51.100.7:80"]);
        let s = RedirectSpec::new(&f, ns()).unwrap();
        assert_eq!(
            s.mode,
            Mode::Nat {
                to: NatTarget::default()
            }
        );
        let s = RedirectSpec::new(&f, Target::Veth("v0".into())).unwrap();
        assert_eq!(s.mode, Mode::AnyIp);
        assert_eq!(s.learn, None);
    }

    #[test]
    fn every_mode_and_from() {
        let mut f = fields(&["tcp://198.51.100.7:80", "udp://198.51.100.7:53"]);
        f.from = Some("192.0.2.0/24".into());
        f.nat_to = Some("10.1.2.3:8080".into());
        f.learn_ms = Some(250);
        let s = RedirectSpec::new(&f, ns()).unwrap();
        assert_eq!(
            s.endpoints()[1].source,
            Some(("192.0.2.0".parse().unwrap(), 24))
        );
        assert_eq!(
            s.mode,
            Mode::Nat {
                to: NatTarget {
                    addr: Some("10.1.2.3".parse().unwrap()),
                    port: Some(8080)
                }
            }
        );
        assert_eq!(s.learn, Some(Duration::from_millis(250)));
        let mut f = fields(&["tcp://198.51.100.7:80"]);
        f.mirror = true;
        assert_eq!(RedirectSpec::new(&f, ns()).unwrap().mode, Mode::Mirror);
        f.mirror = false;
        f.anyip = true;
        assert_eq!(RedirectSpec::new(&f, ns()).unwrap().mode, Mode::AnyIp);
    }

    #[test]
    fn reports_every_problem_with_its_field() {
        let f = SpecFields {
            matches: vec![
                "tcp://198.51.100.7:70000".into(),
                "tcp://[2001:db8::7]:80".into(),
                "tcp://198.51.100.8:80?from=192.0.2.0/24".into(),
                "tcp://alpr.example.net:443".into(),
            ],
            from: Some("192.0.2.0/25".into()),
            nat: false,
            nat_to: Some("10.1.2.3".into()),
            anyip: true,
            mirror: true,
            learn_ms: Some(700_000),
        };
        let e = errors(&f, ns());
        for want in [
            "match[0]: port '70000'",
            "from: source prefix 192.0.2.0",
            "from: tcp://198.51.100.8:80?from=192.0.2.0/24 has ?from= already",
            "from: not supported with host names",
            "mode: anyip and NAT (nat, nat_to) cannot be combined",
            "mode: mirror and NAT (nat, nat_to) cannot be combined",
            "mode: anyip and mirror cannot be combined",
            "learn_ms: 700000 must be between 0 and 600000",
        ] {
            assert!(e.iter().any(|x| x.contains(want)), "{want:?} not in {e:#?}");
        }
        let mut f = fields(&["tcp://[2001:db8::7]:80", "tcp://[2001:db8::7]:80"]);
        f.nat_to = Some("10.1.2.3".into());
        let e = errors(&f, ns());
        assert!(
            e.iter().any(|x| x.contains("nat_to: NAT address 10.1.2.3")),
            "{e:#?}"
        );
        assert!(
            e.iter()
                .any(|x| x.contains("match[1]: tcp://[2001:db8::7]:80 is listed twice"))
        );
        assert!(errors(&fields(&[]), ns())[0].starts_with("match: empty"));
    }

    #[test]
    fn cli_spelling_of_fields() {
        assert_eq!(SpecError::new("nat_to", "x").to_string(), "--nat-to: x");
        assert_eq!(SpecError::new("learn_ms", "x").flag(), "--learn-ms");
    }

    #[test]
    fn nat_to_forms() {
        assert_eq!(parse_nat_to("10.0.0.1").unwrap().port, None);
        assert_eq!(parse_nat_to("10.0.0.1:8080").unwrap().port, Some(8080));
        assert_eq!(parse_nat_to("[2001:db8::1]:80").unwrap().port, Some(80));
        assert_eq!(parse_nat_to("2001:db8::1").unwrap().port, None);
        for (bad, want) in [
            ("10.0.0.1:0", "port 0 is not a valid port"),
            ("nope", "'nope' is not ADDR, ADDR:PORT or [V6ADDR]:PORT"),
            (
                "1.2.3.4:99999",
                "port '99999' in '1.2.3.4:99999' is not a number between 1 and 65535",
            ),
            ("[2001:db8::1]:http", "port 'http' in"),
            (
                "1.2.3.999:80",
                "'1.2.3.999' in '1.2.3.999:80' is not an IP address",
            ),
            ("[10.0.0.1]:80", "'[10.0.0.1]:80' is not ADDR, ADDR:PORT"),
        ] {
            assert_eq!(
                parse_nat_to(bad).unwrap_err().get(..want.len()),
                Some(want),
                "{bad}"
            );
        }
    }

    #[test]
    fn to_veth_refuses_modes_that_need_a_viscum_namespace() {
        let veth = || Target::Veth("veth0".into());
        let mut f = fields(&["tcp://198.51.100.7:80"]);
        f.anyip = true;
        assert!(errors(&f, veth())[0].starts_with("mode: anyip does not apply to a --to veth"));
        f.anyip = false;
        f.nat = true;
        assert!(errors(&f, veth())[0].starts_with("mode: nat translates to the address"));
        // An explicit address, and mirror, do work into a foreign namespace.
        f.nat = false;
        f.nat_to = Some("10.0.0.5:8080".into());
        assert!(RedirectSpec::new(&f, veth()).is_ok());
        f.nat_to = None;
        f.mirror = true;
        assert_eq!(RedirectSpec::new(&f, veth()).unwrap().mode, Mode::Mirror);
    }
}
