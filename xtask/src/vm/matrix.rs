//! The VMs of the matrix (`tests/vm/kernels.toml`) and what follows from each
//! one's architecture: qemu machine, console, Rust target, cross linker.

use std::{fmt, fs, path::Path};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

/// The guest is killed and reported as hung after this long unless the VM
/// sets `timeout_s`. Under TCG a large program takes about a minute to verify
/// (a failed load about two), and the runner loads two programs and runs its
/// cases against them.
pub const DEFAULT_TIMEOUT_S: u64 = 900;

/// An architecture of the matrix, named as Debian names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Amd64,
    Arm64,
    S390x,
}

impl Arch {
    pub const ALL: [Arch; 3] = [Arch::Amd64, Arch::Arm64, Arch::S390x];

    /// Debian's name (`dpkg --print-architecture`, apt's `pkg:arch`).
    pub fn deb(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
            Arch::S390x => "s390x",
        }
    }

    /// The Rust target the static guest binaries are built for.
    pub fn rust_target(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
            Arch::S390x => "s390x-unknown-linux-gnu",
        }
    }

    /// The GNU triple prefix of Debian's cross toolchain (`<prefix>-gcc`).
    pub fn gnu_triple(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-linux-gnu",
            Arch::Arm64 => "aarch64-linux-gnu",
            Arch::S390x => "s390x-linux-gnu",
        }
    }

    /// The static C library a `crt-static` link needs, and its Debian
    /// package: the native one on a host of this architecture, else the cross one.
    pub fn static_libc(self, native: bool) -> (&'static str, &'static str) {
        match (self, native) {
            (Arch::Amd64, true) => ("/usr/lib/x86_64-linux-gnu/libc.a", "libc6-dev"),
            (Arch::Arm64, true) => ("/usr/lib/aarch64-linux-gnu/libc.a", "libc6-dev"),
            (Arch::S390x, true) => ("/usr/lib/s390x-linux-gnu/libc.a", "libc6-dev"),
            (Arch::Amd64, false) => ("/usr/x86_64-linux-gnu/lib/libc.a", "libc6-dev-amd64-cross"),
            (Arch::Arm64, false) => ("/usr/aarch64-linux-gnu/lib/libc.a", "libc6-dev-arm64-cross"),
            (Arch::S390x, false) => ("/usr/s390x-linux-gnu/lib/libc.a", "libc6-dev-s390x-cross"),
        }
    }

    /// The cross gcc and its Debian package (`None` on a host of this architecture).
    pub fn cross_gcc(self) -> Option<(&'static str, &'static str)> {
        if Arch::host() == Some(self) {
            return None;
        }
        Some(match self {
            Arch::Amd64 => ("x86_64-linux-gnu-gcc", "gcc-x86-64-linux-gnu"),
            Arch::Arm64 => ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
            Arch::S390x => ("s390x-linux-gnu-gcc", "gcc-s390x-linux-gnu"),
        })
    }

    /// `uname -m` inside the guest.
    pub fn uname_machine(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64",
            Arch::Arm64 => "aarch64",
            Arch::S390x => "s390x",
        }
    }

    pub fn big_endian(self) -> bool {
        self == Arch::S390x
    }

    /// ELF `e_machine` of this architecture's executables.
    pub fn elf_machine(self) -> u16 {
        match self {
            Arch::Amd64 => 62,  // EM_X86_64
            Arch::Arm64 => 183, // EM_AARCH64
            Arch::S390x => 22,  // EM_S390
        }
    }

    /// The qemu program and its machine arguments.
    ///
    /// arm64 uses `-cpu cortex-a57`: `-cpu max` boots about five times slower
    /// under TCG because it emulates pointer authentication (measured:
    /// 37 s against 7.8 s, docs/kernel-matrix.md).
    pub fn qemu(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Arch::Amd64 => ("qemu-system-x86_64", &[]),
            Arch::Arm64 => ("qemu-system-aarch64", &["-M", "virt", "-cpu", "cortex-a57"]),
            Arch::S390x => ("qemu-system-s390x", &["-M", "s390-ccw-virtio"]),
        }
    }

    /// The Debian package that provides [`Arch::qemu`]'s program.
    pub fn qemu_package(self) -> &'static str {
        match self {
            Arch::Amd64 => "qemu-system-x86",
            Arch::Arm64 => "qemu-system-arm",
            Arch::S390x => "qemu-system-misc",
        }
    }

    /// The kernel console qemu's `-nographic` connects to stdio.
    pub fn console(self) -> &'static str {
        match self {
            Arch::Amd64 => "ttyS0",
            Arch::Arm64 => "ttyAMA0",
            Arch::S390x => "ttysclp0",
        }
    }

    /// The architecture of the machine xtask runs on, if it is one of ours.
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::Amd64),
            "aarch64" => Some(Arch::Arm64),
            "s390x" => Some(Arch::S390x),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.deb())
    }
}

