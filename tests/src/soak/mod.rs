//! The soak: a real `viscum run` in the lab under many concurrent clients while its services
//! flap, its configuration reloads and its flow table churns. Run by `cargo xtask soak
//! [--minutes N]` and, as a one-minute slice, by `tests/tests/soak.rs`.
//!
//! # What runs
//!
//! * the cloud answers "cloud" on ports [`STABLE_PORT`], [`FLAP_PORT`], [`RELOAD_PORT`] and
//!   [`CLOUD_PORT`] ([`crate::IdentityServer`]);
//! * the daemon runs three services (the lab's Python copy, answering "edge"): *stable* on
//!   8080, never touched; *flap* on 8081, stopped, started and restarted through the control
//!   socket; *reload* on 8082, present in one of two valid configurations the daemon is told
//!   to reload alternately. Port 9000 matches nothing: the plain cloud path through the box;
//! * the classifier is attached with a small flow table ([`SoakOptions::flow_table`] flows)
//!   before the daemon starts, so the connection rate churns it;
//! * client threads in the client namespace open short TCP request/response connections
//!   round-robin over the four ports, and other threads run long transfers (`stream N`) from
//!   the stable service;
//! * every [`SAMPLE`] the daemon's resident set (`VmRSS`) and open descriptors are sampled.
//!
//! # What must hold ([`SoakReport::problems`])
//!
//! * no request to the cloud path (9000) and none to the stable service (8080) fails, and
//!   every long transfer delivers every byte;
//! * a request to a flapping service fails only while that service was being changed: a
//!   failure outside every disruption window (the control request's duration plus
//!   [`SETTLE`]) is a reset of a flow whose edge stayed up, and counts as a problem;
//! * the least-squares slopes of RSS and fd count over the run after [`WARM_UP`] stay within
//!   [`RSS_SLOPE_KIB_MIN`] and [`FD_SLOPE_MIN`]; for RSS, a slope over the tolerance counts
//!   only when the net growth ([`net_growth`]: the median of the last fifth of the samples
//!   over the first fifth's) is over it too. A leak raises both; the allocator's ups and
//!   downs, a few hundred KiB in a one-minute slice, can tilt the slope alone (a CI run,
//!   2026-12-03: RSS 33,844 -> 33,952 KiB over the minute, slope 1,110 KiB/min).

use std::{
    collections::BTreeMap,
    fmt, fs,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use viscum::netns;

use crate::{
    IdentityServer, Lab,
    daemon::{Daemon, DaemonConfig, DaemonFiles, Service},
    lab::CLOUD_V4,
    wait_until,
};

/// The service never touched during the run.
pub const STABLE_PORT: u16 = 8080;
/// The service stopped, started and restarted.
pub const FLAP_PORT: u16 = 8081;
/// The service added and removed by reloads.
pub const RELOAD_PORT: u16 = 8082;
/// A port nothing matches: the plain cloud path.
pub const CLOUD_PORT: u16 = 9000;
/// Every port the short clients use, in round-robin order.
pub const PORTS: [u16; 4] = [STABLE_PORT, FLAP_PORT, RELOAD_PORT, CLOUD_PORT];
/// How often RSS and fds are sampled.
pub const SAMPLE: Duration = Duration::from_secs(2);
/// The part of the run left out of the slopes (start-up allocations, first flows).
pub const WARM_UP: Duration = Duration::from_secs(10);
/// How long after a control request returns its service may still be settling.
pub const SETTLE: Duration = Duration::from_secs(3);
/// Tolerated growth of the daemon's RSS, KiB per minute (least squares after warm-up).
pub const RSS_SLOPE_KIB_MIN: f64 = 1024.0;
/// Tolerated growth of the daemon's open descriptors, per minute (health checks and control
/// connections make the count jitter by a few; one descriptor lost per change would show as
/// ~30/min at the default pace).
pub const FD_SLOPE_MIN: f64 = 6.0;
/// Bound of one short request (connect, write, each read).
const ASK: Duration = Duration::from_secs(2);

/// How long and how hard to soak.
#[derive(Debug, Clone, Copy)]
pub struct SoakOptions {
    /// Length of the load phase.
    pub duration: Duration,
    /// Threads doing short requests.
    pub clients: usize,
    /// Threads doing long transfers (each `stream` of [`SoakOptions::transfer_kib`] KiB).
    pub transfers: usize,
    /// Size of one long transfer, KiB (spread over 10 ms per KiB by the service).
    pub transfer_kib: usize,
    /// Flow table capacity (`viscum attach --flow-table-size`).
    pub flow_table: u32,
    /// Pause between two changes (flap, reload).
    pub change_every: Duration,
}

impl SoakOptions {
    /// The defaults for a run of `minutes`: 8 short clients, 2 long transfers of 200 KiB, a
    /// 1024-flow table (the smallest `viscum attach` takes), a change every 2 s.
    pub fn minutes(minutes: f64) -> SoakOptions {
        SoakOptions {
            duration: Duration::from_secs_f64(minutes * 60.0),
            clients: 8,
            transfers: 2,
            transfer_kib: 200,
            flow_table: 1024,
            change_every: Duration::from_secs(2),
        }
    }
}

/// Outcomes of requests to one port.
#[derive(Debug, Default, Clone)]
pub struct PortStats {
    /// Answered by the edge copy.
    pub edge: u64,
    /// Answered by the cloud.
    pub cloud: u64,
    /// Failures by kind ("reset", "refused", "timeout", "empty", "wrong answer", ...).
    pub failures: BTreeMap<String, u64>,
    /// Failures that overlapped a change of the port's service (excused).
    pub during_change: u64,
}

/// One change made during the run: what, and when it was in progress.
#[derive(Debug, Clone)]
struct Change {
    port: u16,
    from: Instant,
    to: Instant,
}

/// One short request: its port, when it started and ended, the answer or the failure kind.
type Outcome = (u16, Instant, Instant, Result<String, String>);

/// One resource sample of the daemon.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the load started.
    pub t: f64,
    /// `VmRSS`, KiB.
    pub rss_kib: f64,
    /// Entries of `/proc/PID/fd`.
    pub fds: f64,
}

