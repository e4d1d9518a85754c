//! Where the daemon keeps its files, and the small records that let a restarted daemon pick
//! up where its predecessor stopped.
//!
//! ```text
//! <run_dir>/daemon.lock          flock'd while a daemon runs (one daemon per instance)
//! <run_dir>/daemon.json          interfaces this daemon attached, whether it loaded the program
//! <run_dir>/state/NAME.json      one per service namespace the daemon created: pid, start time
//!                                and spec fingerprint of the process it runs
//! <run_dir>/logs/NAME.log        the service's stdout+stderr (NAME.log.1: the previous MiB)
//! ```
//!
//! The kernel stays the source of truth for the datapath (entries, namespaces, links); these
//! files only record *ownership* and *process identity*, which the kernel cannot tell us: which
//! namespaces this daemon made (so it never deletes one made by hand with `viscum ns add`), and
//! which process it started (a pid alone can be reused; pid plus start time cannot).

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The default bpffs directory (the CLI's `--bpffs` default).
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/viscum";
/// Run directory of the default instance.
pub const DEFAULT_RUN_DIR: &str = "/run/viscum";
/// Control socket of the default instance.
pub const DEFAULT_CONTROL: &str = "/run/viscum.sock";

/// Run directory for the instance pinned at `bpffs`: `/run/viscum` for the default one,
/// `/run/viscum/instances/<bpffs path with '/' as '-'>` for others, so that independent
/// instances (tests, a second edge role) never share state files.
pub fn default_run_dir(bpffs: &Path) -> PathBuf {
    if bpffs == Path::new(DEFAULT_BPFFS) {
        return PathBuf::from(DEFAULT_RUN_DIR);
    }
    Path::new(DEFAULT_RUN_DIR)
        .join("instances")
        .join(escape(bpffs))
}

/// Control socket for the instance pinned at `bpffs`: `/run/viscum.sock` for the default one,
/// `<run_dir>/control.sock` for others. `viscum status` and friends derive the same path from
/// the same `--bpffs`.
pub fn default_control(bpffs: &Path) -> PathBuf {
    if bpffs == Path::new(DEFAULT_BPFFS) {
        return PathBuf::from(DEFAULT_CONTROL);
    }
    default_run_dir(bpffs).join("control.sock")
}

fn escape(path: &Path) -> String {
    let s: String = path
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| match c {
            '/' => '-',
            c if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' => c,
            _ => '_',
        })
        .collect();
    if s.is_empty() { "root".into() } else { s }
}

/// The paths of one daemon instance.
#[derive(Debug, Clone)]
pub struct RunPaths {
    /// The instance's run directory (see [`default_run_dir`]); everything else is under it.
    pub run_dir: PathBuf,
}

impl RunPaths {
    /// Paths under `run_dir`; nothing is created (see [`RunPaths::create`]).
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        RunPaths {
            run_dir: run_dir.into(),
        }
    }

    /// `<run_dir>/daemon.lock`: `flock(2)`ed by the running daemon, holds its pid.
    pub fn lock(&self) -> PathBuf {
        self.run_dir.join("daemon.lock")
    }

    /// `<run_dir>/daemon.json`: the [`DaemonRecord`].
    pub fn daemon_record(&self) -> PathBuf {
        self.run_dir.join("daemon.json")
    }

    /// `<run_dir>/state`: one [`ServiceRecord`] per managed service.
    pub fn state_dir(&self) -> PathBuf {
        self.run_dir.join("state")
    }

    /// `<run_dir>/logs`: one log file per service.
    pub fn logs_dir(&self) -> PathBuf {
        self.run_dir.join("logs")
    }

    /// `<run_dir>/state/<name>.json`: service `name`'s [`ServiceRecord`].
    pub fn service_record(&self, name: &str) -> PathBuf {
        self.state_dir().join(format!("{name}.json"))
    }

    /// `<run_dir>/logs/<name>.log`: service `name`'s stdout and stderr (rotated).
    pub fn log(&self, name: &str) -> PathBuf {
        self.logs_dir().join(format!("{name}.log"))
    }

    /// Creates the directories: state readable by root only, logs by root only too (services
    /// may log secrets; `viscum logs` runs as root).
    pub fn create(&self) -> io::Result<()> {
        for dir in [&self.run_dir, &self.state_dir(), &self.logs_dir()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        Ok(())
    }

    /// Names of the services that have a record.
    pub fn recorded_services(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        let rd = match fs::read_dir(self.state_dir()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(e),
        };
        for entry in rd {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".json") {
                names.push(stem.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }
}

/// What the daemon owns beyond services.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaemonRecord {
    /// Interfaces the daemon attached (not ones attached by hand before it started): a clean
    /// shutdown detaches exactly these.
    pub attached: Vec<String>,
    /// The daemon loaded the classifier (nothing was pinned before): a clean shutdown that
    /// leaves no interface attached and no entry behind also removes the pins.
    pub loaded_program: bool,
}

/// The record of one service the daemon manages.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceRecord {
    /// The service's name (also the name of its namespace).
    pub name: String,
    /// The process group leader the daemon started (the group id is the same number).
    pub pid: Option<i32>,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field 22): with the pid it
    /// names one process for the life of the system.
    pub start_time: Option<u64>,
    /// [`crate::config::ServiceConfig::fingerprint`] of the spec the process was started from.
    pub fingerprint: String,
}

/// Reads a JSON record; a missing file is `None`, an unreadable one is logged and `None`
/// (it would be rewritten anyway).
pub fn read_record<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::warn!("cannot read {}: {e}", path.display());
            return None;
        }
    };
    match serde_json::from_str(&text) {
        Ok(v) => Some(v),
        Err(e) => {
            log::warn!("ignoring unreadable record {}: {e}", path.display());
            None
        }
    }
}

/// Writes a JSON record atomically (temporary file, then rename), so a crash never leaves
/// half a record for the next daemon to misread.
pub fn write_record<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    io::Write::write_all(&mut file, &text)?;
    file.sync_data()?;
    fs::rename(&tmp, path)
}

/// Removes a record; a missing one is fine.
pub fn remove_record(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_paths_derive_from_bpffs() {
        assert_eq!(
            default_run_dir(Path::new(DEFAULT_BPFFS)),
            Path::new("/run/viscum")
        );
        assert_eq!(
            default_control(Path::new(DEFAULT_BPFFS)),
            Path::new("/run/viscum.sock")
        );
        assert_eq!(
            default_run_dir(Path::new("/run/vt-1/bpf")),
            Path::new("/run/viscum/instances/run-vt-1-bpf")
        );
        assert_eq!(
            default_control(Path::new("/run/vt 1/bpf/")),
            Path::new("/run/viscum/instances/run-vt_1-bpf/control.sock")
        );
    }

    #[test]
    fn records_round_trip() {
        let dir = std::env::temp_dir().join(format!("viscum-state-test-{}", std::process::id()));
        let paths = RunPaths::new(&dir);
        paths.create().unwrap();
        let rec = ServiceRecord {
            name: "web".into(),
            pid: Some(42),
            start_time: Some(7),
            fingerprint: "ab".into(),
        };
        write_record(&paths.service_record("web"), &rec).unwrap();
        assert_eq!(
            read_record::<ServiceRecord>(&paths.service_record("web")),
            Some(rec)
        );
        assert_eq!(paths.recorded_services().unwrap(), vec!["web".to_string()]);
        remove_record(&paths.service_record("web")).unwrap();
        remove_record(&paths.service_record("web")).unwrap();
        assert!(paths.recorded_services().unwrap().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
