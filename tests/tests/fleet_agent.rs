//! The fleet agent end to end: `viscum run` with a `[fleet]` section in the lab's edge
//! namespace, against a real JetStream `nats-server` that the test starts in the lab's cloud
//! namespace with viscum-lab's `nats` fixture (so the box reaches it over its WAN, like a
//! real one).
//!
//! The operator's side (putting and deleting keys, uploading artifacts, reading status) is
//! played by the test through the same library (`viscum::fleet`), from a thread inside the
//! cloud namespace. Which copy serves a client is told by the identity protocol: the edge
//! copies answer their own identity, the cloud's server "cloud".
//!
//! Run with `--test-threads=1 --nocapture`.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;
use viscum::fleet::{
    artifact::sha256_hex,
    connect::{ConnectSettings, Fleet, connect},
    schema,
};
use viscum_lab::nats::{NatsOptions, NatsServer};
use viscum_tests::{
    IdentityServer, Lab,
    daemon::{Daemon, DaemonFiles, Service},
    guard::unique_name,
    lab::CLOUD_V4,
    skip_unless_root, tcp_ask, wait_until,
};

/// Bound of one client request.
const ASK: Duration = Duration::from_millis(500);
/// Bound for a change to reach a box and its service to come up healthy.
const CONVERGE: Duration = Duration::from_secs(30);
/// The NATS port the box dials.
const NATS_PORT: u16 = 4222;
/// Another port the same server store is served on while the box must not reach it.
const NATS_HIDDEN_PORT: u16 = 4223;

/// A JetStream server in the lab's cloud namespace on `CLOUD_V4:4222` (viscum-lab's fixture:
/// its store in a private directory that outlives restarts, killed on drop).
fn nats_in_cloud(lab: &Lab) -> NatsServer {
    NatsServer::start_in(
        lab.cloud.name(),
        IpAddr::V4(CLOUD_V4),
        &NatsOptions::default(),
    )
    .expect("start nats-server (cargo xtask setup installs it)")
}

/// Kills `server` and starts it again, with its store, listening on `port`.
fn restart_on(server: &mut NatsServer, port: u16) {
    let node = server.node();
    node.stop();
    node.set_client_port(port).expect("move the client port");
    node.start().expect("restart nats-server");
}

/// The operator: runs `f` with a fresh connection on a thread in the cloud namespace.
fn operator<T: Send + 'static, F: Future<Output = T>>(
    lab: &Lab,
    port: u16,
    f: impl FnOnce(Fleet) -> F + Send + 'static,
) -> T {
    lab.cloud.block_on(move || async move {
        let settings = ConnectSettings {
            servers: vec![format!("nats://{CLOUD_V4}:{port}")],
            name: "viscum-test-operator".into(),
            credentials: viscum::config::fleet::Credentials::None,
            tls: None,
            connect_timeout: Duration::from_secs(5),
            max_reconnect_delay: Duration::from_secs(1),
            inbox_prefix: None,
        };
        let fleet = connect(&settings, None).await.expect("operator connects");
        f(fleet).await
    })
}

/// Creates the three buckets.
fn create_buckets(lab: &Lab, port: u16) {
    operator(lab, port, |fleet| async move {
        create_buckets_with(&fleet.jetstream).await;
    });
}

async fn create_buckets_with(js: &async_nats::jetstream::Context) {
    use viscum::fleet::buckets;
    buckets::ensure_kv(js, schema::desired_bucket_config())
        .await
        .expect("create viscum_desired");
    buckets::ensure_kv(js, schema::status_bucket_config(schema::DEFAULT_STATUS_TTL))
        .await
        .expect("create viscum_status");
    buckets::ensure_object_store(js, schema::artifact_bucket_config())
        .await
        .expect("create viscum_artifacts");
}

/// Puts `value` under `key`; returns the revision.
fn put(lab: &Lab, port: u16, key: &str, value: String) -> u64 {
    let key = key.to_owned();
    operator(lab, port, move |fleet| async move {
        let kv = fleet.desired().await.unwrap();
        kv.put(&key, value.into()).await.expect("put")
    })
}

/// Deletes (`purge` false) or purges `key`.
fn remove(lab: &Lab, port: u16, key: &str, purge: bool) {
    let key = key.to_owned();
    operator(lab, port, move |fleet| async move {
        let kv = fleet.desired().await.unwrap();
        if purge {
            kv.purge(&key).await.expect("purge");
        } else {
            kv.delete(&key).await.expect("delete");
        }
    });
}

