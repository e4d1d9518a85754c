//! One writer per instance (issue #13 item 3): eight `viscum` CLI writers run at once —
//! `ns add` of distinct namespaces, `redirect add/del` of exact entries, prefix rules and
//! port ranges, several of them into one shared namespace — while a daemon of the same
//! instance reloads its configuration. Afterwards the instance must be exactly what the
//! commands said, nothing twice and nothing lost:
//!
//! * the maps: every entry present once with its target; prefix rule ids unique, each pointing
//!   at a rules slot with its target; the miss pre-filter (`VISCUM_PORTS`) equal to the filter
//!   recomputed from the maps;
//! * routes: every service namespace on its own /30, the edge's connected route to it out of
//!   its `vh-` veth only; the shared namespace's `local` routes exactly the AnyIP addresses of
//!   its entries;
//! * namespaces: all of them listed and complete; the reply path on exactly the veths that
//!   entries point at.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
    sync::{Arc, Barrier, Mutex},
    thread,
    time::Duration,
};

use aya::maps::{Array, HashMap, LpmTrie, MapData};
use serde_json::Value;
use viscum_common::{
    MAX_RULES, PORT_FILTER_BITMAP_WORDS, PORTS_MAP, PREFIXES_MAP, PortFilter, PrefixData,
    PrefixNode, RULES_MAP, SERVICES_MAP, STATS_IDS_BASE, ServiceEntry, ServiceKey,
};
use viscum_tests::{
    Lab,
    daemon::{Daemon, DaemonFiles},
    lab::CLOUD_V4,
    skip_unless_root,
};

const UP: Duration = Duration::from_secs(30);

/// One CLI writer's commands, run in order; each must succeed.
type Script = Vec<Vec<String>>;

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// The entries the CLI writers leave behind: (match, namespace).
type Expected = BTreeMap<String, String>;

/// Scripts for the eight writers and the entries they leave.
fn scripts(own: &[String], shared: &str) -> (Vec<Script>, Expected) {
    let mut out = Vec::new();
    let mut expected = Expected::new();
    // Writers 0-3: each makes its own namespace and fills it: an exact entry, a port range
    // under a prefix (a rule id), and a UDP entry it deletes again.
    for (i, ns) in own.iter().enumerate() {
        let exact = format!("tcp://{CLOUD_V4}:{}", 7200 + i);
        let lo = 7300 + 10 * i;
        let range = format!("tcp://203.0.113.0/24:{lo}-{}", lo + 5);
        let udp = format!("udp://{CLOUD_V4}:{}", 7400 + i);
        out.push(vec![
            args(&format!("ns add {ns}")),
            args(&format!("redirect add {exact} --ns {ns} --learn-ms 0")),
            args(&format!("redirect add {range} --ns {ns}")),
            args(&format!("redirect add {udp} --ns {ns} --learn-ms 0")),
            args(&format!("redirect del {udp} --now")),
        ]);
        expected.insert(exact, ns.clone());
        expected.insert(range, ns.clone());
    }
    // Writers 4-7: AnyIP entries into the one shared namespace (each adds a `local` route and
    // may attach the reply path), a prefix rule every port, then deletes of some of both.
    for i in 0..4 {
        let mut script = Script::new();
        let mut mine = Vec::new();
        for j in 0..3 {
            let m = format!("tcp://198.51.100.{}:80", 20 + 4 * i + j);
            script.push(args(&format!("redirect add {m} --ns {shared} --anyip")));
            mine.push(m);
        }
        let prefix = format!("tcp://203.0.113.{}/28", 64 + 16 * i);
        script.push(args(&format!(
            "redirect add {prefix} --ns {shared} --anyip"
        )));
        script.push(args(&format!("redirect del {} --now", mine[0])));
        if i % 2 == 0 {
            script.push(args(&format!("redirect del {prefix} --now")));
        } else {
            expected.insert(prefix, shared.to_owned());
        }
        for m in &mine[1..] {
            expected.insert(m.clone(), shared.to_owned());
        }
        out.push(script);
    }
    (out, expected)
}

fn json(lab: &Lab, a: &[&str]) -> Value {
    let out = lab.viscum_ok(a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("viscum {a:?}: bad JSON ({e}): {out}"))
}

