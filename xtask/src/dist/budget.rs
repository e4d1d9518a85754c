//! `cargo xtask dist --budget`: B9 for the router builds, without the other benchmarks.
//!
//! * Size: each stripped static `target/dist/viscum-<triple>`; budget 5 MiB.
//! * Memory: resident set (VmRSS) of an idle `viscum run` with 10 healthy, redirected
//!   services; budget 10 MiB. `viscum run` loads and attaches the classifier before anything
//!   else, and qemu-user has no `bpf()`, so the daemon cannot start there: this runs the
//!   x86-64 musl build natively (the same source, allocator and runtime as the router builds;
//!   the daemon uses tokio's current-thread runtime, so there are no per-core worker threads).
//!   Everything lives in a namespace made for the run (`vxb9-<pid>`) with its own bpffs
//!   under `/run/viscum-b9-<pid>`, removed afterwards. Services are `socat` listeners, each
//!   in its own namespace made by the daemon, with a TCP health check; their own memory is
//!   not counted.
//!
//! Output: `bench/results/<date>-b9-router.json` and the section between
//! `<!-- b9-router:begin -->` and `<!-- b9-router:end -->` of `bench/RESULTS.md` (appended
//! when absent; everything else in the file is left as it is).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::elf;
use crate::{cross::Target, process};

const MIB: f64 = 1024.0 * 1024.0;
/// Budgets of docs/benchmarks.md (B9).
const SIZE_BUDGET_MIB: f64 = 5.0;
const RSS_BUDGET_MIB: f64 = 10.0;
const SERVICES: usize = 10;
const BEGIN: &str = "<!-- b9-router:begin -->";
const END: &str = "<!-- b9-router:end -->";

/// One built target with what the run learnt about it.
pub struct Built {
    pub target: Target,
    pub binary: PathBuf,
    pub build_s: Option<f64>,
    /// The qemu-user proof's summary, when `--test` ran.
    pub test: Option<String>,
}

/// Measures B9 for `built`, writes the results; returns whether every budget was met.
pub fn run(built: &[Built]) -> Result<bool> {
    let mut ok = true;
    let mut sizes = Vec::new();
    for b in built {
        let facts = elf::check(&b.binary, b.target)?;
        let mib = facts.bytes as f64 / MIB;
        let met = mib <= SIZE_BUDGET_MIB;
        ok &= met;
        sizes.push(json!({
            "target": b.target.triple,
            "bytes": facts.bytes,
            "mib": mib,
            "met": met,
            "linking": if facts.pie { "static PIE" } else { "static" },
            "bpf_object": if facts.big_endian { "bpfeb" } else { "bpfel" },
            "build_seconds": b.build_s,
            "qemu_user": b.test,
        }));
    }
    let memory = match built
        .iter()
        .find(|b| b.target.triple == "x86_64-unknown-linux-musl")
    {
        Some(b) => match daemon_rss(&b.binary) {
            Ok(m) => {
                ok &= m["met"] == true;
                m
            }
            Err(e) => {
                ok = false;
                json!({ "error": format!("{e:#}") })
            }
        },
        None => {
            json!({ "error": "x86_64-unknown-linux-musl not built in this run (the daemon's RSS is measured natively with it)" })
        }
    };
    let doc = json!({
        "schema": 1,
        "kind": "b9-router",
        "date_utc": now_utc(),
        "git": git_describe(),
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "budgets": { "size_mib": SIZE_BUDGET_MIB, "rss_mib": RSS_BUDGET_MIB, "services": SERVICES },
        "sizes": sizes,
        "memory": memory,
    });
    let root = process::workspace_root();
    let results = root.join("bench/results");
    fs::create_dir_all(&results)?;
    let json_path = results.join(format!("{}-b9-router.json", &now_utc()[..10]));
    fs::write(&json_path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    let md = render(&doc, &json_path);
    let report = root.join("bench/RESULTS.md");
    let old = fs::read_to_string(&report).unwrap_or_default();
    fs::write(&report, splice(&old, &md))
        .with_context(|| format!("cannot write {}", report.display()))?;
    println!("{md}");
    println!(
        "dist: B9 in {} and {}",
        json_path.display(),
        report.display()
    );
    Ok(ok)
}

/// `old` with the router B9 section replaced by `section` (appended when absent).
fn splice(old: &str, section: &str) -> String {
    let block = format!("{BEGIN}\n{section}{END}\n");
    match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if e > b => {
            format!(
                "{}{block}{}",
                &old[..b],
                old[e + END.len()..].trim_start_matches('\n')
            )
        }
        _ => {
            let sep = if old.is_empty() || old.ends_with("\n\n") {
                ""
            } else if old.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{old}{sep}{block}")
        }
    }
}

