//! B7: the control plane.
//!
//! * Entry updates through the library (`Engine::insert`, what `viscum redirect add` and the
//!   daemon call), one at a time and each timed, into a map already holding 0 / 10k / 1M
//!   entries (quick: 0 / 10k / 100k), interleaved in batches across the fill levels.
//! * The same kind of update with the tools a user would pick instead, one process per
//!   update as scripts and kube-proxy-like agents do: `iptables -A`, one-rule
//!   `iptables-restore --noflush`, `nft add element` (and `iptables-legacy -A` when present),
//!   into 1k / 10k / 100k existing rules (quick: 1k / 10k).
//! * Time to effect: a client probing the cloud address back to back (a new connection every
//!   ~0.1 ms, each answered by 'K' for the cloud or 'S' for the edge copy); from the start of
//!   `viscum redirect add` until the first probe served locally, and from the start of
//!   `viscum redirect del` until the first one served by the cloud again. Then the same with
//!   a daemon of the instance running (`viscum run`, no services), to which the commands hand
//!   the change, interleaved with `--no-daemon` rounds (the CLI alone, same conditions). Also
//!   through the library (`redirect::add` in-process), which leaves out process start-up.
//!   Every timed `viscum` is started in the edge namespace as a shell there would start it:
//!   `posix_spawn` from a thread that entered the namespace (`Viscum::run_spawned`), not
//!   under `ip netns exec`, whose private mount namespace and fresh `/sys` mount a user on a
//!   router never pays, and not by a `fork` of this large, busy benchmark process: the
//!   figures are the CLI's, not iproute2's or the harness's. Its clock starts just before the
//!   spawn; wall times are stamped when the process exits (`sys::wait_rusage`). The process
//!   floors (`/bin/true`, `viscum --version`) are started the same way in the same rounds.

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;
use serde_json::json;
use viscum::{
    endpoint::Endpoint,
    engine::{Engine, Pins},
};
use viscum_common::{ServiceEntry, TARGET_F_PEER};
use viscum_lab::Netns;

use crate::{
    daemon::Daemon,
    lanes::{self, Env},
    support::{
        cli::Args,
        netns::{self, exec_in, ip},
        report::{self, Bar, Fragment, Plot, Row, Series, Table},
        sys::{self, Proc},
    },
    tools::{self, IDENT_PORT, Prober},
    viscum_cli::Viscum,
};

const B7: (&str, &str) = ("B7", "Control plane: update latency and time to effect");

pub fn run(args: &Args, env: &Env<'_>) -> Vec<Fragment> {
    match run_inner(args, env) {
        Ok(f) => vec![f],
        Err(e) => vec![Fragment::failed(B7.0, B7.1, &e)],
    }
}