/// One VM of the matrix: a `[[vm]]` of `tests/vm/kernels.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub name: String,
    pub arch: Arch,
    /// Package name patterns, `*` = digits (see [`crate::vm::kernels::select_newest`]).
    pub packages: Vec<String>,
    /// Seconds before the guest counts as hung; [`DEFAULT_TIMEOUT_S`] if absent.
    pub timeout_s: Option<u64>,
    /// What this VM proves; shown in `cargo xtask vm --list`.
    #[serde(default)]
    pub why: String,
}

impl Vm {
    pub fn timeout_s(&self) -> u64 {
        self.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KernelsFile {
    vm: Vec<Vm>,
}

/// Reads the matrix from `tests/vm/kernels.toml` (path given).
pub fn load(path: &Path) -> Result<Vec<Vm>> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&text).with_context(|| format!("in {}", path.display()))
}

fn parse(text: &str) -> Result<Vec<Vm>> {
    let file: KernelsFile = toml::from_str(text)?;
    for (i, vm) in file.vm.iter().enumerate() {
        if vm.packages.is_empty() {
            bail!("VM {} has no package patterns", vm.name);
        }
        if vm.name.is_empty() || vm.name.chars().any(|c| c.is_whitespace() || c == '/') {
            bail!(
                "VM name {:?} must be non-empty, without spaces or '/'",
                vm.name
            );
        }
        if file.vm[..i].iter().any(|other| other.name == vm.name) {
            bail!("VM {} is listed twice", vm.name);
        }
    }
    Ok(file.vm)
}

/// The VMs named in `wanted` (all when it is empty), in matrix order.
pub fn select(all: Vec<Vm>, wanted: &[String]) -> Result<Vec<Vm>> {
    if let Some(unknown) = wanted.iter().find(|w| !all.iter().any(|vm| &vm.name == *w)) {
        bail!(
            "no VM named {unknown} in tests/vm/kernels.toml (there are: {})",
            all.iter()
                .map(|vm| vm.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(all
        .into_iter()
        .filter(|vm| wanted.is_empty() || wanted.contains(&vm.name))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_matrix_parses() {
        let vms = load(&crate::process::workspace_root().join("tests/vm/kernels.toml")).unwrap();
        let names: Vec<_> = vms.iter().map(|vm| vm.name.as_str()).collect();
        assert!(names.contains(&"debian-6.1-amd64"));
        assert!(names.contains(&"debian-6.1-s390x"));
        assert!(vms.iter().any(|vm| vm.arch == Arch::S390x));
    }

    #[test]
    fn rejects_duplicates_and_unknown_names() {
        let text = r#"
            [[vm]]
            name = "a"
            arch = "arm64"
            packages = ["x-*"]
            [[vm]]
            name = "a"
            arch = "amd64"
            packages = ["y-*"]
        "#;
        assert!(parse(text).unwrap_err().to_string().contains("twice"));
        let vms = parse(&text.replacen("\"a\"", "\"b\"", 1)).unwrap();
        assert_eq!(select(vms.clone(), &["a".into()]).unwrap().len(), 1);
        assert!(select(vms, &["c".into()]).is_err());
    }
}
