//! Resource limits through cgroups: v2 first, v1 where a controller only exists there.
//!
//! Each service gets `<daemon's cgroup>/viscum/NAME` in every hierarchy that carries a
//! controller it needs; the process joins them between fork and exec (it writes "0" to each
//! `cgroup.procs`), so it is limited from its first instruction. A v2 group is made even
//! without limits when the v2 hierarchy is writable: it holds every descendant of the
//! service, including ones that left its process group, and `cgroup.kill` ends them all.
//!
//! Limits are never silently dropped: each one is reported as enforced (with the file that
//! enforces it) or unsupported (with the reason), in `viscum status` and in the log. Hosts
//! differ a lot here: OpenWrt and current distributions are pure v2; some boxes run the
//! hybrid layout (v1 controllers plus an empty v2 tree at /sys/fs/cgroup/unified), where the
//! v2 tree has no controllers and limits come from the v1 hierarchies; kernels may lack a
//! controller altogether (`CONFIG_MEMCG=n` on small routers).
//!
//! v2's "no internal processes" rule: controllers can only be delegated to children of a
//! group that holds no processes itself (the root excepted). When the daemon sits in a
//! non-root group, it first moves itself into a leaf sibling (`viscum-daemon`).

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::config::Limits;

/// CFS period used for `cpu` limits (the kernel default).
const CPU_PERIOD_US: u64 = 100_000;

/// How one limit fared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitStatus {
    /// The configured value, as written in the file.
    pub value: String,
    /// Whether a cgroup control file now applies the limit.
    pub enforced: bool,
    /// The file that enforces it, or why it is not enforced.
    pub detail: String,
}

/// Per-limit outcome, keyed by limit name (memory, cpu, pids).
pub type LimitsReport = BTreeMap<String, LimitStatus>;

/// The cgroups a service process joins.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// `cgroup.procs` files to join.
    pub procs: Vec<PathBuf>,
    /// Directories made for the service (removed when it goes).
    pub dirs: Vec<PathBuf>,
    /// The v2 group, if any (for `cgroup.kill`).
    pub v2_dir: Option<PathBuf>,
    /// How each configured limit fared (shown in the service's status).
    pub report: LimitsReport,
    /// The file counting the group's OOM kills (`oom_kill N`): v2 `memory.events` or v1
    /// `memory.oom_control`; set with an enforced memory limit.
    pub oom_events: Option<PathBuf>,
}

/// One mounted hierarchy.
#[derive(Debug, Clone)]
struct Hierarchy {
    mount: PathBuf,
    /// v1: the controllers bound to it; empty for v2.
    controllers: Vec<String>,
    v2: bool,
}

fn mounts() -> Vec<Hierarchy> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines() {
        // "... mount_point options - fstype source super_options"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount = left.split(' ').nth(4).unwrap_or("");
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let super_opts = r.nth(1).unwrap_or("");
        let mount = PathBuf::from(mount.replace("\\040", " "));
        match fstype {
            "cgroup2" => out.push(Hierarchy {
                mount,
                controllers: Vec::new(),
                v2: true,
            }),
            "cgroup" => out.push(Hierarchy {
                mount,
                controllers: super_opts.split(',').map(str::to_owned).collect(),
                v2: false,
            }),
            _ => {}
        }
    }
    out
}

/// The daemon's own cgroup path in the v2 hierarchy ("0::/path") or in the v1 hierarchy
/// carrying `controller` ("N:memory:/path" or "N:cpu,cpuacct:/path").
fn own_path(controller: Option<&str>) -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = match controller {
            None => ctrls.is_empty(),
            Some(c) => ctrls.split(',').any(|x| x == c),
        };
        hit.then(|| path.to_owned())
    })
}

fn join(mount: &Path, cgroup_path: &str) -> PathBuf {
    match cgroup_path.trim_matches('/') {
        "" => mount.to_path_buf(),
        rel => mount.join(rel),
    }
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("write {value:?} to {}: {e}", path.display()),
        )
    })
}

fn mkdir(dir: &Path, made: &mut Vec<PathBuf>) -> io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => {
            made.push(dir.to_owned());
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("create {}: {e}", dir.display()),
        )),
    }
}

