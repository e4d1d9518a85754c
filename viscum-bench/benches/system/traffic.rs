//! B3–B6: real traffic through every lane, interleaved round by round.
//!
//! * B4: request/response, 1-byte TCP (the project's RR tool, one connection).
//! * B5: new connections per second (the project's CRR tool), at 0 / 1k / 10k unrelated
//!   entries or rules for Viscum, iptables and nftables.
//! * B6: bulk TCP, `iperf3` single stream, with busy CPUs from `/proc/stat`; plus a
//!   download (`iperf3 -R`) through a strict, OpenWrt-like edge (`ct state invalid drop`,
//!   `rp_filter = 1`): from the edge copy (`strict-edge`) against the same client
//!   downloading from the cloud through the same edge (`strict-cloud`), with Viscum's reply
//!   counters around each run (see [`crate::lanes::build_strict`]).
//! * B3: bpf stats (`run_time_ns / run_cnt`) of every eBPF program in the lanes, read around
//!   each run of B4–B6, with stats enabled for the whole traffic run.
//!
//! Each round runs every lane once, in alternating order (A B C … C B A …), so slow drift of
//! a shared machine does not favour one variant; ratios are computed per round.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

use crate::{
    lanes::{self, Counters, Env, Kind, Lane, Spec},
    support::{
        cli::Args,
        report::{self, Bar, Fragment, Plot, Row, Series, Table},
        sys,
    },
    tools::{self, CRR_PORT, IPERF_PORT, RR_PORT},
};

const B3: (&str, &str) = ("B3", "In-kernel cost per packet under load (bpf stats)");
const B4: (&str, &str) = ("B4", "Request/response latency, 1-byte TCP");
const B5: (&str, &str) = ("B5", "New connections per second");
const B6: (&str, &str) = ("B6", "Bulk TCP throughput and CPU cost");

/// Durations and counts of one run.
struct Plan {
    rounds: usize,
    warmup: Duration,
    rr: Duration,
    crr: Duration,
    bulk_secs: u32,
    bulk_omit: u32,
    crr_concurrency: usize,
}

impl Plan {
    fn of(args: &Args) -> Plan {
        Plan {
            rounds: args.pick(3, 5),
            warmup: args.pick(Duration::from_millis(200), Duration::from_secs(1)),
            rr: args.pick(Duration::from_secs(1), Duration::from_secs(5)),
            crr: args.pick(Duration::from_secs(1), Duration::from_secs(5)),
            bulk_secs: args.pick(2, 20),
            bulk_omit: args.pick(0, 1),
            crr_concurrency: 8,
        }
    }
}

const W: Spec = Spec::new(Kind::Wire, 0);
const R: Spec = Spec::new(Kind::Route, 0);
const NOOP: Spec = Spec::new(Kind::Noop, 0);
const HOOK: Spec = Spec::new(Kind::Hook, 0);
const V: Spec = Spec::new(Kind::Viscum, 0);
const V1K: Spec = Spec::new(Kind::Viscum, 1_000);
const V10K: Spec = Spec::new(Kind::Viscum, 10_000);
/// Viscum without NAT (`--anyip`): the like-for-like lane for hook and tc-mirred, whose
/// servers answer as the cloud address too; `viscum` (NAT, the default for `--ns`) also
/// pays the address rewrites both ways.
const VA: Spec = Spec::new(Kind::ViscumAnyip, 0);
const IPT: Spec = Spec::new(Kind::Iptables, 0);
const IPT1K: Spec = Spec::new(Kind::Iptables, 1_000);
const IPT10K: Spec = Spec::new(Kind::Iptables, 10_000);
const NFT: Spec = Spec::new(Kind::Nft, 0);
const NFT1K: Spec = Spec::new(Kind::Nft, 1_000);
const NFT10K: Spec = Spec::new(Kind::Nft, 10_000);
const FLOWER: Spec = Spec::new(Kind::Flower, 0);
const PROXY: Spec = Spec::new(Kind::Proxy, 0);

/// Lanes every traffic benchmark uses; B5 adds the filled ones.
const BASE: [Spec; 10] = [W, R, NOOP, HOOK, V, VA, IPT, NFT, FLOWER, PROXY];
const FILLED: [Spec; 6] = [V1K, V10K, IPT1K, IPT10K, NFT1K, NFT10K];
/// B6 only: one strict topology, two lanes ([`lanes::build_strict`]).
const STRICT_EDGE: Spec = Spec::new(Kind::StrictEdge, 0);
const STRICT_CLOUD: Spec = Spec::new(Kind::StrictCloud, 0);
const STRICT: [Spec; 2] = [STRICT_EDGE, STRICT_CLOUD];

pub fn run(args: &Args, env: &Env<'_>, b1: Option<B1Ref>) -> Vec<Fragment> {
    match run_inner(args, env, b1) {
        Ok(f) => f,
        Err(e) => [B3, B4, B5, B6]
            .iter()
            .map(|(id, t)| Fragment::failed(id, t, &e))
            .collect(),
    }
}

/// B1's IPv4 hit, raw ns per packet, that B3 compares against.
pub struct B1Ref {
    /// One packet, repeat 1e6 (cached): the judged reference.
    pub hot_ns: f64,
    /// One run per call over 4k flows (cache-cold, includes the test-run timer reads).
    pub spread_ns: Option<f64>,
    /// The hot hit minus the noop program (B1's headline figure).
    pub hot_net_ns: Option<f64>,
}

