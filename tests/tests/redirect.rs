//! The foundation end to end: `viscum attach`, `ns add`, `redirect add/del`, `stats`, with
//! real clients in a client namespace talking to a "cloud" address that a service namespace
//! behind the edge answers for.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use viscum_tests::{
    IdentityServer, Lab, LabOptions, Proto, ask, skip_unless_root, udp_ask_distinct, wait_until,
};

const TIMEOUT: Duration = Duration::from_secs(3);

fn url(proto: Proto, addr: SocketAddr) -> String {
    let p = match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    };
    format!("{p}://{addr}")
}

/// The edge box with viscum attached and one service namespace running an identity server on
/// the same port as the cloud's.
struct Setup {
    lab: Lab,
    ns: String,
    cloud: IdentityServer,
    _edge: IdentityServer,
}

fn setup(options: LabOptions) -> Setup {
    let lab = Lab::with_options(options);
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let out = lab.viscum_ok(&["attach", lab.lan_if()]);
    assert!(out.contains("attached to lan0"), "{out}");
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    let edge = IdentityServer::start(&ns, cloud.port(), "edge");
    Setup {
        lab,
        ns,
        cloud,
        _edge: edge,
    }
}

fn add(s: &Setup, m: &str) {
    // UDP entries learn for a second by default (issue #4); these tests are about v1 matching.
    s.lab
        .viscum_ok(&["redirect", "add", m, "--ns", &s.ns, "--learn-ms", "0"]);
}

fn answer(s: &Setup, proto: Proto, addr: SocketAddr) -> String {
    ask(s.lab.client.name(), proto, addr, TIMEOUT)
        .unwrap_or_else(|e| panic!("{proto:?} {addr}: {e}"))
}

fn json(s: &Setup, args: &[&str]) -> Value {
    let out = s.lab.viscum_ok(args);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("viscum {args:?} printed invalid JSON ({e}):\n{out}"))
}

#[test]
fn exact_port_entries_are_served_at_the_edge_and_deleting_restores_the_cloud() {
    if skip_unless_root() {
        return;
    }
    let s = setup(LabOptions::default());
    let port = s.cloud.port();
    for addr in s.lab.cloud_addrs(port) {
        for proto in [Proto::Tcp, Proto::Udp] {
            assert_eq!(
                answer(&s, proto, addr),
                "cloud",
                "before any entry: {proto:?} {addr}"
            );
            add(&s, &url(proto, addr));
            assert_eq!(
                answer(&s, proto, addr),
                "edge",
                "with an entry: {proto:?} {addr}"
            );
        }
    }
    // A different port of the same address misses and reaches the cloud.
    let other = IdentityServer::start(s.lab.cloud.name(), 0, "cloud-other");
    for addr in s.lab.cloud_addrs(other.port()) {
        for proto in [Proto::Tcp, Proto::Udp] {
            assert_eq!(
                answer(&s, proto, addr),
                "cloud-other",
                "miss: {proto:?} {addr}"
            );
        }
    }
    // Entries into a Viscum namespace translate to its own address: no local route claims
    // the cloud address inside (AnyIP entries have one, see field.rs).
    let routes = s.lab.service_ns_info(&s.ns)["local_routes"].clone();
    assert_eq!(routes, serde_json::json!([]));

    let hits_before = s.cloud.tcp_hits() + s.cloud.udp_hits();
    for addr in s.lab.cloud_addrs(port) {
        for proto in [Proto::Tcp, Proto::Udp] {
            let out = s.lab.viscum_ok(&["redirect", "del", &url(proto, addr)]);
            assert!(out.contains("deleted"), "{out}");
            assert_eq!(
                answer(&s, proto, addr),
                "cloud",
                "after delete: {proto:?} {addr}"
            );
        }
    }
    assert_eq!(s.cloud.tcp_hits() + s.cloud.udp_hits(), hits_before + 4);
    let routes = s.lab.service_ns_info(&s.ns)["local_routes"].clone();
    assert_eq!(
        routes,
        serde_json::json!([]),
        "the last delete removes the local routes"
    );
    assert_eq!(
        json(&s, &["redirect", "list", "--json"]),
        serde_json::json!([])
    );
}

