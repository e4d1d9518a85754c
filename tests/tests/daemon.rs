//! `viscum run`: the daemon, end to end, in the lab.
//!
//! The daemon is the real `viscum` binary started inside the lab's edge namespace (the typed
//! fixture of `viscum_lab::daemon`); its services are small Python servers (unmodified "cloud
//! services" as far as viscum knows) that answer the identity protocol with "edge", while the
//! cloud's identity server answers "cloud". Every wait polls with a bound; times that matter (failover, recovery) are
//! measured and printed.
//!
//! Run with `--test-threads=1 --nocapture` to see the measurements.

use std::{
    fs,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use viscum::{engine::Pins, netns};
use viscum_tests::{
    IdentityServer, Lab, clients,
    daemon::{Check, Daemon, DaemonFiles, Health, Limits, Service},
    guard::{alive, send_signal},
    lab::CLOUD_V4,
    skip_unless_root, wait_until,
};

/// Bound of one client request.
const ASK: Duration = Duration::from_millis(500);
/// Bound for "the service comes up and turns healthy" (Python starts in ~100 ms).
const UP: Duration = Duration::from_secs(20);

/// Who answers a new connection to the cloud address right now ("edge", "cloud", or the error).
fn who(lab: &Lab, port: u16) -> String {
    clients::who(lab.client.name(), port, ASK)
}

/// Waits until `who` answers `want`; returns how long it took.
fn wait_for(lab: &Lab, port: u16, want: &str, timeout: Duration) -> Duration {
    clients::wait_for(lab.client.name(), port, want, ASK, timeout)
}

/// The entries in the lab's datapath, as strings.
fn entries(lab: &Lab) -> Vec<String> {
    match viscum::engine::Engine::open(&Pins::new(lab.bpffs.path())) {
        Ok(engine) => engine
            .entries()
            .unwrap()
            .iter()
            .map(|e| e.endpoint.to_string())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Waits until the datapath has no entry `ep` any more; returns how long it took. Polls the
/// map directly, so the figure is the daemon's reaction time, not a client's timeout.
fn wait_entry_gone(lab: &Lab, ep: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    let engine = viscum::engine::Engine::open(&Pins::new(lab.bpffs.path())).unwrap();
    let gone = wait_until(timeout, || {
        !engine
            .entries()
            .unwrap()
            .iter()
            .any(|e| e.endpoint.to_string() == ep)
    });
    assert!(gone, "{ep} still in the datapath after {timeout:?}");
    start.elapsed()
}

/// The network namespace inode of a process and of a named namespace, to compare.
fn netns_inode_of_pid(pid: i32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino()
}

fn netns_inode_of_name(name: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(Path::new(netns::NETNS_RUN_DIR).join(name))
        .unwrap()
        .ino()
}

/// Scrapes the metrics endpoint from inside the edge namespace (where the daemon listens).
fn scrape(lab: &Lab, addr: SocketAddr) -> String {
    netns::in_netns(lab.edge.name(), move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .unwrap()
}

#[test]
fn serves_at_the_edge_while_healthy_and_fails_over_when_the_service_dies() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let _cloud = IdentityServer::start(lab.cloud.name(), 8080, "cloud");
    let web = lab.service_ns_name();
    let metrics: SocketAddr = "127.0.0.1:9310".parse().unwrap();
    // An HTTP check: a stopped process still completes TCP handshakes (the kernel does them
    // into the listen backlog), so only a check that needs an answer sees it hang.
    let mut config = files.config();
    config.engine.metrics = Some(metrics);
    config.services.push(
        files
            .service(&web, 8080, "edge")
            .check(Check::Http("/healthz".into())),
    );
    files.write(&config);
    assert_eq!(who(&lab, 8080), "cloud");

    let started = Instant::now();
    let daemon = Daemon::start(&lab, &files);
    let t_up = wait_for(&lab, 8080, "edge", UP);
    eprintln!(
        "served at the edge {:?} after the daemon started",
        started.elapsed().max(t_up)
    );
    let pid = daemon.wait_redirected(&web, UP);

    // The copy runs inside its namespace, unprivileged, in its own process group.
    assert_eq!(netns_inode_of_pid(pid), netns_inode_of_name(&web));
    let proc_status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = proc_status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid_line}"
    );
    assert_eq!(
        nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid)))
            .unwrap()
            .as_raw(),
        pid
    );
    assert_eq!(entries(&lab), vec![format!("tcp://{CLOUD_V4}:8080")]);

    // Counters, the human status, logs and metrics.
    for _ in 0..5 {
        assert_eq!(who(&lab, 8080), "edge");
    }
    let s = daemon.service(&web);
    assert!(
        s["packets"].as_u64().unwrap() > 0 && s["bytes"].as_u64().unwrap() > 0,
        "{s:#}"
    );
    let table = lab.viscum_ok(&["status", "--control", files.control().to_str().unwrap()]);
    assert!(table.contains(&web) && table.contains("healthy"), "{table}");
    // The configuration names its own control socket; a command given only --bpffs finds
    // the daemon through the link at the instance's default path.
    let default_control = viscum::daemon::state::default_control(lab.bpffs.path());
    assert_eq!(
        std::fs::read_link(&default_control).ok(),
        Some(files.control()),
        "no link at {}",
        default_control.display()
    );
    let table = lab.viscum_ok(&["status"]);
    assert!(table.contains(&web) && table.contains("healthy"), "{table}");
    // A service's entry is refused to `redirect del` through the daemon (the service would
    // restore it at once), naming the service; the entry stays.
    let err = lab.viscum_err(&["redirect", "del", &format!("tcp://{CLOUD_V4}:8080")]);
    assert!(
        err.contains(&format!("is an entry of service {web}")),
        "{err}"
    );
    assert_eq!(entries(&lab), vec![format!("tcp://{CLOUD_V4}:8080")]);
    let logs = lab.viscum_ok(&["logs", &web, "--control", files.control().to_str().unwrap()]);
    assert!(
        logs.contains("listening on 8080") && logs.contains(&format!("started process {pid}")),
        "{logs}"
    );
    let text = scrape(&lab, metrics);
    assert!(text.starts_with("HTTP/1.0 200 OK"), "{text}");
    assert!(
        text.contains(&format!("viscum_service_healthy{{service=\"{web}\"}} 1")),
        "{text}"
    );
    assert!(
        text.contains("viscum_datapath_packets_total{result=\"redirected\"}"),
        "{text}"
    );

    // kill -9: the redirect goes at once (process exit), not after `fall` failed checks.
    let ep = format!("tcp://{CLOUD_V4}:8080");
    let t0 = Instant::now();
    send_signal(pid, Signal::SIGKILL);
    let failover = wait_entry_gone(&lab, &ep, Duration::from_secs(2));
    assert_eq!(who(&lab, 8080), "cloud");
    eprintln!("kill -9: redirect removed after {failover:?} (fall x interval would be 400 ms)");
    assert!(
        failover < Duration::from_millis(300),
        "failover took {failover:?}"
    );
    // ...and comes back once the restarted copy is healthy (backoff 0.5 s + rise x interval).
    wait_for(&lab, 8080, "edge", UP);
    eprintln!(
        "kill -9: back at the edge {:?} after the kill",
        t0.elapsed()
    );
    let s = daemon.service(&web);
    assert_eq!(s["restarts"], 1, "{s:#}");
    assert!(
        s["last_exit"].as_str().unwrap().contains("signal 9"),
        "{s:#}"
    );
    let pid2 = daemon.wait_redirected(&web, UP);
    assert_ne!(pid2, pid);

    // A hung copy (SIGSTOP): `fall` failed checks take it out.
    let t0 = Instant::now();
    send_signal(pid2, Signal::SIGSTOP);
    let hung = wait_entry_gone(&lab, &ep, Duration::from_secs(5));
    assert_eq!(who(&lab, 8080), "cloud");
    // Worst case: the first failing check starts one interval after the stop.
    let bound = Duration::from_millis(2 * 200 + 150 + 300);
    eprintln!("SIGSTOP: redirect removed after {hung:?} (fall x interval + timeout = 550 ms)");
    assert!(hung < bound, "unhealthy failover took {hung:?}");
    assert_eq!(daemon.service(&web)["health"], "unhealthy");
    send_signal(pid2, Signal::SIGCONT);
    wait_for(&lab, 8080, "edge", UP);
    eprintln!(
        "SIGCONT: back at the edge {:?} after the stop",
        t0.elapsed()
    );
    assert_eq!(
        daemon.service(&web)["pid"],
        pid2,
        "a hung process is not restarted"
    );

    // `viscum service stop|start`.
    let ctl = files.control();
    let ctl = ctl.to_str().unwrap();
    lab.viscum_ok(&["service", "stop", &web, "--control", ctl]);
    assert_eq!(
        who(&lab, 8080),
        "cloud",
        "stop removes the redirect before it returns"
    );
    assert!(!alive(pid2));
    assert_eq!(daemon.service(&web)["state"], "stopped");
    lab.viscum_ok(&["service", "start", &web, "--control", ctl]);
    wait_for(&lab, 8080, "edge", UP);
    let err = lab.viscum_err(&["service", "restart", "nosuch", "--control", ctl]);
    assert!(err.contains("no service named nosuch"), "{err}");

    // Clean shutdown: everything it made goes; the cloud serves.
    let pid3 = daemon.service(&web)["pid"].as_i64().unwrap() as i32;
    let status = daemon.stop();
    assert!(status.success(), "{status}");
    assert!(!alive(pid3), "service process left running");
    assert!(!netns::named_exists(&web), "service namespace left behind");
    assert!(entries(&lab).is_empty());
    assert!(
        !lab.bpffs.path().join("prog_ingress").exists(),
        "pins left behind"
    );
    assert!(!files.control().exists(), "control socket left behind");
    assert!(
        std::fs::symlink_metadata(&default_control).is_err(),
        "control link left behind at {}",
        default_control.display()
    );
    assert_eq!(who(&lab, 8080), "cloud");
}

