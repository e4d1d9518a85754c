//! `viscum run` services with every redirect mode of the spec they share with
//! `viscum redirect add` (NAT by default, `nat_to`, `anyip`, `mirror`, `from`, `learn_ms`):
//! one daemon in the lab's edge, one service per mode, and a real client in the lab's client
//! namespace talking to the cloud address through the entries the daemon installed.
//!
//! Each service is a small Python server that answers a TCP request with its identity and
//! the local address the connection arrived at (so NAT, `nat_to` and AnyIP are told apart by
//! what the service saw), and prints every UDP datagram it receives (so a mirrored datagram
//! is seen at the edge while the cloud answers the client).
//!
//! Run with `--test-threads=1`.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt,
    time::{Duration, Instant},
};

use serde_json::Value;
use viscum_tests::{
    IdentityServer, Lab,
    daemon::{Daemon, DaemonFiles, Service},
    lab::CLOUD_V4,
    skip_unless_root, tcp_ask, udp_ask, wait_until,
};

const ASK: Duration = Duration::from_millis(800);
/// Bound for "the daemon answers" and "a service turns healthy and redirected".
const UP: Duration = Duration::from_secs(20);

const SERVICE_PY: &str = r#"
import socket, sys, threading
port, ident = int(sys.argv[1]), sys.argv[2]
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", port))
    while True:
        data, peer = u.recvfrom(2048)
        print("udp", data.decode(errors="replace").strip(), "from", peer[0], flush=True)
        u.sendto((ident + "\n").encode(), peer)
threading.Thread(target=udp, daemon=True).start()
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen(64)
while True:
    c, _ = srv.accept()
    try:
        c.settimeout(2)
        local = c.getsockname()
        c.recv(128)
        c.sendall(("%s %s:%d\n" % (ident, local[0], local[1])).encode())
    except OSError:
        pass
    finally:
        c.close()
"#;

/// The daemon's files (the lab's fixture) with [`SERVICE_PY`] beside them as `modes.py`
/// (world-readable: services run as `nobody`).
fn files() -> DaemonFiles {
    let files = DaemonFiles::new();
    let script = files.dir().join("modes.py");
    fs::write(&script, SERVICE_PY).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).unwrap();
    files
}

/// A `[[service]]` running [`SERVICE_PY`] on `listen` as `name`, matching `matches`,
/// health-checked by TCP, with no drain wait.
fn service(files: &DaemonFiles, name: &str, matches: &str, listen: u16) -> Service {
    Service {
        command: vec![
            "/usr/bin/python3".into(),
            files.dir().join("modes.py").display().to_string(),
            listen.to_string(),
            name.into(),
        ],
        drain_timeout_ms: Some(0),
        ..files
            .service(name, listen.into(), name)
            .matches(&[matches.into()])
    }
}

/// Waits until service `name` is redirected; returns when that was seen.
fn redirected(daemon: &Daemon, name: &str) -> Instant {
    daemon.wait_redirected(name, UP);
    Instant::now()
}

fn cloud(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(CLOUD_V4), port)
}

/// `IDENT ADDR:PORT` from a service, or `cloud`, or the error.
fn who(lab: &Lab, port: u16) -> String {
    tcp_ask(lab.client.name(), cloud(port), ASK).unwrap_or_else(|e| format!("error: {e}"))
}

/// The daemon's entries as `viscum redirect list --json` shows them, by match.
fn entry(lab: &Lab, matched: &str) -> Value {
    let list: Value =
        serde_json::from_str(&lab.viscum_ok(&["redirect", "list", "--json"])).unwrap();
    list.as_array()
        .and_then(|l| l.iter().find(|e| e["match"] == matched))
        .cloned()
        .unwrap_or_else(|| panic!("no entry {matched} in {list:#}"))
}

