//! Resources a test, the lab or a benchmark creates and must not leave behind, and small
//! helpers around them.

use std::{
    fs,
    future::Future,
    io,
    path::{Path, PathBuf},
    process::Child,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::signal::{self, Signal},
    unistd::Pid,
};
use viscum::netns::{self, NetnsError};

/// Where [`Bpffs`] mounts its instances: outside `/sys`, so they are the same in every
/// mount namespace that shares the root one (`docs/toolchain.md`).
pub const BPFFS_TEST_ROOT: &str = "/run/viscum-test";

/// Prints "skipping: needs root" and returns true when not running as root.
pub fn skip_unless_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    crate::shout!("skipping: needs root");
    true
}

/// A short name no other test or test process uses: `<prefix><pid in base 36>x<counter>`,
/// e.g. `vt2hwcgx3`. With a two-letter prefix it stays within viscum's 12-character
/// service namespace names for the first 10,000 names of a process.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", base36(std::process::id()))
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii digits")
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held. The poll
/// interval is short (10 ms) so a test waits only as long as the condition takes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a future to completion on a fresh current-thread tokio runtime (IO and timers on).
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime")
        .block_on(future)
}

/// A named network namespace, deleted on drop together with every process still inside it.
///
/// A namespace is only gone once nothing holds it: deleting the name of one in which a
/// server still runs would leave the namespace (and its veths and addresses) alive, unnamed.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named by [`unique_name`] with prefix `vt`. Panics on failure.
    pub fn new() -> Netns {
        Netns::named(&unique_name("vt"))
    }

    /// Creates a namespace with the given name (which should be unique). Panics on failure.
    pub fn named(name: &str) -> Netns {
        Netns::create(name).unwrap_or_else(|e| panic!("create namespace {name}: {e:?}"))
    }

    /// Creates `/run/netns/NAME`; the error says why it could not (an existing name
    /// included).
    pub fn create(name: &str) -> Result<Netns, NetnsError> {
        netns::create_named(name)?;
        Ok(Netns {
            name: name.to_string(),
        })
    }

    /// Takes charge of a namespace something else created (`viscum ns add`), so it is
    /// deleted with this guard. Nothing is checked: a name that does not exist is fine.
    pub fn adopt(name: &str) -> Netns {
        Netns {
            name: name.to_string(),
        }
    }

    /// The namespace's name (`/run/netns/NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a thread inside the namespace and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        netns::in_netns(&self.name, f)
            .unwrap_or_else(|e| panic!("enter namespace {}: {e:?}", self.name))
    }

    /// Runs the future that `f` makes on a thread inside the namespace, on a current-thread
    /// runtime there; so `viscum::netns::handle_here()` (and every `service_ns_*` function)
    /// works on this namespace, as it would in a `viscum` process running in it.
    pub fn block_on<T, F>(&self, f: impl FnOnce() -> F + Send + 'static) -> T
    where
        T: Send + 'static,
        F: Future<Output = T>,
    {
        self.run(move || block_on(f()))
    }

    /// Reads a sysctl as seen from the namespace, e.g. `net/ipv4/ip_forward`.
    pub fn sysctl(&self, key: &str) -> String {
        netns::sysctl_get(Some(&self.name), key)
            .unwrap_or_else(|e| panic!("read sysctl {key} in {}: {e:?}", self.name))
    }

    /// Writes a sysctl as seen from the namespace.
    pub fn set_sysctl(&self, key: &str, value: &str) {
        netns::sysctl_set(Some(&self.name), key, value)
            .unwrap_or_else(|e| panic!("write sysctl {key}={value} in {}: {e:?}", self.name));
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_quietly(&self.name);
    }
}

/// Kills every process still in namespace `name` and deletes it, tolerating its absence;
/// other failures are printed (a Drop must not panic while a failed test is already
/// unwinding).
pub fn delete_quietly(name: &str) {
    kill_processes_in(name, Duration::from_secs(3));
    match netns::delete_named(name) {
        Ok(()) | Err(NetnsError::UnknownNamespace { .. }) => {}
        Err(e) => crate::shout!("warning: cannot delete namespace {name}: {e}"),
    }
}

/// The processes whose network namespace is the named namespace `name` (what `ip netns pids`
/// lists), this process excluded. Empty when the name does not exist.
pub fn processes_in(name: &str) -> Vec<Pid> {
    let me = i32::try_from(std::process::id()).unwrap_or(-1);
    netns::pids_in(name)
        .into_iter()
        .filter(|&pid| pid != me)
        .map(Pid::from_raw)
        .collect()
}