/// What a soak saw.
#[derive(Debug, Default)]
pub struct SoakReport {
    /// The load phase's real length.
    pub elapsed: Duration,
    /// Short requests, by port.
    pub ports: BTreeMap<u16, PortStats>,
    /// Long transfers completed with every byte.
    pub transfers_ok: u64,
    /// Long transfers that failed or came up short, with why.
    pub transfer_failures: Vec<String>,
    /// Changes made (flaps, reloads) and the ones the daemon refused or failed.
    pub changes: u64,
    /// Control requests that failed (a daemon that stopped answering, or said no).
    pub change_failures: Vec<String>,
    /// Resource samples.
    pub samples: Vec<Sample>,
    /// RSS slope after warm-up, KiB/min.
    pub rss_slope: f64,
    /// RSS net growth after warm-up, KiB/min ([`net_growth`]).
    pub rss_growth: f64,
    /// fd slope after warm-up, per minute.
    pub fd_slope: f64,
    /// The datapath's counters at the end (`status.datapath`).
    pub datapath: Value,
}

impl SoakReport {
    /// Every violated property, empty when the soak passed.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for port in [STABLE_PORT, CLOUD_PORT] {
            if let Some(s) = self.ports.get(&port)
                && !s.failures.is_empty()
            {
                p.push(format!("port {port}: requests lost: {:?}", s.failures));
            }
        }
        for port in [FLAP_PORT, RELOAD_PORT] {
            if let Some(s) = self.ports.get(&port)
                && !s.failures.is_empty()
            {
                p.push(format!(
                    "port {port}: failures outside any change of its service: {:?}",
                    s.failures
                ));
            }
        }
        if let Some(s) = self.ports.get(&STABLE_PORT)
            && s.cloud > 0
        {
            p.push(format!(
                "port {STABLE_PORT}: {} requests to the always-healthy service were answered by the cloud",
                s.cloud
            ));
        }
        if !self.transfer_failures.is_empty() {
            p.push(format!(
                "{} long transfer(s) broke: {:?}",
                self.transfer_failures.len(),
                self.transfer_failures.iter().take(5).collect::<Vec<_>>()
            ));
        }
        if !self.change_failures.is_empty() {
            p.push(format!(
                "control requests failed: {:?}",
                self.change_failures
            ));
        }
        if self.rss_slope > RSS_SLOPE_KIB_MIN && self.rss_growth > RSS_SLOPE_KIB_MIN {
            p.push(format!(
                "daemon RSS grows {:.0} KiB/min, net {:.0} KiB/min (tolerance {RSS_SLOPE_KIB_MIN})",
                self.rss_slope, self.rss_growth
            ));
        }
        if self.fd_slope > FD_SLOPE_MIN {
            p.push(format!(
                "daemon fds grow {:.2}/min (tolerance {FD_SLOPE_MIN})",
                self.fd_slope
            ));
        }
        p
    }
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "soak: {:.0?} of load", self.elapsed)?;
        for (port, s) in &self.ports {
            let what = match *port {
                STABLE_PORT => "stable service",
                FLAP_PORT => "flapping service",
                RELOAD_PORT => "reloaded service",
                _ => "cloud path",
            };
            writeln!(
                f,
                "  port {port} ({what}): {} requests: {} edge, {} cloud, failures {:?}, {} excused (during a change)",
                s.edge + s.cloud + s.failures.values().sum::<u64>() + s.during_change,
                s.edge,
                s.cloud,
                s.failures,
                s.during_change
            )?;
        }
        writeln!(
            f,
            "  long transfers: {} complete, {} broken",
            self.transfers_ok,
            self.transfer_failures.len()
        )?;
        writeln!(
            f,
            "  changes: {} (flaps and reloads), {} failed",
            self.changes,
            self.change_failures.len()
        )?;
        let (first, last) = (self.samples.first(), self.samples.last());
        if let (Some(a), Some(b)) = (first, last) {
            writeln!(
                f,
                "  daemon RSS {:.0} -> {:.0} KiB, slope {:.1} KiB/min, net {:.1} KiB/min (tolerance {RSS_SLOPE_KIB_MIN}); fds {:.0} -> {:.0}, slope {:.2}/min (tolerance {FD_SLOPE_MIN}); {} samples",
                a.rss_kib,
                b.rss_kib,
                self.rss_slope,
                self.rss_growth,
                a.fds,
                b.fds,
                self.fd_slope,
                self.samples.len()
            )?;
        }
        write!(f, "  datapath: {}", self.datapath)
    }
}