/// Per-lane, per-round results of one benchmark (None: that run failed).
type PerLane<T> = BTreeMap<String, Vec<Option<T>>>;

/// B3 accumulator: (benchmark, lane, program) -> per-round (Δtime ns, Δcount).
type ProgDeltas = BTreeMap<(String, String, String), Vec<(u64, u64)>>;

fn run_inner(args: &Args, env: &Env<'_>, b1: Option<B1Ref>) -> Result<Vec<Fragment>> {
    let plan = Plan::of(args);
    let mut notes = Vec::new();
    if !crate::lanes::which("iperf3") {
        bail!("iperf3 is not installed (apt-get install iperf3)");
    }
    // bpf stats for the whole traffic run: every eBPF lane pays the same two clock reads per
    // packet (tens of ns against round trips of tens of µs), the others pay nothing.
    let _stats = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Some(fd),
        Err(e) => {
            notes.push(format!("cannot enable bpf stats ({e}): B3 has no data"));
            None
        }
    };

    // Build every lane up front; a lane that cannot be built is reported, the rest run.
    let mut lanes: Vec<Lane> = Vec::new();
    let mut setup_errors: BTreeMap<String, String> = BTreeMap::new();
    let t0 = Instant::now();
    for (i, spec) in BASE.iter().chain(FILLED.iter()).enumerate() {
        sys::check_stop()?;
        match Lane::build(env, i, *spec).and_then(|mut l| l.verify().map(|()| l)) {
            Ok(l) => lanes.push(l),
            Err(e) => {
                eprintln!("bench: lane {} failed: {e:#}", spec.label());
                setup_errors.insert(spec.label(), format!("{e:#}"));
            }
        }
    }
    sys::check_stop()?;
    match lanes::build_strict(env, BASE.len() + FILLED.len()).and_then(|(mut a, mut b)| {
        a.verify()?;
        b.verify()?;
        Ok((a, b))
    }) {
        Ok((a, b)) => lanes.extend([a, b]),
        Err(e) => {
            eprintln!("bench: strict lanes failed: {e:#}");
            for spec in STRICT {
                setup_errors.insert(spec.label(), format!("{e:#}"));
            }
        }
    }
    notes.push(format!(
        "{} lanes built and verified in {:.1} s",
        lanes.len(),
        t0.elapsed().as_secs_f64()
    ));
    let proxy_tool = lanes.iter().find_map(|l| l.proxy.clone());
    for l in &lanes {
        if let Some(n) = &l.note {
            notes.push(format!("{}: {n}", l.label));
        }
    }

    let base_labels: Vec<String> = BASE.iter().map(Spec::label).collect();
    let all_labels: Vec<String> = BASE.iter().chain(FILLED.iter()).map(Spec::label).collect();
    let mut deltas: ProgDeltas = BTreeMap::new();

    // B4
    let mut rr: PerLane<tools::RrRun> = BTreeMap::new();
    let mut errors: BTreeMap<(String, String), String> = BTreeMap::new();
    interleave(
        &mut lanes,
        &base_labels,
        plan.rounds,
        "RR",
        &mut deltas,
        &mut errors,
        |lane| tools::rr(&lane.client, tools::cloud(RR_PORT), plan.warmup, plan.rr),
    )
    .into_iter()
    .for_each(|(k, v)| {
        rr.insert(k, v);
    });
    // B5
    let mut crr: PerLane<tools::CrrRun> = BTreeMap::new();
    interleave(
        &mut lanes,
        &all_labels,
        plan.rounds,
        "CRR",
        &mut deltas,
        &mut errors,
        |lane| {
            tools::crr(
                &lane.client,
                tools::cloud(CRR_PORT),
                plan.crr_concurrency,
                plan.warmup,
                plan.crr,
            )
        },
    )
    .into_iter()
    .for_each(|(k, v)| {
        crr.insert(k, v);
    });
    // B6: the base lanes and the strict pair, all interleaved.
    let bulk_labels: Vec<String> = BASE.iter().chain(STRICT.iter()).map(Spec::label).collect();
    let mut bulk: PerLane<Bulk> = BTreeMap::new();
    interleave(
        &mut lanes,
        &bulk_labels,
        plan.rounds,
        "bulk",
        &mut deltas,
        &mut errors,
        |lane| bulk_run(lane, plan.bulk_secs, plan.bulk_omit),
    )
    .into_iter()
    .for_each(|(k, v)| {
        bulk.insert(k, v);
    });

    let lane_error = |label: &str, bench: &str| -> Option<String> {
        setup_errors
            .get(label)
            .map(|e| format!("setup: {e}"))
            .or_else(|| errors.get(&(bench.to_owned(), label.to_owned())).cloned())
    };

    let mut common = notes.clone();
    common.push(format!(
        "client pinned to CPU {}, servers (and iperf3 -s) to CPU {}; {} rounds, lanes in alternating order",
        sys::client_cpu(),
        sys::server_cpu(),
        plan.rounds
    ));
    if let Some(p) = &proxy_tool {
        common.push(format!("proxy: {p} in the edge namespace (not pinned)"));
    }
    let b4 = b4_fragment(&plan, &rr, &base_labels, &lane_error, &common);
    let b5 = b5_fragment(&plan, &crr, &all_labels, &lane_error, &common);
    let b6 = b6_fragment(&plan, &bulk, &base_labels, &lane_error, &common);
    let b6 = strict_tables(b6, &bulk, &lane_error);
    let b3 = b3_fragment(&deltas, b1, _stats.is_some(), &common);
    Ok(vec![b3, b4, b5, b6])
}

