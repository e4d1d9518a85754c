//! The paper's use cases as runnable demos (`cargo xtask run --demo NAME`): each builds its
//! own lab (client, edge, cloud namespaces, as [`crate::Lab`]), runs the real `viscum run`
//! daemon in the edge, measures what a client sees with the cloud serving and then with the
//! edge copy serving, prints both, and removes everything.
//!
//! * [`speedtest`]: iperf3 TCP and UDP downloads from the cloud (across a 20 Mbit/s
//!   backhaul) and from the edge copy (across the 100 Mbit/s last mile only).
//! * [`alpr`]: license-plate recognition: camera images uploaded over HTTP, and only a short
//!   text result per image sent to a collector in the cloud: the uploaded bytes against the
//!   bytes that crossed the uplink, and `viscum stats`.
//!
//! With `smoke` each runs briefly (a few seconds of traffic): the integration tests
//! (`tests/tests/demos.rs`) run them so, and check their figures.

pub mod alpr;
pub mod speedtest;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use futures::TryStreamExt as _;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use viscum::{netns, shares};

use crate::{Lab, LabNames, LabOptions, guard::Bpffs, say, wait_until};

/// Which demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Demo {
    /// iperf3 TCP and UDP at the edge vs from the cloud.
    Speedtest,
    /// Image uploads recognised at the edge, text results to the cloud.
    Alpr,
}

/// What a demo measured.
#[derive(Debug, Clone)]
pub enum Report {
    /// [`speedtest`]'s figures.
    Speedtest(speedtest::Figures),
    /// [`alpr`]'s figures.
    Alpr(alpr::Figures),
}

/// Runs `demo` (briefly with `smoke`) and returns its figures; everything it made is
/// removed, on error too.
///
/// # Errors
/// A step that failed (the lab, the daemon, a server or a client), with its context.
pub fn run(demo: Demo, smoke: bool) -> Result<Report> {
    let lab = Lab::build(&LabNames::unique(), Bpffs::new(), LabOptions::default())
        .context("build the demo's lab")?;
    say!(
        "demo: lab {} (client) -- {} (edge, viscum) -- {} (cloud)",
        lab.client.name(),
        lab.edge.name(),
        lab.cloud.name()
    );
    match demo {
        Demo::Speedtest => speedtest::run(&lab, smoke).map(Report::Speedtest),
        Demo::Alpr => alpr::run(&lab, smoke).map(Report::Alpr),
    }
}

/// A process in a namespace, killed on drop.
pub struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    /// `nsenter --net=/run/netns/NS ARGS...` with its output discarded.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn spawn(ns: &str, args: &[&str]) -> Result<Proc> {
        let child = Command::new("nsenter")
            .arg(format!("--net={}/{ns}", netns::NETNS_RUN_DIR))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {} in {ns}", args.join(" ")))?;
        Ok(Proc {
            child,
            what: args.join(" "),
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Our own child, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proc({}, pid {})", self.what, self.child.id())
    }
}

/// Waits until something listens on TCP `port` in `ns`, from the kernel's socket table
/// (not by connecting: an iperf3 server takes a connection that sends nothing for a client
/// and resets the next real one while it gives up on it).
///
/// # Errors
/// When nothing does within 10 s.
pub fn wait_listening(ns: &str, port: u16) -> Result<()> {
    let want = format!(":{port:04X}");
    let listening = || {
        let want = want.clone();
        netns::in_netns(ns, move || {
            ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
                .iter()
                .filter_map(|p| std::fs::read_to_string(p).ok())
                .any(|t| {
                    // local_address is the 2nd column, the state (0A: LISTEN) the 4th.
                    t.lines().any(|l| {
                        let cols: Vec<&str> = l.split_whitespace().collect();
                        cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A"
                    })
                })
        })
        .unwrap_or(false)
    };
    if !wait_until(Duration::from_secs(10), listening) {
        bail!("nothing listens on port {port} in {ns}");
    }
    Ok(())
}

