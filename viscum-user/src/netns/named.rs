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
//!
//! # Private mount namespaces
//!
//! The bind mount lives in a *mount* namespace. `ip netns exec` (and systemd units with
//! `PrivateMounts=`/`PrivateTmp=`) run their command in a private mount namespace whose mounts
//! are slaves of the parent's: a bind mount made there never reaches the parent and vanishes
//! with the command, leaving a dead namespace and an empty `/run/netns/NAME`. So creation and
//! deletion mount and unmount in the nearest ancestor process's mount namespace when it
//! differs from ours ([`persistent_mount_ns`]); the mount then propagates down to us. Where
//! that namespace cannot be entered, creation is refused with directions (`nsenter --net=`)
//! instead of leaving debris.
//!
//! An empty `/run/netns/NAME` without a mount (left by such a session, by older versions, or
//! by a crash half-way) is *stale*: it is not a namespace ([`named_exists`] says so), creation
//! replaces it and deletion removes it.

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

/// `statfs(2)` type of nsfs, where a live namespace file's bind mount points (linux/magic.h).
const NSFS_MAGIC: i64 = 0x6e73_6673;

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
///
/// # Errors
/// [`NetnsError::InvalidName`] for a name that cannot be a file under [`NETNS_RUN_DIR`];
/// [`NetnsError::UnknownNamespace`] if there is no such file; [`NetnsError::Enter`] if it
/// cannot be opened or `setns(2)` refuses it (not a namespace: a stale file);
/// [`NetnsError::Thread`] if the thread cannot be spawned. `f` has not run in any of them.
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
///
/// # Errors
/// [`NetnsError::Enter`] if the file cannot be opened or entered; [`NetnsError::Thread`]
/// if the thread cannot be spawned.
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
/// `unshare(CLONE_NEWNET)`'d. `ip netns exec NAME` works on it. Fails if it exists; a stale
/// file of that name is replaced.
///
/// Run from a private mount namespace (`ip netns exec`), the mount is made in the nearest
/// ancestor's mount namespace so the namespace outlives this process (see the module
/// documentation); if that is impossible, nothing is created and the error says to use
/// `nsenter --net=...` instead.
///
/// # Errors
/// [`NetnsError::InvalidName`]; [`NetnsError::NamespaceExists`] if a live namespace has
/// the name; [`NetnsError::NamespaceOp`] if a mount, the file or the thread fails.
pub fn create_named(name: &str) -> Result<(), NetnsError> {
    check_name(name)?;
    let op_err = |source: io::Error| NetnsError::NamespaceOp {
        action: "create",
        name: name.to_string(),
        source,
    };
    let outer = persistent_mount_ns().map_err(op_err)?;
    let path = named_path(name);
    let target = path.clone();
    let made = thread::Builder::new()
        .name("viscum-netns-new".into())
        .spawn(move || -> Result<(), Created> {
            if let Some(mnt) = &outer {
                enter_mount_ns(mnt).map_err(Created::Failed)?;
            }
            prepare_run_dir().map_err(Created::Failed)?;
            claim(&target)?;
            // The new namespace lives on this thread only; once its nsfs file is
            // bind-mounted the thread can exit and the namespace stays.
            let bound = unshare(CloneFlags::CLONE_NEWNET)
                .and_then(|()| {
                    mount(
                        Some(THREAD_SELF_NET),
                        &target,
                        None::<&str>,
                        MsFlags::MS_BIND,
                        None::<&str>,
                    )
                })
                .map_err(io::Error::from);
            if let Err(e) = bound {
                let _ = fs::remove_file(&target);
                return Err(Created::Failed(e));
            }
            Ok(())
        })
        .map_err(op_err)?
        .join()
        .unwrap_or_else(|_| {
            Err(Created::Failed(io::Error::other(
                "namespace creation thread panicked",
            )))
        });
    match made {
        Ok(()) => {}
        Err(Created::Exists) => {
            return Err(NetnsError::NamespaceExists {
                name: name.to_string(),
            });
        }
        Err(Created::Failed(e)) => return Err(op_err(e)),
    }
    // The mount must be visible here too (every later step enters the namespace through
    // this path); a mount namespace that receives nothing from its parent cannot use it.
    if !is_live(&path) {
        let _ = delete_named(name);
        return Err(op_err(io::Error::other(
            "the namespace is not visible in this process's mount namespace (a private one \
             that receives no mounts from its parent, as under `ip netns exec`): run viscum \
             with `nsenter --net=/run/netns/<ns>` (or `--net=/proc/<pid>/ns/net`) instead, \
             which changes only the network namespace",
        )));
    }
    Ok(())
}