/// The configuration decides what is redirected: an entry of a running service deleted
/// behind the daemon's back (a one-shot `viscum redirect del`) is put back by the daemon,
/// its local route with it, and the edge serves again. `status` never goes on reporting an
/// entry the datapath lost.
#[test]
fn an_entry_deleted_behind_the_daemons_back_is_restored() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let _cloud = IdentityServer::start(lab.cloud.name(), 8080, "cloud");
    let web = lab.service_ns_name();
    let mut config = files.config();
    config.services.push(files.service(&web, 8080, "edge"));
    files.write(&config);
    let daemon = Daemon::start(&lab, &files);
    daemon.wait_redirected(&web, UP);
    wait_for(&lab, 8080, "edge", UP);
    let ep = format!("tcp://{CLOUD_V4}:8080");

    let deleted = Instant::now();
    // Behind its back: not through the daemon, which refuses to delete a service's entry.
    lab.viscum_ok(&["redirect", "del", &ep, "--now", "--no-daemon"]);
    let back = wait_until(UP, || entries(&lab) == vec![ep.clone()]);
    assert!(
        back,
        "the deleted entry was not restored: {:?}",
        entries(&lab)
    );
    let t = wait_for(&lab, 8080, "edge", UP);
    eprintln!(
        "entry restored and served at the edge {:?} after the delete",
        deleted.elapsed().max(t)
    );
    assert!(daemon.stop().success());
}

