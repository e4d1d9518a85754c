//! Interfaces and namespaces that come and go under a running datapath (issue "field
//! correctness", items 7, 8 and 11): the client-facing interface re-created (OpenWrt's
//! `network restart`), a redirect target's veth deleted and re-created, a service namespace
//! made under `ip netns exec`. Real traffic, IPv4 and IPv6, with the CLI and with the daemon.
//!
//! Every wait polls with a bound; nothing sleeps to let things settle.

mod common;

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;
use viscum::{features::ProgramLoad, netns};
use viscum_tests::{
    IdentityServer, Lab, Netns, Proto, ask,
    daemon::{Daemon, DaemonFiles, Service},
    lab::{CLIENT_V4, CLIENT_V6, CLOUD_V4, CLOUD_V6, EDGE_LAN_V4, EDGE_LAN_V6, wait_links_ready},
    skip_unless_root, unique_name, wait_until,
};

/// Bound of one client request.
const ASK: Duration = Duration::from_millis(700);
/// Bound for a change the daemon makes on its own (it reacts to link events in
/// milliseconds; a service restart takes a Python start and two health checks).
const REACT: Duration = Duration::from_secs(20);
/// Bound for links to become ready to carry traffic.
const READY: Duration = Duration::from_secs(10);

/// Who answers a new `proto` request to `addr` from the client right now ("edge", "cloud",
/// or the error).
fn who(lab: &Lab, proto: Proto, addr: SocketAddr) -> String {
    ask(lab.client.name(), proto, addr, ASK).unwrap_or_else(|e| format!("error: {e}"))
}

/// Waits until every (proto, addr) is answered by `want`; panics naming the last answers.
fn wait_all(lab: &Lab, cases: &[(Proto, SocketAddr)], want: &str, timeout: Duration, why: &str) {
    let mut last = Vec::new();
    let ok = wait_until(timeout, || {
        last = cases.iter().map(|&(p, a)| who(lab, p, a)).collect();
        last.iter().all(|w| w == want)
    });
    assert!(
        ok,
        "{why}: wanted {want:?} from {cases:?} within {timeout:?}, last answers {last:?}"
    );
}

/// TCP and UDP to both cloud addresses on `port`.
fn both_protocols(lab: &Lab, port: u16) -> Vec<(Proto, SocketAddr)> {
    lab.cloud_addrs(port)
        .into_iter()
        .flat_map(|a| [(Proto::Tcp, a), (Proto::Udp, a)])
        .collect()
}

fn url(proto: Proto, addr: SocketAddr) -> String {
    format!(
        "{}://{addr}",
        if proto == Proto::Tcp { "tcp" } else { "udp" }
    )
}

/// `viscum stats --json`.
fn stats(lab: &Lab) -> Value {
    serde_json::from_str(&lab.viscum_ok(&["stats", "--json"])).unwrap()
}

