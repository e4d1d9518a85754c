//! B10: the fleet (`docs/fleet.md`). Time from a desired-state put until 50 / 200 / 1,000
//! boxes report the new revision, against one real `nats-server` (Debian's 2.9), and what
//! that costs the server.
//!
//! The boxes are **simulated**: each is the real fleet agent (`viscum::fleet::agent::run`:
//! its own NATS connection, one filtered ordered consumer per group and one for the box,
//! snapshot, diff, status puts) with the `DryRun` applier instead of the daemon, so no
//! namespace, process or datapath is made per box. All of them run as tokio tasks in this
//! process, in the server's namespace (`<run id>-nats`, the server on 127.0.0.1).
//!
//! For each fleet size N, N agents in group `gN` start and converge on a first block; then,
//! each round, one changed block is put under `group.gN.svc.web` and a watch on
//! `viscum_status` finds each box's first `status.<box>` reporting a revision at least the new
//! one. A round's latency per box is the server's timestamp of that status message (when it
//! was stored) minus the wall-clock moment before the put (same machine, same clock), so the
//! watcher's own scheduling among the agents' tasks does not count;
//! the row values are the per-round p50, p99 and max over the N boxes (median over rounds).
//! The server's CPU time (utime + stime of the `nats-server` process over the rounds,
//! divided by the rounds) and its resident memory with N boxes connected come from
//! `/proc/<pid>`.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use async_nats::jetstream;
use futures::StreamExt as _;
use serde_json::json;
use viscum::{
    config::{Config, fleet::Credentials},
    fleet::{
        agent::{self, AgentSettings, DryRun},
        buckets,
        connect::ConnectSettings,
        schema::{self, BoxStatus},
    },
};
use viscum_lab::nats::{NatsOptions, NatsServer, ProcUsage, block_on_in, proc_usage};

use crate::{
    lanes::Env,
    support::{
        cli::Args,
        report::{Fragment, Plot, Row, Series, Table, cdf_points, quantile_sorted},
        sys,
    },
};

const B10: (&str, &str) = (
    "B10",
    "Fleet: desired-state put until simulated boxes report it",
);
/// The heartbeat of the simulated boxes (they also put their status right after each
/// apply, which is what is timed).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Bound on N boxes connecting and converging on the first block.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound on one round.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run(args: &Args, env: &Env<'_>) -> Vec<Fragment> {
    match run_inner(args, env) {
        Ok(f) => vec![f],
        Err(e) => vec![Fragment::failed(B10.0, B10.1, &e)],
    }
}

/// What one fleet size measured.
#[derive(Debug, Default, serde::Serialize)]
struct SizeResult {
    boxes: usize,
    /// Seconds from starting N agents until all reported the first block.
    cold_converge_s: f64,
    /// Per round: every box's latency, ms, sorted.
    rounds_ms: Vec<Vec<f64>>,
    /// Server CPU over all rounds, ms.
    server_cpu_ms: f64,
    /// Server RSS with N boxes connected, after the rounds, bytes.
    server_rss_bytes: u64,
}

fn block(round: usize) -> String {
    format!(
        "[[service]]\nname = \"web\"\nmatch = [\"tcp://198.51.100.7:80\"]\ncommand = [\"/bin/sleep\", \"1000\"]\nenv = {{ ROUND = \"{round}\" }}\n"
    )
}