/// Growth of `y` per unit of `x` from the first fifth of `points` (in `x` order) to the last
/// fifth, each taken at its median (both coordinates): a level change, robust to a hump or a
/// dip between them; 0 with fewer than two points or no distance in `x`.
pub fn net_growth(points: &[(f64, f64)]) -> f64 {
    if points.len() < 2 {
        return 0.0;
    }
    let k = (points.len() / 5).max(1);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let part = |ps: &[(f64, f64)]| {
        (
            median(&mut ps.iter().map(|p| p.0).collect()),
            median(&mut ps.iter().map(|p| p.1).collect()),
        )
    };
    let (x0, y0) = part(&points[..k]);
    let (x1, y1) = part(&points[points.len() - k..]);
    if x1 <= x0 { 0.0 } else { (y1 - y0) / (x1 - x0) }
}

/// Least-squares slope of `y` over `x` (0 with fewer than two distinct `x`).
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        return 0.0;
    }
    points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / sxx
}

/// `VmRSS` (KiB) and the number of open descriptors of `pid`.
pub fn resources(pid: i32) -> io::Result<(f64, f64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .ok_or_else(|| io::Error::other("no VmRSS"))?;
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))?.count() as f64;
    Ok((rss, fds))
}

/// One request line to the control socket at `control` and its JSON answer.
pub fn control_request(control: &Path, line: &str, timeout: Duration) -> io::Result<Value> {
    let mut s = UnixStream::connect(control)?;
    s.set_read_timeout(Some(timeout))?;
    writeln!(s, "{line}")?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(io::Error::other)
}

fn kind(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionReset => "reset".into(),
        io::ErrorKind::ConnectionRefused => "refused".into(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout".into(),
        k => format!("{k:?}"),
    }
}

/// One short request: connect, a line, the answer until the server closes.
fn ask(addr: SocketAddr) -> Result<String, String> {
    let run = || -> io::Result<String> {
        let mut c = TcpStream::connect_timeout(&addr, ASK)?;
        c.set_read_timeout(Some(ASK))?;
        c.set_write_timeout(Some(ASK))?;
        c.write_all(b"who are you?\n")?;
        let mut answer = String::new();
        c.read_to_string(&mut answer)?;
        Ok(answer.trim_end().to_string())
    };
    match run() {
        Ok(a) if a == "edge" || a == "cloud" => Ok(a),
        Ok(a) if a.is_empty() => Err("empty".into()),
        Ok(a) => Err(format!("wrong answer {a:?}")),
        Err(e) => Err(kind(&e)),
    }
}

/// One long transfer of `kib` KiB from the stable service; Ok with the byte count when
/// every byte came.
fn transfer(addr: SocketAddr, kib: usize) -> Result<usize, String> {
    let run = || -> io::Result<usize> {
        let mut c = TcpStream::connect_timeout(&addr, ASK)?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        writeln!(c, "stream {kib}")?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        loop {
            match c.read(&mut buf)? {
                0 => return Ok(got),
                n => got += n,
            }
        }
    };
    match run() {
        Ok(n) if n == kib * 1024 => Ok(n),
        Ok(n) => Err(format!("short: {n} of {} bytes", kib * 1024)),
        Err(e) => Err(kind(&e)),
    }
}