#[test]
fn a_command_that_cannot_start_is_retried_counted_and_never_redirected() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let _cloud = IdentityServer::start(lab.cloud.name(), 8084, "cloud");
    let web = lab.service_ns_name();
    let mut config = files.config();
    config.services.push(Service {
        command: vec!["/nonexistent/viscum-test-server".into()],
        ..files.service(&web, 8084, "edge")
    });
    files.write(&config);
    let daemon = Daemon::start(&lab, &files);
    // Each failed start is retried with back-off (0.5 s, then 1 s): the attempts count.
    let mut last = serde_json::Value::Null;
    let retried = wait_until(UP, || {
        last = daemon.service(&web);
        last["restarts"].as_u64().is_some_and(|n| n >= 2)
    });
    assert!(retried, "{last:#}\n{}", daemon.log());
    assert!(
        ["backoff", "starting"].contains(&last["state"].as_str().unwrap_or("")),
        "{last:#}"
    );
    assert!(entries(&lab).is_empty(), "{:?}", entries(&lab));
    assert_eq!(who(&lab, 8084), "cloud");
    assert!(daemon.stop().success());
}

#[test]
fn a_service_whose_check_never_passes_is_never_redirected() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let _cloud = IdentityServer::start(lab.cloud.name(), 8081, "cloud");
    let _cloud2 = IdentityServer::start(lab.cloud.name(), 8083, "cloud");
    let (mute, probed) = (lab.service_ns_name(), lab.service_ns_name());
    // `probed` is checked by an exec check that connects to 127.0.0.1:8083: it only passes if the
    // check runs inside the service's namespace.
    let probe = "import socket; socket.create_connection(('127.0.0.1', 8083), 1)";
    let mut config = files.config();
    config.services = vec![
        Service {
            command: vec!["/bin/sleep".into(), "1000".into()],
            health: Some(Health {
                check: Check::Tcp(8081),
                interval_ms: 100,
                timeout_ms: 50,
                rise: 1,
                fall: 2,
            }),
            ..files.service(&mute, 8081, "edge")
        },
        files.service(&probed, 8083, "edge").check(Check::Exec(vec![
            "/usr/bin/python3".into(),
            "-c".into(),
            probe.into(),
        ])),
    ];
    files.write(&config);
    let daemon = Daemon::start(&lab, &files);
    daemon.wait_redirected(&probed, UP);
    wait_for(&lab, 8083, "edge", UP);
    let ok = wait_until(UP, || {
        // Checked on every poll: never redirected, never anything but the cloud.
        let s = daemon.service(&mute);
        assert_eq!(s["redirected"], false, "{s:#}");
        assert_eq!(entries(&lab), vec![format!("tcp://{CLOUD_V4}:8083")]);
        assert_eq!(who(&lab, 8081), "cloud");
        s["checks_failed"].as_u64().unwrap() >= 15
    });
    assert!(ok, "the checks did not run: {:#}", daemon.service(&mute));
    let s = daemon.service(&mute);
    assert_eq!(s["state"], "running");
    assert_eq!(s["health"], "unhealthy");
    assert_eq!(s["checks_passed"], 0);
    assert!(
        s["last_check_error"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:8081"),
        "{s:#}"
    );
}

