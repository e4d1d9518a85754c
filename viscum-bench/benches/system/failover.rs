//! B8: failover with the daemon (`viscum run`).
//!
//! One service (an identity server answering 'S') is configured for the cloud address; the
//! cloud answers 'K'. A client opens a new connection every ~0.1 ms. Each round:
//!
//! 1. SIGKILL the service process: the time until new connections are served by the cloud;
//!    failed connections before that moment (they hit the dead copy) and after it (the cloud
//!    path, which must lose nothing);
//! 2. `viscum service start` it again: the time from the new process listening until new
//!    connections are served locally again.
//!
//! Health checks: TCP every 200 ms, timeout 100 ms, rise 2, fall 2; target p99 ≤ 3 × 200 ms.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};
use serde_json::json;

use crate::{
    control::server,
    daemon::{Daemon, ServiceDef},
    lanes::Env,
    support::{
        cli::Args,
        netns,
        report::{self, Fragment, Plot, Row, Series, Table},
        sys,
    },
    tools::{self, IDENT_PORT, Prober},
};

const B8: (&str, &str) = ("B8", "Failover with the daemon");
const INTERVAL_MS: u64 = 200;

pub fn run(args: &Args, env: &Env<'_>) -> Vec<Fragment> {
    match run_inner(args, env) {
        Ok(f) => vec![f],
        Err(e) => vec![Fragment::failed(B8.0, B8.1, &e)],
    }
}

fn service_pid(status: &serde_json::Value) -> Option<i32> {
    status["services"][0]["pid"].as_i64().map(|p| p as i32)
}

fn redirected(status: &serde_json::Value) -> bool {
    status["services"][0]["redirected"].as_bool() == Some(true)
}

