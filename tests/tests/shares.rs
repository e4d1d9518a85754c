//! Network shares (`[engine.network]`, `[service.network]`): the client-facing link divided
//! among edge services by weight, by an HTB qdisc the daemon puts on `lan0` and the class the
//! reply classifier gives each service's replies (`skb->priority`).
//!
//! Two iperf3 servers run as daemon services with shares 1 and 3 behind a 50 Mbit/s link
//! (the HTB's own rate is the bottleneck); clients download from both at once (`iperf3 -R`,
//! the server sends), then from each alone. Run with `--nocapture` to see the figures.

use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use viscum::{netns, shares};
use viscum_tests::{
    Lab,
    daemon::{Daemon, DaemonFiles},
    lab::{CLOUD_V4, LAN_IF},
    skip_unless_root, wait_until,
};

mod common;
use common::{global_stats, iperf3_client};

/// The link the test shapes to, in Mbit/s.
const LINK_MBIT: u64 = 50;

/// The daemon's configuration: `lan0` shaped to [`LINK_MBIT`], iperf3 services `(name,
/// port, share)`. Their health check reads the socket table instead of connecting: iperf3
/// takes a connect probe for a client, and when it gives up on it re-opens its listening
/// socket, resetting a real client that arrives meanwhile (`viscum_lab::demo::listening_check`).
fn config(files: &DaemonFiles, services: &[(&str, u16, u32)]) -> String {
    let mut text = format!(
        "[engine]\ninterfaces = [\"{LAN_IF}\"]\ncontrol = \"{}\"\nrun_dir = \"{}\"\n\n\
         [engine.network]\nrate = \"{LINK_MBIT}mbit\"\n",
        files.control().display(),
        files.run_dir().display()
    );
    for (name, port, share) in services {
        text.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nmatch = [\"tcp://{CLOUD_V4}:{port}\"]\n\
             command = [\"/usr/bin/iperf3\", \"-s\", \"-p\", \"{port}\"]\n\
             [service.health]\nexec = [\"/usr/bin/grep\", \"-qE\", \":{port:04X} [0-9A-F]+:0000 0A\", \"/proc/net/tcp\", \"/proc/net/tcp6\"]\ninterval_ms = 1000\ntimeout_ms = 500\nrise = 1\nfall = 3\n\
             [service.network]\nshare = {share}\n"
        ));
    }
    text
}

/// The root qdisc of the edge's `lan0`: (kind, handle major).
fn lan_root(lab: &Lab) -> (String, u16) {
    let ifindex = lab.edge_ifindex(LAN_IF);
    lab.edge.block_on(move || async move {
        let h = netns::handle_here().await.expect("netlink in edge");
        let q = shares::root_qdisc(&h, ifindex)
            .await
            .expect("dump qdiscs")
            .expect("lan0 has a root qdisc");
        (q.kind, q.major)
    })
}

/// Entries of the pinned `VISCUM_SHARES` map (host-veth ifindex -> priority).
fn shares_map(lab: &Lab) -> Vec<(u32, u32)> {
    let path = lab.bpffs.path().join(viscum_common::SHARES_MAP);
    let Ok(data) = MapData::from_pin(&path) else {
        return Vec::new();
    };
    let map: HashMap<MapData, u32, u32> =
        HashMap::try_from(Map::from_map_data(data).expect("a map")).expect("a u32 hash");
    map.iter().filter_map(Result::ok).collect()
}

/// Received Mbit/s of an `iperf3 -R` run against the cloud address's `port`.
fn download(lab: &Lab, port: u16, secs: u32) -> f64 {
    let addr = SocketAddr::new(IpAddr::V4(CLOUD_V4), port);
    let t = secs.to_string();
    let report = iperf3_client(lab.client.name(), addr, &["-R", "-t", &t, "-O", "1"])
        .unwrap_or_else(|e| panic!("iperf3 -R to {addr}: {e}"));
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("a received rate")
        / 1e6
}

