//! Resources a test creates and must not leave behind, and small helpers around them.

use std::{
    fs,
    future::Future,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use viscum::netns::{self, NetnsError};

/// Where [`Bpffs`] mounts its instances: outside `/sys`, so they are the same in every
/// mount namespace that shares the root one (`docs/toolchain.md`).
pub const BPFFS_TEST_ROOT: &str = "/run/viscum-test";

/// Prints "skipping: needs root" and returns true when not running as root.
pub fn skip_unless_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("skipping: needs root");
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

/// A named network namespace with a unique name, deleted on drop.
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
        netns::create_named(name).unwrap_or_else(|e| panic!("create namespace {name}: {e:?}"));
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
            .unwrap_or_else(|e| panic!("write sysctl {key}={value} in {}: {e:?}", self.name))
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

/// Deletes a named namespace, tolerating its absence; other failures are printed (a Drop
/// must not panic while a failed test is already unwinding).
pub(crate) fn delete_quietly(name: &str) {
    match netns::delete_named(name) {
        Ok(()) | Err(NetnsError::UnknownNamespace { .. }) => {}
        Err(e) => eprintln!("warning: cannot delete namespace {name}: {e}"),
    }
}

/// A fresh bpffs instance mounted on a unique directory under [`BPFFS_TEST_ROOT`]; lazily
/// unmounted and removed on drop. Unmounting drops the pins in it, and with them the links
/// and maps nothing else holds.
#[derive(Debug)]
pub struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    /// Mounts a new bpffs. Panics on failure.
    pub fn new() -> Bpffs {
        let path = Path::new(BPFFS_TEST_ROOT).join(unique_name("bpf"));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        if let Err(e) = mount(
            Some("bpf"),
            &path,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        ) {
            let _ = fs::remove_dir(&path);
            panic!("mount bpffs on {}: {e}", path.display());
        }
        Bpffs { path }
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
        if let Err(e) = umount2(&self.path, MntFlags::MNT_DETACH) {
            eprintln!("warning: cannot unmount {}: {e}", self.path.display());
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("warning: cannot remove {}: {e}", self.path.display());
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
