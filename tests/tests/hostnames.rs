//! Cloud host names: entries follow DNS answers and their TTLs, and stale addresses go.
//! A small authoritative DNS responder in the cloud namespace plays the cloud's DNS.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use viscum_tests::{Dns, IdentityServer, Lab, Proto, Zone, ask, skip_unless_root, wait_until};

const TIMEOUT: Duration = Duration::from_secs(3);
fn matches(lab: &Lab) -> Vec<String> {
    let v: Value = serde_json::from_str(&lab.viscum_ok(&["redirect", "list", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["match"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn host_name_entries_follow_dns_and_leave_no_stale_address() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    lab.viscum_ok(&["attach", "lan0"]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let _edge = IdentityServer::start(&ns, cloud.port(), "edge");
    let [v4, v6] = lab.cloud_addrs(cloud.port());
    let zone = Zone::default();
    zone.lock()
        .unwrap()
        .insert("alpr.example.net".into(), vec![v4.ip()]);
    let _dns = Dns::start(lab.cloud.name(), zone.clone());
    let m = format!("tcp://alpr.example.net:{}", cloud.port());
    let who = |a: SocketAddr| ask(lab.client.name(), Proto::Tcp, a, TIMEOUT).unwrap();

    // One-shot: the CLI resolves once and adds an entry per address.
    let out = lab.viscum_ok(&["redirect", "add", &m, "--ns", &ns, "--dns", "198.51.100.7"]);
    assert!(out.contains(&format!("tcp://{v4}")), "{out}");
    assert_eq!(who(v4), "edge");
    lab.viscum_ok(&["redirect", "del", &m, "--dns", "198.51.100.7"]);
    assert_eq!(who(v4), "cloud");
    let err = lab.viscum_err(&[
        "redirect",
        "add",
        "tcp://nosuch.example.net:80",
        "--ns",
        &ns,
        "--dns",
        "198.51.100.7",
    ]);
    assert!(err.contains("resolves to no address"), "{err}");

    // Following: entries track the answers.
    let mut follow = lab
        .viscum_command(&[
            "redirect",
            "follow",
            &m,
            "--ns",
            &ns,
            "--dns",
            "198.51.100.7",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || matches(&lab)
            == [format!("tcp://{v4}")]),
        "{:?}",
        matches(&lab)
    );
    assert_eq!(who(v4), "edge");
    assert_eq!(who(v6), "cloud");

    // The name moves to the IPv6 address: the IPv4 entry must go (TTL 1 s).
    zone.lock()
        .unwrap()
        .insert("alpr.example.net".into(), vec![v6.ip()]);
    assert!(
        wait_until(Duration::from_secs(6), || matches(&lab)
            == [format!("tcp://{v6}")]),
        "entries did not follow DNS: {:?}",
        matches(&lab)
    );
    assert_eq!(who(v4), "cloud", "no stale address left behind");
    assert_eq!(who(v6), "edge");

    // Stopping the follower removes what it added.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(follow.id() as i32, libc::SIGINT) };
    assert!(wait_until(Duration::from_secs(5), || follow
        .try_wait()
        .unwrap()
        .is_some()));
    assert!(matches(&lab).is_empty(), "{:?}", matches(&lab));
    assert_eq!(who(v6), "cloud");
}
