//! Disk quotas: each service with `[service.storage]` gets a private, size-limited, persistent
//! working directory.
//!
//! # Mechanism: an ext4 image on a loop device, mounted in the service's mount namespace
//!
//! `<storage_dir>/NAME/image.ext4` is a file of exactly `size` bytes (preallocated with
//! `fallocate(2)` where the file system can, so a full host disk cannot fail the service's
//! writes later; sparse where it cannot, as on jffs2 and ubifs) holding an ext4 file system
//! made once by e2fsprogs' `mke2fs` (`-m 0`: no blocks reserved for root, so the service gets
//! all of it; `-E nodiscard`: discarding a file punches holes, undoing the preallocation).
//! At every start the daemon attaches the image to a free loop device (`LOOP_CTL_GET_FREE`
//! on `/dev/loop-control`, then `LOOP_CONFIGURE` with `LO_FLAGS_AUTOCLEAR`, or
//! `LOOP_SET_FD` + `LOOP_SET_STATUS64` before Linux 5.8; or reuses the device that already
//! backs the image), and the service process, between fork and exec, right after entering
//! its own mount namespace ([`super::sandbox`]), mounts it (`nosuid,nodev`) on
//! `<storage_dir>/NAME/data`, makes its root the service account's, and makes it its working
//! directory (`$STATE_DIRECTORY` names it too, as systemd does). The mount exists only in the
//! service's namespace: the host and the other services see an empty directory. When the
//! last process of the service ends, its namespace goes, the file system is unmounted and
//! the loop device detaches itself (autoclear): there is nothing to clean up, even after the
//! daemon was killed.
//!
//! A write past the size fails with `ENOSPC` inside that file system only; the host's
//! file system and the other services' images are untouched. The data survives restarts of
//! the service and of the daemon (the image is a file). When the service is removed from the
//! configuration (a reload, or a daemon started without it), `<storage_dir>/NAME` is deleted
//! unless `keep = true` (recorded as `<storage_dir>/NAME/keep`, so a later daemon that no
//! longer has the service's configuration still knows).
//!
//! # Why this and not another
//!
//! * Project quotas (ext4/xfs `prjquota`) need the state directory's file system mounted
//!   with them, which a daemon cannot arrange, and OpenWrt's overlay (overlayfs on jffs2 or
//!   ubifs) has no quotas at all.
//! * A size-limited tmpfs works everywhere but is lost at every reboot and lives in RAM: fine
//!   for scratch space (every service already has a private `/tmp`), wrong for state.
//! * A loop-mounted image needs only a file: it works on ext4 (this machine), on OpenWrt's
//!   overlay and on a USB stick, given the kernel's loop and ext4 support (OpenWrt packages
//!   `kmod-loop`, `kmod-fs-ext4`) and `mke2fs` (package `e2fsprogs`; Essential on Debian).
//! * `mke2fs` is run as a program because no maintained Rust crate writes ext4, and a file
//!   system written wrongly is data lost later; it runs once per image, never per start.
//!
//! # Limits
//!
//! The size of an existing image is not changed: a different `size` is reported in
//! `status` (`storage.error`) and the old size stays until the image is removed.

use std::{
    ffi::CString,
    fs::{self, File, OpenOptions},
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    process::Command,
};

use serde::{Deserialize, Serialize};

use crate::config::Storage;

/// The image's file name in the service's directory.
const IMAGE: &str = "image.ext4";
/// The mount point's name in the service's directory.
const DATA: &str = "data";
/// Marker: keep the directory when the service is removed.
const KEEP: &str = "keep";