/// Runs a soak in `lab` (built by the caller) and returns what it saw; panics only when the
/// set-up fails (the daemon does not start, a service never turns healthy).
pub fn run(lab: &Lab, options: SoakOptions) -> SoakReport {
    let _clouds: Vec<IdentityServer> = PORTS
        .iter()
        .map(|p| IdentityServer::start(lab.cloud.name(), *p, "cloud"))
        .collect();
    // The small flow table: made before the daemon, which then finds the program and maps
    // pinned and keeps them.
    let size = options.flow_table.to_string();
    lab.viscum_ok(&["attach", lab.lan_if(), "--flow-table-size", &size]);

    let files = DaemonFiles::new();
    let (stable, flap, reloaded) = (
        lab.service_ns_name(),
        lab.service_ns_name(),
        lab.service_ns_name(),
    );
    let make = |with_reloaded: bool| -> DaemonConfig {
        let mut c = files.config();
        c.services.push(Service {
            drain_timeout_ms: Some(3000),
            ..files.service(&stable, STABLE_PORT.into(), "edge")
        });
        c.services.push(Service {
            drain_timeout_ms: Some(3000),
            ..files.service(&flap, FLAP_PORT.into(), "edge")
        });
        if with_reloaded {
            c.services.push(Service {
                drain_timeout_ms: Some(3000),
                ..files.service(&reloaded, RELOAD_PORT.into(), "edge")
            });
        }
        c
    };
    let (with, without) = (make(true), make(false));
    files.write(&with);
    let daemon = Daemon::start(lab, &files);
    for name in [&stable, &flap, &reloaded] {
        daemon.wait_redirected(name, Duration::from_secs(30));
    }
    let pid = daemon.pid();
    let control: PathBuf = files.control();

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let deadline = started + options.duration;

    // Short clients: each thread enters the client namespace once and keeps asking.
    let results: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let mut threads = Vec::new();
    for i in 0..options.clients {
        let (results, stop, ns) = (results.clone(), stop.clone(), lab.client.name().to_string());
        threads.push(thread::spawn(move || {
            netns::in_netns(&ns, move || {
                let mut local = Vec::new();
                let mut n = i;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let port = PORTS[n % PORTS.len()];
                    n += 1;
                    let t0 = Instant::now();
                    let r = ask(SocketAddr::new(IpAddr::V4(CLOUD_V4), port));
                    local.push((port, t0, Instant::now(), r));
                }
                results.lock().unwrap().extend(local);
            })
            .unwrap();
        }));
    }
    let transfers: Arc<Mutex<Vec<Result<usize, String>>>> = Arc::default();
    for _ in 0..options.transfers {
        let (transfers, stop, ns) = (
            transfers.clone(),
            stop.clone(),
            lab.client.name().to_string(),
        );
        let kib = options.transfer_kib;
        threads.push(thread::spawn(move || {
            netns::in_netns(&ns, move || {
                // A transfer takes kib x 10 ms: start only those that can end in time.
                let length = Duration::from_millis(10 * kib as u64 + 2000);
                while !stop.load(Ordering::Relaxed) && Instant::now() + length < deadline {
                    let r = transfer(SocketAddr::new(IpAddr::V4(CLOUD_V4), STABLE_PORT), kib);
                    transfers.lock().unwrap().push(r);
                }
            })
            .unwrap();
        }));
    }

    // Changes, from this thread, with resource samples in between.
    let mut report = SoakReport::default();
    let mut changes = Vec::new();
    let mut samples = Vec::new();
    let mut next_sample = started;
    let mut next_change = started + options.change_every;
    let mut step = 0usize;
    let mut reloaded_present = true;
    while Instant::now() < deadline {
        let now = Instant::now();
        if now >= next_sample {
            match resources(pid) {
                Ok((rss_kib, fds)) => samples.push(Sample {
                    t: now.duration_since(started).as_secs_f64(),
                    rss_kib,
                    fds,
                }),
                Err(e) => report
                    .change_failures
                    .push(format!("cannot sample the daemon: {e}")),
            }
            next_sample += SAMPLE;
        }
        if now >= next_change {
            let (port, line) = match step % 4 {
                0 => (FLAP_PORT, format!(r#"{{"cmd":"stop","service":"{flap}"}}"#)),
                1 => (
                    FLAP_PORT,
                    format!(r#"{{"cmd":"start","service":"{flap}"}}"#),
                ),
                2 => (
                    FLAP_PORT,
                    format!(r#"{{"cmd":"restart","service":"{flap}"}}"#),
                ),
                _ => {
                    reloaded_present = !reloaded_present;
                    files.write(if reloaded_present { &with } else { &without });
                    (RELOAD_PORT, r#"{"cmd":"reload"}"#.to_string())
                }
            };
            step += 1;
            let from = Instant::now();
            match control_request(&control, &line, Duration::from_secs(30)) {
                Ok(v) if v["ok"] == true => {}
                Ok(v) => report.change_failures.push(format!("{line}: {v}")),
                Err(e) => report.change_failures.push(format!("{line}: {e}")),
            }
            changes.push(Change {
                port,
                from,
                to: Instant::now() + SETTLE,
            });
            report.changes += 1;
            next_change = Instant::now() + options.change_every;
        }
        thread::sleep(
            next_sample
                .min(next_change)
                .min(deadline)
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200)),
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    report.elapsed = started.elapsed();

    for (port, from, to, r) in results.lock().unwrap().drain(..) {
        let s = report.ports.entry(port).or_default();
        match r {
            Ok(a) if a == "edge" => s.edge += 1,
            Ok(_) => s.cloud += 1,
            Err(kind) => {
                let excused = changes
                    .iter()
                    .any(|c| c.port == port && from <= c.to && to >= c.from);
                if excused {
                    s.during_change += 1;
                } else {
                    *s.failures.entry(kind).or_default() += 1;
                }
            }
        }
    }
    for r in transfers.lock().unwrap().drain(..) {
        match r {
            Ok(_) => report.transfers_ok += 1,
            Err(e) => report.transfer_failures.push(e),
        }
    }
    let after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.t >= WARM_UP.as_secs_f64())
        .collect();
    let rss: Vec<(f64, f64)> = after.iter().map(|s| (s.t / 60.0, s.rss_kib)).collect();
    report.rss_slope = slope(&rss);
    report.rss_growth = net_growth(&rss);
    report.fd_slope = slope(
        &after
            .iter()
            .map(|s| (s.t / 60.0, s.fds))
            .collect::<Vec<_>>(),
    );
    report.samples = samples;
    report.datapath = daemon
        .try_status()
        .map(|s| s["datapath"].clone())
        .unwrap_or_default();
    // And it converges: every service of the full configuration back and redirected.
    files.write(&with);
    for line in [
        r#"{"cmd":"reload"}"#.to_string(),
        format!(r#"{{"cmd":"start","service":"{flap}"}}"#),
    ] {
        match control_request(&control, &line, Duration::from_secs(30)) {
            Ok(v) if v["ok"] == true => {}
            Ok(v) => report.change_failures.push(format!("{line}: {v}")),
            Err(e) => report.change_failures.push(format!("{line}: {e}")),
        }
    }
    for name in [&stable, &flap, &reloaded] {
        let ok = wait_until(Duration::from_secs(20), || {
            daemon.try_status().is_some_and(|s| {
                s["services"].as_array().is_some_and(|a| {
                    a.iter().any(|s| {
                        s["name"] == name.as_str()
                            && s["health"] == "healthy"
                            && s["redirected"] == true
                    })
                })
            })
        });
        if !ok {
            report.change_failures.push(format!(
                "service {name} not redirected again after the soak"
            ));
        }
    }
    drop(daemon);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_is_least_squares() {
        let pts: Vec<(f64, f64)> = (0..10)
            .map(|i| (f64::from(i), 3.0 * f64::from(i) + 1.0))
            .collect();
        assert!((slope(&pts) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0), (1.0, 7.0)]), 0.0);
    }

    #[test]
    fn net_growth_sees_a_leak_but_not_a_hump() {
        let leak: Vec<(f64, f64)> = (0..25)
            .map(|i| (f64::from(i), 2.0 * f64::from(i)))
            .collect();
        assert!((net_growth(&leak) - 2.0).abs() < 1e-9);
        // Up by 10 in the middle, back down at the end: the slope leans, the level does not.
        let hump: Vec<(f64, f64)> = (0..25)
            .map(|i| (f64::from(i), if (8..20).contains(&i) { 10.0 } else { 0.0 }))
            .collect();
        assert!(slope(&hump) > 0.0);
        assert_eq!(net_growth(&hump), 0.0);
        assert_eq!(net_growth(&[(1.0, 5.0)]), 0.0);
    }
}
