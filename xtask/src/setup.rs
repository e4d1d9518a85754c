//! `cargo xtask setup`: install what building and testing Viscum needs.
//!
//! This is the recipe of `docs/toolchain.md`, verified on a fresh
//! Debian 12 machine: every step first checks whether its piece is already
//! there, so on a machine that has everything the whole thing is a quick
//! no-op (`build`, `run` and `test` call it every time).
//!
//! The VM kernel matrix needs more (qemu, Debian's cross gcc and C
//! libraries, rustup targets): [`ensure_vm`], which `cargo xtask setup`,
//! `vm` and `test` (without `--no-vm`) call, but `build` and `run` do not.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    process::{self, have},
    vm::matrix::Arch,
};

/// The nightly to install when there is none. The eBPF crate is built with
/// `rustup run nightly` (aya-build), and its LLVM major must match the one
/// bpf-linker was built against, so we pin a known-good date rather than the
/// moving channel (a newer nightly may be on LLVM 23).
const PINNED_NIGHTLY: &str = "nightly-2026-05-19";
/// The LLVM major shared by the nightly, `llvm-22-dev` and bpf-linker.
const LLVM_MAJOR: &str = "22";
/// bpf-linker 0.13 is the line built against LLVM 22 (`--features llvm-22`).
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_SERIES: &str = "0.13.";

/// A program found on `PATH` (or, for an absolute path, a file) and the
/// Debian package that provides it.
struct Tool {
    program: &'static str,
    package: &'static str,
    /// Missing required tools fail setup; missing optional ones only warn.
    required: bool,
}

/// What Debian must provide. `llvm-config-22` comes first: bpf-linker is
/// linked against that LLVM. The rest are what the integration tests and the
/// lab drive from the outside (the product itself never runs them).
const TOOLS: &[Tool] = &[
    // LLVM 22's shared library and `llvm-config-22`, which bpf-linker's build
    // asks for the library's location.
    Tool {
        program: "llvm-config-22",
        package: "llvm-22-dev",
        required: true,
    },
    Tool {
        program: "ip",
        package: "iproute2",
        required: true,
    },
    Tool {
        program: "nsenter",
        package: "util-linux",
        required: true,
    },
    Tool {
        program: "python3",
        package: "python3",
        required: true,
    },
    Tool {
        program: "iperf3",
        package: "iperf3",
        required: true,
    },
    Tool {
        program: "nft",
        package: "nftables",
        required: true,
    },
    Tool {
        program: "curl",
        package: "curl",
        required: true,
    },
    Tool {
        program: "socat",
        package: "socat",
        required: true,
    },
    // The fleet tests start their own JetStream servers (tests/tests/fleet_agent.rs).
    Tool {
        program: "nats-server",
        package: "nats-server",
        required: true,
    },
    // `cargo xtask test` checks the OpenWrt shell scripts under dist/ with it.
    Tool {
        program: "shellcheck",
        package: "shellcheck",
        required: true,
    },
    // The Debian package test (tests/tests/debian.rs): unpacks with dpkg, checks the unit
    // with systemd-analyze, and cargo-deb strips the binary with binutils' strip.
    Tool {
        program: "systemd-analyze",
        package: "systemd",
        required: true,
    },
    Tool {
        program: "strip",
        package: "binutils",
        required: true,
    },
    // Handy for looking at loaded programs and pinned maps; nothing needs it.
    Tool {
        program: "bpftool",
        package: "bpftool",
        required: false,
    },
];

/// Whether `tool` is there: on `PATH`, or for an absolute path, that file.
fn present(tool: &Tool) -> bool {
    if tool.program.starts_with('/') {
        Path::new(tool.program).exists()
    } else {
        have(tool.program)
    }
}

/// What the VM kernel matrix needs from Debian on this host: qemu for every
/// architecture of the matrix, a static C library (and, for foreign
/// architectures, Debian's cross gcc) to link the static guest binaries,
/// `depmod` to index the kernels' modules, `xz` to decompress 6.12's `.ko.xz`.
fn vm_tools() -> Vec<Tool> {
    let mut tools = Vec::new();
    for arch in Arch::ALL {
        tools.push(Tool {
            program: arch.qemu().0,
            package: arch.qemu_package(),
            required: true,
        });
        if let Some((gcc, package)) = arch.cross_gcc() {
            tools.push(Tool {
                program: gcc,
                package,
                required: true,
            });
        }
        let (libc, package) = arch.static_libc(Arch::host() == Some(arch));
        tools.push(Tool {
            program: libc,
            package,
            required: true,
        });
    }
    tools.extend([
        Tool {
            program: "depmod",
            package: "kmod",
            required: true,
        },
        Tool {
            program: "xz",
            package: "xz-utils",
            required: true,
        },
        Tool {
            program: "dpkg-deb",
            package: "dpkg",
            required: true,
        },
        // Only for looking into an initramfs (`cpio -t < target/vm/NAME/
        // initramfs.cpio` after `cargo xtask vm --keep`): xtask writes the
        // archive itself.
        Tool {
            program: "cpio",
            package: "cpio",
            required: false,
        },
    ]);
    tools
}

