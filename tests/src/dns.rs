//! A tiny authoritative DNS responder for tests that play the cloud's DNS: A/AAAA answers
//! from a shared, changeable zone with a 1 s TTL, NXDOMAIN for unknown names.

use std::{
    collections::HashMap,
    net::{IpAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

/// Names and their addresses, shared with the running responder so a test can change them.
pub type Zone = Arc<Mutex<HashMap<String, Vec<IpAddr>>>>;

/// Answers A/AAAA queries from `zone` with a 1 s TTL; NXDOMAIN for unknown names.
pub struct Dns {
    stop: Arc<AtomicBool>,
}

impl Dns {
    /// Serves `zone` on UDP port 53 of every address of namespace `ns`.
    pub fn start(ns: &str, zone: Zone) -> Dns {
        let sock = viscum::netns::in_netns(ns, || UdpSocket::bind("0.0.0.0:53"))
            .unwrap()
            .unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::SeqCst) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
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
        .map(|a| {
            a.iter()
                .filter(|ip| (qtype == 1 && ip.is_ipv4()) || (qtype == 28 && ip.is_ipv6()))
                .collect()
        })
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