/// The v2 side: prepares `<own>/viscum/NAME` with `wanted` controllers enabled. Returns the
/// directory and the controllers that could not be delegated (with why).
fn prepare_v2(
    mount: &Path,
    name: &str,
    wanted: &[&str],
) -> io::Result<(PathBuf, BTreeMap<String, String>)> {
    // Not own_path: after the first service the daemon sits in `viscum-daemon`, and the
    // next service's group belongs beside it, not under it.
    let own = own_base(None).unwrap_or_else(|| "/".into());
    let mut own_dir = join(mount, &own);
    let available = fs::read_to_string(own_dir.join("cgroup.controllers")).unwrap_or_default();
    let available: Vec<&str> = available.split_whitespace().collect();
    let mut missing = BTreeMap::new();
    let mut delegate = Vec::new();
    for c in wanted {
        if available.contains(c) {
            delegate.push(*c);
        } else {
            missing.insert(
                (*c).to_owned(),
                format!(
                    "the {c} controller is not available in the cgroup v2 hierarchy at {} (not compiled in, or bound to a v1 hierarchy)",
                    own_dir.display()
                ),
            );
        }
    }
    if !delegate.is_empty() && own != "/" {
        // No internal processes: move ourselves into a leaf before delegating from `own`.
        let leaf = own_dir.join("viscum-daemon");
        let mut ignored = Vec::new();
        let moved =
            mkdir(&leaf, &mut ignored).and_then(|()| write(&leaf.join("cgroup.procs"), "0"));
        if let Err(e) = moved {
            for c in delegate.drain(..) {
                missing.insert(
                    c.to_owned(),
                    format!("cannot move the daemon into a leaf cgroup to delegate {c}: {e}"),
                );
            }
        }
    }
    let base = own_dir.join("viscum");
    let mut made = Vec::new();
    mkdir(&base, &mut made)?;
    for c in delegate {
        let enabled = write(&own_dir.join("cgroup.subtree_control"), &format!("+{c}"))
            .and_then(|()| write(&base.join("cgroup.subtree_control"), &format!("+{c}")));
        if let Err(e) = enabled {
            missing.insert(
                c.to_owned(),
                format!("cannot enable the {c} controller: {e}"),
            );
        }
    }
    own_dir = base.join(name);
    let mut ignored = Vec::new();
    mkdir(&own_dir, &mut ignored)?;
    Ok((own_dir, missing))
}