#[test]
fn every_redirect_mode_works_through_the_daemon() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = files();
    // One cloud server per service, each on a port of its own (answers TCP and UDP "cloud").
    let clouds: Vec<IdentityServer> = (0..7)
        .map(|_| IdentityServer::start(lab.cloud.name(), 0, "cloud"))
        .collect();
    let port: Vec<u16> = clouds.iter().map(IdentityServer::port).collect();
    let names: Vec<String> = (0..7).map(|_| lab.service_ns_name()).collect();
    let [nat, natto, anyip, mirror, from_in, from_out, learn] =
        <[String; 7]>::try_from(names).unwrap();
    let tcp = |p: u16| format!("tcp://{CLOUD_V4}:{p}");
    let mut config = files.config();
    config.services = vec![
        service(&files, &nat, &tcp(port[0]), port[0]),
        Service {
            nat_to: Some("203.0.113.9:8080".into()),
            ..service(&files, &natto, &tcp(port[1]), 8080)
        },
        Service {
            anyip: Some(true),
            ..service(&files, &anyip, &tcp(port[2]), port[2])
        },
        Service {
            mirror: Some(true),
            learn_ms: Some(0),
            ..service(
                &files,
                &mirror,
                &format!("udp://{CLOUD_V4}:{}", port[3]),
                port[3],
            )
        },
        Service {
            from: Some("192.0.2.0/25".into()),
            ..service(&files, &from_in, &tcp(port[4]), port[4])
        },
        Service {
            from: Some("192.0.2.128/25".into()),
            ..service(&files, &from_out, &tcp(port[5]), port[5])
        },
        Service {
            learn_ms: Some(4000),
            ..service(&files, &learn, &tcp(port[6]), port[6])
        },
    ];
    files.write(&config);
    let path = files.config_path();
    let out = lab.viscum_ok(&["run", "--config", path.to_str().unwrap(), "--check"]);
    assert!(out.contains("ok (7 services"), "{out}");

    let daemon = Daemon::start(&lab, &files);

    // learn_ms: flows that start within the learning period still go to the cloud.
    let learn_on = redirected(&daemon, &learn);
    let first = who(&lab, port[6]);
    let first_at = learn_on.elapsed();
    assert!(
        first == "cloud" || first_at >= Duration::from_millis(3500),
        "a new flow {first_at:?} into a 4 s learning period went to {first:?}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || who(&lab, port[6])
            .starts_with(&learn)),
        "the edge never took new flows after learning: {}",
        who(&lab, port[6])
    );
    let edge_after = learn_on.elapsed();
    assert!(
        edge_after >= Duration::from_millis(3000),
        "the edge took new flows {edge_after:?} after a 4 s learning period began"
    );
    assert!(
        entry(&lab, &format!("tcp://{CLOUD_V4}:{}", port[6]))["cloud_flows"].as_u64() >= Some(1)
    );

    // NAT (the default): the service sees the connection arrive at its namespace's own address.
    redirected(&daemon, &nat);
    let answer = who(&lab, port[0]);
    let (ident, local) = answer.split_once(' ').unwrap_or_else(|| panic!("{answer}"));
    assert_eq!(ident, nat, "{answer}");
    let local: SocketAddr = local.parse().unwrap();
    assert_ne!(
        local.ip(),
        IpAddr::V4(CLOUD_V4),
        "NAT kept the cloud address: {answer}"
    );
    assert_eq!(local.port(), port[0]);
    assert_eq!(
        entry(&lab, &format!("tcp://{CLOUD_V4}:{}", port[0]))["mode"],
        "nat"
    );

    // nat_to: another address and port, which only the namespace knows.
    redirected(&daemon, &natto);
    assert_eq!(who(&lab, port[1]), format!("{natto} 203.0.113.9:8080"));
    assert_eq!(
        entry(&lab, &format!("tcp://{CLOUD_V4}:{}", port[1]))["nat_to"],
        "203.0.113.9:8080"
    );

    // anyip: the service answers as the cloud address itself.
    redirected(&daemon, &anyip);
    assert_eq!(
        who(&lab, port[2]),
        format!("{anyip} {CLOUD_V4}:{}", port[2])
    );
    assert_eq!(
        entry(&lab, &format!("tcp://{CLOUD_V4}:{}", port[2]))["mode"],
        "anyip"
    );

    // from: only clients in the prefix (192.0.2.2 is in .0/25, not in .128/25).
    redirected(&daemon, &from_in);
    assert!(
        who(&lab, port[4]).starts_with(&from_in),
        "{}",
        who(&lab, port[4])
    );
    redirected(&daemon, &from_out);
    assert_eq!(
        who(&lab, port[5]),
        "cloud",
        "a client outside `from` went to the edge"
    );
    entry(
        &lab,
        &format!("tcp://{CLOUD_V4}:{}?from=192.0.2.128/25", port[5]),
    );

    // mirror: the cloud answers the client, and the edge copy sees the same datagram.
    redirected(&daemon, &mirror);
    let log = files.run_dir().join("logs").join(format!("{mirror}.log"));
    let mut answers = Vec::new();
    let seen = wait_until(Duration::from_secs(10), || {
        answers.push(
            udp_ask(lab.client.name(), cloud(port[3]), ASK).unwrap_or_else(|e| format!("{e}")),
        );
        fs::read_to_string(&log).is_ok_and(|l| l.contains("udp "))
    });
    assert!(
        seen,
        "the edge copy never saw a mirrored datagram; answers {answers:?}"
    );
    assert!(
        answers.iter().all(|a| a == "cloud"),
        "mirror must leave the client with the cloud: {answers:?}"
    );
    assert_eq!(
        entry(&lab, &format!("udp://{CLOUD_V4}:{}", port[3]))["mode"],
        "mirror"
    );
}

#[test]
fn bad_redirect_keys_are_reported_per_service_and_field() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = files();
    let mut config = files.config();
    config.services = vec![
        Service {
            anyip: Some(true),
            mirror: Some(true),
            nat_to: Some("[2001:db8::1]:80".into()),
            from: Some("2001:db8::/64".into()),
            learn_ms: Some(-1),
            ..service(&files, "modes", &format!("tcp://{CLOUD_V4}:80"), 80)
        },
        Service {
            from: Some("192.0.2.0/24".into()),
            ..service(&files, "mixed", "tcp://x.example:80", 80)
        },
    ];
    files.write(&config);
    let path = files.config_path();
    let err = lab.viscum_err(&["run", "--config", path.to_str().unwrap(), "--check"]);
    for want in [
        "service modes: mode: anyip and mirror cannot be combined",
        "service modes: mode: anyip and NAT (nat, nat_to) cannot be combined",
        "service modes: nat_to: NAT address 2001:db8::1 is not of the same family",
        "service modes: from: source prefix 2001:db8:: and destination 198.51.100.7",
        "service modes: learn_ms: -1 must be between 0 and 600000",
        "service mixed: from: not supported with host names",
    ] {
        assert!(err.contains(want), "{want:?} not in:\n{err}");
    }
}
