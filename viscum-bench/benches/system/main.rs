//! B3–B9 of `docs/benchmarks.md`: everything that needs namespaces, real traffic, the
//! `viscum` binary or the daemon. Run by `cargo xtask bench`, one group per process:
//!
//! * `--group traffic`: B3 (bpf stats under load), B4 (RR), B5 (CRR), B6 (bulk);
//! * `--group control`: B7 (update latency, time to effect);
//! * `--group failover`: B8 (daemon failover);
//! * `--group footprint`: B9 (RSS, binary size);
//! * `--group fleet`: B10 (simulated fleet boxes against a real nats-server).
//!
//! # Layout
//!
//! * [`tools`]: the RR/CRR/identity servers (`system __serve`) and clients, the prober.
//! * [`lanes`]: one isolated topology per variant (wire, route, noop, hook, viscum, iptables,
//!   nft, flower, proxy, and the strict-edge pair of B6), built once and interleaved.
//! * [`traffic`], [`control`], [`failover`], [`footprint`]: the groups.
//! * [`viscum_cli`], [`daemon`]: running the real `viscum` binary and daemon.
//!
//! Every namespace, mount and process is named after the run id (`--run-id`), removed on the
//! way out (also on SIGINT/SIGTERM), and swept again by xtask after the process ends.

#[path = "../support/mod.rs"]
mod support;

mod control;
mod daemon;
mod failover;
mod fleet;
mod footprint;
mod lanes;
mod tools;
mod traffic;
mod viscum_cli;

use std::process::ExitCode;

use anyhow::{Context as _, Result};

use crate::support::{bpffs::PrivateBpffs, cli::Args, report, sys};

fn main() -> ExitCode {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("system bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(serve) = args.serve {
        return tools::serve_main(serve);
    }
    sys::install_signal_handlers();
    let fragments = match run(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("system bench: {e:#}");
            vec![report::Fragment::failed("system", "system benchmarks", &e)]
        }
    };
    match report::write(&args, &fragments) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("system bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// B1's IPv4 hit (raw ns: hot, and spread when measured), from the datapath bench's output.
fn b1_reference(args: &Args) -> Option<traffic::B1Ref> {
    let text = std::fs::read_to_string(args.reference.as_ref()?).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let raw = &v["fragments"]
        .as_array()?
        .iter()
        .find(|f| f["id"] == "B1")?["raw"];
    Some(traffic::B1Ref {
        hot_ns: raw["hit_v4_hot_raw_ns"].as_f64()?,
        spread_ns: raw["hit_v4_spread_raw_ns"].as_f64(),
        hot_net_ns: raw["hit_v4_hot_net_ns"].as_f64(),
    })
}

fn run(args: &Args) -> Result<Vec<report::Fragment>> {
    let bpffs = PrivateBpffs::mount(&args.run_id)?;
    let work = std::path::Path::new("/run")
        .join(format!("viscum-bench-{}", args.run_id))
        .join("work");
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let viscum = viscum_cli::Viscum::from_env()?;
    let env = lanes::Env {
        run_id: &args.run_id,
        bpffs: &bpffs,
        viscum: &viscum,
        exe: std::env::current_exe().context("cannot find this executable")?,
        work: work.clone(),
    };
    let mut out = Vec::new();
    if args.wants("traffic") {
        out.extend(traffic::run(args, &env, b1_reference(args)));
    }
    if args.wants("control") && !sys::stopped() {
        out.extend(control::run(args, &env));
    }
    if args.wants("failover") && !sys::stopped() {
        out.extend(failover::run(args, &env));
    }
    if args.wants("footprint") && !sys::stopped() {
        out.extend(footprint::run(args, &env));
    }
    if args.wants("fleet") && !sys::stopped() {
        out.extend(fleet::run(args, &env));
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(out)
}
