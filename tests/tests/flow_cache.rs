//! The classifier's per-CPU flow cache, driven packet by packet with `BPF_PROG_TEST_RUN` on
//! one CPU (the cache is per CPU, and a test run executes on the caller's): an established
//! TCP segment is delivered from the cache without the flow record, and the cache obeys
//! every change user space makes to the entries from the very next packet (the entries'
//! generation, `viscum_common::ENTRIES_GEN_WORD`), not only after the cache's 25 ticks. The
//! reply program's cache likewise.

mod common;

use std::net::{Ipv4Addr, SocketAddr};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::SchedClassifier,
};
use viscum::{
    endpoint::Endpoint,
    engine::{Engine, Pins},
    netns,
};
use viscum_common::{
    ENTRY_STATS_MAP, EntryStats, GLOBAL_STATS_MAP, LATE_REDIRECTS_SLOT, REPLIES_MAP,
    REPLY_CACHE_FILL_AFTER_NS, ReplyKey, ReplyState, TARGET_F_NAT,
};
use viscum_tests::{
    Lab,
    lab::CLIENT_V4,
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_SYN},
    skip_unless_root,
    verdicts::run_classifier,
};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_REDIRECT: i32 = 7;

/// The instance's edge-flow records (`VISCUM_REPLIES`), opened from its pin.
fn edge_records(pins: &Pins) -> HashMap<MapData, ReplyKey, ReplyState> {
    HashMap::try_from(
        aya::maps::Map::from_map_data(MapData::from_pin(pins.map(REPLIES_MAP)).unwrap()).unwrap(),
    )
    .unwrap()
}

/// Runs the pinned ingress program on `frame` as if it arrived on device `ifindex`.
fn run(prog: &SchedClassifier, ifindex: u32, frame: &[u8]) -> i32 {
    run_classifier(prog, frame, ifindex)
        .expect("BPF_PROG_TEST_RUN")
        .0
}

