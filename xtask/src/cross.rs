//! Cross builds of `viscum` for routers: the six release targets, the toolchain that links
//! them, and the `cargo` command that builds for one of them.
//!
//! # Toolchain
//!
//! Every target links with [cargo-zigbuild], which uses `zig cc` as the C compiler and
//! linker: zig carries musl's sources and builds the C library, start files and libunwind
//! for any of our targets itself, so no per-architecture sysroot is needed. That matters for
//! the tier-3 MIPS targets, whose musl neither rustup nor Debian 12 ships (Debian has
//! `gcc-mips-linux-gnu`, but no MIPS musl). Both come from PyPI as prebuilt wheels
//! (`ziglang`, `cargo-zigbuild`), pinned, into one virtualenv under the user's cache
//! directory ([`tools_dir`]); [`ensure`] makes it and is a quick no-op once it exists.
//!
//! Rust's standard library: prebuilt (`rustup target add`) for the tier-2 targets when the
//! rustup server has it; otherwise, and always for tier 3, built from source with the
//! pinned nightly's `rust-src` (`-Z build-std`, see [`Std`]).
//!
//! # Flags (why)
//!
//! * `+crt-static` everywhere: one self-contained file per target (the MIPS targets'
//!   default is dynamic, as OpenWrt links its own packages).
//! * MIPS: `-C relocation-model=static`. The default static-PIE binary crashed at thread
//!   start under qemu-user (a trial build); a plain static executable does not.
//! * std built from source: `-C link-self-contained=no` (zig, not rustc, supplies musl's
//!   start files).
//!
//! [cargo-zigbuild]: https://github.com/rust-cross/cargo-zigbuild

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::process;

/// `ziglang` wheel on PyPI (zig itself): the version these builds were verified with.
pub const ZIG_VERSION: &str = "0.15.2";
/// `cargo-zigbuild` wheel on PyPI.
pub const ZIGBUILD_VERSION: &str = "0.24.0";

/// How a target's standard library is had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Std {
    /// Tier 2: `rustup target add`; falls back to [`Std::Build`] when the rustup server has
    /// no `rust-std` for it.
    Prebuilt,
    /// Tier 3: no prebuilt std exists; `-Z build-std` with the nightly's `rust-src`.
    Build,
}

/// One release target.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub triple: &'static str,
    /// qemu-user program that runs its binaries on another host (Debian `qemu-user`).
    pub qemu: &'static str,
    pub std: Std,
    pub big_endian: bool,
    /// Extra `rustc` flags for this target (besides `+crt-static`), with the reason in
    /// the module docs.
    pub rustflags: &'static [&'static str],
    /// What it runs on, for the docs and messages.
    pub boards: &'static str,
}

/// The release targets (issue #10), in the order `--all` builds them.
pub const TARGETS: &[Target] = &[
    Target {
        triple: "x86_64-unknown-linux-musl",
        qemu: "qemu-x86_64",
        std: Std::Prebuilt,
        big_endian: false,
        rustflags: &[],
        boards: "x86-64 edge boxes, OpenWrt x86/64",
    },
    Target {
        triple: "aarch64-unknown-linux-musl",
        qemu: "qemu-aarch64",
        std: Std::Prebuilt,
        big_endian: false,
        rustflags: &[],
        boards: "arm64 routers and SBCs (MediaTek Filogic, Raspberry Pi 3/4/5)",
    },
    Target {
        triple: "armv7-unknown-linux-musleabihf",
        qemu: "qemu-arm",
        std: Std::Prebuilt,
        big_endian: false,
        rustflags: &[],
        boards: "ARMv7 with an FPU (Cortex-A7/A9/A15: ipq40xx, mvebu)",
    },
    Target {
        triple: "armv7-unknown-linux-musleabi",
        qemu: "qemu-arm",
        std: Std::Prebuilt,
        big_endian: false,
        rustflags: &[],
        boards: "ARMv7 boards without an FPU (soft-float ABI)",
    },
    Target {
        triple: "mips-unknown-linux-musl",
        qemu: "qemu-mips",
        std: Std::Build,
        big_endian: true,
        rustflags: &["-C", "relocation-model=static"],
        boards: "big-endian MIPS32r2 (classic OpenWrt ath79: mips_24kc)",
    },
    Target {
        triple: "mipsel-unknown-linux-musl",
        qemu: "qemu-mipsel",
        std: Std::Build,
        big_endian: false,
        rustflags: &["-C", "relocation-model=static"],
        boards: "little-endian MIPS32r2 (OpenWrt ramips mt7621: mipsel_24kc)",
    },
];

