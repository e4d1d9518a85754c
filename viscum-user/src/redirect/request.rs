//! `viscum redirect add` and `redirect del` as values: what the command line asked for, the
//! same whether the CLI applies it itself or hands it to a running daemon over its control
//! socket (`{"cmd":"redirect-add",...}`, `{"cmd":"redirect-del",...}`; see
//! [`crate::daemon::control`]).
//!
//! Why through the daemon at all: a daemon has the engine open, aya's feature probes done and
//! its runtime warm, so a change it applies takes effect sooner than one a fresh process
//! applies after opening every map (benchmark B7, "time to effect"). What is applied is the
//! same either way ([`apply_add`], [`apply_del`]): the entry belongs to no daemon service, as
//! one the CLI adds itself, so the daemon's reconciliation leaves it alone.
//!
//! The fields are validated on both sides: by the CLI before it sends anything, and again by
//! the daemon, which trusts nothing from the socket (a refused request changes nothing).

use std::{future::Future, net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::Target;
use crate::{
    endpoint::Endpoint,
    engine::{Engine, Pins},
    entries::EntrySet,
    hostnames::Resolver,
    spec::{self, Match, RedirectSpec, SpecFields},
};

/// Most DNS servers a request may name (resolv.conf allows 3; a few more for `--dns` lists).
pub const MAX_DNS_SERVERS: usize = 8;

/// Longest `--drain-timeout`, in seconds (a day), as the CLI's flag allows.
pub const MAX_DRAIN_TIMEOUT_S: u64 = 86_400;

/// `viscum redirect add MATCH (--ns NAME | --to VETH) [mode flags]`.
///
/// On the control socket: `{"cmd":"redirect-add","bpffs":"/sys/fs/bpf/viscum",
/// "match":"tcp://198.51.100.7:80","ns":"web"}` plus any of the optional keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    /// The instance's pin directory, absolute, as the requesting process sees it: a daemon
    /// applies the request only if that is its own instance.
    pub bpffs: PathBuf,
    /// `PROTO://ADDR[:PORT]`, a prefix, a port range or a host name (see `redirect add`).
    #[serde(rename = "match")]
    pub matched: String,
    /// `--from PREFIX`: only these clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// `--ns NAME`: a namespace made by `viscum ns add`. Exactly one of `ns` and `to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ns: Option<String>,
    /// `--to HOST_VETH`: the host side of a veth into another namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// `--nat`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nat: bool,
    /// `--nat-to ADDR[:PORT]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_to: Option<String>,
    /// `--anyip`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub anyip: bool,
    /// `--mirror`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mirror: bool,
    /// `--learn-ms MS` (0 to 600,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learn_ms: Option<i64>,
    /// `--dns ADDR:PORT` servers for a host-name match (empty: /etc/resolv.conf's), at most
    /// [`MAX_DNS_SERVERS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<SocketAddr>,
    /// Who sent it, filled in by the daemon's connection from the socket: never read from or
    /// written to the wire.
    #[serde(skip)]
    pub peer: Option<Peer>,
}

impl AddRequest {
    /// The validated spec, or every problem with the request (nothing is looked up).
    ///
    /// # Errors
    /// Neither or both of `ns` and `to`; `ns` not a namespace name or `to` not an interface
    /// name; more than [`MAX_DNS_SERVERS`] DNS servers; the spec's own problems
    /// ([`RedirectSpec::new`]: the match, `from`, the modes, `learn_ms`).
    pub fn spec(&self) -> anyhow::Result<RedirectSpec> {
        let target = match (&self.ns, &self.to) {
            (Some(ns), None) => {
                crate::netns::validate_name(ns)?;
                Target::Namespace(ns.clone())
            }
            (None, Some(to)) => {
                crate::config::interface_name(to).map_err(anyhow::Error::msg)?;
                Target::Veth(to.clone())
            }
            _ => anyhow::bail!("give exactly one target: a namespace (ns) or a host veth (to)"),
        };
        check_dns(&self.dns)?;
        let fields = SpecFields {
            matches: vec![self.matched.clone()],
            from: self.from.clone(),
            nat: self.nat,
            nat_to: self.nat_to.clone(),
            anyip: self.anyip,
            mirror: self.mirror,
            learn_ms: self.learn_ms,
        };
        Ok(RedirectSpec::new(&fields, target)?)
    }
}