fn render(doc: &Value, json_path: &Path) -> String {
    let mut s =
        String::from("## B9 Router builds: size and idle memory (`cargo xtask dist --budget`)\n\n");
    s.push_str(&format!(
        "Measured {} at {} on Linux {}; raw data in `bench/results/{}`. How the binaries are \
         built and proven: [docs/router-builds.md](../docs/router-builds.md).\n\n",
        doc["date_utc"].as_str().unwrap_or("?"),
        doc["git"].as_str().unwrap_or("?"),
        doc["kernel"].as_str().unwrap_or("?"),
        json_path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    s.push_str("| target | size (MiB) | bytes | budget ≤ 5 MiB | linking | eBPF object | build (s) | qemu-user proof |\n");
    s.push_str("|---|---:|---:|:---:|---|---|---:|---|\n");
    for r in doc["sizes"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} | {:.2} | {} | {} | {} | {} | {} | {} |\n",
            r["target"].as_str().unwrap_or("?"),
            r["mib"].as_f64().unwrap_or(f64::NAN),
            r["bytes"],
            if r["met"] == true { "✅" } else { "❌" },
            r["linking"].as_str().unwrap_or("?"),
            r["bpf_object"].as_str().unwrap_or("?"),
            r["build_seconds"]
                .as_f64()
                .map_or("–".into(), |v| format!("{v:.0}")),
            r["qemu_user"].as_str().unwrap_or("not run (`--test`)"),
        ));
    }
    let m = &doc["memory"];
    s.push('\n');
    if let Some(e) = m["error"].as_str() {
        s.push_str(&format!("Daemon RSS: not measured: {e}\n"));
    } else {
        s.push_str("| metric | value | budget | met | notes |\n|---|---:|---|:---:|---|\n");
        s.push_str(&format!(
            "| daemon RSS, idle, {} services (x86_64-unknown-linux-musl, native) | {:.2} MiB | ≤ 10 MiB | {} | peak (VmHWM) {:.2} MiB; services up and redirected in {:.1} s; measured after {} s idle; the services' own processes not included |\n",
            m["services"],
            m["rss_mib"].as_f64().unwrap_or(f64::NAN),
            if m["met"] == true { "✅" } else { "❌" },
            m["hwm_mib"].as_f64().unwrap_or(f64::NAN),
            m["ready_seconds"].as_f64().unwrap_or(f64::NAN),
            m["idle_seconds"],
        ));
    }
    s.push('\n');
    s
}

/// What is removed when the measurement ends, however it ends.
struct Cleanup {
    netns: String,
    dir: PathBuf,
    bpffs: PathBuf,
    daemon: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            stop(&mut d);
        }
        let _ = nix::mount::umount2(&self.bpffs, nix::mount::MntFlags::MNT_DETACH);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// SIGTERM (the daemon's clean shutdown removes its services and namespaces), then SIGKILL
