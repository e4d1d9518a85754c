//! `viscum-vmcheck hog ...`: the load a service makes in the multi-tenant tests. It lives in
//! the runner because the runner is the only program of ours in a VM guest (the initramfs is
//! `/init`, `viscum` and modules: no Python there), and the host tests use the same binary,
//! so both run the very same load.
//!
//! * `hog limits`: spins five threads for 1 s and prints `spun` (a `cpu` limit throttles
//!   it), starts up to 40 sleeping threads and prints `threads N` (a `pids` limit stops it
//!   early), then allocates and touches memory 4 MiB at a time, printing `allocated N MiB`, up to
//!   1 GiB (a `memory` limit has the OOM killer end it first), then sleeps.
//! * `hog cpu N`: N threads that spin for ever (CPU pressure), printing `spinning N`.

use std::{io::Write as _, time::Duration};

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn spin_until(end: std::time::Instant) {
    let mut x = 0u64;
    while std::time::Instant::now() < end {
        for _ in 0..10_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

/// Runs the hog named by `args` (after `hog`); returns the exit status (2: bad arguments).
pub fn main(args: &[String]) -> u8 {
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["limits"] => {
            // Four spinners for 1 s: four CPUs' worth of demand, throttled by a `cpu` limit
            // below that however busy the rest of the machine is.
            let end = std::time::Instant::now() + Duration::from_secs(1);
            let spinners: Vec<_> = (0..4)
                .filter_map(|_| {
                    std::thread::Builder::new()
                        .spawn(move || spin_until(end))
                        .ok()
                })
                .collect();
            spin_until(end);
            for s in spinners {
                let _ = s.join();
            }
            say("spun");
            let mut threads = 0;
            for _ in 0..40 {
                match std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(|| std::thread::sleep(Duration::from_secs(3600)))
                {
                    Ok(_) => threads += 1,
                    Err(_) => break,
                }
            }
            say(&format!("threads {threads}"));
            let mut kept: Vec<Vec<u8>> = Vec::new();
            for step in 1..=256u64 {
                // Each page written, not only reserved (untouched pages cost nothing); one
                // byte a page: under an emulated CPU at 5 % of a CPU, filling would be slow.
                let mut block = vec![0u8; 4 << 20];
                for i in (0..block.len()).step_by(4096) {
                    block[i] = 0x5a;
                }
                kept.push(block);
                say(&format!("allocated {} MiB", step * 4));
            }
            std::hint::black_box(&kept);
            std::thread::sleep(Duration::from_secs(3600));
            0
        }
        ["cpu", n] => {
            let Ok(n) = n.parse::<usize>() else { return 2 };
            for _ in 0..n {
                std::thread::spawn(|| {
                    spin_until(std::time::Instant::now() + Duration::from_secs(3600));
                });
            }
            say(&format!("spinning {n}"));
            std::thread::sleep(Duration::from_secs(3600));
            0
        }
        _ => {
            eprintln!("usage: viscum-vmcheck hog limits | hog cpu THREADS");
            2
        }
    }
}