/// `viscum redirect del MATCH [--from PREFIX] [--now | --drain-timeout SECS]`.
///
/// On the control socket: `{"cmd":"redirect-del","bpffs":"/sys/fs/bpf/viscum",
/// "match":"tcp://198.51.100.7:80","drain_timeout_s":10}` (`"now":true` deletes at once).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelRequest {
    /// As [`AddRequest::bpffs`].
    pub bpffs: PathBuf,
    /// The entry's match, as given to `redirect add` (a host name: the entries of the
    /// addresses it resolves to now).
    #[serde(rename = "match")]
    pub matched: String,
    /// `--from PREFIX`, folded into the match as `add` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// DNS servers for a host-name match, at most [`MAX_DNS_SERVERS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<SocketAddr>,
    /// `--now`: delete at once, cutting open edge flows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub now: bool,
    /// `--drain-timeout`: the longest wait for open edge flows, seconds (0 to
    /// [`MAX_DRAIN_TIMEOUT_S`]).
    pub drain_timeout_s: u64,
    /// Who sent it, filled in by the daemon's connection from the socket: never read from or
    /// written to the wire.
    #[serde(skip)]
    pub peer: Option<Peer>,
}

impl DelRequest {
    /// The match named, with `from` folded in (the spec's validation, the mode aside).
    ///
    /// # Errors
    /// A bad match or `from`; more than [`MAX_DNS_SERVERS`] DNS servers; a drain timeout
    /// over [`MAX_DRAIN_TIMEOUT_S`].
    pub fn target_match(&self) -> anyhow::Result<Match> {
        check_dns(&self.dns)?;
        if self.drain_timeout_s > MAX_DRAIN_TIMEOUT_S {
            anyhow::bail!(
                "drain_timeout_s {} is over the longest drain, {MAX_DRAIN_TIMEOUT_S} s",
                self.drain_timeout_s
            );
        }
        let fields = SpecFields {
            matches: vec![self.matched.clone()],
            from: self.from.clone(),
            ..SpecFields::default()
        };
        let spec = RedirectSpec::new(&fields, Target::Veth(String::new()))?;
        Ok(spec.matches[0].clone())
    }
}

/// The process at the other end of a control connection, as the kernel tells it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peer {
    /// Its pid (`SO_PEERCRED`), if known.
    pub pid: Option<i32>,
    /// The cookie of the network namespace its socket was made in (`SO_NETNS_COOKIE` of the
    /// accepted socket, which the kernel creates in the connecting socket's namespace; Linux
    /// 5.14 on). Unlike `/proc/PID/ns/net` it is right for a client thread that entered
    /// another namespace than its process's.
    pub netns_cookie: Option<u64>,
}

impl Peer {
    /// The peer of a connected Unix socket.
    pub fn of(socket: &tokio::net::UnixStream) -> Peer {
        use std::os::fd::AsFd as _;
        Peer {
            pid: socket.peer_cred().ok().and_then(|c| c.pid()),
            netns_cookie: netns_cookie(socket.as_fd()).ok(),
        }
    }
}

