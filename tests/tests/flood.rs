//! Flow-table pressure (issue "hardening", item 6): a SYN flood to a redirected address,
//! larger than the flow table, must not break connections already served at the edge.
//!
//! The flood evicts their flow records (the table is an LRU). Without more, the next
//! packet of such a connection would look like a connection that began with the cloud and
//! be sent there, to be reset. The classifier instead asks the service namespace's stack
//! (`bpf_skc_lookup_tcp`) whether it holds the connection, and restores the record when it
//! does; the test counts those recoveries and the evictions directly. And the finished
//! connections that would otherwise fill the table: a record goes at its connection's last ACK,
//! and a close whose last ACK is lost after that still finishes.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use common::{EchoServer, Held, global_stats};
use viscum_tests::{Lab, packet::Packet, skip_unless_root};

/// Flow-table size for the test: small, so a flood of ten times it is quick to send.
const TABLE: usize = 1024;
/// Long-lived edge connections held across the floods.
const CONNECTIONS: usize = 100;
/// Floods, each followed by an exchange on every held connection.
const ROUNDS: usize = 3;

/// Sends `count` TCP SYNs to `dst` from spoofed sources in 198.18.0.0/15 (RFC 2544's
/// benchmarking range), from a raw socket in the client namespace: to the edge they are
/// new flows of strangers, one flow record each.
fn syn_flood(lab: &Lab, dst: SocketAddrV4, count: usize, round: usize) {
    viscum::netns::in_netns(lab.client.name(), move || {
        // SAFETY: plain socket(2); the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        for i in 0..count {
            let n = u32::try_from(round * count + i).unwrap();
            let [a, b] = ((n >> 8) as u16).to_be_bytes();
            let src = SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::new(198, 18 + (a & 1), b, n as u8),
                1024 + (n % 60_000) as u16,
            ));
            let frame = Packet::tcp(src, SocketAddr::V4(dst), 0x02).ip();
            // SAFETY: sends our buffer to a valid sockaddr_in of its real size.
            let sent = unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const to).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            assert!(
                sent == frame.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
    })
    .unwrap();
}

/// Edge-flow records in the lab's flow table, whatever their state (a flood's half-open
/// SYNs included).
fn records(lab: &Lab) -> u64 {
    let pins = viscum::engine::Pins::new(lab.bpffs.path());
    let map = aya::maps::MapData::from_pin(pins.map(viscum_common::REPLIES_MAP)).unwrap();
    let table: aya::maps::HashMap<_, viscum_common::ReplyKey, viscum_common::ReplyState> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(map)).unwrap();
    table.keys().flatten().count() as u64
}

/// Open edge flows, as `stats` and drains count them.
fn open_flows(lab: &Lab) -> u64 {
    let pins = viscum::engine::Pins::new(lab.bpffs.path());
    let engine = viscum::engine::Engine::open(&pins).unwrap();
    engine.edge_flows().unwrap().values().sum()
}

