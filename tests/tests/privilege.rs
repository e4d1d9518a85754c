//! Least privilege (issue #13, item 5), tried for real: what a service started by the daemon
//! may not do, what an unprivileged user on the box may not do, and names that may not
//! become paths.
//!
//! The service is `viscum-probe` (tests/src/bin/viscum-probe.rs): started by the real
//! daemon in the lab, it tries to load a BPF program, mount, ptrace, make a user namespace,
//! use the keyring, load a module, read a marker file in the host's `/tmp`, connect to the
//! daemon's control socket and become root again, logs each errno, then execs the Python
//! service of the lab, which must still answer clients through the classifier.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use viscum::engine::Pins;
use viscum_tests::{
    IdentityServer, Lab,
    daemon::{Daemon, DaemonFiles},
    lab::CLOUD_V4,
    skip_unless_root, tcp_ask, unique_name, wait_until,
};

const UP: Duration = Duration::from_secs(20);
const NOBODY: u32 = 65534;
const EPERM: i32 = libc::EPERM;

/// Who answers a new connection to the cloud address on `port` ("edge", "cloud", or the error).
fn who(lab: &Lab, port: u16) -> String {
    let addr = SocketAddr::new(IpAddr::V4(CLOUD_V4), port);
    tcp_ask(lab.client.name(), addr, Duration::from_millis(500))
        .unwrap_or_else(|e| format!("error: {e}"))
}

/// Runs `cmd` as nobody (after whatever pre_exec hooks it already has).
fn as_nobody(mut cmd: Command) -> Output {
    // SAFETY: setgroups/setgid/setuid between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

/// The entries in the lab's datapath, as strings.
fn entries(lab: &Lab) -> Vec<String> {
    let engine = viscum::engine::Engine::open(&Pins::new(lab.bpffs.path())).unwrap();
    let mut all: Vec<String> = engine
        .entries()
        .unwrap()
        .iter()
        .map(|e| e.endpoint.to_string())
        .collect();
    all.sort();
    all
}

/// `probe NAME: ok` / `probe NAME: errno N` lines of the probe's log, by name; `status KEY:
/// VALUE` lines under `status KEY`.
fn probe_results(log: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix("probe ")
            && let Some((k, v)) = rest.split_once(": ")
        {
            out.insert(k.to_owned(), v.to_owned());
        } else if let Some(rest) = line.strip_prefix("status ")
            && let Some((k, v)) = rest.split_once(':')
        {
            out.insert(format!("status {k}"), v.trim().to_owned());
        }
    }
    out
}

/// Whether this build gives services a seccomp filter (daemon/sandbox.rs).
const SECCOMP: bool = cfg!(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
));

