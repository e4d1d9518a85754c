//! Global counters and the runtime configuration slot.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::{Array, PerCpuArray},
};
use viscum_common::{
    DEFAULT_LINGER_SECS, DEFAULT_TCP_IDLE_SECS, DEFAULT_UDP_IDLE_SECS, DatapathConfig,
    GLOBAL_COUNTERS, GlobalCounter, LATE_REDIRECTS_SLOT,
};

/// Per-CPU so the hot path never needs an atomic add.
#[map(name = "VISCUM_GLOBAL")]
static GLOBAL: PerCpuArray<u64> = PerCpuArray::pinned(GLOBAL_COUNTERS, 0);

/// One slot, written by user space (`viscum trace` flips `log_debug`).
#[map(name = "VISCUM_CONFIG")]
static CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

#[inline(always)]
pub fn bump(counter: GlobalCounter) {
    if let Some(slot) = GLOBAL.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Adds `packets` redirects whose entry was gone when a flow-cache slot gave them up (see
/// `viscum_common::LATE_REDIRECTS_SLOT`).
#[inline(always)]
pub fn add_late_redirects(packets: u64) {
    if let Some(slot) = GLOBAL.get_ptr_mut(LATE_REDIRECTS_SLOT) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *slot += packets };
    }
}

/// This CPU's last reading of the coarse clock and the jiffy it was taken in: `[jiffies,
/// ns]`. Not pinned: a cache, private to each loaded copy of the object.
#[map(name = "VISCUM_CLOCK")]
static CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// CLOCK_MONOTONIC at tick resolution, in ns: what `bpf_ktime_get_coarse_ns` (5.11+)
/// returns, read through a per-CPU cache that is valid for one jiffy. The coarse clock
/// only moves at the tick (it is the timekeeper's last update), so within the jiffy its
/// value is the same; `bpf_jiffies64` (5.5+) is one load, while the coarse clock's
/// seqcount read measured ~15 ns of a ~110 ns established hit (B1, hot, 6.18 under
/// qemu/KVM), and the precise clock ~30 ns. At most one tick behind the coarse clock.
#[inline(always)]
pub fn now_coarse() -> u64 {
    // SAFETY: helper without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    if let Some(slot) = CLOCK.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; nothing else runs on this CPU while we do.
        let slot = unsafe { &mut *slot };
        if slot[0] == jiffies {
            return slot[1];
        }
        // SAFETY: helper without arguments.
        let ns = unsafe { bpf_ktime_get_coarse_ns() };
        slot[0] = jiffies;
        slot[1] = ns;
        return ns;
    }
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The kernel tick (`bpf_jiffies64`, 5.5+): one load of a word every CPU reads, what the
/// flow cache's validity is kept in.
#[inline(always)]
pub fn tick() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_jiffies64() }
}

/// The runtime configuration, read once per packet: the slot is a pointer into the array's
/// value (no copy), and every decision of the packet uses the same one. `None` only if
/// the array were empty, which its fixed size of one rules out.
#[inline(always)]
pub fn config() -> Option<&'static DatapathConfig> {
    CONFIG.get(0)
}

/// Flow timeouts in nanoseconds, defaults filled in.
pub struct Timeouts {
    pub tcp_idle_ns: u64,
    pub udp_idle_ns: u64,
    pub linger_ns: u64,
}

const SEC: u64 = 1_000_000_000;

#[inline(always)]
pub fn timeouts(c: &DatapathConfig) -> Timeouts {
    let (tcp, udp, linger) = (c.tcp_idle_ns, c.udp_idle_ns, c.linger_ns);
    Timeouts {
        tcp_idle_ns: if tcp == 0 {
            DEFAULT_TCP_IDLE_SECS * SEC
        } else {
            tcp
        },
        udp_idle_ns: if udp == 0 {
            DEFAULT_UDP_IDLE_SECS * SEC
        } else {
            udp
        },
        linger_ns: if linger == 0 {
            DEFAULT_LINGER_SECS * SEC
        } else {
            linger
        },
    }
}

/// Are there prefix rules at all? Without any, unmatched traffic skips the
/// LPM lookup (the miss path is the tax every unmanaged packet pays).
#[inline(always)]
pub fn have_rules(c: &DatapathConfig) -> bool {
    c.prefix_rules != 0
}

#[inline(always)]
pub fn log_enabled(c: &DatapathConfig) -> bool {
    c.log_debug != 0
}