#[test]
fn eight_cli_writers_and_a_daemon_reload_leave_a_consistent_instance() {
    if skip_unless_root() {
        return;
    }
    let lab = Arc::new(Lab::new());
    lab.viscum_ok(&["attach", lab.lan_if()]);
    let shared = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &shared]);
    let own: Vec<String> = (0..4).map(|_| lab.service_ns_name()).collect();

    // A daemon of the same instance, reloading from service A to service B meanwhile.
    let files = DaemonFiles::new();
    let (a, b) = (lab.service_ns_name(), lab.service_ns_name());
    let mut config = files.config();
    config.services = vec![files.service(&a, 7100, "edge-a")];
    files.write(&config);
    let daemon = Daemon::start(&lab, &files);
    daemon.wait_redirected(&a, UP);
    config.services = vec![files.service(&b, 7101, "edge-b")];
    files.write(&config);

    let (scripts, expected) = scripts(&own, &shared);
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let start = Arc::new(Barrier::new(scripts.len() + 1));
    let mut threads = Vec::new();
    for script in scripts {
        let (lab, failures, start) = (lab.clone(), failures.clone(), start.clone());
        threads.push(thread::spawn(move || {
            start.wait();
            for cmd in script {
                let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
                if let Err(e) = lab.viscum_checked(&cmd) {
                    failures.lock().unwrap().push(e);
                }
            }
        }));
    }
    let control = files.control();
    let reload = {
        let (lab, start) = (lab.clone(), start.clone());
        thread::spawn(move || {
            start.wait();
            lab.viscum_checked(&["reload", "--control", control.to_str().unwrap()])
        })
    };
    for t in threads {
        t.join().unwrap();
    }
    let reloaded = reload.join().unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "concurrent writers failed:\n{}",
        failures.join("\n")
    );
    reloaded.unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    daemon.wait_redirected(&b, UP);

    let mut expected = expected;
    expected.insert(format!("tcp://{CLOUD_V4}:7101"), b.clone());
    check_entries(&lab, &expected);
    check_maps(lab.bpffs.path(), &expected.len());
    let namespaces: Vec<String> = own.iter().chain([&shared, &b]).cloned().collect::<Vec<_>>();
    check_namespaces(&lab, &namespaces, &shared, &expected);
    drop(daemon);
}

/// `redirect list`: exactly the expected entries, each once, with its target.
fn check_entries(lab: &Lab, expected: &Expected) {
    let list = json(lab, &["redirect", "list", "--json"]);
    let rows = list.as_array().expect("a JSON array");
    let mut seen = BTreeMap::new();
    for row in rows {
        let m = row["match"].as_str().unwrap().to_owned();
        let ns = row["ns"].as_str().unwrap_or("-").to_owned();
        assert!(
            seen.insert(m.clone(), ns).is_none(),
            "{m} is listed twice: {list:#}"
        );
    }
    assert_eq!(&seen, expected, "the entries after the writers");
}

