//! Load shedding under real CPU pressure: `max_load` with `load_scope = "services"` (PSI of
//! the services' cgroup v2 group; this host's system-wide PSI is whatever the other builds
//! make it, the services' group is ours).
//!
//! A CPU hog (4 spinning threads on this 2-core machine: its own threads contend) joins as a
//! service; while the pressure is above `max_load`, new flows go to the cloud and a flow
//! already open at the edge continues (a 2.5 MB transfer started before completes, every
//! byte from the edge's server); once the hog is gone and the pressure has fallen below the
//! resume level (0.85 x `max_load`), new flows go to the edge again. `status` and the
//! metrics show the decision and the PSI value. Run with `--test-threads=1 --nocapture`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use viscum::netns;
use viscum_tests::{
    IdentityServer, Lab, clients,
    daemon::{Daemon, DaemonFiles, Service},
    skip_unless_root,
    tenant::config_with,
    wait_until,
};

const MAX_LOAD: f64 = 0.3;
/// Bound for the pressure to cross the threshold either way (PSI's avg10 moves in 2 s steps
/// over a 10 s window).
const CROSS: Duration = Duration::from_secs(30);
/// KiB of the long edge flow (the service sends 1 KiB every 10 ms: 25 s).
const STREAM_KIB: usize = 2500;

fn who(lab: &Lab) -> String {
    clients::who(lab.client.name(), 8080, Duration::from_millis(500))
}

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

fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// One status snapshot: (load, shedding).
fn sample(daemon: &Daemon) -> (Option<f64>, bool) {
    let s = daemon.status();
    (s["load"].as_f64(), s["shedding"] == true)
}

#[test]
fn sheds_new_flows_under_cpu_pressure_keeps_open_ones_and_resumes() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let _cloud = IdentityServer::start(lab.cloud.name(), 8080, "cloud");
    let web = lab.service_ns_name();
    let hog = lab.service_ns_name();
    let metrics: SocketAddr = "127.0.0.1:9312".parse().unwrap();
    let mut config = files.config();
    config.engine.metrics = Some(metrics);
    config.services.push(files.service(&web, 8080, "edge"));
    let engine_keys = [
        format!("max_load = {MAX_LOAD}"),
        "load_scope = \"services\"".to_string(),
    ];
    let keys: Vec<&str> = engine_keys.iter().map(String::as_str).collect();
    files.write_raw(&config_with(&config, &keys, &[]));
    let daemon = Daemon::start(&lab, &files);
    daemon.wait_redirected(&web, Duration::from_secs(20));
    assert_eq!(who(&lab), "edge");
    // Read every second, from the services' group once the first service made it.
    assert!(
        wait_until(Duration::from_secs(5), || daemon.status()["load_source"]
            == "cgroup"),
        "no load from the services' cgroup: {:#}",
        daemon.status()
    );
    let (load, shedding) = sample(&daemon);
    assert!(!shedding, "shedding before any load (load {load:?})");

    // A long flow at the edge, open through everything that follows.
    let clients::Download {
        received,
        thread: transfer,
    } = clients::download(lab.client.name(), 8080, STREAM_KIB);
    assert!(
        wait_until(Duration::from_secs(5), || received.load(Ordering::SeqCst)
            > 0),
        "the edge flow did not start"
    );

    // The hog joins.
    let hog_bin = viscum_tests::vmcheck::limits::runnable_copy(
        Path::new(env!("CARGO_BIN_EXE_viscum-vmcheck")),
        files.dir(),
    )
    .unwrap();
    let mut hog_svc = Service::new(
        &hog,
        vec![
            hog_bin.display().to_string(),
            "hog".into(),
            "cpu".into(),
            "4".into(),
        ],
    )
    .matches(&["tcp://198.51.100.7:9198".to_string()]);
    hog_svc.user = Some("root".into());
    let mut with_hog = config.clone();
    with_hog.services.push(hog_svc);
    files.write_raw(&config_with(&with_hog, &keys, &[]));
    let loaded = Instant::now();
    assert_eq!(daemon.request(r#"{"cmd":"reload"}"#).unwrap()["ok"], true);
    let mut trace: Vec<(f64, Option<f64>, bool)> = Vec::new();
    let mut record = |daemon: &Daemon| {
        let (load, shedding) = sample(daemon);
        // Changes only: the daemon reads the load once a second.
        if trace
            .last()
            .is_none_or(|&(_, l, s)| (l, s) != (load, shedding))
        {
            let at = (loaded.elapsed().as_secs_f64() * 10.0).round() / 10.0;
            trace.push((at, load, shedding));
        }
        shedding
    };
    let shed = wait_until(CROSS, || record(&daemon));
    assert!(shed, "no shedding within {CROSS:?} of the hog: {trace:?}");
    let t_shed = loaded.elapsed();

    // Over the threshold: status and metrics say so, new flows go to the cloud.
    let status = daemon.status();
    let load = status["load"].as_f64().unwrap();
    assert!(load > MAX_LOAD, "shedding at load {load}");
    let text = scrape(&lab, metrics);
    assert_eq!(gauge(&text, "viscum_shedding"), Some(1.0), "{text}");
    assert!(
        gauge(&text, "viscum_load").is_some_and(|l| l > 0.0),
        "viscum_load missing: {text}"
    );
    assert_eq!(gauge(&text, "viscum_max_load"), Some(MAX_LOAD), "{text}");
    let answer = who(&lab);
    assert_eq!(answer, "cloud", "a new flow while shedding");
    let during = received.load(Ordering::SeqCst);
    assert!(
        during < STREAM_KIB * 1024,
        "the edge flow ended before shedding began: nothing shown about open flows"
    );

    // The hog goes; after the hysteresis the edge takes new flows again.
    files.write_raw(&config_with(&config, &keys, &[]));
    assert_eq!(daemon.request(r#"{"cmd":"reload"}"#).unwrap()["ok"], true);
    let unloaded = Instant::now();
    let resumed = wait_until(CROSS + Duration::from_secs(10), || !record(&daemon));
    assert!(
        resumed,
        "still shedding {:?} after the hog left: {trace:?}",
        unloaded.elapsed()
    );
    let t_resume = unloaded.elapsed();
    // The hysteresis: shedding ended only below 0.85 x max_load.
    let first_off = trace
        .iter()
        .skip_while(|(_, _, s)| !s)
        .find(|(_, _, s)| !s)
        .expect("the resume is in the trace");
    assert!(
        first_off.1.is_some_and(|l| l < MAX_LOAD * 0.85),
        "resumed at load {:?}: {trace:?}",
        first_off.1
    );
    assert!(
        wait_until(Duration::from_secs(5), || who(&lab) == "edge"),
        "new flows did not go to the edge again after shedding ended"
    );

    // The flow opened before shedding went on at the edge, through it, to its end.
    let total = transfer.join().unwrap().expect("the open edge flow broke");
    assert!(during > 0 && total > during);
    assert_eq!(total, STREAM_KIB * 1024, "every byte of the edge flow");
    println!(
        "shedding {:.1} s after the hog started, resumed {:.1} s after it left; load trace (s, load, shedding): {trace:?}",
        t_shed.as_secs_f64(),
        t_resume.as_secs_f64()
    );
}
