//! `cargo xtask dist`: release binaries of `viscum` for routers, one static file per target,
//! and the proof that each is right.
//!
//! * Build ([`crate::cross`]): stripped (release profile), statically linked musl binaries
//!   for the six release targets, copied to `target/dist/viscum-<triple>`: without the
//!   `fleet` feature, whose NATS and TLS stack would take a router past B9's 5 MiB (with
//!   `--fleet`: `viscum-fleet-<triple>`). Each is checked
//!   after the build ([`elf`]): an ELF of the target's machine and byte order, no program
//!   interpreter (static), and an embedded eBPF object of the same byte order (`bpfeb` for
//!   big-endian MIPS; aya-build picks it from `CARGO_CFG_TARGET_ENDIAN`).
//! * `--test` ([`qemu`]): on this host, under qemu-user, the unit tests of viscum-common and
//!   viscum-user built for the target, then the dist binary's `--version` and
//!   `run --check` of a configuration.
//! * `--budget` ([`budget`]): B9, binary size per target and the idle daemon's RSS with
//!   10 services, into `bench/results/` and `bench/RESULTS.md`.
//! * `--openwrt`: an `.ipk` per OpenWrt architecture of each target
//!   ([`crate::package::ipk`]), next to the binaries.
//!
//! See `docs/router-builds.md`.

pub mod budget;
pub mod elf;
pub mod qemu;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cross::{self, Prepared, Target},
    process, setup,
};

/// Options of `cargo xtask dist`.
#[derive(clap::Args, Default)]
pub struct Options {
    /// Target triple to build for (repeatable); default: the release target of this host's
    /// architecture (x86_64-unknown-linux-musl on x86-64).
    #[arg(long = "target", value_name = "TRIPLE", conflicts_with = "all")]
    pub targets: Vec<String>,
    /// All six release targets: x86_64, aarch64, armv7 (hard- and soft-float), mips, mipsel musl.
    #[arg(long)]
    pub all: bool,
    /// Also prove each target under qemu-user: unit tests, `viscum --version`, `viscum run --check`.
    #[arg(long)]
    pub test: bool,
    /// Also measure B9 (size per target, idle daemon RSS with 10 services) into bench/.
    #[arg(long)]
    pub budget: bool,
    /// Also package each binary as an OpenWrt .ipk (one per OpenWrt architecture).
    #[arg(long)]
    pub openwrt: bool,
    /// Do not build: use the binaries already in target/dist (with --test, --budget, --openwrt).
    #[arg(long)]
    pub no_build: bool,
    /// Build with the `fleet` feature (`[fleet]`: desired state from NATS JetStream,
    /// docs/fleet.md), into `target/dist/viscum-fleet-<triple>`. Without it the router
    /// binaries leave fleet out: its TLS and NATS stack adds ~3 MiB, beyond B9's 5 MiB.
    #[arg(long)]
    pub fleet: bool,
    /// Only the cross check `cargo xtask test` runs: mips-unknown-linux-musl, debug profile,
    /// proven under qemu-user (nothing goes to target/dist).
    #[arg(long, conflicts_with_all = ["targets", "all", "test", "budget", "openwrt", "no_build"])]
    pub ci: bool,
}

/// What happened to one target, for the summary.
struct Outcome {
    triple: &'static str,
    binary: Option<PathBuf>,
    build_s: Option<f64>,
    test: Option<Result<qemu::Report>>,
    error: Option<String>,
}