/// The box's status, if it has one.
fn status(lab: &Lab, box_id: &str) -> Option<Value> {
    let key = schema::status_key(box_id);
    operator(lab, NATS_PORT, move |fleet| async move {
        let kv = fleet.status().await.ok()?;
        let v = kv.get(&key).await.ok()??;
        serde_json::from_slice(&v).ok()
    })
}

/// One `[[service]]` block as a desired-state value.
fn value(service: &Service) -> String {
    #[derive(serde::Serialize)]
    struct One<'a> {
        service: [&'a Service; 1],
    }
    toml::to_string(&One { service: [service] }).unwrap()
}

/// Who answers a new connection to the cloud address on `port` right now.
fn who(lab: &Lab, port: u16) -> String {
    tcp_ask(
        lab.client.name(),
        SocketAddr::new(IpAddr::V4(CLOUD_V4), port),
        ASK,
    )
    .unwrap_or_else(|e| format!("error: {e}"))
}

fn wait_for(lab: &Lab, daemon: &Daemon, port: u16, want: &str) -> Duration {
    let start = Instant::now();
    let mut last = String::new();
    let ok = wait_until(CONVERGE, || {
        last = who(lab, port);
        last == want
    });
    assert!(
        ok,
        "port {port}: wanted {want:?} within {CONVERGE:?}, last answer {last:?}\n{}",
        daemon.log()
    );
    start.elapsed()
}

/// The daemon's file: the lab's engine, no local services, and `[fleet]`.
fn write_config(files: &DaemonFiles, box_id: &str, checkpoint: &Path) {
    let engine = files.config().to_toml();
    files.write_raw(&format!(
        "{engine}\n[fleet]\nservers = [\"nats://{CLOUD_V4}:{NATS_PORT}\"]\nbox = \"{box_id}\"\n\
         groups = [\"lab\"]\nstatus_interval_ms = 500\ncheckpoint = \"{}\"\n",
        checkpoint.display()
    ));
}

fn wait_revision(lab: &Lab, daemon: &Daemon, box_id: &str, revision: u64) -> Value {
    let mut last = None;
    let ok = wait_until(CONVERGE, || {
        last = status(lab, box_id);
        last.as_ref()
            .and_then(|s| s["revision"].as_u64())
            .is_some_and(|r| r >= revision)
    });
    assert!(
        ok,
        "box {box_id} did not report revision {revision}: {last:?}\n{}",
        daemon.log()
    );
    last.unwrap()
}

