//! The operator's side of the fleet (issue #14, `docs/fleet.md`) against real `nats-server`
//! processes that the tests start in namespaces of their own (viscum-lab's `nats` fixture):
//!
//! * `viscum fleet apply|rm|status|put-artifact` through the real binary: keys, revisions,
//!   the daemon's validation errors with nothing written, stale and expired boxes, an upload
//!   whose SHA-256 and bytes come back from the store;
//! * least privilege (item 4): a server with per-user permissions from
//!   `viscum_lab::nats::box_permissions`; box A reads its groups' and its own keys, reads
//!   artifacts and writes its own status, and can neither read group B's state nor write box
//!   B's status;
//! * a three-node JetStream cluster (buckets with three replicas) losing a node (the desired
//!   stream's leader, the meta leader, or a node that leads neither): simulated boxes (the
//!   fleet agent with its dry-run applier, no datapath) still converge, and `viscum fleet
//!   status` still lists them; on failure the test shows each server's `/jsz` and log and the
//!   agents' logs.
//!
//! Needs root (namespaces) and `nats-server` (`cargo xtask setup`).

use std::{
    fs,
    process::Output,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use viscum::config::Config;
use viscum_lab::{
    lab::viscum_bin,
    nats::{NatsCluster, NatsOptions, NatsServer, NatsUser},
    skip_unless_root,
};

const TWO_SERVICES: &str = r#"
[[service]]
name = "web"
match = ["tcp://198.51.100.7:80"]
command = ["/bin/sleep", "1000"]

[[service]]
name = "dns"
match = ["udp://198.51.100.7:53"]
command = ["/bin/sleep", "1000"]
health = { tcp = 53 }
"#;

/// Runs `viscum fleet ARGS` in the server's namespace; bounded by a minute.
fn fleet(server: &NatsServer, args: &[&str]) -> Output {
    let mut cmd = server.command(viscum_bin());
    cmd.arg("fleet").args(args);
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start viscum fleet");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.expect("wait for viscum fleet"),
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid, not yet reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("viscum fleet {args:?} ran longer than a minute");
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn fails(out: &Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what} should fail\nstdout: {}",
        text(&out.stdout)
    );
    text(&out.stderr)
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
    )
    .expect("fits")
}

/// An async-nats client in the server's namespace (no authentication).
async fn operator(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url).await.expect("connect");
    jetstream::new(client)
}

async fn last_revision(js: &jetstream::Context, bucket: &str) -> u64 {
    match js.get_stream(format!("KV_{bucket}")).await {
        Ok(mut s) => s.info().await.expect("stream info").state.last_sequence,
        Err(_) => 0,
    }
}