#[test]
fn a_service_runs_without_privileges_and_still_serves() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let _cloud = IdentityServer::start(lab.cloud.name(), 8080, "cloud");
    let web = lab.service_ns_name();
    let probe = viscum_tests::vmcheck::limits::runnable_copy(
        Path::new(env!("CARGO_BIN_EXE_viscum-probe")),
        files.dir(),
    )
    .unwrap();
    // A file every user may read, in the host's /tmp: the service must not see it.
    let marker = PathBuf::from("/tmp").join(format!("viscum-marker-{}", unique_name("m")));
    fs::write(&marker, "host\n").unwrap();
    fs::set_permissions(&marker, fs::Permissions::from_mode(0o644)).unwrap();
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }
    let _marker = Remove(marker.clone());

    let mut config = files.config();
    let mut service = files.service(&web, 8080, "edge");
    let mut command = vec![
        probe.display().to_string(),
        "service".into(),
        files.control().display().to_string(),
        marker.display().to_string(),
        "--".into(),
    ];
    command.append(&mut service.command);
    service.command = command;
    config.services.push(service);
    files.write(&config);
    assert_eq!(who(&lab, 8080), "cloud");

    // A soft open-file limit below the hard one, so the daemon can raise its own and the
    // service must still get this one (see the RLIMIT_NOFILE check below).
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim), 0);
        lim.rlim_cur = lim.rlim_cur.min(lim.rlim_max / 2).max(256);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim), 0);
    }
    let daemon = Daemon::start(&lab, &files);
    let pid = daemon.wait_redirected(&web, UP);
    // Still a working service: a client through the classifier gets the edge's answer.
    assert!(
        wait_until(UP, || who(&lab, 8080) == "edge"),
        "{}",
        who(&lab, 8080)
    );

    let log_path = files.run_dir().join("logs").join(format!("{web}.log"));
    let log = fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("probe done"), "{log}");
    eprintln!("service log:\n{log}");
    let r = probe_results(&log);
    let errno = |n: i32| format!("errno {n}");
    // Refused whatever the sandbox's parts: no capability, no mount, no BPF, no module.
    for (probe, want) in [
        ("bpf_prog_load", errno(EPERM)),
        ("mount_remount_root", errno(EPERM)),
        ("mount_tmpfs", errno(EPERM)),
        ("setuid_root", errno(EPERM)),
        // The host's /tmp is not the service's.
        ("read_host_tmp_marker", errno(libc::ENOENT)),
        ("write_own_tmp", "ok".into()),
        // The socket is root's, 0600.
        ("connect_control", errno(libc::EACCES)),
        // Started in its private /tmp, not in the box's root.
        ("cwd", "/tmp".into()),
    ] {
        assert_eq!(r.get(probe), Some(&want), "{probe} in:\n{log}");
    }
    // Allowed to any unprivileged process; only the seccomp filter refuses these.
    if SECCOMP {
        for (probe, want) in [
            ("ptrace_attach_child", errno(EPERM)),
            ("unshare_user", errno(EPERM)),
            ("keyctl", errno(EPERM)),
            // Without a filter: EPERM, or ENOSYS from a kernel without modules.
            ("init_module", errno(EPERM)),
            ("clone3", errno(libc::ENOSYS)),
        ] {
            assert_eq!(r.get(probe), Some(&want), "{probe} in:\n{log}");
        }
    }
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            r.get(&format!("status {set}")).map(String::as_str),
            Some("0000000000000000"),
            "{set} in:\n{log}"
        );
    }
    assert_eq!(r.get("status NoNewPrivs").map(String::as_str), Some("1"));
    // The daemon raises its own open-file limit for its control connections; a service
    // gets the one the daemon was started with (this process's, which it inherited).
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) },
        0
    );
    assert_eq!(
        r.get("nofile"),
        Some(&lim.rlim_cur.to_string()),
        "the service's RLIMIT_NOFILE in:\n{log}"
    );
    if SECCOMP {
        assert_eq!(r.get("status Seccomp").map(String::as_str), Some("2"));
    }
    assert!(
        r["status Uid"].split_whitespace().all(|u| u == "65534"),
        "{log}"
    );

    // The process that serves (the probe after exec) is the same, seen from the host: no
    // capabilities, filtered, in a mount namespace of its own, its /tmp file not in ours.
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(status.contains("CapBnd:\t0000000000000000"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let mnt = |p: &str| fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(mnt(&pid.to_string()), mnt("self"));
    assert!(!Path::new(&format!("/tmp/viscum-probe-{pid}")).exists());
    drop(daemon);
}

#[test]
fn an_unprivileged_user_cannot_read_or_edit_entries() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let _cloud = IdentityServer::start(lab.cloud.name(), 8080, "cloud");
    let web = lab.service_ns_name();
    let mut config = files.config();
    config.services.push(files.service(&web, 8080, "edge"));
    files.write(&config);
    let daemon = Daemon::start(&lab, &files);
    daemon.wait_redirected(&web, UP);
    let before = entries(&lab);
    assert_eq!(before, [format!("tcp://{CLOUD_V4}:8080")]);

    // The CLI refuses up front, with one clear line, for reading and for editing alike.
    let viscum =
        viscum_tests::vmcheck::limits::runnable_copy(&viscum_tests::lab::viscum_bin(), files.dir())
            .unwrap();
    let control = files.control().display().to_string();
    for args in [
        vec!["redirect", "list"],
        vec!["redirect", "add", "tcp://198.51.100.7:9999", "--ns", &web],
        vec!["redirect", "del", "tcp://198.51.100.7:8080", "--now"],
        vec!["status", "--control", &control],
    ] {
        let out = as_nobody(lab.viscum_command_with(&viscum, &args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded as nobody");
        assert!(err.contains("needs root"), "{args:?}: {err}");
    }
    // And the kernel refuses underneath it: the control socket is root's, mode 0600, ...
    let meta = fs::metadata(files.control()).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    let probe = viscum_tests::vmcheck::limits::runnable_copy(
        Path::new(env!("CARGO_BIN_EXE_viscum-probe")),
        files.dir(),
    )
    .unwrap();
    let mut connect = Command::new(&probe);
    connect.args(["connect", &control]);
    let out = as_nobody(connect);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("probe connect: errno {}", libc::EACCES)
    );
    // ... and every pin (maps, programs, links) is root's with no access for anyone else.
    let mut pins = 0;
    let mut dirs = vec![lab.bpffs.path().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                dirs.push(entry.path());
            } else {
                pins += 1;
                assert_eq!(
                    (meta.uid(), meta.mode() & 0o077),
                    (0, 0),
                    "{} is {:o}",
                    entry.path().display(),
                    meta.mode()
                );
            }
        }
    }
    assert!(
        pins > 3,
        "only {pins} pins under {}",
        lab.bpffs.path().display()
    );
    // Nothing changed, and the service still serves.
    assert_eq!(entries(&lab), before);
    assert!(wait_until(UP, || who(&lab, 8080) == "edge"));
    drop(daemon);
}

