//! The bpffs directory that holds Viscum's pins.
//!
//! Pins are what let the datapath outlive the process that attached it and
//! let every later `viscum` command find the maps. A fresh box often has no
//! bpffs mounted at all, so we mount one where needed.
//!
//! `ip netns exec` runs commands in a private mount namespace with a fresh
//! `/sys`, where `/sys/fs/bpf` is an empty directory (see
//! docs/toolchain.md). A directory outside `/sys` (e.g. under `/run`)
//! on which we mount bpffs ourselves stays shared with every process of the
//! root mount namespace, which is why both locations are supported.

use std::{
    io,
    path::{Path, PathBuf},
};

use nix::mount::{MsFlags, mount};

/// Magic number of bpffs in `statfs(2)` (linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// The conventional system-wide bpffs mount point.
const SYS_FS_BPF: &str = "/sys/fs/bpf";

/// Why [`is_bpffs`] or [`ensure`] failed; nothing was mounted when it is
/// returned, though directories created before the failure stay.
#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    /// `statfs(2)` on the path failed (missing path, no permission).
    #[error("cannot inspect {path}")]
    Stat {
        /// The path that was inspected.
        path: PathBuf,
        /// The errno from `statfs(2)`.
        #[source]
        source: nix::Error,
    },
    /// Creating the directory (or one of its parents) failed.
    #[error("cannot create directory {path}")]
    Mkdir {
        /// The directory being created.
        path: PathBuf,
        /// The error from `create_dir_all`.
        #[source]
        source: io::Error,
    },
    /// `mount(2)` of a bpffs instance failed, typically `EPERM` without
    /// `CAP_SYS_ADMIN` in the current user namespace.
    #[error("cannot mount bpffs on {path} (is this root, with CAP_SYS_ADMIN?)")]
    Mount {
        /// The intended mount point.
        path: PathBuf,
        /// The errno from `mount(2)`.
        #[source]
        source: nix::Error,
    },
    /// The directory given to [`ensure`] is relative; pins need a fixed,
    /// absolute location every later command can find.
    #[error("bpffs directory {0} must be an absolute path")]
    Relative(PathBuf),
    /// The mount point exists, is not on a bpffs and holds files: mounting a bpffs there
    /// would hide them (`--bpffs /etc` would hide the system's configuration).
    #[error(
        "{0} is not on a bpffs and is not empty: viscum mounts a bpffs only on a new or empty \
         directory, so as not to hide what is there (give another --bpffs or engine.bpffs)"
    )]
    NotEmpty(PathBuf),
}

/// Is `path` on a bpffs?
///
/// # Errors
/// [`BpffsError::Stat`] if `statfs(2)` fails (the path does not exist, say).
pub fn is_bpffs(path: &Path) -> Result<bool, BpffsError> {
    let st = nix::sys::statfs::statfs(path).map_err(|source| BpffsError::Stat {
        path: path.to_owned(),
        source,
    })?;
    Ok(st.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Makes sure `dir` exists on a bpffs, mounting one if needed, without
/// touching anything when it already does.
///
/// * nearest existing ancestor on bpffs: create the missing directories in it;
/// * `/sys/fs/bpf/...` with no bpffs mounted yet: mount it at `/sys/fs/bpf`,
///   as systemd would have;
/// * anywhere else: create `dir` and mount a bpffs instance on it.
///
/// # Errors
/// [`BpffsError::Relative`] for a relative `dir` (checked first: nothing changes);
/// [`BpffsError::NotEmpty`] for a mount point that holds files (nothing changes);
/// [`BpffsError::Stat`], [`BpffsError::Mkdir`] or [`BpffsError::Mount`] when a step
/// fails (directories made before it stay).
pub fn ensure(dir: &Path) -> Result<(), BpffsError> {
    if !dir.is_absolute() {
        return Err(BpffsError::Relative(dir.to_owned()));
    }
    let ancestor = dir
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(ancestor)? {
        return mkdir_all(dir);
    }
    let sys = Path::new(SYS_FS_BPF);
    let mount_point = if dir.starts_with(sys) && sys.is_dir() {
        sys.to_path_buf()
    } else {
        dir.to_path_buf()
    };
    let occupied = std::fs::read_dir(&mount_point).is_ok_and(|mut d| d.next().is_some());
    if occupied && !is_bpffs(&mount_point)? {
        return Err(BpffsError::NotEmpty(mount_point));
    }
    mkdir_all(&mount_point)?;
    if !is_bpffs(&mount_point)? {
        // Root-only, as systemd mounts it: bpffs defaults to mode 1777, where any user could
        // make the instance directory first and own what gets pinned into it.
        mount(
            Some("bpf"),
            &mount_point,
            Some("bpf"),
            MsFlags::empty(),
            Some("mode=0700"),
        )
        .map_err(|source| BpffsError::Mount {
            path: mount_point.clone(),
            source,
        })?;
        log::info!("mounted bpffs on {}", mount_point.display());
    }
    mkdir_all(dir)
}

/// Creates the missing directories, root-only (0700): pins are root's business.
fn mkdir_all(dir: &Path) -> Result<(), BpffsError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| BpffsError::Mkdir {
            path: dir.to_owned(),
            source,
        })
}