#[test]
fn reload_adds_changes_and_removes_services_without_touching_the_others() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let _cloud_a = IdentityServer::start(lab.cloud.name(), 8080, "cloud");
    let _cloud_b = IdentityServer::start(lab.cloud.name(), 8082, "cloud");
    let (a, b) = (lab.service_ns_name(), lab.service_ns_name());
    let with = |services: &[Service]| {
        let mut config = files.config();
        config.services = services.to_vec();
        files.write(&config);
    };
    with(&[files.service(&a, 8080, "edge-a")]);
    let daemon = Daemon::start(&lab, &files);
    let pid_a = daemon.wait_redirected(&a, UP);
    wait_for(&lab, 8080, "edge-a", UP);

    // Watch A's entry the whole time: it must never leave the datapath.
    let a_entry = format!("tcp://{CLOUD_V4}:8080");
    let stop = Arc::new(AtomicBool::new(false));
    let gaps = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (stop, gaps, bpffs, a_entry) = (
            stop.clone(),
            gaps.clone(),
            lab.bpffs.path().to_owned(),
            a_entry.clone(),
        );
        thread::spawn(move || {
            let engine = viscum::engine::Engine::open(&Pins::new(&bpffs)).unwrap();
            while !stop.load(Ordering::SeqCst) {
                let present = engine
                    .entries()
                    .unwrap()
                    .iter()
                    .any(|e| e.endpoint.to_string() == a_entry);
                if !present {
                    gaps.fetch_add(1, Ordering::SeqCst);
                }
                thread::sleep(Duration::from_millis(2));
            }
        })
    };

    // Add B with `viscum reload`.
    let ctl = files.control();
    let ctl = ctl.to_str().unwrap();
    with(&[
        files.service(&a, 8080, "edge-a"),
        files.service(&b, 8082, "edge-b"),
    ]);
    let out = lab.viscum_ok(&["reload", "--control", ctl]);
    assert!(out.contains(&format!("added: {b}")), "{out}");
    let pid_b = daemon.wait_redirected(&b, UP);
    wait_for(&lab, 8082, "edge-b", UP);
    assert_eq!(
        daemon.service(&a)["pid"],
        pid_a,
        "A was restarted by adding B"
    );

    // An invalid file changes nothing and says why, naming service and field.
    with(&[
        files.service(&a, 8080, "edge-a"),
        files.service(&b, 70000, "edge-b"),
    ]);
    let err = lab.viscum_err(&["reload", "--control", ctl]);
    assert!(
        err.contains(&format!("service {b}: match[0]: port '70000'")),
        "{err}"
    );
    assert!(
        err.contains(&format!("service {b}: health.tcp: port 70000 out of range")),
        "{err}"
    );
    assert_eq!(daemon.service(&b)["pid"], pid_b);
    assert_eq!(who(&lab, 8082), "edge-b");

    // Change B (its environment): B restarts, A does not.
    with(&[
        files.service(&a, 8080, "edge-a"),
        files.service(&b, 8082, "edge-b").env("V", "2"),
    ]);
    let out = lab.viscum_ok(&["reload", "--control", ctl]);
    assert!(out.contains(&format!("changed (restarted): {b}")), "{out}");
    let pid_b2 = daemon.wait_redirected(&b, UP);
    assert_ne!(pid_b2, pid_b);
    assert!(!alive(pid_b));
    assert_eq!(daemon.service(&a)["pid"], pid_a);

    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    assert_eq!(
        gaps.load(Ordering::SeqCst),
        0,
        "A's entry left the datapath during reloads"
    );

    // Remove A with SIGHUP: its entry, process and namespace go; B stays as it is.
    with(&[files.service(&b, 8082, "edge-b").env("V", "2")]);
    send_signal(daemon.pid(), Signal::SIGHUP);
    let gone = wait_until(UP, || !netns::named_exists(&a));
    assert!(gone, "A's namespace still there:\n{}", daemon.log());
    assert!(!alive(pid_a));
    assert_eq!(who(&lab, 8080), "cloud");
    assert_eq!(entries(&lab), vec![format!("tcp://{CLOUD_V4}:8082")]);
    assert_eq!(daemon.service(&b)["pid"], pid_b2);
    assert_eq!(daemon.status()["services"].as_array().unwrap().len(), 1);
    assert_eq!(who(&lab, 8082), "edge-b");
    assert!(daemon.stop().success());
}