/// `viscum redirect list --json`, as (match, target) pairs.
fn targets(lab: &Lab) -> Vec<(String, String)> {
    let v: Value = serde_json::from_str(&lab.viscum_ok(&["redirect", "list", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["match"].as_str().unwrap().to_owned(),
                e["target"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Fresh interface indexes for re-created links, so that no veth shares its index with its
/// peer (see `create_veth_indexed`) and a re-created link never gets its predecessor's.
fn next_index() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(40);
    NEXT.fetch_add(2, Ordering::Relaxed)
}

/// Deletes interface `name` in the edge namespace (a veth takes its peer with it).
fn delete_edge_link(lab: &Lab, name: &str) {
    let name = name.to_owned();
    lab.edge.block_on(move || async move {
        let h = netns::handle_here().await.unwrap();
        let link = netns::link_by_name(&h, &name).await.unwrap();
        netns::delete_link(&h, link.index).await.unwrap();
    });
}

/// Re-creates the client-facing link as a router's `network restart` does: `lan0` and the
/// client's `eth0` deleted, then made again with the same names and addresses (and new
/// interface indexes), the client's default routes restored.
fn recreate_lan(lab: &Lab) {
    delete_edge_link(lab, "lan0");
    create_lan(lab);
}

/// The lab's client-edge link, as [`Lab::new`] makes it.
fn create_lan(lab: &Lab) {
    let client = lab.client.name().to_owned();
    let edge = lab.edge.name().to_owned();
    let index = next_index();
    viscum_tests::block_on(async move {
        let e = netns::handle_in(&edge).await.unwrap();
        let c = netns::handle_in(&client).await.unwrap();
        netns::create_veth_indexed(&e, "lan0", index, "eth0", &client, index + 1, None)
            .await
            .unwrap();
        let lan = netns::link_by_name(&e, "lan0").await.unwrap().index;
        netns::add_address(&e, lan, EDGE_LAN_V4.into(), 24)
            .await
            .unwrap();
        netns::add_address(&e, lan, EDGE_LAN_V6.into(), 64)
            .await
            .unwrap();
        netns::set_up(&e, lan).await.unwrap();
        let eth0 = netns::link_by_name(&c, "eth0").await.unwrap().index;
        netns::add_address(&c, eth0, CLIENT_V4.into(), 24)
            .await
            .unwrap();
        netns::add_address(&c, eth0, CLIENT_V6.into(), 64)
            .await
            .unwrap();
        netns::set_up(&c, eth0).await.unwrap();
        netns::add_route(
            &c,
            Ipv4Addr::UNSPECIFIED.into(),
            0,
            Some(EDGE_LAN_V4.into()),
            Some(eth0),
        )
        .await
        .unwrap();
        netns::add_route(
            &c,
            Ipv6Addr::UNSPECIFIED.into(),
            0,
            Some(EDGE_LAN_V6.into()),
            Some(eth0),
        )
        .await
        .unwrap();
        wait_links_ready(&c, "client", Instant::now() + READY).await;
        wait_links_ready(&e, "edge", Instant::now() + READY).await;
    });
}

/// A namespace viscum did not make, behind an edge veth `veth` (a `--to` target): the
/// service answers as the cloud addresses through local routes its owner set up.
struct Foreign {
    ns: Netns,
    veth: String,
}

impl Foreign {
    fn new(lab: &Lab) -> Foreign {
        let ns = Netns::new();
        ns.set_sysctl("net/ipv6/conf/all/accept_dad", "0");
        ns.set_sysctl("net/ipv6/conf/default/accept_dad", "0");
        ns.set_sysctl("net/ipv6/ip_nonlocal_bind", "1");
        ns.block_on(|| async {
            let h = netns::handle_here().await.unwrap();
            let lo = netns::link_by_name(&h, "lo").await.unwrap().index;
            netns::set_up(&h, lo).await.unwrap();
            netns::add_local_route(&h, CLOUD_V4.into(), 32)
                .await
                .unwrap();
            netns::add_local_route(&h, CLOUD_V6.into(), 128)
                .await
                .unwrap();
        });
        let foreign = Foreign {
            ns,
            veth: unique_name("to"),
        };
        foreign.link(lab);
        foreign
    }

    /// (Re)creates the veth pair: `veth` on the edge, `eth0` inside, addressed, routed.
    fn link(&self, lab: &Lab) {
        let (edge, inner, veth) = (
            lab.edge.name().to_owned(),
            self.ns.name().to_owned(),
            self.veth.clone(),
        );
        let index = next_index();
        viscum_tests::block_on(async move {
            let e = netns::handle_in(&edge).await.unwrap();
            let n = netns::handle_in(&inner).await.unwrap();
            netns::create_veth_indexed(&e, &veth, index, "eth0", &inner, index + 1, None)
                .await
                .unwrap();
            let host = netns::link_by_name(&e, &veth).await.unwrap().index;
            netns::add_address(&e, host, Ipv4Addr::new(10, 99, 0, 1).into(), 30)
                .await
                .unwrap();
            netns::add_address(&e, host, "fd99::1".parse().unwrap(), 64)
                .await
                .unwrap();
            netns::set_up(&e, host).await.unwrap();
            let eth0 = netns::link_by_name(&n, "eth0").await.unwrap().index;
            netns::add_address(&n, eth0, Ipv4Addr::new(10, 99, 0, 2).into(), 30)
                .await
                .unwrap();
            netns::add_address(&n, eth0, "fd99::2".parse().unwrap(), 64)
                .await
                .unwrap();
            netns::set_up(&n, eth0).await.unwrap();
            netns::add_route(
                &n,
                Ipv4Addr::UNSPECIFIED.into(),
                0,
                Some(Ipv4Addr::new(10, 99, 0, 1).into()),
                Some(eth0),
            )
            .await
            .unwrap();
            netns::add_route(
                &n,
                Ipv6Addr::UNSPECIFIED.into(),
                0,
                Some("fd99::1".parse().unwrap()),
                Some(eth0),
            )
            .await
            .unwrap();
            wait_links_ready(&n, "foreign namespace", Instant::now() + READY).await;
            wait_links_ready(&e, "edge", Instant::now() + READY).await;
        });
    }
}

// ----- the daemon -----------------------------------------------------------------------

/// Writes the daemon's configuration: `[engine]` for the lab, plus a service `name` answering
/// "edge" on `port` of both cloud addresses when given (stopped with a 500 ms grace).
fn write_config(files: &DaemonFiles, service: Option<(&str, u16)>) {
    let mut config = files.config();
    if let Some((name, port)) = service {
        config.services.push(Service {
            stop_grace_ms: Some(500),
            ..files.service(name, port.into(), "edge").matches(&[
                format!("tcp://{CLOUD_V4}:{port}"),
                format!("tcp://[{CLOUD_V6}]:{port}"),
            ])
        });
    }
    files.write(&config);
}

/// `viscum run` in the lab's edge namespace, logging at debug level, with extra environment.
fn start_daemon(lab: &Lab, files: &DaemonFiles, env: &[(&str, &str)]) -> Daemon {
    Daemon::start_with(lab, files, "debug", env)
}

// ----- item 7: the client-facing interface re-created -----------------------------------

/// CLI: after `lan0` is re-created the classifier is gone with the old interface. `stats`
/// says so (and traffic reaches the cloud, untouched); `viscum attach lan0` re-attaches (it
/// must not answer "already attached" from the stale record) and the edge serves again.
/// `viscum attach --log-level info` logs every program's load with its duration and
/// `verified_insns` (what the VM kernel matrix collects, and B11 reports), in load order, with
/// the counts the kernel reports for the pinned programs (`viscum doctor`); an attach that
/// reuses the pins loads, and logs, nothing.
#[test]
fn attach_logs_each_program_load_once() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let loads = |out: &std::process::Output| -> Vec<ProgramLoad> {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "viscum attach failed ({}):\n{stderr}",
            out.status
        );
        stderr.lines().filter_map(ProgramLoad::parse).collect()
    };
    let first = loads(&lab.viscum(&["attach", "lan0", "--log-level", "info"]));
    let names: Vec<&str> = first.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        [
            viscum_common::INGRESS_PROG,
            viscum_common::REPLY_PROG,
            viscum_common::ICMP_INGRESS_PROG,
            viscum_common::ICMP_REPLY_PROG,
            viscum_common::RECOVER_PROG,
        ],
        "the load lines: {first:?}"
    );
    let doctor = lab.viscum_ok(&["doctor"]);
    for l in &first {
        assert!(
            l.load_ms > 0.0 && l.load_ms < 900_000.0,
            "{}: load time {} ms",
            l.name,
            l.load_ms
        );
        let row = doctor
            .lines()
            .find(|line| line.split_whitespace().next() == Some(l.name.as_str()))
            .unwrap_or_else(|| panic!("viscum doctor lists no {}:\n{doctor}", l.name));
        // PROGRAM ID VERIFIED_INSNS XLATED_BYTES JITED_BYTES
        let cols: Vec<&str> = row.split_whitespace().collect();
        let logged = l.verified_insns.map_or("-".to_string(), |n| n.to_string());
        assert_eq!(cols.get(2).copied(), Some(logged.as_str()), "{row}");
    }
    let again = loads(&lab.viscum(&["attach", "lan0", "--log-level", "info"]));
    assert!(again.is_empty(), "the pins were reused, yet: {again:?}");
}

#[test]
fn attach_reattaches_a_recreated_client_interface() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    lab.viscum_ok(&["attach", "lan0"]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let _edge = IdentityServer::start(&ns, cloud.port(), "edge");
    let cases = both_protocols(&lab, cloud.port());
    for &(proto, addr) in &cases {
        lab.viscum_ok(&[
            "redirect",
            "add",
            &url(proto, addr),
            "--ns",
            &ns,
            "--learn-ms",
            "0",
        ]);
    }
    wait_all(&lab, &cases, "edge", ASK * 4, "before");
    assert_eq!(stats(&lab)["interfaces"], serde_json::json!(["lan0"]));

    recreate_lan(&lab);
    assert_eq!(
        stats(&lab)["interfaces"],
        serde_json::json!([]),
        "stats must not list an attachment the kernel no longer has"
    );
    for &(proto, addr) in &cases {
        assert_eq!(
            who(&lab, proto, addr),
            "cloud",
            "{proto:?} {addr} unclassified"
        );
    }

    let out = lab.viscum_ok(&["attach", "lan0"]);
    assert!(
        out.contains("re-attached to lan0") && !out.contains("already"),
        "{out}"
    );
    assert_eq!(stats(&lab)["interfaces"], serde_json::json!(["lan0"]));
    wait_all(&lab, &cases, "edge", ASK * 4, "after viscum attach");
    assert!(
        lab.viscum_ok(&["attach", "lan0"])
            .contains("already attached to lan0")
    );

    // Deleted for good: detach removes the stale record without touching anything else.
    delete_edge_link(&lab, "lan0");
    assert_eq!(stats(&lab)["interfaces"], serde_json::json!([]));
    lab.viscum_ok(&["detach", "lan0"]);
    assert!(!lab.bpffs.path().join("links/lan0").exists());
}

/// The same with the pre-6.6 mechanism (a clsact qdisc and a `bpf` filter), forced on this
/// kernel: the filter goes with the interface; `attach` adds qdisc and filter again, and
/// `detach` removes the qdisc it added.
#[test]
fn attach_reattaches_a_recreated_client_interface_through_clsact() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let clsact = |args: &[&str]| {
        let mut cmd = lab.viscum_command(args);
        cmd.env(viscum::engine::attach::ATTACH_MODE_ENV, "clsact");
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(clsact(&["attach", "lan0"]).contains("clsact"));
    assert!(lab.bpffs.path().join("links/lan0").is_dir());
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let _edge = IdentityServer::start(&ns, cloud.port(), "edge");
    let cases: Vec<(Proto, SocketAddr)> = lab
        .cloud_addrs(cloud.port())
        .into_iter()
        .map(|a| (Proto::Tcp, a))
        .collect();
    for &(proto, addr) in &cases {
        lab.viscum_ok(&["redirect", "add", &url(proto, addr), "--ns", &ns]);
    }
    wait_all(&lab, &cases, "edge", ASK * 4, "before");
    assert!(clsact(&["attach", "lan0"]).contains("already attached"));

    recreate_lan(&lab);
    assert_eq!(stats(&lab)["interfaces"], serde_json::json!([]));
    wait_all(&lab, &cases, "cloud", ASK * 4, "re-created, not attached");
    assert!(clsact(&["attach", "lan0"]).contains("re-attached to lan0 (clsact"));
    wait_all(&lab, &cases, "edge", ASK * 4, "re-attached");
    assert_eq!(stats(&lab)["interfaces"], serde_json::json!(["lan0"]));

    lab.viscum_ok(&["detach", "lan0"]);
    let qdiscs = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.edge.name()))
        .args(["tc", "qdisc", "show", "dev", "lan0"])
        .output()
        .unwrap();
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout).into_owned();
    assert!(
        !qdiscs.contains("clsact"),
        "the qdisc viscum added stays:\n{qdiscs}"
    );
}