/// Runs `f` on every lane named in `labels`, `rounds` times, alternating the order; reads the
/// lanes' bpf stats around each run.
fn interleave<T>(
    lanes: &mut [Lane],
    labels: &[String],
    rounds: usize,
    bench: &str,
    deltas: &mut ProgDeltas,
    errors: &mut BTreeMap<(String, String), String>,
    mut f: impl FnMut(&Lane) -> Result<T>,
) -> PerLane<T> {
    let mut out: PerLane<T> = BTreeMap::new();
    let idx: Vec<usize> = labels
        .iter()
        .filter_map(|l| lanes.iter().position(|x| &x.label == l))
        .collect();
    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            idx.clone()
        } else {
            idx.iter().rev().copied().collect()
        };
        for i in order {
            if sys::stopped() {
                return out;
            }
            let lane = &mut lanes[i];
            let label = lane.label.clone();
            let before = lane.prog_stats();
            let r = lane.check().and_then(|()| f(lane));
            let after = lane.prog_stats();
            for (b, a) in before.iter().zip(&after) {
                deltas
                    .entry((bench.to_owned(), label.clone(), a.name.clone()))
                    .or_default()
                    .push((
                        a.run_time_ns.saturating_sub(b.run_time_ns),
                        a.run_cnt.saturating_sub(b.run_cnt),
                    ));
            }
            let slot = out
                .entry(label.clone())
                .or_insert_with(|| (0..rounds).map(|_| None).collect());
            match r {
                Ok(v) => slot[round] = Some(v),
                Err(e) => {
                    eprintln!("bench: {bench} {label} round {round}: {e:#}");
                    errors.insert((bench.to_owned(), label), format!("{e:#}"));
                }
            }
            eprint!(".");
        }
    }
    eprintln!(" {bench} done");
    out
}

/// Values of one metric per round for a lane (NaN where the run failed).
fn series<T>(m: &PerLane<T>, label: &str, get: impl Fn(&T) -> f64) -> Vec<f64> {
    m.get(label)
        .map(|v| {
            v.iter()
                .map(|x| x.as_ref().map(&get).unwrap_or(f64::NAN))
                .collect()
        })
        .unwrap_or_default()
}

/// Per-round ratio a/b over the rounds where both exist.
fn per_round(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(x, y)| x / y)
        .filter(|r| r.is_finite())
        .collect()
}

