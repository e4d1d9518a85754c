//! `viscum redirect add|del|list`.

use std::{path::Path, time::Duration};

use clap::{Args, Subcommand};

use super::{Result, print_json, print_table, status::ControlArg};
use crate::{
    daemon::control::{self, ControlError, Request},
    endpoint::Endpoint,
    engine::{Engine, Pins},
    entries::{self, EntrySet},
    hostnames::{HostMatch, HostTracker, Resolver},
    redirect::{
        self, Target,
        request::{self as req, AddRequest, DelRequest, Report, refuse_client_target},
    },
    spec::{Match, RedirectSpec, SpecFields},
};

#[derive(Debug, Subcommand)]
pub enum RedirectCommand {
    /// Redirect PROTO://ADDR[:PORT] into a service namespace.
    Add(AddArgs),
    /// Delete the entry for PROTO://ADDR[:PORT]: new flows go to the cloud at once, open
    /// edge flows finish first (up to --drain-timeout; --now cuts them).
    Del(DelArgs),
    /// List entries with their targets and counters.
    List(ListArgs),
    /// Stop an entry from taking new flows (flows at the edge continue);
    /// optionally wait for them to end and delete the entry.
    Drain(DrainArgs),
    /// Redirect a cloud host name and keep its entries in step with DNS
    /// (re-resolved at TTL expiry) until Ctrl-C, then remove them.
    Follow(FollowArgs),
}

#[derive(Debug, Args)]
pub struct FollowArgs {
    /// PROTO://NAME[:PORT], e.g. tcp://alpr.example.net:443.
    #[arg(value_name = "PROTO://NAME[:PORT]")]
    pub host: HostMatch,
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub dns: DnsArgs,
    #[command(flatten)]
    pub mode: ModeArgs,
}

/// Where entries go: one of `--ns` and `--to` (a group, so that a missing target names both).
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    /// Service namespace made with `viscum ns add`.
    #[arg(long, value_name = "NAME")]
    pub ns: Option<String>,
    /// Host side of a veth into a namespace Viscum did not create (its routes are yours;
    /// entries keep the cloud address, or translate with --nat-to; --mirror also applies).
    #[arg(long, value_name = "HOST_VETH", value_parser = super::parse_iface)]
    pub to: Option<String>,
}

impl TargetArgs {
    fn target(self) -> Target {
        match (self.ns, self.to) {
            (Some(ns), _) => Target::Namespace(ns),
            (None, Some(to)) => Target::Veth(to),
            (None, None) => unreachable!("clap requires --ns or --to"),
        }
    }
}

/// DNS servers for host-name matches.
#[derive(Debug, Args)]
pub struct DnsArgs {
    /// DNS server(s) for host names (default: the nameservers of /etc/resolv.conf).
    #[arg(long = "dns", value_name = "ADDR[:PORT]", value_parser = parse_dns)]
    pub servers: Vec<std::net::SocketAddr>,
}

fn parse_dns(s: &str) -> std::result::Result<std::net::SocketAddr, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, 53));
    }
    s.parse()
        .map_err(|_| format!("'{s}' is not ADDR or ADDR:PORT"))
}

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The entry's match, as given to `redirect add`.
    #[arg(value_name = "PROTO://ADDR[:PORT]")]
    pub endpoint: Endpoint,
    /// Wait up to this many seconds (at most a day) for the edge flows to end, then delete
    /// the entry.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub delete_after: Option<u64>,
}

/// The match of `redirect add|del`, with its source restriction and DNS servers.
#[derive(Debug, Args)]
pub struct MatchArgs {
    /// What to match: tcp://198.51.100.7:80, udp://[2001:db8::7]:53,
    /// tcp://198.51.100.7 (every port), tcp://203.0.113.0/24:443 (a prefix),
    /// tcp://203.0.113.7:8000-8099 (a port range), or a cloud host name
    /// tcp://alpr.example.net:443 (`add` resolves it once, see `redirect follow`; `del`
    /// deletes the entries of the addresses it resolves to now).
    #[arg(value_name = "PROTO://ADDR[:PORT]")]
    pub endpoint: String,
    #[command(flatten)]
    pub dns: DnsArgs,
    /// Only clients in this source prefix (same as `?from=PREFIX` in the match).
    #[arg(long, value_name = "PREFIX")]
    pub from: Option<String>,
}

