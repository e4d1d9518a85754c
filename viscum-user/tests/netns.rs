//! Privileged tests of `viscum::netns` against the real kernel.
//!
//! Every namespace is uniquely named from the pid and a counter and removed on drop, panics
//! included (the guards of `viscum_lab`, shared with the integration tests and the lab). The service namespace work runs inside a namespace the test created (standing in
//! for the edge box), so nothing is added to the machine's own namespace. `ip` is run only to
//! check the results from the outside. Run with `--test-threads=1`; skipped when not root.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use viscum::netns::{self, NetnsError};
use viscum_lab::{Netns, skip_unless_root, unique_name};

/// `ip ARGS`, asserting success; returns stdout.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn named_namespace_lifecycle() {
    if skip_unless_root() {
        return;
    }
    let name = unique_name("vt");
    let _name_ns = Netns::adopt(&name);

    netns::create_named(&name).unwrap();
    assert!(netns::named_exists(&name));
    assert!(netns::list_named().unwrap().contains(&name));
    assert!(matches!(
        netns::create_named(&name),
        Err(NetnsError::NamespaceExists { .. })
    ));

    // iproute2 sees it as its own.
    ip(&["netns", "exec", &name, "true"]);

    // The thread really is elsewhere, and the caller is not.
    let here = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let there = netns::in_netns(&name, || {
        std::fs::read_link("/proc/thread-self/ns/net").unwrap()
    })
    .unwrap();
    assert_ne!(here, there);
    assert_eq!(
        here,
        std::fs::read_link("/proc/thread-self/ns/net").unwrap()
    );
    // ... and by path as well.
    let by_path = netns::in_netns_path(
        &std::path::Path::new(netns::NETNS_RUN_DIR).join(&name),
        || std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
    )
    .unwrap();
    assert_eq!(by_path, there);

    // Sysctls are per namespace.
    netns::sysctl_set(Some(&name), "net/ipv4/ip_forward", "1").unwrap();
    assert_eq!(
        netns::sysctl_get(Some(&name), "net.ipv4.ip_forward").unwrap(),
        "1"
    );
    assert_eq!(
        ip(&[
            "netns",
            "exec",
            &name,
            "cat",
            "/proc/sys/net/ipv4/ip_forward"
        ])
        .trim(),
        "1"
    );

    netns::delete_named(&name).unwrap();
    assert!(!netns::named_exists(&name));
    assert_eq!(
        netns::delete_named(&name).unwrap_err().to_string(),
        format!("namespace {name} does not exist")
    );
}