/// Prepares the cgroups of service `name` and applies `limits`. Never fails: what cannot be
/// done is in the report (and logged by the caller).
pub fn prepare(name: &str, limits: &Limits) -> Placement {
    let mut placement = Placement::default();
    // The name becomes a directory under every hierarchy: only a valid service name (no
    // '/', no '.', no '..') may, whatever path it came by.
    if let Err(e) = crate::netns::validate_name(name) {
        log::error!("no cgroup for {name:?}: {e}");
        return placement;
    }
    // (limit name, controller, configured value text)
    let mut wanted: Vec<(&str, &str, String)> = Vec::new();
    if let Some(m) = limits.memory {
        wanted.push(("memory", "memory", m.to_string()));
    }
    if let Some(c) = limits.cpu {
        wanted.push(("cpu", "cpu", c.to_string()));
    }
    if let Some(p) = limits.pids {
        wanted.push(("pids", "pids", p.to_string()));
    }
    let hierarchies = mounts();
    let mut unsupported: BTreeMap<String, String> = BTreeMap::new();
    let mut pending: Vec<(&str, &str, String)> = wanted.clone();

    if let Some(v2) = hierarchies.iter().find(|h| h.v2) {
        let ctrls: Vec<&str> = wanted.iter().map(|w| w.1).collect();
        match prepare_v2(&v2.mount, name, &ctrls) {
            Ok((dir, missing)) => {
                placement.procs.push(dir.join("cgroup.procs"));
                placement.dirs.push(dir.clone());
                placement.v2_dir = Some(dir.clone());
                pending.retain(|(limit, ctrl, value)| {
                    if let Some(why) = missing.get(*ctrl) {
                        unsupported.insert((*limit).to_owned(), why.clone());
                        return true;
                    }
                    let (file, content) = match *limit {
                        "memory" => ("memory.max", value.clone()),
                        "cpu" => (
                            "cpu.max",
                            format!("{} {CPU_PERIOD_US}", cpu_quota(limits.cpu.unwrap_or(1.0))),
                        ),
                        _ => ("pids.max", value.clone()),
                    };
                    let path = dir.join(file);
                    match write(&path, &content) {
                        Ok(()) => {
                            if *limit == "memory" {
                                // One OOM kill ends the whole service (its helpers with
                                // it), which the daemon then restarts as one, rather than a
                                // half-killed service going on (memory.oom.group, 4.19).
                                if let Err(e) = write(&dir.join("memory.oom.group"), "1") {
                                    log::debug!("{name}: {e}");
                                }
                                placement.oom_events = Some(dir.join("memory.events"));
                            }
                            placement.report.insert(
                                (*limit).to_owned(),
                                LimitStatus {
                                    value: value.clone(),
                                    enforced: true,
                                    detail: path.display().to_string(),
                                },
                            );
                            false
                        }
                        Err(e) => {
                            unsupported.insert((*limit).to_owned(), e.to_string());
                            true
                        }
                    }
                });
            }
            Err(e) => {
                for (limit, _, _) in &pending {
                    unsupported.insert(
                        (*limit).to_owned(),
                        format!("cgroup v2 at {}: {e}", v2.mount.display()),
                    );
                }
            }
        }
    } else {
        for (limit, _, _) in &pending {
            unsupported.insert(
                (*limit).to_owned(),
                "no cgroup v2 hierarchy is mounted".into(),
            );
        }
    }

    // v1 fallback, one hierarchy per controller.
    for (limit, ctrl, value) in pending {
        let Some(h) = hierarchies
            .iter()
            .find(|h| !h.v2 && h.controllers.iter().any(|c| c == ctrl))
        else {
            let why = unsupported.remove(limit).unwrap_or_default();
            placement.report.insert(
                limit.to_owned(),
                LimitStatus {
                    value,
                    enforced: false,
                    detail: format!("unsupported: {why}; no v1 {ctrl} hierarchy either"),
                },
            );
            continue;
        };
        let result = (|| -> io::Result<PathBuf> {
            let own = own_path(Some(ctrl)).unwrap_or_else(|| "/".into());
            let base = join(&h.mount, &own).join("viscum");
            let mut made = Vec::new();
            mkdir(&base, &mut made)?;
            let dir = base.join(name);
            mkdir(&dir, &mut made)?;
            if !placement.dirs.contains(&dir) {
                placement.dirs.push(dir.clone());
                placement.procs.push(dir.join("cgroup.procs"));
            }
            let file = match limit {
                "memory" => {
                    let f = dir.join("memory.limit_in_bytes");
                    write(&f, &value)?;
                    placement.oom_events = Some(dir.join("memory.oom_control"));
                    f
                }
                "cpu" => {
                    write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    let f = dir.join("cpu.cfs_quota_us");
                    write(&f, &cpu_quota(limits.cpu.unwrap_or(1.0)).to_string())?;
                    f
                }
                _ => {
                    let f = dir.join("pids.max");
                    write(&f, &value)?;
                    f
                }
            };
            Ok(file)
        })();
        let v2_reason = unsupported.remove(limit).unwrap_or_default();
        match result {
            Ok(file) => {
                placement.report.insert(
                    limit.to_owned(),
                    LimitStatus {
                        value,
                        enforced: true,
                        detail: format!("{} (cgroup v1; v2: {v2_reason})", file.display()),
                    },
                );
            }
            Err(e) => {
                placement.report.insert(
                    limit.to_owned(),
                    LimitStatus {
                        value,
                        enforced: false,
                        detail: format!("unsupported: v2: {v2_reason}; v1: {e}"),
                    },
                );
            }
        }
    }
    placement
}

/// CFS quota in microseconds per [`CPU_PERIOD_US`] for `cpus` CPUs (at least 1 ms).
fn cpu_quota(cpus: f64) -> u64 {
    ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000)
}

/// `oom_kill` in `memory.events` (v2) or `memory.oom_control` (v1, Linux 4.13).
fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

