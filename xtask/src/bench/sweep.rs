//! Run ids and leftovers: every namespace a run makes starts with `<run id>-`, and its files
//! live under `/run/viscum-bench-<run id>` (with a bpffs mounted at `bpf/`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    mount::{MntFlags, umount2},
    sys::signal::{self, Signal},
    unistd::Pid,
};

const PREFIX: &str = "viscum-bench-";

pub fn run_dir(run_id: &str) -> PathBuf {
    Path::new("/run").join(format!("{PREFIX}{run_id}"))
}

/// Starts a run: sweeps stale runs, then takes a fresh id and creates its directory, owned
/// by this process (what [`stale_runs`] checks). Returns the id and the directory.
pub fn begin() -> Result<(String, PathBuf)> {
    stale_runs();
    let run_id = new_run_id()?;
    let dir = run_dir(&run_id);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::write(dir.join("owner"), std::process::id().to_string())
        .with_context(|| format!("cannot write {}/owner", dir.display()))?;
    Ok((run_id, dir))
}

/// A fresh id `vb` + 4 hex digits that no directory or namespace uses yet.
pub fn new_run_id() -> Result<String> {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id();
    for i in 0..64u32 {
        let id = format!(
            "vb{:04x}",
            (seed
                .wrapping_mul(2_654_435_761)
                .wrapping_add(i.wrapping_mul(40_503)))
                >> 16
                & 0xffff
        );
        if !run_dir(&id).exists() && namespaces(&id).is_empty() {
            return Ok(id);
        }
    }
    bail!("cannot find a free run id under /run")
}

/// Named namespaces of run `run_id`.
fn namespaces(run_id: &str) -> Vec<String> {
    let want = format!("{run_id}-");
    fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(std::result::Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&want))
                .collect()
        })
        .unwrap_or_default()
}

/// Kills what runs inside the run's namespaces (all started by that run), deletes the
/// namespaces and unmounts the run's bpffs.
pub fn run_leftovers(run_id: &str) {
    let names = namespaces(run_id);
    if !names.is_empty() {
        println!(
            "bench: sweeping {} namespace(s) left by run {run_id}",
            names.len()
        );
    }
    for ns in &names {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    for ns in &names {
        let ok = Command::new("ip")
            .args(["netns", "del", ns])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("bench: cannot delete namespace {ns}");
        }
    }
    let bpf = run_dir(run_id).join("bpf");
    if is_mounted(&bpf)
        && let Err(e) = umount2(&bpf, MntFlags::MNT_DETACH)
    {
        eprintln!("bench: cannot unmount {}: {e}", bpf.display());
    }
}

fn is_mounted(path: &Path) -> bool {
    let p = path.to_string_lossy();
    fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(&*p)))
        .unwrap_or(false)
}

/// Final cleanup of a run: leftovers, then its directory.
pub fn finish(run_id: &str) {
    run_leftovers(run_id);
    let dir = run_dir(run_id);
    if let Err(e) = fs::remove_dir_all(&dir)
        && dir.exists()
    {
        eprintln!("bench: cannot remove {}: {e}", dir.display());
    }
}

/// Runs whose owner is gone: an xtask that was killed, or a bench binary started by hand more
/// than an hour ago.
pub fn stale_runs() {
    let Ok(rd) = fs::read_dir("/run") else { return };
    for entry in rd.filter_map(std::result::Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(run_id) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let dir = entry.path();
        let stale = match fs::read_to_string(dir.join("owner"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
            None => fs::metadata(&dir)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(3600)),
        };
        if stale {
            println!("bench: removing what run {run_id} left behind");
            finish(run_id);
        }
    }
}