fn run_inner(args: &Args, env: &Env<'_>) -> Result<Fragment> {
    let mut f = Fragment::new(B7.0, B7.1);
    let engine_fills: Vec<u32> = args.pick(vec![0, 10_000, 100_000], vec![0, 10_000, 1_000_000]);
    let updates: u32 = args.pick(20_000, 100_000);
    let rule_fills: Vec<u32> = args.pick(vec![1_000, 10_000], vec![1_000, 10_000, 100_000]);
    let invocations: usize = args.pick(10, 50);
    let rounds: usize = args.pick(3, 10);

    // 1. Library updates.
    let eng = match engine_updates(env, &engine_fills, updates) {
        Ok(v) => v,
        Err(e) => {
            f.note(format!("engine updates failed: {e:#}"));
            Vec::new()
        }
    };
    sys::check_stop()?;
    // 2. The alternatives, per process.
    let tools_res = rule_tools(env, &rule_fills, invocations);
    sys::check_stop()?;
    // 3. Time to effect.
    let tte = time_to_effect(env, rounds);

    // Tables.
    let mut rows = Vec::new();
    let mut raw_eng = serde_json::Map::new();
    let mut p50_at: Vec<(u32, f64)> = Vec::new();
    for (fill, lat) in &eng {
        let us: Vec<f64> = lat.iter().map(|&ns| f64::from(ns) / 1000.0).collect();
        let mut sorted = us.clone();
        sorted.sort_by(f64::total_cmp);
        let p50 = report::quantile_sorted(&sorted, 0.5);
        let p99 = report::quantile_sorted(&sorted, 0.99);
        p50_at.push((*fill, p50));
        // Row value: per-batch p50s (one sample per interleaved batch), target on the median.
        let batches: Vec<f64> = lat
            .chunks(lat.len().div_ceil(rounds.max(1)).max(1))
            .map(|c| report::quantile_u32(c, 0.5) / 1000.0)
            .collect();
        let row = Row::new(
            format!("Engine::insert, map holding {}", human(*fill)),
            "µs (p50)",
            batches,
        )
        .target_value("p50 ≤ 5 µs", |v| v <= 5.0)
        .note(format!(
            "p99 {p99:.1} µs, max {:.0} µs, {} updates",
            sorted.last().copied().unwrap_or(f64::NAN),
            us.len()
        ));
        rows.push(row);
        let p99_row = Row::new(
            format!("Engine::insert p99, map holding {}", human(*fill)),
            "µs",
            vec![p99],
        )
        .target_value("≤ 50 µs", |v| v <= 50.0);
        rows.push(p99_row);
        raw_eng.insert(
            human(*fill),
            json!({ "p50_us": p50, "p99_us": p99, "updates": us.len() }),
        );
    }
    if let (Some(first), Some(last)) = (p50_at.first(), p50_at.last())
        && first.1 > 0.0
    {
        rows.push(
            Row::new(
                format!(
                    "flatness: p50 at {} / p50 at {}",
                    human(last.0),
                    human(first.0)
                ),
                "×",
                vec![last.1 / first.1],
            )
            .target_value("flat (≤ 2×)", |v| v <= 2.0),
        );
    }
    f.tables.push(Table {
        title: format!("library updates, {updates} per fill level, each timed (µs)"),
        rows,
    });

    let mut rows = Vec::new();
    let viscum_p50_10k = p50_at.iter().find(|(n, _)| *n == 10_000).map(|x| x.1);
    let mut raw_tools = serde_json::Map::new();
    let mut tool_series: Vec<Series> = Vec::new();
    for (tool, per_fill) in &tools_res {
        let mut pts = Vec::new();
        for (fill, r) in per_fill {
            match r {
                Ok(lat_us) => {
                    let mut s = lat_us.clone();
                    s.sort_by(f64::total_cmp);
                    let p50 = report::quantile_sorted(&s, 0.5);
                    let p99 = report::quantile_sorted(&s, 0.99);
                    let mut row = Row::new(
                        format!("{tool}, {} rules", human(*fill)),
                        "µs per update",
                        lat_us.clone(),
                    )
                    .note(format!("p99 {p99:.0} µs"));
                    if *fill == 10_000
                        && let Some(v) = viscum_p50_10k
                    {
                        let ratios: Vec<f64> = lat_us.iter().map(|x| x / v).collect();
                        row = row.ratio("Engine::insert p50 at 10k", ratios);
                        if tool.starts_with("iptables -A") || tool.starts_with("iptables-legacy -A")
                        {
                            row =
                                row.target_ratio("≥ 1000× slower than Viscum", |r| r >= 1000.0);
                        }
                    }
                    rows.push(row);
                    pts.push([f64::from(*fill), p50]);
                    raw_tools.insert(format!("{tool}/{}", human(*fill)), json!(lat_us));
                }
                Err(e) => rows.push(Row::failed(
                    format!("{tool}, {} rules", human(*fill)),
                    e.clone(),
                )),
            }
        }
        tool_series.push(Series {
            name: tool.clone(),
            points: pts,
        });
    }
    tool_series.push(Series {
        name: "viscum Engine::insert (p50)".into(),
        points: p50_at
            .iter()
            .map(|(n, v)| [f64::from((*n).max(1)), *v])
            .collect(),
    });
    f.tables.push(Table {
        title: format!("one update per process, {invocations} invocations per point (µs; ratio to Viscum's library update at 10k)"),
        rows,
    });

    match &tte {
        Ok(t) => {
            let rows = vec![
                Row::new(
                    "viscum redirect add → first connection served locally",
                    "ms",
                    t.cli_add.clone(),
                )
                .target_value("< 1 ms", |v| v < 1.0)
                .note(format!(
                    "the command itself runs {:.2} ms (median)",
                    median(&t.cli_add_wall)
                )),
                Row::new(
                    "viscum redirect add, daemon running → served locally",
                    "ms",
                    t.daemon_add.clone(),
                )
                .target_value("< 1 ms", |v| v < 1.0)
                .note(format!(
                    "handed to the daemon ({} of {} applied by it); the command itself runs {:.2} ms (median)",
                    t.daemon_applied,
                    t.daemon_add.len(),
                    median(&t.daemon_add_wall)
                )),
                Row::new(
                    "the same, over the /bin/true floor of its round",
                    "ms",
                    t.daemon_add
                        .iter()
                        .zip(&t.floor_true)
                        .map(|(add, floor)| add - floor)
                        .collect(),
                )
                .note("what a process that starts and exits as cheaply as /bin/true would see: the CLI's own start, the request, the daemon, the next probe"),
                Row::new(
                    "the daemon's part of that add (request → answer)",
                    "ms",
                    t.daemon_share.clone(),
                )
                .note("from the daemon's log: checks, namespace and target lookups, entry"),
                Row::new(
                    "viscum redirect add --no-daemon, daemon running → served locally",
                    "ms",
                    t.beside_add.clone(),
                )
                .note(format!(
                    "interleaved with the row above; the command itself runs {:.2} ms (median)",
                    median(&t.beside_add_wall)
                )),
                Row::new(
                    "viscum redirect del → first connection served by the cloud",
                    "ms",
                    t.cli_del.clone(),
                )
                .note(format!(
                    "the command itself runs {:.2} ms (median)",
                    median(&t.cli_del_wall)
                )),
                Row::new(
                    "viscum redirect del, daemon running → served by the cloud",
                    "ms",
                    t.daemon_del.clone(),
                )
                .note(format!(
                    "the command itself runs {:.2} ms (median; it waits for the drain)",
                    median(&t.daemon_del_wall)
                )),
                Row::new(
                    "redirect::add (library, in-process) → served locally",
                    "ms",
                    t.lib_add.clone(),
                )
                .target_value("< 1 ms", |v| v < 1.0),
                Row::new(
                    "redirect::del (library, in-process) → served by the cloud",
                    "ms",
                    t.lib_del.clone(),
                ),
                Row::new(
                    "Engine::insert alone (route in place) → served locally",
                    "ms",
                    t.map_add.clone(),
                )
                .note("the datapath's share: one map update; resolution = the probe period"),
                Row::new(
                    "Engine::remove alone → served by the cloud",
                    "ms",
                    t.map_del.clone(),
                ),
                Row::new(
                    "floor: /bin/true, started the same way → exited",
                    "ms",
                    t.floor_true.clone(),
                )
                .note("in the daemon rounds, the prober running"),
                Row::new(
                    "floor: viscum --version → exited",
                    "ms",
                    t.floor_version.clone(),
                )
                .note("process start and exit of this viscum build, nothing else"),
                Row::new(
                    "probe period (new connection every …)",
                    "ms",
                    vec![t.probe_period_ms],
                ),
            ];
            f.tables.push(Table {
                title: format!(
                    "time to effect, {rounds} rounds, {} entries in the map",
                    human(TTE_FILL)
                ),
                rows,
            });
            f.raw("time_to_effect_ms", json!({ "cli_add": t.cli_add, "cli_del": t.cli_del, "lib_add": t.lib_add, "lib_del": t.lib_del,
                "cli_add_wall": t.cli_add_wall, "cli_del_wall": t.cli_del_wall, "map_add": t.map_add, "map_del": t.map_del,
                "daemon_add": t.daemon_add, "daemon_del": t.daemon_del, "daemon_add_wall": t.daemon_add_wall,
                "daemon_del_wall": t.daemon_del_wall, "beside_add": t.beside_add, "beside_add_wall": t.beside_add_wall,
                "daemon_applied": t.daemon_applied,
                "floor_true": t.floor_true, "floor_version": t.floor_version, "daemon_share": t.daemon_share }));
        }
        Err(e) => f.tables.push(Table {
            title: "time to effect".into(),
            rows: vec![Row::failed("time to effect", format!("{e:#}"))],
        }),
    }

    if !eng.is_empty() {
        let bars: Vec<Bar> = f.tables[0]
            .rows
            .iter()
            .filter(|r| !r.name.contains("p99") && !r.name.starts_with("flatness"))
            .filter_map(Bar::from_row)
            .collect();
        f.plots.push(Plot::Bars {
            file: "b7-engine".into(),
            title: "B7: Engine::insert p50 by map fill".into(),
            unit: "µs".into(),
            bars,
        });
        let cdf: Vec<Series> = eng
            .iter()
            .map(|(fill, lat)| Series {
                name: format!("fill {}", human(*fill)),
                points: report::cdf_points(
                    &lat.iter()
                        .map(|&x| f64::from(x) / 1000.0)
                        .collect::<Vec<_>>(),
                ),
            })
            .collect();
        f.plots.push(Plot::Cdf {
            file: "b7-engine-cdf".into(),
            title: "B7: Engine::insert latency".into(),
            unit: "µs".into(),
            log_x: true,
            series: cdf,
        });
    }
    f.plots.push(Plot::Lines {
        file: "b7-tools".into(),
        title: "B7: one update (p50) vs rules already present".into(),
        x_label: "rules / entries present".into(),
        y_label: "µs per update".into(),
        log_x: true,
        log_y: true,
        series: tool_series,
    });
    f.note("library updates: Engine::insert of a new exact entry (per-CPU value for every CPU, BPF_NOEXIST), timed one by one with the monotonic clock, the map attached through `viscum attach` on an idle veth; fill levels interleaved in batches");
    f.note("tool updates: wall time of one process per update, in a namespace holding that many DNAT rules (iptables) or verdict-map elements (nft); xtables lock waited for (-w)");
    f.raw("engine", serde_json::Value::Object(raw_eng));
    f.raw("tools_us", serde_json::Value::Object(raw_tools));
    f.raw("plan", json!({ "engine_fills": engine_fills, "updates": updates, "rule_fills": rule_fills, "invocations": invocations, "rounds": rounds }));
    Ok(f.finish())
}

