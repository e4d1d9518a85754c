//! One writer per instance: the write lock every change of an instance goes through.
//!
//! The lock is an exclusive `flock(2)` on the instance's pin directory (the `--bpffs`
//! directory itself: bpffs holds no regular files, but a directory can be opened and locked).
//! Every mutation takes it for its whole read-modify-write: adding, deleting, draining and
//! re-pointing entries (with the rule id choice, the miss pre-filter's maintenance, the
//! namespace's local routes and the reply path), attach, detach and purge, `ns add/del`, and
//! each daemon reload. Reads (`redirect list`, `status`) take nothing: every map update is
//! atomic on its own, so a reader sees each entry either before or after a change. The one
//! read that takes it is the global counters'
//! ([`Engine::global_stats`](super::Engine::global_stats)): `redirected` and the flow counts
//! are summed from the live entries' counters, and a slot reset by a change moves its counts
//! to the global slots, which a reader must see in one place, not both.
//!
//! The daemon does not hold it while idle; it takes it per change like any CLI command, so the
//! CLI keeps working next to a running daemon (why: see "One writer per instance" in
//! `docs/architecture.md`).
//!
//! Within one process the lock is re-entrant: the first [`lock`] of a directory takes the
//! `flock`, later ones (from the same or another thread or task) share it until the last
//! guard drops. So a caller can hold it around several steps that each take it again, and a
//! daemon's tasks never wait for each other here (they are serialised by the daemon's own
//! engine mutex). Between processes it is exclusive. The kernel releases it however a process
//! ends, so a crashed writer never blocks the next one.

use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use nix::errno::Errno;

use super::{EngineError, Pins};

/// How long a writer waits for another process's change to finish before giving up with
/// [`EngineError::Busy`]. Changes take milliseconds; a daemon reload that creates many
/// namespaces, seconds.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// Between two attempts while another process holds the lock.
const POLL: Duration = Duration::from_millis(2);

/// The `flock` this process holds on one pin directory.
struct Held {
    _flock: DirFlock,
}

/// The instance's write lock, held until the last clone in this process drops.
#[derive(Clone)]
pub struct WriteLock {
    _held: Arc<Held>,
}

impl std::fmt::Debug for WriteLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteLock")
    }
}

/// The locks this process holds, by pin directory as given (callers use one spelling per
/// instance: the `--bpffs` option or the config's `engine.bpffs`).
static HELD: Mutex<Vec<(PathBuf, Weak<Held>)>> = Mutex::new(Vec::new());

/// Takes the write lock of the instance in `pins.dir`, waiting up to [`LOCK_TIMEOUT`] for
/// another process to finish its change.
///
/// # Errors
/// [`EngineError::NotAttached`] if the directory does not exist (nothing to change; `attach`
/// uses [`lock_creating`]); [`EngineError::Busy`] after [`LOCK_TIMEOUT`];
/// [`EngineError::Io`] if the directory cannot be opened or locked.
pub fn lock(pins: &Pins) -> Result<WriteLock, EngineError> {
    let mut held = HELD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    held.retain(|(_, w)| w.strong_count() > 0);
    if let Some(h) = held
        .iter()
        .find(|(p, _)| *p == pins.dir)
        .and_then(|(_, w)| w.upgrade())
    {
        return Ok(WriteLock { _held: h });
    }
    // Still holding `HELD`: another thread of this process that wants the same lock waits
    // here rather than taking a second `flock` on its own descriptor (which would conflict
    // with ours).
    let h = Arc::new(Held {
        _flock: flock_dir(&pins.dir, LOCK_TIMEOUT)?,
    });
    held.push((pins.dir.clone(), Arc::downgrade(&h)));
    Ok(WriteLock { _held: h })
}

/// [`lock`] for `attach`: creates the pin directory first (mounting a bpffs if needed, see
/// [`crate::bpffs::ensure`]).
///
/// # Errors
/// [`EngineError::Bpffs`] for the directory; then as [`lock`].
pub fn lock_creating(pins: &Pins) -> Result<WriteLock, EngineError> {
    crate::bpffs::ensure(&pins.dir)?;
    lock(pins)
}