/// Processes of the service the OOM killer ended, as its memory cgroup counts them; `None`
/// without an enforced memory limit or a counter.
pub fn oom_kills(placement: &Placement) -> Option<u64> {
    oom_kills_in(placement.oom_events.as_ref()?)
}

/// [`oom_kills`] from the counter file itself (`memory.events` or `memory.oom_control`).
pub fn oom_kills_in(file: &Path) -> Option<u64> {
    parse_oom_kills(&fs::read_to_string(file).ok()?)
}

/// The daemon's v2 `viscum` group (the parent of every service's group), if it exists: its
/// `cpu.pressure` and `memory.pressure` are the services' pressure (`load_scope =
/// "services"`).
pub fn services_v2_dir() -> Option<PathBuf> {
    let v2 = mounts().into_iter().find(|h| h.v2)?;
    let dir = join(&v2.mount, &own_base(None)?).join("viscum");
    dir.is_dir().then_some(dir)
}

/// Kills every process left in the service's v2 group (`cgroup.kill`, Linux 5.14).
pub fn kill_all(placement: &Placement) {
    if let Some(dir) = &placement.v2_dir {
        let kill = dir.join("cgroup.kill");
        if kill.exists()
            && let Err(e) = fs::write(&kill, "1")
        {
            log::debug!("cannot write {}: {e}", kill.display());
        }
    }
}

/// Removes the service's groups (they must be empty; an `rmdir` of a busy group fails and
/// is only logged: it is retried at the next start or removal).
pub fn remove(placement: &Placement) {
    for dir in placement.dirs.iter().rev() {
        if let Err(e) = fs::remove_dir(dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            log::debug!("cannot remove cgroup {}: {e}", dir.display());
        }
    }
}

/// The daemon's cgroup path as [`own_path`] gives it, without the `viscum-daemon` leaf
/// [`prepare_v2`] may have moved it into: the group the `viscum` directory was made in.
fn own_base(controller: Option<&str>) -> Option<String> {
    let own = own_path(controller)?;
    Some(match own.strip_suffix("/viscum-daemon") {
        Some("") => "/".to_owned(),
        Some(parent) => parent.to_owned(),
        None => own,
    })
}

/// The `<own>/viscum` directories of every hierarchy.
fn bases() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for h in mounts() {
        let own = if h.v2 {
            own_base(None)
        } else {
            h.controllers.iter().find_map(|c| own_base(Some(c)))
        };
        if let Some(own) = own {
            dirs.push(join(&h.mount, &own).join("viscum"));
        }
    }
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Removes the groups of service `name` wherever they are, without knowing its placement
/// (cleanup of a service a previous daemon ran).
pub fn remove_named(name: &str) {
    // Names here come from file names in the state directory: a stray "..json" must not
    // reach rmdir as "..".
    if crate::netns::validate_name(name).is_err() {
        log::warn!("not removing cgroups of {name:?}: not a service name");
        return;
    }
    remove(&Placement {
        dirs: bases().into_iter().map(|b| b.join(name)).collect(),
        ..Default::default()
    });
}

/// Removes the (empty) `viscum` parent groups, at a clean shutdown.
pub fn remove_bases() {
    remove(&Placement {
        dirs: bases(),
        ..Default::default()
    });
}

/// Pids in the service's groups (for status and tests).
pub fn members(placement: &Placement) -> Vec<i32> {
    let mut pids = Vec::new();
    for procs in &placement.procs {
        if let Ok(text) = fs::read_to_string(procs) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_counters() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 1\n";
        assert_eq!(parse_oom_kills(v2), Some(2));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n";
        assert_eq!(parse_oom_kills(v1), Some(5));
        assert_eq!(parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n"), None);
    }

    #[test]
    fn cpu_quota_is_per_period() {
        assert_eq!(cpu_quota(0.5), 50_000);
        assert_eq!(cpu_quota(2.0), 200_000);
        assert_eq!(cpu_quota(0.0001), 1000);
    }

    #[test]
    fn names_that_are_not_service_names_get_no_directory() {
        for name in ["..", ".", "../x", "a/b", "", "/etc"] {
            let p = prepare(name, &Limits::default());
            assert!(p.dirs.is_empty() && p.procs.is_empty(), "{name:?}: {p:?}");
        }
    }
}