#[test]
fn a_syn_flood_larger_than_the_flow_table_breaks_no_edge_connection() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    lab.viscum_ok(&["attach", "lan0", "--flow-table-size", &TABLE.to_string()]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    let port = 9300;
    let edge = EchoServer::start(&ns, port, "edge");
    let [SocketAddr::V4(addr), _] = lab.cloud_addrs(edge.port) else {
        panic!("the lab's first cloud address is IPv4");
    };
    lab.viscum_ok(&["redirect", "add", &format!("tcp://{addr}"), "--ns", &ns]);

    let mut held: Vec<Held> = (0..CONNECTIONS)
        .map(|_| Held::open(lab.client.name(), SocketAddr::V4(addr)))
        .collect();
    let exchange_all = |held: &mut Vec<Held>, round: usize| {
        for (i, h) in held.iter_mut().enumerate() {
            let tag = format!("r{round}c{i}-");
            let got = h
                .exchange(&tag, 2)
                .unwrap_or_else(|e| panic!("round {round}: connection {i} broke: {e}"));
            assert_eq!(
                got,
                [format!("edge:{tag}0"), format!("edge:{tag}1")],
                "round {round}: connection {i} answered by the wrong side"
            );
        }
    };
    exchange_all(&mut held, 0);

    let before = global_stats(&lab);
    for round in 1..=ROUNDS {
        let t = std::time::Instant::now();
        syn_flood(&lab, addr, 10 * TABLE, round);
        let flood = t.elapsed();
        let t = std::time::Instant::now();
        exchange_all(&mut held, round);
        eprintln!(
            "round {round}: flood {flood:?}, exchanges {:?}",
            t.elapsed()
        );
    }
    let after = global_stats(&lab);
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    let (created, recovered, orphans) = (
        delta("flows_edge"),
        delta("flows_recovered"),
        delta("flow_orphans"),
    );
    let live = records(&lab);
    // The flood's SYNs were never followed: half-open, no open flows. The held connections
    // are (their records restored, or seen again after their handshake).
    let open = open_flows(&lab);
    assert!(
        open <= CONNECTIONS as u64,
        "{open} open flows counted among {live} records: the flood's half-open SYNs count"
    );
    eprintln!(
        "replies: unknown +{}, to stack +{}, forwarded +{}",
        delta("replies_unknown"),
        delta("replies_to_stack"),
        delta("replies_forwarded")
    );
    // Nothing expires in this time (TCP idles for hours), so every record created and no
    // longer in the table was evicted.
    let evicted = created.saturating_sub(live);
    eprintln!(
        "floods: {ROUNDS} x {} SYNs into a table of {TABLE}: records created {created}, live {live}, evicted {evicted}; held connections' records restored {recovered}; orphans {orphans}",
        10 * TABLE
    );
    assert!(
        created >= (ROUNDS * 10 * TABLE) as u64,
        "the flood did not reach the classifier: {created} records created"
    );
    assert!(
        evicted >= (ROUNDS * 9 * TABLE) as u64,
        "the flood evicted only {evicted} records"
    );
    // The held connections' records were evicted too, and restored from the service's
    // sockets: the exchanges above succeeded only because of that.
    assert!(recovered > 0, "no held connection lost its record");
    for h in held {
        h.close();
    }
    // With the held connections closed, the table holds only the flood's half-open SYNs:
    // a delete has nothing to drain (it would wait its whole timeout for them).
    let out = lab.viscum_ok(&["redirect", "del", &format!("tcp://{addr}")]);
    assert!(
        !out.contains("draining"),
        "the delete waited for half-open flows:\n{out}"
    );
}

/// Reproduces the reply half of the fault deterministically: a flood evicts a held
/// connection's record while the client is silent, then the service speaks first (a push).
/// On 2741ba7 its segment finds no record in `viscum_reply`, leaves with the namespace's own
/// address (`replies_unknown`), the client answers with a RST that the edge routes into the
/// namespace (the service's socket dies), and the client's next segment finds neither a record
/// nor a socket (`flow_orphans`), goes to the cloud and is reset. Now the reply path restores
/// the record from the entry it answers for (`flow::restore_from_reply`).
#[test]
fn a_push_after_a_flood_reaches_the_client_as_the_cloud() {
    if skip_unless_root() {
        return;
    }
    use std::{
        io::{BufRead, BufReader, Write},
        net::{TcpListener, TcpStream},
    };
    let lab = Lab::new();
    lab.viscum_ok(&["attach", "lan0", "--flow-table-size", &TABLE.to_string()]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    let listener =
        viscum::netns::in_netns(&ns, || TcpListener::bind(("::", 9302)).unwrap()).unwrap();
    let [SocketAddr::V4(addr), _] = lab.cloud_addrs(9302) else {
        panic!("the lab's first cloud address is IPv4");
    };
    lab.viscum_ok(&["redirect", "add", &format!("tcp://{addr}"), "--ns", &ns]);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_nodelay(true).unwrap();
        writeln!(conn, "hello").unwrap();
        rx.recv().unwrap();
        let _ = writeln!(conn, "push");
        std::thread::sleep(std::time::Duration::from_secs(5));
    });
    let conn = viscum::netns::in_netns(lab.client.name(), move || {
        TcpStream::connect_timeout(&SocketAddr::V4(addr), std::time::Duration::from_secs(3))
    })
    .unwrap()
    .unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "hello\n");
    // Let the client's ACK of "hello" go by, then evict the record.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = global_stats(&lab);
    syn_flood(&lab, addr, 10 * TABLE, 7);
    std::thread::sleep(std::time::Duration::from_millis(300));
    tx.send(()).unwrap();
    let mut line = String::new();
    let got = reader.read_line(&mut line);
    let now = global_stats(&lab);
    let d = |k: &str| now[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    eprintln!(
        "push: {got:?} {line:?} (recovered +{}, orphans +{}, replies unknown +{}, flows edge +{})",
        d("flows_recovered"),
        d("flow_orphans"),
        d("replies_unknown"),
        d("flows_edge")
    );
    if line != "push\n" {
        // What the client's next segment meets.
        let mut w = conn.try_clone().unwrap();
        let sent = writeln!(w, "after");
        let mut l2 = String::new();
        let again = reader.read_line(&mut l2);
        let now = global_stats(&lab);
        let d = |k: &str| now[k].as_u64().unwrap() - before[k].as_u64().unwrap();
        eprintln!(
            "then: sent {sent:?}, read {again:?} {l2:?} (recovered +{}, orphans +{}, replies unknown +{})",
            d("flows_recovered"),
            d("flow_orphans"),
            d("replies_unknown")
        );
    }
    assert_eq!(line, "push\n", "the push did not reach the client: {got:?}");
    drop(conn);
    server.join().unwrap();
}

