//! The `[service.storage]` table: a private, size-limited, persistent working directory.
//!
//! ```toml
//! [engine]
//! storage_dir = "/var/lib/viscum/storage"   # optional; where the images live
//!
//! [[service]]
//! name = "alpr"
//! # ...
//! [service.storage]
//! size = "64M"      # at most this much (powers of 1024; at least 8M)
//! keep = false      # on removal from the file, delete the data (default) or keep it
//! ```
//!
//! How the daemon provides it (an ext4 image on a loop device, mounted in the service's own
//! mount namespace) is in [`crate::daemon::storage`] and docs/multi-tenant.md.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Problems, raw::SizeValue, validate::parse_size};

/// Where the images live when `engine.storage_dir` is not set. Persistent on a Debian box;
/// on OpenWrt `/var` is a tmpfs: set `storage_dir` on the overlay (docs/multi-tenant.md).
pub const DEFAULT_STORAGE_DIR: &str = "/var/lib/viscum/storage";

/// The smallest `size`: below this an ext4 file system with a journal leaves almost nothing.
pub const MIN_STORAGE_BYTES: u64 = 8 << 20;

/// The `[service.storage]` table, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    /// Size of the file system in bytes (`size = "64M"`, powers of 1024), rounded up to
    /// whole 4 KiB blocks. What the service can write is this minus the file system's own
    /// metadata (about 5 % at 64 MiB: inode tables and a 4 MiB journal).
    pub size: u64,
    /// Keep the data when the service is removed from the configuration (`keep = true`);
    /// by default it is deleted with the service.
    pub keep: bool,
}

/// `[service.storage]` as serde sees it.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStorage {
    pub(super) size: Option<SizeValue>,
    pub(super) keep: Option<bool>,
}

/// Validates `[service.storage]` (absent: no storage).
pub(super) fn validate_storage(raw: Option<RawStorage>, p: &mut Problems<'_>) -> Option<Storage> {
    let raw = raw?;
    let keep = raw.keep.unwrap_or(false);
    let size = match raw.size {
        None => {
            p.add("storage.size", "missing: give the size, e.g. \"64M\"");
            return None;
        }
        Some(SizeValue::Bytes(b)) if b > 0 => b as u64,
        Some(SizeValue::Bytes(b)) => {
            p.add(
                "storage.size",
                format!("{b} must be a positive number of bytes"),
            );
            return None;
        }
        Some(SizeValue::Text(t)) => match parse_size(&t) {
            Some(b) => b,
            None => {
                p.add(
                    "storage.size",
                    format!("'{t}' is not a size such as 64M, 512K or 1G"),
                );
                return None;
            }
        },
    };
    if size < MIN_STORAGE_BYTES {
        p.add(
            "storage.size",
            format!(
                "{size} bytes is below the minimum of {}M (an ext4 file system with its journal)",
                MIN_STORAGE_BYTES >> 20
            ),
        );
        return None;
    }
    Some(Storage {
        size: size.div_ceil(4096).saturating_mul(4096),
        keep,
    })
}

/// `engine.storage_dir`, validated: absolute.
pub(super) fn validate_storage_dir(raw: Option<PathBuf>, p: &mut Problems<'_>) -> PathBuf {
    match raw {
        Some(dir) if !dir.is_absolute() => {
            p.add(
                "storage_dir",
                format!("'{}' must be an absolute path", dir.display()),
            );
            dir
        }
        Some(dir) => dir,
        None => PathBuf::from(DEFAULT_STORAGE_DIR),
    }
}