/// A health check (`exec`) that passes while something listens on TCP `port` in the
/// service's namespace, read from the kernel's socket table. For iperf3, which a TCP
/// connect check would disturb: it takes the probe for a client that sends nothing, and
/// re-opens its listening socket when it gives up on it, resetting a real client that
/// arrives meanwhile.
pub fn listening_check(port: u16) -> Vec<String> {
    vec![
        "/usr/bin/grep".into(),
        "-qE".into(),
        format!(":{port:04X} [0-9A-F]+:0000 0A"),
        "/proc/net/tcp".into(),
        "/proc/net/tcp6".into(),
    ]
}

/// Limits the egress of `iface` in namespace `ns` to `rate` with an HTB qdisc of one class
/// (the same netlink code as Viscum's network shares): a slow link, as the demos' backhaul
/// and last mile. Removed with the namespace.
///
/// # Errors
/// When the kernel refuses the qdisc.
pub fn limit_egress(ns: &str, iface: &str, rate: shares::Rate) -> Result<()> {
    let (ns2, iface2) = (ns.to_owned(), iface.to_owned());
    crate::block_on(async move {
        let h = netns::handle_in(&ns2).await?;
        let ifindex = netns::link_by_name(&h, &iface2).await?.index;
        shares::add_qdisc(&h, ifindex, 1, 1).await?;
        let params = shares::ClassParams {
            rate,
            ceil: rate,
            quantum: 65_536,
            burst: 2 * 65_536 + 1_514,
        };
        shares::set_class(
            &h,
            ifindex,
            1,
            1,
            netlink_packet_route::tc::TcHandle { major: 1, minor: 0 },
            params,
        )
        .await?;
        Ok::<_, anyhow::Error>(())
    })
    .with_context(|| format!("cannot limit {iface} in {ns} to {rate}"))
}

/// Bytes `iface` in namespace `ns` has sent so far (its kernel counter, `tx_bytes`).
///
/// # Errors
/// When the interface cannot be read.
pub fn tx_bytes(ns: &str, iface: &str) -> Result<u64> {
    let (ns2, iface2) = (ns.to_owned(), iface.to_owned());
    crate::block_on(async move {
        let h = netns::handle_in(&ns2).await?;
        let msg: Option<LinkMessage> = h
            .link()
            .get()
            .match_name(iface2.clone())
            .execute()
            .try_next()
            .await?;
        let stats = msg
            .into_iter()
            .flat_map(|m| m.attributes)
            .find_map(|a| match a {
                LinkAttribute::Stats64(s) => Some(s.tx_bytes),
                _ => None,
            });
        stats.ok_or_else(|| anyhow::anyhow!("{iface2} reports no counters"))
    })
    .with_context(|| format!("cannot read the counters of {iface} in {ns}"))
}

/// `iperf3 -c ADDR -p PORT -J ARGS` from namespace `ns` (at most 60 s): its JSON report.
///
/// # Errors
/// When iperf3 cannot run, prints no JSON, or reports an error.
pub fn iperf3(ns: &str, addr: std::net::SocketAddr, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("timeout")
        .arg("60")
        .arg("nsenter")
        .arg(format!("--net={}/{ns}", netns::NETNS_RUN_DIR))
        .args([
            "iperf3",
            "-c",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
        ])
        .args(["-J", "--connect-timeout", "3000"])
        .args(args)
        .output()
        .context("cannot run iperf3 (apt-get install iperf3)")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 {} printed no JSON: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 -c {addr} {}: {e}", args.join(" "));
    }
    Ok(v)
}

/// A file under the demo's daemon directory, readable by the services' user.
///
/// # Errors
/// When it cannot be written.
pub fn write_script(dir: &Path, name: &str, text: &str) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    Ok(path)
}

/// A figure in bytes, for people: `812 B`, `3.1 KB`, `2.4 MB` (powers of 1000).
pub fn human_bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} KB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}