/// Why claiming a namespace file failed.
enum Created {
    /// A live namespace of that name exists.
    Exists,
    Failed(io::Error),
}

/// Claims `path` for a new namespace: O_EXCL makes the existence check and the claim one
/// step, so two creators cannot both succeed. A stale file (no namespace mounted on it) is
/// removed and the claim retried once. Mode 0 like iproute2: the file only ever serves as a
/// mount point. (std insists on write access for O_CREAT; a file just created may be opened
/// anyway.)
fn claim(path: &Path) -> Result<(), Created> {
    let create = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o000)
            .open(path)
    };
    match create() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if is_live(path) {
                return Err(Created::Exists);
            }
            log::info!(
                "removing the stale namespace file {} (no namespace is mounted on it)",
                path.display()
            );
            fs::remove_file(path).map_err(Created::Failed)?;
            match create() {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(Created::Exists),
                Err(e) => Err(Created::Failed(e)),
            }
        }
        Err(e) => Err(Created::Failed(e)),
    }
}

/// Is `path` a live namespace file: an nsfs inode bind-mounted there (as opposed to the
/// empty file a half-done creation leaves)?
fn is_live(path: &Path) -> bool {
    // The field's type differs between targets (i64, i32, u32): the cast is needed elsewhere.
    #[allow(clippy::unnecessary_cast)]
    nix::sys::statfs::statfs(path).is_ok_and(|st| st.filesystem_type().0 as i64 == NSFS_MAGIC)
}

/// The mount namespace named namespaces must be mounted in to outlive this process: `None`
/// when it is our own (the usual case), or the nearest ancestor process's when ours differs
/// (a private one, as `ip netns exec` makes; its mounts would die with us).
///
/// Walks the parent chain through `/proc`. An ancestor whose namespace cannot be read
/// (another user, `hidepid`) ends the walk with `None`: we cannot tell, and keep the old
/// behaviour, which the visibility check after mounting still guards.
///
/// # Errors
/// An ancestor is in another mount namespace but its namespace file cannot be opened.
fn persistent_mount_ns() -> io::Result<Option<File>> {
    let own = mount_ns_id("self")?;
    let mut pid = nix::unistd::getppid().as_raw();
    // A bounded walk: a parent chain is short, and /proc may change under us.
    for _ in 0..64 {
        if pid <= 0 {
            break;
        }
        let Ok(id) = mount_ns_id(&pid.to_string()) else {
            return Ok(None);
        };
        if id != own {
            let path = format!("/proc/{pid}/ns/mnt");
            return File::open(&path).map(Some).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "this process runs in a private mount namespace (as under `ip netns \
                         exec`) where the namespace would die with it, and the parent's ({path}) \
                         cannot be opened ({e}): run viscum with `nsenter --net=/run/netns/<ns>` \
                         instead, which changes only the network namespace"
                    ),
                )
            });
        }
        if pid == 1 {
            break;
        }
        pid = parent_of(pid).unwrap_or(0);
    }
    Ok(None)
}

/// `mnt:[4026531841]` of `/proc/<who>/ns/mnt`.
fn mount_ns_id(who: &str) -> io::Result<std::ffi::OsString> {
    fs::read_link(format!("/proc/{who}/ns/mnt")).map(std::path::PathBuf::into_os_string)
}

