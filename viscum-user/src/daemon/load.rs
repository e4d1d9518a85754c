//! Load shedding: when the box is overloaded, every service is sent back to the cloud.
//!
//! Pressure is the larger of PSI's `some avg10` for CPU and memory (the share of the last
//! ten seconds in which some task waited for that resource), as a fraction. Where PSI is
//! absent (`CONFIG_PSI=n`, common on routers) the 1-minute load average divided by the
//! number of CPUs stands in. Shedding starts above `max_load` and stops only once the load
//! has dropped below [`RESUME_RATIO`] of it, so a load hovering at the threshold does not
//! flap entries in and out of the datapath.
//!
//! With `load_scope = "services"` the pressure is that of the daemon's cgroup v2 `viscum`
//! group instead (its `cpu.pressure` and `memory.pressure`, the same `some avg10`), which
//! holds every service: the share of time some service task waited for a CPU or for
//! memory, whoever caused the wait. A busy box whose services are idle then does not shed,
//! and a box whose services are starved does, however busy the rest looks.
//!
//! While shedding, each service's entries drain (see `service.rs`): new flows go to the
//! cloud, flows already at the edge continue; when the load is back below the resume level
//! the entries take new flows again.

use std::fs;

/// Shedding ends below this fraction of `max_load`.
pub const RESUME_RATIO: f64 = 0.85;

/// Where a load figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Pressure stall information: max of `some avg10` in `/proc/pressure/{cpu,memory}`
    /// (kernel docs, Documentation/accounting/psi.rst).
    Psi,
    /// `/proc/loadavg`'s 1-minute average divided by the CPU count (proc(5)), without PSI.
    Loadavg,
    /// PSI of the services' cgroup: max of `some avg10` in the `viscum` group's
    /// `cpu.pressure` and `memory.pressure` (`load_scope = "services"`).
    Cgroup,
}

/// `some avg10` of a PSI file, as a fraction.
fn psi_some_avg10(path: &str) -> Option<f64> {
    let text = fs::read_to_string(path).ok()?;
    parse_psi(&text)
}

fn parse_psi(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let v = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?;
    v.parse::<f64>().ok().map(|p| p / 100.0)
}

/// The current load as a fraction (0.0 = idle; 1.0 = always stalled, or one runnable task per
/// CPU) and where it came from, or `None` if neither PSI nor loadavg is readable.
pub fn current() -> Option<(f64, Source)> {
    let cpu = psi_some_avg10("/proc/pressure/cpu");
    let mem = psi_some_avg10("/proc/pressure/memory");
    match (cpu, mem) {
        (None, None) => {
            let text = fs::read_to_string("/proc/loadavg").ok()?;
            let one: f64 = text.split_whitespace().next()?.parse().ok()?;
            let cpus = std::thread::available_parallelism()
                .map(std::num::NonZero::get)
                .unwrap_or(1) as f64;
            Some((one / cpus, Source::Loadavg))
        }
        (a, b) => Some((a.unwrap_or(0.0).max(b.unwrap_or(0.0)), Source::Psi)),
    }
}

/// The load as `scope` defines it (see the module docs); `None` if it cannot be read (for
/// the services' scope: no cgroup v2 `viscum` group with PSI files, e.g. a v1-only host or
/// `CONFIG_PSI=n`).
pub fn current_for(scope: crate::config::LoadScope) -> Option<(f64, Source)> {
    match scope {
        crate::config::LoadScope::System => current(),
        crate::config::LoadScope::Services => {
            let dir = super::cgroup::services_v2_dir()?;
            let cpu = psi_some_avg10(&dir.join("cpu.pressure").to_string_lossy());
            let mem = psi_some_avg10(&dir.join("memory.pressure").to_string_lossy());
            match (cpu, mem) {
                (None, None) => None,
                (a, b) => Some((a.unwrap_or(0.0).max(b.unwrap_or(0.0)), Source::Cgroup)),
            }
        }
    }
}

/// The shed/resume decision with hysteresis.
#[derive(Debug, Clone)]
pub struct Shedder {
    /// Shedding starts when the load (a fraction, as from [`current`]) exceeds this.
    pub max_load: f64,
    /// Whether services are currently sent back to the cloud.
    pub shedding: bool,
}

impl Shedder {
    /// A shedder for threshold `max_load` (a fraction, e.g. `0.9`), not shedding.
    pub fn new(max_load: f64) -> Self {
        Shedder {
            max_load,
            shedding: false,
        }
    }

    /// Feeds a load figure; returns the new state if it changed.
    pub fn update(&mut self, load: f64) -> Option<bool> {
        let next = if self.shedding {
            load >= self.max_load * RESUME_RATIO
        } else {
            load > self.max_load
        };
        (next != self.shedding).then(|| {
            self.shedding = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_parsing() {
        let text = "some avg10=12.50 avg60=1.00 avg300=0.00 total=1\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_psi(text), Some(0.125));
        assert_eq!(parse_psi("garbage"), None);
    }

    #[test]
    fn hysteresis() {
        let mut s = Shedder::new(0.9);
        assert_eq!(s.update(0.5), None);
        assert_eq!(s.update(0.9), None); // at the threshold: not above
        assert_eq!(s.update(0.95), Some(true));
        assert_eq!(s.update(0.85), None); // still above 0.765
        assert_eq!(s.update(0.77), None);
        assert_eq!(s.update(0.7), Some(false));
        assert_eq!(s.update(0.8), None);
    }

    #[test]
    fn reads_something_here() {
        // Every Linux box has /proc/loadavg at least.
        assert!(current().is_some());
    }
}