#[test]
fn all_ports_entry_serves_every_port_and_an_exact_port_wins() {
    if skip_unless_root() {
        return;
    }
    let s = setup(LabOptions::default());
    let second_ns = s.lab.service_ns_name();
    s.lab.viscum_ok(&["ns", "add", &second_ns]);
    let other_cloud = IdentityServer::start(s.lab.cloud.name(), 0, "cloud-2");
    let other_edge = IdentityServer::start(&s.ns, other_cloud.port(), "edge-any");
    let exact = IdentityServer::start(&second_ns, s.cloud.port(), "edge-exact");

    for m in [
        "tcp://198.51.100.7",
        "udp://198.51.100.7",
        "tcp://[2001:db8:f::7]",
        "udp://[2001:db8:f::7]",
    ] {
        add(&s, m);
    }
    for addr in s.lab.cloud_addrs(other_cloud.port()) {
        for proto in [Proto::Tcp, Proto::Udp] {
            assert_eq!(
                answer(&s, proto, addr),
                "edge-any",
                "all-ports entry: {proto:?} {addr}"
            );
        }
    }
    for addr in s.lab.cloud_addrs(s.cloud.port()) {
        assert_eq!(
            answer(&s, Proto::Tcp, addr),
            "edge",
            "all-ports entry: {addr}"
        );
        s.lab.viscum_ok(&[
            "redirect",
            "add",
            &url(Proto::Tcp, addr),
            "--ns",
            &second_ns,
        ]);
        assert_eq!(
            answer(&s, Proto::Tcp, addr),
            "edge-exact",
            "the exact port wins: {addr}"
        );
    }
    drop((other_edge, exact));
}

#[test]
fn counters_match_the_traffic_sent() {
    if skip_unless_root() {
        return;
    }
    let s = setup(LabOptions::default());
    let [v4, v6] = s.lab.cloud_addrs(s.cloud.port());
    add(&s, &url(Proto::Udp, v4));
    add(&s, &url(Proto::Udp, v6));
    const N: u64 = 7;
    // From N sockets open at once: N distinct source ports, so N flows (asked one after
    // another, a socket may get the port of an earlier one, whose flow is still live).
    for addr in [v4, v6] {
        let answers = udp_ask_distinct(s.lab.client.name(), addr, N as usize, TIMEOUT).unwrap();
        assert_eq!(answers, vec!["edge"; N as usize], "{addr}");
    }
    let stats = json(&s, &["stats", "--json"]);
    let entries = stats["entries"].as_array().unwrap();
    let entry = |m: &str| {
        entries
            .iter()
            .find(|e| e["match"] == m)
            .unwrap_or_else(|| panic!("no {m} in {stats}"))
    };
    // Each request is one datagram: Ethernet 14 + IP + UDP 8 + the 13-byte request line.
    let e4 = entry(&url(Proto::Udp, v4));
    assert_eq!(e4["packets"], N);
    assert_eq!(e4["bytes"], N * (14 + 20 + 8 + 13));
    let e6 = entry(&url(Proto::Udp, v6));
    assert_eq!(e6["packets"], N);
    assert_eq!(e6["bytes"], N * (14 + 40 + 8 + 13));
    assert_eq!(
        e4["edge_flows"], N,
        "each request came from a fresh socket: a new flow"
    );
    let g = &stats["global"];
    assert_eq!(g["redirected"], 2 * N);
    assert!(g["seen"].as_u64().unwrap() >= 2 * N);
    assert_eq!(
        g["seen"].as_u64().unwrap(),
        g["redirected"].as_u64().unwrap() + g["passed"].as_u64().unwrap()
    );
    assert_eq!(stats["interfaces"], serde_json::json!(["lan0"]));

    // The classifier counts a redirect in its entry's counters only; the global count is
    // their sum, so a removed entry's packets must stay in it, and an entry added again in
    // its counter slot must start from zero without counting them twice.
    assert_eq!(g["flows_edge"], 2 * N, "{g}");
    let m4 = url(Proto::Udp, v4);
    s.lab.viscum_ok(&["redirect", "del", &m4, "--now"]);
    let g = json(&s, &["stats", "--json"])["global"].clone();
    assert_eq!(g["redirected"], 2 * N, "after removing {m4}: {g}");
    assert_eq!(g["flows_edge"], 2 * N, "after removing {m4}: {g}");
    add(&s, &m4);
    let stats = json(&s, &["stats", "--json"]);
    assert_eq!(
        stats["global"]["redirected"],
        2 * N,
        "after adding {m4} again: {stats}"
    );
    let again = stats["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["match"] == m4.as_str());
    assert_eq!(
        again.map(|e| e["packets"].clone()),
        Some(0.into()),
        "{stats}"
    );
    let answers = udp_ask_distinct(s.lab.client.name(), v4, N as usize, TIMEOUT).unwrap();
    assert_eq!(answers, vec!["edge"; N as usize], "{v4} again");
    let g = json(&s, &["stats", "--json"])["global"].clone();
    assert_eq!(g["redirected"], 3 * N, "{g}");
    assert_eq!(g["flows_edge"], 3 * N, "{g}");
    assert_eq!(
        g["seen"].as_u64().unwrap(),
        g["redirected"].as_u64().unwrap() + g["passed"].as_u64().unwrap()
    );
}

#[test]
fn the_datapath_keeps_working_after_the_attaching_process_exits() {
    if skip_unless_root() {
        return;
    }
    let s = setup(LabOptions::default());
    let [v4, _] = s.lab.cloud_addrs(s.cloud.port());
    add(&s, &url(Proto::Tcp, v4));
    // Every viscum command above has exited: no viscum process is left in this lab's edge
    // namespace (other labs on the machine may have their own).
    let edge_ns = std::fs::metadata(format!("/run/netns/{}", s.lab.edge.name())).unwrap();
    let ours = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "viscum")
        })
        .filter(|e| {
            std::fs::metadata(e.path().join("ns/net")).is_ok_and(|m| {
                std::os::unix::fs::MetadataExt::ino(&m)
                    == std::os::unix::fs::MetadataExt::ino(&edge_ns)
            })
        })
        .count();
    assert_eq!(
        ours, 0,
        "no viscum process should be running in the edge namespace"
    );
    assert!(
        s.lab.bpffs.path().join("links/lan0").exists(),
        "the TCX link is pinned"
    );
    assert_eq!(answer(&s, Proto::Tcp, v4), "edge");
    // Detach: the entries stay pinned but nothing is redirected any more.
    s.lab.viscum_ok(&["detach", "lan0"]);
    assert_eq!(answer(&s, Proto::Tcp, v4), "cloud");
    s.lab.viscum_ok(&["attach", "lan0"]);
    assert_eq!(
        answer(&s, Proto::Tcp, v4),
        "edge",
        "re-attaching finds the pinned entries"
    );
}