#[test]
fn a_daemon_restart_keeps_an_ongoing_transfer_alive() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let _cloud = IdentityServer::start(lab.cloud.name(), 8080, "cloud");
    let web = lab.service_ns_name();
    let with = |service: Option<Service>| {
        let mut config = files.config();
        config.services.extend(service);
        files.write(&config);
    };
    with(Some(files.service(&web, 8080, "edge")));
    let daemon = Daemon::start(&lab, &files);
    let pid = daemon.wait_redirected(&web, UP);
    wait_for(&lab, 8080, "edge", UP);

    // A 300 KiB transfer from the edge copy, spread over ~3 s.
    const KIB: usize = 300;
    let clients::Download {
        received: progress,
        thread: transfer,
    } = clients::download(lab.client.name(), 8080, KIB);

    // The daemon dies (SIGKILL: no cleanup) in the middle of the transfer. The datapath and
    // the service carry on.
    assert!(
        wait_until(Duration::from_secs(5), || progress.load(Ordering::SeqCst)
            > 0),
        "the transfer did not start"
    );
    daemon.kill();
    assert!(alive(pid));
    assert_eq!(entries(&lab), vec![format!("tcp://{CLOUD_V4}:8080")]);
    assert_eq!(
        who(&lab, 8080),
        "edge",
        "new connections reach the edge while no daemon runs"
    );

    // A new daemon adopts the process and its entry, without a gap.
    let daemon = Daemon::start(&lab, &files);
    assert!(
        wait_until(UP, || !daemon.service(&web)["pid"].is_null()),
        "{:#}",
        daemon.service(&web)
    );
    let s = daemon.service(&web);
    assert_eq!(s["pid"], pid, "{s:#}");
    assert_eq!(s["adopted"], true, "{s:#}");
    assert_eq!(daemon.wait_redirected(&web, UP), pid);
    assert_eq!(who(&lab, 8080), "edge");
    let at_restart = progress.load(Ordering::SeqCst);
    assert!(
        at_restart < KIB * 1024,
        "the transfer ended before the new daemon took over; make it longer"
    );
    let received = transfer.join().unwrap().expect("the transfer broke");
    assert_eq!(received, KIB * 1024, "the transfer was cut short");
    eprintln!("transfer of {KIB} KiB completed across a daemon restart");

    // Restarted with a different configuration while down: the old process is replaced.
    daemon.kill();
    with(Some(files.service(&web, 8080, "edge2")));
    let daemon = Daemon::start(&lab, &files);
    let pid2 = daemon.wait_redirected(&web, UP);
    assert_ne!(pid2, pid);
    assert!(!alive(pid), "the replaced process is still running");
    assert_eq!(daemon.service(&web)["adopted"], false);
    wait_for(&lab, 8080, "edge2", UP);

    // Restarted with the service gone from the file: the leftovers are cleaned up.
    daemon.kill();
    with(None);
    let daemon = Daemon::start(&lab, &files);
    assert!(
        !alive(pid2),
        "a service no longer configured is still running"
    );
    assert!(!netns::named_exists(&web));
    assert!(entries(&lab).is_empty());
    assert_eq!(who(&lab, 8080), "cloud");
    assert!(daemon.stop().success());
}

