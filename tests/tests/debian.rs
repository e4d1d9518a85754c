//! The Debian package (`[package.metadata.deb]` in viscum-user/Cargo.toml, `dist/debian/`):
//! packaged with cargo-deb from the debug `viscum` that `cargo xtask test` builds, unpacked
//! into a scratch root with `dpkg -x`, and checked the way an edge server would use it: the
//! shipped `/etc/viscum/viscum.toml` passes `viscum run --check` with the shipped binary (and
//! so does its commented example service, once uncommented), a broken copy is refused, and
//! `systemd-analyze verify` accepts `viscum.service` against the unpacked tree (it checks that
//! every Exec*= command exists there).
//!
//! Needs cargo-deb, dpkg and systemd-analyze (`cargo xtask setup` installs them) and the
//! debug binary at `<target dir>/debug/viscum` (`cargo build -p viscum-user`); no root.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

/// A scratch directory removed on drop (failures included).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "viscum-debian-{tag}-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!("cannot start {cmd:?}: {e} (is it installed? `cargo xtask setup`)")
    })
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Packages the debug binary with `cargo deb --no-build --profile dev` (cargo-deb warns that
/// it prefers release profiles; the package layout is the same, and a release build would
/// cost CI minutes) and returns the .deb.
fn build_deb(out_dir: &Path) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let out = run(Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "deb",
            "-p",
            "viscum-user",
            "--no-build",
            "--profile",
            "dev",
            "--fast",
            "-o",
        ])
        .arg(out_dir));
    assert!(
        out.status.success(),
        "cargo deb failed (build the binary first: cargo build -p viscum-user):\n{}",
        text(&out)
    );
    let deb = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("cargo deb printed no .deb path:\n{}", text(&out)));
    println!(
        "packaged {} ({} bytes) in {:.1?}",
        deb.display(),
        fs::metadata(&deb).unwrap().len(),
        started.elapsed()
    );
    deb
}

/// `viscum run --config FILE --check` with the packaged binary.
fn check_config(root: &Path, config: &Path) -> Output {
    run(Command::new(root.join("usr/sbin/viscum"))
        .args(["run", "--check", "--config"])
        .arg(config)
        .env_remove("VISCUM_CONFIG"))
}

/// `systemd-analyze verify` of `unit` against `root` only: `--recursive-errors=no` leaves out
/// the units it depends on (multi-user.target and the like are not in a scratch root).
fn verify_unit(root: &Path, unit: &str) -> Output {
    run(Command::new("systemd-analyze")
        .args(["verify", "--man=no", "--recursive-errors=no"])
        .arg(format!("--root={}", root.display()))
        .arg(unit))
}

