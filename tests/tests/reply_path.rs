//! The reply path: replies from service namespaces reach clients behind a strict router
//! firewall, naive UDP servers keep the cloud identity, NAT mode and mirror mode.

mod common;

use std::net::SocketAddr;

use common::{NaiveUdpServer, TIMEOUT, harden, no_checksum_offload};
use serde_json::Value;
use viscum_tests::{IdentityServer, Lab, Proto, ask, skip_unless_root, udp_ask};

fn setup() -> (Lab, String) {
    let lab = Lab::new();
    lab.viscum_ok(&["attach", "lan0"]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    (lab, ns)
}

fn url(proto: Proto, addr: SocketAddr) -> String {
    format!(
        "{}://{addr}",
        if proto == Proto::Tcp { "tcp" } else { "udp" }
    )
}

fn global(lab: &Lab) -> Value {
    let v: Value = serde_json::from_str(&lab.viscum_ok(&["stats", "--json"])).unwrap();
    v["global"].clone()
}

/// Namespace `ns`'s own IPv4 address, from the viscum that made it (`ns list`'s
/// `ns_addr`, without its prefix length).
fn ns_v4(lab: &Lab, ns: &str) -> String {
    lab.service_ns_info(ns)["ns_addr"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn replies_survive_a_strict_router_firewall() {
    if skip_unless_root() {
        return;
    }
    let (lab, ns) = setup();
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let _edge = IdentityServer::start(&ns, cloud.port(), "edge");
    harden(&lab, &ns);
    // The firewall leaves ordinary forwarded traffic alone...
    for addr in lab.cloud_addrs(cloud.port()) {
        for proto in [Proto::Tcp, Proto::Udp] {
            assert_eq!(
                ask(lab.client.name(), proto, addr, TIMEOUT).unwrap(),
                "cloud",
                "{proto:?} {addr}"
            );
        }
    }
    for addr in lab.cloud_addrs(cloud.port()) {
        for proto in [Proto::Tcp, Proto::Udp] {
            lab.viscum_ok(&[
                "redirect",
                "add",
                &url(proto, addr),
                "--ns",
                &ns,
                "--learn-ms",
                "0",
            ]);
            let got = ask(lab.client.name(), proto, addr, TIMEOUT);
            assert!(
                matches!(got.as_deref(), Ok("edge")),
                "{proto:?} {addr}: {got:?}\n{}",
                lab.viscum_ok(&["stats", "--json"])
            );
        }
    }
    assert!(global(&lab)["replies_forwarded"].as_u64().unwrap() > 0);

    // Control: without the reply classifier the same firewall drops the edge's replies.
    std::fs::remove_file(lab.bpffs.path().join(format!("reply-links/vh-{ns}"))).unwrap();
    // The kernel releases an unpinned TCX link from a workqueue, not within unlink(2): wait
    // until the veth's ingress hook is really empty, or the control below races the release.
    let host_veth = format!("vh-{ns}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let veth = host_veth.clone();
        let left = viscum::netns::in_netns(lab.edge.name(), move || {
            aya::programs::SchedClassifier::query_tcx(&veth, aya::programs::TcAttachType::Ingress)
                .map(|(_, progs)| progs.len())
        })
        .unwrap()
        .expect("query the veth's TCX ingress programs");
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{host_veth}: {left} TCX program(s) still attached 10 s after the link's pin was removed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let [v4, _] = lab.cloud_addrs(cloud.port());
    assert!(
        ask(
            lab.client.name(),
            Proto::Tcp,
            v4,
            std::time::Duration::from_millis(800)
        )
        .is_err(),
        "the firewall should drop replies that bypass the reply path"
    );
}

#[test]
fn a_naive_udp_server_answers_as_the_cloud_address() {
    if skip_unless_root() {
        return;
    }
    let (lab, ns) = setup();
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    // Answers from whatever source routing picks: the namespace's own address.
    let _naive4 = NaiveUdpServer::start(&ns, cloud.port(), "naive-edge", false);
    let other = IdentityServer::start(lab.cloud.name(), 0, "cloud6");
    let _naive6 = NaiveUdpServer::start(&ns, other.port(), "naive-edge6", true);
    let [v4, _] = lab.cloud_addrs(cloud.port());
    let [_, v6] = lab.cloud_addrs(other.port());
    for (addr, want) in [(v4, "naive-edge"), (v6, "naive-edge6")] {
        lab.viscum_ok(&[
            "redirect",
            "add",
            &url(Proto::Udp, addr),
            "--ns",
            &ns,
            "--learn-ms",
            "0",
        ]);
        // A connected client drops any reply whose source is not the address it asked.
        assert_eq!(
            udp_ask(lab.client.name(), addr, TIMEOUT).unwrap(),
            want,
            "{addr}"
        );
    }
    assert!(global(&lab)["replies_rewritten"].as_u64().unwrap() >= 2);
}

#[test]
fn nat_mode_serves_tcp_and_udp_over_ipv4_and_ipv6_with_software_checksums() {
    if skip_unless_root() {
        return;
    }
    let (lab, ns) = setup();
    // Every checksum on the path is computed and verified in software.
    no_checksum_offload(lab.client.name(), "eth0");
    no_checksum_offload(lab.edge.name(), "lan0");
    no_checksum_offload(lab.edge.name(), &format!("vh-{ns}"));
    no_checksum_offload(&ns, "eth0");

    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    // The service listens on another port than the cloud's: NAT rewrites both.
    let edge = IdentityServer::start(&ns, 0, "edge-nat");
    let [v4, v6] = lab.cloud_addrs(cloud.port());
    let nat6 = format!("[fd00:7669:7363::1]:{}", edge.port());
    let ns_addr = ns_v4(&lab, &ns);
    let nat4 = format!("{ns_addr}:{}", edge.port());
    for proto in [Proto::Tcp, Proto::Udp] {
        lab.viscum_ok(&[
            "redirect",
            "add",
            &url(proto, v4),
            "--ns",
            &ns,
            "--nat-to",
            &nat4,
            "--learn-ms",
            "0",
        ]);
        lab.viscum_ok(&[
            "redirect",
            "add",
            &url(proto, v6),
            "--ns",
            &ns,
            "--nat-to",
            &nat6,
            "--learn-ms",
            "0",
        ]);
        for addr in [v4, v6] {
            assert_eq!(
                ask(lab.client.name(), proto, addr, TIMEOUT).unwrap(),
                "edge-nat",
                "{proto:?} {addr}"
            );
        }
    }
    // NAT needs no local route for the cloud address in the namespace.
    let routes = lab.service_ns_info(&ns)["local_routes"].clone();
    assert_eq!(routes, serde_json::json!(["fd00:7669:7363::1/128"]));
    let entries: Value =
        serde_json::from_str(&lab.viscum_ok(&["redirect", "list", "--json"])).unwrap();
    assert!(
        entries
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["mode"] == "nat")
    );
    assert_eq!(cloud.tcp_hits() + cloud.udp_hits(), 0);
}

#[test]
fn mirror_mode_feeds_the_edge_copy_while_the_cloud_answers() {
    if skip_unless_root() {
        return;
    }
    let (lab, ns) = setup();
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let edge = IdentityServer::start(&ns, cloud.port(), "edge");
    let [v4, v6] = lab.cloud_addrs(cloud.port());
    for addr in [v4, v6] {
        lab.viscum_ok(&[
            "redirect",
            "add",
            &url(Proto::Udp, addr),
            "--ns",
            &ns,
            "--mirror",
        ]);
    }
    for addr in [v4, v6] {
        for _ in 0..3 {
            assert_eq!(
                udp_ask(lab.client.name(), addr, TIMEOUT).unwrap(),
                "cloud",
                "{addr}"
            );
        }
    }
    assert!(
        viscum_tests::wait_until(TIMEOUT, || cloud.udp_hits() == 6),
        "the cloud answered {}",
        cloud.udp_hits()
    );
    assert!(
        viscum_tests::wait_until(TIMEOUT, || edge.udp_hits() == 6),
        "the edge copy saw {} of 6 mirrored requests",
        edge.udp_hits()
    );
    assert_eq!(global(&lab)["mirrored"], 6);
}

/// The reply program keeps each edge flow's FIB result (egress interface, MTU, MACs) for at
/// most a second (`viscum_common::FIB_CACHE_NS`, with the reply cache's copies): a client that changes its MAC
/// address (a new device taking over a DHCP lease, a bonded NIC failing over) and announces
/// it (here the edge's neighbour entry is replaced, as a gratuitous ARP would) must get the
/// replies of its *established* flow again once the cached result expires, on the same
/// 5-tuple, without the flow being re-created. With a FIB result cached for the flow's
/// lifetime, every reply would keep going to the old MAC and be dropped by the client.
#[test]
fn an_established_flow_follows_a_client_that_changed_its_mac() {
    use std::{net::UdpSocket, time::Instant};

    if skip_unless_root() {
        return;
    }
    let (lab, ns) = setup();
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let _edge = IdentityServer::start(&ns, cloud.port(), "edge");
    let [v4, _] = lab.cloud_addrs(cloud.port());
    lab.viscum_ok(&[
        "redirect",
        "add",
        &url(Proto::Udp, v4),
        "--ns",
        &ns,
        "--learn-ms",
        "0",
    ]);
    // One socket, one 5-tuple, for the whole test.
    let sock = viscum::netns::in_netns(lab.client.name(), move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(v4)?;
        s.set_read_timeout(Some(std::time::Duration::from_millis(100)))?;
        Ok::<_, std::io::Error>(s)
    })
    .unwrap()
    .expect("client UDP socket");
    let exchange = |sock: &UdpSocket| -> Option<String> {
        sock.send(b"who\n").ok()?;
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
    };
    let until_answered = |sock: &UdpSocket, what: &str| -> (String, u32) {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let mut lost = 0;
        loop {
            if let Some(got) = exchange(sock) {
                return (got, lost);
            }
            lost += 1;
            assert!(
                Instant::now() < deadline,
                "{what}: no answer on the established flow in 10 s ({lost} requests lost)"
            );
        }
    };
    // Established, with its FIB result cached by the replies.
    for _ in 0..3 {
        assert_eq!(until_answered(&sock, "before the change").0, "edge");
    }
    let flows_before = global(&lab)["flows_edge"].as_u64().unwrap();

    // The client's NIC is swapped: new MAC, announced to the edge.
    let new_mac = "02:00:5e:c1:1e:57";
    let ip = |ns: &str, args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["-n", ns])
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {ns} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ip(
        lab.client.name(),
        &[
            "link",
            "set",
            viscum_lab::lab::CLIENT_IF,
            "address",
            new_mac,
        ],
    );
    ip(
        lab.edge.name(),
        &[
            "neigh",
            "replace",
            &viscum_lab::lab::CLIENT_V4.to_string(),
            "lladdr",
            new_mac,
            "dev",
            viscum_lab::lab::LAN_IF,
            "nud",
            "reachable",
        ],
    );
    let changed = Instant::now();
    let (got, lost) = until_answered(&sock, "after the MAC change");
    eprintln!(
        "answered again {} ms after the MAC change ({lost} requests lost)",
        changed.elapsed().as_millis()
    );
    assert_eq!(got, "edge");
    // The same flow, not a new one: its record (and its cached route) carried on.
    assert_eq!(
        global(&lab)["flows_edge"].as_u64().unwrap(),
        flows_before,
        "the answer came from a new flow, not the established one"
    );
}

/// A connection made straight to a service namespace from the box itself (an operator's
/// `curl` to the service's own address) has no edge record by nature. Its replies come from a
/// served port of a NAT entry whose cloud identity the reply path has learned, exactly like an
/// edge flow's whose record was lost; they must keep their addresses, or the box's own socket
/// would hear from the cloud address and the connection fail. `flow::restore_from_reply` asks
/// the FIB first: a destination the box delivers locally is not a client.
#[test]
fn the_box_reaches_a_served_namespace_port_directly() {
    if skip_unless_root() {
        return;
    }
    let (lab, ns) = setup();
    let edge = IdentityServer::start(&ns, 0, "edge");
    let [v4, _] = lab.cloud_addrs(edge.port());
    let ns_addr = ns_v4(&lab, &ns);
    let direct: SocketAddr = format!("{ns_addr}:{}", edge.port()).parse().unwrap();
    for proto in [Proto::Tcp, Proto::Udp] {
        lab.viscum_ok(&[
            "redirect",
            "add",
            &url(proto, v4),
            "--ns",
            &ns,
            "--learn-ms",
            "0",
        ]);
        // A client's flow teaches the reply path the port's cloud identity.
        assert_eq!(
            ask(lab.client.name(), proto, v4, TIMEOUT).unwrap(),
            "edge",
            "{proto:?}"
        );
        let before = global(&lab)["flows_recovered"].as_u64().unwrap();
        assert_eq!(
            ask(lab.edge.name(), proto, direct, TIMEOUT).unwrap(),
            "edge",
            "{proto:?}: the box's own connection to {direct}"
        );
        let after = global(&lab)["flows_recovered"].as_u64().unwrap();
        assert_eq!(
            after, before,
            "{proto:?}: the box's connection was taken for an edge flow"
        );
    }
}