/// Daemon: `lan0` deleted: `status` and `stats` say the classifier is missing (never
/// "attached"); re-created: the daemon re-attaches on its own and the edge serves again,
/// without any command.
#[test]
fn the_daemon_reattaches_a_recreated_client_interface() {
    if skip_unless_root() {
        return;
    }
    daemon_reattaches(&[]);
}

/// The same through a clsact qdisc (the mechanism of kernels before 6.6, OpenWrt's among
/// them), forced on this kernel.
#[test]
fn the_daemon_reattaches_a_recreated_client_interface_through_clsact() {
    if skip_unless_root() {
        return;
    }
    daemon_reattaches(&[(viscum::engine::attach::ATTACH_MODE_ENV, "clsact")]);
}

fn daemon_reattaches(env: &[(&str, &str)]) {
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let svc = lab.service_ns_name();
    let _cloud = IdentityServer::start(lab.cloud.name(), 8080, "cloud");
    write_config(&files, Some((&svc, 8080)));
    let daemon = start_daemon(&lab, &files, env);
    daemon.wait_redirected(&svc, REACT);
    let cases: Vec<(Proto, SocketAddr)> = lab
        .cloud_addrs(8080)
        .into_iter()
        .map(|a| (Proto::Tcp, a))
        .collect();
    wait_all(&lab, &cases, "edge", REACT, "served by the daemon");
    assert_eq!(daemon.attachment("lan0"), "attached");

    delete_edge_link(&lab, "lan0");
    assert!(
        wait_until(REACT, || daemon.attachment("lan0") == "interface-gone"),
        "status: {}",
        daemon.status()
    );
    assert_eq!(daemon.status()["interfaces"], serde_json::json!([]));
    assert_eq!(stats(&lab)["interfaces"], serde_json::json!([]));
    let human = lab.viscum_ok(&["status", "--control", files.control().to_str().unwrap()]);
    assert!(
        human.contains("interface lan0: missing (interface gone)")
            && human.contains("attached to -"),
        "{human}"
    );

    let start = Instant::now();
    create_lan(&lab);
    wait_all(&lab, &cases, "edge", REACT, "after lan0 came back");
    eprintln!(
        "served at the edge again {:?} after lan0 was re-created",
        start.elapsed()
    );
    assert_eq!(daemon.attachment("lan0"), "attached");
    assert_eq!(stats(&lab)["interfaces"], serde_json::json!(["lan0"]));
    assert!(
        daemon.log().contains("re-attached to lan0"),
        "{}",
        daemon.log()
    );
}