/// A flood right after an exchange evicts the held connection's record while the
/// classifier's per-CPU flow cache still repeats its decision (for 25 ticks, 100 ms at
/// `CONFIG_HZ=250`). Two
/// things keep the flow whole: the flood's inserts retire the slot (`cache::INSERT_BUDGET`),
/// so the next client segment looks the record up and restores it; and a reply that comes
/// first restores it from the entry (`flow::restore_from_reply`). Either alone passes this
/// test (checked with the churn limit disabled); served from the slot with neither, the
/// answer would leave with the namespace's own address and the connection be reset.
#[test]
fn a_flood_right_after_an_exchange_leaves_no_flow_served_without_its_record() {
    if skip_unless_root() {
        return;
    }
    const FAST_ROUNDS: usize = 10;
    let lab = Lab::new();
    lab.viscum_ok(&["attach", "lan0", "--flow-table-size", &TABLE.to_string()]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    let edge = EchoServer::start(&ns, 9301, "edge");
    let [SocketAddr::V4(addr), _] = lab.cloud_addrs(edge.port) else {
        panic!("the lab's first cloud address is IPv4");
    };
    lab.viscum_ok(&["redirect", "add", &format!("tcp://{addr}"), "--ns", &ns]);
    let mut held = Held::open(lab.client.name(), SocketAddr::V4(addr));
    let before = global_stats(&lab);
    for round in 0..FAST_ROUNDS {
        // The exchange's segments fill the flow's slot; the flood (a few thousand SYNs, tens
        // of milliseconds) follows at once, and so does the next exchange.
        let tag = format!("a{round}-");
        assert_eq!(held.exchange(&tag, 1).unwrap(), [format!("edge:{tag}0")]);
        syn_flood(&lab, addr, 4 * TABLE, 100 + round);
        let tag = format!("b{round}-");
        let got = held.exchange(&tag, 1).unwrap_or_else(|e| {
            let now = global_stats(&lab);
            let d = |k: &str| now[k].as_u64().unwrap() - before[k].as_u64().unwrap();
            panic!(
                "round {round}: the connection broke after the flood: {e} (recovered +{}, orphans +{}, replies unknown +{}, flows edge +{})",
                d("flows_recovered"),
                d("flow_orphans"),
                d("replies_unknown"),
                d("flows_edge")
            )
        });
        assert_eq!(got, [format!("edge:{tag}0")], "round {round}");
    }
    let after = global_stats(&lab);
    let recovered =
        after["flows_recovered"].as_u64().unwrap() - before["flows_recovered"].as_u64().unwrap();
    eprintln!("{FAST_ROUNDS} floods: the held connection's record restored {recovered} times");
    assert!(
        recovered > 0,
        "no flood evicted the held connection's record"
    );
    held.close();
}

/// Connections a batch of [`a_closed_connection_leaves_no_record_behind`] opens and closes.
const CLOSED: usize = 40;

/// A line server for [`a_closed_connection_leaves_no_record_behind`] on `[::]:port`
/// (dual-stack), one connection at a time, on CPU 1: answers each line with itself but `q`
/// (quiet); after `s` it closes first, after `c` it waits for the client's FIN (the end of
/// the stream) and then closes.
fn closing_server(ns: &str, port: u16) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::io::{BufRead as _, Write as _};
    let listener = viscum::netns::in_netns(ns, move || {
        std::net::TcpListener::bind(("::", port)).unwrap()
    })
    .unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        common::pin_to_cpu(1);
        while !s.load(std::sync::atomic::Ordering::SeqCst) {
            let Ok((conn, _)) = listener.accept() else {
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(common::TIMEOUT)).unwrap();
            let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
                let answered = match line.as_str() {
                    // Only acknowledged, by the stack, from the CPU the line arrived on.
                    "q\n" => true,
                    // Corked: the FIN of the close that follows joins the answer's segment.
                    "d\n" => {
                        cork(&conn);
                        (&conn).write_all(line.as_bytes()).is_ok()
                    }
                    _ => (&conn).write_all(line.as_bytes()).is_ok(),
                };
                if !answered || line == "s\n" {
                    break;
                }
                line.clear();
            }
        }
    });
    stop
}

