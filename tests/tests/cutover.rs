//! Flow-consistent cutover: connections keep the side they started on when an entry appears,
//! drains or learns.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::{EchoServer, Held, TIMEOUT};
use serde_json::Value;
use viscum_tests::{IdentityServer, Lab, skip_unless_root, udp_ask, wait_until};

fn setup() -> (Lab, String) {
    let lab = Lab::new();
    // A short FIN linger keeps the drain test quick.
    lab.viscum_ok(&["attach", "lan0", "--linger", "1"]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    (lab, ns)
}

fn entries(lab: &Lab) -> Vec<Value> {
    let out = lab.viscum_ok(&["redirect", "list", "--json"]);
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_transfer_open_with_the_cloud_survives_the_edge_coming_up() {
    if skip_unless_root() {
        return;
    }
    let (lab, ns) = setup();
    let cloud = EchoServer::start(lab.cloud.name(), 0, "cloud");
    let _edge = EchoServer::start(&ns, cloud.port, "edge");
    let orphans = |lab: &Lab| -> u64 {
        let stats: Value = serde_json::from_str(&lab.viscum_ok(&["stats", "--json"])).unwrap();
        stats["global"]["flow_orphans"].as_u64().unwrap()
    };
    for addr in lab.cloud_addrs(cloud.port) {
        let before = orphans(&lab);
        let mut long = Held::open(lab.client.name(), addr);
        assert_eq!(
            long.exchange("a", 3).unwrap(),
            ["cloud:a0", "cloud:a1", "cloud:a2"]
        );

        lab.viscum_ok(&["redirect", "add", &format!("tcp://{addr}"), "--ns", &ns]);
        // A connection opened after the cutover is served at the edge...
        let mut fresh = Held::open(lab.client.name(), addr);
        assert_eq!(fresh.exchange("b", 1).unwrap(), ["edge:b0"], "{addr}");
        // ...while the one that began with the cloud carries on there, unbroken.
        let rest = long
            .exchange("c", 50)
            .unwrap_or_else(|e| panic!("{addr}: the cloud connection broke: {e}"));
        assert!(rest.iter().all(|l| l.starts_with("cloud:")), "{rest:?}");
        // Its 50 exchanges (100 and more segments from the client) were recognised as the
        // cloud's once, not one socket lookup per segment: the answer is kept for the flow.
        let asked = orphans(&lab) - before;
        assert!(
            (1..=3).contains(&asked),
            "{addr}: the cloud connection's segments were placed by {asked} socket lookups"
        );
        long.close();
        fresh.close();
        lab.viscum_ok(&["redirect", "del", &format!("tcp://{addr}")]);
    }
}

#[test]
fn a_draining_entry_keeps_its_edge_flows_and_sends_new_ones_to_the_cloud() {
    if skip_unless_root() {
        return;
    }
    let (lab, ns) = setup();
    let cloud = EchoServer::start(lab.cloud.name(), 0, "cloud");
    let _edge = EchoServer::start(&ns, cloud.port, "edge");
    let [v4, v6] = lab.cloud_addrs(cloud.port);
    for addr in [v4, v6] {
        lab.viscum_ok(&["redirect", "add", &format!("tcp://{addr}"), "--ns", &ns]);
    }
    let mut at_edge = Held::open(lab.client.name(), v4);
    assert_eq!(at_edge.exchange("a", 1).unwrap(), ["edge:a0"]);

    let out = lab.viscum_ok(&["redirect", "drain", &format!("tcp://{v4}")]);
    assert!(out.contains("draining"), "{out}");
    let listed = entries(&lab);
    let e = listed
        .iter()
        .find(|e| e["match"] == format!("tcp://{v4}"))
        .unwrap();
    assert_eq!(e["draining"], true);
    assert_eq!(e["live_flows"], 1, "{e}");

    let mut new = Held::open(lab.client.name(), v4);
    assert_eq!(
        new.exchange("n", 1).unwrap(),
        ["cloud:n0"],
        "new flows go to the cloud while draining"
    );
    let rest = at_edge
        .exchange("b", 50)
        .expect("the edge connection survives the drain");
    assert!(rest.iter().all(|l| l.starts_with("edge:")), "{rest:?}");

    // `--delete-after` waits for the last edge flow to end, then deletes the entry.
    let mut waiter = lab
        .viscum_command(&[
            "redirect",
            "drain",
            &format!("tcp://{v4}"),
            "--delete-after",
            "20",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        !wait_until(Duration::from_millis(600), || waiter
            .try_wait()
            .unwrap()
            .is_some()),
        "the drain must wait while an edge flow is open"
    );
    at_edge.close();
    new.close();
    // FIN seen: the flow lingers (1 s here) before it stops counting as live.
    assert!(
        wait_until(Duration::from_secs(25), || waiter
            .try_wait()
            .unwrap()
            .is_some()),
        "drain never finished"
    );
    assert!(waiter.wait().unwrap().success());
    assert!(
        entries(&lab)
            .iter()
            .all(|e| e["match"] != format!("tcp://{v4}")),
        "the drained entry is gone"
    );
    assert_eq!(
        tcp_ask_line(&lab, v6),
        "edge:x",
        "the other entry is untouched"
    );
}

/// An entry re-pointed at another namespace while one of its connections is busy (its
/// segments served by the flow cache a moment before): the connection is cut (its next
/// segment reaches the cloud, which resets it), never answered by the old copy again, and a
/// new connection reaches the new namespace. The cache's part is checked packet by packet,
/// on one CPU, in `flow_cache.rs`; this is the same change under real traffic.
#[test]
fn a_busy_edge_connection_obeys_a_re_pointed_entry_from_its_next_segment() {
    if skip_unless_root() {
        return;
    }
    let (lab, ns) = setup();
    let other = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &other]);
    let cloud = EchoServer::start(lab.cloud.name(), 0, "cloud");
    let _edge = EchoServer::start(&ns, cloud.port, "edge");
    let _other = EchoServer::start(&other, cloud.port, "other");
    for addr in lab.cloud_addrs(cloud.port) {
        let entry = format!("tcp://{addr}");
        lab.viscum_ok(&["redirect", "add", &entry, "--ns", &ns]);
        let mut busy = Held::open(lab.client.name(), addr);
        // Enough exchanges that every CPU the client ran on has the flow in its cache.
        let lines = busy.exchange("a", 200).unwrap();
        assert!(lines.iter().all(|l| l.starts_with("edge:")), "{lines:?}");

        lab.viscum_ok(&["redirect", "del", &entry, "--now"]);
        lab.viscum_ok(&["redirect", "add", &entry, "--ns", &other]);
        match busy.exchange("b", 1) {
            Ok(l) => panic!("{addr}: the cut connection was still answered: {l:?}"),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                ),
                "{addr}: the cut connection ended with {e} (expected the cloud's reset)"
            ),
        }
        assert_eq!(
            tcp_ask_line(&lab, addr),
            "other:x",
            "{addr}: a new connection"
        );
        lab.viscum_ok(&["redirect", "del", &entry, "--now"]);
    }
}

