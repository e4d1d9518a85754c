//! VLAN-tagged clients. The kernels Viscum runs on differ in whether they even have VLAN
//! devices (this one has no 8021q), so the client here sends tagged frames itself through an
//! AF_PACKET socket on its veth. That is also exactly what a trunk port delivers:
//!
//! * a single 802.1Q tag is moved into the skb metadata by the core receive path before TC
//!   ingress: the classifier must pop it, or the service namespace drops the frame;
//! * with QinQ (802.1ad outer + 802.1Q inner) the outer tag goes to the metadata and the inner
//!   one stays in the packet data: the parser must skip it, and the redirect must pop both.
//!
//! The service's reply is routed back untagged (the edge has no VLAN device here), and a
//! plain UDP socket on the client receives it.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use viscum::netns;
use viscum_tests::{
    IdentityServer, Lab,
    lab::{CLIENT_IF, CLIENT_V4, CLIENT_V6, CLOUD_V4, CLOUD_V6, LAN_IF},
    skip_unless_root,
};

const REQUEST: &[u8] = b"who are you?\n";

fn mac_of(ns: &viscum_tests::Netns, ifname: &'static str) -> [u8; 6] {
    ns.block_on(move || async move {
        let h = netns::handle_here().await.unwrap();
        netns::link_by_name(&h, ifname).await.unwrap().mac.unwrap()
    })
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// An Ethernet frame with the given VLAN tags (TPID, VID) carrying a UDP datagram.
fn frame(
    dst: [u8; 6],
    src: [u8; 6],
    tags: &[(u16, u16)],
    from: SocketAddr,
    to: SocketAddr,
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for (tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    let udp_len = (8 + REQUEST.len()) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&from.port().to_be_bytes());
    udp.extend_from_slice(&to.port().to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(REQUEST);
    match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0];
            ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = csum_fold(sum16(&ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&udp_len.to_be_bytes());
            let c = csum_fold(sum16(&pseudo) + sum16(&udp));
            udp[6..8].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&0x86DDu16.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&udp_len.to_be_bytes());
            ip.extend_from_slice(&[17, 64]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&u32::from(udp_len).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
            let c = csum_fold(sum16(&pseudo) + sum16(&udp));
            udp[6..8].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        _ => unreachable!("mixed families"),
    }
    f.extend_from_slice(&udp);
    f
}

/// Sends `tags`-tagged requests from the client to `to` and returns the answer.
fn ask_tagged(
    lab: &Lab,
    tags: Vec<(u16, u16)>,
    client_ip: IpAddr,
    to: SocketAddr,
) -> Option<String> {
    let dst = mac_of(&lab.edge, LAN_IF);
    let src = mac_of(&lab.client, CLIENT_IF);
    lab.client.run(move || {
        let sock = UdpSocket::bind(SocketAddr::new(client_ip, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let from = sock.local_addr().unwrap();
        let f = frame(dst, src, &tags, from, to);
        // SAFETY: plain socket calls with valid buffers.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let ifindex = libc::if_nametoindex(c"eth0".as_ptr());
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&dst);
            let mut answer = None;
            // Bounded retries: the first frame may race the neighbour entry for the reply.
            for _ in 0..10 {
                let n = libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&raw const sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(
                    n as usize,
                    f.len(),
                    "sendto: {}",
                    std::io::Error::last_os_error()
                );
                let mut buf = [0u8; 256];
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    answer = Some(String::from_utf8_lossy(&buf[..n]).trim().to_string());
                    break;
                }
            }
            libc::close(fd);
            answer
        }
    })
}

#[test]
fn vlan_tagged_and_qinq_clients_are_served_at_the_edge() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    lab.viscum_ok(&["attach", LAN_IF]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    let _edge = IdentityServer::start(&ns, cloud.port(), "edge");
    let v4 = SocketAddr::new(IpAddr::V4(CLOUD_V4), cloud.port());
    let v6 = SocketAddr::new(IpAddr::V6(CLOUD_V6), cloud.port());
    for to in [v4, v6] {
        lab.viscum_ok(&[
            "redirect",
            "add",
            &format!("udp://{to}"),
            "--ns",
            &ns,
            "--learn-ms",
            "0",
        ]);
    }
    let dot1q = vec![(0x8100, 42)];
    let qinq = vec![(0x88A8, 100), (0x8100, 42)];
    for (client, to) in [(IpAddr::V4(CLIENT_V4), v4), (IpAddr::V6(CLIENT_V6), v6)] {
        assert_eq!(
            ask_tagged(&lab, dot1q.clone(), client, to).as_deref(),
            Some("edge"),
            "802.1Q to {to}"
        );
        assert_eq!(
            ask_tagged(&lab, qinq.clone(), client, to).as_deref(),
            Some("edge"),
            "QinQ to {to}"
        );
    }
    assert_eq!(cloud.udp_hits(), 0);
}