/// [`lock`], or `None` when the instance does not exist (a namespace command on a box where
/// nothing is attached: there are no entries to keep consistent).
///
/// # Errors
/// As [`lock`], except for a missing directory.
pub fn lock_if_attached(pins: &Pins) -> Result<Option<WriteLock>, EngineError> {
    match lock(pins) {
        Ok(l) => Ok(Some(l)),
        Err(EngineError::NotAttached(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The directories this process keeps open for locking, with the identity (device, inode)
/// each had when opened. While an [`Engine`](super::Engine) of the instance lives (a daemon,
/// a CLI command) it holds the description ([`DirHandle`]), so a lock costs a `flock`, a
/// `stat` and an unlock, rather than also an `open`, an `fstat` and a `close`: a library
/// update, `Engine::insert`, is a few bpf(2) calls, and the lock was most of its time (B7 in
/// `docs/benchmarks.md`). Weak: once no engine holds it the directory is closed, so a bpffs
/// holding it can be unmounted. A directory removed and made again (a `detach --purge`, then
/// an `attach`) has a new inode: the stale description is replaced.
static OPENED: Mutex<Vec<Opened>> = Mutex::new(Vec::new());

/// One of [`OPENED`]'s directories: its path, its description, its (device, inode) then.
type Opened = (PathBuf, Weak<File>, (u64, u64));

/// An instance's pin directory, kept open for the write locks taken while this value lives:
/// each then costs a `flock`, a `stat` and an unlock instead of also an `open`, an `fstat`
/// and a `close`.
#[derive(Debug, Clone)]
pub struct DirHandle(#[allow(dead_code, reason = "held for its descriptor")] Arc<File>);

/// Opens `pins.dir` for the write locks of the caller's lifetime (an engine's); `None` if it
/// cannot be opened now (each lock then opens it itself, and reports why).
pub fn keep_open(pins: &Pins) -> Option<DirHandle> {
    opened(&pins.dir, None).ok().map(|(f, _)| DirHandle(f))
}

/// The flock this process holds through one of [`OPENED`]'s descriptions; unlocked on drop
/// (the description stays open for the next lock).
#[derive(Debug)]
struct DirFlock(Arc<File>);

impl Drop for DirFlock {
    fn drop(&mut self) {
        // SAFETY: flock(2) on a descriptor this value keeps open.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// `dir`'s cached open file description with the (device, inode) it had when opened; opened
/// (and cached) if there is none or the cached one is not `now` (the path's current device
/// and inode, once a lock found them differ).
fn opened(dir: &Path, now: Option<(u64, u64)>) -> Result<(Arc<File>, (u64, u64)), EngineError> {
    let mut cache = OPENED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, f, cached)) = cache.iter().find(|(p, _, _)| p == dir)
        && now.is_none_or(|now| now == *cached)
        && let Some(f) = f.upgrade()
    {
        return Ok((f, *cached));
    }
    let file = match File::open(dir) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(EngineError::NotAttached(dir.to_owned()));
        }
        Err(e) => return Err(EngineError::io(format!("cannot open {}", dir.display()), e)),
    };
    let meta = file
        .metadata()
        .map_err(|e| EngineError::io(format!("cannot stat {}", dir.display()), e))?;
    let file = Arc::new(file);
    let id = (meta.dev(), meta.ino());
    cache.retain(|(p, f, _)| p != dir && f.strong_count() > 0);
    cache.push((dir.to_owned(), Arc::downgrade(&file), id));
    Ok((file, id))
}

/// The device and inode `dir` names now; `NotAttached` if it does not exist.
fn identity(dir: &Path) -> Result<Option<(u64, u64)>, EngineError> {
    match std::fs::metadata(dir) {
        Ok(m) => Ok(Some((m.dev(), m.ino()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(EngineError::NotAttached(dir.to_owned()))
        }
        Err(_) => Ok(None),
    }
}

/// Locks `dir`, polling while another process holds it, for at most `timeout`
/// ([`EngineError::Busy`] then). After locking, the path must still name the locked
/// directory: a `detach --purge` that held the lock may have removed it (then a new attach
/// made another), and a lock on a deleted directory protects nothing.
fn flock_dir(dir: &Path, timeout: Duration) -> Result<DirFlock, EngineError> {
    let deadline = Instant::now() + timeout;
    let mut id = None;
    loop {
        let (file, opened_as) = opened(dir, id)?;
        // SAFETY: flock(2) on a descriptor `file` keeps open.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            let locked = DirFlock(file);
            id = identity(dir)?;
            if id == Some(opened_as) {
                return Ok(locked);
            }
            if id.is_none() {
                // The path cannot be checked (a stat error other than "gone"): open it afresh.
                OPENED
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .retain(|(p, _, _)| p != dir);
            }
            // Not the directory the path names now: unlocked on drop, and the next round
            // opens the path afresh.
        } else {
            match Errno::last() {
                Errno::EWOULDBLOCK | Errno::EINTR => {}
                e => {
                    return Err(EngineError::io(
                        format!("cannot lock {}", dir.display()),
                        e.into(),
                    ));
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(EngineError::Busy {
                dir: dir.to_owned(),
                waited: timeout,
            });
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use nix::fcntl::{Flock, FlockArg};

    use super::*;

    /// A directory of its own under the temp dir for one test (`tag` names the test), removed
    /// on drop, a failing test's included.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("viscum-lock-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    #[test]
    fn reentrant_within_a_process_and_released_with_the_last_guard() {
        let scratch = Scratch::new("reentrant");
        let dir = scratch.0.clone();
        let pins = Pins::new(&dir);
        let a = lock(&pins).unwrap();
        // A second lock of the same directory in this process shares the first.
        let b = lock(&pins).unwrap();
        // Another open file description conflicts while either guard lives.
        let other = || Flock::lock(File::open(&dir).unwrap(), FlockArg::LockExclusiveNonblock);
        drop(a);
        assert!(other().is_err(), "the lock went with the first guard");
        drop(b);
        assert!(other().is_ok(), "the lock outlived its last guard");
    }

    /// The bound, with a real `flock` held by another open file description (what another
    /// process's writer holds): the waiter gives up with `Busy` after its timeout, naming the
    /// directory, and gets the lock once the holder lets go.
    #[test]
    fn a_writer_gives_up_after_its_timeout_and_gets_the_lock_once_released() {
        let scratch = Scratch::new("timeout");
        let dir = scratch.0.clone();
        let holder =
            Flock::lock(File::open(&dir).unwrap(), FlockArg::LockExclusiveNonblock).unwrap();
        let bound = Duration::from_millis(200);
        let started = Instant::now();
        let err = flock_dir(&dir, bound).expect_err("a held lock was taken");
        let waited = started.elapsed();
        assert!(
            matches!(&err, EngineError::Busy { dir: d, waited: w } if *d == dir && *w == bound),
            "{err:?}"
        );
        assert!(
            waited >= bound,
            "gave up after {waited:?}, before its bound"
        );
        assert!(
            err.to_string().contains(&dir.display().to_string()),
            "{err}"
        );
        drop(holder);
        assert!(
            flock_dir(&dir, bound).is_ok(),
            "the released lock was not taken"
        );
    }

    /// A directory removed and made again (`detach --purge`, then `attach`) while this process
    /// kept the old one open for locking: the lock is taken on the directory the path names
    /// now, not on the stale description.
    #[test]
    fn a_directory_made_again_is_locked_afresh() {
        let scratch = Scratch::new("again");
        let dir = scratch.0.clone();
        let pins = Pins::new(&dir);
        // An engine's handle keeps the old directory open (and cached) throughout.
        let handle = keep_open(&pins).unwrap();
        drop(lock(&pins).unwrap());
        std::fs::remove_dir(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        let held = lock(&pins).unwrap();
        let other = || Flock::lock(File::open(&dir).unwrap(), FlockArg::LockExclusiveNonblock);
        assert!(other().is_err(), "the lock is not on the new directory");
        drop(held);
        assert!(other().is_ok(), "the lock outlived its guard");
        drop(handle);
    }

    /// Without an engine's handle nothing stays open: a bpffs whose directory was locked can
    /// be unmounted (plainly, not lazily) once the lock is released.
    #[test]
    fn nothing_stays_open_without_a_handle() {
        let scratch = Scratch::new("closed");
        let dir = scratch.0.clone();
        let pins = Pins::new(&dir);
        let handle = keep_open(&pins).unwrap();
        drop(lock(&pins).unwrap());
        let open = |d: &Path| {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .flatten()
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == d))
                .count()
        };
        assert_eq!(open(&dir), 1, "the handle's descriptor");
        drop(handle);
        drop(lock(&pins).unwrap());
        assert_eq!(
            open(&dir),
            0,
            "a descriptor outlived the handle and the lock"
        );
    }

    #[test]
    fn a_missing_directory_is_not_attached() {
        let pins = Pins::new("/nonexistent/viscum-lock-test");
        assert!(matches!(lock(&pins), Err(EngineError::NotAttached(_))));
        assert!(lock_if_attached(&pins).unwrap().is_none());
    }
}
