//! Check (e) `cgroup-limits`: the `memory`, `cpu` and `pids` limits of `[service.limits]`
//! through the real daemon, on whatever cgroup layout the kernel has: cgroup v2 in the VM
//! guests (the runner mounts cgroup2 on `/sys/fs/cgroup`), the v1 controllers on a hybrid
//! host. `tests/tests/limits.rs` runs the same check on the development machine.
//!
//! The service is `viscum-vmcheck hog limits` ([`crate::hog`]) with `memory = "16M"`,
//! `cpu = 0.05` (5 ms per 100 ms period), `pids = 16`. What must be seen:
//!
//! * every limit reported enforced, by the file of the expected hierarchy (`memory.max`,
//!   `cpu.max`, `pids.max` on v2; `memory.limit_in_bytes`, `cpu.cfs_quota_us` on v1);
//! * `pids`: the hog starts fewer than 16 threads (it tries 40);
//! * `cpu`: the group's `cpu.stat` counts throttled periods after the hog's 1 s spin on
//!   five threads;
//! * `memory`: the OOM killer ends the hog inside its own group (the daemon lives on), the
//!   daemon restarts it, and `status` shows `oom_kills` >= 1, a restart and
//!   `killed by signal 9`.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use viscum_lab::daemon::{Daemon, DaemonFiles, Limits, Service};

use crate::{
    cases::{CaseResult, run_case},
    guard::wait_until,
    lab::Lab,
};

/// The `cpu` limit: small enough that the hog's group exceeds it even when a busy host gives
/// the whole group a small share (on v1 the group weighs as much as one task of the root).
const CPU: f64 = 0.05;

/// Bound for the whole sequence (emulated CPUs are slow; on a real one it takes seconds).
const BOUND: Duration = Duration::from_secs(240);

/// Minimal account files for a guest whose initramfs has none (the daemon resolves the
/// service's user); a host's are never touched.
pub fn ensure_accounts() -> Result<(), String> {
    if Path::new("/etc/passwd").exists() {
        return Ok(());
    }
    fs::create_dir_all("/etc").map_err(|e| format!("/etc: {e}"))?;
    fs::write("/etc/passwd", "root:x:0:0:root:/:/bin/false\n")
        .and_then(|()| fs::write("/etc/group", "root:x:0:\n"))
        .map_err(|e| format!("cannot write /etc/passwd: {e}"))
}

/// Is the v2 hierarchy the one that carries the memory controller here?
fn memory_on_v2() -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|r| r.starts_with("cgroup2 "))
                && l.split(' ').nth(4).is_some_and(|mount| {
                    fs::read_to_string(Path::new(mount).join("cgroup.controllers"))
                        .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
                })
        })
}

/// The first whitespace-separated word of a limit's `detail`: the file that enforces it.
fn enforcing_file(svc: &serde_json::Value, limit: &str) -> Result<PathBuf, String> {
    let l = &svc["limits"][limit];
    if l["enforced"] != true {
        return Err(format!("{limit} not enforced: {l}"));
    }
    l["detail"]
        .as_str()
        .and_then(|d| d.split_whitespace().next())
        .map(PathBuf::from)
        .ok_or_else(|| format!("{limit}: no file in {l}"))
}

fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// A copy of program `bin` a service can run, in `dir`: readable and executable by all (services
/// run as `nobody`), and outside `/tmp`: services get a private `/tmp`, so a test binary of a
/// checkout under `/tmp` (a `mktemp -d` clone) is invisible to them ("No such file or
/// directory" at every start).
pub fn runnable_copy(bin: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let dst = dir.join(bin.file_name().unwrap_or(bin.as_os_str()));
    fs::copy(bin, &dst)?;
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))?;
    Ok(dst)
}

