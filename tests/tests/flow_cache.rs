//! The classifier's per-CPU flow cache, driven packet by packet with `BPF_PROG_TEST_RUN` on
//! one CPU (the cache is per CPU, and a test run executes on the caller's): an established
//! TCP segment is delivered from the cache without the flow record, and the cache obeys
//! every change user space makes to the entries from the very next packet (the entries'
//! generation, `viscum_common::ENTRIES_GEN_WORD`), not only after the cache's 100 ms.

use std::net::SocketAddr;

use aya::{
    maps::{HashMap, MapData},
    programs::SchedClassifier,
};
use viscum::{
    endpoint::Endpoint,
    engine::{Engine, Pins},
    netns,
};
use viscum_common::{REPLIES_MAP, ReplyKey, ReplyState};
use viscum_tests::{
    Lab,
    lab::CLIENT_V4,
    packet::{Packet, TCP_ACK, TCP_SYN},
    skip_unless_root,
    verdicts::run_classifier,
};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_REDIRECT: i32 = 7;

/// Pins the calling thread to CPU 0, so that every test run sees the same CPU's cache.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs the pinned ingress program on `frame` as if it arrived on device `ifindex`.
fn run(prog: &SchedClassifier, ifindex: u32, frame: &[u8]) -> i32 {
    run_classifier(prog, frame, ifindex)
        .expect("BPF_PROG_TEST_RUN")
        .0
}

#[test]
fn a_cached_flow_is_served_without_its_record_and_obeys_entry_changes_at_once() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    lab.viscum_ok(&["attach", lab.lan_if()]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    let other = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &other]);
    let [cloud, _] = lab.cloud_addrs(8443);
    let entry = format!("tcp://{cloud}");
    lab.viscum_ok(&["redirect", "add", &entry, "--ns", &ns]);

    // The target step 3 re-points the entry at: another namespace's, read back from an
    // entry added for it the ordinary way. With it, and an entry on the same port for the
    // IPv6 address, the miss pre-filter keeps the cloud's address and port managed when the
    // entry goes, so the packets after each change do reach the cache.
    let [aside, _] = lab.cloud_addrs(8444);
    lab.viscum_ok(&["redirect", "add", &format!("tcp://{aside}"), "--ns", &other]);
    let [_, same_port] = lab.cloud_addrs(8443);
    lab.viscum_ok(&[
        "redirect",
        "add",
        &format!("tcp://{same_port}"),
        "--ns",
        &other,
    ]);

    let pins = Pins::new(lab.bpffs.path());
    let lan = lab.edge_ifindex(lab.lan_if());
    let endpoint: Endpoint = entry.parse().unwrap();
    let other_target: Endpoint = format!("tcp://{aside}").parse().unwrap();
    netns::in_netns(lab.edge.name(), move || {
        pin_to_cpu0();
        let prog = SchedClassifier::from_pin(pins.program()).unwrap();
        let mut engine = Engine::open(&pins).unwrap();
        let mut records: HashMap<MapData, ReplyKey, ReplyState> = HashMap::try_from(
            aya::maps::Map::from_map_data(MapData::from_pin(pins.map(REPLIES_MAP)).unwrap())
                .unwrap(),
        )
        .unwrap();
        let client = |port: u16| SocketAddr::new(CLIENT_V4.into(), port);
        let ack = |port: u16| Packet::tcp(client(port), cloud, TCP_ACK).build();
        // Opens an edge flow from `port` and fills this CPU's slot (the handshake's ACK
        // finds the record established and fills it).
        let open = |port: u16| {
            let syn = Packet::tcp(client(port), cloud, TCP_SYN).build();
            assert_eq!(run(&prog, lan, &syn), TC_ACT_REDIRECT, "SYN from {port}");
            assert_eq!(
                run(&prog, lan, &ack(port)),
                TC_ACT_REDIRECT,
                "ACK from {port}"
            );
        };

        // 1. Served from the cache: with the record removed behind the classifier's back (as
        //    the LRU would), the next segment is still delivered.
        open(40_001);
        let keys: Vec<ReplyKey> = records.keys().map(Result::unwrap).collect();
        assert_eq!(keys.len(), 1, "one edge flow");
        records.remove(&keys[0]).unwrap();
        assert_eq!(
            run(&prog, lan, &ack(40_001)),
            TC_ACT_REDIRECT,
            "a cached established flow is delivered without its record"
        );

        // 2. The entry removed: the next segment passes at once, although the cache was
        //    filled microseconds ago.
        open(40_002);
        let target = engine.get(&endpoint).unwrap().unwrap().target;
        engine.remove(&endpoint).unwrap();
        assert_eq!(
            run(&prog, lan, &ack(40_002)),
            TC_ACT_UNSPEC,
            "a removed entry's cached flow was still served at the edge"
        );

        // 3. The entry re-added, then re-pointed at another namespace: the flow opened
        //    under the first target is not served at the edge any more (its record names the
        //    old target; the new one holds no such connection).
        engine.insert(&endpoint, target).unwrap();
        open(40_003);
        let elsewhere = engine.get(&other_target).unwrap().unwrap().target;
        engine.remove(&endpoint).unwrap();
        engine.insert(&endpoint, elsewhere).unwrap();
        assert_eq!(
            run(&prog, lan, &ack(40_003)),
            TC_ACT_UNSPEC,
            "a re-pointed entry's old flow was still served by the old target"
        );
        // A new connection goes to the new target.
        open(40_004);
    })
    .unwrap();
}
