//! The daemon's status page (`/` on the metrics listener), in a real browser.
//!
//! The daemon runs in the lab's edge namespace with its listener on the edge's LAN address
//! (192.0.2.1, made by the lab), one lab service at the edge, and some client traffic to it.
//! Headless Chromium (Debian's `chromium`, installed by `cargo xtask setup`) runs in the
//! client namespace, as an operator's browser on the LAN would, loads the page, lets its
//! script poll `/api/status` and draw, and dumps the DOM; the test checks the rendered
//! service row, its state and health, the chart of the last minutes with its data points, and
//! that the numbers on the page are the ones `viscum stats` and `viscum status` report. A
//! screenshot goes to `target/test-artifacts/page.png` (its path is printed).
//!
//! Run with `--nocapture` to see the screenshot path.

use std::{
    fs,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use viscum::netns;
use viscum_tests::{
    Lab,
    daemon::{Check, Daemon, DaemonFiles, Limits},
    lab::{CLOUD_V4, EDGE_LAN_V4},
    skip_unless_root, tcp_ask, wait_until,
};

/// Where the page is served: the edge's LAN address, reachable from the client namespace.
const PORT: u16 = 9310;
/// Client requests sent to the service before the browser looks.
const REQUESTS: usize = 12;
/// Bound of one run of Chromium.
const BROWSER: Duration = Duration::from_secs(60);

/// Chromium's binary (Debian's package).
fn chromium() -> PathBuf {
    let bin = PathBuf::from("/usr/bin/chromium");
    assert!(
        bin.is_file(),
        "{} not found: `cargo xtask setup` installs Debian's chromium package",
        bin.display()
    );
    bin
}

/// `target/test-artifacts`, beside the test binary's profile directory.
fn artifacts() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .ancestors()
        .nth(3)
        .expect("test binary under target/<profile>/deps")
        .join("test-artifacts");
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// `GET path` over HTTP/1.0 from namespace `ns`: the status line and the body.
fn get(ns: &str, addr: SocketAddr, path: &str) -> (String, String) {
    let path = path.to_string();
    netns::in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    })
    .unwrap()
}

/// Runs Chromium headless in namespace `ns` with `args` (a fresh profile each time), killed
/// with its process group past [`BROWSER`].
fn run_chromium(ns: &str, profile: &Path, args: &[String]) -> Output {
    let ns_file = fs::File::open(Path::new(netns::NETNS_RUN_DIR).join(ns)).unwrap();
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1400,1000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    // SAFETY: only setns(2), async-signal-safe, between fork and exec; the file lives in the
    // closure as long as the Command.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("start chromium");
    let pgid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx.recv_timeout(BROWSER);
    if out.is_err() {
        // Chromium and its helpers (zygote, renderers) share the process group it leads,
        // which still exists: the leader is not reaped until the waiter returns.
        // SAFETY: kill(2) on the group of our own, unreaped child.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    let _ = waiter.join();
    out.unwrap_or_else(|_| panic!("chromium ran longer than {BROWSER:?}"))
        .expect("chromium's output")
}

/// The opening tag of the first element carrying `attr` (e.g. `data-service="web"`), from
/// `from` on, and its offset in `dom`.
fn tag_with<'a>(dom: &'a str, from: usize, attr: &str) -> Option<(usize, &'a str)> {
    let at = from + dom[from..].find(attr)?;
    let open = dom[..at].rfind('<')?;
    let close = at + dom[at..].find('>')?;
    Some((open, &dom[open..=close]))
}

/// The value of attribute `name` in an opening tag.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let at = tag.find(&key)? + key.len();
    Some(&tag[at..at + tag[at..].find('"')?])
}

