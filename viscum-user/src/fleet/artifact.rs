//! Service artifacts: fetched from the fleet's Object Store, verified, installed.
//!
//! A service block may say `artifact = { name = "web-1.2.tar.gz", sha256 = "<64 hex>" }`.
//! Before the desired state naming it is applied, the box
//!
//! 1. downloads object `name` of [`super::schema::ARTIFACT_BUCKET`] into a temporary file,
//!    hashing it on the way (SHA-256, the `sha2` crate), at most [`MAX_ARTIFACT_BYTES`];
//! 2. refuses it unless the digest is the block's `sha256`: nothing of it is unpacked, the
//!    apply is refused with the reason in the box's status, and the running version (if
//!    any) keeps running;
//! 3. installs it into `<root>/<service>/<sha256>/` (`<root>` is
//!    `<run_dir>/fleet/artifacts`): a `.tar.gz`/`.tgz` is unpacked there, refusing any
//!    entry with an absolute path or a `..` component, any link pointing outside the
//!    directory, and anything but files, directories and links; any other object becomes
//!    one executable file named like the object (mode 0755). Files are made readable by all
//!    (the service runs unprivileged), set-id bits are dropped. The directory is built under a
//!    temporary name and renamed into place, so a directory by the final name is always
//!    complete;
//! 4. runs the service with that directory as its working directory, so `command =
//!    ["./bin/server"]` names the artifact's files relatively. The run directory above it
//!    (0700) is made searchable by all (0711: nobody can list it, and `state/` and `logs/`
//!    stay 0700), so the service's user can reach its directory by its full path too.
//!
//! Versions are kept by digest: a new version is installed next to the running one, the
//! daemon's reload diff replaces the process, and versions no service uses any more are
//! removed after the apply ([`Installer::prune`]).

use std::{
    collections::BTreeSet,
    fs,
    io::{self, Read},
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Component, Path, PathBuf},
};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::ArtifactRef;

/// Largest artifact a box downloads (bytes): bigger ones are refused before they fill its
/// storage.
pub const MAX_ARTIFACT_BYTES: u64 = 512 << 20;

