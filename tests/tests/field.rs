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