/// Ends every process in namespace `name`: SIGTERM, up to `grace` to exit, then SIGKILL.
/// Returns the command lines of the processes it found (for a report).
pub fn kill_processes_in(name: &str, grace: Duration) -> Vec<String> {
    let pids = processes_in(name);
    let found = pids
        .iter()
        .map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            format!(
                "{pid} {}",
                String::from_utf8_lossy(&cmdline).replace('\0', " ").trim()
            )
        })
        .collect();
    for &pid in &pids {
        let _ = signal::kill(pid, Signal::SIGTERM);
    }
    wait_until(grace, || processes_in(name).is_empty());
    for pid in processes_in(name) {
        let _ = signal::kill(pid, Signal::SIGKILL);
    }
    found
}

/// Sends `sig` to `pid` (negative: a process group); errors (already gone) are ignored.
pub fn send_signal(pid: i32, sig: Signal) {
    let _ = signal::kill(Pid::from_raw(pid), sig);
}

/// Waits up to `timeout` for `child` to exit; its status, or `None` if it still runs.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` exists and is not a zombie (`/proc/PID/stat`'s state field).
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        })
        .unwrap_or(false)
}

/// `true` when something is mounted exactly at `path` (from `/proc/self/mountinfo`).
pub fn is_mount_point(path: &Path) -> bool {
    let Some(path) = path.to_str() else {
        return false;
    };
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines()
            .any(|l| l.split_whitespace().nth(4) == Some(path))
    })
}

/// A bpffs instance on a directory of its own, lazily unmounted and the directory removed on
/// drop; or ([`Bpffs::subdir_of`]) a directory inside a bpffs someone else mounted, removed
/// with its pins on drop. Either way the pins go, and with them the links and maps nothing
/// else holds.
#[derive(Debug)]
pub struct Bpffs {
    path: PathBuf,
    /// Whether this guard mounted `path` (and so unmounts it) or only made the directory.
    mounted: bool,
}

impl Bpffs {
    /// Mounts a new bpffs on a unique directory under [`BPFFS_TEST_ROOT`]. Panics on
    /// failure.
    pub fn new() -> Bpffs {
        let path = Path::new(BPFFS_TEST_ROOT).join(unique_name("bpf"));
        Bpffs::mount_at(&path).unwrap_or_else(|e| panic!("mount bpffs on {}: {e}", path.display()))
    }

    /// Mounts a fresh bpffs on `path` (created if missing; it should be outside `/sys`, see
    /// [`BPFFS_TEST_ROOT`]). Something already mounted there is unmounted first: it can only
    /// be what an earlier run with the same fixed path left behind.
    pub fn mount_at(path: &Path) -> io::Result<Bpffs> {
        while is_mount_point(path) {
            umount2(path, MntFlags::MNT_DETACH)?;
        }
        fs::create_dir_all(path)?;
        if let Err(e) = mount(
            Some("bpf"),
            path,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        ) {
            let _ = fs::remove_dir(path);
            return Err(e.into());
        }
        Ok(Bpffs {
            path: path.to_owned(),
            mounted: true,
        })
    }

    /// A fresh directory `name` inside the bpffs mounted at `parent` (for one of many
    /// topologies that share a run's bpffs, as the benchmarks' lanes do). Fails if it
    /// exists.
    pub fn subdir_of(parent: &Path, name: &str) -> io::Result<Bpffs> {
        let path = parent.join(name);
        fs::create_dir(&path)?;
        Ok(Bpffs {
            path,
            mounted: false,
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for Bpffs {
    fn default() -> Self {
        Bpffs::new()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if !self.mounted {
            // A directory of pins in someone else's bpffs: unlinking them is what releases
            // the programs and maps.
            if let Err(e) = fs::remove_dir_all(&self.path) {
                crate::shout!("warning: cannot remove {}: {e}", self.path.display());
            }
            return;
        }
        // Mounted more than once (a `viscum` that mounted its own on top): unmount all.
        while is_mount_point(&self.path) {
            if let Err(e) = umount2(&self.path, MntFlags::MNT_DETACH) {
                crate::shout!("warning: cannot unmount {}: {e}", self.path.display());
                break;
            }
        }
        // Plain rmdir, never remove_dir_all: a bpffs still mounted must not be walked into.
        if let Err(e) = fs::remove_dir(&self.path) {
            crate::shout!("warning: cannot remove {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_distinct() {
        let a = unique_name("vt");
        let b = unique_name("vt");
        assert_ne!(a, b);
        assert!(a.len() <= 12, "{a}");
        assert!(viscum::netns::validate_name(&a).is_ok());
        assert_eq!(base36(4_194_304), "2hwcg");
        assert_eq!(base36(0), "0");
    }

    #[test]
    fn wait_until_is_bounded() {
        assert!(wait_until(Duration::from_millis(50), || true));
        let start = Instant::now();
        assert!(!wait_until(Duration::from_millis(50), || false));
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
