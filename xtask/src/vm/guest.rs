//! The two static guest binaries, cross-built for every architecture of the
//! matrix: `viscum` (package viscum-user) and `viscum-vmcheck` (package
//! viscum-tests, the guest runner that is PID 1).
//!
//! One `cargo build` with one `--target` per architecture, configured only
//! through the environment of that command (nothing in `.cargo/config.toml`):
//!
//! - `CARGO_TARGET_<T>_RUSTFLAGS=-C target-feature=+crt-static`: static glibc
//!   binaries, so the initramfs needs no libraries.
//! - `CARGO_TARGET_<T>_LINKER` and `CC_<t>`: Debian's cross gcc
//!   (`aarch64-linux-gnu-gcc`, `s390x-linux-gnu-gcc`) for foreign targets.
//! - A build profile `vmguest` defined through `CARGO_PROFILE_VMGUEST_*`:
//!   the dev profile (debug assertions, overflow checks, `panic = "unwind"` so
//!   the runner can catch a panic) without debug info, stripped, not
//!   incremental: much smaller binaries (a smaller initramfs to load under
//!   TCG) and a faster clean build than either `dev` or the LTO `release`
//!   profile. Its own profile directory also keeps these builds from
//!   invalidating the host's `target/debug`.
//!
//! `viscum-user/build.rs` (aya-build) builds the eBPF object for `bpfeb` when
//! the target is big-endian; [`build`] checks that the object it embedded has
//! the target's byte order and that it is inside the binary.

use std::{
    collections::HashMap,
    env,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use super::matrix::Arch;
use crate::process;

/// The cargo profile of the guest binaries (see the module docs).
pub const PROFILE: &str = "vmguest";

/// The binaries that go into one architecture's initramfs.
#[derive(Clone, Debug)]
pub struct GuestBins {
    pub viscum: PathBuf,
    /// `None` when a stand-in init replaces the runner (`--guest-init`).
    pub vmcheck: Option<PathBuf>,
}

/// Cross-builds the guest binaries for `arches` and checks them.
/// Without `vmcheck`, only `viscum` is built (a stand-in init replaces the runner).
pub fn build(arches: &[Arch], vmcheck: bool) -> Result<HashMap<Arch, GuestBins>> {
    let started = Instant::now();
    let mut cmd = process::cargo();
    cmd.args([
        "build",
        "--profile",
        PROFILE,
        "-p",
        "viscum-user",
        "--bin",
        "viscum",
    ]);
    if vmcheck {
        cmd.args(["-p", "viscum-tests", "--bin", "viscum-vmcheck"]);
    }
    for arch in arches {
        cmd.args(["--target", arch.rust_target()]);
    }
    cmd.arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped());
    configure_env(&mut cmd, arches);
    println!("+ {}", process::display(&cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", process::display(&cmd)))?;
    let stdout = child.stdout.take().expect("stdout is piped");

    let mut viscum: HashMap<Arch, PathBuf> = HashMap::new();
    let mut runner: HashMap<Arch, PathBuf> = HashMap::new();
    let mut out_dirs: HashMap<Arch, PathBuf> = HashMap::new();
    let arch_of = |path: &str| {
        arches
            .iter()
            .copied()
            .find(|a| path.contains(&format!("/{}/", a.rust_target())))
    };
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            println!("{line}");
            continue;
        };
        let manifest = msg["manifest_path"].as_str().unwrap_or_default();
        match msg["reason"].as_str() {
            Some("compiler-artifact") => {
                let Some(exe) = msg["executable"].as_str() else {
                    continue;
                };
                let Some(arch) = arch_of(exe) else { continue };
                let name = msg["target"]["name"].as_str().unwrap_or_default();
                if name == "viscum" && manifest.ends_with("viscum-user/Cargo.toml") {
                    viscum.insert(arch, exe.into());
                } else if name == "viscum-vmcheck" {
                    runner.insert(arch, exe.into());
                }
            }
            Some("build-script-executed") => {
                let package = msg["package_id"].as_str().unwrap_or_default();
                let Some(out_dir) = msg["out_dir"].as_str() else {
                    continue;
                };
                if package.contains("viscum-user")
                    && let Some(arch) = arch_of(out_dir)
                {
                    out_dirs.insert(arch, out_dir.into());
                }
            }
            _ => {}
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("`{}` failed ({status})", process::display(&cmd));
    }

    let mut bins = HashMap::new();
    for &arch in arches {
        let viscum = viscum
            .remove(&arch)
            .with_context(|| format!("cargo built no viscum for {}", arch.rust_target()))?;
        check_static_executable(&viscum, arch)?;
        let vmcheck = if vmcheck {
            let path = runner.remove(&arch).with_context(|| {
                format!("cargo built no viscum-vmcheck for {}", arch.rust_target())
            })?;
            check_static_executable(&path, arch)?;
            Some(path)
        } else {
            None
        };
        let out_dir = out_dirs.remove(&arch).with_context(|| {
            format!(
                "cargo reported no build-script OUT_DIR of viscum-user for {}",
                arch.rust_target()
            )
        })?;
        check_embedded_object(&out_dir.join("viscum"), &viscum, arch)?;
        bins.insert(arch, GuestBins { viscum, vmcheck });
    }
    println!(
        "vm: guest binaries for {} built and checked in {:.0?}",
        arches
            .iter()
            .map(|a| a.rust_target())
            .collect::<Vec<_>>()
            .join(", "),
        started.elapsed()
    );
    Ok(bins)
}

/// Sets the per-target and profile variables described in the module docs.
fn configure_env(cmd: &mut std::process::Command, arches: &[Arch]) {
    for (key, value) in [
        ("INHERITS", "dev"),
        ("DEBUG", "false"),
        ("STRIP", "true"),
        ("INCREMENTAL", "false"),
    ] {
        cmd.env(format!("CARGO_PROFILE_VMGUEST_{key}"), value);
    }
    // These would override the per-target flags, and the binaries must be static.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        if env::var_os(var).is_some() {
            eprintln!("vm: note: ignoring {var} for the static guest builds");
            cmd.env_remove(var);
        }
    }
    for &arch in arches {
        let upper = arch.rust_target().to_uppercase().replace('-', "_");
        let lower = arch.rust_target().replace('-', "_");
        cmd.env(
            format!("CARGO_TARGET_{upper}_RUSTFLAGS"),
            "-C target-feature=+crt-static",
        );
        if Some(arch) != Arch::host() {
            let gcc = format!("{}-gcc", arch.gnu_triple());
            cmd.env(format!("CARGO_TARGET_{upper}_LINKER"), &gcc);
            cmd.env(format!("CC_{lower}"), &gcc);
        }
    }
}

