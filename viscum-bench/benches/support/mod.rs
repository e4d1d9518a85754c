//! Code shared by the two benchmark binaries (`datapath` and `system`).
//!
//! # Layout
//!
//! * [`cli`]: the few flags `cargo xtask bench` passes (`--quick`, `--out`, `--run-id`, `--group`).
//! * [`report`]: what a benchmark hands back: tables of rows (median, min–max, ratio to a
//!   reference, target, met) and plot data, as JSON for xtask to merge and render.
//! * [`sys`]: stop flag and signals, CPU pinning, commands run inside a network namespace,
//!   bounded waits, peak RSS of a child, CPU accounting from `/proc/stat`.
//! * [`netns`]: uniquely named network namespaces removed on drop, `ip` and sysctl helpers.
//! * [`bpffs`]: a private bpffs mount for the run, unmounted on drop.
//!
//! Benchmarks are not tests: everything here returns errors instead of panicking, because the
//! release profile aborts on panic and one failing benchmark must not take the others down.
#![allow(
    dead_code,
    reason = "shared by two bench binaries, each uses a different part"
)]

pub mod bpffs;
pub mod cli;
pub mod netns;
pub mod report;
pub mod sys;