/// Why an artifact could not be installed. Nothing is left behind in any case.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The object could not be read from the store (missing, no permission, server gone).
    #[error("artifact {name}: cannot fetch it from the object store: {why}")]
    Fetch {
        /// The object's name.
        name: String,
        /// The store's error.
        why: String,
    },
    /// The object is bigger than [`MAX_ARTIFACT_BYTES`].
    #[error("artifact {name}: larger than {MAX_ARTIFACT_BYTES} bytes")]
    TooLarge {
        /// The object's name.
        name: String,
    },
    /// The object's SHA-256 is not the one the service block names: refused.
    #[error("artifact {name}: SHA-256 is {actual}, but the service names {expected}: refused")]
    DigestMismatch {
        /// The object's name.
        name: String,
        /// The digest the service block names.
        expected: String,
        /// The digest of what the store returned.
        actual: String,
    },
    /// A tarball entry that would land outside the directory, or of a kind not installed.
    #[error("artifact {name}: entry '{entry}': {why}: refused")]
    Unsafe {
        /// The object's name.
        name: String,
        /// The entry's path in the tarball.
        entry: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The tarball is not a valid gzip-compressed tar file.
    #[error("artifact {name}: not a valid .tar.gz")]
    Archive {
        /// The object's name.
        name: String,
        /// The decoder's error.
        #[source]
        source: io::Error,
    },
    /// Writing the artifact to disk failed.
    #[error("artifact {name}: cannot write {path}")]
    Io {
        /// The object's name.
        name: String,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Installs artifacts under one root directory (`<run_dir>/fleet/artifacts`).
#[derive(Debug, Clone)]
pub struct Installer {
    root: PathBuf,
    searchable: Vec<PathBuf>,
}

impl Installer {
    /// An installer for `root` (created, mode 0755, when the first artifact is installed).
    pub fn new(root: impl Into<PathBuf>) -> Installer {
        Installer {
            root: root.into(),
            searchable: Vec::new(),
        }
    }

    /// Also makes `dirs` searchable by all (adds `o+x`, not `o+r`: nobody can list them)
    /// when an artifact is installed: the daemon's run directory is root's alone (0700), and
    /// a service's user must reach its artifact's directory by its full path (interpreters
    /// such as Python open their script by its absolute path).
    pub fn searchable(mut self, dirs: &[PathBuf]) -> Installer {
        self.searchable = dirs.to_vec();
        self
    }

    /// `<root>/<service>/<sha256>`: where `service`'s copy of `artifact` lives.
    pub fn dir(&self, service: &str, artifact: &ArtifactRef) -> PathBuf {
        self.root.join(service).join(&artifact.sha256)
    }

    /// The directory if that version is installed (a directory by the final name is
    /// complete: it is renamed into place last).
    pub fn installed(&self, service: &str, artifact: &ArtifactRef) -> Option<PathBuf> {
        let dir = self.dir(service, artifact);
        dir.is_dir().then_some(dir)
    }

    /// Fetches `artifact` from `store`, verifies its digest and installs it for `service`,
    /// unless that version is installed already. Returns the directory.
    ///
    /// # Errors
    /// [`ArtifactError`]: the object cannot be fetched, is too large, has another digest, is
    /// a tarball with an unsafe or invalid entry, or cannot be written.
    pub async fn install(
        &self,
        store: &async_nats::jetstream::object_store::ObjectStore,
        service: &str,
        artifact: &ArtifactRef,
    ) -> Result<PathBuf, ArtifactError> {
        if let Some(dir) = self.installed(service, artifact) {
            return Ok(dir);
        }
        let name = artifact.name.clone();
        let io_err = |path: &Path| {
            let name = name.clone();
            let path = path.to_owned();
            move |source| ArtifactError::Io { name, path, source }
        };
        let parent = self.root.join(service);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&parent)
            .map_err(io_err(&parent))?;
        for dir in self.searchable.iter().chain([&self.root]) {
            let meta = fs::metadata(dir).map_err(io_err(dir))?;
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o011 != 0o011 {
                fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o011))
                    .map_err(io_err(dir))?;
            }
        }
        let download = parent.join(format!(".download-{}", artifact.sha256));
        let result = self.fetch(store, artifact, &download).await;
        let actual = match result {
            Ok(d) => d,
            Err(e) => {
                let _ = fs::remove_file(&download);
                return Err(e);
            }
        };
        if actual != artifact.sha256 {
            let _ = fs::remove_file(&download);
            return Err(ArtifactError::DigestMismatch {
                name,
                expected: artifact.sha256.clone(),
                actual,
            });
        }
        let staging = parent.join(format!(".staging-{}", artifact.sha256));
        let final_dir = self.dir(service, artifact);
        let (art, dl, st) = (artifact.clone(), download.clone(), staging.clone());
        let unpacked = tokio::task::spawn_blocking(move || unpack(&art, &dl, &st))
            .await
            .unwrap_or_else(|e| {
                Err(ArtifactError::Io {
                    name: name.clone(),
                    path: staging.clone(),
                    source: io::Error::other(e),
                })
            });
        let _ = fs::remove_file(&download);
        if let Err(e) =
            unpacked.and_then(|()| fs::rename(&staging, &final_dir).map_err(io_err(&final_dir)))
        {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
        Ok(final_dir)
    }

    async fn fetch(
        &self,
        store: &async_nats::jetstream::object_store::ObjectStore,
        artifact: &ArtifactRef,
        to: &Path,
    ) -> Result<String, ArtifactError> {
        let name = &artifact.name;
        let fetch_err = |why: String| ArtifactError::Fetch {
            name: name.clone(),
            why,
        };
        let io_err = |source| ArtifactError::Io {
            name: name.clone(),
            path: to.to_owned(),
            source,
        };
        let mut object = store
            .get(name)
            .await
            .map_err(|e| fetch_err(e.to_string()))?;
        if object.info.size as u64 > MAX_ARTIFACT_BYTES {
            return Err(ArtifactError::TooLarge { name: name.clone() });
        }
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(to)
            .await
            .map_err(io_err)?;
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = object
                .read(&mut buf)
                .await
                .map_err(|e| fetch_err(e.to_string()))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > MAX_ARTIFACT_BYTES {
                return Err(ArtifactError::TooLarge { name: name.clone() });
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).await.map_err(io_err)?;
        }
        file.sync_all().await.map_err(io_err)?;
        Ok(hex(&hasher.finalize()))
    }

    /// Removes every installed version not in `keep` (`(service, sha256)`), and leftovers
    /// of interrupted installs. Errors are logged: a stale directory only costs space.
    pub fn prune(&self, keep: &BTreeSet<(String, String)>) {
        let Ok(services) = fs::read_dir(&self.root) else {
            return;
        };
        for svc in services.flatten() {
            let svc_name = svc.file_name().to_string_lossy().into_owned();
            let Ok(versions) = fs::read_dir(svc.path()) else {
                continue;
            };
            for v in versions.flatten() {
                let v_name = v.file_name().to_string_lossy().into_owned();
                if keep.contains(&(svc_name.clone(), v_name)) {
                    continue;
                }
                let path = v.path();
                let removed = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                if let Err(e) = removed {
                    log::warn!("fleet: cannot remove {}: {e}", path.display());
                }
            }
            // Empty once its last version went: gone too (fails, harmlessly, otherwise).
            let _ = fs::remove_dir(svc.path());
        }
    }
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes` as 64 lowercase hex digits (what a service block's `sha256` holds).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Is this object unpacked (a gzip-compressed tarball) or installed as one file?
pub fn is_tarball(name: &str) -> bool {
    name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

/// Unpacks (or places) the verified download into `staging` (created here, mode 0755).
fn unpack(artifact: &ArtifactRef, download: &Path, staging: &Path) -> Result<(), ArtifactError> {
    let name = artifact.name.clone();
    let io_err = |path: &Path| {
        let name = name.clone();
        let path = path.to_owned();
        move |source| ArtifactError::Io { name, path, source }
    };
    let _ = fs::remove_dir_all(staging);
    fs::DirBuilder::new()
        .mode(0o755)
        .create(staging)
        .map_err(io_err(staging))?;
    if !is_tarball(&artifact.name) {
        let to = staging.join(&artifact.name);
        fs::copy(download, &to).map_err(io_err(&to))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).map_err(io_err(&to))?;
        return Ok(());
    }
    let file = fs::File::open(download).map_err(io_err(download))?;
    let archive_err = |source| ArtifactError::Archive {
        name: name.clone(),
        source,
    };
    // First pass: check every entry before anything is written, so a refused tarball
    // leaves nothing half unpacked.
    {
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&file));
        for entry in archive.entries().map_err(archive_err)? {
            let entry = entry.map_err(archive_err)?;
            check_entry(&name, &entry)?;
        }
    }
    let file = fs::File::open(download).map_err(io_err(download))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(archive_err)? {
        let mut entry = entry.map_err(archive_err)?;
        let path = entry.path().map_err(archive_err)?.into_owned();
        if !entry.unpack_in(staging).map_err(archive_err)? {
            return Err(ArtifactError::Unsafe {
                name,
                entry: path.display().to_string(),
                why: "would be written outside the artifact's directory",
            });
        }
    }
    readable_by_all(staging).map_err(io_err(staging))
}

/// Refuses entries that could write outside the directory or are not plain content.
fn check_entry<R: Read>(name: &str, entry: &tar::Entry<'_, R>) -> Result<(), ArtifactError> {
    let path = entry
        .path()
        .map_err(|source| ArtifactError::Archive {
            name: name.to_owned(),
            source,
        })?
        .into_owned();
    let refuse = |why| {
        Err(ArtifactError::Unsafe {
            name: name.to_owned(),
            entry: path.display().to_string(),
            why,
        })
    };
    if path.is_absolute() {
        return refuse("absolute path");
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return refuse("'..' in its path");
    }
    let kind = entry.header().entry_type();
    if kind.is_symlink() || kind.is_hard_link() {
        let Ok(Some(target)) = entry.link_name() else {
            return refuse("link without a target");
        };
        if target.is_absolute() {
            return refuse("link to an absolute path");
        }
        // Symlink targets are relative to the link's directory, hard link targets to the
        // archive root; either must stay inside.
        let base = if kind.is_symlink() {
            path.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            PathBuf::new()
        };
        let mut depth: i64 = base
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .count() as i64;
        for c in target.components() {
            match c {
                Component::ParentDir => depth -= 1,
                Component::Normal(_) => depth += 1,
                _ => {}
            }
            if depth < 0 {
                return refuse("link pointing outside the artifact's directory");
            }
        }
    } else if !(kind.is_file() || kind.is_dir() || kind == tar::EntryType::GNUSparse) {
        return refuse("neither a file, a directory nor a link");
    }
    Ok(())
}

/// Directories 0755, files readable by all (executable by all when executable by their
/// owner), no set-id or sticky bits: the service runs as an unprivileged user.
fn readable_by_all(dir: &Path) -> io::Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = fs::symlink_metadata(entry.path())?;
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.is_dir() {
            readable_by_all(&entry.path())?;
        } else {
            let mode = meta.permissions().mode() & 0o777;
            let mode = if mode & 0o100 != 0 {
                mode | 0o555
            } else {
                mode | 0o444
            };
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(if *kind == tar::EntryType::Directory {
                0o755
            } else {
                0o4750
            });
            // set_path refuses '..' itself: write the raw name, as a hostile tarball would.
            let raw = &mut h.as_old_mut().name;
            raw[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            h.set_cksum();
            builder.append(&h, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    fn try_unpack(name: &str, bytes: &[u8]) -> (tempdir::Dir, Result<(), ArtifactError>) {
        let dir = tempdir::Dir::new();
        let dl = dir.0.join("dl");
        fs::write(&dl, bytes).unwrap();
        let art = ArtifactRef {
            name: name.into(),
            sha256: sha256_hex(bytes),
        };
        let r = unpack(&art, &dl, &dir.0.join("out"));
        (dir, r)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "viscum-artifact-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn unpacks_a_tarball_readable_by_all() {
        use tar::EntryType as T;
        let bytes = tarball(&[
            ("bin", T::Directory, b"", None),
            ("bin/server", T::Regular, b"#!/bin/sh\n", None),
            ("current", T::Symlink, b"", Some("bin/server")),
        ]);
        let (dir, r) = try_unpack("web.tar.gz", &bytes);
        r.unwrap();
        let server = dir.0.join("out/bin/server");
        assert_eq!(fs::read(&server).unwrap(), b"#!/bin/sh\n");
        // 04750 in the tarball: set-uid dropped, readable and executable by all.
        let mode = fs::metadata(&server).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755);
        assert!(
            fs::symlink_metadata(dir.0.join("out/current"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn refuses_escaping_entries() {
        use tar::EntryType as T;
        for (entries, why) in [
            (
                vec![("../evil", T::Regular, &b"x"[..], None)],
                "'..' in its path",
            ),
            (
                vec![("/etc/evil", T::Regular, &b"x"[..], None)],
                "absolute path",
            ),
            (
                vec![("link", T::Symlink, &b""[..], Some("/etc/passwd"))],
                "link to an absolute path",
            ),
            (
                vec![("a/link", T::Symlink, &b""[..], Some("../../x"))],
                "link pointing outside",
            ),
            (
                vec![("hard", T::Link, &b""[..], Some("../x"))],
                "link pointing outside",
            ),
            (vec![("dev", T::Char, &b""[..], None)], "neither a file"),
        ] {
            let bytes = tarball(&entries);
            let (dir, r) = try_unpack("bad.tgz", &bytes);
            let e = r.unwrap_err().to_string();
            assert!(e.contains(why), "{entries:?}: {e}");
            assert!(!dir.0.join("out").join("evil").exists());
            assert!(!Path::new("/etc/evil").exists());
        }
        let (_dir, r) = try_unpack("bad.tar.gz", b"not gzip at all");
        assert!(matches!(r, Err(ArtifactError::Archive { .. })), "{r:?}");
    }

    #[test]
    fn a_single_binary_is_made_executable() {
        let (dir, r) = try_unpack("server", b"\x7fELF...");
        r.unwrap();
        let mode = fs::metadata(dir.0.join("out/server"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn prune_keeps_what_is_in_use() {
        let dir = tempdir::Dir::new();
        let inst = Installer::new(&dir.0);
        for (svc, v) in [("web", "aa"), ("web", "bb"), ("api", "cc")] {
            fs::create_dir_all(dir.0.join(svc).join(v)).unwrap();
        }
        let keep = BTreeSet::from([("web".to_string(), "bb".to_string())]);
        inst.prune(&keep);
        assert!(dir.0.join("web/bb").is_dir());
        assert!(!dir.0.join("web/aa").exists());
        assert!(!dir.0.join("api").exists());
    }

    #[test]
    fn digests_are_lowercase_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
