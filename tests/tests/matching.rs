//! Richer matching with real traffic: destination prefixes (longest wins, exact beats any
//! prefix), port ranges, source-restricted entries, and their precedence.

use std::{net::SocketAddr, time::Duration};

use viscum_tests::{IdentityServer, Lab, Proto, ask, skip_unless_root};

const TIMEOUT: Duration = Duration::from_secs(3);

fn who(lab: &Lab, proto: Proto, addr: SocketAddr) -> String {
    ask(lab.client.name(), proto, addr, TIMEOUT).unwrap_or_else(|e| panic!("{proto:?} {addr}: {e}"))
}

#[test]
fn prefixes_ranges_and_sources_with_precedence() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    lab.viscum_ok(&["attach", "lan0"]);
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let p = cloud.port();
    let [v4, v6] = lab.cloud_addrs(p);
    let (wide, narrow, exact, subs) = (
        lab.service_ns_name(),
        lab.service_ns_name(),
        lab.service_ns_name(),
        lab.service_ns_name(),
    );
    let mut servers = Vec::new();
    for (ns, id) in [
        (&wide, "wide"),
        (&narrow, "narrow"),
        (&exact, "exact"),
        (&subs, "subscribers"),
    ] {
        lab.viscum_ok(&["ns", "add", ns]);
        servers.push(IdentityServer::start(ns, p, id));
    }
    let add = |m: &str, ns: &str| {
        lab.viscum_ok(&["redirect", "add", m, "--ns", ns, "--learn-ms", "0"]);
    };

    // A destination prefix, IPv4 and IPv6: the namespace answers for the whole prefix.
    add(&format!("tcp://198.51.100.0/24:{p}"), &wide);
    add(&format!("tcp://[2001:db8:f::]/64:{p}"), &wide);
    add(&format!("udp://198.51.100.0/24:{p}"), &wide);
    assert_eq!(who(&lab, Proto::Tcp, v4), "wide");
    assert_eq!(who(&lab, Proto::Tcp, v6), "wide");
    assert_eq!(who(&lab, Proto::Udp, v4), "wide");
    assert_eq!(who(&lab, Proto::Udp, v6), "cloud", "no UDP IPv6 entry");

    // The longest prefix wins...
    add(&format!("tcp://198.51.100.0/25:{p}"), &narrow);
    assert_eq!(who(&lab, Proto::Tcp, v4), "narrow");
    // ...and an exact entry beats every prefix.
    add(&format!("tcp://198.51.100.7:{p}"), &exact);
    assert_eq!(who(&lab, Proto::Tcp, v4), "exact");
    lab.viscum_ok(&["redirect", "del", &format!("tcp://198.51.100.7:{p}")]);
    assert_eq!(
        who(&lab, Proto::Tcp, v4),
        "narrow",
        "back to the longest prefix"
    );

    // A source restriction that does not cover the client: the next rule applies.
    add(
        &format!("tcp://198.51.100.0/25:{p}?from=192.0.2.128/25"),
        &subs,
    );
    assert_eq!(who(&lab, Proto::Tcp, v4), "narrow");
    // One that covers it wins over the unrestricted rule of the same prefix.
    lab.viscum_ok(&[
        "redirect",
        "add",
        &format!("tcp://198.51.100.0/25:{p}"),
        "--from",
        "192.0.2.0/28",
        "--ns",
        &subs,
    ]);
    assert_eq!(who(&lab, Proto::Tcp, v4), "subscribers");
    // A match that exists only for some clients, named without them: no such entry, and the
    // error names the entries of that match (changing nothing).
    let only = format!("tcp://198.51.100.0/25:{}", p ^ 1);
    lab.viscum_ok(&[
        "redirect",
        "add",
        &only,
        "--from",
        "192.0.2.0/28",
        "--ns",
        &subs,
    ]);
    let err = lab.viscum_err(&["redirect", "del", &only]);
    assert!(
        err.contains(&format!("{only}?from=192.0.2.0/28")) && err.contains("give its --from"),
        "{err}"
    );
    lab.viscum_ok(&["redirect", "del", &only, "--from", "192.0.2.0/28"]);
    assert_eq!(who(&lab, Proto::Tcp, v4), "subscribers");
    lab.viscum_ok(&[
        "redirect",
        "del",
        &format!("tcp://198.51.100.0/25:{p}"),
        "--from",
        "192.0.2.0/28",
    ]);
    assert_eq!(who(&lab, Proto::Tcp, v4), "narrow");

    // Port ranges: in range at the edge, out of range to the cloud.
    let other = IdentityServer::start(lab.cloud.name(), 0, "cloud-other");
    let q = other.port();
    let _edge_other = IdentityServer::start(&exact, q, "range");
    let (lo, hi) = (q.saturating_sub(5).max(1), q.saturating_add(5));
    add(&format!("tcp://[2001:db8:f::7]:{lo}-{hi}"), &exact);
    let [_, v6q] = lab.cloud_addrs(q);
    assert_eq!(who(&lab, Proto::Tcp, v6q), "range");
    if !(lo..=hi).contains(&p) {
        assert_eq!(
            who(&lab, Proto::Tcp, v6),
            "wide",
            "port {p} is outside {lo}-{hi}"
        );
    }
    let [v4q, _] = lab.cloud_addrs(q);
    assert_eq!(
        who(&lab, Proto::Tcp, v4q),
        "cloud-other",
        "no IPv4 rule covers port {q}"
    );

    // The list shows every rule, and deleting them all restores the cloud.
    let list: serde_json::Value =
        serde_json::from_str(&lab.viscum_ok(&["redirect", "list", "--json"])).unwrap();
    let matches: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["match"].as_str().unwrap().to_string())
        .collect();
    assert!(
        matches.contains(&format!("tcp://198.51.100.0/25:{p}?from=192.0.2.128/25")),
        "{matches:?}"
    );
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|e| e["packets"].as_u64().unwrap() > 0)
    );
    for m in matches {
        lab.viscum_ok(&["redirect", "del", &m]);
    }
    assert_eq!(who(&lab, Proto::Tcp, v4), "cloud");
    assert_eq!(who(&lab, Proto::Tcp, v6), "cloud");
    // Every local route went with the last rule that needed it.
    let ns: serde_json::Value =
        serde_json::from_str(&lab.viscum_ok(&["ns", "list", "--json"])).unwrap();
    for n in ns.as_array().unwrap() {
        assert_eq!(n["local_routes"], serde_json::json!([]), "{n}");
    }
}