/// `Engine::repin` (what a daemon runs when the bpffs was unmounted behind its back) pins
/// again the very maps the engine opened, from the handles it uses, the layout marker with
/// them: a second engine opened from the new pins sees the first one's entries and writes
/// where the first one reads.
#[test]
fn repin_pins_the_maps_the_engine_holds_and_records_the_layout() {
    if skip_unless_root() {
        return;
    }
    let s = setup(LabOptions::default());
    let [v4, _] = s.lab.cloud_addrs(s.cloud.port());
    let first: viscum::endpoint::Endpoint = url(Proto::Tcp, v4).parse().unwrap();
    add(&s, &first.to_string());
    let dir = s.lab.bpffs.path();
    let pins = viscum::engine::Pins::new(dir);
    let engine = viscum::engine::Engine::open(&pins).unwrap();
    let held = [
        viscum_common::SERVICES_MAP,
        viscum_common::PREFIXES_MAP,
        viscum_common::RULES_MAP,
        viscum_common::ENTRY_STATS_MAP,
        viscum_common::CONFIG_MAP,
        viscum_common::PORTS_MAP,
        viscum_common::GLOBAL_STATS_MAP,
        viscum_common::REPLIES_MAP,
        viscum_common::FLOWS_MAP,
    ];
    for name in held {
        std::fs::remove_file(pins.map(name)).unwrap();
    }
    std::fs::remove_dir_all(dir.join("layout")).unwrap();
    let pinned = {
        let _lock = viscum::engine::lock(&pins).unwrap();
        engine.repin().unwrap()
    };
    assert_eq!(
        pinned,
        held.len(),
        "every map the engine holds is pinned again"
    );
    for name in held {
        assert!(pins.map(name).exists(), "{name} is pinned again");
    }
    // The marker is back, or the next open would take the pins for an older layout's.
    let mut again = viscum::engine::Engine::open(&pins).unwrap();
    let seen = again
        .get(&first)
        .unwrap()
        .expect("the entry is in the re-pinned map");
    let target = seen.target;
    let second: viscum::endpoint::Endpoint =
        url(Proto::Tcp, SocketAddr::new(v4.ip(), v4.port() + 1))
            .parse()
            .unwrap();
    again.insert(&second, target).unwrap();
    assert!(
        engine.get(&second).unwrap().is_some(),
        "the re-pinned map is the one the first engine holds"
    );
    // Nothing left to do: a second repin pins nothing.
    let _lock = viscum::engine::lock(&pins).unwrap();
    assert_eq!(engine.repin().unwrap(), 0);
}

