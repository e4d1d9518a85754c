//! The speed test (`cargo xtask run --demo speedtest`): an iperf3 server is a speed-test
//! service; from the cloud it measures the backhaul, from the edge the last mile, which is
//! what a subscriber wants to know.
//!
//! ```text
//!  client ==== 100 Mbit/s last mile ==== edge ---- 20 Mbit/s backhaul ---- cloud
//!                                          |                               iperf3 -s :5201
//!                                        speedtest (viscum run service): iperf3 -s :5201
//! ```
//!
//! The client runs the same iperf3 downloads (TCP, and UDP offered at 60 Mbit/s) against
//! the cloud address twice: first with the cloud serving, then with the edge copy serving
//! (the daemon redirects TCP and UDP port 5201 of the cloud address into its namespace).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result};
use viscum::shares::Rate;

use super::{Proc, iperf3, limit_egress, wait_listening};
use crate::{
    Check, Daemon, DaemonFiles, Lab, Service,
    daemon::Health,
    lab::{CLIENT_IF, CLOUD_IF, CLOUD_V4, LAN_IF, WAN_IF},
    say,
};

/// The port of the speed-test service.
const PORT: u16 = 5201;
/// The last mile (client <-> edge), Mbit/s.
pub const LAST_MILE_MBIT: u64 = 100;
/// The backhaul (edge <-> cloud), Mbit/s.
pub const BACKHAUL_MBIT: u64 = 20;
/// What the UDP test offers, Mbit/s: more than the backhaul, less than the last mile.
pub const UDP_OFFER_MBIT: u64 = 60;

/// One side's results.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Side {
    /// TCP download, Mbit/s received.
    pub tcp_mbit: f64,
    /// UDP download offered at 60 Mbit/s, Mbit/s received.
    pub udp_mbit: f64,
    /// UDP datagrams lost, percent.
    pub udp_loss: f64,
}

/// What the speed test measured, served by the cloud and by the edge copy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    /// Served from the cloud, across the backhaul.
    pub cloud: Side,
    /// Served by the edge copy.
    pub edge: Side,
    /// The shaped rates, Mbit/s: (last mile, backhaul).
    pub links: (u64, u64),
}

fn measure(lab: &Lab, smoke: bool) -> Result<Side> {
    let addr = SocketAddr::new(IpAddr::V4(CLOUD_V4), PORT);
    let secs = if smoke { "2" } else { "5" };
    let tcp = iperf3(lab.client.name(), addr, &["-R", "-t", secs, "-O", "1"])?;
    let tcp_mbit = tcp["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 reported no TCP rate")?
        / 1e6;
    let offer = format!("{UDP_OFFER_MBIT}M");
    let udp = iperf3(
        lab.client.name(),
        addr,
        &[
            "-u",
            "-R",
            "-b",
            &offer,
            "-t",
            if smoke { "1" } else { "5" },
        ],
    )?;
    let sum = if udp["end"]["sum_received"].is_object() {
        &udp["end"]["sum_received"]
    } else {
        &udp["end"]["sum"]
    };
    Ok(Side {
        tcp_mbit,
        udp_mbit: sum["bits_per_second"]
            .as_f64()
            .context("iperf3 reported no UDP rate")?
            / 1e6,
        udp_loss: udp["end"]["sum"]["lost_percent"].as_f64().unwrap_or(0.0),
    })
}

/// Runs the speed test in `lab` (see the [module](self)).
///
/// # Errors
/// A step that failed.
pub fn run(lab: &Lab, smoke: bool) -> Result<Figures> {
    let (client, edge, cloud) = (lab.client.name(), lab.edge.name(), lab.cloud.name());
    let mbit = |m: u64| Rate::from_bits(m * 1_000_000);
    limit_egress(client, CLIENT_IF, mbit(LAST_MILE_MBIT))?;
    limit_egress(edge, LAN_IF, mbit(LAST_MILE_MBIT))?;
    limit_egress(edge, WAN_IF, mbit(BACKHAUL_MBIT))?;
    limit_egress(cloud, CLOUD_IF, mbit(BACKHAUL_MBIT))?;
    say!(
        "demo: last mile {LAST_MILE_MBIT} Mbit/s (client <-> edge), backhaul {BACKHAUL_MBIT} \
         Mbit/s (edge <-> cloud)"
    );

    let port = PORT.to_string();
    let _cloud_server = Proc::spawn(cloud, &["iperf3", "-s", "-p", &port])?;
    wait_listening(cloud, PORT)?;
    say!("demo: iperf3 -s on {CLOUD_V4}:{PORT} in the cloud; measuring from the client...");
    let from_cloud = measure(lab, smoke).context("the speed test from the cloud")?;

    let files = DaemonFiles::new();
    let name = lab.service_ns_name();
    let mut config = files.config();
    config.services.push(Service {
        matches: vec![
            format!("tcp://{CLOUD_V4}:{PORT}"),
            format!("udp://{CLOUD_V4}:{PORT}"),
        ],
        health: Some(Health {
            check: Check::Exec(super::listening_check(PORT)),
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 1,
            fall: 3,
        }),
        ..Service::new(
            &name,
            vec![
                "/usr/bin/iperf3".into(),
                "-s".into(),
                "-p".into(),
                port.clone(),
            ],
        )
    });
    files.write(&config);
    say!(
        "demo: viscum run with service {name}: iperf3 -s -p {PORT}, matching tcp and udp {CLOUD_V4}:{PORT}"
    );
    let daemon = Daemon::start(lab, &files);
    daemon.wait_redirected(&name, Duration::from_secs(30));
    say!("demo: the edge copy is healthy and redirected; measuring again...");
    let at_edge = measure(lab, smoke).context("the speed test at the edge")?;
    let status = daemon.stop();
    if !status.success() {
        anyhow::bail!("the daemon exited with {status}");
    }

    let figures = Figures {
        cloud: from_cloud,
        edge: at_edge,
        links: (LAST_MILE_MBIT, BACKHAUL_MBIT),
    };
    print(&figures);
    Ok(figures)
}

fn print(f: &Figures) {
    say!(
        r#"
=========================== speedtest: results ===========================
                                from the cloud        at the edge (viscum)
  TCP download                  {:>7.1} Mbit/s        {:>7.1} Mbit/s
  UDP download ({UDP_OFFER_MBIT} Mbit/s sent)   {:>7.1} Mbit/s        {:>7.1} Mbit/s
  UDP loss                      {:>7.1} %             {:>7.1} %

  The cloud's result is the {} Mbit/s backhaul; the edge copy measures the
  subscriber's own {} Mbit/s last mile, which is what a speed test is for.
=========================================================================="#,
        f.cloud.tcp_mbit,
        f.edge.tcp_mbit,
        f.cloud.udp_mbit,
        f.edge.udp_mbit,
        f.cloud.udp_loss,
        f.edge.udp_loss,
        f.links.1,
        f.links.0
    );
}