/// `redirect add`: the flags are the redirect spec's fields ([`SpecFields`]), validated by
/// [`RedirectSpec::new`] like a `[[service]]`'s keys of the same names.
#[derive(Debug, Args)]
pub struct AddArgs {
    #[command(flatten)]
    pub matched: MatchArgs,
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub mode: ModeArgs,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// Whether `redirect add/del` go through a running daemon.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub control: ControlArg,
    /// Apply the change in this process even when a daemon of this instance answers on its
    /// control socket (by default the daemon applies it, with its engine already open).
    #[arg(long)]
    pub no_daemon: bool,
}

/// How entries redirect: the spec's mode and learning fields (the same keys in `[[service]]`).
#[derive(Debug, Args)]
pub struct ModeArgs {
    /// NAT mode, explicitly (the default for --ns targets): rewrite the destination to
    /// the namespace's own address (same port) and replies back.
    #[arg(long)]
    pub nat: bool,
    /// AnyIP mode for a --ns target: no translation; the namespace answers as the cloud
    /// address through a `local` route, which also claims the address's other ports there.
    #[arg(long)]
    pub anyip: bool,
    /// NAT mode with an explicit service address: ADDR, ADDR:PORT, [V6ADDR]:PORT.
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub nat_to: Option<String>,
    /// Mirror (canary) mode: clone matching traffic to the edge copy while
    /// the cloud keeps serving the client; the edge copy's replies are dropped.
    #[arg(long)]
    pub mirror: bool,
    /// Learning period in ms (0-600000) before new flows go to the edge, so flows that
    /// already talk to the cloud are recognised (default: 0 for TCP, 1000 for UDP).
    #[arg(long, value_name = "MS", allow_negative_numbers = true)]
    pub learn_ms: Option<i64>,
}

impl ModeArgs {
    /// The validated spec of `matched` with these modes, or every problem with it.
    fn spec(self, matched: SpecFields, target: Target) -> Result<RedirectSpec> {
        let fields = SpecFields {
            nat: self.nat,
            nat_to: self.nat_to,
            anyip: self.anyip,
            mirror: self.mirror,
            learn_ms: self.learn_ms,
            ..matched
        };
        Ok(RedirectSpec::new(&fields, target)?)
    }
}

impl AddArgs {
    /// The request as the daemon's control socket carries it (not validated yet).
    fn request(&self, pins: &Pins) -> Result<AddRequest> {
        Ok(AddRequest {
            bpffs: absolute(&pins.dir)?,
            matched: self.matched.endpoint.clone(),
            from: self.matched.from.clone(),
            ns: self.target.ns.clone(),
            to: self.target.to.clone(),
            nat: self.mode.nat,
            nat_to: self.mode.nat_to.clone(),
            anyip: self.mode.anyip,
            mirror: self.mode.mirror,
            learn_ms: self.mode.learn_ms,
            dns: self.matched.dns.servers.clone(),
            peer: None,
        })
    }
}

/// `dir` as an absolute path (the daemon finds it through `/proc/PID/root`).
fn absolute(dir: &Path) -> Result<std::path::PathBuf> {
    std::path::absolute(dir)
        .map_err(|e| anyhow::anyhow!("cannot make {} absolute: {e}", dir.display()))
}

