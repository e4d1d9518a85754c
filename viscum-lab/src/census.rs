//! A leak census of one daemon test: what exists now that a daemon could have made and
//! forgotten, scoped to the test (other tests run on the same machine at the same time).
//!
//! * service namespaces: which of the test's service names are in `/run/netns`;
//! * interfaces in the lab's edge namespace (the service veths' host ends live there);
//! * pins: every path under the lab's bpffs directory;
//! * processes: every process whose command line mentions the test's [`DaemonFiles`]
//!   directory (the service copies run its script), counted by command line — pids change
//!   across restarts, the count must not;
//! * cgroups: directories `.../viscum/<service>` under `/sys/fs/cgroup` for the test's
//!   service names.
//!
//! Take one before a fault and one after, and compare with [`Census::diff`].
//!
//! [`DaemonFiles`]: crate::DaemonFiles

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use crate::lab::Lab;

/// What one census saw (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Census {
    /// Service names with a namespace in `/run/netns`.
    pub namespaces: BTreeSet<String>,
    /// Interface names in the lab's edge namespace.
    pub edge_links: BTreeSet<String>,
    /// Paths under the lab's bpffs directory, relative to it, with every all-digit component
    /// (an ifindex, e.g. `targets/4/vh-web`) written `#`: a re-created interface gets a new
    /// index, which is not a leak; two records where there was one are, so each path is
    /// counted.
    pub pins: BTreeMap<String, usize>,
    /// Command lines (arguments joined by spaces) of processes mentioning the test's files
    /// directory, with how many processes run each.
    pub processes: BTreeMap<String, usize>,
    /// cgroup directories of the test's services (absolute paths).
    pub cgroups: BTreeSet<PathBuf>,
}

impl Census {
    /// Takes a census of `lab` for services `services` whose files are in `files_dir`.
    /// Panics if the edge namespace cannot be listed.
    pub fn take(lab: &Lab, services: &[String], files_dir: &Path) -> Census {
        let namespaces = services
            .iter()
            .filter(|s| Path::new(viscum::netns::NETNS_RUN_DIR).join(s).exists())
            .cloned()
            .collect();
        let edge_links = lab.edge.block_on(|| async {
            let handle = viscum::netns::handle_here()
                .await
                .expect("netlink in the edge");
            viscum::netns::list_links(&handle)
                .await
                .expect("list the edge's interfaces")
                .into_iter()
                .map(|l| l.name)
                .collect::<BTreeSet<String>>()
        });
        let mut pins = BTreeMap::new();
        walk(lab.bpffs.path(), lab.bpffs.path(), 6, &mut |p, _| {
            let p = p
                .split('/')
                .map(|c| {
                    if !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) {
                        "#"
                    } else {
                        c
                    }
                })
                .collect::<Vec<_>>()
                .join("/");
            *pins.entry(p).or_insert(0) += 1;
        });
        let marker = files_dir.display().to_string();
        let mut processes = BTreeMap::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let line = args.join(" ");
            if line.contains(&marker) {
                *processes.entry(line).or_insert(0) += 1;
            }
        }
        let wanted: BTreeSet<&str> = services.iter().map(String::as_str).collect();
        let mut cgroups = BTreeSet::new();
        let root = Path::new("/sys/fs/cgroup");
        walk(root, root, 8, &mut |_, path: &Path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let parent = path
                .parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str());
            if path.is_dir() && wanted.contains(name) && parent == Some("viscum") {
                cgroups.insert(path.to_owned());
            }
        });
        Census {
            namespaces,
            edge_links,
            pins,
            processes,
            cgroups,
        }
    }

    /// How `self` differs from `before`: each line says what appeared (`+`) or vanished
    /// (`-`). Empty when they are the same.
    pub fn diff(&self, before: &Census) -> Vec<String> {
        fn sets<T: Ord + std::fmt::Debug>(
            what: &str,
            now: &BTreeSet<T>,
            then: &BTreeSet<T>,
            out: &mut Vec<String>,
        ) {
            for x in now.difference(then) {
                out.push(format!("+ {what} {x:?}"));
            }
            for x in then.difference(now) {
                out.push(format!("- {what} {x:?}"));
            }
        }
        let mut out = Vec::new();
        sets("namespace", &self.namespaces, &before.namespaces, &mut out);
        sets(
            "edge interface",
            &self.edge_links,
            &before.edge_links,
            &mut out,
        );
        sets("cgroup", &self.cgroups, &before.cgroups, &mut out);
        counts("pins", &self.pins, &before.pins, &mut out);
        counts("processes", &self.processes, &before.processes, &mut out);
        out
    }
}

/// Appends a line for each key counted differently in `now` and `then`.
fn counts(
    what: &str,
    now: &BTreeMap<String, usize>,
    then: &BTreeMap<String, usize>,
    out: &mut Vec<String>,
) {
    let keys: BTreeSet<&String> = now.keys().chain(then.keys()).collect();
    for k in keys {
        let (n, t) = (
            now.get(k).copied().unwrap_or(0),
            then.get(k).copied().unwrap_or(0),
        );
        if n != t {
            out.push(format!("{what} {k:?}: {t} -> {n}"));
        }
    }
}

/// Calls `each(relative path, path)` for every entry under `dir`, `depth` levels deep at
/// most, without following symbolic links.
fn walk(root: &Path, dir: &Path, depth: usize, each: &mut dyn FnMut(String, &Path)) {
    if depth == 0 {
        return;
    }
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .display()
            .to_string();
        each(rel, &path);
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &path, depth - 1, each);
        }
    }
}
