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
    let sniffer = TrunkSniffer::open(&lab);
    assert_cloud_answers(&lab);
    // The trunk really carries tagged frames, both ways, and none of the lab's IP traffic
    // untagged.
    let (tagged_in, tagged_out, untagged_ip) = sniffer.tally(42);
    assert!(
        tagged_in > 0 && tagged_out > 0,
        "tagged frames on lan0: {tagged_in} in, {tagged_out} out"
    );
    assert_eq!(untagged_ip, 0, "untagged IP frames on the trunk");
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

    // The same when the test panics with the lab alive.
    let seen = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::with_options(LabOptions { vlan: Some(7) });
        let svc = lab.service_ns_name();
        viscum::netns::create_named(&svc).unwrap();
        seen.lock()
            .unwrap()
            .extend([lab.edge.name().to_string(), svc]);
        panic!("test failure with a live lab");
    }));
    assert!(result.is_err());
    for name in seen.into_inner().unwrap() {
        assert!(
            !viscum::netns::named_exists(&name),
            "{name} left behind after a panic"
        );
    }
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
        netns::service_ns_add_local(&svc2, lab::CLOUD_V4.into(), 32)
            .await
            .unwrap();
        netns::service_ns_add_local(&svc2, lab::CLOUD_V6.into(), 128)
            .await
            .unwrap();
        let edge = netns::handle_here().await.unwrap();
        let ns_v4: std::net::IpAddr = info.ns_addr.split('/').next().unwrap().parse().unwrap();
        netns::add_route(
            &edge,
            lab::CLOUD_V4.into(),
            32,
            Some(ns_v4),
            Some(info.host_ifindex),
        )
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

/// `Lab::viscum` runs the real binary inside the edge namespace, in the caller's mount
/// namespace: what it creates lands in the edge (not here), and what it pins lands in the
/// lab's bpffs, visible to the test.
#[test]
fn viscum_runs_in_the_edge() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let svc = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &svc]);
    let vh = format!("vh-{svc}");
    let host_veth = vh.clone();
    let in_edge = lab.edge.block_on(move || async move {
        let h = viscum::netns::handle_here().await.unwrap();
        viscum::netns::link_by_name(&h, &host_veth).await.is_ok()
    });
    assert!(in_edge, "{vh} not in the edge namespace");
    let listed: serde_json::Value =
        serde_json::from_str(&lab.viscum_ok(&["ns", "list", "--json"])).unwrap();
    assert_eq!(listed[0]["name"], svc.as_str(), "{listed}");

    let err = lab.viscum_err(&["ns", "add", "Foo!"]);
    assert!(err.contains("namespace name 'Foo!' is invalid"), "{err}");

    lab.viscum_ok(&["attach", lab.lan_if()]);
    let pins = std::fs::read_dir(lab.bpffs.path()).unwrap().count();
    assert!(pins > 0, "nothing pinned in {}", lab.bpffs.path().display());

    lab.viscum_ok(&["ns", "del", &svc]);
    assert!(!viscum::netns::named_exists(&svc));
}

/// An AF_PACKET socket on the edge's trunk that reports VLAN tags. Received tags are in the
/// packet metadata by then (PACKET_AUXDATA), transmitted ones may be in the frame.
struct TrunkSniffer(std::os::fd::OwnedFd);

impl TrunkSniffer {
    fn open(lab: &Lab) -> TrunkSniffer {
        use std::os::fd::FromRawFd;
        let ifindex = lab.edge_ifindex(lab.lan_if());
        let fd = viscum::netns::in_netns(lab.edge.name(), move || unsafe {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto.into(),
            );
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            let rc = libc::bind(
                fd,
                (&raw const sll).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            let one: libc::c_int = 1;
            let rc = libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_AUXDATA,
                (&raw const one).cast::<libc::c_void>(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
            assert_eq!(rc, 0, "PACKET_AUXDATA: {}", std::io::Error::last_os_error());
            std::os::fd::OwnedFd::from_raw_fd(fd)
        })
        .unwrap();
        TrunkSniffer(fd)
    }

    /// Drains what was captured: (frames in tagged `vid`, frames out tagged `vid`, untagged
    /// IPv4/IPv6 frames).
    fn tally(&self, vid: u16) -> (usize, usize, usize) {
        use std::os::fd::AsRawFd;
        let (mut tagged_in, mut tagged_out, mut untagged_ip) = (0, 0, 0);
        loop {
            let mut buf = [0u8; 2048];
            let mut cbuf = [0u64; 64];
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&raw mut from).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cbuf);
            let n = unsafe { libc::recvmsg(self.0.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) };
            if n < 0 {
                break;
            }
            let mut tag = None;
            let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
            while !cmsg.is_null() {
                let c = unsafe { &*cmsg };
                if c.cmsg_level == libc::SOL_PACKET && c.cmsg_type == libc::PACKET_AUXDATA {
                    let aux: libc::tpacket_auxdata =
                        unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
                    if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                        tag = Some(aux.tp_vlan_tci & 0x0fff);
                    }
                }
                cmsg = unsafe { libc::CMSG_NXTHDR(&raw const msg, cmsg) };
            }
            let ethertype = u16::from_be_bytes([buf[12], buf[13]]);
            // A tag may also still be in the frame itself (transmitted frames, when the
            // device does not take it as metadata).
            if tag.is_none() && ethertype == 0x8100 {
                tag = Some(u16::from_be_bytes([buf[14], buf[15]]) & 0x0fff);
            }
            let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
            // Multicast (the group bit of the destination MAC): the trunk device's own IPv6
            // chatter (MLD reports, router solicitations, duplicate address detection), sent
            // at random delays after the link came up, untagged because the trunk itself
            // has a link-local address. Not the lab's traffic, which is unicast.
            let multicast = buf[0] & 1 != 0;
            match tag {
                Some(v) if v == vid && outgoing => tagged_out += 1,
                Some(v) if v == vid => tagged_in += 1,
                None if !multicast && (ethertype == 0x0800 || ethertype == 0x86dd) => {
                    untagged_ip += 1;
                }
                _ => {}
            }
        }
        (tagged_in, tagged_out, untagged_ip)
    }
}