#[test]
fn cli_apply_rm_status_put_artifact() {
    if skip_unless_root() {
        return;
    }
    let server = NatsServer::start(&NatsOptions::default()).expect("start nats-server");
    let url = server.url();
    let dir = server.scratch_dir().to_path_buf();
    let file = dir.join("services.toml");
    fs::write(&file, TWO_SERVICES).expect("write services.toml");
    let file_arg = file.to_str().expect("utf-8 path");
    let srv = ["--server", url.as_str()];

    // Bad input first: each is refused with a clear error and the server sees nothing.
    let bad = dir.join("bad.toml");
    let bad_text = TWO_SERVICES.replace("udp://198.51.100.7:53", "udp://198.51.100.7:0");
    fs::write(&bad, &bad_text).expect("write bad.toml");
    let bad_arg = bad.to_str().expect("utf-8 path");
    let err = fails(
        &fleet(
            &server,
            &[&srv[..], &["apply", "-f", bad_arg, "--group", "g1"]].concat(),
        ),
        "apply of an invalid block",
    );
    // The daemon's own message, naming the file instead of "configuration".
    let daemon = Config::parse(&bad_text).expect_err("invalid").to_string();
    let daemon = daemon.replacen("configuration", bad_arg, 1);
    assert!(
        err.contains(&daemon),
        "apply error\n{err}\nis not the daemon's\n{daemon}"
    );
    let engine = dir.join("engine.toml");
    fs::write(
        &engine,
        format!("[engine]\ninterfaces = [\"lan0\"]\n{TWO_SERVICES}"),
    )
    .expect("write");
    let err = fails(
        &fleet(
            &server,
            &[
                &srv[..],
                &["apply", "-f", engine.to_str().unwrap(), "--group", "g1"],
            ]
            .concat(),
        ),
        "apply of a file with [engine]",
    );
    assert!(err.contains("[engine]"), "{err}");
    let err = fails(
        &fleet(
            &server,
            &[&srv[..], &["apply", "-f", file_arg, "--group", "a.b"]].concat(),
        ),
        "apply to a group with a dot",
    );
    assert!(err.contains("group 'a.b': may hold only"), "{err}");
    let err = fails(
        &fleet(&server, &[&srv[..], &["apply", "-f", file_arg]].concat()),
        "apply without a target",
    );
    assert!(err.contains("--group") && err.contains("--box"), "{err}");
    let err = fails(
        &fleet(
            &server,
            &[
                "--server",
                "nats://127.0.0.1:1",
                "--timeout",
                "1",
                "apply",
                "-f",
                file_arg,
                "--group",
                "g1",
            ],
        ),
        "apply to a server that is not there",
    );
    assert!(
        err.contains("cannot connect to the NATS servers nats://127.0.0.1:1"),
        "{err}"
    );
    let err = fails(
        &fleet(
            &server,
            &[
                &srv[..],
                &["--user", "op", "apply", "-f", file_arg, "--group", "g1"],
            ]
            .concat(),
        ),
        "--user without --password",
    );
    assert!(err.contains("--user and --password go together"), "{err}");
    let u = url.clone();
    let before = server.block_on(move || async move {
        let js = operator(&u).await;
        (
            last_revision(&js, "viscum_desired").await,
            js.get_key_value("viscum_desired").await.is_ok(),
        )
    });
    assert_eq!(
        before,
        (0, false),
        "refused input created the bucket or wrote to it"
    );

    // apply: one key per block, revisions printed, the stored text one valid block.
    let out = ok(
        &fleet(
            &server,
            &[&srv[..], &["apply", "-f", file_arg, "--group", "g1"]].concat(),
        ),
        "apply --group g1",
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "group.g1.svc.web\trevision 1",
            "group.g1.svc.dns\trevision 2"
        ],
        "{out}"
    );
    let out = ok(
        &fleet(
            &server,
            &[&srv[..], &["apply", "-f", file_arg, "--box", "box-7"]].concat(),
        ),
        "apply --box box-7",
    );
    assert!(out.starts_with("box.box-7.svc.web\trevision 3\n"), "{out}");
    let u = url.clone();
    let stored = server.block_on(move || async move {
        let js = operator(&u).await;
        let kv = js.get_key_value("viscum_desired").await.expect("bucket");
        kv.get("group.g1.svc.dns")
            .await
            .expect("get")
            .expect("key present")
    });
    let stored =
        Config::parse(std::str::from_utf8(&stored).expect("utf-8")).expect("stored block valid");
    assert_eq!(stored.services.len(), 1);
    assert_eq!(stored.services[0].name, "dns");
    assert_eq!(
        stored.services[0],
        Config::parse(TWO_SERVICES).expect("valid").services[1],
        "the stored block is not the file's block"
    );

    // rm: the key goes; an absent one is an error that changes nothing.
    let out = ok(
        &fleet(
            &server,
            &[&srv[..], &["rm", "web", "--group", "g1"]].concat(),
        ),
        "rm",
    );
    assert!(
        out.starts_with("group.g1.svc.web\tdeleted at revision 5"),
        "{out}"
    );
    let err = fails(
        &fleet(
            &server,
            &[&srv[..], &["rm", "web", "--group", "g1"]].concat(),
        ),
        "rm again",
    );
    assert!(err.contains("no service 'web' in group g1"), "{err}");
    let u = url.clone();
    let (web, dns, rev) = server.block_on(move || async move {
        let js = operator(&u).await;
        let kv = js.get_key_value("viscum_desired").await.expect("bucket");
        (
            kv.get("group.g1.svc.web").await.expect("get"),
            kv.get("group.g1.svc.dns").await.expect("get"),
            last_revision(&js, "viscum_desired").await,
        )
    });
    assert!(web.is_none() && dns.is_some(), "rm removed the wrong key");
    assert_eq!(rev, 5, "a refused rm wrote something");

    // status: a fresh box, a stale one (heartbeat 5 min old), one that expires by TTL.
    let u = url.clone();
    server.block_on(move || async move {
        let js = operator(&u).await;
        // apply created viscum_status with its 30 s TTL; a short-lived second bucket would
        // not be the one status reads, so expiry is shown on a box put with a 5 s bucket.
        js.delete_key_value("viscum_status").await.expect("drop status bucket");
        let kv = viscum::fleet::buckets::ensure_kv(
            &js,
            kv::Config {
                bucket: "viscum_status".into(),
                max_age: Duration::from_secs(5),
                ..Default::default()
            },
        )
        .await
        .expect("status bucket");
        let report = |id: &str, heartbeat: u64, rev: u64| {
            json!({
                "box_id": id, "revision": rev, "applied_at_ms": heartbeat, "heartbeat_ms": heartbeat,
                "viscum_version": "0.1.0", "error": null,
                "services": [{"name": "dns", "source": "group:g1", "state": "running",
                              "health": "healthy", "edge_flows": 12, "bytes_kept_off_uplink": 3400,
                              "artifact": null}],
            })
            .to_string()
        };
        kv.put("status.fresh", report("fresh", now_ms(), 4).into()).await.expect("put");
        kv.put("status.old", report("old", now_ms() - 300_000, 2).into()).await.expect("put");
    });
    let out = ok(&fleet(&server, &[&srv[..], &["status"]].concat()), "status");
    assert!(
        out.starts_with("desired revision 5; 2 boxes reporting"),
        "{out}"
    );
    let line = |b: &str| {
        out.lines()
            .find(|l| l.starts_with(b))
            .unwrap_or_else(|| panic!("no {b} in\n{out}"))
            .to_string()
    };
    assert!(
        line("fresh").contains(" ok ") && line("fresh").contains("dns"),
        "{out}"
    );
    assert!(line("old").contains("STALE"), "{out}");
    let json: Value =
        serde_json::from_slice(&fleet(&server, &[&srv[..], &["status", "--json"]].concat()).stdout)
            .expect("status --json is JSON");
    assert_eq!(json["desired_revision"], 5);
    let boxes = json["boxes"].as_array().expect("boxes");
    assert_eq!(boxes.len(), 2, "{json}");
    let by_id = |id: &str| {
        boxes
            .iter()
            .find(|b| b["box_id"] == id)
            .expect("box")
            .clone()
    };
    assert_eq!(by_id("fresh")["stale"], false);
    assert_eq!(by_id("old")["stale"], true);
    assert_eq!(by_id("fresh")["services"][0]["bytes_kept_off_uplink"], 3400);
    // Both stop heartbeating: after the bucket's TTL they are gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let json: Value = serde_json::from_slice(
            &fleet(&server, &[&srv[..], &["status", "--json"]].concat()).stdout,
        )
        .expect("JSON");
        if json["boxes"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < deadline, "reports did not expire: {json}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // put-artifact: progress on stderr, name and SHA-256 on stdout, the bytes in the store.
    let blob: Vec<u8> = (0u32..700_000)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let artifact = dir.join("web-1.2.tar.gz");
    fs::write(&artifact, &blob).expect("write artifact");
    let want_sha: String = Sha256::digest(&blob)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let out = fleet(
        &server,
        &[&srv[..], &["put-artifact", artifact.to_str().unwrap()]].concat(),
    );
    let stdout = ok(&out, "put-artifact");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("web-1.2.tar.gz: 700000 / 700000 bytes (100%)"),
        "no progress on stderr: {stderr}"
    );
    assert!(
        stdout.starts_with(&format!("web-1.2.tar.gz\t{want_sha}\t700000 bytes\n")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "artifact = {{ name = \"web-1.2.tar.gz\", sha256 = \"{want_sha}\" }}"
        )),
        "{stdout}"
    );
    let err = fails(
        &fleet(
            &server,
            &[
                &srv[..],
                &["put-artifact", artifact.to_str().unwrap(), "--name", "../x"],
            ]
            .concat(),
        ),
        "put-artifact with a bad name",
    );
    assert!(err.contains("is not an artifact name"), "{err}");
    let err = fails(
        &fleet(
            &server,
            &[&srv[..], &["put-artifact", "/nonexistent/file"]].concat(),
        ),
        "put-artifact of a missing file",
    );
    assert!(err.contains("cannot open /nonexistent/file"), "{err}");
    let u = url.clone();
    let back = server.block_on(move || async move {
        use tokio::io::AsyncReadExt as _;
        let js = operator(&u).await;
        let store = js
            .get_object_store("viscum_artifacts")
            .await
            .expect("store");
        let mut object = store.get("web-1.2.tar.gz").await.expect("object");
        let mut bytes = Vec::new();
        object.read_to_end(&mut bytes).await.expect("read object");
        bytes
    });
    assert!(back == blob, "the stored artifact differs from the file");
}

