//! What real networks do to a redirect (issue "field correctness"): bulk transfers (GSO)
//! through a strict router, and the other kinds of traffic the lab's small answers never
//! exercise. Every case sends real traffic through the real classifier.

mod common;

use common::{Iperf3Server, global_stats, harden, iperf3_client, iperf3_received_bytes};
use viscum_tests::{Lab, skip_unless_root};

fn setup() -> (Lab, String) {
    let lab = Lab::new();
    lab.viscum_ok(&["attach", "lan0"]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    (lab, ns)
}

/// A bulk download from the edge copy (iperf3 -R: the server sends) through an edge whose
/// forward chain drops `ct state invalid` and whose reverse-path filter is strict. The
/// replies are GSO super-packets far larger than the MTU: the reply classifier must forward
/// them itself (segment size checked against the egress MTU), not hand them to the kernel's
/// forward path, where the firewall would drop them.
#[test]
fn bulk_replies_cross_a_strict_router_on_the_fast_path() {
    if skip_unless_root() {
        return;
    }
    let (lab, ns) = setup();
    harden(&lab, &ns);
    let port = 5201;
    let _edge = Iperf3Server::start(&ns, port);
    for addr in lab.cloud_addrs(port) {
        lab.viscum_ok(&["redirect", "add", &format!("tcp://{addr}"), "--ns", &ns]);
        let before = global_stats(&lab);
        let report = iperf3_client(lab.client.name(), addr, &["-R", "-t", "2"])
            .unwrap_or_else(|e| panic!("iperf3 -R to {addr}: {e}"));
        let after = global_stats(&lab);
        let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
        let (fwd, stack) = (delta("replies_forwarded"), delta("replies_to_stack"));
        let bytes = iperf3_received_bytes(&report);
        // Broken, this path moves ~40 KB in 2 s (every GSO reply refused, retransmitted
        // small); working, hundreds of megabytes. 8 MB is a functional floor, not a speed
        // target (those live in `cargo xtask bench`).
        assert!(bytes > 8 << 20, "{addr}: only {bytes} bytes received");
        assert!(
            fwd > 0 && stack * 20 < fwd,
            "{addr}: replies forwarded {fwd}, left to the stack {stack}"
        );
        lab.viscum_ok(&["redirect", "del", &format!("tcp://{addr}")]);
    }
}

/// A UDP server on `[::]:port` (dual-stack) answering every datagram with
/// `"<identity> <received length>"`, padded with dots to `reply_len` bytes, from a plain
/// `sendto()` (its source is whatever routing picks, like most servers).
struct SizedUdpServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SizedUdpServer {
    fn start(ns: &str, port: u16, identity: &str, reply_len: usize) -> SizedUdpServer {
        use std::sync::{Arc, atomic::AtomicBool};
        let sock = viscum::netns::in_netns(ns, move || std::net::UdpSocket::bind(("::", port)))
            .unwrap()
            .unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, id) = (stop.clone(), identity.to_owned());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let mut reply = format!("{id} {n}").into_bytes();
                    if reply.len() < reply_len {
                        reply.resize(reply_len, b'.');
                    }
                    let _ = sock.send_to(&reply, peer);
                }
            }
        });
        SizedUdpServer { stop }
    }
}

impl Drop for SizedUdpServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Sends datagrams of `sizes` bytes from one connected socket in `ns` and returns each
/// answer's first word (identity), its claimed received length and its own length.
fn udp_exchange(ns: &str, addr: std::net::SocketAddr, sizes: &[usize]) -> Vec<String> {
    let sizes = sizes.to_vec();
    viscum::netns::in_netns(ns, move || {
        let bind = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let sock = std::net::UdpSocket::bind(bind).unwrap();
        sock.connect(addr).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut buf = vec![0u8; 65536];
        sizes
            .iter()
            .map(|&n| {
                sock.send(&vec![b'x'; n]).unwrap();
                match sock.recv(&mut buf) {
                    Ok(got) => {
                        let text = String::from_utf8_lossy(&buf[..got]);
                        let mut words = text.trim_end_matches('.').split(' ');
                        let id = words.next().unwrap_or("").to_owned();
                        let len = words.next().unwrap_or("").to_owned();
                        format!("{id} {len} {got}")
                    }
                    Err(e) => format!("error {e}"),
                }
            })
            .collect()
    })
    .unwrap()
}

/// Datagrams larger than the MTU arrive as fragments; all of them must follow the
/// datagram's flow, in both directions, or one UDP flow is split between two servers
/// (DNS with EDNS, RADIUS, IKE, QUIC...). Replies are fragmented too, and come from a
/// naive server whose source the reply path must restore on every fragment.
#[test]
fn fragmented_datagrams_follow_their_flow() {
    if skip_unless_root() {
        return;
    }
    let (lab, ns) = setup();
    let port = 9000;
    let _cloud = SizedUdpServer::start(lab.cloud.name(), port, "cloud", 0);
    let _edge = SizedUdpServer::start(&ns, port, "edge", 3000);
    for addr in lab.cloud_addrs(port) {
        lab.viscum_ok(&[
            "redirect",
            "add",
            &format!("udp://{addr}"),
            "--ns",
            &ns,
            "--learn-ms",
            "0",
        ]);
        let got = udp_exchange(lab.client.name(), addr, &[10, 3000, 10, 3000]);
        assert_eq!(
            got,
            [
                "edge 10 3000",
                "edge 3000 3000",
                "edge 10 3000",
                "edge 3000 3000"
            ],
            "{addr}\n{}",
            lab.viscum_ok(&["stats", "--json"])
        );
        let g = global_stats(&lab);
        assert!(g["fragments"].as_u64().unwrap() > 0, "{g}");
        lab.viscum_ok(&["redirect", "del", &format!("udp://{addr}")]);
        // And the cloud gets whole datagrams again once the entry is gone.
        let got = udp_exchange(lab.client.name(), addr, &[3000]);
        assert_eq!(got, ["cloud 3000 10"], "{addr}");
    }
}
