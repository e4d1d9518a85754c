//! `cargo xtask bench [--quick] [--baseline RESULTS_JSON]`: runs the benchmarks of
//! `docs/benchmarks.md` and writes `bench/results/<date>-<kernel>.json` and
//! `bench/RESULTS.md` with SVG plots; with `--baseline`, every table shows an earlier run's
//! figures beside the new ones, under a summary of issue #12's goals before → after.
//! `--render RESULTS_JSON` redraws the report from a results file without running anything.
//!
//! The measuring happens in the two bench binaries of the viscum-bench crate
//! (`benches/datapath.rs` for B1–B2, `benches/system/` for B3–B9; the product crate builds
//! no benchmark code), built here with the bench profile in one cargo invocation together
//! with `viscum` (handed to them as `VISCUM_BIN`), and run one
//! group per process, each with a time limit, so that a benchmark that fails, hangs or
//! crashes is recorded as such and the others still run. Each process writes JSON
//! "fragments" (tables of rows with targets, plot data, raw samples); this module merges them
//! with the facts about the machine and renders the report.
//!
//! Everything a run creates is named after its run id (`vbXXXX`): namespaces
//! `vbXXXX-…`, the directory `/run/viscum-bench-vbXXXX` with its bpffs. The bench processes
//! remove what they make, and this module sweeps again after each of them (and, at start,
//! after earlier runs whose xtask is gone), killing only processes inside those namespaces.
//!
//! # Layout
//!
//! * this module: options, tools, build, the group runner, output paths;
//! * [`machine`]: kernel, TCX, JIT, tool versions and the rest of the facts recorded;
//! * [`sweep`]: finding and removing leftovers;
//! * [`render`]: RESULTS.md; [`compare`]: a baseline beside the new run; [`svg`]: the plots.

mod compare;
mod machine;
mod partial;
mod render;
mod svg;
pub(crate) mod sweep;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal},
    unistd::Pid,
};
use serde_json::{Value, json};

use crate::{process, setup};

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Options {
    /// Fewer rounds, shorter runs and smaller fills: the whole suite in under five minutes
    /// (for development; the numbers are not for publication).
    #[arg(long)]
    quick: bool,
    /// Run only these groups (comma separated): datapath, verifier, traffic, control,
    /// failover, footprint, fleet; or benchmark ids (B10 selects fleet). Such a run writes its own
    /// results file and one marked block of RESULTS.md, leaving the last full run's alone.
    #[arg(long, value_name = "GROUPS", value_delimiter = ',')]
    only: Vec<String>,
    /// Skip `cargo xtask dist` in a full run (B9 then reports whatever target/dist holds).
    #[arg(long)]
    no_dist: bool,
    /// Only redraw RESULTS.md and the plots from an existing results file (nothing runs).
    #[arg(long, value_name = "RESULTS_JSON", conflicts_with_all = ["quick", "only"])]
    render: Option<PathBuf>,
    /// Show this earlier results file beside the new run (or the `--render` one) in every
    /// table of RESULTS.md: its median, the change, and "met" for both, rows paired by
    /// benchmark, table and metric label; plus issue #12's goals, before → after.
    #[arg(long, value_name = "RESULTS_JSON")]
    baseline: Option<PathBuf>,
}

/// One bench process.
pub(crate) struct Group {
    /// Name for --only and messages.
    pub(crate) name: &'static str,
    /// Which binary (`datapath` or `system`).
    pub(crate) bench: &'static str,
    /// `--group` value passed to it: which of the binary's benchmarks run.
    group: Option<&'static str>,
    /// The fragments it produces, so a crash can be reported against each.
    pub(crate) ids: &'static [(&'static str, &'static str)],
    pub(crate) quick_limit: Duration,
    pub(crate) full_limit: Duration,
}

/// The group named `name`, or holding benchmark `name` (`B3` is `traffic`).
pub(crate) fn group(name: &str) -> Result<&'static Group> {
    GROUPS
        .iter()
        .find(|g| g.name == name || g.ids.iter().any(|(id, _)| id.eq_ignore_ascii_case(name)))
        .with_context(|| {
            format!(
                "unknown group '{name}' (expected one of: {}, or a benchmark id B1-B11)",
                GROUPS.iter().map(|g| g.name).collect::<Vec<_>>().join(", ")
            )
        })
}