// linux/loop.h
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` (linux/loop.h, Linux 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Why a service's storage could not be made ready (the service is then not started).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A directory or the image file could not be made.
    #[error("cannot prepare {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `mke2fs` is not installed or failed.
    #[error("cannot format {path} as ext4 with mke2fs: {why}")]
    Format {
        /// The image.
        path: PathBuf,
        /// Its error output or why it could not run.
        why: String,
    },
    /// No loop device could be attached.
    #[error(
        "cannot attach {path} to a loop device: {source} (the kernel needs loop device support: CONFIG_BLK_DEV_LOOP, OpenWrt package kmod-loop)"
    )]
    Loop {
        /// The image.
        path: PathBuf,
        /// The failing call's error.
        #[source]
        source: io::Error,
    },
    /// The name cannot name a directory.
    #[error("{0:?} is not a service name")]
    Name(String),
}

/// What `status` shows of a service's storage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StorageStatus {
    /// The working directory the service sees (its mount point).
    pub path: PathBuf,
    /// The configured size in bytes.
    pub size_bytes: u64,
    /// The file system's size as mounted (blocks times block size), while the service runs.
    pub total_bytes: Option<u64>,
    /// Bytes in use in it (total minus free), while the service runs.
    pub used_bytes: Option<u64>,
    /// Kept when the service is removed.
    pub keep: bool,
    /// The loop device of the last start, e.g. `/dev/loop3`.
    pub device: Option<String>,
    /// Why the storage is not (or not as configured) in place.
    pub error: Option<String>,
}

/// The image attached to a loop device, ready for the child to mount. Holds the device
/// open until it is dropped (after the spawn): an autoclear device whose last holder goes
/// detaches, so it must stay open until the child's mount holds it.
pub struct Attached {
    _device: File,
    /// `/dev/loopN`.
    pub device_path: PathBuf,
    /// What the child mounts, prepared before the fork.
    pub child: ChildMount,
    /// Configured and actual image sizes differ (the message for `status`).
    pub warning: Option<String>,
}

/// The mount the child makes (async-signal-safe: all strings prepared in advance).
#[derive(Debug, Clone)]
pub struct ChildMount {
    device: CString,
    target: CString,
    /// The mount point, for the environment (`STATE_DIRECTORY`).
    pub path: PathBuf,
}

/// `<root>/NAME`.
pub fn service_dir(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}

/// The directory the service works in: `<root>/NAME/data`.
pub fn mount_point(root: &Path, name: &str) -> PathBuf {
    service_dir(root, name).join(DATA)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_owned(),
        source,
    }
}

fn mkdir(path: &Path, mode: u32) -> Result<(), StorageError> {
    match fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Makes the directories and, the first time, the image; attaches the image to a loop
/// device. Blocking (mke2fs runs the first time): call it from a blocking task.
///
/// # Errors
/// [`StorageError`] naming the step; nothing is mounted then.
pub fn prepare(root: &Path, name: &str, cfg: &Storage) -> Result<Attached, StorageError> {
    if crate::netns::validate_name(name).is_err() {
        return Err(StorageError::Name(name.to_owned()));
    }
    fs::create_dir_all(root).map_err(io_err(root))?;
    // Services must traverse to their mount point, but not list the others'.
    let dir = service_dir(root, name);
    mkdir(&dir, 0o711)?;
    let data = dir.join(DATA);
    mkdir(&data, 0o700)?;
    let keep = dir.join(KEEP);
    if cfg.keep {
        fs::write(&keep, b"").map_err(io_err(&keep))?;
    } else if let Err(e) = fs::remove_file(&keep)
        && e.kind() != io::ErrorKind::NotFound
    {
        return Err(io_err(&keep)(e));
    }
    let image = dir.join(IMAGE);
    if !image.exists() {
        make_image(&image, cfg.size)?;
    }
    let actual = fs::metadata(&image).map_err(io_err(&image))?.len();
    let warning = (actual != cfg.size).then(|| {
        format!(
            "the image is {actual} bytes, not the configured {}: an existing image is not resized (remove the service with keep = false to start afresh)",
            cfg.size
        )
    });
    let (device, device_path) = attach(&image)?;
    let cstr = |p: &Path| {
        CString::new(p.as_os_str().as_encoded_bytes()).map_err(|e| StorageError::Io {
            path: p.to_owned(),
            source: io::Error::other(e),
        })
    };
    Ok(Attached {
        child: ChildMount {
            device: cstr(&device_path)?,
            target: cstr(&data)?,
            path: data,
        },
        _device: device,
        device_path,
        warning,
    })
}

/// Writes a new image atomically: a `.new` file, preallocated, formatted, renamed.
fn make_image(image: &Path, size: u64) -> Result<(), StorageError> {
    let tmp = image.with_extension("ext4.new");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    // SAFETY: plain syscall on a descriptor we own.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        log::warn!(
            "cannot preallocate {} ({e}): the image is sparse, and writes in it can fail if the host file system fills up",
            tmp.display()
        );
        file.set_len(size).map_err(io_err(&tmp))?;
    }
    drop(file);
    let mke2fs = find_program("mke2fs").ok_or_else(|| StorageError::Format {
        path: image.to_owned(),
        why: "mke2fs is not installed (Debian: e2fsprogs; OpenWrt: e2fsprogs)".into(),
    })?;
    let label = format!(
        "viscum-{}",
        image
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let out = Command::new(&mke2fs)
        .args(["-q", "-F", "-t", "ext4", "-m", "0", "-E", "nodiscard", "-L"])
        .arg(&label)
        .arg(&tmp)
        .output()
        .map_err(|e| StorageError::Format {
            path: image.to_owned(),
            why: format!("cannot run {}: {e}", mke2fs.display()),
        })?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(StorageError::Format {
            path: image.to_owned(),
            why: format!(
                "{} ({})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            ),
        });
    }
    fs::rename(&tmp, image).map_err(io_err(image))?;
    log::info!("made {} ({size} bytes, ext4)", image.display());
    Ok(())
}

/// `name` in `$PATH` or the sbin directories (a daemon's PATH may lack them).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The loop device already backing `image` (a start whose earlier processes still hold the
/// file system mounted): mounting that one again shares the same file system, where a
/// second device would mount the same blocks twice and corrupt them.
fn existing_device(image: &Path) -> Option<PathBuf> {
    let want = image.as_os_str().as_encoded_bytes();
    for entry in fs::read_dir("/sys/block").ok()?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = fs::read(entry.path().join("loop/backing_file")) else {
            continue;
        };
        if backing.strip_suffix(b"\n").unwrap_or(&backing) == want {
            return Some(PathBuf::from("/dev").join(&*name));
        }
    }
    None
}

fn ioctl(fd: &File, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the loop ioctls read or write at most the structure `arg` points to, which
    // the caller keeps alive; the others take an integer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Attaches `image` to a loop device (or finds the one it is attached to); returns the
/// device, open, and its path.
fn attach(image: &Path) -> Result<(File, PathBuf), StorageError> {
    let loop_err = |source| StorageError::Loop {
        path: image.to_owned(),
        source,
    };
    let open_dev = |path: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
    };
    if let Some(dev) = existing_device(image)
        && let Ok(f) = open_dev(&dev)
    {
        return Ok((f, dev));
    }
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(image)
        .map_err(io_err(image))?;
    let control = open_dev(Path::new("/dev/loop-control")).map_err(loop_err)?;
    // Another program may take the free device between asking and configuring it (EBUSY).
    let mut last = io::Error::from_raw_os_error(libc::EBUSY);
    for _ in 0..8 {
        let n = ioctl(&control, LOOP_CTL_GET_FREE, 0).map_err(loop_err)?;
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = match open_dev(&path) {
            Ok(d) => d,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_AUTOCLEAR,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        };
        let name = image.as_os_str().as_encoded_bytes();
        let len = name.len().min(63);
        info.lo_file_name[..len].copy_from_slice(&name[..len]);
        let config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info,
            reserved: [0; 8],
        };
        match ioctl(&dev, LOOP_CONFIGURE, &raw const config as libc::c_ulong) {
            Ok(_) => return Ok((dev, path)),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = e,
            // Before Linux 5.8: the two-step way.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTTY)) => {
                match ioctl(&dev, LOOP_SET_FD, backing.as_raw_fd() as libc::c_ulong) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        last = e;
                        continue;
                    }
                    Err(e) => return Err(loop_err(e)),
                }
                if let Err(e) = ioctl(&dev, LOOP_SET_STATUS64, &raw const info as libc::c_ulong) {
                    let _ = ioctl(&dev, LOOP_CLR_FD, 0);
                    return Err(loop_err(e));
                }
                return Ok((dev, path));
            }
            Err(e) => return Err(loop_err(e)),
        }
    }
    Err(loop_err(last))
}

impl ChildMount {
    /// In the child, in its own mount namespace and still privileged: mounts the file
    /// system on the mount point (`nosuid,nodev`), gives its root to `uid:gid` (mode
    /// 0700), and makes it the working directory. Async-signal-safe.
    ///
    /// # Errors
    /// The errno of the failing call; the step is named on stderr (the service log).
    pub fn mount(&self, uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
        // SAFETY: raw syscalls on C strings prepared before the fork.
        unsafe {
            if libc::mount(
                self.device.as_ptr(),
                self.target.as_ptr(),
                c"ext4".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                std::ptr::null(),
            ) != 0
            {
                return fail(b"viscum: cannot mount the service's storage\n");
            }
            if libc::chown(self.target.as_ptr(), uid, gid) != 0
                || libc::chmod(self.target.as_ptr(), 0o700) != 0
            {
                return fail(b"viscum: cannot give the storage to the service's user\n");
            }
            if libc::chdir(self.target.as_ptr()) != 0 {
                return fail(b"viscum: cannot enter the service's storage\n");
            }
        }
        Ok(())
    }
}

fn fail(msg: &[u8]) -> io::Result<()> {
    let e = io::Error::last_os_error();
    // SAFETY: write(2) of a static buffer is async-signal-safe; its result does not matter.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    Err(e)
}

/// Size and use of the file system mounted at `mount_point` in process `pid`'s mount
/// namespace (through `/proc/PID/root`): `(total, used)` bytes, `None` if it cannot be read.
pub fn usage(pid: i32, mount_point: &Path) -> Option<(u64, u64)> {
    let rel = mount_point.strip_prefix("/").ok()?;
    let path = PathBuf::from(format!("/proc/{pid}/root")).join(rel);
    let st = nix::sys::statvfs::statvfs(&path).ok()?;
    #[allow(
        clippy::useless_conversion,
        reason = "the field types differ between targets"
    )]
    let (blocks, free, frag) = (
        u64::from(st.blocks()),
        u64::from(st.blocks_free()),
        u64::from(st.fragment_size()),
    );
    Some((blocks * frag, blocks.saturating_sub(free) * frag))
}

/// Deletes the storage of a service that is no longer configured, unless it was configured
/// with `keep = true` (its `keep` marker). Returns whether something was deleted.
pub fn remove(root: &Path, name: &str) -> bool {
    if crate::netns::validate_name(name).is_err() {
        return false;
    }
    let dir = service_dir(root, name);
    if !dir.exists() {
        return false;
    }
    if dir.join(KEEP).exists() {
        log::info!(
            "service {name}: keeping its storage {} (keep = true)",
            dir.display()
        );
        return false;
    }
    // A process of the old service still holding it mounted keeps its blocks until it
    // ends (the loop device holds the deleted file); nothing else can reach them.
    match fs::remove_dir_all(&dir) {
        Ok(()) => {
            log::info!("service {name}: deleted its storage {}", dir.display());
            true
        }
        Err(e) => {
            log::warn!(
                "service {name}: cannot delete its storage {}: {e}",
                dir.display()
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_structures_have_the_kernel_sizes() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn names_that_are_not_service_names_get_nothing() {
        let root = Path::new("/nonexistent-viscum-storage");
        let cfg = Storage {
            size: 8 << 20,
            keep: false,
        };
        for name in ["..", "a/b", ""] {
            assert!(matches!(
                prepare(root, name, &cfg),
                Err(StorageError::Name(_))
            ));
            assert!(!remove(root, name));
        }
    }
}