// ----- item 8: a redirect target deleted and re-created ---------------------------------

/// A namespace behind a `--to` veth viscum did not make, an "edge" server in it, and TCP
/// and UDP entries for both cloud addresses pointing at that veth, served at the edge.
fn served_through_foreign_veth(
    lab: &Lab,
) -> (Foreign, [IdentityServer; 2], Vec<(Proto, SocketAddr)>) {
    let foreign = Foreign::new(lab);
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let edge = IdentityServer::start(foreign.ns.name(), cloud.port(), "edge");
    let cases = both_protocols(lab, cloud.port());
    for &(proto, addr) in &cases {
        lab.viscum_ok(&[
            "redirect",
            "add",
            &url(proto, addr),
            "--to",
            &foreign.veth,
            "--learn-ms",
            "0",
        ]);
    }
    wait_all(lab, &cases, "edge", ASK * 4, "before");
    (foreign, [cloud, edge], cases)
}

/// A `--to` veth deleted: its clients get the cloud at once (datapath), `redirect list`
/// says the target is gone; re-created with the same name: the daemon re-points the
/// entries at it on its own.
#[test]
fn the_daemon_follows_a_recreated_to_target() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    write_config(&files, None);
    let daemon = start_daemon(&lab, &files, &[]);
    let (foreign, _servers, cases) = served_through_foreign_veth(&lab);

    delete_edge_link(&lab, &foreign.veth);
    for &(proto, addr) in &cases {
        assert_eq!(who(&lab, proto, addr), "cloud", "{addr}: target gone");
    }
    for (m, target) in targets(&lab) {
        assert!(target.contains("gone"), "{m} still claims target {target}");
    }

    let start = Instant::now();
    foreign.link(&lab);
    wait_all(&lab, &cases, "edge", REACT, "after the target came back");
    eprintln!(
        "served at the edge again {:?} after the target was re-created",
        start.elapsed()
    );
    for (m, target) in targets(&lab) {
        assert_eq!(target, foreign.veth, "{m}");
    }
    assert!(daemon.log().contains("is back"), "{}", daemon.log());
}