const GROUPS: &[Group] = &[
    Group {
        name: "datapath",
        bench: "datapath",
        group: Some("B1,B2"),
        ids: &[
            ("B1", "Classifier cost per packet (BPF_PROG_TEST_RUN)"),
            ("B2", "Hit cost against map size"),
        ],
        quick_limit: Duration::from_secs(180),
        full_limit: Duration::from_secs(1800),
    },
    Group {
        name: "verifier",
        bench: "datapath",
        group: Some("B11"),
        ids: &[("B11", "Verifier: instructions and load time per kernel")],
        quick_limit: Duration::from_secs(120),
        full_limit: Duration::from_secs(600),
    },
    Group {
        name: "traffic",
        bench: "system",
        group: Some("traffic"),
        ids: &[
            ("B3", "In-kernel cost per packet under load (bpf stats)"),
            ("B4", "Request/response latency, 1-byte TCP"),
            ("B5", "New connections per second"),
            ("B6", "Bulk TCP throughput and CPU cost"),
        ],
        quick_limit: Duration::from_secs(420),
        full_limit: Duration::from_secs(3 * 3600),
    },
    Group {
        name: "control",
        bench: "system",
        group: Some("control"),
        ids: &[("B7", "Control plane: update latency and time to effect")],
        quick_limit: Duration::from_secs(180),
        full_limit: Duration::from_secs(3600),
    },
    Group {
        name: "failover",
        bench: "system",
        group: Some("failover"),
        ids: &[("B8", "Failover with the daemon")],
        quick_limit: Duration::from_secs(120),
        full_limit: Duration::from_secs(900),
    },
    Group {
        name: "footprint",
        bench: "system",
        group: Some("footprint"),
        ids: &[("B9", "Footprint: memory and binary size")],
        quick_limit: Duration::from_secs(240),
        full_limit: Duration::from_secs(900),
    },
    Group {
        name: "fleet",
        bench: "system",
        group: Some("fleet"),
        ids: &[(
            "B10",
            "Fleet: desired-state put until simulated boxes report it",
        )],
        quick_limit: Duration::from_secs(300),
        full_limit: Duration::from_secs(1200),
    },
];

