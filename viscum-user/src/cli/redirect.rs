//! `viscum redirect add|del|list`.

use clap::{Args, Subcommand};

use super::{Result, print_json, print_table};
use crate::{
    endpoint::Endpoint,
    engine::{Engine, Pins},
    hostnames::{HostError, HostMatch, HostTracker, Resolver},
    redirect::{self, NatTarget, RedirectOptions, Target},
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
    /// Host side of a veth into a namespace Viscum did not create (its routes are yours).
    #[arg(long, value_name = "HOST_VETH")]
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

/// What `redirect add|del` accept: an address match or a host name.
#[derive(Debug, Clone)]
pub enum MatchArg {
    Addr(Endpoint),
    Host(HostMatch),
}

impl std::str::FromStr for MatchArg {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.parse::<Endpoint>() {
            Ok(e) => Ok(MatchArg::Addr(e)),
            Err(addr_err) => match s.parse::<HostMatch>() {
                Ok(h) => Ok(MatchArg::Host(h)),
                Err(HostError::NotAHost(_)) => Err(addr_err.to_string()),
                Err(host_err) => Err(format!("{addr_err}; as a host name: {host_err}")),
            },
        }
    }
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
    /// Wait up to this many seconds for the edge flows to end, then delete the entry.
    #[arg(long, value_name = "SECS")]
    pub delete_after: Option<u64>,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// What to match: tcp://198.51.100.7:80, udp://[2001:db8::7]:53,
    /// tcp://198.51.100.7 (every port), tcp://203.0.113.0/24:443 (a prefix),
    /// tcp://203.0.113.7:8000-8099 (a port range), or a cloud host name
    /// tcp://alpr.example.net:443 (resolved once; see `redirect follow`).
    #[arg(value_name = "PROTO://ADDR[:PORT]")]
    pub endpoint: MatchArg,
    #[command(flatten)]
    pub dns: DnsArgs,
    /// Only clients in this source prefix (same as `?from=PREFIX` in the match).
    #[arg(long, value_name = "PREFIX", value_parser = parse_from)]
    pub from: Option<(std::net::IpAddr, u8)>,
    #[command(flatten)]
    pub target: TargetArgs,
    /// NAT mode, explicitly (the default for --ns targets): rewrite the destination to
    /// the namespace's own address (same port) and replies back.
    #[arg(long, conflicts_with_all = ["mirror", "anyip"])]
    pub nat: bool,
    /// AnyIP mode for a --ns target: no translation; the namespace answers as the cloud
    /// address through a `local` route, which also claims the address's other ports there.
    #[arg(long, conflicts_with_all = ["mirror", "nat_to"])]
    pub anyip: bool,
    /// NAT mode with an explicit service address: ADDR, ADDR:PORT, [V6ADDR]:PORT.
    #[arg(long, value_name = "ADDR[:PORT]", value_parser = parse_nat_to, conflicts_with = "mirror")]
    pub nat_to: Option<NatTarget>,
    /// Mirror (canary) mode: clone matching traffic to the edge copy while
    /// the cloud keeps serving the client; the edge copy's replies are dropped.
    #[arg(long)]
    pub mirror: bool,
    /// Learning period in ms before new flows go to the edge, so flows that
    /// already talk to the cloud are recognised (default: 0 for TCP, 1000 for UDP).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub learn_ms: Option<u64>,
}

fn parse_nat_to(s: &str) -> std::result::Result<NatTarget, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(NatTarget {
            addr: Some(ip),
            port: None,
        });
    }
    match s.parse::<std::net::SocketAddr>() {
        Ok(sa) if sa.port() != 0 => Ok(NatTarget {
            addr: Some(sa.ip()),
            port: Some(sa.port()),
        }),
        Ok(_) => Err("port 0 is not a valid port".into()),
        Err(_) => Err(format!("'{s}' is not ADDR, ADDR:PORT or [V6ADDR]:PORT")),
    }
}

#[derive(Debug, Args)]
pub struct DelArgs {
    /// The entry's match, as given to `redirect add` (a host name deletes
    /// the entries of the addresses it resolves to now).
    #[arg(value_name = "PROTO://ADDR[:PORT]")]
    pub endpoint: MatchArg,
    #[command(flatten)]
    pub dns: DnsArgs,
    /// The entry's source restriction, if it was added with one.
    #[arg(long, value_name = "PREFIX", value_parser = parse_from)]
    pub from: Option<(std::net::IpAddr, u8)>,
    /// Delete at once: open edge flows are cut (they reach the cloud, which resets them).
    #[arg(long, conflicts_with = "drain_timeout")]
    pub now: bool,
    /// Longest wait, in seconds, for open edge flows to finish before deleting anyway.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub drain_timeout: u64,
}

fn parse_from(s: &str) -> std::result::Result<(std::net::IpAddr, u8), String> {
    crate::endpoint::parse_prefix(s).map_err(|e| e.to_string())
}

