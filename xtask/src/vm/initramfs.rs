//! The guest's initramfs: an uncompressed cpio (newc) archive written here,
//! laid out as the guest contract says (notes/team.md):
//!
//! ```text
//! /init                 viscum-vmcheck (static), PID 1
//! /bin/viscum           viscum (static)
//! /modules/NN-name.ko   decompressed kernel modules in load order
//! /dev/console          character device 5:1
//! /dev /proc /sys /tmp /run   empty mount points
//! ```
//!
//! Written in Rust rather than with the `cpio` tool because the kernel only
//! gives PID 1 a console if the archive holds `/dev/console`, and a device
//! node in a directory tree would need `mknod` on the host. Uncompressed
//! because decompressing tens of megabytes under TCG costs seconds per boot,
//! and the kernel unpacks a plain archive as fast as it copies it.

use std::{
    fs,
    io::{self, BufWriter, Write},
    path::Path,
};

use anyhow::{Context as _, Result};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// A streaming writer of the `newc` cpio format (the one the kernel reads).
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.entry(name, S_IFDIR | 0o755, 2, (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (mode & 0o7777), 1, (0, 0), data)
    }

    pub fn char_device(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (mode & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the `TRAILER!!!` entry and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    /// One entry: 110-byte ASCII header, name + NUL padded to 4 bytes, data
    /// padded to 4 bytes. Owner root, mtime 0 (reproducible archives).
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "cpio newc files are limited to 4 GiB",
            )
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0; 3][..n])
    }
}

/// Writes the initramfs for one VM to `path`; returns its size in bytes.
pub fn write(
    path: &Path,
    init: &Path,
    viscum: &Path,
    modules: &[std::path::PathBuf],
) -> Result<u64> {
    let file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut cpio = CpioWriter::new(BufWriter::new(file));
    let read = |p: &Path| fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    for dir in ["dev", "proc", "sys", "tmp", "run", "bin", "modules"] {
        cpio.dir(dir)?;
    }
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.file("init", 0o755, &read(init)?)?;
    cpio.file("bin/viscum", 0o755, &read(viscum)?)?;
    for module in modules {
        let name = module
            .file_name()
            .context("module path without file name")?
            .to_string_lossy();
        cpio.file(&format!("modules/{name}"), 0o644, &read(module)?)?;
    }
    cpio.finish()?
        .into_inner()
        .map_err(std::io::IntoInnerError::into_error)?
        .sync_all()?;
    Ok(fs::metadata(path)?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("dev").unwrap();
        w.char_device("/dev/console", 0o600, 5, 1).unwrap();
        w.file("init", 0o755, b"hello").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        // Header of "dev": ino 1, directory mode, namesize 4.
        assert!(text.starts_with("07070100000001000041ED"), "{text}");
        assert_eq!(&bytes[110..114], b"dev\0");
        // dev/console: mode 020600, rdev 5:1, leading '/' dropped.
        let console = text.find("dev/console\0").unwrap();
        let header = &text[console - 110..console];
        assert_eq!(&header[14..22], "00002180");
        assert_eq!(&header[78..94], "0000000500000001");
        // init: size 5, data padded to 4 bytes.
        let init = text.find("init\0").unwrap();
        let header = &text[init - 110..init];
        assert_eq!(&header[54..62], "00000005");
        assert!(text.contains("hello\0\0\0"));
        assert!(text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn cpio_tool_reads_it_when_installed() {
        if which::which("cpio").is_err() {
            return;
        }
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin").unwrap();
        w.file("bin/x", 0o755, b"abcdefg").unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        let bytes = w.finish().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("bin/x"), "{listing}");
        assert!(listing.contains("dev/console"), "{listing}");
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with("crw") && l.contains("5,")),
            "{listing}"
        );
    }
}
