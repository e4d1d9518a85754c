//! Reference classifiers for the benchmarks (`cargo xtask bench`), never
//! attached by `viscum` itself.
//!
//! * `bench_noop` returns `TC_ACT_OK` without reading the packet: the tax of
//!   having any TC program on an interface (the "noop" floor).
//! * `bench_hook` redirects every packet with `bpf_redirect_peer` into the
//!   veth whose host-side ifindex user space writes into [`HOOK_IFINDEX`]
//!   before loading: no parsing, no lookup (the "hook" floor, the cost of the
//!   mechanism itself).
//!
//! Both live in their own object (`viscum-bench`) so the product's object and
//! its verifier budget stay untouched.
// no_std/no_main only for the bpf target: a host build (`cargo clippy --workspace
// --all-targets`) gets an ordinary std binary with an empty main, instead of a no_std one
// that the host's unwinding panics cannot build (as aya's own test programs do).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// aya's `#[classifier]` wraps each program in an exported function it generates without the
// item's attributes, so their doc comments (kept below for readers) cannot reach the item
// `missing_docs` checks. Lint attributes change nothing in the compiled object.
#![allow(
    missing_docs,
    reason = "aya's #[classifier] drops the programs' doc comments"
)]

#[path = "../runtime.rs"]
mod runtime;

use aya_ebpf::{
    bindings::TC_ACT_OK, helpers::bpf_redirect_peer, macros::classifier, programs::TcContext,
};

/// Host-side veth ifindex to redirect to; patched by the loader
/// (`EbpfLoader::set_global`). Read with `read_volatile` so the compiler
/// cannot fold the zero it is initialised with.
#[unsafe(no_mangle)]
static HOOK_IFINDEX: u32 = 0;

/// Any TC hook (the benchmarks use ingress). Returns `TC_ACT_OK` without
/// reading the packet.
#[classifier]
pub fn bench_noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Any TC hook (the benchmarks use ingress). Returns `bpf_redirect_peer`'s
/// verdict for [`HOOK_IFINDEX`]: `TC_ACT_REDIRECT` (`TC_ACT_SHOT` only for
/// bad flags, and it passes none).
#[classifier]
pub fn bench_hook(_ctx: TcContext) -> i32 {
    // SAFETY: reading a plain global of this object.
    let ifindex = unsafe { core::ptr::read_volatile(&raw const HOOK_IFINDEX) };
    // SAFETY: helper call with a plain ifindex; flags must be 0. Returns
    // TC_ACT_REDIRECT, or TC_ACT_SHOT for a bad flag.
    unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
}

/// The host build's entry point (see the crate attributes); the programs only run in the
/// kernel.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
