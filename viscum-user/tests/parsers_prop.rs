//! Property tests of the user-space parsers that read untrusted text: endpoint syntax
//! ([`Endpoint`], [`Match`], `--nat-to`), the TOML configuration ([`Config::parse`]) and the
//! control socket's request lines (each line is `serde_json::from_str::<Request>`, exactly as
//! the daemon's connection loop reads it).
//!
//! Properties: no input panics; what parses round-trips through its display form; what is
//! refused says why (a non-empty message; a configuration problem names its section and a
//! key that is in the text); a request line parses only to one of the five commands.
//!
//! Run: `cargo test -p viscum-user --test parsers_prop` (`PROPTEST_CASES=N` for more cases).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use viscum::{
    config::{Config, ConfigError},
    daemon::control::Request,
    endpoint::Endpoint,
    spec::{Match, parse_nat_to},
};

/// Cases per property: `PROPTEST_CASES`, else 2,048.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048)
}

/// Pieces endpoint strings are made of, right and wrong.
fn endpoint_text() -> impl Strategy<Value = String> {
    let scheme = prop::sample::select(vec!["tcp", "udp", "UDP", "Tcp", "sctp", "", "tcp:"]);
    let sep = prop::sample::select(vec!["://", "://", "://", ":/", "//", ""]);
    let host = prop_oneof![
        any::<[u8; 4]>().prop_map(|a| Ipv4Addr::from(a).to_string()),
        any::<[u16; 8]>().prop_map(|a| format!("[{}]", Ipv6Addr::from(a))),
        any::<[u16; 8]>().prop_map(|a| Ipv6Addr::from(a).to_string()),
        (any::<[u8; 4]>(), 0u8..40).prop_map(|(a, l)| format!("{}/{l}", Ipv4Addr::from(a))),
        (any::<[u16; 8]>(), 0u8..140).prop_map(|(a, l)| format!("[{}]/{l}", Ipv6Addr::from(a))),
        (any::<[u16; 8]>(), 0u8..140).prop_map(|(a, l)| format!("[{}/{l}]", Ipv6Addr::from(a))),
        "[a-z0-9.-]{0,20}",
        "\\PC{0,12}",
    ];
    let port = prop_oneof![
        Just(String::new()),
        any::<u32>().prop_map(|p| format!(":{}", p % 70_000)),
        (any::<u16>(), any::<u16>()).prop_map(|(a, b)| format!(":{a}-{b}")),
        prop::sample::select(vec![
            ":", ":0", ":+80", ":-1", ":80-", ":-80", ":1-1", ":65535"
        ])
        .prop_map(str::to_owned),
    ];
    let query = prop_oneof![
        Just(String::new()),
        (any::<[u8; 4]>(), 0u8..40).prop_map(|(a, l)| format!("?from={}/{l}", Ipv4Addr::from(a))),
        (any::<[u16; 8]>(), 0u8..140).prop_map(|(a, l)| format!("?from={}/{l}", Ipv6Addr::from(a))),
        "\\?[a-z=/.0-9]{0,12}",
    ];
    (scheme, sep, host, port, query).prop_map(|(s, p, h, o, q)| format!("{s}{p}{h}{o}{q}"))
}

