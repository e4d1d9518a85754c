//! The packet fuzzer's slice in `cargo xtask test`: 100,000 frames from a fixed seed and
//! 100,000 from a random one (printed, so a failure reproduces with `cargo xtask fuzz --seed
//! S --packets 100000`) through the loaded classifiers, checked against the reference model
//! (`viscum_tests::fuzz`, `docs/fuzzing.md`). The long run is `cargo xtask fuzz`.
//!
//! `VISCUM_FUZZ_SEED` / `VISCUM_FUZZ_PACKETS` replace the random seed and the packet count of
//! both halves (that is how `cargo xtask fuzz` runs it).

use std::time::{SystemTime, UNIX_EPOCH};

use viscum_tests::{Lab, fuzz, skip_unless_root};

/// The fixed seed of the first half.
const FIXED_SEED: u64 = 0x005e_ed0f_f022;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

#[test]
fn fuzz_classifiers_against_the_model() {
    if skip_unless_root() {
        return;
    }
    let packets = env_u64("VISCUM_FUZZ_PACKETS").unwrap_or(100_000);
    let seeds = match env_u64("VISCUM_FUZZ_SEED") {
        Some(s) => vec![s],
        None => {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64);
            vec![FIXED_SEED, t ^ u64::from(std::process::id())]
        }
    };
    let lab = Lab::new();
    lab.viscum_ok(&["attach", lab.lan_if()]);
    let mut failed = Vec::new();
    for seed in seeds {
        eprintln!("fuzz: seed {seed} ({seed:#x}), {packets} packets");
        let sum = fuzz::run(&lab, fuzz::Options::new(seed, packets), &mut |l| {
            eprintln!("{l}");
        })
        .unwrap_or_else(|e| panic!("fuzz setup failed: {e}"));
        eprintln!("{}", sum.report());
        assert_eq!(sum.packets + sum.refused, packets, "not every frame ran");
        if sum.violations > 0 {
            failed.push(format!(
                "seed {seed} ({seed:#x}): {} violations in {} packets (reproduce: cargo xtask \
                 fuzz --seed {seed} --packets {packets})",
                sum.violations, sum.packets
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