/// Options of `cargo xtask setup`.
#[derive(clap::Args)]
pub struct Options {
    /// Only report what is missing, change nothing; exit 1 if anything is missing.
    #[arg(long)]
    check: bool,
    /// Leave out what only the VM kernel matrix and the router cross builds need (qemu,
    /// cross toolchains, zig + cargo-zigbuild).
    #[arg(long)]
    no_vm: bool,
}

/// `cargo xtask setup`.
pub fn run(opts: &Options) -> Result<ExitCode> {
    if opts.check {
        let mut missing = check();
        if !opts.no_vm {
            missing.extend(check_vm());
            missing.extend(crate::cross::check());
        }
        if missing.is_empty() {
            println!("setup: nothing missing");
            return Ok(ExitCode::SUCCESS);
        }
        for item in &missing {
            println!("setup: missing: {item}");
        }
        return Ok(ExitCode::FAILURE);
    }
    ensure()?;
    if !opts.no_vm {
        ensure_vm()?;
        // qemu-user and zig + cargo-zigbuild: the router cross builds and their tests.
        crate::cross::ensure()?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Makes sure what the VM kernel matrix needs is installed (see [`vm_tools`]
/// and the rustup targets the VM guests need), installing what is missing.
pub fn ensure_vm() -> Result<()> {
    if Arch::host().is_none() {
        bail!(
            "the VM kernel matrix runs on x86_64, aarch64 or s390x hosts, not {}",
            std::env::consts::ARCH
        );
    }
    let mut did = ensure_packages(&vm_tools())?;
    let missing = missing_rust_targets()?;
    if !missing.is_empty() {
        println!(
            "setup: rustup targets for the VM guests are missing: {}",
            missing.join(" ")
        );
        process::run(
            Command::new("rustup")
                .current_dir(process::workspace_root())
                .args(["target", "add"])
                .args(&missing),
        )?;
        did = true;
    }
    if did {
        println!("setup: VM matrix tools done");
    } else {
        println!("setup: nothing to do for the VM matrix (qemu, cross gcc, rustup targets)");
    }
    Ok(())
}

/// What [`ensure_vm`] would install.
fn check_vm() -> Vec<String> {
    let mut missing: Vec<String> = vm_tools()
        .iter()
        .filter(|t| !present(t))
        .map(|t| {
            let kind = if t.required { "" } else { " (optional)" };
            format!("{} (Debian package {}){kind}", t.program, t.package)
        })
        .collect();
    match missing_rust_targets() {
        Ok(targets) => missing.extend(targets.into_iter().map(|t| format!("rustup target {t}"))),
        Err(e) => missing.push(format!("{e:#}")),
    }
    missing
}

/// Rust targets of the matrix's architectures the active toolchain lacks.
fn missing_rust_targets() -> Result<Vec<String>> {
    let installed = process::output(
        Command::new("rustup")
            .current_dir(process::workspace_root())
            .args(["target", "list", "--installed"]),
    )?;
    Ok(Arch::ALL
        .iter()
        .map(|a| a.rust_target())
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .map(str::to_owned)
        .collect())
}

/// Makes sure everything is installed, installing what is missing.
pub fn ensure() -> Result<()> {
    let mut did = false;
    did |= ensure_packages(TOOLS)?;
    did |= ensure_nightly()?;
    did |= ensure_bpf_linker()?;
    did |= crate::deb::ensure_cargo_deb()?;
    if did {
        println!("setup: done");
    } else {
        println!(
            "setup: nothing to do (nightly with LLVM {LLVM_MAJOR} + rust-src, llvm-config-{LLVM_MAJOR}, bpf-linker {BPF_LINKER_SERIES}x, test tools)"
        );
    }
    Ok(())
}

/// What `ensure` would install, without installing anything.
fn check() -> Vec<String> {
    let mut missing: Vec<String> = TOOLS
        .iter()
        .filter(|t| !present(t))
        .map(|t| {
            let kind = if t.required { "" } else { " (optional)" };
            format!("{} (Debian package {}){kind}", t.program, t.package)
        })
        .collect();
    match nightly_version() {
        Err(_) => missing.push(format!(
            "the nightly toolchain (would install {PINNED_NIGHTLY})"
        )),
        Ok(vv) => {
            if let Err(e) = check_llvm(&vv) {
                missing.push(format!("{e:#}"));
            }
            match has_rust_src() {
                Ok(true) => {}
                Ok(false) => missing.push("rust-src for the nightly toolchain".into()),
                Err(e) => missing.push(format!("{e:#}")),
            }
        }
    }
    match bpf_linker_version() {
        Some(v) if v.starts_with(BPF_LINKER_SERIES) => {}
        Some(v) => missing.push(format!("bpf-linker {BPF_LINKER_VERSION} (found {v})")),
        None => missing.push(format!("bpf-linker {BPF_LINKER_VERSION}")),
    }
    missing.extend(crate::deb::check_cargo_deb());
    missing
}

/// Installs the Debian packages of missing `tools`. Returns whether it did anything.
fn ensure_packages(tools: &[Tool]) -> Result<bool> {
    let missing: Vec<&Tool> = tools.iter().filter(|t| !present(t)).collect();
    if missing.is_empty() {
        return Ok(false);
    }
    let required: Vec<&str> = missing
        .iter()
        .filter(|t| t.required)
        .map(|t| t.package)
        .collect();
    let optional: Vec<&str> = missing
        .iter()
        .filter(|t| !t.required)
        .map(|t| t.package)
        .collect();
    if required.is_empty() {
        // Only nice-to-haves are missing. Trying apt-get for them on every
        // build would make every build slow on a machine where they cannot be
        // installed; they come along with the next required install (on a
        // fresh machine, the first setup).
        eprintln!(
            "warning: setup: optional {} missing (Debian: apt-get install -y {})",
            missing
                .iter()
                .map(|t| t.program)
                .collect::<Vec<_>>()
                .join(", "),
            optional.join(" ")
        );
        return Ok(false);
    }
    for t in &missing {
        let kind = if t.required { "" } else { ", optional" };
        println!(
            "setup: {} is missing (Debian package {}{kind})",
            t.program, t.package
        );
    }

    if !have("apt-get") {
        // Not a Debian-like system: we do not guess another package manager's
        // names, we say exactly what is needed.
        let what = |pkgs: &[&str]| {
            missing
                .iter()
                .filter(|t| pkgs.contains(&t.package))
                .map(|t| format!("`{}` ({} on Debian)", t.program, t.package))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !optional.is_empty() {
            eprintln!(
                "warning: setup: optional tools missing, install them if you want them: {}",
                what(&optional)
            );
        }
        bail!(
            "no apt-get on this system: install these yourself, then run `cargo xtask setup` again: {}",
            what(&required)
        );
    }
    if !process::is_root() {
        bail!(
            "installing Debian packages needs root: run `apt-get update && apt-get install -y {}` as root, \
             or run `cargo xtask setup` as root",
            missing
                .iter()
                .map(|t| t.package)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }

    // One `apt-get update`, only now that something must be installed: a
    // fresh machine's package lists may be empty or stale.
    process::run(apt().arg("update"))?;
    process::run(
        apt()
            .args(["install", "-y", "--no-install-recommends"])
            .args(&required),
    )?;
    if !optional.is_empty()
        && let Err(e) = process::run(
            apt()
                .args(["install", "-y", "--no-install-recommends"])
                .args(&optional),
        )
    {
        eprintln!("warning: setup: could not install optional packages (carrying on): {e:#}");
    }
    // A package can install fine yet put its program somewhere off PATH.
    let still: Vec<&str> = tools
        .iter()
        .filter(|t| t.required && !present(t))
        .map(|t| t.program)
        .collect();
    if !still.is_empty() {
        bail!(
            "still not on PATH after apt-get install: {}",
            still.join(", ")
        );
    }
    Ok(true)
}

/// `apt-get` that never stops to ask a question (CI has no stdin).
fn apt() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// Makes sure a `nightly` toolchain with LLVM 22 and `rust-src` exists.
/// Returns whether it installed anything.
fn ensure_nightly() -> Result<bool> {
    if !have("rustup") {
        bail!(
            "rustup is not on PATH: the eBPF crate is built with `rustup run nightly` (aya-build)"
        );
    }
    let mut did = false;
    let vv = match nightly_version() {
        Ok(vv) => vv,
        Err(_) => {
            println!("setup: no nightly toolchain; installing the known-good {PINNED_NIGHTLY}");
            install_pinned_nightly()?;
            did = true;
            nightly_version()
                .context("the nightly toolchain still does not run after installing it")?
        }
    };
    check_llvm(&vv)?;
    if !has_rust_src()? {
        println!("setup: rust-src is missing for nightly (needed for -Z build-std=core)");
        process::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        did = true;
    }
    Ok(did)
}

/// `rustc -vV` of the toolchain aya-build uses.
///
/// `rustup run` (unlike `rustc +nightly`) never installs a missing toolchain
/// behind our back, so a failure here reliably means "no nightly".
fn nightly_version() -> Result<String> {
    process::output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))
}

/// Fails, saying what to do, unless the nightly is on LLVM 22.
fn check_llvm(rustc_vv: &str) -> Result<()> {
    let llvm = rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .unwrap_or("unknown");
    if llvm.split('.').next() != Some(LLVM_MAJOR) {
        bail!(
            "the `nightly` toolchain is on LLVM {llvm}, but bpf-linker {BPF_LINKER_VERSION} reads LLVM {LLVM_MAJOR} bitcode only; \
             install the known-good nightly instead: `rustup toolchain install {PINNED_NIGHTLY} --profile minimal --component rust-src` \
             and make `nightly` that toolchain (remove the other one with `rustup toolchain uninstall nightly`, then run `cargo xtask setup`)"
        );
    }
    Ok(())
}

fn has_rust_src() -> Result<bool> {
    let installed = process::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    Ok(installed
        .lines()
        .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src-")))
}

/// Installs the pinned nightly and makes `nightly` resolve to it.
///
/// aya-build runs `rustup run nightly`, so a toolchain named by its date is
/// not enough. rustup refuses `toolchain link nightly` (a channel name), so
/// we point `toolchains/nightly-<host>` at the dated directory: rustup finds
/// toolchains by directory name, so `rustup run nightly` and `rustup component
/// ... --toolchain nightly` then use the dated one (verified with rustup 1.29).
fn install_pinned_nightly() -> Result<()> {
    process::run(Command::new("rustup").args([
        "toolchain",
        "install",
        PINNED_NIGHTLY,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
        // Never replace the machine's rustup as a side effect: where
        // auto-self-update is not disabled, `toolchain install` would fetch
        // whatever rustup the dist server offers (possibly an older one).
        "--no-self-update",
    ]))?;
    let host = process::output(Command::new("rustc").arg("-vV"))?
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("`rustc -vV` prints no host triple")?;
    let home =
        PathBuf::from(process::output(Command::new("rustup").args(["show", "home"]))?.trim());
    let toolchains = home.join("toolchains");
    let dated = format!("{PINNED_NIGHTLY}-{host}");
    let channel = toolchains.join(format!("nightly-{host}"));
    if fs::symlink_metadata(&channel).is_ok() {
        bail!(
            "{} exists but `rustup run nightly` fails: repair or remove it",
            channel.display()
        );
    }
    println!("+ ln -s {dated} {}", channel.display());
    std::os::unix::fs::symlink(&dated, &channel)
        .with_context(|| format!("cannot link {} to {dated}", channel.display()))?;
    Ok(())
}

/// The version bpf-linker reports (`bpf-linker 0.13.0` -> `0.13.0`), if it runs.
fn bpf_linker_version() -> Option<String> {
    let out = process::capture(Command::new("bpf-linker").arg("--version")).ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

/// Makes sure bpf-linker 0.13 (built against LLVM 22) is installed.
fn ensure_bpf_linker() -> Result<bool> {
    match bpf_linker_version() {
        Some(v) if v.starts_with(BPF_LINKER_SERIES) => return Ok(false),
        Some(v) => {
            println!(
                "setup: bpf-linker {v} found, {BPF_LINKER_VERSION} needed (LLVM {LLVM_MAJOR})"
            );
        }
        None => println!("setup: bpf-linker is missing"),
    }
    // bpf-linker's build finds LLVM through LLVM_PREFIX; without it the link
    // fails with `unable to find library -lLLVM`.
    let prefix =
        process::output(Command::new(format!("llvm-config-{LLVM_MAJOR}")).arg("--prefix"))?;
    process::run(
        process::cargo()
            .env("LLVM_PREFIX", prefix.trim())
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{LLVM_MAJOR}")]),
    )?;
    match bpf_linker_version() {
        Some(v) if v.starts_with(BPF_LINKER_SERIES) => Ok(true),
        other => bail!(
            "bpf-linker still reports {other:?} after `cargo install`: is ~/.cargo/bin first on PATH?"
        ),
    }
}
