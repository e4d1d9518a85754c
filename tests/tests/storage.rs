//! `[service.storage]`: a private, size-limited, persistent working directory per service
//! (an ext4 image on a loop device, mounted in the service's own mount namespace; see
//! `viscum::daemon::storage`).
//!
//! Real daemon, real kernel: a service that writes past its size gets `ENOSPC` (it reports
//! the error it saw), another service's writes succeed meanwhile, the data survives a
//! restart, the host never sees the mount, and removing the services deletes the storage
//! of the one without `keep` and keeps the other's. Run with `--test-threads=1`.

use std::{fs, path::Path, time::Duration};

use viscum_tests::{
    Lab,
    daemon::{Daemon, DaemonFiles, Service},
    skip_unless_root,
    tenant::{STORAGE_PY, config_with, script, service_log},
    wait_until,
};

/// Bound for a service to start and report (the first start formats its image).
const REPORT: Duration = Duration::from_secs(30);

/// The loop devices backing a file under `dir` (from sysfs).
fn loops_under(dir: &Path) -> Vec<String> {
    let want = dir.to_string_lossy().into_owned();
    fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let backing = fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            backing
                .starts_with(&want)
                .then(|| format!("{}: {}", e.file_name().to_string_lossy(), backing.trim()))
        })
        .collect()
}

/// Waits until `name`'s log has a line starting with `prefix`; returns the last such line.
fn wait_line(files: &DaemonFiles, daemon: &Daemon, name: &str, prefix: &str) -> String {
    wait_nth_line(files, daemon, name, prefix, 1)
}

/// Waits until `name`'s log has `n` lines starting with `prefix`; returns the last one.
fn wait_nth_line(
    files: &DaemonFiles,
    daemon: &Daemon,
    name: &str,
    prefix: &str,
    n: usize,
) -> String {
    let mut line = None;
    let ok = wait_until(REPORT, || {
        let log = service_log(files, name);
        let found: Vec<&str> = log.lines().filter(|l| l.starts_with(prefix)).collect();
        line = (found.len() >= n).then(|| found[found.len() - 1].to_owned());
        line.is_some()
    });
    assert!(
        ok,
        "{name}: no line {prefix:?} within {REPORT:?}\nservice log:\n{}\nstatus: {:#}\ndaemon:\n{}",
        service_log(files, name),
        daemon.service(name),
        daemon.log()
    );
    line.unwrap()
}