/// Shares 1 and 3 split a busy link about 25 % / 75 %; either alone takes the whole link
/// (what the other leaves is borrowed). The daemon removes its qdisc when it stops.
#[test]
fn two_services_split_the_link_by_their_shares() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let (small, big) = (lab.service_ns_name(), lab.service_ns_name());
    files.write_raw(&config(&files, &[(&small, 5201, 1), (&big, 5202, 3)]));
    assert_eq!(
        lan_root(&lab).0,
        "noqueue",
        "lan0 starts with the kernel's default"
    );
    let daemon = Daemon::start(&lab, &files);
    daemon.wait_redirected(&small, Duration::from_secs(20));
    daemon.wait_redirected(&big, Duration::from_secs(20));
    assert_eq!(lan_root(&lab), ("htb".into(), shares::HTB_MAJOR));
    // Both service veths have their class in the map before anything is measured.
    assert!(
        wait_until(Duration::from_secs(10), || shares_map(&lab).len() == 2),
        "VISCUM_SHARES never had both services: {:?}\n{}",
        shares_map(&lab),
        daemon.log()
    );
    let prios: Vec<u32> = shares_map(&lab).into_iter().map(|(_, p)| p).collect();
    assert!(
        prios
            .iter()
            .all(|p| p >> 16 == u32::from(shares::HTB_MAJOR)),
        "{prios:x?}"
    );

    // Both at once.
    let (a, b) = thread::scope(|s| {
        let a = s.spawn(|| download(&lab, 5201, 6));
        let b = s.spawn(|| download(&lab, 5202, 6));
        (a.join().unwrap(), b.join().unwrap())
    });
    let total = a + b;
    let small_part = a / total;
    println!(
        "shares 1:3 on a {LINK_MBIT} Mbit/s link, both busy: {a:.1} + {b:.1} = {total:.1} Mbit/s, \
         split {:.1} % / {:.1} %",
        small_part * 100.0,
        (1.0 - small_part) * 100.0
    );
    assert!(
        (0.15..=0.35).contains(&small_part),
        "share 1 got {:.1} % of the link (want 25 % +- 10 points): {a:.1} vs {b:.1} Mbit/s",
        small_part * 100.0
    );
    // Every reply took the reply classifier's redirect, the path that sets the class (the
    // kernel's forwarding would rewrite the priority from the TOS byte).
    let g = global_stats(&lab);
    assert!(g["replies_forwarded"].as_u64() > Some(100), "{g}");
    assert_eq!(g["replies_to_stack"].as_u64(), Some(0), "{g}");
    // Together they fill the link (goodput is ~95 % of the frames' bytes).
    assert!(
        total >= LINK_MBIT as f64 * 0.85,
        "only {total:.1} Mbit/s in all"
    );
    assert!(
        total <= LINK_MBIT as f64 * 1.05,
        "{total:.1} Mbit/s: not shaped"
    );

    // Alone, each borrows the rest.
    for (port, share) in [(5201, 1), (5202, 3)] {
        let alone = download(&lab, port, 3);
        println!(
            "share {share} alone: {alone:.1} Mbit/s ({:.0} % of the link)",
            alone / LINK_MBIT as f64 * 100.0
        );
        assert!(
            alone >= LINK_MBIT as f64 * 0.85,
            "share {share} alone got {alone:.1} Mbit/s of {LINK_MBIT}"
        );
    }

    let status = daemon.stop();
    assert!(status.success(), "daemon exit: {status}");
    assert_eq!(
        lan_root(&lab).0,
        "noqueue",
        "the daemon leaves lan0 as it found it"
    );
}