#[derive(Debug, Args)]
pub struct DelArgs {
    /// The entry's match, as given to `redirect add`.
    #[command(flatten)]
    pub matched: MatchArgs,
    /// Delete at once: open edge flows are cut (they reach the cloud, which resets them).
    #[arg(long, conflicts_with = "drain_timeout")]
    pub now: bool,
    /// Longest wait, in seconds, for open edge flows to finish before deleting anyway.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=req::MAX_DRAIN_TIMEOUT_S))]
    pub drain_timeout: u64,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

impl DelArgs {
    /// The request as the daemon's control socket carries it (not validated yet).
    fn request(&self, pins: &Pins) -> Result<DelRequest> {
        Ok(DelRequest {
            bpffs: absolute(&pins.dir)?,
            matched: self.matched.endpoint.clone(),
            from: self.matched.from.clone(),
            dns: self.matched.dns.servers.clone(),
            now: self.now,
            drain_timeout_s: self.drain_timeout,
            peer: None,
        })
    }
}

/// How long a daemon may take to answer a redirect request before this command gives up
/// (beyond a delete's drain): as long as this process itself would wait for another
/// writer's lock, plus a margin for the daemon's own queue.
const DAEMON_ANSWER: Duration =
    Duration::from_secs(crate::engine::lock::LOCK_TIMEOUT.as_secs() + 10);

/// Hands `request` to this instance's daemon if one answers on its control socket and takes
/// it; `Ok(None)`: no daemon (no socket, or nobody listening), `--no-daemon`, an older daemon
/// without redirect requests, or a daemon that declined (another network namespace or
/// instance): the caller applies the request itself.
///
/// # Errors
/// The daemon refused the request (nothing was changed), the connection broke, or no answer
/// came within `wait` (whether the daemon applied it is then unknown).
async fn via_daemon(
    pins: &Pins,
    daemon: &DaemonArgs,
    request: &Request,
    wait: Duration,
) -> Result<Option<Report>> {
    if daemon.no_daemon {
        return Ok(None);
    }
    let path = daemon.control.path(pins);
    // Without a daemon this is all it costs: one stat.
    if !path.exists() {
        return Ok(None);
    }
    let response = match tokio::time::timeout(wait, control::request(&path, request)).await {
        Err(_) => anyhow::bail!(
            "the daemon at {} did not answer within {} s: whether it applied the change is              unknown (see `viscum redirect list`); --no-daemon makes the change without it",
            path.display(),
            wait.as_secs()
        ),
        // A socket file nobody listens on: a daemon that died without removing it.
        Ok(Err(ControlError::Connect { .. })) => return Ok(None),
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(r)) => r,
    };
    if response.ok {
        return Ok(Some(response.redirect.unwrap_or_default()));
    }
    let error = response.error.unwrap_or_default();
    if response.declined {
        log::info!("the daemon leaves this change to us: {error}");
        return Ok(None);
    }
    // A daemon from before redirect requests: it changed nothing.
    if error.starts_with("bad request: unknown command") {
        log::info!("the daemon does not take redirect requests; making the change here");
        return Ok(None);
    }
    anyhow::bail!("{error}");
}

