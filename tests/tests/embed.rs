//! The embedding API (`viscum::embed`) through its example, `viscum-user/examples/embed.rs`:
//! the example's own `up` and `down` run inside the lab's edge namespace, and a real client
//! is served by the edge copy while the redirect is in place, and by the cloud before and
//! after.

use std::time::Duration;

use viscum_tests::{IdentityServer, Lab, Proto, ask, skip_unless_root, wait_until};

#[path = "../../viscum-user/examples/embed.rs"]
#[allow(dead_code, reason = "the example's main is not run here")]
mod example;

const TIMEOUT: Duration = Duration::from_secs(3);

#[test]
fn the_example_redirects_to_the_edge_and_removing_restores_the_cloud() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let ns = lab.service_ns_name();
    let [v4, _] = lab.cloud_addrs(cloud.port());
    let who = || ask(lab.client.name(), Proto::Tcp, v4, TIMEOUT).unwrap();
    assert_eq!(who(), "cloud", "before the example ran");

    let opts = example::parse_args(
        [
            "--bpffs",
            lab.bpffs.path().to_str().unwrap(),
            "--iface",
            lab.lan_if(),
            "--ns",
            &ns,
            "--match",
            &format!("tcp://{v4}"),
        ]
        .map(String::from),
    )
    .unwrap();
    let up = opts.clone();
    let added = lab
        .edge
        .block_on(move || async move { example::up(&up).await })
        .unwrap_or_else(|e| panic!("example up: {e}"));
    assert_eq!(added.len(), 1, "{added:?}");
    assert_eq!(added[0].to_string(), format!("tcp://{v4}"));

    // The edge copy, in the namespace the example made.
    let edge = IdentityServer::start(&ns, cloud.port(), "edge");
    assert_eq!(who(), "edge", "with the example's redirect");
    assert!(edge.tcp_hits() >= 1);
    // The CLI sees what the library made: one instance, two ways in.
    let list = lab.viscum_ok(&["redirect", "list"]);
    assert!(
        list.contains(&format!("tcp://{v4}")) && list.contains("nat"),
        "{list}"
    );

    let down = opts.clone();
    let gone = added.clone();
    lab.edge
        .block_on(move || async move { example::down(&down, &gone, Duration::ZERO).await })
        .unwrap_or_else(|e| panic!("example down: {e}"));
    assert_eq!(who(), "cloud", "after the example removed its redirect");
    assert!(
        wait_until(TIMEOUT, || !viscum::netns::named_exists(&ns)),
        "namespace {ns} still exists"
    );
    assert!(
        !lab.bpffs.path().join("prog_ingress").exists(),
        "pins left behind"
    );
}

#[test]
fn bad_specs_are_refused_with_every_problem_and_change_nothing() {
    use viscum::embed::{RedirectSpec, SpecFields, Target};
    let fields = SpecFields {
        matches: vec!["tcp://198.51.100.7:70000".into()],
        nat_to: Some("nope".into()),
        mirror: true,
        ..SpecFields::default()
    };
    let err = RedirectSpec::new(&fields, Target::Namespace("x".into())).unwrap_err();
    let text = err.to_string();
    for want in ["port '70000'", "--nat-to: 'nope'", "mirror and NAT"] {
        assert!(text.contains(want), "{want:?} not in {text}");
    }
}