#[test]
fn bad_input_is_rejected_with_a_clear_error_and_changes_nothing() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    // Before attach: commands that need the datapath say so.
    let err = lab.viscum_err(&["redirect", "list"]);
    assert!(err.contains("not attached"), "{err}");
    let err = lab.viscum_err(&["attach", "eth9"]);
    assert!(err.contains("interface eth9 does not exist"), "{err}");
    assert!(
        !lab.bpffs.path().join("prog_ingress").exists(),
        "a failed attach loads nothing"
    );
    let err = lab.viscum_err(&["attach", "lan0", "eth9"]);
    assert!(err.contains("eth9"), "{err}");
    assert!(
        !lab.bpffs.path().join("links/lan0").exists(),
        "validation happens before any attach"
    );

    lab.viscum_ok(&["attach", "lan0"]);
    let again = lab.viscum_ok(&["attach", "lan0"]);
    assert!(again.contains("already attached"), "{again}");
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    lab.viscum_ok(&["redirect", "add", "tcp://198.51.100.7:80", "--ns", &ns]);
    let snapshot = |lab: &Lab| {
        (
            lab.viscum_ok(&["redirect", "list", "--json"]),
            lab.viscum_ok(&["ns", "list", "--json"]),
        )
    };
    let before = snapshot(&lab);

    let cases: &[(&[&str], &str)] = &[
        (
            &["redirect", "add", "tcp://198.51.100.7:80", "--ns", &ns],
            "already exists",
        ),
        (
            &["redirect", "del", "tcp://198.51.100.7:81"],
            "no entry for tcp://198.51.100.7:81",
        ),
        (
            &["redirect", "add", "tcp://198.51.100.300:80", "--ns", &ns],
            "'198.51.100.300' is not an IPv4 or IPv6 address",
        ),
        (
            &["redirect", "add", "tcp://198.51.100.7:70000", "--ns", &ns],
            "port '70000'",
        ),
        (
            &["redirect", "add", "tcp://198.51.100.7:0", "--ns", &ns],
            "port 0",
        ),
        (
            &["redirect", "add", "sctp://198.51.100.7:80", "--ns", &ns],
            "unknown protocol 'sctp'",
        ),
        (
            &["redirect", "add", "198.51.100.7:80", "--ns", &ns],
            "has no protocol",
        ),
        (
            &["redirect", "add", "tcp://2001:db8::7:443", "--ns", &ns],
            "bracketed",
        ),
        (
            &[
                "redirect",
                "add",
                "tcp://198.51.100.8:80",
                "--ns",
                "nosuchns",
            ],
            "nosuchns",
        ),
        (
            &[
                "redirect",
                "add",
                "tcp://198.51.100.8:80",
                "--ns",
                "Bad/Name",
            ],
            "invalid",
        ),
        (
            &["redirect", "add", "tcp://198.51.100.8:80", "--to", "lo"],
            "not a veth",
        ),
        (
            &["redirect", "add", "tcp://198.51.100.8:80", "--to", "eth9"],
            "interface eth9 does not exist",
        ),
        (&["detach", "wan0"], "not attached to wan0"),
        (&["ns", "add", &ns], "exists"),
        (&["ns", "del", "nosuchns"], "nosuchns"),
        (&["ns", "add", "this-name-is-far-too-long"], "invalid"),
    ];
    for (args, want) in cases {
        let err = lab.viscum_err(args);
        // The first line carries the whole message (clap adds a usage hint below its own).
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.contains(want),
            "viscum {args:?}: expected '{want}' in the first line of:\n{err}"
        );
        assert_eq!(snapshot(&lab), before, "viscum {args:?} changed state");
    }

    // A bpffs location that cannot be created or mounted (run in the edge namespace, where
    // lan0 is a valid client-facing interface: only the location can fail).
    let out = viscum::netns::in_netns(lab.edge.name(), || {
        std::process::Command::new(viscum_tests::lab::viscum_bin())
            .args(["--bpffs", "/proc/viscum-cannot-exist", "attach", "lan0"])
            .output()
    })
    .unwrap()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/proc/viscum-cannot-exist"), "{err}");

    // Missing privileges: the same binary as an unprivileged user.
    let out = unprivileged(&lab, &["redirect", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root"), "{err}");
    assert_eq!(snapshot(&lab), before);
}

fn unprivileged(lab: &Lab, args: &[&str]) -> std::process::Output {
    use std::os::unix::{fs::PermissionsExt as _, process::CommandExt as _};
    // A copy nobody can execute: the checkout (and so target/) may sit in a directory only
    // root can enter, as a `mktemp -d` clone does.
    let dir = std::env::temp_dir().join(viscum_tests::unique_name("vb"));
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("viscum");
    std::fs::copy(viscum_tests::lab::viscum_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = lab.viscum_command_with(&bin, args);
    // After the lab's setns (pre_exec hooks run in order): drop to nobody.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

#[test]
fn several_instances_coexist_with_their_own_bpffs() {
    if skip_unless_root() {
        return;
    }
    // Two labs = two edge boxes on one machine, each with its own pins.
    let a = setup(LabOptions::default());
    let b = setup(LabOptions::default());
    let [va, _] = a.lab.cloud_addrs(a.cloud.port());
    let [vb, _] = b.lab.cloud_addrs(b.cloud.port());
    add(&a, &url(Proto::Tcp, va));
    assert_eq!(answer(&a, Proto::Tcp, va), "edge");
    assert_eq!(answer(&b, Proto::Tcp, vb), "cloud", "lab b has no entry");
    assert_eq!(
        json(&b, &["redirect", "list", "--json"]),
        serde_json::json!([])
    );
    assert!(wait_until(TIMEOUT, || answer(&a, Proto::Tcp, va) == "edge"));
}

/// `--to` the host veth of a namespace Viscum made (AnyIP, the `--to` default) works like
/// `--ns NAME --anyip`: the namespace gets the local route that makes it answer as the cloud
/// address, and loses it with the entry. (It once took the entry without the route: the
/// namespace dropped what it was sent, and clients timed out.)
#[test]
fn to_a_viscum_namespaces_veth_answers_as_the_cloud_address() {
    if skip_unless_root() {
        return;
    }
    let s = setup(LabOptions::default());
    let veth = format!("vh-{}", s.ns);
    let [v4, v6] = s.lab.cloud_addrs(s.cloud.port());
    for addr in [v4, v6] {
        let m = url(Proto::Tcp, addr);
        s.lab.viscum_ok(&["redirect", "add", &m, "--to", &veth]);
        assert_eq!(answer(&s, Proto::Tcp, addr), "edge", "{m} --to {veth}");
    }
    let routes = s.lab.service_ns_info(&s.ns)["local_routes"].clone();
    assert_eq!(
        routes.as_array().map(Vec::len),
        Some(2),
        "one local route per address: {routes}"
    );
    for addr in [v4, v6] {
        s.lab
            .viscum_ok(&["redirect", "del", &url(Proto::Tcp, addr), "--now"]);
        assert_eq!(answer(&s, Proto::Tcp, addr), "cloud");
    }
    let routes = s.lab.service_ns_info(&s.ns)["local_routes"].clone();
    assert_eq!(routes, serde_json::json!([]));
}

/// `ns del` of a namespace where a process still runs (a server started with `ip netns
/// exec`) deletes it and names the process left behind, unreachable, and how to stop it.
#[test]
fn ns_del_names_the_processes_left_inside() {
    if skip_unless_root() {
        return;
    }
    let s = setup(LabOptions::default());
    let mut sleeper = std::process::Command::new("ip")
        .args(["netns", "exec", &s.ns, "sleep", "60"])
        .spawn()
        .expect("start a process in the namespace");
    let pid = sleeper.id();
    // `ip netns exec` enters the namespace before it execs sleep: wait until it is inside.
    let inside = wait_until(Duration::from_secs(5), || {
        viscum::netns::pids_in(&s.ns).contains(&(pid as i32))
    });
    assert!(inside, "pid {pid} never entered {}", s.ns);
    let out = s.lab.viscum(&["ns", "del", &s.ns]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "still run in the deleted namespace {}, unreachable: pid {pid}",
            s.ns
        )),
        "{stderr}"
    );
}

/// Every exact entry gets a counter slot of its own (`ServiceEntry::stats_id`), claimed from
/// the bitmap in `VISCUM_PORTS` from its search hint: past a full first word, and a freed
/// slot below the hint is the next one given out (the hint moves back), so the slots stay
/// dense and an add never scans the whole bitmap.
#[test]
fn counter_slots_are_unique_and_a_freed_one_is_given_out_next() {
    if skip_unless_root() {
        return;
    }
    let s = setup(LabOptions::default());
    let pins = viscum::engine::Pins::new(s.lab.bpffs.path());
    let mut engine = viscum::engine::Engine::open(&pins).unwrap();
    let [v4, _] = s.lab.cloud_addrs(s.cloud.port());
    add(&s, &url(Proto::Tcp, v4));
    let target = engine
        .get(&url(Proto::Tcp, v4).parse().unwrap())
        .unwrap()
        .unwrap()
        .target;
    // 150 entries: three words of the bitmap (64 bits each).
    let ep = |i: u16| -> viscum::endpoint::Endpoint {
        format!("tcp://198.51.100.{}:{}", 1 + i % 200, 20_000 + i)
            .parse()
            .unwrap()
    };
    let slot_of = |engine: &viscum::engine::Engine, e: &viscum::endpoint::Endpoint| {
        engine.get(e).unwrap().unwrap().target.stats_id
    };
    let mut seen = std::collections::BTreeSet::new();
    seen.insert(slot_of(&engine, &url(Proto::Tcp, v4).parse().unwrap()));
    for i in 0..150 {
        engine.insert(&ep(i), target).unwrap();
        assert!(
            seen.insert(slot_of(&engine, &ep(i))),
            "entry {i} was given a slot already in use"
        );
    }
    // Slots are given out densely from the first: the 151 entries hold the first 151.
    let first = viscum_common::entry_stats_id(0);
    assert_eq!(seen, (first..first + 151).collect(), "slots are dense");
    // Free one in the first word; the next add reuses it, the one after continues above.
    let freed = slot_of(&engine, &ep(10));
    engine.remove(&ep(10)).unwrap();
    engine.insert(&ep(200), target).unwrap();
    assert_eq!(
        slot_of(&engine, &ep(200)),
        freed,
        "the freed slot is given out next"
    );
    engine.insert(&ep(201), target).unwrap();
    assert_eq!(slot_of(&engine, &ep(201)), first + 151);
}

/// `viscum trace` shows the classifier's decisions in words, live: a redirected request as
/// `edge tcp/PORT -> vh-NS (ifindex N): redirected`, with its target's interface name. Ctrl-C
/// ends it.
#[test]
fn trace_shows_decisions_in_words() {
    use std::io::{BufRead as _, BufReader};
    if skip_unless_root() {
        return;
    }
    let s = setup(LabOptions::default());
    let [v4, _] = s.lab.cloud_addrs(s.cloud.port());
    add(&s, &url(Proto::Tcp, v4));
    let mut trace = s
        .lab
        .viscum_command(&["trace"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = trace.id();
    /// Kills the trace on any exit before it is waited for, a panic included.
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: kill(2) on our own child, not yet waited for.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let kill = Kill(pid);
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = trace.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| {
        let deadline = std::time::Instant::now() + TIMEOUT;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(what) => return line,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!("no {what:?} from viscum trace; it printed {seen:?}");
    };
    next("tracing decisions");
    let want = format!("edge tcp/{} -> vh-{} (ifindex ", s.cloud.port(), s.ns);
    // Records flow once the log flag is on, just after the banner: ask until one shows.
    let mut line = None;
    for _ in 0..20 {
        assert_eq!(answer(&s, Proto::Tcp, v4), "edge");
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200))
            && l.contains(&want)
        {
            line = Some(l);
            break;
        }
    }
    let line = line.unwrap_or_else(|| next(&want));
    assert!(line.ends_with("): redirected"), "{line}");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let status = trace.wait().unwrap();
    std::mem::forget(kill);
    assert!(status.success(), "trace ended with {status}");
}