#[test]
fn quota_enospc_isolation_persistence_and_removal() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let storage_dir = files.dir().join("storage");
    let py = script(&files, "storage.py", STORAGE_PY);
    let (full, other) = (lab.service_ns_name(), lab.service_ns_name());
    let svc = |name: &str, port: u16, args: &[&str]| {
        let mut command = vec!["/usr/bin/python3".to_string(), py.display().to_string()];
        command.extend(args.iter().map(ToString::to_string));
        Service::new(name, command).matches(&[format!("tcp://198.51.100.7:{port}")])
    };
    let mut config = files.config();
    config.services.push(svc(&full, 9101, &["fill"]));
    config.services.push(svc(&other, 9102, &["write", "20"]));
    let storage_key = format!("storage_dir = {:?}", storage_dir.display().to_string());
    let tables = [
        (full.as_str(), "[service.storage]\nsize = \"16M\"\n"),
        (
            other.as_str(),
            "[service.storage]\nsize = \"32M\"\nkeep = true\n",
        ),
    ];
    files.write_raw(&config_with(&config, &[&storage_key], &tables));
    let daemon = Daemon::start(&lab, &files);

    // The first service fills its 16 MiB and gets ENOSPC; the second writes 20 MiB, more
    // than the first one's whole quota, next to it.
    let enospc = wait_line(&files, &daemon, &full, "ENOSPC after ");
    let mib: u64 = enospc
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap();
    println!("{full}: {enospc}");
    assert!(
        (12..=16).contains(&mib),
        "{enospc}: a 16 MiB file system should hold 12-16 MiB of data"
    );
    let wrote = wait_line(&files, &daemon, &other, "wrote ");
    assert_eq!(wrote, "wrote 20 MiB", "the other service's write");
    for name in [&full, &other] {
        let cwd = wait_line(&files, &daemon, name, "cwd ");
        let data = storage_dir.join(name.as_str()).join("data");
        assert_eq!(
            cwd,
            format!("cwd {0} STATE_DIRECTORY {0}", data.display()),
            "{name} works in its storage"
        );
        // The mount is the service's alone: the host sees an empty directory.
        assert_eq!(
            fs::read_dir(&data).unwrap().count(),
            0,
            "{name}: the host sees the service's files in {}",
            data.display()
        );
    }
    assert_eq!(wait_line(&files, &daemon, &full, "runs "), "runs 1");

    // status: the size, and the use while it runs.
    let st = daemon.service(&other)["storage"].clone();
    assert_eq!(st["size_bytes"], 32 << 20, "{st:#}");
    assert_eq!(st["keep"], true, "{st:#}");
    let total = st["total_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("{st:#}"));
    let used = st["used_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("{st:#}"));
    assert!(total <= 32 << 20 && total > 24 << 20, "{st:#}");
    assert!(used >= 20 << 20, "20 MiB written: {st:#}");
    assert!(
        st["device"]
            .as_str()
            .is_some_and(|d| d.starts_with("/dev/loop")),
        "{st:#}"
    );

    // A restart keeps the data: the second start counts two runs.
    let answer = daemon
        .request(&format!(r#"{{"cmd":"restart","service":"{full}"}}"#))
        .unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(wait_nth_line(&files, &daemon, &full, "runs ", 2), "runs 2");
    // ... and the first run's fill was cleaned up by the service, so it fills again.
    let again = wait_nth_line(&files, &daemon, &full, "ENOSPC after ", 2);
    println!("{full} after restart: {again}");

    // Removed from the file: the storage without `keep` goes, the other stays.
    config.services.clear();
    files.write_raw(&config_with(&config, &[&storage_key], &[]));
    let answer = daemon.request(r#"{"cmd":"reload"}"#).unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    assert!(
        !storage_dir.join(full.as_str()).exists(),
        "{full}'s storage is still there after its removal"
    );
    assert!(
        storage_dir
            .join(other.as_str())
            .join("image.ext4")
            .is_file(),
        "{other}'s storage (keep = true) was deleted"
    );
    // The services' file systems are unmounted with their namespaces and the loop devices
    // detach themselves (autoclear).
    let detached = wait_until(Duration::from_secs(10), || {
        loops_under(files.dir()).is_empty()
    });
    assert!(
        detached,
        "loop devices left: {:?}",
        loops_under(files.dir())
    );
    drop(daemon);
}

/// Bad `[service.storage]` values are refused with the key named, before anything runs.
#[test]
fn bad_storage_is_refused() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let name = lab.service_ns_name();
    let mut config = files.config();
    config.services.push(
        Service::new(&name, vec!["/bin/true".into()])
            .matches(&["tcp://198.51.100.7:9103".to_string()]),
    );
    for (table, want) in [
        ("[service.storage]\nsize = \"1M\"\n", "below the minimum"),
        ("[service.storage]\nsize = \"lots\"\n", "is not a size"),
        ("[service.storage]\nkeep = true\n", "storage.size: missing"),
        (
            "[service.storage]\nsize = \"64M\"\nquota = 1\n",
            "unknown key",
        ),
    ] {
        files.write_raw(&config_with(&config, &[], &[(name.as_str(), table)]));
        let out = lab.viscum(&[
            "run",
            "--config",
            files.config_path().to_str().unwrap(),
            "--check",
        ]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{table}: accepted\n{text}");
        assert!(text.contains(want), "{table}: wanted {want:?} in\n{text}");
    }
}