/// after 30 s.
fn stop(d: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(d.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = d.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("dist: the daemon did not stop within 30 s; killing it");
    let _ = d.kill();
    let _ = d.wait();
}

/// Starts `viscum run` with [`SERVICES`] services in a namespace of its own, waits until all
/// are redirected, idles, and reads the daemon's VmRSS/VmHWM.
fn daemon_rss(viscum: &Path) -> Result<Value> {
    if !process::is_root() {
        bail!("the daemon needs root (namespaces, bpffs, eBPF)");
    }
    for tool in ["ip", "nsenter", "socat"] {
        if !process::have(tool) {
            bail!("{tool} is not installed (`cargo xtask setup`)");
        }
    }
    let pid = std::process::id();
    let tag = format!("b9{:05}", pid % 100_000);
    let dir = PathBuf::from(format!("/run/viscum-b9-{pid}"));
    let mut guard = Cleanup {
        netns: format!("vxb9-{pid}"),
        bpffs: dir.join("bpf"),
        dir: dir.clone(),
        daemon: None,
    };
    fs::create_dir_all(&guard.bpffs)?;
    let ns = guard.netns.clone();
    process::output(Command::new("ip").args(["netns", "add", &ns]))?;
    process::output(Command::new("ip").args([
        "-n", &ns, "link", "add", "lan0", "type", "veth", "peer", "name", "lan1",
    ]))?;
    for dev in ["lan0", "lan1", "lo"] {
        process::output(Command::new("ip").args(["-n", &ns, "link", "set", dev, "up"]))?;
    }
    let q = |p: &Path| format!("\"{}\"", p.display());
    let control = dir.join("control.sock");
    let mut cfg = format!(
        "[engine]\ninterfaces = [\"lan0\"]\nbpffs = {}\ncontrol = {}\nrun_dir = {}\n",
        q(&guard.bpffs),
        q(&control),
        q(&dir.join("run")),
    );
    for i in 0..SERVICES {
        cfg.push_str(&format!(
            "\n[[service]]\nname = \"{tag}s{i}\"\nmatch = [\"tcp://10.99.0.{}:7000\"]\n\
             command = [\"socat\", \"TCP-LISTEN:7000,reuseaddr,fork\", \"SYSTEM:echo ok\"]\n\
             user = \"root\"\nrestart = \"never\"\n\
             [service.health]\ntcp = 7000\ninterval_ms = 1000\ntimeout_ms = 500\nrise = 2\nfall = 2\n",
            i + 1
        ));
    }
    let config = dir.join("viscum.toml");
    fs::write(&config, cfg)?;
    let log = dir.join("daemon.log");
    let nsenter = |args: &[&str]| {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}"))
            .arg(viscum)
            .arg("--bpffs")
            .arg(&guard.bpffs)
            .args(args);
        c
    };
    let cfg_arg = config.display().to_string();
    process::output(&mut nsenter(&["run", "--config", &cfg_arg, "--check"]))?;
    let started = Instant::now();
    let daemon = nsenter(&["run", "--config", &cfg_arg])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()
        .context("cannot start the daemon")?;
    let daemon_pid = daemon.id();
    guard.daemon = Some(daemon);
    let control_arg = control.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    let ready_s = loop {
        if let Some(d) = guard.daemon.as_mut()
            && let Ok(Some(status)) = d.try_wait()
        {
            bail!(
                "the daemon exited ({status}): {}",
                fs::read_to_string(&log).unwrap_or_default().trim()
            );
        }
        let out = process::capture(&mut nsenter(&[
            "status",
            "--json",
            "--control",
            &control_arg,
        ]))?;
        let redirected = serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|s| {
                s["services"].as_array().map(|v| {
                    v.iter()
                        .filter(|x| x["redirected"].as_bool() == Some(true))
                        .count()
                })
            })
            .unwrap_or(0);
        if redirected >= SERVICES {
            break started.elapsed().as_secs_f64();
        }
        if Instant::now() > deadline {
            bail!(
                "{redirected} of {SERVICES} services redirected after 120 s (log: {})",
                log.display()
            );
        }
        thread::sleep(Duration::from_millis(200));
    };
    let idle = 5;
    thread::sleep(Duration::from_secs(idle));
    let status = fs::read_to_string(format!("/proc/{daemon_pid}/status"))
        .context("cannot read the daemon's /proc status")?;
    let kib = |key: &str| -> Result<f64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .with_context(|| format!("no {key} in the daemon's /proc status"))
    };
    let rss = kib("VmRSS:")? / 1024.0;
    let hwm = kib("VmHWM:")? / 1024.0;
    drop(guard);
    println!("dist: daemon RSS idle with {SERVICES} services: {rss:.2} MiB (peak {hwm:.2} MiB)");
    Ok(json!({
        "binary": viscum.display().to_string(),
        "services": SERVICES,
        "rss_mib": rss,
        "hwm_mib": hwm,
        "met": rss <= RSS_BUDGET_MIB,
        "ready_seconds": ready_s,
        "idle_seconds": idle,
    }))
}

fn now_utc() -> String {
    civil(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn civil(secs: u64) -> String {
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

fn git_describe() -> String {
    process::output(
        Command::new("git")
            .current_dir(process::workspace_root())
            .args(["describe", "--always", "--dirty"]),
    )
    .map(|s| s.trim().to_owned())
    .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_or_appends_only_its_section() {
        let once = splice("# Results\n\nB1 stays\n", "new 1\n");
        assert_eq!(
            once,
            format!("# Results\n\nB1 stays\n\n{BEGIN}\nnew 1\n{END}\n")
        );
        let twice = splice(&(once.clone() + "tail\n"), "new 2\n");
        assert_eq!(
            twice,
            format!("# Results\n\nB1 stays\n\n{BEGIN}\nnew 2\n{END}\ntail\n")
        );
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil(0), "1970-01-01T00:00:00Z");
        assert_eq!(civil(1_000_000_000), "2001-09-09T01:46:40Z");
        assert_eq!(civil(951_782_400), "2000-02-29T00:00:00Z");
    }
}
