//! Cloud host names: entries follow DNS answers and their TTLs, and stale addresses go.
//! A small authoritative DNS responder in the cloud namespace plays the cloud's DNS.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use viscum_tests::{IdentityServer, Lab, Proto, ask, skip_unless_root, wait_until};

const TIMEOUT: Duration = Duration::from_secs(3);
type Zone = Arc<Mutex<HashMap<String, Vec<IpAddr>>>>;

/// Answers A/AAAA queries from `zone` with a 1 s TTL; NXDOMAIN for unknown names.
struct Dns {
    stop: Arc<AtomicBool>,
}

impl Dns {
    fn start(ns: &str, zone: Zone) -> Dns {
        let sock = viscum::netns::in_netns(ns, || UdpSocket::bind("0.0.0.0:53")).unwrap().unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::SeqCst) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else { continue };
                if let Some(reply) = answer(&buf[..n], &zone) {
                    let _ = sock.send_to(&reply, peer);
                }
            }
        });
        Dns { stop }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn answer(q: &[u8], zone: &Zone) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    // Question: labels, then QTYPE and QCLASS.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question_end = i + 4;
    let name = labels.join(".");
    let zone = zone.lock().unwrap();
    let known = zone.get(&name);
    let records: Vec<&IpAddr> = known
        .map(|a| a.iter().filter(|ip| (qtype == 1 && ip.is_ipv4()) || (qtype == 28 && ip.is_ipv6())).collect())
        .unwrap_or_default();
    let mut r = Vec::new();
    r.extend_from_slice(&q[0..2]);
    r.extend_from_slice(&[0x84, if known.is_some() { 0x00 } else { 0x03 }]);
    r.extend_from_slice(&[0, 1]);
    r.extend_from_slice(&(records.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&q[12..question_end]);
    for ip in records {
        r.extend_from_slice(&[0xc0, 0x0c]);
        r.extend_from_slice(&qtype.to_be_bytes());
        r.extend_from_slice(&[0, 1, 0, 0, 0, 1]);
        match ip {
            IpAddr::V4(a) => {
                r.extend_from_slice(&[0, 4]);
                r.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                r.extend_from_slice(&[0, 16]);
                r.extend_from_slice(&a.octets());
            }
        }
    }
    Some(r)
}

fn matches(lab: &Lab) -> Vec<String> {
    let v: Value = serde_json::from_str(&lab.viscum_ok(&["redirect", "list", "--json"])).unwrap();
    v.as_array().unwrap().iter().map(|e| e["match"].as_str().unwrap().to_string()).collect()
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
    let zone: Zone = Arc::new(Mutex::new(HashMap::new()));
    zone.lock().unwrap().insert("alpr.example.net".into(), vec![v4.ip()]);
    let _dns = Dns::start(lab.cloud.name(), zone.clone());
    let m = format!("tcp://alpr.example.net:{}", cloud.port());
    let who = |a: SocketAddr| ask(lab.client.name(), Proto::Tcp, a, TIMEOUT).unwrap();

    // One-shot: the CLI resolves once and adds an entry per address.
    let out = lab.viscum_ok(&["redirect", "add", &m, "--ns", &ns, "--dns", "198.51.100.7"]);
    assert!(out.contains(&format!("tcp://{v4}")), "{out}");
    assert_eq!(who(v4), "edge");
    lab.viscum_ok(&["redirect", "del", &m, "--dns", "198.51.100.7"]);
    assert_eq!(who(v4), "cloud");
    let err = lab.viscum_err(&["redirect", "add", "tcp://nosuch.example.net:80", "--ns", &ns, "--dns", "198.51.100.7"]);
    assert!(err.contains("resolves to no address"), "{err}");

    // Following: entries track the answers.
    let mut follow = lab
        .viscum_command(&["redirect", "follow", &m, "--ns", &ns, "--dns", "198.51.100.7"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || matches(&lab) == [format!("tcp://{v4}")]), "{:?}", matches(&lab));
    assert_eq!(who(v4), "edge");
    assert_eq!(who(v6), "cloud");

    // The name moves to the IPv6 address: the IPv4 entry must go (TTL 1 s).
    zone.lock().unwrap().insert("alpr.example.net".into(), vec![v6.ip()]);
    assert!(
        wait_until(Duration::from_secs(6), || matches(&lab) == [format!("tcp://{v6}")]),
        "entries did not follow DNS: {:?}",
        matches(&lab)
    );
    assert_eq!(who(v4), "cloud", "no stale address left behind");
    assert_eq!(who(v6), "edge");

    // Stopping the follower removes what it added.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(follow.id() as i32, libc::SIGINT) };
    assert!(wait_until(Duration::from_secs(5), || follow.try_wait().unwrap().is_some()));
    assert!(matches(&lab).is_empty(), "{:?}", matches(&lab));
    assert_eq!(who(v6), "cloud");
}