fn run_inner(args: &Args, env: &Env<'_>) -> Result<Fragment> {
    let sizes: Vec<usize> = vec![50, 200, 1000];
    let rounds: usize = args.pick(3, 9);
    raise_fd_limit();
    let server = NatsServer::start_named(&format!("{}-nats", env.run_id), &NatsOptions::default())
        .context("start nats-server")?;
    let pid = server.pid().context("nats-server has no pid")?;
    let version = std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let url = server.url();
    let idle = proc_usage(pid).context("read nats-server's /proc")?;
    let results: Vec<Result<SizeResult>> = block_on_in(server.client_netns(), move || async move {
        let mut out = Vec::new();
        for n in sizes {
            if sys::stopped() {
                out.push(Err(anyhow::anyhow!("interrupted")));
                break;
            }
            let r = measure(&url, n, rounds, pid).await;
            if let Err(e) = &r {
                eprintln!("bench: B10 with {n} boxes: {e:#}");
            }
            out.push(r);
        }
        out
    });
    drop(server);

    let mut f = Fragment::new(B10.0, B10.1);
    f.note(format!(
        "Simulated boxes: the real fleet agent with its DryRun applier (no datapath, no service processes), one NATS connection each, all as tokio tasks in one process (2 runtime workers) against one {version} on 127.0.0.1 in a namespace; each change is one put of a [[service]] block into the group every box watches."
    ));
    f.note(format!(
        "Latency per box = the server's timestamp of the first status.<box> carrying the new revision (found through a watch on viscum_status) minus the wall-clock moment before the put; rows are per-round p50/p99/max over the boxes, median over {rounds} rounds (min–max over rounds). Server CPU = utime+stime of nats-server over the rounds / rounds; RSS = VmRSS with the boxes connected (idle server: {:.1} MiB).",
        idle.rss_bytes as f64 / (1024.0 * 1024.0)
    ));
    let mut latency = Table {
        title: "Time from the put until the boxes report the new revision".into(),
        rows: Vec::new(),
    };
    let mut cost = Table {
        title: "Server cost and cold start".into(),
        rows: Vec::new(),
    };
    let mut cdf = Vec::new();
    let mut raw = Vec::new();
    for r in &results {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                latency
                    .rows
                    .push(Row::failed("fleet size", format!("{e:#}")));
                continue;
            }
        };
        let n = r.boxes;
        let per =
            |q: f64| -> Vec<f64> { r.rounds_ms.iter().map(|v| quantile_sorted(v, q)).collect() };
        latency
            .rows
            .push(Row::new(format!("{n} boxes: p50"), "ms", per(0.5)));
        let mut p99 = Row::new(format!("{n} boxes: p99"), "ms", per(0.99));
        if n == 1000 {
            p99 = p99.target_value("≤ 2000 ms", |v| v <= 2000.0);
        }
        latency.rows.push(p99);
        latency
            .rows
            .push(Row::new(format!("{n} boxes: max"), "ms", per(1.0)));
        cost.rows.push(Row::new(
            format!("{n} boxes: server CPU per change"),
            "ms",
            vec![r.server_cpu_ms / r.rounds_ms.len().max(1) as f64],
        ));
        cost.rows.push(Row::new(
            format!("{n} boxes: server RSS"),
            "MiB",
            vec![r.server_rss_bytes as f64 / (1024.0 * 1024.0)],
        ));
        cost.rows.push(
            Row::new(
                format!("{n} boxes: connect and converge from cold"),
                "s",
                vec![r.cold_converge_s],
            )
            .note("all N agents started at once"),
        );
        let all: Vec<f64> = r.rounds_ms.iter().flatten().copied().collect();
        cdf.push(Series {
            name: format!("{n} boxes"),
            points: cdf_points(&all),
        });
        raw.push(r);
    }
    f.tables.push(latency);
    f.tables.push(cost);
    f.plots.push(Plot::Cdf {
        file: "b10-fleet-latency".into(),
        title: "B10: put until a simulated box reports the revision".into(),
        unit: "ms".into(),
        log_x: true,
        series: cdf,
    });
    f.raw("sizes", &raw);
    f.raw(
        "nats_server",
        json!({ "version": version, "idle_rss_bytes": idle.rss_bytes }),
    );
    f.raw("status_interval_s", STATUS_INTERVAL.as_secs());
    if results.iter().all(Result::is_err) {
        bail!(
            "{}",
            results
                .iter()
                .filter_map(|r| r.as_ref().err())
                .map(|e| format!("{e:#}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(f.finish())
}

/// Lets this process (and the server it spawns) hold a connection per box.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
}

/// Now, ns since the Unix epoch (the clock the server stamps messages with).
fn wall_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

fn cpu_ms(u: &ProcUsage) -> f64 {
    u.cpu.as_secs_f64() * 1000.0
}

/// Starts `n` simulated boxes in group `g<n>`, converges them, runs `rounds` changes.
async fn measure(url: &str, n: usize, rounds: usize, pid: u32) -> Result<SizeResult> {
    let client = async_nats::connect(url).await.context("operator connect")?;
    let js = jetstream::new(client);
    let desired = buckets::ensure_kv(&js, schema::desired_bucket_config()).await?;
    let status = buckets::ensure_kv(
        &js,
        schema::status_bucket_config(schema::DEFAULT_STATUS_TTL),
    )
    .await?;
    let group = format!("g{n}");
    let key = format!("group.{group}.svc.web");
    let first = desired
        .put(&key, block(0).into())
        .await
        .context("put the first block")?;

    // Every status put of this size's boxes, as (box, revision, when).
    let prefix = format!("b{n}-");
    let mut watch = status
        .watch("status.>")
        .await
        .context("watch viscum_status")?;
    let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel::<(String, u64, i128)>();
    let watcher = tokio::spawn(async move {
        while let Some(Ok(entry)) = watch.next().await {
            // When the server stored the report (ns since the Unix epoch).
            let stored = entry.created.unix_timestamp_nanos();
            if let Ok(s) = serde_json::from_slice::<BoxStatus>(&entry.value)
                && s.box_id.starts_with(&prefix)
                && tx.send((s.box_id, s.revision, stored)).is_err()
            {
                break;
            }
        }
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let local = Config::parse("").context("empty local configuration")?;
    let mut agents = Vec::with_capacity(n);
    for i in 0..n {
        let box_id = format!("b{n}-{i}");
        let settings = AgentSettings::dry_run(
            ConnectSettings {
                servers: vec![url.to_owned()],
                name: box_id.clone(),
                credentials: Credentials::None,
                tls: None,
                connect_timeout: Duration::from_secs(10),
                max_reconnect_delay: Duration::from_secs(5),
                inbox_prefix: Some(viscum::fleet::schema::box_inbox_prefix(&box_id)),
            },
            &box_id,
            std::slice::from_ref(&group),
            STATUS_INTERVAL,
        );
        let mut stop = stop_rx.clone();
        let applier = DryRun::new(local.clone());
        agents.push(tokio::spawn(agent::run(settings, applier, async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }

    let result = async {
        let mut latest: HashMap<String, u64> = HashMap::with_capacity(n);
        let reached = |latest: &HashMap<String, u64>, rev: u64| {
            latest.values().filter(|&&r| r >= rev).count()
        };
        let deadline = started + CONVERGE_TIMEOUT;
        while reached(&latest, first) < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, reports.recv()).await {
                Ok(Some((b, rev, _))) => {
                    let e = latest.entry(b).or_default();
                    *e = (*e).max(rev);
                }
                _ => bail!(
                    "{} of {n} boxes reported revision {first} within {} s",
                    reached(&latest, first),
                    CONVERGE_TIMEOUT.as_secs()
                ),
            }
        }
        let cold_converge_s = started.elapsed().as_secs_f64();
        // Let the connection storm settle before timing changes.
        tokio::time::sleep(Duration::from_secs(1)).await;
        while reports.try_recv().is_ok() {}

        let before = proc_usage(pid).context("read nats-server's /proc")?;
        let mut rounds_ms = Vec::with_capacity(rounds);
        for round in 1..=rounds {
            sys::check_stop()?;
            let t0 = wall_ns();
            let rev = desired
                .put(&key, block(round).into())
                .await
                .context("put a changed block")?;
            let mut seen: HashMap<String, f64> = HashMap::with_capacity(n);
            let deadline = Instant::now() + ROUND_TIMEOUT;
            while seen.len() < n {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, reports.recv()).await {
                    Ok(Some((b, r, stored))) if r >= rev => {
                        seen.entry(b).or_insert_with(|| (stored - t0) as f64 / 1e6);
                    }
                    Ok(Some(_)) => {}
                    _ => bail!(
                        "round {round}: {} of {n} boxes reported revision {rev} within {} s",
                        seen.len(),
                        ROUND_TIMEOUT.as_secs()
                    ),
                }
            }
            let mut v: Vec<f64> = seen.into_values().collect();
            v.sort_by(f64::total_cmp);
            eprintln!(
                "bench: B10 {n} boxes, round {round}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                quantile_sorted(&v, 0.5),
                quantile_sorted(&v, 0.99),
                quantile_sorted(&v, 1.0)
            );
            rounds_ms.push(v);
        }
        let after = proc_usage(pid).context("read nats-server's /proc")?;
        Ok(SizeResult {
            boxes: n,
            cold_converge_s,
            rounds_ms,
            server_cpu_ms: cpu_ms(&after) - cpu_ms(&before),
            server_rss_bytes: after.rss_bytes,
        })
    }
    .await;

    let _ = stop_tx.send(true);
    for a in agents {
        let _ = tokio::time::timeout(Duration::from_secs(10), a).await;
    }
    watcher.abort();
    result
}
