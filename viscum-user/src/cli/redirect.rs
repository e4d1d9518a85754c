//! `viscum redirect add|del|list`.

use clap::{Args, Subcommand};

use super::{Result, print_json, print_table};
use crate::{
    endpoint::Endpoint,
    engine::{Engine, Pins},
    entries::{self, EntrySet},
    hostnames::{HostMatch, HostTracker, Resolver},
    redirect::{self, Target},
    spec::{self, Match, RedirectSpec, SpecFields},
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

/// Where entries go.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Service namespace made with `viscum ns add`.
    #[arg(
        long,
        value_name = "NAME",
        required_unless_present = "to",
        conflicts_with = "to"
    )]
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

impl MatchArgs {
    /// The spec's fields for this match (mode flags unset).
    fn fields(&self) -> SpecFields {
        SpecFields {
            matches: vec![self.endpoint.clone()],
            from: self.from.clone(),
            ..SpecFields::default()
        }
    }
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
    /// The validated spec, or every problem with it.
    fn spec(self) -> Result<RedirectSpec> {
        self.mode.spec(self.matched.fields(), self.target.target())
    }
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
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub drain_timeout: u64,
}

impl DelArgs {
    /// The match named, with `--from` folded in (the spec's validation, the mode aside).
    fn target_match(&self) -> Result<Match> {
        let spec = RedirectSpec::new(&self.matched.fields(), Target::Veth(String::new()))?;
        Ok(spec.matches[0].clone())
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
            let dns = args.matched.dns.servers.clone();
            let spec = args.spec()?;
            let mut engine = Engine::open(pins)?;
            refuse_client_target(pins, &spec.target)?;
            let to = match &spec.target {
                Target::Namespace(n) => format!("namespace {n}"),
                Target::Veth(v) => v.clone(),
            };
            for ep in spec::add_entries(&mut engine, &spec, &dns).await? {
                println!("redirecting {ep} to {to}");
            }
            if let Some(Match::Host(host)) = spec.matches.first() {
                eprintln!(
                    "note: these entries follow DNS only while `viscum redirect follow {host}` or `viscum run` manages them"
                );
            }
        }
        RedirectCommand::Del(args) => {
            let matched = args.target_match()?;
            let mut engine = Engine::open(pins)?;
            let endpoints = match matched {
                Match::Addr(ep) => vec![ep],
                Match::Host(host) => {
                    let resolver = Resolver::new(&args.matched.dns.servers)?;
                    let answer = resolver.lookup(&host.host).await?;
                    let mut eps = Vec::new();
                    for addr in answer.addrs {
                        let ep = host.endpoint(addr);
                        if engine.get(&ep)?.is_some() {
                            eps.push(ep);
                        }
                    }
                    if eps.is_empty() {
                        anyhow::bail!("no entry for any address of {host}");
                    }
                    eps
                }
            };
            let mut set = EntrySet::existing(&engine, &endpoints)?;
            let open = set.live_flows(&engine);
            if !args.now && open > 0 {
                println!(
                    "draining: new flows go to the cloud; waiting up to {} s for {open} open edge \
                     flow(s) (Ctrl-C deletes at once)",
                    args.drain_timeout
                );
                let timeout = std::time::Duration::from_secs(args.drain_timeout);
                let shared = tokio::sync::Mutex::new(engine);
                // Interrupted: delete at once rather than leave entries draining for nobody.
                tokio::select! {
                    _ = set.drain_and_wait(&shared, timeout) => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                engine = shared.into_inner();
            }
            let (removed, errors) = set.remove(&mut engine).await;
            for r in &removed {
                match r.cut_flows {
                    0 => println!("deleted {}", r.endpoint),
                    n => println!("deleted {} (cut {n} open edge flow(s))", r.endpoint),
                }
            }
            if !errors.is_empty() {
                anyhow::bail!("{}", errors.join("; "));
            }
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

/// A `--to` target must lead into a service's namespace: the interface the classifier is
/// attached to (a veth in a lab, a bridge port...) would loop clients' traffic back at them.
fn refuse_client_target(pins: &Pins, target: &Target) -> Result<()> {
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