#[test]
fn deb_installs_a_checked_config_and_a_verified_unit() {
    let scratch = Scratch::new("deb");
    let deb = build_deb(&scratch.0.join("out"));
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("viscum_") && name.ends_with(".deb"),
        "package file {name} is not viscum_<version>_<arch>.deb"
    );

    // Control data: name, dependencies, and the configuration file as a conffile (dpkg keeps
    // the operator's edits on upgrade).
    let info = run(Command::new("dpkg-deb").arg("-f").arg(&deb));
    assert!(info.status.success(), "{}", text(&info));
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    let field = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")))
            .unwrap_or_else(|| panic!("no {key} field in\n{info}"))
            .to_owned()
    };
    assert_eq!(field("Package"), "viscum");
    let depends = field("Depends");
    assert!(depends.contains("libc6"), "Depends: {depends}");
    // ExecReload runs /bin/kill, which Debian ships in procps.
    assert!(depends.contains("procps"), "Depends: {depends}");
    let control = scratch.0.join("control");
    let out = run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    assert!(out.status.success(), "{}", text(&out));
    let conffiles = fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/viscum/viscum.toml");
    // Installed, not enabled or started (the operator edits the config first), but systemd
    // learns of the unit on install and upgrade.
    let postinst = fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("daemon-reload"), "{postinst}");
    assert!(!postinst.contains("deb-systemd-invoke start"), "{postinst}");

    // Unpack as an installation would lay it out.
    let root = scratch.0.join("root");
    let out = run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root));
    assert!(out.status.success(), "{}", text(&out));
    let binary = root.join("usr/sbin/viscum");
    let config = root.join("etc/viscum/viscum.toml");
    let unit = root.join("usr/lib/systemd/system/viscum.service");
    for path in [&binary, &config, &unit] {
        assert!(path.is_file(), "{} is not in the package", path.display());
    }
    let out = run(Command::new(&binary).arg("--version"));
    assert!(out.status.success(), "{}", text(&out));

    // The shipped configuration is valid as shipped...
    let out = check_config(&root, &config);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok (0 services"),
        "{}",
        text(&out)
    );
    // ...and so is its commented example service, uncommented.
    let shipped = fs::read_to_string(&config).unwrap();
    let start = shipped
        .find("#[[service]]")
        .expect("the shipped config has a commented [[service]] example");
    let mut example = shipped[..start].to_owned();
    for line in shipped[start..].lines() {
        example.push_str(line.strip_prefix('#').unwrap_or(line));
        example.push('\n');
    }
    let uncommented = scratch.0.join("example.toml");
    fs::write(&uncommented, &example).unwrap();
    let out = check_config(&root, &uncommented);
    assert!(out.status.success(), "{}\n{example}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok (1 service: speedtest)"),
        "{}",
        text(&out)
    );
    // A broken file is refused, naming the problem: ExecStartPre relies on that to keep a bad
    // edit from starting the daemon.
    let broken = scratch.0.join("broken.toml");
    fs::write(
        &broken,
        shipped.replace(r#"interfaces = ["br-lan"]"#, r#"interfaces = ["br lan"]"#),
    )
    .unwrap();
    let out = check_config(&root, &broken);
    assert!(!out.status.success(), "a broken config passed --check");
    assert!(
        text(&out).contains("'br lan' is not a valid interface name"),
        "{}",
        text(&out)
    );

    // The unit: what it runs, and systemd's own check of it.
    let unit_text = fs::read_to_string(&unit).unwrap();
    let key = |k: &str| -> Vec<&str> {
        unit_text
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{k}=")))
            .collect()
    };
    assert_eq!(
        key("ExecStart"),
        ["/usr/sbin/viscum run --config /etc/viscum/viscum.toml"]
    );
    assert_eq!(
        key("ExecStartPre"),
        ["/usr/sbin/viscum run --config /etc/viscum/viscum.toml --check"]
    );
    // The daemon re-reads its file on SIGHUP (tests/tests/daemon.rs drives that).
    assert_eq!(key("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    assert_eq!(key("Restart"), ["on-failure"]);
    assert_eq!(key("Delegate"), ["yes"]);
    let caps = key("CapabilityBoundingSet").join(" ");
    for cap in [
        "CAP_NET_ADMIN",
        "CAP_SYS_ADMIN",
        "CAP_BPF",
        "CAP_SETUID",
        "CAP_KILL",
    ] {
        assert!(caps.split(' ').any(|c| c == cap), "{cap} missing: {caps}");
    }
    // Every option that gives the daemon a private mount namespace would hide its bpffs and
    // /run/netns mounts from the rest of the system (README: the `ip netns exec` pitfall).
    for private_mounts in [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "MountFlags",
    ] {
        assert!(key(private_mounts).is_empty(), "{private_mounts}= is set");
    }

    // /bin/kill is procps's (a dependency), not the package's: the scratch root gets the
    // host's copy so that verify finds every command the unit names.
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy(
        fs::canonicalize("/bin/kill").expect("/bin/kill (Debian package procps)"),
        root.join("bin/kill"),
    )
    .unwrap();
    let out = verify_unit(&root, "viscum.service");
    assert!(
        out.status.success(),
        "systemd-analyze verify:\n{}",
        text(&out)
    );
    assert!(
        !text(&out).contains("viscum.service"),
        "systemd-analyze verify complained:\n{}",
        text(&out)
    );

    // The check is not vacuous: the same unit pointing at a binary the root lacks, or with a
    // misspelt key, fails.
    let units = root.join("usr/lib/systemd/system");
    fs::write(
        units.join("viscum-missing.service"),
        unit_text.replace("/usr/sbin/viscum ", "/usr/sbin/viscum-missing "),
    )
    .unwrap();
    let out = verify_unit(&root, "viscum-missing.service");
    assert!(
        !out.status.success() && text(&out).contains("/usr/sbin/viscum-missing"),
        "verify accepted a missing ExecStart binary:\n{}",
        text(&out)
    );
    fs::write(
        units.join("viscum-typo.service"),
        unit_text.replace("Type=exec", "Typo=exec"),
    )
    .unwrap();
    let out = verify_unit(&root, "viscum-typo.service");
    assert!(
        text(&out).contains("Unknown key 'Typo'"),
        "verify accepted an unknown key:\n{}",
        text(&out)
    );
}