/// Without a daemon: `viscum attach` (the command that repairs the datapath) re-points
/// entries at a re-created `--to` target and says so.
#[test]
fn attach_follows_a_recreated_to_target() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    lab.viscum_ok(&["attach", "lan0"]);
    let (foreign, _servers, cases) = served_through_foreign_veth(&lab);
    delete_edge_link(&lab, &foreign.veth);
    for &(proto, addr) in &cases {
        assert_eq!(who(&lab, proto, addr), "cloud", "{addr}: target gone");
    }
    foreign.link(&lab);
    // Nothing watches links without a daemon: still the cloud until asked.
    for &(proto, addr) in &cases {
        assert_eq!(
            who(&lab, proto, addr),
            "cloud",
            "{addr}: not yet re-pointed"
        );
    }
    let out = lab.viscum_ok(&["attach", "lan0"]);
    assert_eq!(
        out.matches(&format!("follows {} again", foreign.veth))
            .count(),
        4,
        "{out}"
    );
    wait_all(&lab, &cases, "edge", ASK * 4, "after viscum attach");
}

/// A service namespace deleted behind viscum's back (`ip netns del` with nothing left in it)
/// and made again with `viscum ns add`: its entries follow it (and come back with their
/// local routes where they need them).
#[test]
fn ns_add_restores_the_entries_of_a_recreated_namespace() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    lab.viscum_ok(&["attach", "lan0"]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let cases: Vec<(Proto, SocketAddr)> = lab
        .cloud_addrs(cloud.port())
        .into_iter()
        .map(|a| (Proto::Tcp, a))
        .collect();
    for &(proto, addr) in &cases {
        lab.viscum_ok(&["redirect", "add", &url(proto, addr), "--ns", &ns]);
    }
    {
        let _edge = IdentityServer::start(&ns, cloud.port(), "edge");
        wait_all(&lab, &cases, "edge", ASK * 4, "before");
    }
    // `ip netns del`: the name goes, and with nothing else holding it the namespace and
    // its veth pair.
    netns::delete_named(&ns).unwrap();
    let veth = format!("vh-{ns}");
    let gone = wait_until(READY, || {
        lab.edge.run({
            let veth = veth.clone();
            move || nix::net::if_::if_nametoindex(veth.as_str()).is_err()
        })
    });
    assert!(gone, "{veth} outlived its namespace");
    for &(proto, addr) in &cases {
        assert_eq!(who(&lab, proto, addr), "cloud", "{addr}: namespace gone");
    }

    let out = lab.viscum_ok(&["ns", "add", &ns]);
    assert_eq!(
        out.matches(&format!("into namespace {ns} again")).count(),
        2,
        "{out}"
    );
    let _edge = IdentityServer::start(&ns, cloud.port(), "edge");
    wait_all(&lab, &cases, "edge", ASK * 4, "after ns add");
}