fn print_report(report: &Report) {
    for line in &report.out {
        println!("{line}");
    }
    for line in &report.notes {
        eprintln!("{line}");
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(pins: &Pins, cmd: RedirectCommand) -> Result<()> {
    // Each command validates its arguments before it opens (and can change) anything.
    match cmd {
        RedirectCommand::Add(args) => {
            let request = args.request(pins)?;
            let spec = request.spec()?;
            // Host names are resolved here: a daemon would hold its engine during the lookup.
            let by_name = matches!(spec.matches.first(), Some(Match::Host(_)));
            let handed = if by_name {
                None
            } else {
                let request = Request::RedirectAdd(request.clone());
                via_daemon(pins, &args.daemon, &request, DAEMON_ANSWER).await?
            };
            let report = match handed {
                Some(report) => report,
                None => {
                    let mut engine = Engine::open(pins)?;
                    req::apply_add(&mut engine, &spec, &request.dns).await?
                }
            };
            print_report(&report);
        }
        RedirectCommand::Del(args) => {
            let request = args.request(pins)?;
            let matched = request.target_match()?;
            if !matches!(matched, Match::Host(_)) {
                let wait = DAEMON_ANSWER + Duration::from_secs(request.drain_timeout_s);
                let del = Request::RedirectDel(request.clone());
                let handed = via_daemon(pins, &args.daemon, &del, wait);
                // Ctrl-C during the daemon's drain: the same delete again, at once.
                let report = tokio::select! {
                    r = handed => r?,
                    _ = tokio::signal::ctrl_c() => {
                        let now = DelRequest { now: true, ..request.clone() };
                        via_daemon(pins, &args.daemon, &Request::RedirectDel(now), DAEMON_ANSWER)
                            .await?
                    }
                };
                if let Some(report) = report {
                    print_report(&report);
                    return Ok(());
                }
            }
            let engine = tokio::sync::Mutex::new(Engine::open(pins)?);
            let interrupt = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            let report = req::apply_del(
                &engine,
                matched,
                &request.dns,
                request.now,
                Duration::from_secs(request.drain_timeout_s),
                interrupt,
                |line| println!("{line}"),
            )
            .await?;
            print_report(&report);
        }
        RedirectCommand::Follow(args) => {
            let host = SpecFields {
                matches: vec![args.host.to_string()],
                ..SpecFields::default()
            };
            let spec = args.mode.spec(host, args.target.target())?;
            let mut engine = Engine::open(pins)?;
            refuse_client_target(pins, &spec.target)?;
            let resolver = Resolver::new(&args.dns.servers)?;
            let opts = spec.options();
            let mut tracker = HostTracker::new(args.host.clone(), spec.target, opts);
            eprintln!(
                "following {} (Ctrl-C to stop and remove its entries)",
                args.host
            );
            let result: Result<()> = async {
                loop {
                    match tracker.refresh(&mut engine, &resolver).await {
                        Ok(ch) => {
                            for ep in ch.removed {
                                println!("removed {ep} (no longer in DNS)");
                            }
                            for ep in ch.added {
                                println!("added {ep}");
                            }
                        }
                        // Keep the current entries through a failed lookup.
                        Err(e) => eprintln!("viscum: {:#}", anyhow::Error::from(e)),
                    }
                    let wait = tracker
                        .next_refresh
                        .saturating_duration_since(std::time::Instant::now());
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => break Ok(()),
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
            .await;
            for ep in tracker.clear(&mut engine).await? {
                println!("removed {ep}");
            }
            result?;
        }
        RedirectCommand::Drain(args) => {
            let mut engine = Engine::open(pins)?;
            let mut set = EntrySet::existing(&engine, &[args.endpoint])?;
            entries::drain(&mut engine, set.installed())?;
            println!("draining {}: no new flows go to the edge", args.endpoint);
            if let Some(secs) = args.delete_after {
                let shared = tokio::sync::Mutex::new(engine);
                let timeout = std::time::Duration::from_secs(secs);
                let live = set.drain_and_wait(&shared, timeout).await;
                if live > 0 {
                    println!("{live} edge flow(s) still open after {secs} s; deleting anyway");
                }
                engine = shared.into_inner();
                let (_, errors) = set.remove(&mut engine).await;
                if !errors.is_empty() {
                    anyhow::bail!("{}", errors.join("; "));
                }
                println!("deleted {}", args.endpoint);
            }
        }
        RedirectCommand::List(args) => {
            let engine = Engine::open(pins)?;
            let rows = redirect::list(&engine).await?;
            if args.json {
                print_json(&rows)?;
            } else {
                print_entries(&rows);
            }
        }
    }
    Ok(())
}

pub(super) fn print_entries(rows: &[redirect::EntryRow]) {
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.endpoint.clone(),
                r.target.clone(),
                r.ns.clone().unwrap_or_else(|| "-".into()),
                match (&r.nat_to, r.draining) {
                    (Some(n), false) => format!("nat->{n}"),
                    (Some(n), true) => format!("nat->{n},draining"),
                    (None, true) => format!("{},draining", r.mode),
                    (None, false) => r.mode.to_string(),
                },
                r.edge_flows.to_string(),
                r.live_flows.to_string(),
                r.packets.to_string(),
                r.bytes.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "MATCH",
            "TARGET",
            "NAMESPACE",
            "MODE",
            "FLOWS",
            "LIVE",
            "PACKETS",
            "BYTES",
        ],
        &table,
    );
}