/// The target named `triple`, or an error listing the known ones.
pub fn target(triple: &str) -> Result<Target> {
    TARGETS
        .iter()
        .find(|t| t.triple == triple)
        .copied()
        .with_context(|| {
            format!(
                "unknown target '{triple}': the release targets are {}",
                TARGETS
                    .iter()
                    .map(|t| t.triple)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// Where the pinned zig + cargo-zigbuild virtualenv lives: `$XDG_CACHE_HOME/viscum/` (or
/// `~/.cache/viscum/`), one directory per pinned pair, so a new pin never reuses an old one.
pub fn tools_dir() -> Result<PathBuf> {
    let cache = match env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(cache
        .join("viscum")
        .join(format!("cross-zig{ZIG_VERSION}-zigbuild{ZIGBUILD_VERSION}")))
}

/// The virtualenv's `bin/` (cargo-zigbuild, and `python3` for `python3 -m ziglang`).
fn venv_bin() -> Result<PathBuf> {
    Ok(tools_dir()?.join("bin"))
}

/// `true` when the pinned cargo-zigbuild and zig are installed.
fn tools_present() -> Result<bool> {
    let bin = venv_bin()?;
    Ok(bin.join("cargo-zigbuild").exists() && zig_in(&bin).is_some())
}

/// The `zig` executable inside the `ziglang` wheel of the virtualenv at `bin/..`.
fn zig_in(bin: &Path) -> Option<PathBuf> {
    let lib = bin.parent()?.join("lib");
    std::fs::read_dir(lib)
        .ok()?
        .filter_map(std::result::Result::ok)
        .map(|e| e.path().join("site-packages/ziglang/zig"))
        .find(|p| p.exists())
}

/// What [`ensure`] would install, without installing anything.
pub fn check() -> Vec<String> {
    let mut missing = Vec::new();
    match tools_present() {
        Ok(true) => {}
        Ok(false) => missing.push(format!(
            "zig {ZIG_VERSION} + cargo-zigbuild {ZIGBUILD_VERSION} (PyPI, into {})",
            tools_dir().map_or_else(|e| format!("{e:#}"), |d| d.display().to_string())
        )),
        Err(e) => missing.push(format!("{e:#}")),
    }
    for t in TARGETS {
        if !process::have(t.qemu) {
            missing.push(format!("{} (Debian package qemu-user)", t.qemu));
        }
    }
    missing
}

/// Installs what cross builds and their qemu-user tests need: Debian's `qemu-user`, and the
/// pinned zig + cargo-zigbuild virtualenv (Debian's `python3-venv` first if `venv` cannot
/// make one). Returns whether it installed anything.
///
/// Rust targets are added per build ([`prepare`]), since only the targets built need them.
pub fn ensure() -> Result<bool> {
    let mut did = false;
    if TARGETS.iter().any(|t| !process::have(t.qemu)) {
        println!("setup: qemu-user is missing (runs the cross-built tests)");
        process::apt_install(&["qemu-user"])?;
        did = true;
    }
    if !tools_present()? {
        let dir = tools_dir()?;
        println!(
            "setup: installing zig {ZIG_VERSION} and cargo-zigbuild {ZIGBUILD_VERSION} into {}",
            dir.display()
        );
        // A half-made virtualenv (an interrupted pip) is made again from scratch.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        let venv = |dir: &Path| {
            process::capture(Command::new("python3").args(["-m", "venv"]).arg(dir))
                .map(|o| o.status.success())
        };
        if !venv(&dir)? {
            // Debian's python3 makes a virtualenv with pip only with python3-venv.
            let _ = std::fs::remove_dir_all(&dir);
            process::apt_install(&["python3-venv"])?;
            if !venv(&dir)? {
                bail!("`python3 -m venv {}` fails", dir.display());
            }
        }
        process::run(
            Command::new(dir.join("bin/python3"))
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .arg(format!("ziglang=={ZIG_VERSION}"))
                .arg(format!("cargo-zigbuild=={ZIGBUILD_VERSION}")),
        )?;
        if !tools_present()? {
            bail!(
                "pip installed ziglang and cargo-zigbuild, but {} has no cargo-zigbuild or zig",
                dir.display()
            );
        }
        did = true;
    }
    Ok(did)
}

/// How one target is built here: whether std comes prebuilt, after `rustup target add`.
#[derive(Clone, Copy, Debug)]
pub struct Prepared {
    pub target: Target,
    /// `true` when std is built from source (tier 3, or no prebuilt std on the rustup server).
    pub build_std: bool,
}

/// Makes `target` buildable: for a tier-2 target, `rustup target add` (stable); if the
/// server has no std for it, falls back to `-Z build-std` and says so.
pub fn prepare(target: Target) -> Result<Prepared> {
    if target.std == Std::Build {
        return Ok(Prepared {
            target,
            build_std: true,
        });
    }
    let installed = process::output(
        Command::new("rustup")
            .current_dir(process::workspace_root())
            .args(["target", "list", "--installed"]),
    )?;
    if installed.lines().any(|l| l.trim() == target.triple) {
        return Ok(Prepared {
            target,
            build_std: false,
        });
    }
    let mut add = Command::new("rustup");
    add.current_dir(process::workspace_root())
        .args(["target", "add", target.triple]);
    println!("+ {}", process::display(&add));
    let out = process::capture(&mut add)?;
    if out.status.success() {
        return Ok(Prepared {
            target,
            build_std: false,
        });
    }
    let why = String::from_utf8_lossy(&out.stderr);
    let why = why
        .lines()
        .find(|l| l.contains("error"))
        .unwrap_or("failed")
        .trim();
    println!(
        "cross: no prebuilt std for {} from rustup ({why}); building std from source with nightly (-Z build-std)",
        target.triple
    );
    Ok(Prepared {
        target,
        build_std: true,
    })
}

/// `cargo-zigbuild zigbuild|test ... --target T` for `p` (cargo with zig as the linker), from the workspace root, with
/// the virtualenv's zig and cargo-zigbuild on `PATH`, the target's rustflags, and
/// `-Z build-std` when std is built from source. `subcommand` is `zigbuild` (build) or
/// `test`; the caller adds the rest (`-p`, `--release`, ...).
///
/// The rustflags go in `CARGO_TARGET_<T>_RUSTFLAGS` so they reach only this target's
/// crates, not build scripts nor the eBPF crate that `viscum-user/build.rs` builds with its
/// own cargo (which also must not inherit `-Z build-std`, hence a command-line flag rather
/// than `CARGO_UNSTABLE_BUILD_STD`).
/// `tests`: the build is, or must share its dependencies with, a `cargo test` build. cargo
/// adds the `test` crate to the std it builds for tests, which changes every crate's hash; a
/// build that names `test` itself shares all of them (the CI check builds the binary and the
/// unit tests, once each, instead of everything twice).
pub fn cargo(p: Prepared, subcommand: &str, tests: bool) -> Result<Command> {
    let bin = venv_bin()?;
    let zig_dir = zig_in(&bin)
        .and_then(|z| z.parent().map(Path::to_path_buf))
        .context("zig is not installed: run `cargo xtask setup`")?;
    // cargo-zigbuild runs `$CARGO` (set when xtask runs under `cargo xtask`: the toolchain
    // that started xtask), else `cargo` from PATH, i.e. rustup's proxy, which
    // RUSTUP_TOOLCHAIN points at the nightly when std is built from source.
    let mut cmd = Command::new(bin.join("cargo-zigbuild"));
    if p.build_std {
        cmd.env_remove("CARGO").env("RUSTUP_TOOLCHAIN", "nightly");
    }
    cmd.current_dir(process::workspace_root());
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin, zig_dir];
    dirs.extend(env::split_paths(&path));
    cmd.env("PATH", env::join_paths(dirs).context("PATH")?);
    cmd.arg(subcommand).args(["--target", p.target.triple]);
    if p.build_std {
        cmd.args([
            "-Z",
            if tests {
                "build-std=std,panic_abort,test"
            } else {
                "build-std=std,panic_abort"
            },
        ]);
        if !tests {
            // std's own size-over-speed choices (library/std's `optimize_for_size` feature):
            // the routers these targets are for count every kilobyte of flash (B9: 5 MiB).
            cmd.args(["-Z", "build-std-features=optimize_for_size"]);
        }
    }
    let mut flags = vec!["-C", "target-feature=+crt-static"];
    flags.extend(p.target.rustflags);
    if p.build_std {
        // rustc would link musl's start files from the target's `self-contained` directory,
        // which only a prebuilt std ships ("failed to open object crt1.o"); zig provides
        // them (and libc, libunwind) instead.
        flags.extend(["-C", "link-self-contained=no"]);
    }
    cmd.env(
        format!("CARGO_TARGET_{}_RUSTFLAGS", env_triple(p.target.triple)),
        flags.join(" "),
    );
    Ok(cmd)
}

/// `aarch64-unknown-linux-musl` -> `AARCH64_UNKNOWN_LINUX_MUSL` (cargo's env naming).
pub fn env_triple(triple: &str) -> String {
    triple.to_uppercase().replace(['-', '.'], "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_follow_cargo() {
        assert_eq!(
            env_triple("armv7-unknown-linux-musleabihf"),
            "ARMV7_UNKNOWN_LINUX_MUSLEABIHF"
        );
    }

    #[test]
    fn six_targets_one_big_endian_mips() {
        assert_eq!(TARGETS.len(), 6);
        let big: Vec<_> = TARGETS.iter().filter(|t| t.big_endian).collect();
        assert_eq!(big.len(), 1);
        assert_eq!(big[0].triple, "mips-unknown-linux-musl");
        assert!(target("mips-unknown-linux-gnu").is_err());
    }
}