/// Folds `--from` into the match, checking the families agree.
fn with_source(mut ep: Endpoint, from: Option<(std::net::IpAddr, u8)>) -> Result<Endpoint> {
    if let Some((src, len)) = from {
        if src.is_ipv4() != ep.addr.is_ipv4() {
            anyhow::bail!(crate::endpoint::EndpointError::MixedFamilies { src, dst: ep.addr });
        }
        if ep.source.is_some() {
            anyhow::bail!("give the source restriction once: either ?from= or --from");
        }
        ep.source = Some((src, len));
    }
    Ok(ep)
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(pins: &Pins, cmd: RedirectCommand) -> Result<()> {
    let mut engine = Engine::open(pins)?;
    match cmd {
        RedirectCommand::Add(args) => {
            let target = args.target.target();
            let opts = RedirectOptions {
                nat: args.nat_to.or(args.nat.then(NatTarget::default)),
                mirror: args.mirror,
                anyip: args.anyip,
                learn: args.learn_ms.map(std::time::Duration::from_millis),
            };
            let to = match &target {
                Target::Namespace(n) => format!("namespace {n}"),
                Target::Veth(v) => v.clone(),
            };
            match args.endpoint {
                MatchArg::Addr(ep) => {
                    let ep = with_source(ep, args.from)?;
                    redirect::add_with(&mut engine, &ep, &target, &opts).await?;
                    println!("redirecting {ep} to {to}");
                }
                MatchArg::Host(host) => {
                    if args.from.is_some() {
                        anyhow::bail!("--from is not supported with host names");
                    }
                    let resolver = Resolver::new(&args.dns.servers)?;
                    let mut tracker = HostTracker::new(host.clone(), target, opts);
                    let changes = tracker.refresh(&mut engine, &resolver).await?;
                    if changes.added.is_empty() {
                        anyhow::bail!("{host} resolves to no address: nothing to redirect");
                    }
                    for ep in &changes.added {
                        println!("redirecting {ep} to {to}");
                    }
                    eprintln!(
                        "note: these entries follow DNS only while `viscum redirect follow {host}` or `viscum run` manages them"
                    );
                }
            }
        }
        RedirectCommand::Del(args) => {
            let endpoints = match args.endpoint {
                MatchArg::Addr(ep) => vec![with_source(ep, args.from)?],
                MatchArg::Host(host) => {
                    let resolver = Resolver::new(&args.dns.servers)?;
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
            for ep in &endpoints {
                if engine.get(ep)?.is_none() {
                    anyhow::bail!("no entry for {ep}");
                }
            }
            let open: u64 = endpoints
                .iter()
                .map(|ep| redirect::live_flows(&engine, ep))
                .sum::<std::result::Result<u64, _>>()?;
            if args.now || open == 0 {
                for ep in endpoints {
                    redirect::del(&mut engine, &ep).await?;
                    match open {
                        0 => println!("deleted {ep}"),
                        n => println!("deleted {ep} (cut {n} open edge flow(s))"),
                    }
                }
            } else {
                println!(
                    "draining: new flows go to the cloud; waiting up to {} s for {open} open edge \
                     flow(s) (Ctrl-C deletes at once)",
                    args.drain_timeout
                );
                let timeout = std::time::Duration::from_secs(args.drain_timeout);
                let cut = tokio::select! {
                    r = redirect::del_draining(&mut engine, &endpoints, timeout) => r?,
                    _ = tokio::signal::ctrl_c() => {
                        // Interrupted: finish the job at once rather than leave
                        // entries draining for nobody.
                        let mut engine = Engine::open(pins)?;
                        let mut cut = Vec::new();
                        for ep in &endpoints {
                            if engine.get(ep)?.is_some() {
                                let live = redirect::live_flows(&engine, ep)?;
                                redirect::del(&mut engine, ep).await?;
                                cut.push((*ep, live));
                            }
                        }
                        cut
                    }
                };
                for ep in &endpoints {
                    match cut.iter().find(|(c, _)| c == ep) {
                        Some((_, live)) => {
                            println!("deleted {ep} (cut {live} edge flow(s) still open)")
                        }
                        None => println!("deleted {ep}"),
                    }
                }
            }
        }
        RedirectCommand::Follow(args) => {
            let target = args.target.target();
            let resolver = Resolver::new(&args.dns.servers)?;
            let mut tracker =
                HostTracker::new(args.host.clone(), target, RedirectOptions::default());
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
                        _ = tokio::time::sleep(wait) => {}
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
            redirect::drain(&mut engine, &args.endpoint).await?;
            println!("draining {}: no new flows go to the edge", args.endpoint);
            if let Some(secs) = args.delete_after {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
                loop {
                    let live = redirect::live_flows(&engine, &args.endpoint)?;
                    if live == 0 || std::time::Instant::now() >= deadline {
                        if live > 0 {
                            println!(
                                "{live} edge flow(s) still open after {secs} s; deleting anyway"
                            );
                        }
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                redirect::del(&mut engine, &args.endpoint).await?;
                println!("deleted {}", args.endpoint);
            }
        }
        RedirectCommand::List(args) => {
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