/// `cargo xtask dist`.
pub fn run(opts: &Options) -> Result<ExitCode> {
    if opts.ci {
        setup::ensure()?;
        return Ok(if ci_check()? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let targets = selected(opts)?;
    setup::ensure()?;
    cross::ensure()?;
    let dist = dist_dir()?;
    fs::create_dir_all(&dist).with_context(|| format!("cannot create {}", dist.display()))?;

    let mut outcomes = Vec::new();
    for target in targets {
        let mut o = Outcome {
            triple: target.triple,
            binary: None,
            build_s: None,
            test: None,
            error: None,
        };
        let p = cross::prepare(target)?;
        println!("dist: {} ({})", target.triple, target.boards);
        let t = Instant::now();
        let built = if opts.no_build {
            let path = dist.join(binary_name(target.triple, opts.fleet));
            if path.exists() {
                Ok(path)
            } else {
                Err(anyhow::anyhow!(
                    "{} does not exist (--no-build)",
                    path.display()
                ))
            }
        } else {
            build_one(p, &dist, opts.fleet).inspect(|_| o.build_s = Some(t.elapsed().as_secs_f64()))
        };
        match built.and_then(|b| elf::check(&b, target).map(|facts| (b, facts))) {
            Ok((binary, facts)) => {
                println!("dist: {} ({facts})", binary.display());
                if opts.openwrt {
                    let version = format!("{}-r1", env!("CARGO_PKG_VERSION"));
                    for ipk in crate::package::ipk::ipks(&binary, target.triple, &version, &dist)? {
                        println!("dist: {}", ipk.display());
                    }
                }
                if opts.test {
                    o.test = Some(qemu::prove(p, &binary));
                }
                o.binary = Some(binary);
            }
            Err(e) => {
                eprintln!("dist: {}: {e:#}", target.triple);
                o.error = Some(format!("{e:#}"));
            }
        }
        outcomes.push(o);
    }

    let mut ok = true;
    println!("\ndist: summary");
    for o in &outcomes {
        let size = o
            .binary
            .as_ref()
            .and_then(|b| fs::metadata(b).ok())
            .map(|m| format!("{:.2} MiB", m.len() as f64 / 1024.0 / 1024.0))
            .unwrap_or_else(|| "-".into());
        let build = o
            .build_s
            .map(|s| format!("built in {s:.0} s"))
            .unwrap_or_else(|| "not built".into());
        let test = match &o.test {
            None => String::new(),
            Some(Ok(r)) => format!("; qemu-user: {r}"),
            Some(Err(e)) => {
                ok = false;
                format!("; qemu-user FAILED: {e:#}")
            }
        };
        if let Some(e) = &o.error {
            ok = false;
            println!("  {:34} FAILED: {e}", o.triple);
        } else {
            println!("  {:34} {size:>9}, {build}{test}", o.triple);
        }
    }
    if opts.budget {
        let built: Vec<budget::Built> = outcomes
            .iter()
            .filter_map(|o| {
                Some(budget::Built {
                    target: cross::target(o.triple).ok()?,
                    binary: o.binary.clone()?,
                    build_s: o.build_s,
                    test: match &o.test {
                        Some(Ok(r)) => Some(r.to_string()),
                        Some(Err(e)) => Some(format!("FAILED: {e:#}")),
                        None => None,
                    },
                })
            })
            .collect();
        ok &= budget::run(&built)?;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The targets `opts` asks for (validated before anything is built).
fn selected(opts: &Options) -> Result<Vec<Target>> {
    if opts.all {
        return Ok(cross::TARGETS.to_vec());
    }
    if !opts.targets.is_empty() {
        return opts.targets.iter().map(|t| cross::target(t)).collect();
    }
    let arch = std::env::consts::ARCH;
    match cross::TARGETS
        .iter()
        .find(|t| t.triple.split('-').next() == Some(arch))
    {
        Some(t) => Ok(vec![*t]),
        None => {
            bail!("no release target for this host's architecture ({arch}): name one with --target")
        }
    }
}

/// The cross check `cargo xtask test` runs: one big-endian tier-3 target,
/// `mips-unknown-linux-musl`, built with the debug profile (no LTO: minutes, not tens of
/// minutes cold), proven under qemu-user like `dist --test` (unit tests, `--version`,
/// `run --check`), and its embedded eBPF object checked to be `bpfeb`. Returns whether it
/// passed; the reason of a failure is printed.
pub fn ci_check() -> Result<bool> {
    let started = Instant::now();
    cross::ensure()?;
    let target = cross::target("mips-unknown-linux-musl")?;
    let p = cross::prepare(target)?;
    let result = (|| {
        let mut cmd = cross::cargo(p, "zigbuild", true)?;
        cmd.args(["-p", "viscum-user", "--bin", "viscum"]);
        let binary = crate::build::built_bin(cmd, "viscum-user", "viscum")?;
        let facts = elf::check(&binary, target)?;
        println!("cross: {} ({facts})", binary.display());
        qemu::prove(p, &binary)
    })();
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(r) => {
            println!(
                "cross: {} under {} passed in {secs:.0} s: {r}",
                target.triple, target.qemu
            );
            Ok(true)
        }
        Err(e) => {
            eprintln!(
                "error: cross: {} under {} FAILED after {secs:.0} s: {e:#}",
                target.triple, target.qemu
            );
            Ok(false)
        }
    }
}

/// `<target dir>/dist`.
pub fn dist_dir() -> Result<PathBuf> {
    Ok(target_dir()?.join("dist"))
}

/// Cargo's target directory (honours `CARGO_TARGET_DIR` and config), from `cargo metadata`.
pub fn target_dir() -> Result<PathBuf> {
    let out = process::output(
        process::cargo()
            .args(["metadata", "--format-version=1", "--no-deps"])
            .stderr(Stdio::inherit()),
    )?;
    let meta: serde_json::Value = serde_json::from_str(&out).context("cargo metadata's output")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata names no target_directory")
}

/// `viscum-<triple>`, or `viscum-fleet-<triple>` for a build with the fleet feature.
fn binary_name(triple: &str, fleet: bool) -> String {
    if fleet {
        format!("viscum-fleet-{triple}")
    } else {
        format!("viscum-{triple}")
    }
}

/// Release-builds `viscum` for `p` (with the fleet feature if `fleet`, else without any
/// optional feature) and copies it to `dist/` under [`binary_name`].
fn build_one(p: Prepared, dist: &Path, fleet: bool) -> Result<PathBuf> {
    let mut cmd = cross::cargo(p, "zigbuild", false)?;
    cmd.args(["--release", "-p", "viscum-user", "--bin", "viscum"]);
    if !fleet {
        cmd.arg("--no-default-features");
    }
    let binary = crate::build::built_bin(cmd, "viscum-user", "viscum")?;
    let out = dist.join(binary_name(p.target.triple, fleet));
    // Replace rather than overwrite: a running copy (a benchmark's daemon) keeps its inode.
    let _ = fs::remove_file(&out);
    fs::copy(&binary, &out)
        .with_context(|| format!("cannot copy {} to {}", binary.display(), out.display()))?;
    strip_all(&out)?;
    Ok(out)
}

/// `llvm-objcopy --strip-all` of the release binary: the linker's `--strip-all` (the release
/// profile's `strip = true`) keeps sections it does not know to be debug info, such as
/// MIPS's `.pdr` procedure descriptors (336 KB on mips) and `.comment`. The LLVM of the
/// toolchain (llvm-config-22, docs/toolchain.md) has the tool.
fn strip_all(binary: &Path) -> Result<()> {
    let bindir = process::output(Command::new("llvm-config-22").arg("--bindir"))
        .context("llvm-config-22 --bindir (run `cargo xtask setup`)")?;
    let tool = Path::new(bindir.trim()).join("llvm-objcopy");
    process::run(Command::new(&tool).arg("--strip-all").arg(binary))
        .with_context(|| format!("{} --strip-all {}", tool.display(), binary.display()))
}
