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

/// A service that answers every TCP connection on its port with "edge".
const EDGE_PY: &str = r#"
import socket, sys
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(16)
while True:
    c, _ = srv.accept()
    try:
        c.settimeout(2)
        c.recv(128)
        c.sendall(b"edge\n")
    except OSError:
        pass
    finally:
        c.close()
"#;

#[test]
fn a_supervised_service_is_redirected_while_healthy_without_the_daemon() {
    use std::os::unix::fs::PermissionsExt;

    use viscum::{config::Config, embed::Viscum};
    use viscum_tests::unique_name;

    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let port = cloud.port();
    let name = lab.service_ns_name();
    let [v4, _] = lab.cloud_addrs(port);
    // World-readable: the service runs as `nobody`; outside /tmp, which services get private.
    let dir =
        std::path::PathBuf::from("/var/tmp").join(format!("viscum-embed-{}", unique_name("t")));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = dir.join("edge.py");
    std::fs::write(&script, EDGE_PY).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = Config::parse(&format!(
        "[[service]]\nname = \"{name}\"\nmatch = [\"tcp://{v4}\"]\n\
         command = [\"/usr/bin/python3\", \"{}\", \"{port}\"]\ndrain_timeout_ms = 0\n\
         [service.health]\ntcp = {port}\ninterval_ms = 200\ntimeout_ms = 150\n",
        script.display()
    ))
    .unwrap();

    let bpffs = lab.bpffs.path().to_owned();
    let lan = lab.lan_if();
    let run_dir = dir.join("run");
    let client = lab.client.name().to_owned();
    let result = lab.edge.block_on(move || async move {
        let ask_now = |client: String| async move {
            tokio::task::spawn_blocking(move || {
                ask(&client, Proto::Tcp, v4, TIMEOUT).unwrap_or_else(|e| format!("error: {e}"))
            })
            .await
            .unwrap()
        };
        let viscum = Viscum::new(&bpffs).map_err(|e| e.to_string())?;
        viscum.attach(&[lan]).map_err(|e| e.to_string())?;
        let supervisor = viscum
            .supervise(&run_dir, config.services)
            .map_err(|e| e.to_string())?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !supervisor.status()[0].redirected {
            if std::time::Instant::now() >= deadline {
                return Err(format!("not redirected: {:?}", supervisor.status()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let healthy = ask_now(client.clone()).await;
        // Shedding takes the traffic back to the cloud without stopping the service.
        supervisor.shed(true);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while supervisor.status()[0].redirected && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let shed = ask_now(client.clone()).await;
        supervisor.stop().await;
        let stopped = ask_now(client).await;
        viscum.purge().map_err(|e| e.to_string())?;
        Ok((healthy, shed, stopped))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let (healthy, shed, stopped) = result.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        healthy, "edge",
        "a healthy supervised service serves the client"
    );
    assert_eq!(shed, "cloud", "while shedding, the cloud serves");
    assert_eq!(stopped, "cloud", "after stop, the cloud serves");
    assert!(
        wait_until(TIMEOUT, || !viscum::netns::named_exists(&name)),
        "stop left namespace {name}"
    );
}
