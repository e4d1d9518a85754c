//! One writer per instance: the write lock every change of an instance goes through.
//!
//! The lock is an exclusive `flock(2)` on the instance's pin directory (the `--bpffs`
//! directory itself: bpffs holds no regular files, but a directory can be opened and locked).
//! Every mutation takes it for its whole read-modify-write: adding, deleting, draining and
//! re-pointing entries (with the rule id choice, the miss pre-filter's maintenance, the
//! namespace's local routes and the reply path), attach, detach and purge, `ns add/del`, and
//! each daemon reload. Reads (`redirect list`, `stats`, `status`) take nothing: every map
//! update is atomic on its own, so a reader sees each entry either before or after a change.
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
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use super::{EngineError, Pins};

/// How long a writer waits for another process's change to finish before giving up with
/// [`EngineError::Busy`]. Changes take milliseconds; a daemon reload that creates many
/// namespaces, seconds.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// Between two attempts while another process holds the lock.
const POLL: Duration = Duration::from_millis(2);

/// The `flock` this process holds on one pin directory.
struct Held {
    _flock: Flock<File>,
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

/// Opens and locks `dir`, polling while another process holds it, for at most `timeout`
/// ([`EngineError::Busy`] then). After locking, the path
/// must still name the locked directory: a `detach --purge` that held the lock may have
/// removed it (then a new attach made another), and a lock on a deleted directory protects
/// nothing.
fn flock_dir(dir: &Path, timeout: Duration) -> Result<Flock<File>, EngineError> {
    let deadline = Instant::now() + timeout;
    loop {
        let file = match File::open(dir) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EngineError::NotAttached(dir.to_owned()));
            }
            Err(e) => return Err(EngineError::io(format!("cannot open {}", dir.display()), e)),
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(flock) => {
                let same = match (flock.metadata(), std::fs::metadata(dir)) {
                    (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                    (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(EngineError::NotAttached(dir.to_owned()));
                    }
                    _ => false,
                };
                if same {
                    return Ok(flock);
                }
            }
            Err((_, Errno::EWOULDBLOCK | Errno::EINTR)) => {}
            Err((_, e)) => {
                return Err(EngineError::io(
                    format!("cannot lock {}", dir.display()),
                    e.into(),
                ));
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
    use super::*;

    #[test]
    fn reentrant_within_a_process_and_released_with_the_last_guard() {
        let dir = std::env::temp_dir().join(format!("viscum-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
        let _ = std::fs::remove_dir(&dir);
    }

    /// The bound, with a real `flock` held by another open file description (what another
    /// process's writer holds): the waiter gives up with `Busy` after its timeout, naming the
    /// directory, and gets the lock once the holder lets go.
    #[test]
    fn a_writer_gives_up_after_its_timeout_and_gets_the_lock_once_released() {
        let dir = std::env::temp_dir().join(format!("viscum-lock-timeout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn a_missing_directory_is_not_attached() {
        let pins = Pins::new("/nonexistent/viscum-lock-test");
        assert!(matches!(lock(&pins), Err(EngineError::NotAttached(_))));
        assert!(lock_if_attached(&pins).unwrap().is_none());
    }
}