/// A watch as a box makes it (`viscum::fleet::agent`): an ordered push consumer on the
/// desired-state stream, filtered on `filter`, every key's last value first; named, so that
/// its create request's subject carries the filter and permissions can check it.
async fn named_watch(
    client: &async_nats::Client,
    desired: &kv::Store,
    filter: &str,
) -> Result<jetstream::consumer::push::Ordered, String> {
    use jetstream::consumer::{DeliverPolicy, push};
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let consumer = desired
        .stream
        .create_consumer(push::OrderedConfig {
            name: Some(format!("box-a-{n}")),
            deliver_subject: client.new_inbox(),
            filter_subject: format!("$KV.viscum_desired.{filter}"),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    consumer.messages().await.map_err(|e| e.to_string())
}

/// What box A tried, as seen from its connection.
#[derive(Debug, Default)]
struct Attempts {
    /// Server errors (`Permissions Violation for ...`) from the connection's events.
    violations: Vec<String>,
}

#[test]
fn box_credentials_reach_only_their_own_keys() {
    if skip_unless_root() {
        return;
    }
    let options = NatsOptions {
        users: vec![
            NatsUser::operator("op", "op-secret"),
            NatsUser::fleet_box("box-a", "a-secret", &["ga", "shared"]),
            NatsUser::fleet_box("box-b", "b-secret", &["gb", "shared"]),
        ],
        ..NatsOptions::default()
    };
    let server = NatsServer::start(&options).expect("start nats-server with users");
    let url = server.url();
    let dir = server.scratch_dir().to_path_buf();
    let file = dir.join("services.toml");
    fs::write(&file, TWO_SERVICES).expect("write");
    let f = file.to_str().unwrap();
    let op = [
        "--server",
        url.as_str(),
        "--user",
        "op",
        "--password",
        "op-secret",
    ];
    for target in [
        ["--group", "ga"],
        ["--group", "gb"],
        ["--group", "shared"],
        ["--box", "box-a"],
        ["--box", "box-b"],
    ] {
        ok(
            &fleet(
                &server,
                &[&op[..], &["apply", "-f", f], &target[..]].concat(),
            ),
            "operator apply",
        );
    }
    let artifact = dir.join("tool");
    fs::write(&artifact, b"#!/bin/sh\necho edge copy\n").expect("write");
    ok(
        &fleet(
            &server,
            &[&op[..], &["put-artifact", artifact.to_str().unwrap()]].concat(),
        ),
        "put-artifact",
    );
    // A box cannot upload (the store is the operator's).
    let err = fails(
        &fleet(
            &server,
            &[
                "--server",
                url.as_str(),
                "--user",
                "box-a",
                "--password",
                "a-secret",
                "--timeout",
                "2",
                "put-artifact",
                artifact.to_str().unwrap(),
                "--name",
                "evil",
            ],
        ),
        "box-a uploading an artifact",
    );
    assert!(!err.is_empty());

    let u = url.clone();
    let (attempts, report) = server.block_on(move || async move {
        let attempts = Arc::new(Mutex::new(Attempts::default()));
        let seen = attempts.clone();
        let client =
            async_nats::ConnectOptions::with_user_and_password("box-a".into(), "a-secret".into())
                .custom_inbox_prefix(viscum_lab::nats::box_inbox_prefix("box-a"))
                .event_callback(move |event| {
                    let seen = seen.clone();
                    async move {
                        if let async_nats::Event::ServerError(e) = event {
                            seen.lock().unwrap().violations.push(e.to_string());
                        }
                    }
                })
                .connect(&u)
                .await
                .expect("box-a connects");
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(2));

        // What box A needs, all allowed:
        let desired = js
            .get_key_value("viscum_desired")
            .await
            .expect("box-a opens viscum_desired");
        let mut keys = Vec::new();
        for filter in ["group.ga.svc.>", "group.shared.svc.>", "box.box-a.svc.>"] {
            let mut watch = named_watch(&client, &desired, filter)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "watch {filter}: {e}; server errors: {:?}",
                        attempts.lock().unwrap().violations
                    )
                });
            for _ in 0..2 {
                let message = tokio::time::timeout(Duration::from_secs(5), watch.next())
                    .await
                    .unwrap_or_else(|_| panic!("no entry on {filter}"))
                    .expect("watch open")
                    .expect("entry");
                let key = message
                    .subject
                    .trim_start_matches("$KV.viscum_desired.")
                    .to_owned();
                keys.push(key);
            }
        }
        assert_eq!(
            keys,
            [
                "group.ga.svc.web",
                "group.ga.svc.dns",
                "group.shared.svc.web",
                "group.shared.svc.dns",
                "box.box-a.svc.web",
                "box.box-a.svc.dns"
            ]
        );
        assert!(
            desired
                .get("group.ga.svc.web")
                .await
                .expect("direct get of its own key")
                .is_some()
        );
        let status = js
            .get_key_value("viscum_status")
            .await
            .expect("box-a opens viscum_status");
        let report =
            json!({"box_id": "box-a", "revision": 5, "heartbeat_ms": now_ms()}).to_string();
        status
            .put("status.box-a", report.clone().into())
            .await
            .expect("box-a writes its status");
        let store = js
            .get_object_store("viscum_artifacts")
            .await
            .expect("box-a opens the store");
        let mut object = store.get("tool").await.expect("box-a fetches an artifact");
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut object, &mut bytes)
            .await
            .expect("read");
        assert_eq!(bytes, b"#!/bin/sh\necho edge copy\n");
        assert!(
            attempts.lock().unwrap().violations.is_empty(),
            "allowed steps hit a violation: {:?}",
            attempts.lock().unwrap().violations
        );

        // What it must not do, each refused (a refused request is never answered: it times
        // out, after one second here; the server's violation messages are checked below).
        let mut quick = jetstream::new(client.clone());
        quick.set_timeout(Duration::from_secs(1));
        let desired = quick.get_key_value("viscum_desired").await.expect("reopen");
        let status = quick.get_key_value("viscum_status").await.expect("reopen");
        assert!(
            desired.get("group.gb.svc.web").await.is_err(),
            "box-a read group gb's key"
        );
        assert!(
            desired.get("box.box-b.svc.web").await.is_err(),
            "box-a read box-b's key"
        );
        assert!(
            named_watch(&client, &desired, "group.gb.svc.>")
                .await
                .is_err(),
            "box-a watched group gb"
        );
        // async-nats's own watch creates an unnamed consumer, whose create subject carries no
        // filter: refused for every filter, its own included.
        assert!(
            desired.watch_with_history("group.ga.svc.>").await.is_err(),
            "box-a created a consumer without a filter in its subject"
        );
        assert!(
            desired.watch_all().await.is_err(),
            "box-a watched the whole bucket"
        );
        let stream = quick
            .get_stream("KV_viscum_desired")
            .await
            .expect("stream info is allowed");
        assert!(
            stream
                .get_last_raw_message_by_subject("$KV.viscum_desired.group.gb.svc.web")
                .await
                .is_err(),
            "box-a read group gb through STREAM.MSG.GET"
        );
        // Plain subscriptions outside its inbox: the server refuses them.
        for subject in ["$KV.viscum_desired.>", "_INBOX.>", "_INBOX_box-b.>"] {
            let mut sub = client.subscribe(subject).await.expect("subscribe is sent");
            let _ = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
        }
        // Writing box B's status, or its own desired state.
        assert!(
            status
                .put("status.box-b", b"{\"box_id\":\"box-b\"}".as_slice().into())
                .await
                .is_err(),
            "box-a wrote box-b's status"
        );
        assert!(
            desired
                .put("group.ga.svc.web", b"x".as_slice().into())
                .await
                .is_err(),
            "box-a wrote its group's desired state"
        );
        client.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let attempts = std::mem::take(&mut *attempts.lock().unwrap());
        (attempts, report)
    });
    let v = attempts.violations.join("\n");
    for denied in [
        "Publish to \"$JS.API.DIRECT.GET.KV_viscum_desired.$KV.viscum_desired.group.gb.svc.web\"",
        "Publish to \"$JS.API.DIRECT.GET.KV_viscum_desired.$KV.viscum_desired.box.box-b.svc.web\"",
        "Publish to \"$JS.API.STREAM.MSG.GET.KV_viscum_desired\"",
        "Subscription to \"$KV.viscum_desired.>\"",
        "Subscription to \"_INBOX.>\"",
        "Subscription to \"_INBOX_box-b.>\"",
        "Publish to \"$KV.viscum_status.status.box-b\"",
        "Publish to \"$KV.viscum_desired.group.ga.svc.web\"",
    ] {
        assert!(
            v.contains(denied),
            "no permissions violation for {denied}; the server said:\n{v}"
        );
    }
    assert!(
        v.contains("Publish to \"$JS.API.CONSUMER.CREATE.KV_viscum_desired\""),
        "no violation for an unfiltered consumer; the server said:\n{v}"
    );
    assert!(
        v.lines().any(
            |l| l.contains("$JS.API.CONSUMER.CREATE.KV_viscum_desired.box-a-")
                && l.contains(".$KV.viscum_desired.group.gb.svc.>")
        ),
        "no violation for a watch of group gb; the server said:\n{v}"
    );

    // The operator sees box A's status and no status of box B.
    let u = url.clone();
    let (a, b) = server.block_on(move || async move {
        let client =
            async_nats::ConnectOptions::with_user_and_password("op".into(), "op-secret".into())
                .connect(&u)
                .await
                .expect("operator connects");
        let kv = jetstream::new(client)
            .get_key_value("viscum_status")
            .await
            .expect("status");
        (
            kv.get("status.box-a").await.expect("get"),
            kv.get("status.box-b").await.expect("get"),
        )
    });
    assert_eq!(a.as_deref(), Some(report.as_bytes()));
    assert_eq!(b, None, "box-b's status was written by box-a");
}