/// Put a group service: the box serves it at the edge, with its status saying so; delete
/// it: the cloud again. Then, with the box cut off (the server moved to a port the box does
/// not dial), one service is purged, one deleted and one added; once the server is back
/// where the box looks, the box converges to exactly that. Last, the daemon restarts with
/// no server at all and serves its checkpoint.
#[test]
fn group_services_follow_the_desired_state() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let checkpoint = files.dir().join("checkpoint.json");
    let (pa, pb, pc) = (8091u16, 8092u16, 8093u16);
    let _cloud: Vec<_> = [pa, pb, pc]
        .iter()
        .map(|p| IdentityServer::start(lab.cloud.name(), *p, "cloud"))
        .collect();
    let mut server = nats_in_cloud(&lab);
    create_buckets(&lab, NATS_PORT);
    let box_id = unique_name("box");
    write_config(&files, &box_id, &checkpoint);
    let daemon = Daemon::start(&lab, &files);

    let (a, b, c) = (
        lab.service_ns_name(),
        lab.service_ns_name(),
        lab.service_ns_name(),
    );
    let key = |name: &str| format!("group.lab.svc.{name}");
    let rev = put(
        &lab,
        NATS_PORT,
        &key(&a),
        value(&files.service(&a, pa.into(), "edge-a")),
    );
    let took = wait_for(&lab, &daemon, pa, "edge-a");
    println!("put -> edge copy serving: {took:?}");
    let st = wait_revision(&lab, &daemon, &box_id, rev);
    let svc = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == a.as_str())
        .unwrap_or_else(|| panic!("{a} not in {st}"));
    assert_eq!(svc["source"], "group:lab", "{st}");
    assert_eq!(st["error"], Value::Null, "{st}");

    remove(&lab, NATS_PORT, &key(&a), false);
    let took = wait_for(&lab, &daemon, pa, "cloud");
    println!("delete -> cloud again: {took:?}");

    // A and B at the edge; then the box loses the server.
    put(
        &lab,
        NATS_PORT,
        &key(&a),
        value(&files.service(&a, pa.into(), "edge-a")),
    );
    let rev_b = put(
        &lab,
        NATS_PORT,
        &key(&b),
        value(&files.service(&b, pb.into(), "edge-b")),
    );
    wait_for(&lab, &daemon, pa, "edge-a");
    wait_for(&lab, &daemon, pb, "edge-b");
    wait_revision(&lab, &daemon, &box_id, rev_b);
    restart_on(&mut server, NATS_HIDDEN_PORT);
    remove(&lab, NATS_HIDDEN_PORT, &key(&b), true);
    let rev_c = put(
        &lab,
        NATS_HIDDEN_PORT,
        &key(&c),
        value(&files.service(&c, pc.into(), "edge-c")),
    );
    remove(&lab, NATS_HIDDEN_PORT, &key(&a), false);
    put(
        &lab,
        NATS_HIDDEN_PORT,
        &key(&a),
        value(&files.service(&a, pa.into(), "edge-a2")),
    );
    // Meanwhile the box keeps serving what it had.
    assert_eq!(who(&lab, pb), "edge-b");
    restart_on(&mut server, NATS_PORT);
    let start = Instant::now();
    wait_for(&lab, &daemon, pb, "cloud");
    wait_for(&lab, &daemon, pc, "edge-c");
    wait_for(&lab, &daemon, pa, "edge-a2");
    println!("reconnect -> converged: {:?}", start.elapsed());
    let st = wait_revision(&lab, &daemon, &box_id, rev_c);
    let names: Vec<&str> = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(
        names.contains(&a.as_str()) && names.contains(&c.as_str()) && !names.contains(&b.as_str()),
        "{st}"
    );

    // A restart with no server: the checkpoint is served.
    drop(daemon);
    server.node().stop();
    wait_for_cloud_quietly(&lab, pc);
    let cp: Value = serde_json::from_str(&fs::read_to_string(&checkpoint).unwrap()).unwrap();
    assert_eq!(cp["box_id"], box_id.as_str(), "{cp}");
    assert!(cp["entries"].get(key(&c)).is_some(), "{cp}");
    assert!(cp["entries"].get(key(&b)).is_none(), "{cp}");
    let daemon = Daemon::start(&lab, &files);
    let took = wait_for(&lab, &daemon, pc, "edge-c");
    wait_for(&lab, &daemon, pa, "edge-a2");
    assert_eq!(who(&lab, pb), "cloud");
    println!("boot without a server -> checkpoint served: {took:?}");
    assert!(
        daemon.log().contains("fleet: applying checkpoint"),
        "{}",
        daemon.log()
    );
    // A daemon killed and started again (an upgrade, a crash) runs the checkpoint's services
    // from its first moment: their processes are adopted, not restarted.
    let pid_before = daemon.service(&c)["pid"].as_i64();
    assert!(pid_before.is_some(), "{}", daemon.status());
    daemon.kill();
    let daemon = Daemon::start(&lab, &files);
    let mut svc = Value::Null;
    let adopted = wait_until(CONVERGE, || {
        svc = daemon.service(&c);
        svc["adopted"] == true
    });
    assert!(adopted, "{svc:#}\n{}", daemon.log());
    assert_eq!(svc["pid"].as_i64(), pid_before, "{svc:#}");
    assert_eq!(who(&lab, pc), "edge-c");
    drop(daemon);
}

/// After a clean shutdown the daemon removed its services: the cloud answers again.
fn wait_for_cloud_quietly(lab: &Lab, port: u16) {
    assert!(wait_until(CONVERGE, || who(lab, port) == "cloud"));
}

/// A gzip-compressed tarball holding `service.py` (the lab's edge copy).
fn tarball() -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let script = viscum_tests::daemon::SERVICE_PY.as_bytes();
    let mut h = tar::Header::new_gnu();
    h.set_size(script.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut h, "app/service.py", script)
        .unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