#[test]
fn bad_configurations_are_rejected_naming_service_and_field() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let name = lab.service_ns_name();
    let bad = format!(
        r#"{}
[[service]]
name = "{name}"
match = ["tcp://198.51.100.7:5201", "udp://198.51.100.7:70000"]
command = []
user = "no-such-user"
restart = "sometimes"
[service.health]
tcp = 5201
interval_ms = 0
timeout_ms = 300
[service.limits]
memory = "lots"
pids = "many"

[[service]]
name = "{name}"
match = ["tcp://198.51.100.7:5201"]
command = ["x"]
"#,
        files.config().to_toml()
    );
    files.write_raw(&bad);
    let config = files.config_path();
    let config = config.to_str().unwrap();
    let err = lab.viscum_err(&["run", "--config", config, "--check"]);
    // Two services share the name: each is named by its place in the file.
    for want in [
        "service #1: match[1]: port '70000' is not a number between 1 and 65535".to_owned(),
        "service #1: command: empty".to_owned(),
        "service #1: user: unknown user 'no-such-user'".to_owned(),
        "service #1: restart: 'sometimes' is not one of always, on-failure, never".to_owned(),
        "service #1: health.interval_ms: 0 must be at least 1".to_owned(),
        "service #1: limits.memory: 'lots' is not a size".to_owned(),
        "service #1: limits.pids: expected a whole number, found the string \"many\"".to_owned(),
        format!("service #2: name: '{name}' is already the name of service #1"),
        "service #2: match[0]: tcp://198.51.100.7:5201 is already matched by service #1 (match[0])"
            .to_owned(),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    // Without --check the daemon refuses to start and changes nothing.
    let err = lab.viscum_err(&["run", "--config", config]);
    assert!(err.contains("problems"), "{err}");
    assert!(!netns::named_exists(&name));
    assert!(!lab.bpffs.path().join("prog_ingress").exists());
    assert!(!files.control().exists());

    files.write_raw("[engine]\ninterfaces = [\"lan0\"]\nbogus = 1\n");
    let err = lab.viscum_err(&["run", "--config", config, "--check"]);
    assert!(
        err.contains("engine: bogus: unknown key (valid keys: interfaces,"),
        "{err}"
    );

    let mut good = files.config();
    good.services.push(files.service(&name, 8080, "edge"));
    files.write(&good);
    let out = lab.viscum(&["run", "--config", config, "--check"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("ok (1 service"),
        "{out:?}"
    );
    assert!(!stderr.contains("does not exist"), "{stderr}");
    // An interface this namespace lacks is fine (attached when it appears), but said.
    good.engine.interfaces = vec!["br-nope".into()];
    files.write(&good);
    let out = lab.viscum(&["run", "--config", config, "--check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stderr.contains("interface br-nope does not exist in this network namespace"),
        "{stderr}"
    );
    assert!(!stderr.contains("not an executable file"), "{stderr}");
    // A command that resolves nowhere: said, still ok (it may live in the service's storage).
    good.services[0].command[0] = "/usr/bin/pyth0n3".into();
    files.write(&good);
    let out = lab.viscum(&["run", "--config", config, "--check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stderr.contains(&format!(
            "service {name}: command /usr/bin/pyth0n3 is not an executable file here"
        )),
        "{stderr}"
    );
}

#[test]
fn limits_are_enforced_in_the_service_cgroup_or_reported_unsupported() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let web = lab.service_ns_name();
    let mut config = files.config();
    config.services.push(Service {
        limits: Some(Limits {
            memory: Some("64M".into()),
            cpu: Some(0.5),
            pids: Some(32),
        }),
        ..files.service(&web, 8080, "edge")
    });
    files.write(&config);
    let daemon = Daemon::start(&lab, &files);
    let pid = daemon.wait_redirected(&web, UP);
    let limits = daemon.service(&web)["limits"].clone();
    for (limit, want) in [("memory", "67108864"), ("pids", "32")] {
        let l = &limits[limit];
        assert_eq!(l["value"], want, "{limits:#}");
        let detail = l["detail"].as_str().unwrap();
        if l["enforced"] == true {
            // "<file>" or "<file> (cgroup v1; ...)"
            let file = PathBuf::from(detail.split(' ').next().unwrap());
            let value = fs::read_to_string(&file).unwrap();
            assert_eq!(value.trim(), want, "{}", file.display());
            let procs = fs::read_to_string(file.parent().unwrap().join("cgroup.procs")).unwrap();
            assert!(
                procs.lines().any(|p| p.trim() == pid.to_string()),
                "pid {pid} not in {}",
                file.display()
            );
            eprintln!("{limit} limit enforced: {detail}");
        } else {
            assert!(detail.contains("unsupported"), "{limits:#}");
            eprintln!("{limit} limit reported unsupported: {detail}");
        }
    }
    let cpu = &limits["cpu"];
    eprintln!("cpu limit: enforced={} {}", cpu["enforced"], cpu["detail"]);
    let table = lab.viscum_ok(&["status", "--control", files.control().to_str().unwrap()]);
    eprintln!("{table}");
    assert!(daemon.stop().success());
}

#[test]
fn a_deliberate_stop_drains_the_edge_flows_before_stopping_the_service() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let _cloud = IdentityServer::start(lab.cloud.name(), 8080, "cloud");
    let web = lab.service_ns_name();
    let mut config = files.config();
    config.services.push(Service {
        drain_timeout_ms: Some(20000),
        ..files.service(&web, 8080, "edge")
    });
    files.write(&config);
    let daemon = Daemon::start(&lab, &files);
    let pid = daemon.wait_redirected(&web, UP);
    wait_for(&lab, 8080, "edge", UP);

    // A 300 KiB transfer from the edge copy, spread over ~3 s.
    const KIB: usize = 300;
    let clients::Download {
        received: progress,
        thread: transfer,
    } = clients::download(lab.client.name(), 8080, KIB);
    assert!(
        wait_until(Duration::from_secs(5), || progress.load(Ordering::SeqCst)
            > 0),
        "the transfer did not start"
    );

    // `service stop` drains: it returns only once the open edge flow has ended.
    let control = files.control();
    let stopper = {
        let cmd = lab.viscum_command(&[
            "service",
            "stop",
            &web,
            "--control",
            control.to_str().unwrap(),
        ]);
        thread::spawn(move || {
            let mut cmd = cmd;
            cmd.output().unwrap()
        })
    };
    // Meanwhile new connections already go to the cloud, and the service still runs.
    let t0 = Instant::now();
    wait_for(&lab, 8080, "cloud", Duration::from_secs(5));
    eprintln!(
        "new flows went to the cloud {:?} after the stop began",
        t0.elapsed()
    );
    assert!(
        alive(pid),
        "the service must keep running while its flows drain"
    );
    assert!(
        progress.load(Ordering::SeqCst) < KIB * 1024,
        "the transfer ended before draining was seen; make it longer"
    );

    let received = transfer
        .join()
        .unwrap()
        .expect("the drained transfer broke");
    assert_eq!(
        received,
        KIB * 1024,
        "the transfer was cut short by the stop"
    );
    let out = stopper.join().unwrap();
    assert!(
        out.status.success(),
        "service stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(10), || !alive(pid)),
        "the service was not stopped after draining"
    );
    assert!(entries(&lab).is_empty(), "{:?}", entries(&lab));
    assert_eq!(who(&lab, 8080), "cloud");
    drop(daemon);
}