/// A target in words and its check on the median.
type Target = Option<(&'static str, fn(f64) -> bool)>;

/// A ratio row "A / B" with an optional target.
fn ratio_row(name: &str, a: &[f64], b: &[f64], target: Target) -> Row {
    let r = per_round(a, b);
    if r.is_empty() {
        return Row::failed(name, "no round with both variants measured");
    }
    let row = Row::new(name, "×", r);
    match target {
        Some((t, check)) => row.target_value(t, check),
        None => row,
    }
}

fn lane_row(label: &str, unit: &str, values: Vec<f64>, err: Option<String>) -> Row {
    if values.iter().all(|v| !v.is_finite()) {
        return Row::failed(label, err.unwrap_or_else(|| "not measured".into()));
    }
    let mut row = Row::new(label, unit, values);
    if let Some(e) = err {
        row = row.note(format!("some rounds failed: {e}"));
    }
    row
}

fn b4_fragment(
    plan: &Plan,
    rr: &PerLane<tools::RrRun>,
    labels: &[String],
    lane_error: &dyn Fn(&str, &str) -> Option<String>,
    common: &[String],
) -> Fragment {
    let mut f = Fragment::new(B4.0, B4.1);
    f.notes.extend(common.iter().cloned());
    f.note(format!(
        "one connection, 1-byte request and response, TCP_NODELAY; {:?} per run after {:?} warm-up; every round trip timed",
        plan.rr, plan.warmup
    ));
    let tps = |l: &str| series(rr, l, |r| r.tps);
    let q = |l: &str, p: f64| series(rr, l, move |r| report::quantile_u32(&r.lat_ns, p) / 1000.0);
    let mut rows = Vec::new();
    let mut cdf = Vec::new();
    let mut raw = serde_json::Map::new();
    for l in labels {
        let row = lane_row(l, "transactions/s", tps(l), lane_error(l, "RR"));
        let p50 = report::Stat::of(&q(l, 0.5)).map(|s| s.median);
        let p99 = report::Stat::of(&q(l, 0.99)).map(|s| s.median);
        let row = match (p50, p99) {
            (Some(a), Some(b)) => row.note(format!("p50 {a:.1} µs, p99 {b:.1} µs")),
            _ => row,
        };
        rows.push(row);
        let pooled: Vec<f64> = rr
            .get(l)
            .map(|v| {
                v.iter()
                    .flatten()
                    .flat_map(|r| r.lat_ns.iter().map(|&x| f64::from(x) / 1000.0))
                    .collect()
            })
            .unwrap_or_default();
        if !pooled.is_empty() {
            cdf.push(Series {
                name: l.clone(),
                points: report::cdf_points(&pooled),
            });
        }
        raw.insert(l.clone(), json!({ "tps": tps(l), "p50_us": q(l, 0.5), "p99_us": q(l, 0.99), "p999_us": q(l, 0.999) }));
    }
    let bars: Vec<Bar> = rows.iter().filter_map(Bar::from_row).collect();
    f.tables.push(Table {
        title: "transactions per second (p50/p99: medians over rounds)".into(),
        rows,
    });

    let t = |n: &str| tps(n);
    let mut r = vec![
        ratio_row(
            "viscum / route",
            &t("viscum"),
            &t("route"),
            Some(("≥ 1.0", |x| x >= 1.0)),
        ),
        ratio_row(
            "viscum / hook",
            &t("viscum"),
            &t("hook"),
            Some(("≥ 0.97", |x| x >= 0.97)),
        ),
        ratio_row(
            "noop / route",
            &t("noop"),
            &t("route"),
            Some(("≥ 0.98", |x| x >= 0.98)),
        ),
        ratio_row(
            "viscum / iptables DNAT",
            &t("viscum"),
            &t("iptables"),
            Some(("≥ 1.0", |x| x >= 1.0)),
        ),
        ratio_row(
            "viscum / tc-mirred",
            &t("viscum"),
            &t("tc-mirred"),
            Some(("≥ 1.05", |x| x >= 1.05)),
        ),
        ratio_row(
            "viscum / proxy",
            &t("viscum"),
            &t("proxy"),
            Some(("≥ 1.8", |x| x >= 1.8)),
        ),
        ratio_row(
            "viscum p99 / proxy p99",
            &q("viscum", 0.99),
            &q("proxy", 0.99),
            Some(("≤ 0.6", |x| x <= 0.6)),
        ),
        ratio_row("viscum / nftables DNAT", &t("viscum"), &t("nft"), None),
        ratio_row("viscum-anyip / hook", &t("viscum-anyip"), &t("hook"), None),
        ratio_row(
            "viscum-anyip / tc-mirred",
            &t("viscum-anyip"),
            &t("tc-mirred"),
            None,
        ),
        ratio_row(
            "viscum / viscum-anyip (NAT's share)",
            &t("viscum"),
            &t("viscum-anyip"),
            None,
        ),
        ratio_row("route / wire", &t("route"), &t("wire"), None),
    ];
    for row in &mut r {
        if row.unit == "×" && row.name.contains("p99") {
            row.note = Some("latency ratio: lower is better".into());
        }
    }
    f.tables.push(Table {
        title: "ratios of transactions/s (per round)".into(),
        rows: r,
    });
    f.plots.push(Plot::Bars {
        file: "b4-tps".into(),
        title: "B4: 1-byte TCP request/response".into(),
        unit: "transactions/s".into(),
        bars,
    });
    f.plots.push(Plot::Cdf {
        file: "b4-latency-cdf".into(),
        title: "B4: round-trip time, all rounds".into(),
        unit: "µs".into(),
        log_x: true,
        series: cdf,
    });
    f.raw = serde_json::Value::Object(raw);
    f.finish()
}

fn b5_fragment(
    plan: &Plan,
    crr: &PerLane<tools::CrrRun>,
    labels: &[String],
    lane_error: &dyn Fn(&str, &str) -> Option<String>,
    common: &[String],
) -> Fragment {
    let mut f = Fragment::new(B5.0, B5.1);
    f.notes.extend(common.iter().cloned());
    f.note(format!(
        "{} concurrent connections each looping connect / 1 byte / 1 byte / close (server closes first); {:?} per run after {:?} warm-up",
        plan.crr_concurrency, plan.crr, plan.warmup
    ));
    f.note("@1k/@10k: that many unrelated entries (Viscum map), DNAT rules before the service's own (iptables, which walks them for every new connection) or verdict-map elements (nftables), besides the service's own 4 ports");
    f.note("DNAT edges run with nf_conntrack_tcp_timeout_time_wait = 10 s so the table never fills during a run");
    let c = |l: &str| series(crr, l, |r| r.conns_per_s);
    let mut rows = Vec::new();
    let mut raw = serde_json::Map::new();
    for l in labels {
        let errs: u64 = crr
            .get(l.as_str())
            .map(|v| v.iter().flatten().map(|r| r.errors).sum())
            .unwrap_or(0);
        let mut row = lane_row(l, "connections/s", c(l), lane_error(l, "CRR"));
        if errs > 0 {
            row = row.note(format!("{errs} failed transactions"));
        }
        rows.push(row);
        raw.insert(l.clone(), json!({ "conns_per_s": c(l), "errors": errs }));
    }
    let bars: Vec<Bar> = rows.iter().filter_map(Bar::from_row).collect();
    f.tables.push(Table {
        title: "new connections per second".into(),
        rows,
    });
    let r = vec![
        ratio_row(
            "viscum / iptables (service only)",
            &c("viscum"),
            &c("iptables"),
            Some(("≥ 1.1", |x| x >= 1.1)),
        ),
        ratio_row(
            "viscum@10k / iptables@10k",
            &c("viscum@10k"),
            &c("iptables@10k"),
            Some(("≥ 1.5", |x| x >= 1.5)),
        ),
        ratio_row(
            "viscum@10k / viscum",
            &c("viscum@10k"),
            &c("viscum"),
            Some(("≥ 0.95 (loses ≤ 5 %)", |x| x >= 0.95)),
        ),
        ratio_row(
            "viscum / proxy",
            &c("viscum"),
            &c("proxy"),
            Some(("≥ 3", |x| x >= 3.0)),
        ),
        ratio_row(
            "viscum@1k / iptables@1k",
            &c("viscum@1k"),
            &c("iptables@1k"),
            None,
        ),
        ratio_row("viscum / nft", &c("viscum"), &c("nft"), None),
        ratio_row(
            "viscum@10k / nft@10k",
            &c("viscum@10k"),
            &c("nft@10k"),
            None,
        ),
        ratio_row(
            "iptables@10k / iptables",
            &c("iptables@10k"),
            &c("iptables"),
            None,
        ),
        ratio_row("viscum / route", &c("viscum"), &c("route"), None),
        ratio_row("viscum / hook", &c("viscum"), &c("hook"), None),
        ratio_row("noop / route", &c("noop"), &c("route"), None),
        ratio_row("viscum / tc-mirred", &c("viscum"), &c("tc-mirred"), None),
        ratio_row("viscum-anyip / hook", &c("viscum-anyip"), &c("hook"), None),
        ratio_row(
            "viscum-anyip / tc-mirred",
            &c("viscum-anyip"),
            &c("tc-mirred"),
            None,
        ),
        ratio_row(
            "viscum / viscum-anyip (NAT's share)",
            &c("viscum"),
            &c("viscum-anyip"),
            None,
        ),
    ];
    f.tables.push(Table {
        title: "ratios of connections/s (per round)".into(),
        rows: r,
    });
    f.plots.push(Plot::Bars {
        file: "b5-crr".into(),
        title: "B5: new connections per second".into(),
        unit: "connections/s".into(),
        bars,
    });
    let mut series_v = Vec::new();
    for kind in ["viscum", "iptables", "nft"] {
        let pts: Vec<[f64; 2]> = [
            (0u32, kind.to_string()),
            (1_000, format!("{kind}@1k")),
            (10_000, format!("{kind}@10k")),
        ]
        .iter()
        .filter_map(|(n, l)| report::Stat::of(&c(l)).map(|s| [f64::from(*n) + 1.0, s.median]))
        .collect();
        series_v.push(Series {
            name: kind.into(),
            points: pts,
        });
    }
    f.plots.push(Plot::Lines {
        file: "b5-scaling".into(),
        title: "B5: connections/s vs unrelated rules".into(),
        x_label: "unrelated entries or rules + 1".into(),
        y_label: "connections/s".into(),
        log_x: true,
        log_y: false,
        series: series_v,
    });
    f.raw = serde_json::Value::Object(raw);
    f.finish()
}

/// One iperf3 run.
pub struct Bulk {
    pub gbps: f64,
    pub busy_cores: f64,
    pub retransmits: u64,
    /// The lane's counters before and after the run (strict lanes).
    pub counters: Option<(Counters, Counters)>,
}

impl Bulk {
    /// Growth of one of Viscum's global counters during the run.
    fn viscum_delta(&self, get: impl Fn(&viscum::engine::GlobalStats) -> u64) -> Option<u64> {
        let (a, b) = self.counters.as_ref()?;
        Some(get(b.viscum.as_ref()?).saturating_sub(get(a.viscum.as_ref()?)))
    }

    /// Packets the strict firewall dropped during the run.
    fn drops_delta(&self) -> Option<u64> {
        let (a, b) = self.counters.as_ref()?;
        Some(b.invalid_drops?.saturating_sub(a.invalid_drops?))
    }
}

/// One B6 run on `lane`: upload to its server, or for the strict lanes a download with the
/// lane's counters read around it.
fn bulk_run(lane: &Lane, secs: u32, omit: u32) -> Result<Bulk> {
    let strict = lane.firewall.is_some() || lane.engine.is_some();
    let before = strict.then(|| lane.counters());
    let mut b = iperf(&lane.client, lane.iperf_addr, lane.download, secs, omit)?;
    if let Some(before) = before {
        b.counters = Some((before, lane.counters()));
    }
    Ok(b)
}

fn iperf(
    client: &str,
    addr: std::net::Ipv4Addr,
    download: bool,
    secs: u32,
    omit: u32,
) -> Result<Bulk> {
    let mut cmd = sys::command_in(Some(client), None, "iperf3")?;
    if download {
        cmd.arg("-R");
    }
    cmd.args([
        "-c",
        &addr.to_string(),
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &secs.to_string(),
        "-O",
        &omit.to_string(),
        "-A",
        &sys::client_cpu().to_string(),
        "-J",
    ]);
    let a = sys::cpu_times();
    let done = sys::run(
        &mut cmd,
        None,
        Duration::from_secs(u64::from(secs + omit) + 20),
    )?;
    let b = sys::cpu_times();
    let v: serde_json::Value = serde_json::from_str(&done.stdout)
        .with_context(|| format!("iperf3 printed no JSON: {}", done.stderr.trim()))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    if !done.status.success() {
        bail!("iperf3 failed ({}): {}", done.status, done.stderr.trim());
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON has no end.sum_received.bits_per_second")?;
    Ok(Bulk {
        gbps: bps / 1e9,
        busy_cores: sys::busy_cores(a, b),
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        counters: None,
    })
}

fn b6_fragment(
    plan: &Plan,
    bulk: &PerLane<Bulk>,
    labels: &[String],
    lane_error: &dyn Fn(&str, &str) -> Option<String>,
    common: &[String],
) -> Fragment {
    let mut f = Fragment::new(B6.0, B6.1);
    f.notes.extend(common.iter().cloned());
    f.note(format!(
        "iperf3, one stream, {} s (first {} s omitted), received rate; busy cores = non-idle share of all CPUs in /proc/stat during the run × CPUs",
        plan.bulk_secs, plan.bulk_omit
    ));
    let g = |l: &str| series(bulk, l, |b| b.gbps);
    let pc = |l: &str| series(bulk, l, |b| b.gbps / b.busy_cores);
    let mut rows = Vec::new();
    let mut per_core_rows = Vec::new();
    let mut raw = serde_json::Map::new();
    for l in labels {
        let cores = report::Stat::of(&series(bulk, l, |b| b.busy_cores)).map(|s| s.median);
        let retr: u64 = bulk
            .get(l.as_str())
            .map(|v| v.iter().flatten().map(|b| b.retransmits).sum())
            .unwrap_or(0);
        let mut row = lane_row(l, "Gbit/s", g(l), lane_error(l, "bulk"));
        if let Some(c) = cores {
            row = row.note(format!("{c:.2} busy cores, {retr} retransmits"));
        }
        rows.push(row);
        per_core_rows.push(lane_row(l, "Gbit/s per busy core", pc(l), None));
        raw.insert(l.clone(), json!({ "gbps": g(l), "busy_cores": series(bulk, l, |b| b.busy_cores), "retransmits": retr }));
    }
    let bars: Vec<Bar> = rows.iter().filter_map(Bar::from_row).collect();
    let bars_pc: Vec<Bar> = per_core_rows.iter().filter_map(Bar::from_row).collect();
    f.tables.push(Table {
        title: "throughput".into(),
        rows,
    });
    f.tables.push(Table {
        title: "throughput per busy core".into(),
        rows: per_core_rows,
    });
    let r = vec![
        ratio_row(
            "viscum / route, raw",
            &g("viscum"),
            &g("route"),
            Some(("≥ 0.9", |x| x >= 0.9)),
        ),
        ratio_row(
            "viscum / route, per core",
            &pc("viscum"),
            &pc("route"),
            Some(("≥ 1.0", |x| x >= 1.0)),
        ),
        ratio_row(
            "viscum / proxy, per core",
            &pc("viscum"),
            &pc("proxy"),
            Some(("≥ 2", |x| x >= 2.0)),
        ),
        ratio_row("viscum / hook, raw", &g("viscum"), &g("hook"), None),
        ratio_row(
            "viscum / iptables, per core",
            &pc("viscum"),
            &pc("iptables"),
            None,
        ),
        ratio_row(
            "viscum / tc-mirred, per core",
            &pc("viscum"),
            &pc("tc-mirred"),
            None,
        ),
        ratio_row(
            "viscum-anyip / hook, raw",
            &g("viscum-anyip"),
            &g("hook"),
            None,
        ),
        ratio_row(
            "viscum-anyip / tc-mirred, per core",
            &pc("viscum-anyip"),
            &pc("tc-mirred"),
            None,
        ),
    ];
    f.tables.push(Table {
        title: "ratios (per round)".into(),
        rows: r,
    });
    f.plots.push(Plot::Bars {
        file: "b6-throughput".into(),
        title: "B6: bulk TCP, one stream".into(),
        unit: "Gbit/s".into(),
        bars,
    });
    f.plots.push(Plot::Bars {
        file: "b6-per-core".into(),
        title: "B6: Gbit/s per busy core".into(),
        unit: "Gbit/s per core".into(),
        bars: bars_pc,
    });
    f.raw = serde_json::Value::Object(raw);
    f.finish()
}

/// Fewest packets per run (mean over rounds) for a program's per-packet figure: below it the
/// program is not on the lane's path (the reply program of the strict-cloud lane sees only
/// the namespace's own stray packets) and the figure would be a few cold runs, not a cost.
/// The report's goal table applies the same floor to older results
/// (`B3_MIN_PACKETS_PER_RUN` in `xtask/src/bench/compare.rs`).
const MIN_PACKETS_PER_RUN: f64 = 100.0;

fn b3_fragment(
    deltas: &ProgDeltas,
    b1: Option<B1Ref>,
    enabled: bool,
    common: &[String],
) -> Fragment {
    let mut f = Fragment::new(B3.0, B3.1);
    if !enabled {
        f.status = report::Status::Error;
        f.error = Some("bpf stats could not be enabled".into());
        return f;
    }
    f.notes.extend(common.iter().cloned());
    f.note("bpf stats enabled (BPF_ENABLE_STATS) for the whole traffic run; each figure is Δrun_time_ns / Δrun_cnt of one program over one run, median over rounds");
    match &b1 {
        Some(r) => f.note(format!(
            "reference: B1 hit IPv4, {:.0} ns raw hot ({} over noop) and {} raw spread (cache-cold single runs, incl. ~35 ns of timer reads)",
            r.hot_ns,
            r.hot_net_ns.map(|s| format!("{s:.0} ns")).unwrap_or_else(|| "–".into()),
            r.spread_ns.map(|s| format!("{s:.0} ns")).unwrap_or_else(|| "–".into())
        )),
        None => f.note("no B1 reference available: ratios left out"),
    }
    let mut rows = Vec::new();
    let mut raw = serde_json::Map::new();
    let mut off_path = Vec::new();
    for ((bench, lane, prog), v) in deltas {
        let pkts: u64 = v.iter().map(|(_, c)| c).sum();
        let mean_pkts = pkts as f64 / v.len().max(1) as f64;
        if mean_pkts < MIN_PACKETS_PER_RUN {
            // Not on this lane's path: a packet now and then of the namespace's own traffic
            // (each cache-cold) is no per-packet cost of the benchmark's.
            if pkts > 0 {
                off_path.push(format!("{prog} in {lane}, {bench} ({mean_pkts:.1})"));
            }
            raw.insert(format!("{bench}/{lane}/{prog}"), json!(v));
            continue;
        }
        let per: Vec<f64> = v
            .iter()
            .filter(|(_, c)| *c > 0)
            .map(|(t, c)| *t as f64 / *c as f64)
            .collect();
        let mut row = Row::new(
            format!("{prog} in {lane}, {bench}"),
            "ns per packet",
            per.clone(),
        )
        .note(format!(
            "{:.0} packets per run",
            pkts as f64 / v.len().max(1) as f64
        ));
        if prog == "viscum_ingress"
            && let Some(r) = &b1
        {
            let ratios: Vec<f64> = per.iter().map(|x| x / r.hot_ns).collect();
            if let (Some(s), Some(m)) = (r.spread_ns, report::Stat::of(&per)) {
                row = row.note(format!("{:.2}× B1 spread hit", m.median / s));
            }
            row = row.ratio("B1 hit IPv4 (hot, raw)", ratios);
        }
        rows.push(row);
        raw.insert(format!("{bench}/{lane}/{prog}"), json!(v));
    }
    if !off_path.is_empty() {
        f.note(format!(
            "left out, fewer than {MIN_PACKETS_PER_RUN:.0} packets per run (not on the lane's path; raw counts kept): {}",
            off_path.join(", ")
        ));
    }
    // Net of the measurement itself: with stats on, every run pays clock reads that
    // bench_noop (which does nothing) shows on its own; subtracting it per round leaves the
    // classifier's work, comparable with B1's "hit over noop".
    let per_round = |v: &Vec<(u64, u64)>| -> Vec<Option<f64>> {
        v.iter()
            .map(|(t, c)| (*c > 0).then(|| *t as f64 / *c as f64))
            .collect()
    };
    let mut net_rows = Vec::new();
    for ((bench, lane, prog), v) in deltas {
        // The strict pair (B6 only) is reported in the raw table: its downloads make the
        // classifier see ACKs (strict-edge) or only misses (strict-cloud), not B1's hit.
        if prog != "viscum_ingress" || lane.starts_with("strict") {
            continue;
        }
        let Some(noop) = deltas.get(&(bench.clone(), "noop".to_owned(), "bench_noop".to_owned()))
        else {
            continue;
        };
        let net: Vec<f64> = per_round(v)
            .iter()
            .zip(per_round(noop))
            .filter_map(|(a, b)| Some((*a)? - b?))
            .collect();
        if net.is_empty() {
            continue;
        }
        let mut row = Row::new(
            format!("viscum_ingress − bench_noop, {lane}, {bench}"),
            "ns per packet",
            net.clone(),
        );
        if let Some(r) = &b1
            && let Some(b1_net) = r.hot_net_ns
        {
            let ratios: Vec<f64> = net.iter().map(|x| x / b1_net).collect();
            row = row
                .ratio("B1 hit IPv4 over noop (hot)", ratios)
                .target_ratio("≤ 1.5× B1 hit", |x| x <= 1.5);
        }
        net_rows.push(row);
    }
    let bars: Vec<Bar> = rows
        .iter()
        .filter(|r| r.name.contains(" in viscum,"))
        .filter_map(Bar::from_row)
        .collect();
    if !net_rows.is_empty() {
        f.tables.push(Table {
            title: "viscum_ingress net of the bench_noop program under the same load (per round; the judged figure)".into(),
            rows: net_rows,
        });
    }
    f.tables.push(Table {
        title: "ns per packet inside the kernel, by program, lane and benchmark (raw run_time_ns / run_cnt)".into(),
        rows,
    });
    if !bars.is_empty() {
        f.plots.push(Plot::Bars {
            file: "b3-run-time".into(),
            title: "B3: viscum programs, ns per packet under load".into(),
            unit: "ns".into(),
            bars,
        });
    }
    f.raw = serde_json::Value::Object(raw);
    f.finish()
}

/// B6's strict-edge section: the edge copy's download against the cloud's through the same
/// strict edge, CPU cost, and the reply classifier's and the firewall's counters.
fn strict_tables(
    mut f: Fragment,
    bulk: &PerLane<Bulk>,
    lane_error: &dyn Fn(&str, &str) -> Option<String>,
) -> Fragment {
    let (se, sc) = (STRICT_EDGE.label(), STRICT_CLOUD.label());
    f.note(format!(
        "{se} / {sc}: one OpenWrt-like edge (nft `table inet` forward chain `ct state invalid drop`, nf_conntrack_tcp_loose = 0, rp_filter = 1 on all, default, lan0, wan0 and the service veth) with a cloud namespace behind wan0 and a `viscum ns add` namespace; \
         iperf3 -R (the server sends) from the same client, {se} from 198.51.100.7:5201 (redirected: the edge copy serves, through the classifier and the reply classifier), {sc} from 198.51.100.8:5201 (the cloud's iperf3 -s, forwarded by the edge through the firewall; a classifier miss at lan0); \
         server pinned like the others; interleaved with the lanes above"
    ));
    let g = |l: &str| series(bulk, l, |b| b.gbps);
    let pc = |l: &str| series(bulk, l, |b| b.gbps / b.busy_cores);
    let mut rows = Vec::new();
    let mut per_core = Vec::new();
    let mut raw = serde_json::Map::new();
    for (l, what) in [
        (&se, "edge copy (viscum) through the strict edge"),
        (&sc, "cloud through the strict edge"),
    ] {
        let cores = report::Stat::of(&series(bulk, l, |b| b.busy_cores)).map(|s| s.median);
        let retr: u64 = bulk
            .get(l.as_str())
            .map(|v| v.iter().flatten().map(|b| b.retransmits).sum())
            .unwrap_or(0);
        let mut row = lane_row(
            &format!("{l}: {what}"),
            "Gbit/s",
            g(l),
            lane_error(l, "bulk"),
        );
        if let Some(c) = cores {
            row = row.note(format!("{c:.2} busy cores, {retr} retransmits"));
        }
        rows.push(row);
        per_core.push(lane_row(l, "Gbit/s per busy core", pc(l), None));
        let d = |get: fn(&viscum::engine::GlobalStats) -> u64| -> Vec<Option<u64>> {
            bulk.get(l.as_str())
                .map(|v| {
                    v.iter()
                        .map(|b| b.as_ref().and_then(|b| b.viscum_delta(get)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let drops: Vec<Option<u64>> = bulk
            .get(l.as_str())
            .map(|v| {
                v.iter()
                    .map(|b| b.as_ref().and_then(Bulk::drops_delta))
                    .collect()
            })
            .unwrap_or_default();
        raw.insert(
            l.clone(),
            json!({
                "gbps": g(l),
                "busy_cores": series(bulk, l, |b| b.busy_cores),
                "retransmits": retr,
                "replies_forwarded": d(|s| s.replies_forwarded),
                "replies_to_stack": d(|s| s.replies_to_stack),
                "replies_unknown": d(|s| s.replies_unknown),
                "redirected": d(|s| s.redirected),
                "passed": d(|s| s.passed),
                "invalid_drops": drops,
            }),
        );
    }
    let bars: Vec<Bar> = rows.iter().filter_map(Bar::from_row).collect();
    f.tables.push(Table {
        title: "download (iperf3 -R) through a strict edge: edge copy vs cloud, same run".into(),
        rows,
    });
    f.tables.push(Table {
        title: "download through a strict edge, per busy core".into(),
        rows: per_core,
    });
    f.tables.push(Table {
        title: "download through a strict edge: ratios (per round)".into(),
        rows: vec![
            ratio_row(
                "edge copy / cloud through the strict edge, raw",
                &g(&se),
                &g(&sc),
                Some(("≥ 0.9", |x| x >= 0.9)),
            ),
            ratio_row(
                "edge copy / cloud through the strict edge, per core",
                &pc(&se),
                &pc(&sc),
                None,
            ),
        ],
    });

    // Counters per run (deltas around each iperf3 run).
    let per_run = |l: &str, get: &dyn Fn(&Bulk) -> Option<u64>| -> Vec<f64> {
        bulk.get(l)
            .map(|v| {
                v.iter()
                    .map(|b| b.as_ref().and_then(get).map_or(f64::NAN, |x| x as f64))
                    .collect()
            })
            .unwrap_or_default()
    };
    let fwd = per_run(&se, &|b| b.viscum_delta(|s| s.replies_forwarded));
    let stack = per_run(&se, &|b| b.viscum_delta(|s| s.replies_to_stack));
    let counted = |name: &str, v: Vec<f64>| -> Row {
        if v.iter().all(|x| !x.is_finite()) {
            Row::failed(name, "not read")
        } else {
            Row::new(name, "packets per run", v)
        }
    };
    let share: Vec<f64> = stack
        .iter()
        .zip(&fwd)
        .map(|(s, f)| s / (s + f))
        .filter(|x| x.is_finite())
        .collect();
    let mut counter_rows = vec![
        counted(&format!("replies_forwarded, {se}"), fwd.clone())
            .note("replies the reply classifier redirected to the client itself (GSO super-packets count once)"),
        counted(&format!("replies_to_stack, {se}"), stack.clone())
            .note("replies handed to the kernel's forward path (where the firewall and rp_filter apply)"),
        if share.is_empty() {
            Row::failed("replies_to_stack share, strict-edge", "no counters")
        } else {
            Row::new(
                format!("replies_to_stack / (forwarded + to_stack), {se}"),
                "×",
                share,
            )
        },
        counted(
            &format!("replies_unknown, {se}"),
            per_run(&se, &|b| b.viscum_delta(|s| s.replies_unknown)),
        ),
        counted(
            &format!("redirected (classifier hits), {se}"),
            per_run(&se, &|b| b.viscum_delta(|s| s.redirected)),
        ),
        counted(
            &format!("redirected (classifier hits), {sc}"),
            per_run(&sc, &|b| b.viscum_delta(|s| s.redirected)),
        )
        .note("the cloud path must not be redirected"),
    ];
    for l in [&se, &sc] {
        counter_rows.push(
            counted(
                &format!("ct state invalid drops at the edge, {l}"),
                per_run(l, &|b| b.drops_delta()),
            )
            .note("the firewall rule's counter"),
        );
    }
    f.tables.push(Table {
        title: "download through a strict edge: counters per run (viscum global counters and the firewall's, deltas around each run; medians over rounds)".into(),
        rows: counter_rows,
    });
    f.plots.push(Plot::Bars {
        file: "b6-strict-edge".into(),
        title: "B6: download through a strict edge (iperf3 -R, one stream)".into(),
        unit: "Gbit/s".into(),
        bars,
    });
    if let serde_json::Value::Object(m) = &mut f.raw {
        m.insert("strict".into(), serde_json::Value::Object(raw));
    }
    f.finish()
}