/// The lab of the close tests: Viscum on `lan0`, a service namespace behind an edge that
/// drops what conntrack finds invalid ([`common::harden`]), and [`closing_server`] on `port`
/// in it (stopped by setting the flag returned).
fn closing_lab(port: u16) -> (Lab, String, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let lab = Lab::new();
    lab.viscum_ok(&["attach", "lan0"]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    common::harden(&lab, &ns);
    let stop = closing_server(&ns, port);
    (lab, ns, stop)
}

/// Runs `body` with each way of serving `port` from service namespace `ns`: NAT and AnyIP
/// (`mode`), for each of the lab's cloud addresses (IPv4, IPv6), the redirect added before
/// and deleted after.
fn each_redirect(lab: &Lab, ns: &str, port: u16, mut body: impl FnMut(&str, SocketAddr)) {
    for mode in ["nat", "anyip"] {
        for addr in lab.cloud_addrs(port) {
            let url = format!("tcp://{addr}");
            let mut add = vec!["redirect", "add", &url, "--ns", ns];
            if mode == "anyip" {
                add.push("--anyip");
            }
            lab.viscum_ok(&add);
            body(mode, addr);
            lab.viscum_ok(&["redirect", "del", &url, "--now"]);
        }
    }
}

/// Sets `TCP_CORK` on `conn` (tcp(7)): nothing leaves before a full segment or the FIN, which
/// then rides on the data.
fn cork(conn: &std::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt(2) on an open socket with a c_int option of its size.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_CORK: {}", std::io::Error::last_os_error());
}

/// One connection to `addr` for [`a_closed_connection_leaves_no_record_behind`]: `lines`
/// exchanges, each after a quiet line and `pause`, then `first`, until both FINs are in and
/// everything is read (the drop then sends no RST): `s`, the server closes first; `c`, the
/// client does; `d`, the client's last line and its FIN in one segment, then the server's
/// answer and its FIN in one (FINs that carry data, so the sequence number past each counts
/// its payload).
fn closed_connection(
    addr: std::net::SocketAddr,
    lines: usize,
    pause: std::time::Duration,
    first: &str,
) -> std::io::Result<()> {
    use std::io::{BufRead as _, Read as _, Write as _};
    let conn = std::net::TcpStream::connect_timeout(&addr, common::TIMEOUT)?;
    conn.set_read_timeout(Some(common::TIMEOUT))?;
    conn.set_nodelay(true)?;
    let mut r = std::io::BufReader::new(&conn);
    for i in 0..=lines {
        let line = if i < lines {
            format!("{i}\n")
        } else {
            format!("{first}\n")
        };
        if i < lines {
            // Past the service's delayed ACK (40 ms): its pure ACK, sent by a timer on the
            // CPU the line came in on, is a reply the reply cache may serve from there.
            (&conn).write_all(b"q\n")?;
            std::thread::sleep(pause);
        }
        let data_fin = i == lines && first == "d";
        if data_fin {
            cork(&conn);
        }
        (&conn).write_all(line.as_bytes())?;
        if data_fin {
            conn.shutdown(std::net::Shutdown::Write)?;
        }
        let mut got = String::new();
        r.read_line(&mut got)?;
        if got != line {
            return Err(std::io::Error::other(format!("sent {line:?}, got {got:?}")));
        }
    }
    if first == "c" {
        conn.shutdown(std::net::Shutdown::Write)?;
    }
    let mut rest = Vec::new();
    r.read_to_end(&mut rest)?;
    Ok(())
}

/// A TCP connection's flow record goes with the ACK of the second FIN, whichever side closes
/// first, in NAT and AnyIP mode, over IPv4 and IPv6, through an edge whose firewall drops
/// what conntrack finds invalid: the table keeps no finished connections for new flows to
/// evict. Short connections, and connections that lived long enough for their segments to be
/// served by both per-CPU caches (the reply cache fills only from a flow's FIB result 10 ms
/// old), whose copies must not carry the last ACK past the record. Nothing of a connection
/// comes after its record is gone: no recovery from the service's stack, no reply without a
/// record, and no socket on either side left waiting for its close to finish.
///
/// The client runs on CPU 0 and the server on CPU 1, as a router's LAN interrupts and its
/// service may: the ACK of a FIN is then sent from the CPU that delivered the FIN, not the
/// one its own side's earlier segments were cached on.
#[test]
fn a_closed_connection_leaves_no_record_behind() {
    if skip_unless_root() {
        return;
    }
    if std::thread::available_parallelism().map_or(1, std::num::NonZero::get) < 2 {
        eprintln!("one CPU: the client and the server share it, so no close crosses CPUs here");
    }
    let port = 9310;
    let (lab, ns, stop) = closing_lab(port);
    let client = lab.client.name().to_owned();
    each_redirect(&lab, &ns, port, |mode, addr| {
        let before = global_stats(&lab);
        for (first, lines, pause_ms, count) in [
            ("s", 0, 0, CLOSED),
            ("c", 0, 0, CLOSED),
            ("d", 0, 0, CLOSED),
            ("s", 3, 60, 3),
            ("c", 3, 60, 3),
        ] {
            let failures = viscum::netns::in_netns(&client, move || {
                common::pin_to_cpu(0);
                let pause = std::time::Duration::from_millis(pause_ms);
                (0..count)
                    .filter_map(|i| {
                        closed_connection(addr, lines, pause, first)
                            .err()
                            .map(|e| format!("connection {i}: {e}"))
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap();
            let what = format!("{mode} {addr}, {first} closing first after {lines} exchanges");
            assert!(failures.is_empty(), "{what}: {failures:?}");
            let done = || {
                records(&lab) == 0
                    && common::tcp_closing(&client, port).is_empty()
                    && common::tcp_closing(&ns, port).is_empty()
            };
            assert!(
                viscum_tests::wait_until(std::time::Duration::from_secs(5), done),
                "{what}: {} records left of {count} closed connections; sockets still closing: client {:?}, service {:?}",
                records(&lab),
                common::tcp_closing(&client, port),
                common::tcp_closing(&ns, port),
            );
        }
        let after = global_stats(&lab);
        for counter in ["flows_recovered", "replies_unknown"] {
            let moved = after[counter].as_u64().unwrap() - before[counter].as_u64().unwrap();
            assert_eq!(moved, 0, "{mode} {addr}: {counter} +{moved}");
        }
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// The last ACK of a close lost after the edge removed the connection's record with it
/// (`viscum_common::close`): the side that closed second resends its FIN, and the edge must
/// carry that FIN and the answer to it as before, or the client's resent FIN reaches the
/// cloud (which resets it) and the service's resent FIN leaves untranslated.
///
/// Real networks lose segments; here nft drops the one segment, in the namespace of the
/// side that closed second, once the exchange before the close is acknowledged both ways
/// (so no other bare ACK is due): the service's ACK of the client's FIN when the service
/// closed first, the client's ACK of the service's FIN when the client did. The edge's
/// firewall drops what conntrack finds invalid. Both modes, both families.
#[test]
fn a_last_ack_lost_after_the_record_went_is_recovered() {
    if skip_unless_root() {
        return;
    }
    let port = 9320;
    let (lab, ns, stop) = closing_lab(port);
    let cloud = lab.cloud.name().to_owned();
    // Whatever the edge does not carry reaches the cloud, which holds no socket for it.
    common::nft_load(
        &cloud,
        &format!(
            "table inet viscumcloud {{\n chain pre {{\n  type filter hook prerouting priority raw; policy accept;\n  tcp dport {port} counter\n }}\n}}\n"
        ),
    );
    each_redirect(&lab, &ns, port, |mode, addr| {
        for first in ["s", "c"] {
            let what = format!("{mode} {addr}, {first} closing first");
            let before = global_stats(&lab);
            lose_last_ack(&lab, &ns, addr, first, &what);
            let after = global_stats(&lab);
            let moved = |c: &str| after[c].as_u64().unwrap() - before[c].as_u64().unwrap();
            assert!(
                moved("flows_recovered") >= 1,
                "{what}: the resent FIN restored no record ({after})"
            );
            assert_eq!(
                moved("replies_unknown"),
                0,
                "{what}: a reply went untranslated"
            );
            assert_eq!(
                common::nft_packets(&cloud, "viscumcloud"),
                0,
                "{what}: a segment of the connection reached the cloud"
            );
        }
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// One connection through the edge to `closing_server`, closed by `first` (`s`: the service,
/// `c`: the client), whose last ACK nft drops once in the namespace of the side closing
/// second; returns when both sides' sockets are past their close (panics, naming `what`,
/// if they are not within a few retransmissions).
fn lose_last_ack(lab: &Lab, ns: &str, addr: SocketAddr, first: &str, what: &str) {
    use std::io::{BufRead as _, Read as _, Write as _};
    let port = addr.port();
    let client = lab.client.name();
    // Made in the client's namespace; used from here.
    let conn = viscum::netns::in_netns(client, move || {
        std::net::TcpStream::connect_timeout(&addr, common::TIMEOUT)
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    conn.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    let line = format!("{first}\n");
    (&conn).write_all(line.as_bytes()).unwrap();
    let mut r = std::io::BufReader::new(&conn);
    let mut got = String::new();
    r.read_line(&mut got).unwrap();
    assert_eq!(got, line, "{what}: echo");
    // No bare ACK may be due but the one to drop: the echo (and, when the service closed
    // first, its FIN) acknowledged by the client, the request by the service.
    let service_state = if first == "s" {
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        "05" // FIN_WAIT2: its FIN acknowledged
    } else {
        "01"
    };
    // The connection's own sockets, by the client's port (earlier ones may be in TIME_WAIT).
    let client_port = conn.local_addr().unwrap().port();
    let ours = |ns: &str| {
        common::tcp_sockets(ns, port)
            .into_iter()
            .filter(|s| s.local_port == client_port || s.remote_port == client_port)
            .collect::<Vec<_>>()
    };
    let settled = || {
        let (service, client) = (ours(ns), ours(client));
        service.len() == 1
            && service[0].state == service_state
            && service[0].tx_queue == 0
            && client.len() == 1
            && client[0].tx_queue == 0
    };
    assert!(
        viscum_tests::wait_until(common::TIMEOUT, settled),
        "{what}: the exchange before the close never settled: service {:?}, client {:?}",
        ours(ns),
        ours(client)
    );
    let (loser, dir) = if first == "s" {
        (client, "sport")
    } else {
        (ns, "dport")
    };
    common::nft_load(
        loser,
        &format!(
            "table inet viscumloss {{\n chain input {{\n  type filter hook input priority filter; policy accept;\n  tcp {dir} {port} tcp flags == ack counter drop\n }}\n}}\n"
        ),
    );
    if first == "c" {
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
    }
    drop(r);
    drop(conn);
    // Dropped once; the resent FIN (at the retransmission timeout, 200 ms or more) and its
    // answer then pass. Should the answer be dropped too, the FIN is resent again.
    let lost = viscum_tests::wait_until(common::TIMEOUT, || {
        common::nft_packets(loser, "viscumloss") >= 1
    });
    common::nft(loser, &["delete", "table", "inet", "viscumloss"]);
    assert!(lost, "{what}: no last ACK was sent to drop");
    let done =
        || common::tcp_closing(client, port).is_empty() && common::tcp_closing(ns, port).is_empty();
    assert!(
        viscum_tests::wait_until(std::time::Duration::from_secs(10), done),
        "{what}: sockets still closing: client {:?}, service {:?}",
        common::tcp_closing(client, port),
        common::tcp_closing(ns, port),
    );
}