/// Daemon: the veth of one of its own services deleted: its traffic goes to the cloud at
/// once, and the daemon rebuilds the namespace, restarts the service and serves again.
#[test]
fn the_daemon_rebuilds_a_service_whose_veth_vanished() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let svc = lab.service_ns_name();
    let _cloud = IdentityServer::start(lab.cloud.name(), 8080, "cloud");
    write_config(&files, Some((&svc, 8080)));
    let daemon = start_daemon(&lab, &files, &[]);
    daemon.wait_redirected(&svc, REACT);
    let cases: Vec<(Proto, SocketAddr)> = lab
        .cloud_addrs(8080)
        .into_iter()
        .map(|a| (Proto::Tcp, a))
        .collect();
    wait_all(&lab, &cases, "edge", REACT, "served by the daemon");

    delete_edge_link(&lab, &format!("vh-{svc}"));
    for &(proto, addr) in &cases {
        let got = who(&lab, proto, addr);
        assert!(got == "cloud" || got == "edge", "{addr}: {got}");
    }
    wait_all(
        &lab,
        &cases,
        "edge",
        REACT,
        "after the daemon rebuilt the service",
    );
    assert!(
        daemon.log().contains("rebuilding its namespace"),
        "{}",
        daemon.log()
    );
}

// ----- item 11: `viscum ns add` under `ip netns exec` -----------------------------------