/// The parts of an ELF header this module checks.
#[derive(Debug, PartialEq, Eq)]
pub struct ElfInfo {
    pub big_endian: bool,
    pub class64: bool,
    /// `e_type`: 1 relocatable, 2 executable, 3 shared object (also PIE).
    pub kind: u16,
    pub machine: u16,
    /// Has a `PT_INTERP` program header (needs a dynamic loader).
    pub interp: bool,
}

/// Reads the ELF header (and, for 64-bit files, the program headers) of `bytes`.
pub fn elf_info(bytes: &[u8]) -> Result<ElfInfo> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        bail!("not an ELF file");
    }
    let class64 = match bytes[4] {
        1 => false,
        2 => true,
        c => bail!("bad ELF class {c}"),
    };
    let big_endian = match bytes[5] {
        1 => false,
        2 => true,
        d => bail!("bad ELF data encoding {d}"),
    };
    let u16_at = |off: usize| -> u16 {
        let b = [bytes[off], bytes[off + 1]];
        if big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    };
    let u32_at = |off: usize| -> Option<u32> {
        let b: [u8; 4] = bytes.get(off..off + 4)?.try_into().ok()?;
        Some(if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    };
    let u64_at = |off: usize| -> Option<u64> {
        let b: [u8; 8] = bytes.get(off..off + 8)?.try_into().ok()?;
        Some(if big_endian {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        })
    };
    let kind = u16_at(16);
    let machine = u16_at(18);
    let mut interp = false;
    if class64 {
        let phoff = u64_at(32).context("truncated ELF header")? as usize;
        let phentsize = u16_at(54) as usize;
        let phnum = u16_at(56) as usize;
        for i in 0..phnum {
            // PT_INTERP = 3
            if u32_at(phoff + i * phentsize).context("truncated program headers")? == 3 {
                interp = true;
            }
        }
    }
    Ok(ElfInfo {
        big_endian,
        class64,
        kind,
        machine,
        interp,
    })
}