/// A root qdisc the router already has is never replaced: the daemon refuses to start,
/// naming it, and leaves it alone.
#[test]
fn a_foreign_root_qdisc_is_refused_and_left_alone() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let svc = lab.service_ns_name();
    files.write_raw(&config(&files, &[(&svc, 5201, 1)]));
    // The router's own shaping: an HTB of another handle.
    let ifindex = lab.edge_ifindex(LAN_IF);
    lab.edge.block_on(move || async move {
        let h = netns::handle_here().await.unwrap();
        shares::add_qdisc(&h, ifindex, 1, 1).await.unwrap();
    });
    let config = files.config_path();
    let out = lab.viscum(&["run", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the daemon started over a foreign qdisc:\n{stderr}"
    );
    assert!(
        stderr.contains("lan0 already has a root qdisc 'htb' (handle 1:)"),
        "the error names the qdisc:\n{stderr}"
    );
    assert_eq!(
        lan_root(&lab),
        ("htb".into(), 1),
        "the router's qdisc stays"
    );
    assert!(
        !lab.bpffs.path().join("prog_ingress").exists(),
        "nothing was attached before the refusal"
    );
}

/// Class `7663:minor`'s rate on the edge's `lan0`, in Mbit/s; `None` without such a class.
fn class_mbit(lab: &Lab, minor: u16) -> Option<u64> {
    let ifindex = lab.edge_ifindex(LAN_IF);
    lab.edge.block_on(move || async move {
        let h = netns::handle_here().await.expect("netlink in edge");
        shares::classes(&h, ifindex)
            .await
            .expect("dump classes")
            .into_iter()
            .find(|(c, _, _)| c.major == shares::HTB_MAJOR && c.minor == minor)
            .map(|(_, rate, _)| rate.bits() / 1_000_000)
    })
}

/// A reload applies a changed share to the class in place (the service keeps running), and
/// removing `[engine.network]` removes the qdisc and the map's entries; adding it back puts
/// them back.
#[test]
fn a_reload_changes_shares_in_place_and_turns_them_off_and_on() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let svc = lab.service_ns_name();
    files.write_raw(&config(&files, &[(&svc, 5201, 1)]));
    let daemon = Daemon::start(&lab, &files);
    let pid = daemon.wait_redirected(&svc, Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(10), || shares_map(&lab).len() == 1),
        "no map entry: {}",
        daemon.log()
    );
    // Link 50, other traffic 1, the service 1: 25 Mbit/s each.
    assert_eq!(class_mbit(&lab, shares::DEFAULT_MINOR), Some(25));
    assert_eq!(class_mbit(&lab, shares::FIRST_SERVICE_MINOR), Some(25));

    let reload = |text: String| {
        files.write_raw(&text);
        let r = daemon
            .request(r#"{"cmd":"reload"}"#)
            .expect("an answer to reload");
        assert_eq!(r["ok"], true, "reload refused: {r}\n{}", daemon.log());
    };
    reload(config(&files, &[(&svc, 5201, 4)]));
    assert!(
        wait_until(Duration::from_secs(10), || class_mbit(
            &lab,
            shares::FIRST_SERVICE_MINOR
        ) == Some(40)),
        "share 4 of 5 is 40 Mbit/s: {:?}",
        class_mbit(&lab, shares::FIRST_SERVICE_MINOR)
    );
    assert_eq!(class_mbit(&lab, shares::DEFAULT_MINOR), Some(10));
    assert_eq!(
        daemon.service(&svc)["pid"].as_i64(),
        Some(i64::from(pid)),
        "a share change does not restart the service"
    );

    // Off: no qdisc, no entries.
    let off = config(&files, &[(&svc, 5201, 1)])
        .replace(
            &format!("[engine.network]\nrate = \"{LINK_MBIT}mbit\"\n"),
            "",
        )
        .replace("[service.network]\nshare = 1\n", "");
    assert!(!off.contains("network"), "{off}");
    reload(off);
    assert_eq!(lan_root(&lab).0, "noqueue");
    assert!(shares_map(&lab).is_empty(), "{:?}", shares_map(&lab));

    // On again.
    reload(config(&files, &[(&svc, 5201, 1)]));
    assert_eq!(lan_root(&lab), ("htb".into(), shares::HTB_MAJOR));
    assert!(
        wait_until(Duration::from_secs(10), || shares_map(&lab).len() == 1),
        "no map entry after turning shares on again: {}",
        daemon.log()
    );
    assert!(daemon.stop().success());
    assert_eq!(lan_root(&lab).0, "noqueue");
}