#[test]
fn service_names_never_become_paths() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let bad = [
        "../x",
        "..",
        ".",
        "a/b",
        "x y",
        "-x",
        "Web",
        "a.b",
        "averyverylongname",
    ];
    let mut text = files.config().to_toml();
    for (i, name) in bad.iter().enumerate() {
        text.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nmatch = [\"tcp://198.51.100.7:{}\"]\ncommand = [\"/bin/true\"]\n",
            9000 + i
        ));
    }
    files.write_raw(&text);
    let config = files.config_path();
    let config = config.to_str().unwrap();
    let err = lab.viscum_err(&["run", "--config", config, "--check"]);
    eprintln!("{err}");
    for name in bad {
        let want = format!("service {name}: name: namespace name '{name}' is invalid");
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    // Refused as a whole: no namespace, no run directory, no cgroup.
    let err = lab.viscum_err(&["run", "--config", config]);
    assert!(err.contains("problems"), "{err}");
    assert!(!files.control().exists());
    assert!(!files.run_dir().join("state").exists());
    assert!(!files.dir().join("x").exists());
    assert!(!lab.bpffs.path().join("prog_ingress").exists());
}

/// Capability numbers (linux/capability.h) of the names the Debian unit may list.
fn cap_number(name: &str) -> u32 {
    match name {
        "CAP_KILL" => 5,
        "CAP_SETGID" => 6,
        "CAP_SETUID" => 7,
        "CAP_SETPCAP" => 8,
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_ADMIN" => 21,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("add {other} to cap_number"),
    }
}