fn human(n: u32) -> String {
    match n {
        0 => "0".into(),
        n if n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn median(v: &[f64]) -> f64 {
    report::Stat::of(v).map(|s| s.median).unwrap_or(f64::NAN)
}

/// A namespace with a dummy `lan0` and `viscum attach lan0` on a bpffs of its own.
fn attached_instance(env: &Env<'_>, tag: &str, max_entries: u32) -> Result<(Netns, Pins)> {
    let ns = netns::with_lan0(&format!("{}-{tag}", env.run_id))?;
    let dir = env.bpffs.subdir(&format!("b7-{tag}"))?;
    env.viscum.with_bpffs(&dir).run(
        ns.name(),
        &["attach", "lan0", "--max-entries", &max_entries.to_string()],
    )?;
    Ok((ns, Pins::new(&dir)))
}

fn endpoint(i: u32, salt: u32) -> Result<Endpoint> {
    // Distinct per fill level and phase: 10.x.y.z with the phase in the port.
    Ok(format!("tcp://{}:{}", lanes::filler_addr(i), 1000 + salt).parse()?)
}

/// (fill, per-update ns) for every fill level.
fn engine_updates(env: &Env<'_>, fills: &[u32], updates: u32) -> Result<Vec<(u32, Vec<u32>)>> {
    let mut inst = Vec::new();
    for (i, &fill) in fills.iter().enumerate() {
        let (ns, pins) = attached_instance(env, &format!("7e{i}"), fill + updates + 1024)?;
        let mut engine = Engine::open(&pins)?;
        let entry = ServiceEntry::new(1, TARGET_F_PEER, [0; 6]);
        let t = Instant::now();
        for k in 0..fill {
            engine.insert(&endpoint(k, 0)?, entry)?;
            if k % 65_536 == 0 {
                sys::check_stop()?;
            }
        }
        eprintln!(
            "bench: B7 filled {fill} entries in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let eps: Vec<Endpoint> = (0..updates)
            .map(|k| endpoint(k, 1))
            .collect::<Result<_>>()?;
        inst.push((fill, ns, engine, eps, Vec::with_capacity(updates as usize)));
    }
    let batch = 1000usize;
    let total = updates as usize;
    let entry = ServiceEntry::new(1, TARGET_F_PEER, [0; 6]);
    let mut done = 0;
    while done < total {
        sys::check_stop()?;
        let n = batch.min(total - done);
        for (_, _, engine, eps, lat) in &mut inst {
            for ep in &eps[done..done + n] {
                let t = Instant::now();
                engine.insert(ep, entry)?;
                lat.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
            }
        }
        done += n;
    }
    Ok(inst
        .into_iter()
        .map(|(fill, _ns, _e, _eps, lat)| (fill, lat))
        .collect())
}

type ToolResults = Vec<(String, Vec<(u32, Result<Vec<f64>, String>)>)>;

/// Per tool, per fill: wall µs of each single-update invocation.
fn rule_tools(env: &Env<'_>, fills: &[u32], invocations: usize) -> ToolResults {
    let mut tools: Vec<&str> = vec![
        "iptables -A",
        "iptables-restore --noflush",
        "nft add element",
    ];
    if lanes::which("iptables-legacy") {
        tools.push("iptables-legacy -A");
    }
    let mut out: ToolResults = Vec::new();
    for (ti, tool) in tools.iter().enumerate() {
        let mut per = Vec::new();
        for (fi, &fill) in fills.iter().enumerate() {
            if sys::stopped() {
                break;
            }
            let r = one_tool(env, tool, &format!("7t{ti}{fi}"), fill, invocations)
                .map_err(|e| format!("{e:#}"));
            if let Err(e) = &r {
                eprintln!("bench: B7 {tool} at {fill}: {e}");
            }
            per.push((fill, r));
        }
        out.push((tool.to_string(), per));
    }
    out
}

fn one_tool(
    env: &Env<'_>,
    tool: &str,
    tag: &str,
    fill: u32,
    invocations: usize,
) -> Result<Vec<f64>> {
    let ns = netns::create(&format!("{}-{tag}", env.run_id))?;
    let n = ns.name();
    let t = Instant::now();
    let timeout = Duration::from_secs(600);
    match tool {
        "nft add element" => {
            exec_in(
                n,
                "nft",
                &["-f", "-"],
                Some(lanes::nft_ruleset(fill, false).as_bytes()),
                timeout,
            )?;
        }
        "iptables-legacy -A" => {
            exec_in(
                n,
                "iptables-legacy-restore",
                &["-w"],
                Some(lanes::iptables_rules(fill, false).as_bytes()),
                timeout,
            )?;
        }
        _ => {
            exec_in(
                n,
                "iptables-restore",
                &["-w"],
                Some(lanes::iptables_rules(fill, false).as_bytes()),
                timeout,
            )?;
        }
    }
    eprintln!(
        "bench: B7 {tool}: loaded {fill} rules in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut lat = Vec::with_capacity(invocations);
    for k in 0..invocations {
        sys::check_stop()?;
        let addr = lanes::filler_addr(2_000_000 + k as u32);
        let rule =
            format!("-d {addr}/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.77.0.2");
        let (program, args, stdin): (&str, Vec<String>, Option<String>) = match tool {
            "iptables -A" | "iptables-legacy -A" => {
                let prog = if tool.starts_with("iptables-legacy") {
                    "iptables-legacy"
                } else {
                    "iptables"
                };
                let mut a = vec![
                    "-w".to_string(),
                    "-t".into(),
                    "nat".into(),
                    "-A".into(),
                    "PREROUTING".into(),
                ];
                a.extend(rule.split(' ').map(str::to_owned));
                (prog, a, None)
            }
            "iptables-restore --noflush" => (
                "iptables-restore",
                vec!["-w".into(), "--noflush".into()],
                Some(format!("*nat\n-A PREROUTING {rule}\nCOMMIT\n")),
            ),
            "nft add element" => (
                "nft",
                vec![
                    "add".into(),
                    "element".into(),
                    "ip".into(),
                    "vbench".into(),
                    "services".into(),
                    format!("{{ {addr} . 80 : goto svc }}"),
                ],
                None,
            ),
            other => bail!("unknown tool {other}"),
        };
        let mut cmd = sys::command_in(Some(n), None, program)?;
        cmd.args(&args);
        let done = sys::run(&mut cmd, stdin.as_deref().map(str::as_bytes), timeout)?.ok(tool)?;
        lat.push(done.elapsed.as_secs_f64() * 1e6);
    }
    Ok(lat)
}

/// Entries present in the time-to-effect instance besides the probed one.
const TTE_FILL: u32 = 10_000;

struct Tte {
    cli_add: Vec<f64>,
    cli_del: Vec<f64>,
    cli_add_wall: Vec<f64>,
    cli_del_wall: Vec<f64>,
    /// The same commands with a daemon of the instance running (they hand the change to it).
    daemon_add: Vec<f64>,
    daemon_del: Vec<f64>,
    daemon_add_wall: Vec<f64>,
    daemon_del_wall: Vec<f64>,
    /// `--no-daemon` next to that daemon, interleaved with the rounds through it.
    beside_add: Vec<f64>,
    beside_add_wall: Vec<f64>,
    /// Requests the daemon logged as applied (to tell it really served the rounds).
    daemon_applied: usize,
    /// The daemon's own time for each add, request to answer, from its log.
    daemon_share: Vec<f64>,
    /// Process floors, started the same way in the same rounds: `/bin/true`, `viscum
    /// --version` (ms until exit).
    floor_true: Vec<f64>,
    floor_version: Vec<f64>,
    lib_add: Vec<f64>,
    lib_del: Vec<f64>,
    map_add: Vec<f64>,
    map_del: Vec<f64>,
    probe_period_ms: f64,
}

/// client ── lan0 [edge: viscum] wan0 ── cloud ('K'), plus viscum ns ('S').
fn time_to_effect(env: &Env<'_>, rounds: usize) -> Result<Tte> {
    let base = format!("{}-7x", env.run_id);
    let lab = netns::lab(env.bpffs, &base, "b7-tte")?;
    let (c, e, k) = (lab.client.name(), lab.edge.name(), lab.cloud.name());
    let dir = lab.bpffs.path().to_owned();
    let v = env.viscum.with_bpffs(&dir);
    v.run(e, &["attach", "lan0"])?;
    let s_name = format!("{base}s");
    lab.own_service_ns(&s_name);
    v.run(e, &["ns", "add", &s_name])?;
    let _cloud = server(env, k, 'K')?;
    let _edge = server(env, &s_name, 'S')?;
    if tools::ask(c, tools::cloud(IDENT_PORT))? != b'K' {
        bail!("before any redirect the client is not served by the cloud");
    }
    let pins = Pins::new(&dir);
    {
        let mut engine = Engine::open(&pins)?;
        let ifindex = lanes::ifindex_in(e, &format!("vh-{s_name}"))?;
        for i in 0..TTE_FILL {
            engine.insert(
                &endpoint(i, 2)?,
                ServiceEntry::new(ifindex, TARGET_F_PEER, [0; 6]),
            )?;
        }
    }

    let prober = Prober::start(c, tools::cloud(IDENT_PORT))?;
    let target = format!("tcp://198.51.100.7:{IDENT_PORT}");
    let wait = Duration::from_secs(5);
    let mut t = Tte {
        cli_add: vec![],
        cli_del: vec![],
        cli_add_wall: vec![],
        cli_del_wall: vec![],
        daemon_add: vec![],
        daemon_del: vec![],
        daemon_add_wall: vec![],
        daemon_del_wall: vec![],
        beside_add: vec![],
        beside_add_wall: vec![],
        daemon_applied: 0,
        daemon_share: vec![],
        floor_true: vec![],
        floor_version: vec![],
        lib_add: vec![],
        lib_del: vec![],
        map_add: vec![],
        map_del: vec![],
        probe_period_ms: f64::NAN,
    };
    let mut periods = Vec::new();
    prober
        .wait_for(b'K', Instant::now(), wait)
        .context("the prober never reached the cloud")?;
    let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
    for _ in 0..rounds {
        sys::check_stop()?;
        prober.clear();
        // CLI add.
        let done = v.run_spawned(e, &["redirect", "add", &target, "--ns", &s_name])?;
        let t0 = done.started;
        let served = prober.wait_for(b'S', t0, wait)?;
        t.cli_add.push(ms(t0, served));
        t.cli_add_wall.push(done.elapsed.as_secs_f64() * 1e3);
        // What the CLI wrote, for the map-only measurement below.
        let written = Engine::open(&pins)?
            .get(&target.parse()?)?
            .map(|v| v.target)
            .context("the CLI added no entry")?;
        // CLI del.
        let done = v.run_spawned(e, &["redirect", "del", &target])?;
        let t0 = done.started;
        let served = prober.wait_for(b'K', t0, wait)?;
        t.cli_del.push(ms(t0, served));
        t.cli_del_wall.push(done.elapsed.as_secs_f64() * 1e3);
        // Library add/del, from a thread in the edge namespace (netlink acts there).
        let ep: Endpoint = target.parse()?;
        // The clock starts at the call, with the engine open and a runtime ready, as in a
        // daemon.
        let (pins2, s2) = (pins.clone(), s_name.clone());
        let t0 = viscum::netns::in_netns(e, move || -> Result<Instant> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut engine = Engine::open(&pins2)?;
            let t0 = Instant::now();
            rt.block_on(viscum::redirect::add(
                &mut engine,
                &ep,
                &viscum::redirect::Target::Namespace(s2),
            ))?;
            Ok(t0)
        })??;
        let served = prober.wait_for(b'S', t0, wait)?;
        t.lib_add.push(ms(t0, served));
        let pins2 = pins.clone();
        let t0 = viscum::netns::in_netns(e, move || -> Result<Instant> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut engine = Engine::open(&pins2)?;
            let t0 = Instant::now();
            rt.block_on(viscum::redirect::del(&mut engine, &ep))?;
            Ok(t0)
        })??;
        let served = prober.wait_for(b'K', t0, wait)?;
        t.lib_del.push(ms(t0, served));
        // The map alone (local route already in place): what the datapath itself takes.
        ip(&[
            "-n",
            &s_name,
            "route",
            "replace",
            "local",
            "198.51.100.7/32",
            "dev",
            "lo",
        ])?;
        let ep: Endpoint = target.parse()?;
        let mut engine = Engine::open(&pins)?;
        let t0 = Instant::now();
        engine.insert(&ep, written)?;
        let served = prober.wait_for(b'S', t0, wait)?;
        t.map_add.push(ms(t0, served));
        let t0 = Instant::now();
        engine.remove(&ep)?;
        let served = prober.wait_for(b'K', t0, wait)?;
        t.map_del.push(ms(t0, served));
        // The rest of a delete, untimed: the entry's flow records go with it, as
        // `redirect::del` does. Left behind, the records of connections cut here (their FIN
        // went to the cloud) would be open flows of the next round's entry, and its `viscum
        // redirect del` would wait its whole drain timeout for them (10 s in 5 of 10 rounds).
        engine.forget_flows(&ep, written.ifindex)?;
        ip(&[
            "-n",
            &s_name,
            "route",
            "del",
            "local",
            "198.51.100.7/32",
            "dev",
            "lo",
        ])?;
        let probes = prober.since(
            Instant::now()
                .checked_sub(Duration::from_secs(3600))
                .unwrap(),
        );
        if probes.len() > 1 {
            let span = ms(probes[0].started, probes[probes.len() - 1].started);
            periods.push(span / (probes.len() - 1) as f64);
        }
    }
    t.probe_period_ms = median(&periods);

    // Through the daemon: `viscum run` on this instance (no services), and the same commands,
    // which now hand the change to it; `--no-daemon` rounds interleaved, for the CLI alone
    // under the same conditions.
    let mut daemon = Daemon::start_on(env, e, &format!("{base}d"), "lan0", dir.clone(), &[])?;
    daemon.wait("answering", Duration::from_secs(20), |_| true)?;
    let control = daemon.control.display().to_string();
    for _ in 0..rounds {
        sys::check_stop()?;
        prober.clear();
        let done = v.run_spawned(
            e,
            &[
                "redirect",
                "add",
                &target,
                "--ns",
                &s_name,
                "--control",
                &control,
            ],
        )?;
        let t0 = done.started;
        let served = prober.wait_for(b'S', t0, wait)?;
        t.daemon_add.push(ms(t0, served));
        t.daemon_add_wall.push(done.elapsed.as_secs_f64() * 1e3);
        let done = v.run_spawned(e, &["redirect", "del", &target, "--control", &control])?;
        let t0 = done.started;
        let served = prober.wait_for(b'K', t0, wait)?;
        t.daemon_del.push(ms(t0, served));
        t.daemon_del_wall.push(done.elapsed.as_secs_f64() * 1e3);
        let done = v.run_spawned(
            e,
            &["redirect", "add", &target, "--ns", &s_name, "--no-daemon"],
        )?;
        let t0 = done.started;
        let served = prober.wait_for(b'S', t0, wait)?;
        t.beside_add.push(ms(t0, served));
        t.beside_add_wall.push(done.elapsed.as_secs_f64() * 1e3);
        // Untimed: back to the cloud for the next round.
        v.run(e, &["redirect", "del", &target, "--now", "--no-daemon"])?;
        prober.wait_for(b'K', Instant::now(), wait)?;
        let done = Viscum::spawn_other(e, Path::new("/bin/true"), &[])?;
        t.floor_true.push(done.elapsed.as_secs_f64() * 1e3);
        let done = v.run_spawned(e, &["--version"])?;
        t.floor_version.push(done.elapsed.as_secs_f64() * 1e3);
    }
    // "control: redirecting ... (0.42 ms)": what each add cost inside the daemon.
    t.daemon_share = daemon
        .log()
        .lines()
        .filter(|l| l.contains("control: redirecting"))
        .filter_map(|l| {
            let ms = l.rsplit_once('(')?.1.strip_suffix(" ms)")?;
            ms.parse().ok()
        })
        .collect();
    t.daemon_applied = t.daemon_share.len();
    daemon.shutdown(Duration::from_secs(10));
    drop(prober);
    Ok(t)
}

/// An identity-only server answering `ident`, pinned to the server CPU.
pub fn server(env: &Env<'_>, ns: &str, ident: char) -> Result<Proc> {
    let mut cmd = sys::command_in_with(
        Some(ns),
        Some(sys::server_cpu()),
        Some(Signal::SIGKILL),
        &env.exe,
    )?;
    cmd.args(["__serve", "--ident-only", "--ident", &ident.to_string()])
        .stdout(Stdio::null());
    let mut p = Proc::spawn(format!("identity server {ident} in {ns}"), cmd)?;
    p.wait_listening(IDENT_PORT, Duration::from_secs(10))?;
    Ok(p)
}
