//! What the runner does as PID 1 of a VM guest before any check: the file systems a Linux
//! userland expects, a console, the kernel modules shipped in the initramfs, a loopback, and
//! powering off at the end.
//!
//! The initramfs holds nothing but `/init` (this runner), `/bin/viscum` and `/modules`: no
//! shell, no `mount`, no `modprobe`, no `ip`; everything here is a system call.

use std::{
    ffi::CString,
    fs,
    io::{self, Write as _},
    os::{fd::AsRawFd, unix::ffi::OsStrExt as _},
    path::Path,
};

use nix::mount::{MsFlags, mount};

use crate::{cases::CaseResult, guard::block_on};

/// Directory of the kernel modules in the initramfs (`NN-<name>.ko`, loaded in name order).
pub const MODULES_DIR: &str = "/modules";

/// Modules whose absence or failure does not fail the run: 802.1Q (the lab falls back to
/// BPF taggers, and the verdict fixtures carry their tags in the frame data) and its
/// dependencies.
const OPTIONAL_MODULES: &[&str] = &["8021q", "garp", "mrp", "stp", "llc"];

/// `finit_module` flag: the file is compressed and the kernel decompresses it (kernels built
/// with `CONFIG_MODULE_DECOMPRESS`). The initramfs is meant to hold plain `.ko` files; this
/// only helps if a compressed one slips in.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// One mount of the guest's base file systems.
struct Mount {
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

/// In order: each target's parent exists by the time it is mounted (`/sys/fs/bpf` and
/// `/sys/fs/cgroup` are directories of sysfs).
fn mounts() -> [Mount; 7] {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    [
        Mount {
            target: "/proc",
            fstype: "proc",
            flags: nosuid_nodev | MsFlags::MS_NOEXEC,
            data: None,
        },
        Mount {
            target: "/sys",
            fstype: "sysfs",
            flags: nosuid_nodev | MsFlags::MS_NOEXEC,
            data: None,
        },
        Mount {
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        Mount {
            target: "/run",
            fstype: "tmpfs",
            flags: nosuid_nodev,
            data: Some("mode=0755"),
        },
        Mount {
            target: "/tmp",
            fstype: "tmpfs",
            flags: nosuid_nodev,
            data: Some("mode=1777"),
        },
        Mount {
            target: "/sys/fs/bpf",
            fstype: "bpf",
            flags: nosuid_nodev | MsFlags::MS_NOEXEC,
            data: Some("mode=0700"),
        },
        Mount {
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: nosuid_nodev | MsFlags::MS_NOEXEC,
            data: None,
        },
    ]
}

/// Mounts the base file systems, makes sure stdin/stdout/stderr are the console, and brings
/// the loopback up. Returns the `guest-setup` case; its detail lists every step.
pub fn setup() -> CaseResult {
    let start = std::time::Instant::now();
    let mut steps = Vec::new();
    let mut failed = false;
    for m in mounts() {
        let r = fs::create_dir_all(m.target).and_then(|()| {
            mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, m.data)
                .map_err(io::Error::from)
        });
        match r {
            Ok(()) => steps.push(format!("{} on {}", m.fstype, m.target)),
            // Already mounted (a kernel with CONFIG_DEVTMPFS_MOUNT, say): fine.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                steps.push(format!("{} on {} (already)", m.fstype, m.target));
            }
            Err(e) => {
                failed = true;
                steps.push(format!("mount {} on {} FAILED: {e}", m.fstype, m.target));
            }
        }
    }
    // Only now can /dev/console be opened, if the kernel could not give us one.
    if let Err(e) = ensure_console() {
        failed = true;
        steps.push(format!("console FAILED: {e}"));
    }
    match block_on(loopback_up()) {
        Ok(()) => steps.push("lo up".into()),
        Err(e) => {
            failed = true;
            steps.push(format!("lo up FAILED: {e}"));
        }
    }
    CaseResult {
        name: "guest-setup".into(),
        pass: !failed,
        ms: start.elapsed().as_millis() as u64,
        detail: steps.join("; "),
    }
}