/// The cookie of the network namespace socket `fd` belongs to (`SO_NETNS_COOKIE`).
///
/// # Errors
/// `ENOPROTOOPT` before Linux 5.14; what `getsockopt(2)` fails with otherwise.
pub fn netns_cookie(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is that large.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

fn check_dns(dns: &[SocketAddr]) -> anyhow::Result<()> {
    if dns.len() > MAX_DNS_SERVERS {
        anyhow::bail!("{} DNS servers given: at most {MAX_DNS_SERVERS}", dns.len());
    }
    Ok(())
}

/// What a request did, as the lines `viscum redirect` prints: `out` on stdout, `notes` on
/// stderr. The daemon sends it back in its reply, so the output is the same either way.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// What was done, one line each (`redirecting tcp://198.51.100.7:80 to namespace web`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub out: Vec<String>,
    /// Advice beside it (`note: these entries follow DNS only while ...`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// A `--to` target must lead into a service's namespace: the interface the classifier is
/// attached to (a veth in a lab, a bridge port...) would loop clients' traffic back at them.
///
/// # Errors
/// When `target` is a `--to` veth the instance's classifier is attached to.
pub fn refuse_client_target(pins: &Pins, target: &Target) -> anyhow::Result<()> {
    if let Target::Veth(to) = target
        && crate::engine::attach::recorded_interfaces(pins).contains(to)
    {
        anyhow::bail!(
            "--to {to}: {to} is a client-facing interface the classifier is attached to; --to \
             takes the host side of a veth into a service's namespace"
        );
    }
    Ok(())
}

/// Adds the entries of `spec` (validated by [`AddRequest::spec`]) with `engine`.
///
/// # Errors
/// A `--to` client-facing interface ([`refuse_client_target`]); then
/// [`spec::add_entries`]'s errors (the entries this call added before a failure are removed
/// again).
pub async fn apply_add(
    engine: &mut Engine,
    spec: &RedirectSpec,
    dns: &[SocketAddr],
) -> anyhow::Result<Report> {
    refuse_client_target(engine.pins(), &spec.target)?;
    let to = match &spec.target {
        Target::Namespace(n) => format!("namespace {n}"),
        Target::Veth(v) => v.clone(),
    };
    let mut report = Report::default();
    for ep in spec::add_entries(engine, spec, dns).await? {
        report.out.push(format!("redirecting {ep} to {to}"));
    }
    if let Some(Match::Host(host)) = spec.matches.first() {
        report.notes.push(format!(
            "note: these entries follow DNS only while `viscum redirect follow {host}` or `viscum run` manages them"
        ));
    }
    Ok(report)
}

/// Deletes the entries of `matched` (from [`DelRequest::target_match`]): new flows go to the
/// cloud at once; unless `now`, waits up to `drain_timeout` for their open edge flows to end
/// (without holding `engine` meanwhile), or until `interrupt` completes, then deletes them.
/// `progress` gets the "draining" line the moment the wait begins (it is not repeated in the
/// report).
///
/// # Errors
/// A host name that does not resolve or has no entry; a match without an entry (nothing is
/// changed then); failures to delete (every entry that could be deleted is, and is reported
/// in the error's text).
pub async fn apply_del(
    engine: &tokio::sync::Mutex<Engine>,
    matched: Match,
    dns: &[SocketAddr],
    now: bool,
    drain_timeout: Duration,
    interrupt: impl Future<Output = ()>,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Report> {
    let endpoints = match matched {
        Match::Addr(ep) => vec![ep],
        Match::Host(host) => {
            let resolver = Resolver::new(dns)?;
            let answer = resolver.lookup(&host.host).await?;
            let guard = engine.lock().await;
            let mut eps: Vec<Endpoint> = Vec::new();
            for addr in answer.addrs {
                let ep = host.endpoint(addr);
                if guard.get(&ep)?.is_some() {
                    eps.push(ep);
                }
            }
            if eps.is_empty() {
                anyhow::bail!("no entry for any address of {host}");
            }
            eps
        }
    };
    let (mut set, open) = {
        let guard = engine.lock().await;
        let set = EntrySet::existing(&guard, &endpoints)?;
        let open = set.live_flows(&guard);
        (set, open)
    };
    let mut report = Report::default();
    if !now && open > 0 {
        let line = format!(
            "draining: new flows go to the cloud; waiting up to {} s for {open} open edge \
             flow(s) (Ctrl-C deletes at once)",
            drain_timeout.as_secs()
        );
        progress(&line);
        // Interrupted: delete at once rather than leave entries draining for nobody.
        tokio::select! {
            _ = set.drain_and_wait(engine, drain_timeout) => {}
            () = interrupt => {}
        }
    }
    let (removed, errors) = set.remove(&mut *engine.lock().await).await;
    for r in &removed {
        report.out.push(match r.cut_flows {
            0 => format!("deleted {}", r.endpoint),
            n => format!("deleted {} (cut {n} open edge flow(s))", r.endpoint),
        });
    }
    if !errors.is_empty() {
        let mut msg = errors.join("; ");
        if !report.out.is_empty() {
            msg = format!("{msg} ({})", report.out.join("; "));
        }
        anyhow::bail!(msg);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(json: &str) -> Result<AddRequest, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn add_wire_format_round_trips_and_leaves_out_defaults() {
        let r = AddRequest {
            bpffs: "/sys/fs/bpf/viscum".into(),
            matched: "tcp://198.51.100.7:80".into(),
            ns: Some("web".into()),
            ..AddRequest::default()
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            r#"{"bpffs":"/sys/fs/bpf/viscum","match":"tcp://198.51.100.7:80","ns":"web"}"#
        );
        assert_eq!(add(&line).unwrap(), r);
        assert!(
            add(r#"{"bpffs":"/b","match":"tcp://198.51.100.7:80","ns":"web","force":true}"#)
                .unwrap_err()
                .to_string()
                .contains("unknown field `force`")
        );
    }

    #[test]
    fn add_validation_names_each_problem() {
        let base = AddRequest {
            bpffs: "/b".into(),
            matched: "tcp://198.51.100.7:80".into(),
            ..AddRequest::default()
        };
        let no_target = base.spec().unwrap_err().to_string();
        assert!(no_target.contains("exactly one target"), "{no_target}");
        let both = AddRequest {
            ns: Some("web".into()),
            to: Some("veth0".into()),
            ..base.clone()
        };
        assert!(both.spec().is_err());
        let bad_ns = AddRequest {
            ns: Some("../etc".into()),
            ..base.clone()
        };
        assert!(bad_ns.spec().is_err());
        let bad_to = AddRequest {
            to: Some("a/b".into()),
            ..base.clone()
        };
        assert!(bad_to.spec().is_err());
        let bad_match = AddRequest {
            matched: "tcp://198.51.100.7:99999".into(),
            ns: Some("web".into()),
            ..base.clone()
        };
        assert!(bad_match.spec().is_err());
        let many_dns = AddRequest {
            ns: Some("web".into()),
            dns: vec!["192.0.2.53:53".parse().unwrap(); MAX_DNS_SERVERS + 1],
            ..base.clone()
        };
        assert!(many_dns.spec().unwrap_err().to_string().contains("at most"));
        let good = AddRequest {
            ns: Some("web".into()),
            ..base
        };
        assert_eq!(good.spec().unwrap().target, Target::Namespace("web".into()));
    }

    #[test]
    fn del_validation() {
        let base = DelRequest {
            bpffs: "/b".into(),
            matched: "tcp://198.51.100.7:80".into(),
            drain_timeout_s: 10,
            ..DelRequest::default()
        };
        assert!(matches!(base.target_match().unwrap(), Match::Addr(_)));
        let long = DelRequest {
            drain_timeout_s: MAX_DRAIN_TIMEOUT_S + 1,
            ..base.clone()
        };
        assert!(long.target_match().is_err());
        let bad = DelRequest {
            matched: "sctp://198.51.100.7:80".into(),
            ..base
        };
        assert!(bad.target_match().is_err());
        assert!(
            serde_json::from_str::<DelRequest>(r#"{"bpffs":"/b","match":"tcp://198.51.100.7:80"}"#)
                .unwrap_err()
                .to_string()
                .contains("missing field `drain_timeout_s`")
        );
    }
}