/// Simulated boxes (the fleet agent with its dry-run applier) running on a thread of their
/// own in namespace `ns` until the returned sender says stop.
fn simulated_boxes(
    ns: &str,
    urls: Vec<String>,
    ids: Vec<String>,
    group: &str,
) -> (
    tokio::sync::watch::Sender<bool>,
    std::thread::JoinHandle<()>,
) {
    use viscum::fleet::{
        agent::{self, AgentSettings, DryRun},
        connect::ConnectSettings,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (ns, group) = (ns.to_owned(), group.to_owned());
    let thread = std::thread::spawn(move || {
        viscum_lab::nats::block_on_in(&ns, move || async move {
            let local = Config::parse("").expect("empty configuration");
            let mut agents = Vec::new();
            for id in ids {
                let settings = AgentSettings::dry_run(
                    ConnectSettings {
                        servers: urls.clone(),
                        name: id.clone(),
                        credentials: viscum::config::fleet::Credentials::None,
                        tls: None,
                        connect_timeout: Duration::from_secs(2),
                        max_reconnect_delay: Duration::from_secs(1),
                        inbox_prefix: Some(viscum::fleet::schema::box_inbox_prefix(&id)),
                    },
                    &id,
                    std::slice::from_ref(&group),
                    Duration::from_secs(2),
                );
                let mut stop = stop_rx.clone();
                agents.push(tokio::spawn(agent::run(
                    settings,
                    DryRun::new(local.clone()),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                )));
            }
            // The agents run until told to stop; then they get ten seconds, together, to
            // end (a bound on each join from the start would drop them, runtime and all,
            // while the test still waits for their reports).
            let mut stop = stop_rx.clone();
            let _ = stop.wait_for(|s| *s).await;
            let _ =
                tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(agents))
                    .await;
        });
    });
    (stop_tx, thread)
}