/// The daemon of the Debian package runs with `CapabilityBoundingSet=` cut to what it uses:
/// a service must still start in its sandbox from there (emptying the bounding set needs
/// CAP_SETPCAP, the private /tmp CAP_SYS_ADMIN). The same spawn code as the daemon's, from
/// a thread holding exactly the unit's capabilities (bounding, effective and permitted sets
/// are per thread, and a child inherits its forking thread's).
#[test]
fn a_service_starts_under_the_debian_units_capabilities() {
    if skip_unless_root() {
        return;
    }
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/debian/viscum.service");
    let unit = fs::read_to_string(unit).unwrap();
    let mask: u64 = unit
        .lines()
        .filter_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .flat_map(str::split_whitespace)
        .map(|c| 1u64 << cap_number(c))
        .fold(0, |a, b| a | b);
    assert_ne!(mask, 0, "no CapabilityBoundingSet= in the unit");
    let files = DaemonFiles::new();
    let probe = viscum_tests::vmcheck::limits::runnable_copy(
        Path::new(env!("CARGO_BIN_EXE_viscum-probe")),
        files.dir(),
    )
    .unwrap();
    let out_path = files.dir().join("probe.out");
    let out_file = out_path.clone();
    let exit = std::thread::spawn(move || {
        let last: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let (lo, hi) = (mask as u32, (mask >> 32) as u32);
        // SAFETY: prctl and capset on this thread only, with data on the stack.
        unsafe {
            for cap in 0..=last {
                if mask & (1 << cap) == 0 {
                    assert_eq!(
                        libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0),
                        0
                    );
                }
            }
            let header = Header {
                version: 0x2008_0522,
                pid: 0,
            };
            let data = [
                Data {
                    effective: lo,
                    permitted: lo,
                    inheritable: 0,
                },
                Data {
                    effective: hi,
                    permitted: hi,
                    inheritable: 0,
                },
            ];
            assert_eq!(
                libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()),
                0,
                "{}",
                std::io::Error::last_os_error()
            );
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let netns: std::os::fd::OwnedFd = fs::File::open("/proc/self/ns/net").unwrap().into();
            let user = viscum::config::ServiceUser {
                name: "nobody".into(),
                uid: NOBODY,
                gid: NOBODY,
                groups: vec![NOBODY],
                home: "/nonexistent".into(),
            };
            let output = fs::File::create(&out_file).unwrap();
            let command: Vec<String> = [
                probe.to_str().unwrap(),
                "service",
                "/nonexistent.sock",
                "/nonexistent",
                "--",
                "/bin/true",
            ]
            .map(String::from)
            .to_vec();
            let spec = viscum::daemon::process::Spec {
                command: &command,
                user: &user,
                env: &BTreeMap::new(),
                netns: &netns,
                output: Some(&output),
                cgroup_procs: &[],
                cwd: None,
                storage: None,
            };
            let mut child = viscum::daemon::process::spawn_child(&spec).unwrap_or_else(|e| {
                let out = fs::read_to_string(&out_file).unwrap_or_default();
                panic!("spawn under the unit's capabilities: {e}\n{out}")
            });
            child.wait().await.unwrap()
        })
    })
    .join()
    .unwrap();
    let out = fs::read_to_string(&out_path).unwrap_or_default();
    assert!(exit.success(), "{exit}:\n{out}");
    let r = probe_results(&out);
    assert!(out.contains("probe done"), "{out}");
    for set in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            r.get(&format!("status {set}")).map(String::as_str),
            Some("0000000000000000"),
            "{set} in:\n{out}"
        );
    }
    assert_eq!(
        r.get("read_host_tmp_marker").map(String::as_str),
        Some("errno 2")
    );
}

/// A bpffs that viscum mounts itself (a box without systemd's) is root-only, as is every
/// directory it makes for pins: bpffs defaults to mode 1777, where any user could make the
/// instance directory first and own what is later pinned into it.
#[test]
fn the_bpffs_viscum_mounts_and_its_pin_directories_are_root_only() {
    if skip_unless_root() {
        return;
    }
    let root = Path::new(viscum_tests::guard::BPFFS_TEST_ROOT).join(unique_name("pm"));
    let mount_point = root.join("bpf");
    let instance = mount_point.join("viscum").join("inst");
    struct Cleanup(PathBuf, PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.1, nix::mount::MntFlags::MNT_DETACH);
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(root.clone(), mount_point.clone());
    // Open above the mount point, so only its own mode can keep nobody out.
    fs::create_dir_all(&root).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    viscum::bpffs::ensure(&mount_point).unwrap();
    assert!(viscum::bpffs::is_bpffs(&mount_point).unwrap());
    viscum::bpffs::ensure(&instance).unwrap();
    for dir in [&mount_point, &mount_point.join("viscum"), &instance] {
        let meta = fs::metadata(dir).unwrap();
        assert_eq!(
            (meta.uid(), meta.mode() & 0o777),
            (0, 0o700),
            "{} is {:o}",
            dir.display(),
            meta.mode()
        );
    }
    // And so nobody cannot even look inside.
    let mut ls = Command::new("/bin/ls");
    ls.arg(&mount_point);
    let out = as_nobody(ls);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
