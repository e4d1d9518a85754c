//! `cargo xtask fuzz`: the long packet-fuzzer run (docs/fuzzing.md).
//!
//! Builds `viscum`, then runs the fuzz test (`tests/tests/fuzz.rs`) with the packet count and
//! seed in `VISCUM_FUZZ_PACKETS` / `VISCUM_FUZZ_SEED`: one lab, one setup, then every frame
//! through the loaded classifiers against the reference model. The test prints the seed, the
//! packet count, per-class counts, verdicts, known-defect hits, violations and wall time, and
//! fails on any violation.

use std::{
    process::ExitCode,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};

use crate::{build, process, setup};

/// Options of `cargo xtask fuzz`.
#[derive(clap::Args)]
pub struct Options {
    /// How many frames to run.
    #[arg(long, default_value_t = 10_000_000, value_name = "N")]
    packets: u64,
    /// The generator's seed (decimal or 0x-hex); default: a random one, printed.
    #[arg(long, value_name = "S", value_parser = parse_seed)]
    seed: Option<u64>,
}

fn parse_seed(s: &str) -> std::result::Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("'{s}' is not a decimal or 0x-hex 64-bit number"))
}

/// `cargo xtask fuzz`.
pub fn run(opts: &Options) -> Result<ExitCode> {
    if !process::is_root() {
        bail!("the fuzzer loads the classifiers and builds a lab: run it as root");
    }
    setup::ensure()?;
    let seed = opts.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id())
    });
    println!("fuzz: seed {seed} ({seed:#x}), {} packets", opts.packets);
    let viscum = build::viscum_debug()?;
    let started = Instant::now();
    let mut cmd = process::cargo();
    cmd.args([
        "test",
        "-p",
        "viscum-tests",
        "--test",
        "fuzz",
        "--",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("VISCUM_BIN", &viscum)
    .env("VISCUM_FUZZ_SEED", seed.to_string())
    .env("VISCUM_FUZZ_PACKETS", opts.packets.to_string());
    println!("+ {}", process::display(&cmd));
    let status = cmd.status().context("cannot start cargo test")?;
    println!(
        "fuzz: seed {seed} ({seed:#x}), {} packets: {} in {:.0?} (reproduce: cargo xtask fuzz \
         --seed {seed} --packets {})",
        opts.packets,
        if status.success() { "passed" } else { "FAILED" },
        started.elapsed(),
        opts.packets
    );
    Ok(process::exit_code(status))
}
