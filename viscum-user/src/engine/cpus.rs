//! How many per-CPU regions a map the datapath indexes by CPU id needs.
//!
//! The flow and reply caches and the entry counters are plain arrays with one region per
//! CPU, indexed by `bpf_get_smp_processor_id()` (see their modules in `viscum-ebpf`). That id
//! runs up to the highest *possible* CPU, not up to the number of possible CPUs: the
//! possible mask can have holes (`0-3,8-11` on some ARM and POWER systems, or after
//! `possible_cpus=` on the kernel command line), and a CPU whose id is past the last region
//! would find none (no cache, lost counters). So regions are counted as the highest id + 1,
//! what the kernel calls `nr_cpu_ids`.
//!
//! Source: `/sys/devices/system/cpu/possible`, in the kernel's cpulist format
//! (Documentation/ABI/testing/sysfs-devices-system-cpu, `cpulist_parse` in lib/bitmap.c).

use std::{fs, io};

use super::EngineError;

/// The kernel's list of possible CPUs.
const POSSIBLE_CPUS: &str = "/sys/devices/system/cpu/possible";

/// Regions a per-CPU-indexed array needs on this machine: the highest possible CPU id + 1.
///
/// # Errors
/// [`EngineError::Io`] if `/sys/devices/system/cpu/possible` cannot be read or does not
/// hold a CPU list.
pub fn cpu_regions() -> Result<u32, EngineError> {
    let text = fs::read_to_string(POSSIBLE_CPUS)
        .map_err(|e| EngineError::io(format!("cannot read {POSSIBLE_CPUS}"), e))?;
    regions_of(&text).map_err(|what| {
        EngineError::io(
            format!("{POSSIBLE_CPUS} holds {:?}: {what}", text.trim()),
            io::ErrorKind::InvalidData.into(),
        )
    })
}

/// The highest CPU id + 1 of a cpulist (`0-3,8-11`, `0`, `0,2-5`).
fn regions_of(list: &str) -> Result<u32, &'static str> {
    let list = list.trim();
    if list.is_empty() {
        return Err("an empty CPU list");
    }
    let mut highest = None;
    for range in list.split(',') {
        let last = match range.split_once('-') {
            Some((first, last)) => {
                let first: u32 = first
                    .parse()
                    .map_err(|_| "a range start that is not a CPU id")?;
                let last: u32 = last
                    .parse()
                    .map_err(|_| "a range end that is not a CPU id")?;
                if last < first {
                    return Err("a range that ends before it starts");
                }
                last
            }
            None => range.parse().map_err(|_| "an item that is not a CPU id")?,
        };
        highest = highest.max(Some(last));
    }
    highest
        .and_then(|h: u32| h.checked_add(1))
        .ok_or("a CPU id too large")
}

#[cfg(test)]
mod tests {
    use super::regions_of;

    #[test]
    fn regions_run_to_the_highest_possible_id() {
        assert_eq!(regions_of("0\n"), Ok(1));
        assert_eq!(regions_of("0-1\n"), Ok(2));
        assert_eq!(regions_of("0-3,8-11\n"), Ok(12));
        assert_eq!(regions_of("0,2-5"), Ok(6));
        assert_eq!(regions_of("4-7,0-1"), Ok(8));
    }

    #[test]
    fn a_list_that_is_not_a_cpulist_is_refused() {
        for bad in [
            "",
            "\n",
            "a",
            "0-",
            "-3",
            "3-1",
            "0,,1",
            "0-3 x",
            "4294967295",
        ] {
            assert!(regions_of(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn this_machine_has_regions() {
        let n = super::cpu_regions().expect("possible CPUs");
        assert!(n >= 1);
        assert!(usize::try_from(n).unwrap() >= aya::util::nr_cpus().unwrap());
    }
}
