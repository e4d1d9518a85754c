//! Checks of a built `viscum` binary, read from its ELF headers: that it is for the target's
//! machine and byte order, statically linked (no program interpreter), and that the eBPF
//! object it embeds has the target's byte order (a big-endian kernel cannot use `bpfel`).

use std::{fmt, path::Path};

use anyhow::{Context as _, Result, bail};

use crate::cross::Target;

const EM_MIPS: u16 = 8;
const EM_ARM: u16 = 40;
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
const EM_BPF: u16 = 247;
const PT_INTERP: u32 = 3;
const ET_DYN: u16 = 3;

/// What [`check`] found.
#[derive(Debug)]
pub struct Facts {
    pub bytes: u64,
    /// `true` for a static PIE (ET_DYN without an interpreter).
    pub pie: bool,
    /// Embedded eBPF objects found, all of the target's byte order.
    pub bpf_objects: usize,
    pub big_endian: bool,
}

impl fmt::Display for Facts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes, {:.2} MiB, {}, {}-endian, embedded eBPF object: {} ({} found)",
            self.bytes,
            self.bytes as f64 / 1024.0 / 1024.0,
            if self.pie { "static PIE" } else { "static" },
            if self.big_endian { "big" } else { "little" },
            if self.big_endian { "bpfeb" } else { "bpfel" },
            self.bpf_objects
        )
    }
}

/// One ELF header, read in its own byte order.
struct Header {
    wide: bool,
    big: bool,
    e_type: u16,
    machine: u16,
    phoff: usize,
    phentsize: usize,
    phnum: usize,
}

fn u16_at(b: &[u8], o: usize, big: bool) -> Option<u16> {
    let a = [*b.get(o)?, *b.get(o + 1)?];
    Some(if big {
        u16::from_be_bytes(a)
    } else {
        u16::from_le_bytes(a)
    })
}

fn u32_at(b: &[u8], o: usize, big: bool) -> Option<u32> {
    let a: [u8; 4] = b.get(o..o + 4)?.try_into().ok()?;
    Some(if big {
        u32::from_be_bytes(a)
    } else {
        u32::from_le_bytes(a)
    })
}

fn u64_at(b: &[u8], o: usize, big: bool) -> Option<u64> {
    let a: [u8; 8] = b.get(o..o + 8)?.try_into().ok()?;
    Some(if big {
        u64::from_be_bytes(a)
    } else {
        u64::from_le_bytes(a)
    })
}

fn header(b: &[u8]) -> Option<Header> {
    if b.get(..4)? != b"\x7fELF" {
        return None;
    }
    let wide = match b.get(4)? {
        1 => false,
        2 => true,
        _ => return None,
    };
    let big = match b.get(5)? {
        1 => false,
        2 => true,
        _ => return None,
    };
    let (phoff, phentsize, phnum) = if wide {
        (
            usize::try_from(u64_at(b, 0x20, big)?).ok()?,
            u16_at(b, 0x36, big)?,
            u16_at(b, 0x38, big)?,
        )
    } else {
        (
            u32_at(b, 0x1c, big)? as usize,
            u16_at(b, 0x2a, big)?,
            u16_at(b, 0x2c, big)?,
        )
    };
    Some(Header {
        wide,
        big,
        e_type: u16_at(b, 16, big)?,
        machine: u16_at(b, 18, big)?,
        phoff,
        phentsize: phentsize.into(),
        phnum: phnum.into(),
    })
}

fn machine(triple: &str) -> Option<u16> {
    Some(match triple.split('-').next()? {
        "x86_64" => EM_X86_64,
        "aarch64" => EM_AARCH64,
        a if a.starts_with("arm") => EM_ARM,
        "mips" | "mipsel" => EM_MIPS,
        _ => return None,
    })
}

/// Checks the binary at `path` built for `target`; the error names what is wrong.
pub fn check(path: &Path, target: Target) -> Result<Facts> {
    let b = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let h = header(&b).with_context(|| format!("{} is not an ELF file", path.display()))?;
    let want = machine(target.triple).context("no ELF machine known for this target")?;
    if h.machine != want {
        bail!(
            "{} is for ELF machine {}, not {} ({})",
            path.display(),
            h.machine,
            want,
            target.triple
        );
    }
    if h.big != target.big_endian {
        bail!(
            "{} is {}-endian, {} is not",
            path.display(),
            if h.big { "big" } else { "little" },
            target.triple
        );
    }
    let wide_ok = h.wide == matches!(want, EM_X86_64 | EM_AARCH64);
    if !wide_ok {
        bail!(
            "{}: unexpected ELF class for {}",
            path.display(),
            target.triple
        );
    }
    for i in 0..h.phnum {
        let ty = u32_at(&b, h.phoff + i * h.phentsize, h.big)
            .context("program headers run past the end of the file")?;
        if ty == PT_INTERP {
            bail!(
                "{} has a program interpreter: it is dynamically linked, not static",
                path.display()
            );
        }
    }
    let (bpf, wrong) = embedded_bpf(&b, target.big_endian);
    if wrong > 0 {
        bail!(
            "{} embeds {wrong} eBPF object(s) of the wrong byte order (want {})",
            path.display(),
            if target.big_endian { "bpfeb" } else { "bpfel" }
        );
    }
    if bpf == 0 {
        bail!("{} embeds no eBPF object", path.display());
    }
    Ok(Facts {
        bytes: b.len() as u64,
        pie: h.e_type == ET_DYN,
        bpf_objects: bpf,
        big_endian: h.big,
    })
}

/// Embedded eBPF ELF objects (EM_BPF, read in each object's own byte order) after the
/// file's own header: (count of `big`'s byte order, count of the other).
fn embedded_bpf(b: &[u8], big: bool) -> (usize, usize) {
    let (mut right, mut wrong) = (0, 0);
    let mut at = 1;
    while let Some(i) = b[at..].windows(4).position(|w| w == b"\x7fELF") {
        let start = at + i;
        if let Some(h) = header(&b[start..])
            && h.wide
            && h.machine == EM_BPF
        {
            if h.big == big {
                right += 1;
            } else {
                wrong += 1;
            }
        }
        at = start + 4;
    }
    (right, wrong)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal 64-bit ELF header of `machine` in the given byte order.
    fn elf64(machine: u16, big: bool) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = if big { 2 } else { 1 };
        let m = if big {
            machine.to_be_bytes()
        } else {
            machine.to_le_bytes()
        };
        h[18..20].copy_from_slice(&m);
        h
    }

    #[test]
    fn finds_embedded_objects_by_byte_order() {
        let mut file = elf64(EM_X86_64, false);
        file.extend(b"padding");
        file.extend(elf64(EM_BPF, true));
        file.extend(elf64(EM_X86_64, true)); // not eBPF: ignored
        assert_eq!(embedded_bpf(&file, true), (1, 0));
        assert_eq!(embedded_bpf(&file, false), (0, 1));
    }

    #[test]
    fn machines() {
        assert_eq!(machine("armv7-unknown-linux-musleabi"), Some(EM_ARM));
        assert_eq!(machine("mipsel-unknown-linux-musl"), Some(EM_MIPS));
    }
}