#[test]
fn links_addresses_routes() {
    if skip_unless_root() {
        return;
    }
    let a = unique_name("vt");
    let a_ns = Netns::adopt(&a);
    let b = unique_name("vt");
    let _b_ns = Netns::adopt(&b);
    netns::create_named(&a).unwrap();
    netns::create_named(&b).unwrap();

    let b2 = b.clone();
    a_ns.block_on(move || async move {
        let h = netns::handle_here().await.unwrap();
        let err = netns::link_by_name(&h, "eth9").await.unwrap_err();
        assert_eq!(err.to_string(), "interface eth9 does not exist");

        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        netns::create_veth(&h, "va", "vb", &b2, Some(mac))
            .await
            .unwrap();
        let va = netns::link_by_name(&h, "va").await.unwrap();
        assert_eq!(va.kind.as_deref(), Some("veth"));
        assert!(!va.up);
        assert_eq!(netns::link_by_index(&h, va.index).await.unwrap().name, "va");
        netns::set_up(&h, va.index).await.unwrap();
        assert!(netns::link_by_name(&h, "va").await.unwrap().up);

        // The peer is in b, with the MAC asked for, and its IFLA_LINK is va's index.
        let hb = netns::handle_in(&b2).await.unwrap();
        let vb = netns::link_by_name(&hb, "vb").await.unwrap();
        assert_eq!(vb.mac, Some(mac));
        assert_eq!(vb.peer_index, Some(va.index));
        assert!(matches!(
            netns::link_by_name(&h, "vb").await,
            Err(NetnsError::UnknownInterface { .. })
        ));

        netns::add_address(&h, va.index, "10.77.0.1".parse().unwrap(), 24)
            .await
            .unwrap();
        netns::add_address(&h, va.index, "2001:db8:77::1".parse().unwrap(), 64)
            .await
            .unwrap();
        let addrs = netns::list_addresses(&h, Some(va.index)).await.unwrap();
        assert!(
            addrs
                .iter()
                .any(|x| x.addr == "10.77.0.1".parse::<IpAddr>().unwrap())
        );
        assert!(
            addrs
                .iter()
                .any(|x| x.addr == "2001:db8:77::1".parse::<IpAddr>().unwrap())
        );

        // A gateway outside every connected subnet needs `onlink`, added on the retry.
        netns::add_route(
            &h,
            "10.99.0.0".parse().unwrap(),
            16,
            Some("192.168.250.1".parse().unwrap()),
            Some(va.index),
        )
        .await
        .unwrap();
        netns::add_route(&h, "10.98.0.0".parse().unwrap(), 16, None, Some(va.index))
            .await
            .unwrap();
        assert!(matches!(
            netns::add_route(&h, "10.97.0.1".parse().unwrap(), 16, None, Some(va.index)).await,
            Err(NetnsError::HostBitsSet { .. })
        ));

        // Local routes: idempotent add, tolerant delete, and the kernel's own are not listed.
        let lo = netns::link_by_name(&h, "lo").await.unwrap();
        netns::set_up(&h, lo.index).await.unwrap();
        assert_eq!(netns::list_local_routes(&h).await.unwrap(), vec![]);
        let cloud: IpAddr = "198.51.100.7".parse().unwrap();
        let cloud6: IpAddr = "2001:db8::7".parse().unwrap();
        netns::add_local_route(&h, cloud, 32).await.unwrap();
        netns::add_local_route(&h, cloud, 32).await.unwrap();
        netns::add_local_route(&h, cloud6, 128).await.unwrap();
        netns::add_local_route(&h, "203.0.113.0".parse().unwrap(), 24)
            .await
            .unwrap();
        assert_eq!(
            netns::list_local_routes(&h).await.unwrap(),
            vec![
                (cloud, 32),
                ("203.0.113.0".parse().unwrap(), 24),
                (cloud6, 128)
            ]
        );
        netns::del_local_route(&h, cloud, 32).await.unwrap();
        netns::del_local_route(&h, cloud, 32).await.unwrap();
        netns::del_local_route(&h, cloud6, 128).await.unwrap();
        // Our delete never takes the kernel's local route of an assigned address.
        netns::del_local_route(&h, "10.77.0.1".parse().unwrap(), 32)
            .await
            .unwrap();
        assert_eq!(
            netns::list_local_routes(&h).await.unwrap(),
            vec![("203.0.113.0".parse().unwrap(), 24)]
        );

        netns::delete_link(&h, va.index).await.unwrap();
        assert!(matches!(
            netns::link_by_index(&hb, vb.index).await,
            Err(NetnsError::UnknownIfindex { .. })
        ));
        assert!(matches!(
            netns::delete_link(&h, va.index).await,
            Err(NetnsError::UnknownIfindex { .. })
        ));
    });

    let routes = ip(&["-n", &a, "route", "show", "table", "local"]);
    assert!(
        routes.contains("local 203.0.113.0/24 dev lo proto 190 scope host"),
        "{routes}"
    );
    assert!(!routes.contains("198.51.100.7"), "{routes}");
}