/// An artifact is fetched, verified and run from its own directory; an object whose digest
/// is not the one the service names is refused, the refusal is in the box's status, and the
/// previous version keeps serving.
#[test]
fn artifacts_are_verified_before_they_run() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let port = 8094u16;
    let _cloud = IdentityServer::start(lab.cloud.name(), port, "cloud");
    let _server = nats_in_cloud(&lab);
    create_buckets(&lab, NATS_PORT);
    let box_id = unique_name("box");
    write_config(&files, &box_id, &files.dir().join("checkpoint.json"));
    let daemon = Daemon::start(&lab, &files);
    let web = lab.service_ns_name();

    let upload = |name: &'static str, bytes: Vec<u8>| {
        operator(&lab, NATS_PORT, move |fleet| async move {
            let store = fleet.artifacts().await.unwrap();
            store
                .put(name, &mut bytes.as_slice())
                .await
                .expect("upload artifact");
        });
    };
    let with_artifact = |name: &str, sha256: &str, ident: &str| {
        let mut svc = files.service(&web, port.into(), ident);
        // Relative to the artifact's directory.
        svc.command = vec![
            "/usr/bin/python3".into(),
            "app/service.py".into(),
            port.to_string(),
            ident.into(),
        ];
        insert_artifact(
            &value(&svc),
            &format!("artifact = {{ name = \"{name}\", sha256 = \"{sha256}\" }}\n"),
        )
    };
    let v1 = tarball();
    let v1_sha = sha256_hex(&v1);
    upload("web-1.tar.gz", v1);
    let key = format!("group.lab.svc.{web}");
    let block = with_artifact("web-1.tar.gz", &v1_sha, "edge-v1");
    let rev1 = put(&lab, NATS_PORT, &key, block);
    let took = wait_for(&lab, &daemon, port, "edge-v1");
    println!("artifact put -> its copy serving: {took:?}");
    let st = wait_revision(&lab, &daemon, &box_id, rev1);
    assert_eq!(
        st["services"][0]["artifact"]["sha256"],
        v1_sha.as_str(),
        "{st}"
    );

    // v2 names a digest; the object uploaded under its name is something else.
    let mut tampered = tarball();
    tampered.extend_from_slice(b"tampered");
    upload("web-2.tar.gz", tampered);
    let claimed = sha256_hex(b"what the operator built");
    let rev2 = put(
        &lab,
        NATS_PORT,
        &key,
        with_artifact("web-2.tar.gz", &claimed, "edge-v2"),
    );
    let mut last = None;
    let refused = wait_until(CONVERGE, || {
        last = status(&lab, &box_id);
        last.as_ref()
            .and_then(|s| s["error"].as_str())
            .is_some_and(|e| e.contains("SHA-256") && e.contains("refused"))
    });
    assert!(
        refused,
        "no refusal in the status: {last:?}\n{}",
        daemon.log()
    );
    let st = last.unwrap();
    assert!(st["revision"].as_u64().unwrap() < rev2, "{st}");
    assert_eq!(
        st["services"][0]["artifact"]["sha256"],
        v1_sha.as_str(),
        "{st}"
    );
    for _ in 0..5 {
        assert_eq!(who(&lab, port), "edge-v1");
    }
    let installed = files.dir().join("run/fleet/artifacts").join(&web);
    let versions: Vec<String> = fs::read_dir(&installed)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        versions,
        std::slice::from_ref(&v1_sha),
        "only v1 is installed"
    );

    // Back to v1, then a restarted daemon (a new session that starts with nothing new), then
    // a good v3: fetched, run, and v1's directory removed once v3 runs.
    let rev = put(
        &lab,
        NATS_PORT,
        &key,
        with_artifact("web-1.tar.gz", &v1_sha, "edge-v1"),
    );
    wait_revision(&lab, &daemon, &box_id, rev);
    daemon.kill();
    let daemon = Daemon::start(&lab, &files);
    wait_revision(&lab, &daemon, &box_id, rev);
    let mut v3 = tarball();
    v3.extend_from_slice(&[0u8; 1024]); // another valid gzip member: another digest
    let v3_sha = sha256_hex(&v3);
    upload("web-3.tar.gz", v3);
    put(
        &lab,
        NATS_PORT,
        &key,
        with_artifact("web-3.tar.gz", &v3_sha, "edge-v3"),
    );
    let took = wait_for(&lab, &daemon, port, "edge-v3");
    println!("new artifact version after a restart -> serving: {took:?}");
    let versions: Vec<String> = fs::read_dir(&installed)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(versions, [v3_sha], "v1 removed once v3 runs");
    drop(daemon);
}

