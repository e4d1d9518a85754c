//! Named network namespaces, kept the way iproute2 keeps them.
//!
//! A named namespace is a file `/run/netns/NAME` onto which the namespace's nsfs inode is
//! bind-mounted; the mount keeps the namespace alive with no process in it. `/run/netns`
//! itself is made a shared mount so that `ip netns exec` (which runs in a private mount
//! namespace) and other mount namespaces see the same names.
//!
//! Code enters a namespace on a fresh OS thread ([`in_netns`]): `setns(CLONE_NEWNET)` changes
//! only the calling thread, so the rest of the process (tokio workers included) stays where it
//! was, and the thread is discarded afterwards instead of being switched back.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Mutex,
    thread,
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
};

use super::NetnsError;

/// Where named network namespaces live (the iproute2 convention).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The calling thread's own namespace file. `/proc/self` would name the thread-group leader,
/// which is not the thread that just called `unshare`.
const THREAD_SELF_NET: &str = "/proc/thread-self/ns/net";

/// Serialises the one-time preparation of [`NETNS_RUN_DIR`] within this process, so two
/// threads creating namespaces at once do not stack two bind mounts on it.
static RUN_DIR_LOCK: Mutex<()> = Mutex::new(());

/// The file of a named namespace.
fn named_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// The file of a named namespace, after checking that the name is one.
pub(super) fn checked_path(name: &str) -> Result<PathBuf, NetnsError> {
    check_name(name)?;
    Ok(named_path(name))
}

/// Rejects names that are not a single file name under [`NETNS_RUN_DIR`].
fn check_name(name: &str) -> Result<(), NetnsError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > 255 {
        "it is longer than 255 bytes"
    } else if name.contains('/') || name.contains('\0') {
        "it contains '/' or NUL"
    } else if name == "." || name == ".." {
        "it is '.' or '..'"
    } else {
        return Ok(());
    };
    Err(NetnsError::InvalidName {
        name: name.to_string(),
        reason,
    })
}

/// Runs `f` on a fresh OS thread that has entered the named network namespace (setns
/// CLONE_NEWNET on /run/netns/NAME) and returns its result. Sockets created inside stay bound
/// to that namespace.
///
/// Only the network namespace changes: the thread keeps the process's mount namespace, so
/// files (bpffs pins included) look the same as outside. `/proc/sys/net` however resolves to
/// the thread's network namespace, which is what [`super::sysctl_set`] relies on.
///
/// A panic in `f` is propagated to the caller.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    check_name(name)?;
    let path = named_path(name);
    let file = File::open(&path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => NetnsError::UnknownNamespace {
            name: name.to_string(),
        },
        _ => NetnsError::Enter {
            path: path.clone(),
            source,
        },
    })?;
    run_in(file, path, f)
}

/// Same as [`in_netns`], by path (e.g. `/proc/PID/ns/net`).
pub fn in_netns_path<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Enter {
        path: path.to_path_buf(),
        source,
    })?;
    run_in(file, path.to_path_buf(), f)
}

/// Spawns the thread, enters the namespace behind `file` and runs `f` there.
fn run_in<T: Send + 'static>(
    file: File,
    path: PathBuf,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let thread_path = path.clone();
    let joined = thread::Builder::new()
        .name("viscum-netns".into())
        .spawn(move || {
            // EINVAL here means the file is not a network namespace (for instance a stale
            // /run/netns entry whose mount is gone).
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| NetnsError::Enter {
                path: thread_path,
                source: errno.into(),
            })?;
            drop(file);
            Ok(f())
        })
        .map_err(|source| NetnsError::Thread { path, source })?
        .join();
    match joined {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Creates the named network namespace `name`, like `ip netns add NAME`: `/run/netns` is made
/// a shared mount, and the namespace file is bind-mounted from a thread that
/// `unshare(CLONE_NEWNET)`'d. `ip netns exec NAME` works on it. Fails if it exists.
pub fn create_named(name: &str) -> Result<(), NetnsError> {
    check_name(name)?;
    let op_err = |source: io::Error| NetnsError::NamespaceOp {
        action: "create",
        name: name.to_string(),
        source,
    };
    prepare_run_dir().map_err(op_err)?;

    let path = named_path(name);
    // O_EXCL makes the existence check and the claim on the name one step, so two creators
    // cannot both succeed. Mode 0 like iproute2: the file only ever serves as a mount point.
    // (std insists on write access for O_CREAT; a file just created may be opened anyway.)
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => NetnsError::NamespaceExists {
                name: name.to_string(),
            },
            _ => op_err(source),
        })?;

    let target = path.clone();
    let bound = thread::Builder::new()
        .name("viscum-netns-new".into())
        .spawn(move || -> io::Result<()> {
            // The new namespace lives on this thread only; once its nsfs file is bind-mounted
            // the thread can exit and the namespace stays.
            unshare(CloneFlags::CLONE_NEWNET)?;
            mount(
                Some(THREAD_SELF_NET),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        })
        .map_err(|source| {
            let _ = fs::remove_file(&path);
            op_err(source)
        })?
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace creation thread panicked")));
    if let Err(source) = bound {
        let _ = fs::remove_file(&path);
        return Err(op_err(source));
    }
    Ok(())
}

/// Makes [`NETNS_RUN_DIR`] exist and be a shared mount, the same dance as iproute2's
/// `netns_add`: try to make it shared; if it is not a mount point yet (EINVAL), bind-mount it
/// onto itself first and try again.
fn prepare_run_dir() -> io::Result<()> {
    let _guard = RUN_DIR_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match fs::create_dir(NETNS_RUN_DIR) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let make_shared = || {
        mount(
            Some(""),
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match make_shared() {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            mount(
                Some(NETNS_RUN_DIR),
                NETNS_RUN_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            make_shared()?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Deletes the named namespace, like `ip netns del NAME`: lazily unmounts the namespace file
/// and removes it. The namespace itself goes away once nothing else (a process, an open file,
/// a pinned BPF link) holds it.
pub fn delete_named(name: &str) -> Result<(), NetnsError> {
    check_name(name)?;
    let path = named_path(name);
    if fs::symlink_metadata(&path).is_err() {
        return Err(NetnsError::UnknownNamespace {
            name: name.to_string(),
        });
    }
    let op_err = |source: io::Error| NetnsError::NamespaceOp {
        action: "delete",
        name: name.to_string(),
        source,
    };
    match umount2(&path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point, a leftover of a creation that failed half-way; removing
        // the file is all that is left to do.
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(errno) => return Err(op_err(errno.into())),
    }
    fs::remove_file(&path).map_err(op_err)
}

/// Whether `/run/netns/NAME` exists.
pub fn named_exists(name: &str) -> bool {
    check_name(name).is_ok() && fs::symlink_metadata(named_path(name)).is_ok()
}

/// The names under [`NETNS_RUN_DIR`], sorted. No directory means no namespaces.
pub fn list_named() -> Result<Vec<String>, NetnsError> {
    let entries = match fs::read_dir(NETNS_RUN_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(NetnsError::NamespaceOp {
                action: "list",
                name: NETNS_RUN_DIR.to_string(),
                source,
            });
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_single_file_names() {
        assert!(check_name("edge1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("..").is_err());
        assert!(check_name(&"x".repeat(256)).is_err());
    }

    #[test]
    fn missing_namespace_is_reported_by_name() {
        let err = in_netns("viscum-surely-missing-ns", || ()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "namespace viscum-surely-missing-ns does not exist"
        );
        assert!(!named_exists("viscum-surely-missing-ns"));
    }
}
