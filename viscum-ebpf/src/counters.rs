//! Global counters and the runtime configuration slot.

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use viscum_common::{
    DEFAULT_LINGER_SECS, DEFAULT_TCP_IDLE_SECS, DEFAULT_UDP_IDLE_SECS, DatapathConfig,
    GLOBAL_COUNTERS, GlobalCounter,
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