/// `line` (a key of the service table) inserted into the one-service `block`, before its
/// sub-tables (`[service.health]`).
fn insert_artifact(block: &str, line: &str) -> String {
    match block.find("\n[service.") {
        Some(i) => format!("{}\n{line}{}", &block[..i], &block[i..]),
        None => format!("{block}{line}"),
    }
}

/// The real agent (with the dry-run applier) under a box's least-privilege credentials
/// (`viscum_lab::nats::box_permissions`: its groups' and its own keys, its own status key,
/// its own inbox prefix): it converges to its group's services and its override, reports its
/// status, and follows a delete; another group's and another box's keys never reach it.
#[test]
fn the_agent_works_with_least_privilege_credentials() {
    use viscum::{
        config::{Config, fleet::Credentials},
        fleet::agent::{self, AgentSettings, DryRun},
    };
    use viscum_lab::nats::NatsUser;
    if skip_unless_root() {
        return;
    }
    let server = NatsServer::start(&NatsOptions {
        users: vec![
            NatsUser::operator("op", "op-pw"),
            NatsUser::fleet_box("box-a", "a-pw", &["ga"]),
        ],
        ..Default::default()
    })
    .expect("start nats-server");
    let url = server.url();
    server.block_on(move || async move {
        let as_user = |user: &str, password: &str, inbox: Option<String>| ConnectSettings {
            servers: vec![url.clone()],
            name: user.into(),
            credentials: Credentials::UserPassword {
                user: user.into(),
                password: password.into(),
            },
            tls: None,
            connect_timeout: Duration::from_secs(5),
            max_reconnect_delay: Duration::from_secs(1),
            inbox_prefix: inbox,
        };
        let op = connect(&as_user("op", "op-pw", None), None)
            .await
            .expect("operator connects");
        create_buckets_with(&op.jetstream).await;
        let desired = op.desired().await.unwrap();
        let status_kv = op.status().await.unwrap();
        let block = |name: &str, port: u16| {
            format!(
                "[[service]]\nname = \"{name}\"\nmatch = [\"tcp://198.51.100.7:{port}\"]\n\
                 command = [\"/bin/true\"]\n"
            )
        };
        for (key, name, port) in [
            ("group.ga.svc.web", "web", 80),
            ("group.gb.svc.api", "api", 81),
            ("box.box-b.svc.web", "web", 82),
            ("box.box-a.svc.own", "own", 83),
        ] {
            desired.put(key, block(name, port).into()).await.unwrap();
        }
        let last = desired
            .put("group.ga.svc.dns", block("dns", 53).into())
            .await
            .unwrap();

        let settings = AgentSettings::dry_run(
            as_user("box-a", "a-pw", Some(schema::box_inbox_prefix("box-a"))),
            "box-a",
            &["ga".to_string()],
            Duration::from_millis(200),
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(agent::run(
            settings,
            DryRun::new(Config::parse("").unwrap()),
            async move {
                let _ = stop_rx.await;
            },
        ));
        let wait_status = |min_revision: u64, want: Vec<(&'static str, &'static str)>| {
            let status_kv = status_kv.clone();
            async move {
                let deadline = Instant::now() + CONVERGE;
                let mut seen = None;
                while Instant::now() < deadline {
                    if let Ok(Some(v)) = status_kv.get("status.box-a").await {
                        let st: schema::BoxStatus = serde_json::from_slice(&v).unwrap();
                        let got: Vec<(String, String)> = st
                            .services
                            .iter()
                            .map(|s| (s.name.clone(), s.source.clone()))
                            .collect();
                        let want: Vec<(String, String)> = want
                            .iter()
                            .map(|(n, s)| ((*n).to_string(), (*s).to_string()))
                            .collect();
                        if st.revision >= min_revision && got == want {
                            assert_eq!(st.error, None, "{st:?}");
                            return st;
                        }
                        seen = Some(st);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                panic!("box-a did not report revision {min_revision} with {want:?}: {seen:?}");
            }
        };
        let st = wait_status(
            last,
            vec![
                ("dns", "group:ga"),
                ("own", "box:box-a"),
                ("web", "group:ga"),
            ],
        )
        .await;
        assert_eq!(st.box_id, "box-a");

        desired.delete("group.ga.svc.web").await.unwrap();
        let after = desired
            .put("group.ga.svc.dns", block("dns", 5353).into())
            .await
            .unwrap();
        wait_status(after, vec![("dns", "group:ga"), ("own", "box:box-a")]).await;
        let _ = stop_tx.send(());
        agent.await.unwrap();
    });
}
