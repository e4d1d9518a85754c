//! Smoke test of the harness itself, with no viscum involved: the lab routes client traffic
//! to the cloud, over TCP and UDP, IPv4 and IPv6, with and without a VLAN, and the identity
//! servers and clients tell who answered.

use std::{net::SocketAddr, time::Duration};

use viscum_tests::{
    IdentityServer, Lab, LabOptions, Proto, VlanMode, ask, lab, skip_unless_root, tcp_ask, udp_ask,
};

const TIMEOUT: Duration = Duration::from_secs(3);

/// Every protocol and family from the client reaches the cloud's identity server.
fn assert_cloud_answers(lab: &Lab) {
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    for addr in lab.cloud_addrs(cloud.port()) {
        for proto in [Proto::Tcp, Proto::Udp] {
            let answer = ask(lab.client.name(), proto, addr, TIMEOUT)
                .unwrap_or_else(|e| panic!("{proto:?} {addr}: {e}"));
            assert_eq!(answer, "cloud", "{proto:?} {addr}");
        }
    }
    assert_eq!(cloud.tcp_hits(), 2);
    assert_eq!(cloud.udp_hits(), 2);
}

#[test]
fn client_reaches_cloud() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    assert_eq!(lab.edge.sysctl("net/ipv4/ip_forward"), "1");
    assert_eq!(lab.edge.sysctl("net/ipv6/conf/all/forwarding"), "1");
    assert_eq!(lab.lan_if(), "lan0");
    assert_eq!(lab.lan_l3_if(), "lan0");
    assert!(lab.edge_ifindex("lan0") > 0);
    assert_cloud_answers(&lab);
}

#[test]
fn client_reaches_cloud_over_vlan() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::with_options(LabOptions { vlan: Some(42) });
    assert_eq!(lab.lan_if(), "lan0");
    match lab.vlan_mode() {
        Some(VlanMode::Kernel) => assert_eq!(lab.lan_l3_if(), "lan0.42"),
        Some(VlanMode::Bpf) => assert_eq!(lab.lan_l3_if(), "lan0v42"),
        None => panic!("no vlan"),
    }
    eprintln!("vlan mode: {:?}", lab.vlan_mode());
    assert_cloud_answers(&lab);
}

#[test]
fn lab_is_removed_on_drop() {
    if skip_unless_root() {
        return;
    }
    let (names, bpffs) = {
        let lab = Lab::new();
        // As viscum would create it: a service namespace the lab only knows by name.
        let svc = lab.service_ns_name();
        viscum::netns::create_named(&svc).unwrap();
        (
            vec![
                lab.client.name().to_string(),
                lab.edge.name().to_string(),
                lab.cloud.name().to_string(),
                svc,
            ],
            lab.bpffs.path().to_path_buf(),
        )
    };
    for name in names {
        assert!(!viscum::netns::named_exists(&name), "{name} left behind");
    }
    assert!(!bpffs.exists(), "{} left behind", bpffs.display());
}

/// A copy of the service in a viscum service namespace answers as the cloud address, over
/// TCP and UDP (through packet info), IPv4 and IPv6. Plain routing on the edge stands in for
/// the classifier here.
#[test]
fn service_copy_answers_as_cloud_address() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let svc = lab.service_ns_name();
    let svc2 = svc.clone();
    lab.edge.block_on(move || async move {
        use viscum::netns;
        let info = netns::service_ns_add(&svc2).await.unwrap();
        netns::service_ns_add_local(&svc2, lab::CLOUD_V4.into(), 32).await.unwrap();
        netns::service_ns_add_local(&svc2, lab::CLOUD_V6.into(), 128).await.unwrap();
        let edge = netns::handle_here().await.unwrap();
        let ns_v4: std::net::IpAddr = info.ns_addr.split('/').next().unwrap().parse().unwrap();
        netns::add_route(&edge, lab::CLOUD_V4.into(), 32, Some(ns_v4), Some(info.host_ifindex))
            .await
            .unwrap();
        netns::add_route(
            &edge,
            lab::CLOUD_V6.into(),
            128,
            Some("fe80::2".parse().unwrap()),
            Some(info.host_ifindex),
        )
        .await
        .unwrap();
    });

    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let edge_copy = IdentityServer::start(&svc, cloud.port(), "edge");
    for addr in lab.cloud_addrs(cloud.port()) {
        for proto in [Proto::Tcp, Proto::Udp] {
            let answer = ask(lab.client.name(), proto, addr, TIMEOUT)
                .unwrap_or_else(|e| panic!("{proto:?} {addr}: {e}"));
            assert_eq!(answer, "edge", "{proto:?} {addr}");
        }
    }
    assert_eq!(edge_copy.tcp_hits() + edge_copy.udp_hits(), 4);
    assert_eq!(cloud.tcp_hits() + cloud.udp_hits(), 0);
}

#[test]
fn servers_stop_and_clients_time_out() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let addr = SocketAddr::new(lab::CLOUD_V4.into(), 0);
    let port = {
        let server = IdentityServer::start(lab.cloud.name(), 0, "cloud");
        let addr = SocketAddr::new(addr.ip(), server.port());
        assert_eq!(tcp_ask(lab.client.name(), addr, TIMEOUT).unwrap(), "cloud");
        server.port()
    };
    let addr = SocketAddr::new(addr.ip(), port);
    // Stopped: TCP is refused at once, UDP gets no answer within the timeout.
    assert!(tcp_ask(lab.client.name(), addr, TIMEOUT).is_err());
    let err = udp_ask(lab.client.name(), addr, Duration::from_millis(300)).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::ConnectionRefused
        ),
        "{err}"
    );
}