/// Runs the check with the daemon attached to `interfaces` of `lab` (none in the VM runner,
/// where the lab's datapath is loaded already), the service running `hog` (this binary).
pub fn cgroup_limits(lab: &Lab, hog: &Path, interfaces: &[&str]) -> CaseResult {
    run_case("cgroup-limits", || {
        ensure_accounts()?;
        let v2 = memory_on_v2();
        let files = DaemonFiles::new();
        let hog = &runnable_copy(hog, files.dir())
            .map_err(|e| format!("cannot copy {} for the service: {e}", hog.display()))?;
        let name = lab.service_ns_name();
        let mut config = files.config();
        config.engine.interfaces = interfaces.iter().map(ToString::to_string).collect();
        let mut svc = Service::new(
            &name,
            vec![hog.display().to_string(), "hog".into(), "limits".into()],
        )
        .matches(&["tcp://198.51.100.7:9199".to_string()]);
        svc.user = Some("root".into());
        svc.limits = Some(Limits {
            memory: Some("16M".into()),
            cpu: Some(CPU),
            pids: Some(16),
        });
        config.services.push(svc);
        files.write(&config);
        let daemon = Daemon::start(lab, &files);
        let log = files.run_dir().join("logs").join(format!("{name}.log"));
        let start = Instant::now();

        // The limits, and the files enforcing them (reported once the task made its groups).
        let mut svc = serde_json::Value::Null;
        wait_until(BOUND, || {
            svc = daemon.service(&name);
            !svc["limits"]["memory"].is_null()
        });
        let mem = enforcing_file(&svc, "memory")?;
        let cpu = enforcing_file(&svc, "cpu")?;
        let pids = enforcing_file(&svc, "pids")?;
        let want = if v2 {
            ["memory.max", "cpu.max", "pids.max"]
        } else {
            ["memory.limit_in_bytes", "cpu.cfs_quota_us", "pids.max"]
        };
        for (file, want) in [&mem, &cpu, &pids].iter().zip(want) {
            if file.file_name().and_then(|n| n.to_str()) != Some(want) {
                return Err(format!(
                    "{} enforces a limit, expected {want} ({})",
                    file.display(),
                    if v2 { "cgroup v2" } else { "cgroup v1" }
                ));
            }
        }

        // pids and cpu, from the first run's output and the group's counters.
        let mut text = String::new();
        if !wait_until(BOUND, || {
            text = fs::read_to_string(&log).unwrap_or_default();
            text.lines().any(|l| l.starts_with("threads "))
        }) {
            return Err(format!("the hog did not report within {BOUND:?}:\n{text}"));
        }
        let threads: u32 = text
            .lines()
            .find_map(|l| l.strip_prefix("threads "))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("no thread count in\n{text}"))?;
        if threads >= 16 {
            return Err(format!("pids = 16, yet the hog started {threads} threads"));
        }
        let cpu_stat = fs::read_to_string(cpu.with_file_name("cpu.stat"))
            .map_err(|e| format!("{}: {e}", cpu.with_file_name("cpu.stat").display()))?;
        let throttled = stat_value(&cpu_stat, "nr_throttled").unwrap_or(0);
        if throttled == 0 {
            return Err(format!(
                "cpu = {CPU}, yet no period was throttled:\n{cpu_stat}"
            ));
        }
        let quota = fs::read_to_string(&cpu).map_err(|e| format!("{}: {e}", cpu.display()))?;
        if quota.split_whitespace().next() != Some("5000") {
            return Err(format!(
                "{}: {quota:?}, expected a 5000 us quota",
                cpu.display()
            ));
        }

        // memory: killed inside its group, restarted, reported.
        let mut svc = serde_json::Value::Null;
        let seen = wait_until(BOUND.saturating_sub(start.elapsed()), || {
            svc = daemon.service(&name);
            svc["oom_kills"].as_u64().is_some_and(|n| n >= 1)
                && svc["restarts"].as_u64().is_some_and(|n| n >= 1)
                && svc["last_exit"]
                    .as_str()
                    .is_some_and(|e| e.contains("signal 9"))
        });
        if !seen {
            return Err(format!(
                "no OOM kill and restart reported within {BOUND:?}: {svc}\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        let allocated = fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                l.strip_prefix("allocated ")?
                    .strip_suffix(" MiB")?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or(0);
        if allocated >= 32 {
            return Err(format!("memory = 16M, yet the hog held {allocated} MiB"));
        }
        // The daemon was not the victim: it still answers, with the same pid.
        let pid = daemon.status()["pid"].as_i64().unwrap_or(0);
        if pid != i64::from(daemon.pid()) {
            return Err(format!(
                "the daemon's pid changed: {pid} vs {}",
                daemon.pid()
            ));
        }
        let detail = format!(
            "{}: memory {} (oom_kills {}, restarts {}, at most {allocated} MiB held), cpu {} ({throttled} throttled periods), pids {} ({threads} threads of 40)",
            if v2 { "cgroup v2" } else { "cgroup v1" },
            mem.display(),
            svc["oom_kills"],
            svc["restarts"],
            cpu.display(),
            pids.display(),
        );
        let _ = daemon.request(&format!(r#"{{"cmd":"stop","service":"{name}"}}"#));
        drop(daemon);
        Ok(detail)
    })
}