fn run_inner(args: &Args, env: &Env<'_>) -> Result<Fragment> {
    let rounds: usize = args.pick(3, 10);
    let base = format!("{}-8x", env.run_id);
    let lab = netns::lab(env.bpffs, &base, "b8-lab")?;
    let (c, e, k) = (
        lab.client.name().to_owned(),
        lab.edge.name().to_owned(),
        lab.cloud.name().to_owned(),
    );
    let _cloud = server(env, &k, 'K')?;

    let name = format!("{}-fo", env.run_id);
    lab.own_service_ns(&name);
    let svc = ServiceDef {
        name: name.clone(),
        matches: vec![format!("tcp://198.51.100.7:{IDENT_PORT}")],
        command: vec![
            env.exe.display().to_string(),
            "__serve".into(),
            "--ident-only".into(),
            "--ident".into(),
            "S".into(),
        ],
        health_port: IDENT_PORT,
        interval_ms: INTERVAL_MS,
        timeout_ms: 100,
    };
    let mut daemon = Daemon::start(env, &e, "b8", "lan0", &[svc])?;
    daemon.wait(
        "the service redirected",
        Duration::from_secs(30),
        redirected,
    )?;
    let prober = Prober::start(&c, tools::cloud(IDENT_PORT))?;
    prober
        .wait_for(b'S', Instant::now(), Duration::from_secs(10))
        .context("the client is never served by the edge copy")?;

    let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
    let (mut failover, mut failback, mut failback_cmd) = (Vec::new(), Vec::new(), Vec::new());
    let (mut fail_window, mut fail_cloud, mut fail_back) = (0usize, 0usize, 0usize);
    for round in 0..rounds {
        sys::check_stop()?;
        let st = daemon.wait(
            "a running, redirected service",
            Duration::from_secs(15),
            |s| redirected(s) && service_pid(s).is_some(),
        )?;
        let pid = service_pid(&st).context("no service pid")?;
        prober.clear();
        let t_kill = Instant::now();
        // A process of this run: the service the daemon started in our namespace.
        signal::kill(Pid::from_raw(pid), Signal::SIGKILL).context("cannot kill the service")?;
        let t_cloud = prober
            .wait_for(b'K', t_kill, Duration::from_secs(10))
            .with_context(|| format!("round {round}: no failover"))?;
        failover.push(ms(t_kill, t_cloud));
        // Watch the cloud path for a few health intervals before bringing the copy back.
        sys::sleep(Duration::from_millis(4 * INTERVAL_MS))?;
        let t_start = Instant::now();
        let probes = prober.since(t_kill);
        fail_window += probes
            .iter()
            .filter(|p| p.ident.is_none() && p.done <= t_cloud)
            .count();
        fail_cloud += probes
            .iter()
            .filter(|p| p.ident.is_none() && p.started > t_cloud && p.done < t_start)
            .count();

        daemon.cli.run(
            &e,
            &[
                "service",
                "start",
                &name,
                "--control",
                &daemon.control.display().to_string(),
            ],
        )?;
        // The copy is back once its new process listens.
        let deadline = Instant::now() + Duration::from_secs(15);
        let t_up = loop {
            sys::check_stop()?;
            if let Ok(s) = daemon.status()
                && let Some(p) = service_pid(&s)
                && p != pid
                && sys::listens(p as u32, IDENT_PORT)
            {
                break Instant::now();
            }
            if Instant::now() >= deadline {
                bail!("round {round}: the service did not come back");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let t_local = prober
            .wait_for(b'S', t_up, Duration::from_secs(10))
            .with_context(|| format!("round {round}: no failback"))?;
        failback.push(ms(t_up, t_local));
        failback_cmd.push(ms(t_start, t_local));
        fail_back += prober
            .since(t_start)
            .iter()
            .filter(|p| p.ident.is_none() && p.done <= t_local)
            .count();
        eprint!(".");
    }
    eprintln!(" B8 done");
    drop(prober);
    daemon.shutdown(Duration::from_secs(30));

    let mut f = Fragment::new(B8.0, B8.1);
    let limit = 3.0 * INTERVAL_MS as f64;
    let p99 = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        report::quantile_sorted(&s, 0.99)
    };
    let rows = vec![
        Row::new(
            "killed → new connections served by the cloud",
            "ms",
            failover.clone(),
        )
        .note(format!("p99 {:.0} ms", p99(&failover)))
        .target_value(
            format!("p99 ≤ {limit:.0} ms (3 × health interval)"),
            |_| p99(&failover) <= limit,
        ),
        Row::new(
            "back (listening) → new connections served locally",
            "ms",
            failback.clone(),
        )
        .note(format!(
            "p99 {:.0} ms; from `viscum service start`: median {:.0} ms",
            p99(&failback),
            report::Stat::of(&failback_cmd)
                .map(|s| s.median)
                .unwrap_or(f64::NAN)
        ))
        .target_value(format!("p99 ≤ {limit:.0} ms"), |_| {
            p99(&failback) <= limit
        }),
        Row::new(
            "failed connections on the cloud path (after failover)",
            "connections",
            vec![fail_cloud as f64],
        )
        .target_value("0", |v| v == 0.0),
        Row::new(
            "failed connections between kill and failover",
            "connections",
            vec![fail_window as f64],
        )
        .note("new connections still redirected to the dead copy until its entry goes"),
        Row::new(
            "failed connections during failback",
            "connections",
            vec![fail_back as f64],
        ),
    ];
    f.tables.push(Table { title: format!("{rounds} rounds, TCP health check every {INTERVAL_MS} ms (rise 2, fall 2), restart = never"), rows });
    f.plots.push(Plot::Lines {
        file: "b8-rounds".into(),
        title: "B8: failover and failback per round".into(),
        x_label: "round".into(),
        y_label: "ms".into(),
        log_x: false,
        log_y: false,
        series: vec![
            Series {
                name: "failover".into(),
                points: failover
                    .iter()
                    .enumerate()
                    .map(|(i, v)| [i as f64 + 1.0, *v])
                    .collect(),
            },
            Series {
                name: "failback".into(),
                points: failback
                    .iter()
                    .enumerate()
                    .map(|(i, v)| [i as f64 + 1.0, *v])
                    .collect(),
            },
        ],
    });
    f.note("a client opens a new connection to the cloud address back to back (~0.1 ms apart); the service is SIGKILLed, then started again with `viscum service start`");
    f.raw("failover_ms", &failover);
    f.raw("failback_ms", &failback);
    f.raw("failback_from_start_cmd_ms", &failback_cmd);
    f.raw(
        "failed",
        json!({ "window": fail_window, "cloud": fail_cloud, "back": fail_back }),
    );
    Ok(f.finish())
}