/// Points fds 0, 1 and 2 at `/dev/console` where they are not open. The kernel opens the
/// console for init itself when the initramfs has a `/dev/console` node; this covers one
/// without it.
fn ensure_console() -> io::Result<()> {
    let missing: Vec<i32> = (0..3)
        // SAFETY: F_GETFD only queries the descriptor.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let console = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")?;
    for fd in missing {
        // SAFETY: dup2 onto a descriptor number that is not open; `console` stays valid.
        if unsafe { libc::dup2(console.as_raw_fd(), fd) } == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

async fn loopback_up() -> Result<(), String> {
    let handle = viscum::netns::handle_here()
        .await
        .map_err(|e| format!("netlink: {e}"))?;
    let lo = viscum::netns::link_by_name(&handle, "lo")
        .await
        .map_err(|e| e.to_string())?;
    viscum::netns::set_up(&handle, lo.index)
        .await
        .map_err(|e| e.to_string())
}

/// Loads every module file in [`MODULES_DIR`] in name order with `finit_module`, printing
/// one progress line each. Returns the `guest-modules` case: it fails when a module outside
/// the optional ones (8021q and its dependencies) fails to load ("already loaded" is not a
/// failure).
pub fn load_modules(progress: &mut dyn FnMut(&str)) -> CaseResult {
    load_modules_from(Path::new(MODULES_DIR), progress)
}

/// [`load_modules`] from another directory.
fn load_modules_from(dir: &Path, progress: &mut dyn FnMut(&str)) -> CaseResult {
    let start = std::time::Instant::now();
    let mut files: Vec<_> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(std::result::Result::ok)
            .map(|e| e.path())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return CaseResult {
                name: "guest-modules".into(),
                pass: false,
                ms: 0,
                detail: format!("cannot list {}: {e}", dir.display()),
            };
        }
    };
    files.sort();
    let mut loaded = Vec::new();
    let mut problems = Vec::new();
    for path in &files {
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match finit_module(path) {
            Ok(()) => {
                progress(&format!("module {file} loaded"));
                loaded.push(file);
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                progress(&format!("module {file} already loaded"));
                loaded.push(file);
            }
            Err(e) => {
                let optional = OPTIONAL_MODULES.contains(&module_name(&file));
                progress(&format!(
                    "module {file} FAILED to load{}: {e}",
                    if optional { " (optional)" } else { "" }
                ));
                problems.push((file, e.to_string(), optional));
            }
        }
    }
    let required_failed = problems.iter().any(|(_, _, optional)| !optional);
    let mut detail = format!(
        "{} of {} loaded from {}",
        loaded.len(),
        files.len(),
        dir.display()
    );
    for (file, e, optional) in &problems {
        detail.push_str(&format!(
            "; {file}{}: {e}",
            if *optional { " (optional)" } else { "" }
        ));
    }
    CaseResult {
        name: "guest-modules".into(),
        pass: !required_failed,
        ms: start.elapsed().as_millis() as u64,
        detail,
    }
}

/// `NN-veth.ko` -> `veth`; `07-sch_ingress.ko.xz` -> `sch_ingress`.
fn module_name(file: &str) -> &str {
    let base = file.split_once('-').map_or(file, |(_, rest)| rest);
    base.split('.').next().unwrap_or(base)
}

fn finit_module(path: &Path) -> io::Result<()> {
    let file = fs::File::open(path)?;
    let compressed = [".xz", ".zst", ".gz"]
        .iter()
        .any(|ext| path.as_os_str().as_bytes().ends_with(ext.as_bytes()));
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    let params = CString::default();
    // SAFETY: finit_module(2) with an open descriptor, an empty NUL-terminated parameter
    // string and plain flags; nothing is written to our memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The value of `vmcheck.name=` on the kernel command line.
pub fn cmdline_name() -> Option<String> {
    let cmdline = fs::read_to_string("/proc/cmdline").ok()?;
    cmdline
        .split_whitespace()
        .find_map(|t| t.strip_prefix("vmcheck.name="))
        .map(str::to_string)
}

/// Flushes what is buffered, syncs, and powers the machine off (qemu exits thanks to
/// `-no-reboot`). If the power-off itself fails, PID 1 exits, which panics the kernel; with
/// `panic=-1` it reboots at once, which ends qemu the same way.
pub fn power_off() -> ! {
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // SAFETY: plain system calls without pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    eprintln!(
        "VMCHECK power-off failed: {}; exiting PID 1",
        io::Error::last_os_error()
    );
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files that are not modules fail to load (on any kernel, with or without module
    /// support); only a required one fails the case, and every failure is named.
    #[test]
    fn module_failures_are_reported() {
        let dir = std::env::temp_dir().join(crate::guard::unique_name("vmmod"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("02-8021q.ko"), b"not an ELF file").unwrap();
        let mut lines = Vec::new();
        let optional_only = load_modules_from(&dir, &mut |l| lines.push(l.to_string()));
        fs::write(dir.join("01-veth.ko"), b"not an ELF file either").unwrap();
        let required = load_modules_from(&dir, &mut |l| lines.push(l.to_string()));
        fs::remove_dir_all(&dir).unwrap();
        assert!(optional_only.pass, "{optional_only:?}");
        assert!(optional_only.detail.contains("02-8021q.ko (optional)"));
        assert!(!required.pass, "{required:?}");
        assert!(required.detail.starts_with("0 of 2 loaded"), "{required:?}");
        assert!(
            lines[1].starts_with("module 01-veth.ko FAILED"),
            "{lines:?}"
        );
        // No directory at all: nothing to load (every module is built in).
        let none = load_modules_from(&dir, &mut |_| {});
        assert!(none.pass && none.detail.starts_with("0 of 0"), "{none:?}");
    }

    #[test]
    fn module_names_from_files() {
        assert_eq!(module_name("01-veth.ko"), "veth");
        assert_eq!(module_name("07-sch_ingress.ko.xz"), "sch_ingress");
        assert_eq!(module_name("12-8021q.ko"), "8021q");
        assert_eq!(module_name("cls_bpf.ko"), "cls_bpf");
    }
}