#[test]
fn a_host_name_service_follows_dns() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let _cloud = IdentityServer::start(lab.cloud.name(), 8080, "cloud");
    let zone = viscum_tests::Zone::default();
    zone.lock()
        .unwrap()
        .insert("alpr.example.net".into(), vec![IpAddr::V4(CLOUD_V4)]);
    let _dns = viscum_tests::Dns::start(lab.cloud.name(), zone.clone());
    let web = lab.service_ns_name();
    let mut config = files.config();
    config.engine.dns = vec![CLOUD_V4.to_string()];
    config.services.push(
        files
            .service(&web, 8080, "edge")
            .matches(&["tcp://alpr.example.net:8080".into()]),
    );
    files.write(&config);
    let daemon = Daemon::start(&lab, &files);
    daemon.wait_redirected(&web, UP);
    wait_for(&lab, 8080, "edge", UP);
    assert_eq!(entries(&lab), vec![format!("tcp://{CLOUD_V4}:8080")]);
    let matches = daemon.service(&web)["matches"].clone();
    assert_eq!(
        matches,
        serde_json::json!([format!("tcp://alpr.example.net:8080 -> [{CLOUD_V4}]")])
    );

    // The name leaves that address (TTL 1 s): its entry goes, and the cloud serves again.
    zone.lock().unwrap().insert(
        "alpr.example.net".into(),
        vec!["2001:db8:f::7".parse().unwrap()],
    );
    let gone = wait_entry_gone(
        &lab,
        &format!("tcp://{CLOUD_V4}:8080"),
        Duration::from_secs(10),
    );
    eprintln!("stale address removed {gone:?} after the DNS change");
    assert!(
        wait_until(Duration::from_secs(5), || entries(&lab)
            == ["tcp://[2001:db8:f::7]:8080"]),
        "{:?}",
        entries(&lab)
    );
    assert_eq!(who(&lab, 8080), "cloud");
    daemon.stop();
    assert!(entries(&lab).is_empty(), "{:?}", entries(&lab));
}