/// Fails unless `path` is a static 64-bit executable for `arch`.
fn check_static_executable(path: &Path, arch: Arch) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let info = elf_info(&bytes).with_context(|| path.display().to_string())?;
    let problem = if info.machine != arch.elf_machine() {
        Some(format!(
            "ELF machine {} instead of {}",
            info.machine,
            arch.elf_machine()
        ))
    } else if info.big_endian != arch.big_endian() || !info.class64 {
        Some("wrong ELF class or byte order".to_owned())
    } else if info.interp || !matches!(info.kind, 2 | 3) {
        Some("not a static executable (it asks for a dynamic loader)".to_owned())
    } else {
        None
    };
    if let Some(problem) = problem {
        bail!("{}: {problem}", path.display());
    }
    Ok(())
}

/// Fails unless `object` (the eBPF object aya-build made) is a BPF ELF in
/// `arch`'s byte order and is embedded byte for byte in `binary`.
fn check_embedded_object(object: &Path, binary: &Path, arch: Arch) -> Result<()> {
    const EM_BPF: u16 = 247;
    let obj = std::fs::read(object).with_context(|| {
        format!(
            "cannot read the eBPF object aya-build made: {}",
            object.display()
        )
    })?;
    let info = elf_info(&obj).with_context(|| object.display().to_string())?;
    if info.machine != EM_BPF {
        bail!(
            "{}: ELF machine {} is not BPF",
            object.display(),
            info.machine
        );
    }
    if info.big_endian != arch.big_endian() {
        bail!(
            "{}: a {} eBPF object for the {} target {}: the kernel would refuse it",
            object.display(),
            if info.big_endian {
                "big-endian"
            } else {
                "little-endian"
            },
            if arch.big_endian() {
                "big-endian"
            } else {
                "little-endian"
            },
            arch.rust_target()
        );
    }
    let bin = std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    if !contains(&bin, &obj) {
        bail!(
            "{} does not embed the eBPF object {} (stale build?)",
            binary.display(),
            object.display()
        );
    }
    println!(
        "vm: {}: embeds a {} eBPF object ({} bytes, {})",
        arch.rust_target(),
        if info.big_endian {
            "big-endian (bpfeb)"
        } else {
            "little-endian (bpfel)"
        },
        obj.len(),
        object.display()
    );
    Ok(())
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    let probe = &needle[..needle.len().min(64)];
    haystack
        .windows(probe.len())
        .enumerate()
        .filter(|(_, w)| *w == probe)
        .any(|(i, _)| haystack.get(i..i + needle.len()) == Some(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal 64-bit ELF header (+ one program header) of the given byte order.
    fn elf(big: bool, machine: u16, kind: u16, pt: u32) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = if big { 2 } else { 1 };
        let put16 = |b: &mut Vec<u8>, off: usize, v: u16| {
            let bytes = if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            b[off..off + 2].copy_from_slice(&bytes);
        };
        put16(&mut b, 16, kind);
        put16(&mut b, 18, machine);
        let phoff = if big {
            64u64.to_be_bytes()
        } else {
            64u64.to_le_bytes()
        };
        b[32..40].copy_from_slice(&phoff);
        put16(&mut b, 54, 56);
        put16(&mut b, 56, 1);
        let pt = if big {
            pt.to_be_bytes()
        } else {
            pt.to_le_bytes()
        };
        b[64..68].copy_from_slice(&pt);
        b
    }

    #[test]
    fn reads_both_byte_orders() {
        let be = elf_info(&elf(true, 247, 1, 1)).unwrap();
        assert!(be.big_endian && be.class64);
        assert_eq!((be.machine, be.kind, be.interp), (247, 1, false));
        let le = elf_info(&elf(false, 62, 3, 3)).unwrap();
        assert!(!le.big_endian);
        assert_eq!((le.machine, le.kind, le.interp), (62, 3, true));
        assert!(elf_info(b"#!/bin/sh\n").is_err());
    }

    #[test]
    fn finds_embedded_bytes() {
        let obj: Vec<u8> = (0..200u8).collect();
        let mut bin = vec![7u8; 1000];
        bin.extend_from_slice(&obj);
        bin.extend_from_slice(&[9; 10]);
        assert!(contains(&bin, &obj));
        let mut other = obj.clone();
        other[150] = 0;
        assert!(!contains(&bin, &other));
    }
}