fn tcp_ask_line(lab: &Lab, addr: SocketAddr) -> String {
    let mut h = Held::open(lab.client.name(), addr);
    let r = h.exchange("x", 1).unwrap().remove(0);
    h.close();
    r.trim_end_matches('0').to_string()
}

#[test]
fn udp_flows_seen_while_an_entry_learns_stay_with_the_cloud() {
    if skip_unless_root() {
        return;
    }
    let (lab, ns) = setup();
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let _edge = IdentityServer::start(&ns, cloud.port(), "edge");
    let [v4, _] = lab.cloud_addrs(cloud.port());
    // One long-lived client socket, talking to the cloud before and during the learning
    // period (the default for UDP is 1 s).
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (atx, arx) = std::sync::mpsc::channel::<String>();
    let client = lab.client.name().to_string();
    let talker = std::thread::spawn(move || {
        viscum::netns::in_netns(&client, move || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.connect(v4).unwrap();
            sock.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut buf = [0u8; 64];
            // Bounded: at most 200 exchanges, 50 ms apart.
            for _ in 0..200 {
                sock.send(b"who are you?\n").unwrap();
                let n = sock.recv(&mut buf).unwrap();
                atx.send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .unwrap();
                if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                    break;
                }
            }
        })
        .unwrap();
    });
    assert_eq!(arx.recv_timeout(TIMEOUT).unwrap(), "cloud");
    lab.viscum_ok(&["redirect", "add", &format!("udp://{v4}"), "--ns", &ns]);
    // Fresh sockets are new flows: once learning is over they reach the edge.
    assert!(
        wait_until(Duration::from_secs(5), || udp_ask(
            lab.client.name(),
            v4,
            TIMEOUT
        )
        .unwrap()
            == "edge"),
        "new UDP flows never reached the edge"
    );
    // The long-lived socket kept talking through the learning period: still the cloud.
    while arx.try_recv().is_ok() {}
    let answers: Vec<String> = (0..5).map(|_| arx.recv_timeout(TIMEOUT).unwrap()).collect();
    assert!(answers.iter().all(|a| a == "cloud"), "{answers:?}");
    tx.send(()).unwrap();
    talker.join().unwrap();
}