/// The parent pid of `pid`, from `/proc/<pid>/stat` (the field after the parenthesised
/// command name, which may itself hold spaces and parentheses).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Moves the calling thread into the mount namespace `mnt`. The thread must first stop
/// sharing its filesystem attributes (root, cwd) with the rest of the process, or the kernel
/// refuses (EINVAL); the thread is thrown away afterwards.
fn enter_mount_ns(mnt: &File) -> io::Result<()> {
    unshare(CloneFlags::CLONE_FS)?;
    setns(mnt, CloneFlags::CLONE_NEWNS).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!(
                "cannot enter the parent's mount namespace ({e}) to make the namespace outlive \
                 this command (run under `ip netns exec`?): run viscum with \
                 `nsenter --net=/run/netns/<ns>` instead, which changes only the network \
                 namespace"
            ),
        )
    })
}

/// Makes [`NETNS_RUN_DIR`] exist and be a shared mount, the same dance as iproute2's
/// `netns_add`: try to make it shared; if it is not a mount point yet (EINVAL), bind-mount it
/// onto itself first and try again.
fn prepare_run_dir() -> io::Result<()> {
    let _guard = RUN_DIR_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
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
/// a pinned BPF link) holds it. A stale file (nothing mounted on it) is just removed.
///
/// From a private mount namespace the mount is also removed in the ancestor's (see
/// [`create_named`]), where the namespace was made to outlive its creator.
///
/// # Errors
/// [`NetnsError::InvalidName`]; [`NetnsError::UnknownNamespace`] if there is no such
/// file; [`NetnsError::NamespaceOp`] if unmounting or removing it fails.
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
    // Here first: a mount in this namespace would make the file busy for the unlink.
    unmount(&path).map_err(op_err)?;
    let outer = persistent_mount_ns().unwrap_or(None);
    let target = path.clone();
    thread::Builder::new()
        .name("viscum-netns-del".into())
        .spawn(move || -> io::Result<()> {
            if let Some(mnt) = &outer {
                enter_mount_ns(mnt)?;
                unmount(&target)?;
            }
            match fs::remove_file(&target) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        })
        .map_err(op_err)?
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace deletion thread panicked")))
        .map_err(op_err)
}

/// Lazily unmounts whatever is mounted on `path`. EINVAL means nothing is: a stale file, a
/// leftover of a creation that failed half-way; removing it is all that is left to do.
fn unmount(path: &Path) -> io::Result<()> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

/// Whether a live namespace `/run/netns/NAME` exists: the file with a namespace mounted on
/// it. A stale file without one does not count (see the module documentation).
pub fn named_exists(name: &str) -> bool {
    check_name(name).is_ok() && is_live(&named_path(name))
}

/// The names under [`NETNS_RUN_DIR`], sorted. No directory means no namespaces.
///
/// # Errors
/// [`NetnsError::NamespaceOp`] if [`NETNS_RUN_DIR`] exists but cannot be read.
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

/// The processes whose network namespace is the named namespace `name` (by the inode of
/// `/proc/PID/ns/net`), sorted. Processes that vanish or cannot be read while the list is
/// made are skipped; an unknown namespace has none.
pub fn pids_in(name: &str) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(target) = std::fs::metadata(Path::new(NETNS_RUN_DIR).join(name)) else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev())
        })
        .collect();
    pids.sort_unstable();
    pids
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
    fn parent_pid_is_read_from_proc() {
        let me = std::process::id() as i32;
        assert_eq!(parent_of(me), Some(nix::unistd::getppid().as_raw()));
        assert!(mount_ns_id("self").is_ok());
    }

    #[test]
    fn a_plain_file_is_not_a_live_namespace() {
        let file = std::env::temp_dir().join(format!("viscum-stale-{}", std::process::id()));
        fs::write(&file, b"").unwrap();
        assert!(!is_live(&file));
        fs::remove_file(&file).unwrap();
        assert!(is_live(Path::new(THREAD_SELF_NET)));
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