/// The cell `key` of the row of service `name`: its opening tag and its text.
fn cell<'a>(dom: &'a str, name: &str, key: &str) -> (&'a str, String) {
    let (row, _) = tag_with(dom, 0, &format!("data-service=\"{name}\""))
        .unwrap_or_else(|| panic!("no row for {name} in the page:\n{dom}"));
    let row_end = row + dom[row..].find("</tr>").unwrap();
    let (at, tag) = tag_with(&dom[..row_end], row, &format!("data-key=\"{key}\""))
        .unwrap_or_else(|| panic!("no {key} cell in the row of {name}"));
    let inner = &dom[at + tag.len()..at + dom[at..].find("</td>").unwrap()];
    // Strip the markup inside the cell (a pill's span).
    let mut text = String::new();
    let mut in_tag = false;
    for c in inner.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    (tag, text)
}

#[test]
fn the_page_shows_the_services_numbers_and_charts_in_a_browser() {
    if skip_unless_root() {
        return;
    }
    let started = Instant::now();
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let web = lab.service_ns_name();
    let listen = SocketAddr::new(IpAddr::V4(EDGE_LAN_V4), PORT);
    let mut config = files.config();
    config.engine.metrics = Some(listen);
    let mut service = files
        .service(&web, 8080, "edge")
        .check(Check::Http("/healthz".into()));
    // Limits as configured show on the page (enforced or not, depending on the host's
    // cgroup controllers).
    service.limits = Some(Limits {
        memory: Some("96M".into()),
        cpu: Some(0.5),
        pids: Some(64),
    });
    config.services.push(service);
    files.write(&config);
    let daemon = Daemon::start(&lab, &files);
    daemon.wait_redirected(&web, Duration::from_secs(20));

    // Traffic: each request is a new TCP flow kept at the edge.
    let cloud = SocketAddr::new(IpAddr::V4(CLOUD_V4), 8080);
    for _ in 0..REQUESTS {
        assert_eq!(
            tcp_ask(lab.client.name(), cloud, Duration::from_secs(2)).unwrap(),
            "edge"
        );
    }
    // Every flow counted, and a sample of the daemon's history taken since (one every 5 s,
    // the first at start): the charts then have a point with the traffic.
    let client = lab.client.name().to_string();
    let mut api = Value::Null;
    let ok = wait_until(Duration::from_secs(15), || {
        let (line, body) = get(&client, listen, "/api/status");
        assert!(
            line.starts_with("HTTP/1.") && line.contains(" 200 "),
            "{line}"
        );
        api = serde_json::from_str(&body).unwrap();
        api["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["services"][&web]["edge_flows"].as_u64() >= Some(REQUESTS as u64))
    });
    assert!(ok, "no sample with the traffic in the history: {api:#}");
    let (line, text) = get(&client, listen, "/metrics");
    assert!(line.contains(" 200 "), "{line}");
    assert!(
        text.contains(&format!(
            "viscum_service_flows_total{{service=\"{web}\",where=\"edge\"}} "
        )),
        "{text}"
    );

    // The browser, from the client's side of the LAN.
    let url = format!("http://{listen}/");
    let profile = files.dir().join("chromium-dom");
    let out = run_chromium(
        &client,
        &profile,
        &[
            "--virtual-time-budget=5000".into(),
            "--dump-dom".into(),
            url.clone(),
        ],
    );
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page did not render the status (stderr: {}):\n{dom}",
        String::from_utf8_lossy(&out.stderr)
    );

    // What the CLI says now (no traffic since, so nothing moves).
    let stats: Value = serde_json::from_str(&lab.viscum_ok(&["stats", "--json"])).unwrap();
    let entries: Vec<&Value> = stats["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ns"] == web.as_str())
        .collect();
    assert!(!entries.is_empty(), "{stats:#}");
    let sum = |k: &str| entries.iter().map(|e| e[k].as_u64().unwrap()).sum::<u64>();
    let status = daemon.service(&web);

    let (_, state) = cell(&dom, &web, "state");
    assert_eq!(state, "running");
    let (_, health) = cell(&dom, &web, "health");
    assert_eq!(health, "healthy");
    let (_, redirect) = cell(&dom, &web, "redirected");
    assert_eq!(redirect, "yes");
    for (key, want) in [
        ("edge_flows", sum("edge_flows")),
        ("cloud_flows", sum("cloud_flows")),
        ("bytes", sum("bytes")),
    ] {
        let (tag, _) = cell(&dom, &web, key);
        assert_eq!(
            attr(tag, "data-value"),
            Some(want.to_string().as_str()),
            "{key}: page {tag} vs viscum stats {want}"
        );
        assert_eq!(status[key].as_u64(), Some(want), "{key}: status vs stats");
    }
    assert!(sum("edge_flows") >= REQUESTS as u64);
    let (_, edge_text) = cell(&dom, &web, "edge_flows");
    assert_eq!(edge_text, sum("edge_flows").to_string());
    // Each configured limit as the daemon reports it (in the cell's data-value; memory in
    // bytes, shown as "96 MiB"), with "⚠" and the reason in the title where the host cannot
    // enforce it.
    for (limit, shown) in [("memory", "96 MiB"), ("cpu", "0.5"), ("pids", "64")] {
        let (tag, text) = cell(&dom, &web, limit);
        let reported = &status["limits"][limit];
        let value = reported["value"]
            .as_str()
            .unwrap_or_else(|| panic!("{status:#}"));
        assert_eq!(attr(tag, "data-value"), Some(value), "{tag}");
        if reported["enforced"] == true {
            assert_eq!(text, shown, "{tag}");
        } else {
            assert_eq!(text, format!("{shown} ⚠"), "{tag}");
            assert!(tag.contains("not enforced"), "{tag}");
        }
    }
    assert_eq!(
        status["limits"]["memory"]["value"],
        (96u64 << 20).to_string()
    );
    let (_, pid) = cell(&dom, &web, "pid");
    assert_eq!(pid, status["pid"].as_i64().unwrap().to_string());
    // The totals card agrees with the one service.
    let (_, total) = tag_with(&dom, 0, "data-total=\"bytes\"").expect("a bytes total");
    assert_eq!(
        attr(total, "data-value"),
        Some(sum("bytes").to_string().as_str())
    );

    // The flows chart of the service: drawn, with points from the history and the edge line
    // rising somewhere (the traffic's rate).
    let (at, chart) = tag_with(&dom, 0, "data-chart=\"flows\"").expect("a flows chart");
    assert_eq!(attr(chart, "data-service"), Some(web.as_str()), "{chart}");
    let n: usize = attr(chart, "data-points").unwrap().parse().unwrap();
    assert!(n >= 2, "flows chart with {n} points: {chart}");
    let (_, edge_line) = tag_with(&dom, at, "data-series=\"edge\"").expect("an edge line");
    let points: Vec<(f64, f64)> = attr(edge_line, "points")
        .unwrap()
        .split_whitespace()
        .map(|p| {
            let (x, y) = p.split_once(',').unwrap();
            (x.parse().unwrap(), y.parse().unwrap())
        })
        .collect();
    assert_eq!(points.len(), n, "{edge_line}");
    let ys: Vec<f64> = points.iter().map(|p| p.1).collect();
    let (lo, hi) = ys
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(*y), hi.max(*y)));
    assert!(hi - lo > 1.0, "the edge line is flat: {edge_line}");
    for kind in ["bytes", "live"] {
        assert!(
            dom.contains(&format!("data-chart=\"{kind}\"")),
            "no {kind} chart"
        );
    }

    // A screenshot for people.
    let png = artifacts().join("page.png");
    let _ = fs::remove_file(&png);
    let out = run_chromium(
        &client,
        &files.dir().join("chromium-shot"),
        &[
            "--virtual-time-budget=5000".into(),
            format!("--screenshot={}", png.display()),
            url,
        ],
    );
    let bytes = fs::read(&png).unwrap_or_else(|e| {
        panic!(
            "no screenshot at {} ({e}); chromium said: {}",
            png.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000);
    println!("screenshot of the page: {}", png.display());
    eprintln!("page test took {:?}", started.elapsed());
}