/// Is `/run/netns/NAME` a mount point (a live namespace) in this process's mount namespace?
fn mounted(name: &str) -> bool {
    let want = format!(" /run/netns/{name} ");
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.contains(&want))
}

/// `ip netns exec EDGE viscum ns add NAME` runs viscum in a private mount namespace: the
/// namespace must still outlive the command (usable afterwards, deletable), and nothing is
/// left behind by `ns del`, from inside or outside.
#[test]
fn ns_add_under_ip_netns_exec_outlives_the_command() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let bin = viscum_tests::lab::viscum_bin();
    let ip_netns_exec = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", lab.edge.name()])
            .arg(&bin)
            .arg("--bpffs")
            .arg(lab.bpffs.path())
            .args(args)
            .output()
            .expect("run ip (iproute2)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let ns = lab.service_ns_name();
    let (ok, out) = ip_netns_exec(&["ns", "add", &ns]);
    assert!(ok, "{out}");
    assert!(
        mounted(&ns),
        "/run/netns/{ns} is not a live namespace after the command"
    );
    assert!(netns::named_exists(&ns));
    // Usable: the namespace has its veth, and serves through a redirect.
    assert_eq!(lab.service_ns_info(&ns)["host_veth"], format!("vh-{ns}"));
    lab.viscum_ok(&["attach", "lan0"]);
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let _edge = IdentityServer::start(&ns, cloud.port(), "edge");
    let [v4, v6] = lab.cloud_addrs(cloud.port());
    for addr in [v4, v6] {
        lab.viscum_ok(&["redirect", "add", &url(Proto::Tcp, addr), "--ns", &ns]);
    }
    wait_all(
        &lab,
        &[(Proto::Tcp, v4), (Proto::Tcp, v6)],
        "edge",
        ASK * 4,
        "served",
    );
    drop(_edge);

    let (ok, out) = ip_netns_exec(&["ns", "del", &ns]);
    assert!(ok, "{out}");
    assert!(
        fs::symlink_metadata(format!("/run/netns/{ns}")).is_err(),
        "/run/netns/{ns} left behind"
    );
    assert!(!mounted(&ns));
}