/// The reports of boxes `ids` in `viscum_status`, by direct gets through `urls` (answered by
/// any live replica), and why any could not be read.
fn box_reports(
    cluster: &NatsCluster,
    urls: &[String],
    ids: &[String],
) -> (Vec<viscum::fleet::schema::BoxStatus>, Vec<String>) {
    let (urls, ids) = (urls.to_vec(), ids.to_vec());
    cluster.block_on(move || async move {
        let servers: Vec<async_nats::ServerAddr> =
            urls.iter().map(|u| u.parse().expect("url")).collect();
        let client = match async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(1))
            .connect(servers.as_slice())
            .await
        {
            Ok(c) => c,
            Err(e) => return (Vec::new(), vec![format!("connect: {e}")]),
        };
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(2));
        let kv = match js.get_key_value("viscum_status").await {
            Ok(kv) => kv,
            Err(e) => return (Vec::new(), vec![format!("open viscum_status: {e}")]),
        };
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for id in ids {
            match kv.get(format!("status.{id}")).await {
                Ok(Some(v)) => match serde_json::from_slice(&v) {
                    Ok(s) => out.push(s),
                    Err(e) => errors.push(format!("status.{id}: {e}")),
                },
                Ok(None) => errors.push(format!("status.{id}: no value")),
                Err(e) => errors.push(format!("status.{id}: {e}")),
            }
        }
        (out, errors)
    })
}