/// A usable unicast address: what a single-address endpoint must accept.
fn usable_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (1u8..=223, any::<[u8; 3]>())
            .prop_filter("loopback", |(a, _)| *a != 127)
            .prop_map(|(a, [b, c, d])| IpAddr::V4(Ipv4Addr::new(a, b, c, d))),
        (0x2000u16..0x3fff, any::<[u16; 7]>()).prop_map(|(a, r)| IpAddr::V6(Ipv6Addr::new(
            a, r[0], r[1], r[2], r[3], r[4], r[5], r[6]
        ))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // No regression files next to the sources: a failure prints its minimal input.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Any endpoint-ish text: no panic; accepted endpoints keep their invariants and
    /// round-trip through `Display`; refusals say something.
    #[test]
    fn endpoint_text_never_panics_and_round_trips(s in endpoint_text()) {
        match s.parse::<Endpoint>() {
            Ok(e) => {
                let max = if e.addr.is_ipv4() { 32 } else { 128 };
                prop_assert!(e.prefix_len <= max, "{s}: prefix {}", e.prefix_len);
                prop_assert!(e.port != Some(0), "{s}: port 0 accepted");
                if let Some(end) = e.port_end {
                    prop_assert!(e.port.is_some_and(|p| p < end), "{s}: range {e:?}");
                }
                if let Some((src, _)) = e.source {
                    prop_assert_eq!(src.is_ipv4(), e.addr.is_ipv4());
                }
                let again = e.to_string().parse::<Endpoint>();
                prop_assert_eq!(again.as_ref().ok(), Some(&e), "{} -> {} -> {:?}", s, e, again);
            }
            Err(err) => prop_assert!(!err.to_string().trim().is_empty(), "{s}: empty error"),
        }
        // The match parser (addresses, then host names) must not panic either.
        match s.parse::<Match>() {
            Ok(m) => {
                let again = m.to_string().parse::<Match>();
                prop_assert_eq!(again.as_ref().ok(), Some(&m), "{} -> {} -> {:?}", s, m, again);
            }
            Err(err) => prop_assert!(!err.trim().is_empty(), "{s}: empty match error"),
        }
    }

    /// Arbitrary Unicode: no panic in any endpoint-syntax parser.
    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,64}") {
        let _ = s.parse::<Endpoint>();
        let _ = s.parse::<Match>();
        if let Err(e) = parse_nat_to(&s) {
            prop_assert!(!e.trim().is_empty());
        }
    }

    /// Every usable single address with any port, range and source restriction is accepted
    /// and reads back as itself.
    #[test]
    fn valid_endpoints_are_accepted(
        udp in any::<bool>(),
        addr in usable_addr(),
        ports in prop_oneof![
            Just(None),
            (1u16..=65535).prop_map(|p| Some((p, None))),
            (1u16..65535).prop_flat_map(|lo| (Just(lo), (lo + 1)..=65535))
                .prop_map(|(lo, hi)| Some((lo, Some(hi)))),
        ],
        from_len in prop::option::of(0u8..=32),
    ) {
        let host = match addr {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        let port = match ports {
            None => String::new(),
            Some((p, None)) => format!(":{p}"),
            Some((lo, Some(hi))) => format!(":{lo}-{hi}"),
        };
        let from = match (from_len, addr) {
            (None, _) => String::new(),
            // Prefixes without host bits: any length from the network's own up.
            (Some(l), IpAddr::V4(_)) => format!("?from=192.0.2.0/{}", 24 + l % 9),
            (Some(l), IpAddr::V6(_)) => format!("?from=2001:db8::/{}", 32 + l % 97),
        };
        let s = format!("{}://{host}{port}{from}", if udp { "udp" } else { "tcp" });
        let e = s.parse::<Endpoint>();
        prop_assert!(e.is_ok(), "{} refused: {:?}", s, e);
        let e = e.unwrap();
        prop_assert_eq!(e.addr, addr);
        prop_assert_eq!(e.port, ports.map(|p| p.0));
        prop_assert_eq!(e.to_string().parse::<Endpoint>().ok(), Some(e));
    }

    /// Control-socket request lines: arbitrary text and JSON-shaped lines never panic, and a
    /// line parses only to one of the five commands.
    #[test]
    fn control_request_lines(
        raw in "\\PC{0,80}",
        cmd in prop_oneof![
            prop::sample::select(vec!["status", "start", "stop", "restart", "reload", "Status",
                "explode", "", "reload "]).prop_map(str::to_owned),
            "[a-z-]{0,10}",
        ],
        service in prop::option::of(prop_oneof![Just(serde_json::json!("web")),
            Just(serde_json::json!(7)), Just(serde_json::json!(null)),
            Just(serde_json::json!(["a"])), "\\PC{0,12}".prop_map(serde_json::Value::from)]),
        extra in any::<bool>(),
    ) {
        let _ = serde_json::from_str::<Request>(&raw);
        let mut obj = serde_json::Map::new();
        obj.insert("cmd".into(), cmd.clone().into());
        if let Some(s) = service.clone() {
            obj.insert("service".into(), s);
        }
        if extra {
            obj.insert("extra".into(), true.into());
        }
        let line = serde_json::Value::Object(obj).to_string();
        match serde_json::from_str::<Request>(&line) {
            Ok(r) => {
                let known = ["status", "start", "stop", "restart", "reload"];
                prop_assert!(known.contains(&cmd.as_str()), "{line} parsed to {r:?}");
                let back = serde_json::to_string(&r).unwrap();
                prop_assert_eq!(serde_json::from_str::<Request>(&back).ok(), Some(r));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// Arbitrary text as a configuration: no panic; a refusal says what is wrong.
    #[test]
    fn config_arbitrary_text(s in "\\PC{0,200}") {
        if let Err(e) = Config::parse(&s) {
            prop_assert!(!e.to_string().trim().is_empty());
            prop_assert!(!e.problems().is_empty());
        }
    }

    /// Configurations assembled from right and wrong keys and values: no panic; an accepted
    /// one has what it was given; every problem of a refused one names its section and, when
    /// it is about one key, a key that is in the text.
    #[test]
    fn config_from_pieces(
        engine in prop::collection::vec(config_line(ENGINE_KEYS), 0..5),
        services in prop::collection::vec(prop::collection::vec(config_line(SERVICE_KEYS), 0..8), 0..4),
        with_engine in any::<bool>(),
    ) {
        let mut text = String::new();
        if with_engine {
            text.push_str("[engine]\n");
            for l in &engine {
                text.push_str(l);
                text.push('\n');
            }
        }
        for s in &services {
            text.push_str("[[service]]\n");
            for l in s {
                text.push_str(l);
                text.push('\n');
            }
        }
        match Config::parse(&text) {
            Ok(cfg) => {
                prop_assert_eq!(cfg.services.len(), services.len());
                for s in &cfg.services {
                    prop_assert!(!s.name.is_empty());
                }
            }
            Err(ConfigError::Invalid { problems, .. }) => {
                prop_assert!(!problems.is_empty());
                for p in &problems {
                    prop_assert!(!p.message.trim().is_empty(), "{p:?}");
                    prop_assert!(
                        p.scope == "file" || p.scope == "engine" || p.scope.starts_with("service"),
                        "{p:?}"
                    );
                    let key = p.field.split(['[', '.']).next().unwrap_or_default();
                    // A problem about a key names one in the text, or says it is missing; one
                    // about a combination of keys (field `mode`) names them in its message.
                    let missing = p.message.contains("missing") || p.message.contains("required");
                    let names_keys = ENGINE_KEYS
                        .iter()
                        .chain(SERVICE_KEYS)
                        .any(|(k, _)| p.message.contains(k) && text.contains(k));
                    prop_assert!(
                        key.is_empty() || text.contains(key) || missing || names_keys,
                        "{p:?} names no key of:\n{text}"
                    );
                }
            }
            Err(e) => prop_assert!(!e.problems().is_empty(), "{e}"),
        }
    }
}

const ENGINE_KEYS: &[(&str, &[&str])] = &[
    (
        "interfaces",
        &[
            "[\"br-lan\"]",
            "[]",
            "\"br-lan\"",
            "[1]",
            "[\"a/b\"]",
            "[\"\"]",
        ],
    ),
    (
        "bpffs",
        &["\"/sys/fs/bpf/viscum\"", "\"\"", "5", "\"relative\""],
    ),
    ("control", &["\"/run/viscum.sock\"", "\"\"", "[]"]),
    ("max_load", &["0.9", "-1.0", "2", "\"x\"", "nan"]),
    (
        "metrics",
        &["\"127.0.0.1:9310\"", "\"nope\"", "\"[::1]:0\"", "9310"],
    ),
    ("bogus", &["1"]),
];

const SERVICE_KEYS: &[(&str, &[&str])] = &[
    (
        "name",
        &[
            "\"web\"",
            "\"speedtest\"",
            "\"\"",
            "\"UPPER\"",
            "\"a/../b\"",
            "\"waytoolongname-x\"",
            "1",
        ],
    ),
    (
        "match",
        &[
            "[\"tcp://198.51.100.7:80\"]",
            "[\"udp://[2001:db8::7]:53\"]",
            "[\"tcp://1.2.3.4:0\"]",
            "[\"icmp://1.2.3.4\"]",
            "[]",
            "\"tcp://1.2.3.4:80\"",
            "[\"tcp://203.0.113.0/24:443\"]",
            "[\"tcp://alpr.example.net:443\"]",
            "[\"tcp://2001:db8::7:443\"]",
        ],
    ),
    (
        "command",
        &["[\"sleep\", \"1\"]", "[]", "\"sleep 1\"", "[1]"],
    ),
    (
        "user",
        &["\"nobody\"", "\"no-such-user-xyz\"", "\"root\"", "0"],
    ),
    ("env", &["{ KEY = \"value\" }", "{ KEY = 1 }", "[]"]),
    (
        "restart",
        &["\"on-failure\"", "\"always\"", "\"never\"", "\"sometimes\""],
    ),
    ("stop_grace_ms", &["5000", "-1", "\"5s\"", "0"]),
    ("drain_timeout_ms", &["10000", "-5", "1e3"]),
    (
        "from",
        &[
            "\"192.0.2.0/24\"",
            "\"2001:db8::/32\"",
            "\"nope\"",
            "\"192.0.2.0/33\"",
        ],
    ),
    (
        "nat_to",
        &[
            "\"10.0.0.5:8080\"",
            "\"10.0.0.5:0\"",
            "\"[2001:db8::5]:80\"",
            "\"x\"",
        ],
    ),
    ("anyip", &["true", "false", "1"]),
    ("mirror", &["true", "\"yes\""]),
    ("nat", &["true", "false"]),
    ("learn_ms", &["1000", "-1", "\"1s\""]),
    (
        "health",
        &[
            "{ tcp = 80 }",
            "{ tcp = 0 }",
            "{ interval_ms = -1 }",
            "{ bogus = 1 }",
            "5",
        ],
    ),
    (
        "limits",
        &[
            "{ memory = \"64M\" }",
            "{ memory = \"lots\" }",
            "{ cpu = 0.5, pids = 64 }",
            "{ cpu = -1 }",
        ],
    ),
    ("surprise", &["1"]),
];

fn config_line(
    keys: &'static [(&'static str, &'static [&'static str])],
) -> impl Strategy<Value = String> {
    (0..keys.len(), any::<prop::sample::Index>()).prop_map(move |(k, v)| {
        let (key, values) = keys[k];
        format!("{key} = {}", values[v.index(values.len())])
    })
}