/// A stale `/run/netns/NAME` (an empty file, as `ip netns exec viscum ns add` of older
/// versions left) neither blocks `ns add` nor `ns del`.
#[test]
fn a_stale_namespace_file_blocks_nothing() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let ns = lab.service_ns_name();
    let stale = PathBuf::from(format!("/run/netns/{ns}"));
    let make_stale = || {
        fs::File::create(&stale).unwrap();
        fs::set_permissions(&stale, fs::Permissions::from_mode(0o000)).unwrap();
    };

    make_stale();
    assert!(!netns::named_exists(&ns), "a stale file is no namespace");
    let out = lab.viscum_ok(&["ns", "del", &ns]);
    assert!(out.contains("stale"), "{out}");
    assert!(fs::symlink_metadata(&stale).is_err());

    make_stale();
    lab.viscum_ok(&["ns", "add", &ns]);
    assert!(mounted(&ns));
    lab.viscum_ok(&["ns", "del", &ns]);
    assert!(fs::symlink_metadata(&stale).is_err());
    // Nothing there at all: an error, and still no debris.
    let err = lab.viscum_err(&["ns", "del", &ns]);
    assert!(err.contains("does not exist"), "{err}");
}

/// `viscum ns del` removes only namespaces `viscum ns add` made: a namespace made with
/// `ip netns add` (here: one of the lab's own) is refused with a clear error and left as it
/// was, interfaces included.
#[test]
fn ns_del_leaves_foreign_namespaces_alone() {
    if viscum_tests::skip_unless_root() {
        return;
    }
    let lab = viscum_tests::Lab::new();
    let foreign = lab.client.name().to_owned();
    // Lab names are service-name shaped, so only ownership can refuse it.
    let err = lab.viscum_err(&["ns", "del", &foreign]);
    assert!(err.contains("was not made by `viscum ns add`"), "{err}");
    assert!(
        viscum::netns::named_exists(&foreign),
        "the namespace must survive"
    );
    let links = lab.client.block_on(|| async {
        let h = viscum::netns::handle_here().await.unwrap();
        viscum::netns::list_links(&h).await.unwrap()
    });
    assert!(links.iter().any(|l| l.name == "eth0"), "{links:?}");
}

/// A command run outside the namespace the instance is attached in (its `--bpffs` is
/// reachable from any namespace, its interfaces are not) says so, instead of calling the
/// interface gone: `stats` warns and shows the attachment as in another namespace, with an
/// interface of the same name in the wrong namespace too. In the right namespace, no warning,
/// and an interface really deleted still reads as gone.
#[test]
fn a_command_in_another_namespace_says_so() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    lab.viscum_ok(&["attach", "lan0"]);
    let elsewhere = |ns: &str| {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(viscum_tests::lab::viscum_bin())
            .arg("--bpffs")
            .arg(lab.bpffs.path())
            .args(["stats"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The client namespace has no lan0; another has one, at the edge's lan0's very index
    // (indexes are per namespace).
    let other = Netns::create(&unique_name("vt")).unwrap();
    let name = other.name().to_owned();
    let index = lab.edge_ifindex("lan0");
    viscum_tests::block_on(async move {
        let h = netns::handle_in(&name).await.unwrap();
        netns::create_veth_indexed(&h, "lan0", index, "lan0p", &name, index + 1000, None)
            .await
            .unwrap();
    });
    for ns in [lab.client.name(), other.name()] {
        let (stdout, stderr) = elsewhere(ns);
        assert!(
            stderr.contains("attached to lan0 in another network namespace"),
            "{ns}: {stderr}"
        );
        assert!(
            stdout.contains("lan0: attached in another network namespace"),
            "{ns}: {stdout}"
        );
    }
    let (stdout, stderr) = elsewhere(lab.edge.name());
    assert!(!stderr.contains("another network namespace"), "{stderr}");
    assert!(stdout.contains("attached to: lan0"), "{stdout}");
    delete_edge_link(&lab, "lan0");
    let (stdout, stderr) = elsewhere(lab.edge.name());
    assert!(!stderr.contains("another network namespace"), "{stderr}");
    assert!(
        stdout.contains("lan0: missing (interface gone)"),
        "{stdout}"
    );
}