/// Polls until every one of `ids` reports at least `revision` with `services` fleet services.
/// On failure, the panic shows the last reports, why the others could not be read, and the
/// cluster's view of its streams with the servers' logs.
fn wait_converged(
    cluster: &mut NatsCluster,
    urls: &[String],
    ids: &[String],
    revision: u64,
    services: usize,
    what: &str,
) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let mut last_errors: Vec<String> = Vec::new();
    loop {
        let (reports, errors) = box_reports(cluster, urls, ids);
        if errors != last_errors {
            eprintln!(
                "{now} {what}: +{:.1?}: {errors:?}",
                started.elapsed(),
                now = now_ms()
            );
            last_errors = errors.clone();
        }
        let done = ids.iter().all(|id| {
            reports.iter().any(|r| {
                &r.box_id == id
                    && r.revision >= revision
                    && r.error.is_none()
                    && r.services.len() == services
            })
        });
        if done {
            let took = started.elapsed();
            eprintln!("{what}: converged in {took:.1?}");
            return took;
        }
        if Instant::now() >= deadline {
            panic!(
                "{what}: boxes did not all report revision {revision} with {services} services in \
                 120 s: {reports:#?}\nerrors: {errors:#?}\n{}",
                cluster.diagnostics(80)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A node that leads neither the desired stream nor the meta group killed (when the cluster
/// has one; else a follower of the desired stream).
#[test]
fn cluster_loses_a_node_and_boxes_keep_converging() {
    lose_a_node(Victim::Follower);
}

/// The desired stream's leader killed.
#[test]
fn cluster_loses_the_stream_leader_and_boxes_keep_converging() {
    lose_a_node(Victim::StreamLeader);
}

/// The JetStream meta leader killed (the server that places new streams and consumers).
#[test]
fn cluster_loses_the_meta_leader_and_boxes_keep_converging() {
    lose_a_node(Victim::MetaLeader);
}

/// Which node [`lose_a_node`] kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Follower,
    StreamLeader,
    MetaLeader,
}

/// A 3-node cluster, buckets with 3 replicas, five simulated boxes; one node is killed
/// (`victim`), a change and a removal are applied, the boxes converge on both and `viscum
/// fleet status` lists them all; the node returns and they still follow.
///
/// The boxes' watches are ordered consumers, one replica each: those on the killed node go
/// silent, and the boxes find out by the missing idle heartbeats (10 s) and watch again; on
/// nats-server 2.9 a new consumer may be placed on the dead node, its creation then times
/// out and the agent tries again (`viscum::fleet::agent`'s `WATCH_REQUEST_TIMEOUT`).
/// Meanwhile every box keeps putting its status, so none expires.
fn lose_a_node(victim: Victim) {
    if skip_unless_root() {
        return;
    }
    let _ = env_logger::Builder::new()
        .parse_filters("viscum=debug")
        .format(|buf, record| {
            use std::io::Write as _;
            writeln!(buf, "{} {} {}", now_ms(), record.level(), record.args())
        })
        .is_test(true)
        .try_init();
    let mut cluster = NatsCluster::start(&NatsOptions::default()).expect("start a 3-node cluster");
    let urls = cluster.urls();
    let servers: Vec<String> = urls
        .iter()
        .flat_map(|u| ["--server".to_owned(), u.clone()])
        .collect();
    let dir = std::env::temp_dir().join(viscum_lab::unique_name("vfleet"));
    fs::create_dir_all(&dir).expect("scratch dir");
    let _cleanup = Cleanup(dir.clone());
    let file = dir.join("services.toml");
    let run = |cluster: &NatsCluster, args: &[&str]| -> Output {
        let mut cmd = cluster.command(viscum_bin());
        cmd.arg("fleet").args(&servers).args(args);
        cmd.output().expect("run viscum fleet")
    };
    // apply, retried while the cluster elects a leader for a new or moved stream.
    let apply = |cluster: &NatsCluster, text: &str| -> u64 {
        fs::write(&file, text).expect("write services.toml");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = run(
                cluster,
                &[
                    "apply",
                    "-f",
                    file.to_str().unwrap(),
                    "--group",
                    "edge",
                    "--replicas",
                    "3",
                ],
            );
            if out.status.success() {
                let stdout = text_of(&out.stdout);
                return stdout
                    .lines()
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                    .max()
                    .expect("a revision printed");
            }
            assert!(
                Instant::now() < deadline,
                "apply kept failing: {}",
                text_of(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let one = TWO_SERVICES
        .split("[[service]]")
        .nth(1)
        .map(|b| format!("[[service]]{b}"))
        .unwrap();
    let r1 = apply(&cluster, &one);
    let ids: Vec<String> = (0..5).map(|i| format!("sim-{i}")).collect();
    let (stop, boxes) = simulated_boxes(cluster.client_netns(), urls.clone(), ids.clone(), "edge");
    wait_converged(&mut cluster, &urls, &ids, r1, 1, "before the failure");

    // Both buckets have three replicas; find who leads what, and kill the victim.
    let u = urls.clone();
    let (replicas, leaders) = cluster.block_on(move || async move {
        let client = async_nats::connect(u.as_slice()[0].as_str())
            .await
            .expect("connect");
        let js = jetstream::new(client);
        let mut replicas = Vec::new();
        let mut leaders = Vec::new();
        for name in ["KV_viscum_desired", "KV_viscum_status"] {
            let info = js
                .get_stream(name)
                .await
                .expect("stream")
                .info()
                .await
                .expect("info")
                .clone();
            replicas.push(info.config.num_replicas);
            leaders.push(info.cluster.and_then(|c| c.leader).expect("a leader"));
        }
        (replicas, leaders)
    });
    assert_eq!(
        replicas,
        [3, 3],
        "apply --replicas 3 made buckets of {replicas:?}"
    );
    let jsz: Value = serde_json::from_str(&cluster.node(0).monitor("/jsz").expect("/jsz"))
        .expect("/jsz is JSON");
    let meta = jsz["meta_cluster"]["leader"]
        .as_str()
        .expect("a meta leader")
        .to_owned();
    let index = |name: &str| -> usize {
        name.trim_start_matches('n')
            .parse()
            .expect("servers named n<i>")
    };
    let (stream_leader, meta_leader) = (index(&leaders[0]), index(&meta));
    let down = match victim {
        Victim::StreamLeader => stream_leader,
        Victim::MetaLeader => meta_leader,
        Victim::Follower => (0..3)
            .find(|&i| i != stream_leader && i != meta_leader)
            .unwrap_or((stream_leader + 1) % 3),
    };
    eprintln!(
        "{} killing n{down} ({victim:?}); leaders: desired {}, status {}, meta {meta}",
        now_ms(),
        leaders[0],
        leaders[1]
    );
    cluster.stop(down);
    let live: Vec<String> = urls
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != down)
        .map(|(_, u)| u.clone())
        .collect();

    // A change and a removal while the node is gone: the boxes converge on both, and the
    // operator sees every box.
    let r2 = apply(&cluster, TWO_SERVICES);
    assert!(r2 > r1);
    wait_converged(&mut cluster, &live, &ids, r2, 2, "with the node down");
    let out = run(&cluster, &["rm", "dns", "--group", "edge"]);
    assert!(out.status.success(), "rm: {}", text_of(&out.stderr));
    wait_converged(
        &mut cluster,
        &live,
        &ids,
        r2 + 1,
        1,
        "after rm with the node down",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = run(&cluster, &["status", "--json"]);
        let listed: Vec<(String, u64)> = serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| {
                v["boxes"].as_array().map(|boxes| {
                    boxes
                        .iter()
                        .map(|b| {
                            (
                                b["box_id"].as_str().unwrap_or_default().to_owned(),
                                b["revision"].as_u64().unwrap_or_default(),
                            )
                        })
                        .collect()
                })
            })
            .unwrap_or_default();
        if ids
            .iter()
            .all(|id| listed.iter().any(|(b, r)| b == id && *r > r2))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "viscum fleet status did not list every box at revision {} in 30 s: {listed:?}\n{}",
            r2 + 1,
            text_of(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // The node comes back; the cluster and the boxes carry on.
    cluster.start_node(down).expect("restart the node");
    let r4 = apply(&cluster, &one.replace("/bin/sleep", "/bin/sleep2"));
    wait_converged(&mut cluster, &urls, &ids, r4, 1, "after the node returned");

    let _ = stop.send(true);
    boxes.join().expect("simulated boxes thread");
}

fn text_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Removes a scratch directory on drop.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