/// The maps themselves: rule ids unique and pointing at their targets, the miss pre-filter
/// exactly what the entries need.
fn check_maps(bpffs: &Path, entries: &usize) {
    let open = |name: &str| MapData::from_pin(bpffs.join(name)).unwrap();
    let services: HashMap<_, ServiceKey, ServiceEntry> =
        HashMap::try_from(aya::maps::Map::HashMap(open(SERVICES_MAP))).unwrap();
    let prefixes: LpmTrie<_, PrefixData, PrefixNode> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(open(PREFIXES_MAP))).unwrap();
    let rules: Array<_, ServiceEntry> =
        Array::try_from(aya::maps::Map::Array(open(RULES_MAP))).unwrap();
    let ports: Array<_, u64> = Array::try_from(aya::maps::Map::Array(open(PORTS_MAP))).unwrap();

    let mut filter = PortFilter::new();
    let mut exact = 0;
    // Counter slots: one per entry, never shared, each marked in the slot bitmap.
    let mut slots = BTreeSet::new();
    for item in &services {
        let (key, entry) = item.unwrap();
        filter.manage_key(&key);
        exact += 1;
        assert!(
            slots.insert(entry.stats_id),
            "counter slot {} used twice ({key:?})",
            entry.stats_id
        );
        let slot = entry.stats_id.checked_sub(MAX_RULES).unwrap_or_else(|| {
            panic!("entry {key:?} counts into a rule's slot {}", entry.stats_id)
        });
        let word = ports.get(&(STATS_IDS_BASE + slot / 64), 0).unwrap();
        assert_ne!(
            word & 1 << (slot % 64),
            0,
            "slot {slot} of {key:?} not marked used"
        );
    }
    let marked: u32 = (STATS_IDS_BASE..ports.len())
        .map(|i| ports.get(&i, 0).unwrap().count_ones())
        .sum();
    assert_eq!(
        marked as usize, exact,
        "slots marked used against exact entries"
    );
    let mut ids = BTreeSet::new();
    let mut rule_count = 0;
    for item in &prefixes {
        let (key, node) = item.unwrap();
        for rule in &node.rules[..node.count as usize] {
            rule_count += 1;
            assert!(
                ids.insert(rule.rule_id),
                "rule id {} used twice (prefix {:?})",
                rule.rule_id,
                key.data()
            );
            let slot = rules.get(&rule.rule_id, 0).unwrap();
            assert_eq!(
                slot.stats_id, rule.rule_id,
                "a rule counts into its own slot"
            );
            assert_ne!(
                slot.ifindex, 0,
                "rule {} points at an empty rules slot",
                rule.rule_id
            );
            filter.manage(key.data().proto, rule.port_lo, rule.port_hi);
        }
    }
    assert_eq!(exact + rule_count, *entries, "entries in the maps");
    let mut differ = Vec::new();
    for i in 0..PORT_FILTER_BITMAP_WORDS {
        let got = ports.get(&i, 0).unwrap();
        if got != filter.words[i as usize] {
            differ.push(format!(
                "word {i}: {got:#x}, expected {:#x}",
                filter.words[i as usize]
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "VISCUM_PORTS is not the filter of the entries:\n{}",
        differ.join("\n")
    );
}

/// Namespaces, their /30s, the edge's routes, local routes and reply links.
fn check_namespaces(lab: &Lab, names: &[String], shared: &str, expected: &Expected) {
    let list = json(lab, &["ns", "list", "--json"]);
    let by_name: BTreeMap<String, &Value> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap().to_owned(), n))
        .collect();
    let mut subnets = BTreeMap::new();
    for name in names {
        let ns = by_name
            .get(name)
            .unwrap_or_else(|| panic!("namespace {name} is not listed: {list:#}"));
        let host = ns["host_addr"].as_str().unwrap();
        let inside = ns["ns_addr"].as_str().unwrap();
        assert!(
            !host.is_empty() && !inside.is_empty(),
            "{name} incomplete: {ns}"
        );
        let net = subnet_of(host);
        assert_eq!(net, subnet_of(inside), "{name}: the pair's ends disagree");
        if let Some(other) = subnets.insert(net.clone(), name.clone()) {
            panic!("{name} and {other} share the /30 {net}");
        }
    }
    // The edge's connected routes: one per /30, out of its own veth.
    let out = Command::new("ip")
        .args(["-n", lab.edge.name(), "-j", "-4", "route", "show"])
        .output()
        .unwrap();
    let routes: Value = serde_json::from_slice(&out.stdout).unwrap();
    for (net, name) in &subnets {
        let via: Vec<&str> = routes
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["dst"].as_str() == Some(net.as_str()))
            .map(|r| r["dev"].as_str().unwrap_or("?"))
            .collect();
        assert_eq!(
            via,
            vec![format!("vh-{name}").as_str()],
            "the edge's routes to {net}"
        );
    }
    // The shared namespace answers as exactly its AnyIP entries' addresses.
    let mut want: Vec<String> = expected
        .iter()
        .filter(|(_, ns)| ns.as_str() == shared)
        .map(|(m, _)| {
            let rest = m.trim_start_matches("tcp://");
            let addr = rest.split(':').next().unwrap();
            if addr.contains('/') {
                addr.to_owned()
            } else {
                format!("{addr}/32")
            }
        })
        .collect();
    want.sort();
    let mut got: Vec<String> = by_name[shared]["local_routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    got.sort();
    assert_eq!(got, want, "local routes of the shared namespace");
    // The reply path on every veth entries point at, and only on veths of namespaces that
    // exist (a namespace keeps its reply link while it lives, with or without entries).
    let targets: BTreeSet<String> = expected.values().map(|ns| format!("vh-{ns}")).collect();
    let linked: BTreeSet<String> = std::fs::read_dir(lab.bpffs.path().join("reply-links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let veths: BTreeSet<String> = names.iter().map(|n| format!("vh-{n}")).collect();
    assert!(
        targets.is_subset(&linked),
        "targets without a reply link: {:?}",
        targets.difference(&linked).collect::<Vec<_>>()
    );
    assert!(
        linked.is_subset(&veths),
        "reply links on veths of no namespace: {:?}",
        linked.difference(&veths).collect::<Vec<_>>()
    );
}

/// "169.254.128.1/30" -> "169.254.128.0/30".
fn subnet_of(cidr: &str) -> String {
    let (addr, len) = cidr.split_once('/').unwrap();
    let addr: std::net::Ipv4Addr = addr.parse().unwrap();
    let len: u32 = len.parse().unwrap();
    let mask = u32::MAX << (32 - len);
    format!("{}/{len}", std::net::Ipv4Addr::from(u32::from(addr) & mask))
}
