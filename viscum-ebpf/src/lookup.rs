//! The services map: `(proto, family, dst addr, dst port)` -> target + counters.

use aya_ebpf::{macros::map, maps::PerCpuHashMap};
use viscum_common::{DEFAULT_MAX_ENTRIES, ServiceEntry, ServiceKey};

/// Per-CPU so each CPU bumps its own entry counters without atomics; user
/// space writes the same target into every CPU's copy. The size here is a
/// default: the loader overrides it (`viscum attach --max-entries`).
#[map(name = "VISCUM_SERVICES")]
static SERVICES: PerCpuHashMap<ServiceKey, ServiceEntry> =
    PerCpuHashMap::pinned(DEFAULT_MAX_ENTRIES, 0);

/// Exact port first; then the address's "all ports" entry (port 0).
#[inline(always)]
pub fn find(key: &ServiceKey) -> Option<*mut ServiceEntry> {
    if let Some(e) = SERVICES.get_ptr_mut(key) {
        return Some(e);
    }
    if key.port == 0 {
        return None;
    }
    SERVICES.get_ptr_mut(key.any_port())
}
