//! A private bpffs for one run: every pin of every loaded object and `viscum --bpffs` instance
//! lives below it, so a single unmount releases all of them whatever state a run ended in.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use nix::mount::{MntFlags, umount2};

pub struct PrivateBpffs {
    pub dir: PathBuf,
}

impl PrivateBpffs {
    /// Mounts a bpffs at `/run/<run-id>/bpf` (outside /sys: see toolchain.md on `ip netns exec`).
    pub fn mount(run_id: &str) -> Result<PrivateBpffs> {
        let dir = Path::new("/run")
            .join(format!("viscum-bench-{run_id}"))
            .join("bpf");
        viscum::bpffs::ensure(&dir)
            .with_context(|| format!("cannot mount a bpffs on {}", dir.display()))?;
        Ok(PrivateBpffs { dir })
    }

    /// A fresh, empty subdirectory for one object's or instance's pins.
    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
        Ok(d)
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if let Err(e) = umount2(&self.dir, MntFlags::MNT_DETACH) {
            eprintln!("bench: cannot unmount {}: {e}", self.dir.display());
        }
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}