/// A lab with the classifier attached to its client-facing interface and one service
/// namespace.
fn attached() -> (Lab, String) {
    let lab = Lab::new();
    lab.viscum_ok(&["attach", lab.lan_if()]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    (lab, ns)
}

#[test]
fn a_cached_flow_is_served_without_its_record_and_obeys_entry_changes_at_once() {
    if skip_unless_root() {
        return;
    }
    let (lab, ns) = attached();
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
        common::pin_to_cpu(0);
        let prog = SchedClassifier::from_pin(pins.program()).unwrap();
        let mut engine = Engine::open(&pins).unwrap();
        let mut records = edge_records(&pins);
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

/// This CPU's pair of flow-cache slots for a TCP flow from `client` to `server` (IPv4), as
/// the classifier picks it (`viscum_ebpf::cache`: the top bits of `mix` of the 5-tuple; the
/// two slots of a pair share all but the lowest bit).
fn slot_pair(client: SocketAddr, server: SocketAddr) -> u32 {
    let word = |a: &SocketAddr| match a.ip() {
        std::net::IpAddr::V4(ip) => u32::from_ne_bytes(ip.octets()),
        std::net::IpAddr::V6(_) => unreachable!("IPv4 flows only"),
    };
    let port = |a: &SocketAddr| u16::from_ne_bytes(a.port().to_be_bytes());
    let tail = viscum_common::FlowCacheSlot::tail_of(
        port(&client),
        port(&server),
        viscum_common::PROTO_TCP,
        viscum_common::FAMILY_V4,
    );
    let h = viscum_common::hash::mix([
        word(&client),
        word(&server),
        tail as u32,
        (tail >> 32) as u32,
    ]);
    (h >> (32 - viscum_common::FLOW_CACHE_SLOTS.trailing_zeros())) >> 1
}

/// A hit counts in its flow-cache slot (`viscum_common::FlowCacheSlot::pending`), not in the
/// entry's counter line; every reader adds what the slots hold, and the classifier moves it
/// to the entry when the slot is emptied or filled again, or, when the entry is gone by then
/// (even if the same match was added again since), to the global count alone. Through all
/// of it the entry's and the global counts stay exact.
#[test]
fn cached_hits_count_in_their_slot_and_every_count_stays_exact() {
    if skip_unless_root() {
        return;
    }
    let (lab, ns) = attached();
    let [cloud, _] = lab.cloud_addrs(8443);
    let [aside, _] = lab.cloud_addrs(8444);
    let entry = format!("tcp://{cloud}");
    lab.viscum_ok(&["redirect", "add", &entry, "--ns", &ns]);
    lab.viscum_ok(&["redirect", "add", &format!("tcp://{aside}"), "--ns", &ns]);

    let pins = Pins::new(lab.bpffs.path());
    let lan = lab.edge_ifindex(lab.lan_if());
    let endpoint: Endpoint = entry.parse().unwrap();
    let aside_endpoint: Endpoint = format!("tcp://{aside}").parse().unwrap();
    netns::in_netns(lab.edge.name(), move || {
        common::pin_to_cpu(0);
        let prog = SchedClassifier::from_pin(pins.program()).unwrap();
        let mut engine = Engine::open(&pins).unwrap();
        // CPU 0's region of the counters comes first: slot `id` is index `id`.
        let raw_stats: Array<MapData, EntryStats> = Array::try_from(aya::maps::Map::Array(
            MapData::from_pin(pins.map(ENTRY_STATS_MAP)).unwrap(),
        ))
        .unwrap();
        let global: PerCpuArray<MapData, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(
            MapData::from_pin(pins.map(GLOBAL_STATS_MAP)).unwrap(),
        ))
        .unwrap();
        let late = || global.get(&LATE_REDIRECTS_SLOT, 0).unwrap()[0];
        let client = |port: u16| SocketAddr::new(CLIENT_V4.into(), port);
        let seg =
            |port: u16, to: SocketAddr, flags: u8| Packet::tcp(client(port), to, flags).build();
        let send = |frame: &[u8]| assert_eq!(run(&prog, lan, frame), TC_ACT_REDIRECT);
        const K: u64 = 5;
        // Opens a flow (SYN, then the ACK that fills its slot: both counted in the entry) and
        // sends K more ACKs, served and counted by the slot. Returns the bytes sent.
        let flow = |port: u16, to: SocketAddr| -> u64 {
            let (syn, ack) = (seg(port, to, TCP_SYN), seg(port, to, TCP_ACK));
            send(&syn);
            for _ in 0..=K {
                send(&ack);
            }
            (syn.len() + (K as usize + 1) * ack.len()) as u64
        };
        let view = |engine: &Engine, e: &Endpoint| engine.get(e).unwrap().unwrap();
        let redirected = |engine: &Engine| engine.global_stats().unwrap().redirected;

        // 1. The hits are in the slot: the entry's own counters have the SYN and the ACK
        //    only, yet every read shows all K + 2.
        let bytes = flow(41_001, cloud);
        let e = view(&engine, &endpoint);
        assert_eq!(
            (e.packets, e.bytes),
            (K + 2, bytes),
            "read with the slot's counts"
        );
        let id = e.target.stats_id;
        assert_eq!(
            raw_stats.get(&id, 0).unwrap().packets,
            2,
            "hits went to the slot"
        );
        assert_eq!(redirected(&engine), K + 2);
        // Another entry's change moves the generation: the slot's counts are still this
        // entry's, to every reader, and to the classifier when the FIN below empties it.
        engine.update_flags(&aside_endpoint, |flags| flags).unwrap();
        let e = view(&engine, &endpoint);
        assert_eq!(
            (e.packets, e.bytes),
            (K + 2, bytes),
            "after another entry changed"
        );

        // 2. A FIN empties the slot into the entry: the same counts, now all the entry's.
        let fin = seg(41_001, cloud, TCP_FIN | TCP_ACK);
        send(&fin);
        let e = view(&engine, &endpoint);
        assert_eq!((e.packets, e.bytes), (K + 3, bytes + fin.len() as u64));
        assert_eq!(
            raw_stats.get(&id, 0).unwrap().packets,
            K + 3,
            "the FIN flushed the slot"
        );
        let mut total = K + 3;

        // 3. The entry removed with K hits still in a flow's slot: they stay in the global
        //    count, and when another flow takes the slot they go there alone (the entry's
        //    counter slot is no longer its own).
        let b = 41_002;
        let c = (20_000..60_000)
            .find(|&p| slot_pair(client(p), aside) == slot_pair(client(b), cloud))
            .expect("a port whose flow to the other entry shares the slot pair");
        // A second flow in its own pair, still holding counts when the match is added again.
        let g = (41_003..60_000)
            .find(|&p| {
                let pair = slot_pair(client(p), cloud);
                pair != slot_pair(client(b), cloud) && pair != slot_pair(client(41_001), cloud)
            })
            .unwrap();
        flow(b, cloud);
        flow(g, cloud);
        total += 2 * (K + 2);
        assert_eq!(redirected(&engine), total);
        let target = e.target;
        engine.remove(&endpoint).unwrap();
        assert_eq!(
            redirected(&engine),
            total,
            "after the removal, slots still holding counts"
        );
        assert_eq!(late(), 0);
        flow(c, aside);
        total += K + 2;
        assert_eq!(
            late(),
            K,
            "flow {c} took flow {b}'s slot: its counts went to the global count"
        );
        assert_eq!(redirected(&engine), total);
        assert_eq!(view(&engine, &aside_endpoint).packets, K + 2);

        // 4. The same match added again, in the same counter slot (the lowest free one) but
        //    another epoch, starts from zero: flow g's counts, still in its slot, are not its.
        engine.insert(&endpoint, target).unwrap();
        let again = view(&engine, &endpoint);
        assert_eq!(
            again.target.stats_id, id,
            "the removed entry's counter slot is reused"
        );
        assert_ne!(again.target.stats_epoch, target.stats_epoch);
        assert_eq!(again.packets, 0, "the re-added entry starts from zero");
        assert_eq!(redirected(&engine), total);
        // g's FIN: the entry's first packet; g's slot, emptied, gives its K to the global count.
        send(&seg(g, cloud, TCP_FIN | TCP_ACK));
        total += 1;
        assert_eq!(view(&engine, &endpoint).packets, 1);
        assert_eq!(late(), 2 * K);
        assert_eq!(redirected(&engine), total);
    })
    .unwrap();
}

/// The reply program's cache (`viscum_ebpf::reply_cache`), driven the same way: once an
/// established flow is a little old, its replies are sent out from this CPU's copy of its
/// record without the record, rewritten to the cloud address as the record says; an entry
/// change retires the copy at once; and a client that reuses its port for another cloud
/// endpoint of the same namespace port (a new record under the same key) never has its
/// replies sent from the old connection's copy, whether that endpoint answers as itself
/// (AnyIP) or from the namespace's address (NAT).
#[test]
fn replies_of_an_established_flow_are_sent_from_the_reply_cache_and_obey_changes_at_once() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    // The client's neighbour entry, so the reply program's FIB lookup succeeds and its result
    // is kept in the record (a reply without one is never cached).
    lab.pin_neighbours().unwrap();
    lab.viscum_ok(&["attach", lab.lan_if()]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    let [cloud, _] = lab.cloud_addrs(8443);
    let entry = format!("tcp://{cloud}");
    lab.viscum_ok(&["redirect", "add", &entry, "--ns", &ns]);
    // A second cloud address that the same namespace serves on the same port (step 4), and
    // a third it serves there in AnyIP mode, answering as that address itself (step 3).
    let cloud_b = SocketAddr::new(Ipv4Addr::new(198, 51, 100, 77).into(), 8443);
    lab.viscum_ok(&["redirect", "add", &format!("tcp://{cloud_b}"), "--ns", &ns]);
    let cloud_c = SocketAddr::new(Ipv4Addr::new(198, 51, 100, 78).into(), 8443);
    let anyip = format!("tcp://{cloud_c}");
    lab.viscum_ok(&["redirect", "add", &anyip, "--ns", &ns, "--anyip"]);

    let pins = Pins::new(lab.bpffs.path());
    let lan = lab.edge_ifindex(lab.lan_if());
    let veth = lab.edge_ifindex(&viscum::netns::host_veth_name(&ns));
    let endpoint: Endpoint = entry.parse().unwrap();
    netns::in_netns(lab.edge.name(), move || {
        common::pin_to_cpu(0);
        let ingress = SchedClassifier::from_pin(pins.program()).unwrap();
        let reply_prog = SchedClassifier::from_pin(pins.reply_program()).unwrap();
        let mut engine = Engine::open(&pins).unwrap();
        let mut records = edge_records(&pins);
        // The service answers from its namespace address (NAT mode, the default); the reply
        // program makes its replies the cloud's.
        let target = engine.get(&endpoint).unwrap().unwrap().target;
        assert_ne!(target.flags & TARGET_F_NAT, 0, "NAT mode");
        let n = target.nat_addr;
        let service = SocketAddr::new(Ipv4Addr::new(n[0], n[1], n[2], n[3]).into(), 8443);
        let client = |port: u16| SocketAddr::new(CLIENT_V4.into(), port);
        let open = |port: u16, to: SocketAddr| {
            let syn = Packet::tcp(client(port), to, TCP_SYN).build();
            assert_eq!(run(&ingress, lan, &syn), TC_ACT_REDIRECT, "SYN from {port}");
            let ack = Packet::tcp(client(port), to, TCP_ACK).build();
            assert_eq!(run(&ingress, lan, &ack), TC_ACT_REDIRECT, "ACK from {port}");
        };
        // Runs the reply program on the service's segment to `port`: the action, and the
        // source address the reply leaves with.
        let reply_with = |port: u16, flags: u8| {
            let frame = Packet::tcp(service, client(port), flags).build();
            let (action, out) = run_classifier(&reply_prog, &frame, veth).expect("test run");
            // Ethernet (no tag here), then the IPv4 header: the source at bytes 12..16.
            let src = Ipv4Addr::new(out[26], out[27], out[28], out[29]);
            (action, src)
        };
        let reply = |port: u16| reply_with(port, TCP_ACK);
        // The AnyIP endpoint's segment to `port`, from its own address.
        let reply_as_c = |port: u16, flags: u8| {
            let frame = Packet::tcp(cloud_c, client(port), flags).build();
            let (action, out) = run_classifier(&reply_prog, &frame, veth).expect("test run");
            (action, Ipv4Addr::new(out[26], out[27], out[28], out[29]))
        };
        let sent_as = |to: &SocketAddr| (TC_ACT_REDIRECT, *cloud_ip(to));
        let key_of = |port: u16, records: &HashMap<MapData, ReplyKey, ReplyState>| {
            records
                .keys()
                .map(Result::unwrap)
                .find(|k| u16::from_be(k.client_port) == port)
        };
        // A flow is cached once its FIB result (taken by its first reply) is
        // REPLY_CACHE_FILL_AFTER_NS old: its next reply, sent out by the record, then fills
        // this CPU's slot.
        let first_replies = |port: u16, records: &HashMap<MapData, ReplyKey, ReplyState>| {
            assert_eq!(reply(port), sent_as(&cloud), "first reply to {port}");
            let key = key_of(port, records).expect("the flow's record");
            let fib_at = records.get(&key, 0).unwrap().fib_at_ns;
            assert_ne!(fib_at, 0, "FIB result kept");
            wait_for_coarse_clock_past(fib_at + REPLY_CACHE_FILL_AFTER_NS);
            assert_eq!(reply(port), sent_as(&cloud), "second reply to {port}");
            key
        };

        // 1. With the record then removed behind the program's back, the next reply is sent
        //    out from the copy, rewritten as the record said: no record is restored for it.
        open(41_001, cloud);
        let key = first_replies(41_001, &records);
        records.remove(&key).unwrap();
        assert_eq!(reply(41_001), sent_as(&cloud), "a cached reply");
        assert!(
            key_of(41_001, &records).is_none(),
            "the reply was not served from the reply cache: its record was restored"
        );

        // 2. The entry removed: a cached flow's reply is no longer sent out as the cloud's,
        //    although its copy was made microseconds ago.
        open(41_002, cloud);
        let key = first_replies(41_002, &records);
        records.remove(&key).unwrap();
        engine.remove(&endpoint).unwrap();
        assert_eq!(
            reply(41_002).0,
            TC_ACT_UNSPEC,
            "a removed entry's cached reply was still sent out as the cloud's"
        );

        // 3. The entry back, a flow cached; then the client reuses its port for the cloud
        //    address the namespace port serves in AnyIP mode. Nothing is ambiguous among the
        //    NAT endpoints (no identity moves), but the new connection's replies come from
        //    another source than the cached flow's, and are never rewritten to its cloud.
        engine.insert(&endpoint, target).unwrap();
        open(41_003, cloud);
        first_replies(41_003, &records);
        open(41_003, cloud_c);
        assert_eq!(
            reply_as_c(41_003, TCP_SYN | TCP_ACK),
            sent_as(&cloud_c),
            "the AnyIP connection's SYN-ACK"
        );
        assert_eq!(
            reply_as_c(41_003, TCP_ACK),
            sent_as(&cloud_c),
            "an AnyIP connection's reply on a reused port was rewritten to the old one's cloud"
        );

        // 4. A flow cached; then the client reuses its port for the other NAT cloud address
        //    the namespace port serves. The new connection's replies are its own endpoint's
        //    from its handshake on, never the copy of the first one's record.
        open(41_004, cloud);
        first_replies(41_004, &records);
        open(41_004, cloud_b);
        assert_eq!(
            reply_with(41_004, TCP_SYN | TCP_ACK),
            sent_as(&cloud_b),
            "the new connection's SYN-ACK"
        );
        assert_eq!(
            reply(41_004),
            sent_as(&cloud_b),
            "a reply of the new connection on a reused port was sent as the old one's cloud"
        );
    })
    .unwrap();
}

/// Polls (bounded) until `CLOCK_MONOTONIC_COARSE`, the clock of `bpf_ktime_get_coarse_ns`,
/// is past `ns`: the next tick.
fn wait_for_coarse_clock_past(ns: u64) {
    let coarse = || {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut t) };
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while coarse() <= ns {
        assert!(
            std::time::Instant::now() < deadline,
            "the coarse clock did not move"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The IPv4 address of `addr` (the lab's cloud addresses here are IPv4).
fn cloud_ip(addr: &SocketAddr) -> &Ipv4Addr {
    match addr {
        SocketAddr::V4(a) => a.ip(),
        SocketAddr::V6(_) => panic!("an IPv4 address expected, got {addr}"),
    }
}