#[test]
fn service_namespace_end_to_end() {
    if skip_unless_root() {
        return;
    }
    let svc = unique_name("vt");
    let _svc_ns = Netns::adopt(&svc);
    let svc2 = unique_name("vt");
    let _svc2_ns = Netns::adopt(&svc2);
    // Tracked last, so it is deleted first: that takes the host veths with it.
    let edge = unique_name("vt");
    let edge_ns = Netns::adopt(&edge);
    netns::create_named(&edge).unwrap();

    let (s1, s2) = (svc.clone(), svc2.clone());
    let info = edge_ns.block_on(move || async move {
        assert!(matches!(
            netns::service_ns_add("Foo!").await,
            Err(NetnsError::InvalidServiceName { .. })
        ));

        let info = netns::service_ns_add(&s1).await.unwrap();
        assert_eq!(info.name, s1);
        assert_eq!(info.host_veth, format!("vh-{s1}"));
        assert_eq!(info.ns_veth, "eth0");
        assert_eq!(info.ns_mac, netns::service_mac(&s1));
        // A fresh edge namespace: the first /30 of the pool.
        assert_eq!(info.host_addr, "169.254.128.1/30");
        assert_eq!(info.ns_addr, "169.254.128.2/30");
        assert!(info.local_routes.is_empty());

        assert!(matches!(
            netns::service_ns_add(&s1).await,
            Err(NetnsError::NamespaceExists { .. })
        ));

        // The second one gets the next /30.
        let info2 = netns::service_ns_add(&s2).await.unwrap();
        assert_eq!(info2.host_addr, "169.254.128.5/30");
        assert_ne!(info2.ns_mac, info.ns_mac);

        let listed: Vec<String> = netns::service_ns_list()
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.name)
            .collect();
        let mut expected = vec![s1.clone(), s2.clone()];
        expected.sort();
        assert_eq!(listed, expected);
        assert_eq!(
            netns::service_ns_by_host_ifindex(info.host_ifindex)
                .await
                .unwrap(),
            Some(s1.clone())
        );
        assert_eq!(netns::service_ns_by_host_ifindex(1).await.unwrap(), None);
        assert_eq!(
            netns::service_ns_by_host_ifindex(999_999).await.unwrap(),
            None
        );

        assert_eq!(
            netns::sysctl_get(Some(&s1), "net/ipv6/ip_nonlocal_bind").unwrap(),
            "1"
        );

        let cloud: IpAddr = "198.51.100.7".parse().unwrap();
        let cloud6: IpAddr = "2001:db8::7".parse().unwrap();
        netns::service_ns_add_local(&s1, cloud, 32).await.unwrap();
        netns::service_ns_add_local(&s1, cloud, 32).await.unwrap();
        netns::service_ns_add_local(&s1, cloud6, 128).await.unwrap();
        netns::service_ns_add_local(&s1, "203.0.113.0".parse().unwrap(), 24)
            .await
            .unwrap();
        assert_eq!(
            netns::service_ns_get(&s1).await.unwrap().local_routes,
            vec!["198.51.100.7/32", "203.0.113.0/24", "2001:db8::7/128"]
        );
        netns::service_ns_del_local(&s1, "203.0.113.0".parse().unwrap(), 24)
            .await
            .unwrap();
        netns::service_ns_del_local(&s1, "203.0.113.0".parse().unwrap(), 24)
            .await
            .unwrap();

        // Route the cloud addresses from the edge into the service namespace, as the
        // classifier will redirect them, to prove the namespace answers as them.
        let host = netns::handle_here().await.unwrap();
        netns::add_route(
            &host,
            cloud,
            32,
            Some("169.254.128.2".parse().unwrap()),
            Some(info.host_ifindex),
        )
        .await
        .unwrap();
        netns::add_route(
            &host,
            cloud6,
            128,
            Some("fe80::2".parse().unwrap()),
            Some(info.host_ifindex),
        )
        .await
        .unwrap();

        // A server on the dual-stack wildcard address inside the service namespace reports
        // which local address each connection arrived at.
        let listener = netns::in_netns(&s1, || {
            TcpListener::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0)).unwrap()
        })
        .unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let local = conn.local_addr().unwrap().ip().to_canonical().to_string();
                let _ = conn.write_all(local.as_bytes());
            }
        });
        for (target, expect) in [
            (
                IpAddr::V4("169.254.128.2".parse().unwrap()),
                "169.254.128.2",
            ),
            (cloud, "198.51.100.7"),
            (cloud6, "2001:db8::7"),
        ] {
            let mut conn =
                TcpStream::connect_timeout(&SocketAddr::new(target, port), Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connect {target}: {e}"));
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut answer = String::new();
            conn.read_to_string(&mut answer).unwrap();
            assert_eq!(answer, expect);
            // Sent from the cloud address itself, as a client expects.
            assert_eq!(conn.peer_addr().unwrap().ip(), target);
        }
        info
    });

    // Seen from iproute2.
    ip(&["netns", "exec", &svc, "true"]);
    let host_addrs = ip(&["-n", &edge, "addr", "show", "dev", &info.host_veth]);
    assert!(host_addrs.contains("inet 169.254.128.1/30"), "{host_addrs}");
    assert!(host_addrs.contains("inet6 fe80::1/64"), "{host_addrs}");
    let eth0 = ip(&["-n", &svc, "addr", "show", "dev", "eth0"]);
    assert!(eth0.contains(&netns::format_mac(&info.ns_mac)), "{eth0}");
    assert!(eth0.contains("inet 169.254.128.2/30"), "{eth0}");
    assert!(eth0.contains("inet6 fe80::2/64"), "{eth0}");
    assert!(eth0.contains("state UP"), "{eth0}");
    let v4_default = ip(&["-n", &svc, "-4", "route", "show", "default"]);
    assert!(
        v4_default.contains("default via 169.254.128.1 dev eth0"),
        "{v4_default}"
    );
    let v6_default = ip(&["-n", &svc, "-6", "route", "show", "default"]);
    assert!(
        v6_default.contains("default via fe80::1 dev eth0"),
        "{v6_default}"
    );
    let local = ip(&[
        "-n", &svc, "route", "show", "table", "local", "proto", "190",
    ]);
    assert_eq!(local.trim(), "local 198.51.100.7 dev lo scope host");
    let local6 = ip(&[
        "-n", &svc, "-6", "route", "show", "table", "local", "proto", "190",
    ]);
    assert!(local6.contains("local 2001:db8::7 dev lo"), "{local6}");

    let (s1, s2) = (svc.clone(), svc2.clone());
    edge_ns.block_on(move || async move {
        netns::service_ns_del(&s1).await.unwrap();
        assert!(!netns::named_exists(&s1));
        let host = netns::handle_here().await.unwrap();
        assert!(
            netns::link_by_name(&host, &format!("vh-{s1}"))
                .await
                .is_err()
        );
        assert_eq!(
            netns::service_ns_get(&s1).await.unwrap_err().to_string(),
            format!("namespace {s1} does not exist")
        );
        assert!(matches!(
            netns::service_ns_del(&s1).await,
            Err(NetnsError::UnknownNamespace { .. })
        ));

        // A half-gone namespace (its veth removed by hand) is still cleaned up by del.
        let vh2 = netns::link_by_name(&host, &format!("vh-{s2}"))
            .await
            .unwrap();
        netns::delete_link(&host, vh2.index).await.unwrap();
        assert!(matches!(
            netns::service_ns_get(&s2).await,
            Err(NetnsError::UnknownNamespace { .. })
        ));
        assert!(netns::service_ns_list().await.unwrap().is_empty());
        netns::service_ns_del(&s2).await.unwrap();
        assert!(!netns::named_exists(&s2));

        // Re-adding reuses the first /30 again: the kernel is the only state.
        let again = netns::service_ns_add(&s1).await.unwrap();
        assert_eq!(again.host_addr, "169.254.128.1/30");
        netns::service_ns_del(&s1).await.unwrap();
    });
}