/// Packages the benchmarks drive (program, Debian package).
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("iperf3", "iperf3"),
    ("haproxy", "haproxy"),
    ("socat", "socat"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
];

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `cargo xtask bench`.
pub fn run(opts: &Options) -> Result<ExitCode> {
    // Read before anything runs: a wrong path should not cost a run.
    let baseline = opts
        .baseline
        .as_deref()
        .map(|p| read_results(p).map(|doc| (doc, p.to_owned())))
        .transpose()?;
    let baseline = baseline.as_ref().map(|(doc, p)| (doc, p.as_path()));
    if let Some(path) = &opts.render {
        let doc = read_results(path)?;
        let paths = render_outputs(&doc, doc["mode"] == "quick", path, baseline)?;
        println!("bench: report in {}", paths.report.display());
        return Ok(ExitCode::SUCCESS);
    }
    if !process::is_root() {
        bail!("the benchmarks create network namespaces and load eBPF programs: run them as root");
    }
    // Benchmark ids select their group (`--only B10` is `--only fleet`).
    let mut only: Vec<String> = Vec::new();
    for name in &opts.only {
        let g = group(name)?;
        if !only.iter().any(|o| o == g.name) {
            only.push(g.name.to_owned());
        }
    }
    let only = &only;
    let started_wall = SystemTime::now();
    let started = Instant::now();
    setup::ensure()?;
    ensure_tools();
    // Ctrl-C reaches the bench child too (same process group); it cleans up and stops, and
    // we still sweep and write what was measured.
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { signal::sigaction(sig, &action) }
            .with_context(|| format!("cannot handle {sig}"))?;
    }

    let (run_id, run_dir) = sweep::begin()?;
    println!(
        "bench: run {run_id} ({} mode)",
        if opts.quick { "quick" } else { "full" }
    );

    if !opts.quick && !opts.no_dist && (only.is_empty() || only.iter().any(|g| g == "footprint")) {
        // B9 reports the release binaries `cargo xtask dist` makes (static musl where installed).
        let mut cmd = process::cargo();
        cmd.args(["xtask", "dist"]);
        if let Err(e) = process::run(&mut cmd) {
            eprintln!(
                "bench: `cargo xtask dist` failed ({e:#}); B9 reports what target/dist holds"
            );
        }
    }
    let (exes, viscum) = build()?;
    let build_s = started.elapsed().as_secs_f64();
    let load_before = machine::loadavg();

    let mut fragments: Vec<Value> = Vec::new();
    let mut group_runs = Vec::new();
    let datapath_out = run_dir.join("datapath.json");
    for g in GROUPS {
        if !only.is_empty() && !only.iter().any(|o| o == g.name) {
            continue;
        }
        if interrupted() {
            fragments.extend(
                g.ids
                    .iter()
                    .map(|(id, title)| error_fragment(id, title, "not run: interrupted")),
            );
            continue;
        }
        let out = run_dir.join(format!("{}.json", g.name));
        let exe = exes
            .iter()
            .find(|(n, _)| n == g.bench)
            .map(|(_, p)| p.clone());
        let limit = if opts.quick {
            g.quick_limit
        } else {
            g.full_limit
        };
        let t = Instant::now();
        println!(
            "bench: {} ({}) …",
            g.name,
            g.ids
                .iter()
                .map(|(id, _)| *id)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let result = match exe {
            Some(exe) => run_group(
                &exe,
                &viscum,
                g,
                opts.quick,
                &run_id,
                &out,
                &datapath_out,
                limit,
            ),
            None => Err(anyhow::anyhow!("cargo built no `{}` bench binary", g.bench)),
        };
        sweep::run_leftovers(&run_id);
        let secs = t.elapsed().as_secs_f64();
        match result {
            Ok(frags) => {
                println!("bench: {} done in {secs:.0} s", g.name);
                fragments.extend(frags);
            }
            Err(e) => {
                eprintln!("bench: {} failed after {secs:.0} s: {e:#}", g.name);
                fragments.extend(
                    g.ids
                        .iter()
                        .map(|(id, title)| error_fragment(id, title, &format!("{e:#}"))),
                );
            }
        }
        group_runs.push(json!({ "group": g.name, "seconds": secs }));
    }
    sweep::finish(&run_id);

    let finished_wall = SystemTime::now();
    let mut facts = machine::facts();
    if let Value::Object(m) = &mut facts {
        m.insert("load_before".into(), json!(load_before));
        m.insert("load_after".into(), json!(machine::loadavg()));
    }
    let doc = json!({
        "schema": 1,
        "mode": if opts.quick { "quick" } else { "full" },
        "run_id": run_id,
        "started_utc": rfc3339(started_wall),
        "finished_utc": rfc3339(finished_wall),
        "build_seconds": build_s,
        "seconds": started.elapsed().as_secs_f64(),
        "groups": group_runs,
        "machine": facts,
        "fragments": fragments,
    });
    let paths = if partial::is_partial(only) {
        let (json, report) = partial::write(&doc, only, opts.quick)?;
        Outputs { json, report }
    } else {
        write_outputs(&doc, opts.quick, baseline)?
    };
    println!("bench: results in {}", paths.json.display());
    println!("bench: report  in {}", paths.report.display());
    let failed: Vec<String> = doc["fragments"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter(|f| f["status"] == "error")
                .filter_map(|f| f["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    println!("bench: {}", render::summary_line(&doc));
    if interrupted() {
        return Ok(ExitCode::from(130));
    }
    if !failed.is_empty() {
        eprintln!(
            "bench: benchmarks that could not run: {}",
            failed.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Installs missing tools with apt-get, saying so; a failure only warns (the benchmarks
/// that need a missing tool report it).
pub(crate) fn ensure_tools() {
    let missing = process::missing_packages(TOOLS);
    if missing.is_empty() {
        return;
    }
    println!(
        "bench: installing tools the benchmarks drive: {}",
        missing.join(" ")
    );
    if let Err(e) = process::apt_install(&missing) {
        eprintln!(
            "bench: warning: could not install {} ({e:#}); benchmarks that need them will report errors",
            missing.join(" ")
        );
    }
}

/// Builds both bench binaries and `viscum` with the bench profile (the release settings) in
/// one cargo invocation, so the dependencies are resolved and built once for both packages;
/// returns the benches as (name, executable) and viscum's path.
pub(crate) fn build() -> Result<(Vec<(String, PathBuf)>, PathBuf)> {
    let mut cmd = process::cargo();
    cmd.args([
        "build",
        "--profile",
        "bench",
        "-p",
        "viscum-user",
        "--bin",
        "viscum",
        "-p",
        "viscum-bench",
        "--bench",
        "datapath",
        "--bench",
        "system",
        "--message-format=json-render-diagnostics",
    ]);
    let mut exes = Vec::new();
    let mut viscum = None;
    let status = process::each_stdout_line(&mut cmd, |line| {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            println!("{line}");
            return;
        };
        if msg["reason"] != "compiler-artifact" {
            return;
        }
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            return;
        };
        match msg["target"]["kind"][0].as_str() {
            Some("bench") => exes.push((name.to_owned(), PathBuf::from(exe))),
            Some("bin") if name == "viscum" => viscum = Some(PathBuf::from(exe)),
            _ => {}
        }
    })?;
    if !status.success() {
        bail!("`{}` failed ({status})", process::display(&cmd));
    }
    let viscum = viscum.context("cargo built no `viscum` binary")?;
    Ok((exes, viscum))
}

/// Runs one bench process and reads its fragments.
#[allow(clippy::too_many_arguments, reason = "one call site, all plain inputs")]
pub(crate) fn run_group(
    exe: &Path,
    viscum: &Path,
    g: &Group,
    quick: bool,
    run_id: &str,
    out: &Path,
    datapath_out: &Path,
    limit: Duration,
) -> Result<Vec<Value>> {
    let _ = fs::remove_file(out);
    let mut cmd = Command::new(exe);
    cmd.current_dir(process::workspace_root())
        .env("VISCUM_BIN", viscum)
        .args(["--run-id", run_id, "--out"])
        .arg(out);
    if quick {
        cmd.arg("--quick");
    }
    if let Some(group) = g.group {
        cmd.args(["--group", group]);
        if datapath_out.exists() {
            cmd.arg("--ref").arg(datapath_out);
        }
    }
    println!("+ {}", process::display(&cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let deadline = Instant::now() + limit;
    let mut signalled = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline && !signalled {
            eprintln!("bench: {} exceeded {limit:?}: stopping it", g.name);
            let _ = signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            signalled = true;
            // Grace for its own cleanup, then SIGKILL (the sweep removes the rest).
            let grace = Instant::now() + Duration::from_secs(30);
            while Instant::now() < grace {
                if child.try_wait()?.is_some() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
            if child.try_wait()?.is_none() {
                let _ = child.kill();
            }
        }
        thread::sleep(Duration::from_millis(100));
    };
    let text = fs::read_to_string(out).ok();
    let frags: Option<Vec<Value>> = text
        .as_deref()
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .and_then(|v| v["fragments"].as_array().cloned());
    match frags {
        Some(f) if !f.is_empty() => {
            let mut f = f;
            if signalled {
                for frag in &mut f {
                    if let Some(n) = frag["notes"].as_array_mut() {
                        n.push(json!(format!("stopped after the {limit:?} limit")));
                    }
                }
            }
            Ok(f)
        }
        _ if signalled => bail!("timed out after {limit:?}"),
        _ => bail!("{} exited ({status}) without results", exe.display()),
    }
}

fn error_fragment(id: &str, title: &str, error: &str) -> Value {
    json!({ "id": id, "title": title, "status": "error", "notes": [], "error": error, "tables": [], "plots": [], "raw": {} })
}

struct Outputs {
    json: PathBuf,
    report: PathBuf,
}

/// `bench/results/<date>-<kernel>[-quick].json`, `bench/RESULTS[-quick].md`, plots beside.
/// Quick runs go to their own (git-ignored) names so they are never mistaken for, or
/// committed as, the published results.
fn write_outputs(doc: &Value, quick: bool, baseline: Option<(&Value, &Path)>) -> Result<Outputs> {
    let results = process::workspace_root().join("bench").join("results");
    fs::create_dir_all(&results).with_context(|| format!("cannot create {}", results.display()))?;
    let date = doc["started_utc"]
        .as_str()
        .unwrap_or("0000-00-00")
        .get(..10)
        .unwrap_or("0000-00-00")
        .to_owned();
    let kernel = doc["machine"]["kernel"]
        .as_str()
        .unwrap_or("unknown")
        .replace('/', "_");
    let suffix = if quick { "-quick" } else { "" };
    let mut json_path = results.join(format!("{date}-{kernel}{suffix}.json"));
    if !quick && json_path.exists() {
        // A second full run the same day keeps the first (a before/after within a day): its
        // start time, HHMM, goes into the name.
        let hhmm: String = doc["started_utc"]
            .as_str()
            .and_then(|s| s.get(11..16))
            .unwrap_or("0000")
            .replace(':', "");
        json_path = results.join(format!("{date}-{hhmm}-{kernel}.json"));
    }
    fs::write(&json_path, serde_json::to_string_pretty(doc)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    render_outputs(doc, quick, &json_path, baseline)
}

/// A results file of `cargo xtask bench` (not, say, a `dist --budget` one).
fn read_results(path: &Path) -> Result<Value> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    if !doc["fragments"].is_array() {
        bail!(
            "{} is not a results file of `cargo xtask bench` (no \"fragments\"{})",
            path.display(),
            doc["kind"]
                .as_str()
                .map_or_else(String::new, |k| format!("; its kind is \"{k}\""))
        );
    }
    Ok(doc)
}

/// How RESULTS.md (in `bench/`) links to `path`: relative to `bench/` when the file is in
/// the workspace, else the absolute path.
fn link_from_bench(path: &Path) -> String {
    let root = process::workspace_root();
    let abs = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let root = fs::canonicalize(&root).unwrap_or(root);
    match abs.strip_prefix(root.join("bench")) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => match abs.strip_prefix(&root) {
            Ok(rel) => format!("../{}", rel.display()),
            Err(_) => abs.display().to_string(),
        },
    }
}

/// RESULTS[-quick].md and the plots for `doc`, which lives at `json_path`, with `baseline`
/// (a results file and its path) beside it when given. Blocks other tools keep in the
/// existing report (`<!-- NAME:begin -->` … `<!-- NAME:end -->`) are carried over.
fn render_outputs(
    doc: &Value,
    quick: bool,
    json_path: &Path,
    baseline: Option<(&Value, &Path)>,
) -> Result<Outputs> {
    let root = process::workspace_root().join("bench");
    let suffix = if quick { "-quick" } else { "" };
    let plots_dir_name = if quick { "plots-quick" } else { "plots" };
    let plots_dir = root.join(plots_dir_name);
    fs::create_dir_all(&plots_dir)?;
    for frag in doc["fragments"].as_array().into_iter().flatten() {
        for plot in frag["plots"].as_array().into_iter().flatten() {
            let Some(file) = plot["file"].as_str() else {
                continue;
            };
            match svg::render(plot) {
                Some(text) => fs::write(plots_dir.join(format!("{file}.svg")), text)?,
                None => eprintln!("bench: plot {file} has no data"),
            }
        }
    }
    let json_rel = link_from_bench(json_path);
    let baseline_rel = baseline.map(|(_, p)| link_from_bench(p));
    let after = compare::Run {
        doc,
        json_rel: &json_rel,
    };
    let before = baseline
        .zip(baseline_rel.as_deref())
        .map(|((doc, _), json_rel)| compare::Run { doc, json_rel });
    let md = render::markdown(after, before, plots_dir_name, &plots_dir);
    let report = root.join(format!("RESULTS{suffix}.md"));
    let old = fs::read_to_string(&report).unwrap_or_default();
    let md = render::keep_marked_blocks(&old, md);
    fs::write(&report, md).with_context(|| format!("cannot write {}", report.display()))?;
    let ignore = root.join(".gitignore");
    if !ignore.exists() {
        fs::write(
            &ignore,
            "# Quick runs (`cargo xtask bench --quick`) are for development only.\n*-quick.json\nRESULTS-quick.md\nplots-quick/\n",
        )?;
    }
    Ok(Outputs {
        json: json_path.to_owned(),
        report,
    })
}

/// `2026-11-23T13:27:18Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