/// One request line on the daemon's control socket, sent from the lab's edge namespace (as
/// `viscum` in the lab runs), and its JSON answer.
fn ask_from_edge(lab: &Lab, files: &DaemonFiles, line: &str) -> serde_json::Value {
    use std::{io::BufRead as _, os::unix::net::UnixStream};
    let (control, line) = (files.control(), line.to_owned());
    netns::in_netns(lab.edge.name(), move || {
        let mut s = UnixStream::connect(&control).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        writeln!(s, "{line}").unwrap();
        let mut answer = String::new();
        std::io::BufReader::new(s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    })
    .unwrap()
}

/// `viscum redirect add/del` next to a running daemon hand the change to it (the daemon logs
/// it as a control request and applies it with its open engine); the entry belongs to no
/// service, so a reload leaves it alone; a bad request is refused by the daemon and changes
/// nothing.
#[test]
fn redirect_add_and_del_go_through_a_running_daemon() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let port = 8087;
    let _cloud = IdentityServer::start(lab.cloud.name(), port, "cloud");
    // A namespace made by hand, not a daemon service.
    let svc = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &svc]);
    let _edge = IdentityServer::start(&svc, port, "edge");
    files.write(&files.config());
    let daemon = Daemon::start(&lab, &files);
    let control = files.control().display().to_string();
    let ep = format!("tcp://{CLOUD_V4}:{port}");
    assert_eq!(who(&lab, port), "cloud");

    // Refused by the daemon: a namespace that does not exist, and a request whose port no
    // match can have (sent raw: the CLI would refuse it before asking). Nothing changes.
    let err = lab.viscum_err(&[
        "redirect",
        "add",
        &ep,
        "--ns",
        "nosuchns",
        "--control",
        &control,
    ]);
    assert!(err.contains("nosuchns"), "{err}");
    let bpffs = lab.bpffs.path().display().to_string();
    let bad = serde_json::json!({
        "cmd": "redirect-add",
        "bpffs": bpffs,
        "match": format!("tcp://{CLOUD_V4}:99999"),
        "ns": svc,
    });
    let answer = ask_from_edge(&lab, &files, &bad.to_string());
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("99999"),
        "{answer}"
    );
    let unknown = ask_from_edge(
        &lab,
        &files,
        &format!(
            r#"{{"cmd":"redirect-add","bpffs":"{bpffs}","match":"{ep}","ns":"{svc}","force":1}}"#
        ),
    );
    assert!(
        unknown["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `force`"),
        "{unknown}"
    );
    // A valid request from another network namespace (this test's): the daemon would
    // resolve the namespace and interfaces in its own, so it declines and the client applies
    // it itself.
    let good = serde_json::json!({
        "cmd": "redirect-add",
        "bpffs": bpffs,
        "match": ep,
        "ns": svc,
    });
    let declined = daemon.request(&good.to_string()).expect("an answer");
    assert_eq!(declined["declined"], true, "{declined}");
    assert!(entries(&lab).is_empty(), "{:?}", entries(&lab));
    assert_eq!(who(&lab, port), "cloud");

    // Added by the daemon, served at the edge.
    let out = lab.viscum_ok(&["redirect", "add", &ep, "--ns", &svc, "--control", &control]);
    assert!(
        out.contains(&format!("redirecting {ep} to namespace {svc}")),
        "{out}"
    );
    assert!(
        daemon.log().contains(&format!("control: redirecting {ep}")),
        "the daemon did not apply it:\n{}",
        daemon.log()
    );
    wait_for(&lab, port, "edge", UP);
    // A reload (the daemon reconciling its configuration) leaves an entry it was asked for
    // alone: no service owns it.
    let reloaded = daemon.request(r#"{"cmd":"reload"}"#).expect("an answer");
    assert_eq!(reloaded["ok"], true, "{reloaded}");
    assert_eq!(entries(&lab), vec![ep.clone()]);
    assert_eq!(who(&lab, port), "edge");

    // Deleted by the daemon (no open flows: at once), served by the cloud again.
    let out = lab.viscum_ok(&["redirect", "del", &ep, "--control", &control]);
    assert!(out.contains(&format!("deleted {ep}")), "{out}");
    assert!(
        daemon.log().contains(&format!("control: deleted {ep}")),
        "the daemon did not delete it:\n{}",
        daemon.log()
    );
    assert!(entries(&lab).is_empty(), "{:?}", entries(&lab));
    wait_for(&lab, port, "cloud", UP);
    assert!(daemon.stop().success());
}

/// `viscum redirect del` through a running daemon drains like the CLI's own: with an edge
/// connection open, new connections go to the cloud at once while the command waits (up to
/// `--drain-timeout`), then the entry goes and the command reports the drain and the cut flow.
#[test]
fn redirect_del_through_a_running_daemon_drains_first() {
    use std::net::TcpListener;
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let port = 8088;
    let _cloud = IdentityServer::start(lab.cloud.name(), port, "cloud");
    let svc = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &svc]);
    // An edge server that accepts and holds every connection open.
    let listener = netns::in_netns(&svc, move || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let holder = held.clone();
    thread::spawn(move || {
        for s in listener.incoming().flatten() {
            holder.lock().unwrap().push(s);
        }
    });
    files.write(&files.config());
    let daemon = Daemon::start(&lab, &files);
    let control = files.control().display().to_string();
    let ep = format!("tcp://{CLOUD_V4}:{port}");
    lab.viscum_ok(&["redirect", "add", &ep, "--ns", &svc, "--control", &control]);
    let dst = SocketAddr::new(IpAddr::V4(CLOUD_V4), port);
    let client = netns::in_netns(lab.client.name(), move || {
        TcpStream::connect_timeout(&dst, Duration::from_secs(2))
    })
    .unwrap()
    .expect("an edge connection");
    assert!(
        wait_until(Duration::from_secs(5), || held.lock().unwrap().len() == 1),
        "the edge server never saw the connection"
    );

    let started = Instant::now();
    let out = thread::scope(|scope| {
        let del = scope.spawn(|| {
            lab.viscum(&[
                "redirect",
                "del",
                &ep,
                "--control",
                &control,
                "--drain-timeout",
                "3",
            ])
        });
        // Draining: new connections go to the cloud while the edge one stays open.
        wait_for(&lab, port, "cloud", UP);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "new connections reached the cloud only after the drain"
        );
        del.join().unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("draining: new flows go to the cloud; waiting up to 3 s for"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("deleted {ep} (cut 1 open edge flow(s))")),
        "{stdout}"
    );
    assert!(started.elapsed() >= Duration::from_secs(3), "no drain wait");
    assert!(
        daemon.log().contains("control: draining"),
        "the daemon did not drain it:\n{}",
        daemon.log()
    );
    assert!(entries(&lab).is_empty(), "{:?}", entries(&lab));
    drop(client);
    assert!(daemon.stop().success());
}
