//! Hostile input (issue #13, item 2): every bad input of `docs/bad-input.md`, with the exact
//! error it gets, through the real `viscum` binary, a real daemon and its real control socket.
//!
//! * CLI arguments: each command refuses with a message naming the problem, and the
//!   datapath, namespaces and attachments are the same afterwards.
//! * Configuration files: `run --check` names every problem (key and value in the file's
//!   terms, never a Rust type); a reload with one bad service changes nothing at all.
//! * The control socket: malformed, oversized, endless, silent, unread and 1,000 concurrent
//!   clients; the daemon answers each with an error or serves it, keeps serving the others
//!   meanwhile, and ends with its file descriptors back where they were.
//!
//! Run with `--test-threads=1 --nocapture` to see the timings.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use viscum_tests::{
    Lab, Netns,
    daemon::{Daemon, DaemonFiles, Service},
    guard::send_signal,
    lab::viscum_bin,
    skip_unless_root, unique_name, wait_until,
};

/// Bound for a service to come up healthy.
const UP: Duration = Duration::from_secs(20);
/// How fast `status` must answer while another client misbehaves (it takes milliseconds).
const PROMPT: Duration = Duration::from_secs(2);

/// What the datapath, the namespaces and the attachments look like to the CLI.
fn snapshot(lab: &Lab) -> (String, String, Vec<String>) {
    let mut links: Vec<String> = fs::read_dir(lab.bpffs.path().join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    links.sort();
    (
        lab.viscum_ok(&["redirect", "list", "--json"]),
        lab.viscum_ok(&["ns", "list", "--json"]),
        links,
    )
}

#[test]
fn cli_arguments_are_refused_by_name_and_change_nothing() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    lab.viscum_ok(&["attach", "lan0"]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    lab.viscum_ok(&["redirect", "add", "tcp://198.51.100.7:80", "--ns", &ns]);
    let veth = format!("vh-{ns}");
    let before = snapshot(&lab);
    let long = "x".repeat(300);
    let ep = "tcp://198.51.100.8:80";

    // (arguments, text the error must contain)
    let cases: &[(&[&str], &str)] = &[
        // attach / detach
        (&["attach", "lo"], "'lo' is the loopback interface"),
        (
            &["attach", &veth],
            &format!("'{veth}' is the host side of service namespace {ns}'s veth"),
        ),
        (&["attach", "../x"], "'../x' is not a valid interface name"),
        (&["attach", "a/b"], "'a/b' is not a valid interface name"),
        (&["attach", ".."], "'..' is not a valid interface name"),
        (&["attach", ""], "'' is not a valid interface name"),
        (&["attach", &long], "is not a valid interface name"),
        (&["attach", "$(x)"], "interface $(x) does not exist"),
        (
            &["attach", "lan0", "nosuch0"],
            "interface nosuch0 does not exist",
        ),
        (
            &["attach", "lan0", "--flow-table-size", "10"],
            "10 is not in 1024..=16777216",
        ),
        (&["detach", "../x"], "'../x' is not a valid interface name"),
        (&["detach", "wan0"], "viscum is not attached to wan0"),
        (&["detach", "--purge"], "--all"),
        // redirect add: targets and modes
        (
            &["redirect", "add", ep, "--to", "lan0"],
            "--to lan0: lan0 is a client-facing interface the classifier is attached to",
        ),
        (
            &["redirect", "add", ep, "--to", &veth, "--anyip"],
            "mode: anyip does not apply to a --to veth",
        ),
        (
            &["redirect", "add", ep, "--to", &veth, "--nat"],
            "mode: nat translates to the address of a namespace made by `viscum ns add`",
        ),
        (
            &["redirect", "add", ep, "--to", "lo"],
            "interface lo is not a veth",
        ),
        (
            &["redirect", "add", ep, "--to", "../x"],
            "'../x' is not a valid interface name",
        ),
        (
            &["redirect", "add", ep, "--ns", &ns, "--to", &veth],
            "cannot be used with",
        ),
        (&["redirect", "add", ep], "<--ns <NAME>|--to <HOST_VETH>>"),
        (
            &[
                "redirect",
                "add",
                ep,
                "--ns",
                &ns,
                "--nat-to",
                "1.2.3.4:99999",
            ],
            "--nat-to: port '99999' in '1.2.3.4:99999' is not a number between 1 and 65535",
        ),
        (
            &[
                "redirect",
                "add",
                ep,
                "--ns",
                &ns,
                "--nat-to",
                "1.2.3.999:80",
            ],
            "--nat-to: '1.2.3.999' in '1.2.3.999:80' is not an IP address",
        ),
        (
            &["redirect", "add", ep, "--ns", &ns, "--nat-to", "nope"],
            "--nat-to: 'nope' is not ADDR, ADDR:PORT or [V6ADDR]:PORT",
        ),
        (
            &["redirect", "add", ep, "--ns", &ns, "--anyip", "--mirror"],
            "mode: anyip and mirror cannot be combined",
        ),
        (
            &["redirect", "add", ep, "--ns", &ns, "--learn-ms", "-1"],
            "--learn-ms: -1 must be between 0 and 600000",
        ),
        (
            &["redirect", "add", ep, "--ns", &ns, "--from", "192.0.2.0/33"],
            "--from: ",
        ),
        (
            &["redirect", "add", ep, "--ns", &ns, "--dns", "nope"],
            "'nope' is not ADDR or ADDR:PORT",
        ),
        // redirect add: names that would escape into paths or commands
        (
            &["redirect", "add", ep, "--ns", "../x"],
            "namespace name '../x' is invalid",
        ),
        (
            &["redirect", "add", ep, "--ns", "a/b"],
            "namespace name 'a/b' is invalid",
        ),
        (
            &["redirect", "add", ep, "--ns", "$(x)"],
            "namespace name '$(x)' is invalid",
        ),
        (&["redirect", "add", ep, "--ns", &long], "is invalid"),
        // redirect add: matches
        (
            &["redirect", "add", "", "--ns", &ns],
            "PROTO://ADDR[:PORT]: ",
        ),
        (
            &["redirect", "add", "tcp://198.51.100.7:70000", "--ns", &ns],
            "port '70000' is not a number between 1 and 65535",
        ),
        (
            &["redirect", "add", "tcp://198.51.100.0/33:80", "--ns", &ns],
            "PROTO://ADDR[:PORT]: ",
        ),
        (
            &["redirect", "del", "tcp://198.51.100.7:81"],
            "no entry for tcp://198.51.100.7:81",
        ),
        (&["redirect", "drain", "udp://198.51.100.7:9"], "no entry"),
        (
            &[
                "redirect",
                "drain",
                "tcp://198.51.100.7:80",
                "--delete-after",
                "100000",
            ],
            "100000 is not in 0..=86400",
        ),
        (
            &[
                "redirect",
                "del",
                "tcp://198.51.100.7:80",
                "--drain-timeout",
                "100000",
            ],
            "100000 is not in 0..=86400",
        ),
        (
            &["redirect", "add", "tcp://x..y:80", "--ns", &ns],
            "PROTO://ADDR[:PORT]: 'x..y' is not an IPv4 or IPv6 address; as a host name: 'x..y' is not a valid host name",
        ),
        (
            &["redirect", "add", "tcp://198.51.100.7:80-70", "--ns", &ns],
            "port range '80-70' is not LOW-HIGH with 1 <= LOW < HIGH <= 65535",
        ),
        (
            &[
                "redirect",
                "add",
                "udp://198.51.100.7:80?from=10.0.0.0/8",
                "--ns",
                &ns,
                "--from",
                "10.0.0.0/8",
            ],
            "--from: udp://198.51.100.7:80?from=10.0.0.0/8 has ?from= already: give the source restriction once",
        ),
        (
            &["redirect", "follow", "tcp://bad_host!:443", "--ns", &ns],
            "'bad_host!' is not a valid host name",
        ),
        (
            &["redirect", "follow", "tcp://198.51.100.7:443", "--ns", &ns],
            "'tcp://198.51.100.7:443' is not a host name match: write PROTO://NAME[:PORT]",
        ),
        (
            &["redirect", "list", "extra"],
            "unexpected argument 'extra' found",
        ),
        (&["trace", "--bogus"], "unexpected argument '--bogus' found"),
        (
            &["doctor", "--bogus"],
            "unexpected argument '--bogus' found",
        ),
        // ns
        (&["ns", "add", "../x"], "namespace name '../x' is invalid"),
        (&["ns", "add", "a/b"], "namespace name 'a/b' is invalid"),
        (&["ns", "add", "$(x)"], "namespace name '$(x)' is invalid"),
        (&["ns", "add", "--", "-x"], "namespace name '-x' is invalid"),
        (&["ns", "add", &long], "is invalid"),
        (&["ns", "add", &ns], "exists"),
        (&["ns", "del", "../x"], "namespace name '../x' is invalid"),
        // daemon clients without a daemon, and their names
        (&["logs", "../x"], "'../x' is not a service name"),
        (&["service", "stop", "$(x)"], "'$(x)' is not a service name"),
        (
            &["status", "--control", "/nonexistent/viscum.sock"],
            "cannot reach the viscum daemon at /nonexistent/viscum.sock",
        ),
        (
            &["reload", "--control", "/nonexistent/viscum.sock"],
            "cannot reach the viscum daemon at /nonexistent/viscum.sock",
        ),
        (
            &[
                "service",
                "start",
                "web",
                "--control",
                "/nonexistent/viscum.sock",
            ],
            "cannot reach the viscum daemon at /nonexistent/viscum.sock",
        ),
        (
            &["run", "--config", "/nonexistent/viscum.toml"],
            "cannot read configuration /nonexistent/viscum.toml",
        ),
        (
            &["config", "from-uci", "/nonexistent/viscum"],
            "/nonexistent/viscum",
        ),
        (
            &["--log-level", "loud", "status"],
            "'loud' is not a log level",
        ),
        (&["stats", "--bogus"], "unexpected argument '--bogus'"),
    ];
    for (args, want) in cases {
        let err = lab.viscum_err(args);
        assert!(
            err.contains(want),
            "viscum {args:?}: expected {want:?} in:\n{err}"
        );
        assert!(
            !err.contains("panicked"),
            "viscum {args:?} panicked:\n{err}"
        );
        assert_eq!(snapshot(&lab), before, "viscum {args:?} changed state");
    }
    // UCI files: the first syntax problem, with its line.
    let files = DaemonFiles::new();
    for (text, want) in [
        (
            "config engine 'engine'\nconfig service 'web\n",
            "line 2: unterminated '",
        ),
        (
            "config service 'a/b'\n\toption command 'x'\n",
            "line 1: section name 'a/b' may only have A-Z a-z 0-9 _",
        ),
    ] {
        let uci = files.dir().join("viscum.uci");
        fs::write(&uci, text).unwrap();
        let err = lab.viscum_err(&["config", "from-uci", uci.to_str().unwrap()]);
        assert!(err.contains(want), "{text}: {err}");
    }
    drop(files);

    // A --bpffs that is a directory with files in it (think `--bpffs /etc`): refused, not
    // hidden under a fresh bpffs mount.
    let files = DaemonFiles::new();
    let occupied = files.dir().to_str().unwrap().to_owned();
    let out = {
        let occupied = occupied.clone();
        viscum::netns::in_netns(lab.edge.name(), move || {
            Command::new(viscum_bin())
                .args(["--bpffs", &occupied, "attach", "lan0"])
                .output()
        })
        .unwrap()
        .unwrap()
    };
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let mounted = viscum::bpffs::is_bpffs(files.dir()).unwrap();
    if mounted {
        let _ = nix::mount::umount2(files.dir(), nix::mount::MntFlags::MNT_DETACH);
    }
    assert!(!mounted, "a bpffs was mounted over {occupied}");
    assert!(
        err.contains(&format!("{occupied} is not on a bpffs and is not empty")),
        "{err}"
    );
    assert!(files.script().exists());

    // `--to` with an explicit address or mirror does apply to a foreign veth: accepted.
    lab.viscum_ok(&["redirect", "add", ep, "--to", &veth, "--mirror"]);
    lab.viscum_ok(&["redirect", "del", ep, "--now"]);

    // A veth into a namespace viscum did not make, under a name of its own, once it is a
    // redirect target: `attach` finds out what it is and refuses it.
    let foreign = Netns::new();
    let to = unique_name("to");
    {
        let (inner, to) = (foreign.name().to_owned(), to.clone());
        lab.edge.block_on(move || async move {
            let h = viscum::netns::handle_here().await.unwrap();
            viscum::netns::create_veth(&h, &to, "eth0", &inner, None)
                .await
                .unwrap();
            let index = viscum::netns::link_by_name(&h, &to).await.unwrap().index;
            viscum::netns::set_up(&h, index).await.unwrap();
        });
    }
    lab.viscum_ok(&["redirect", "add", ep, "--to", &to]);
    let with_target = snapshot(&lab);
    let err = lab.viscum_err(&["attach", &to]);
    assert!(
        err.contains(&format!(
            "'{to}' is a redirect target (entries send traffic into it): attach to the client-facing interface"
        )),
        "{err}"
    );
    assert_eq!(snapshot(&lab), with_target);
    lab.viscum_ok(&["redirect", "del", ep, "--now"]);
}

/// `viscum run --check` on `text`: its stderr (it must fail).
/// A namespace left half-made (a `viscum ns add` killed between its steps: here the last
/// ones, `lo` up inside) is refused as a redirect target, naming what is missing and the
/// way out, and nothing changes; made again, it is taken.
#[test]
fn a_half_made_namespace_is_refused_as_a_target() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    lab.viscum_ok(&["attach", "lan0"]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    let out = std::process::Command::new("ip")
        .args(["-n", &ns, "link", "set", "lo", "down"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let before = snapshot(&lab);
    let err = lab.viscum_err(&["redirect", "add", "tcp://198.51.100.7:80", "--ns", &ns]);
    assert!(
        err.contains(&format!(
            "namespace {ns} is not a complete viscum service namespace: lo is down inside"
        )) && err.contains(&format!("`viscum ns del {ns}`, then `viscum ns add {ns}`")),
        "{err}"
    );
    assert_eq!(
        snapshot(&lab),
        before,
        "a refused redirect changed something"
    );
    lab.viscum_ok(&["ns", "del", &ns]);
    lab.viscum_ok(&["ns", "add", &ns]);
    // The build's last step, its ARP settings (read with the link, IFLA_INET_CONF), undone.
    let arp_announce = |v: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "sysctl", "-qw"])
            .arg(format!("net.ipv4.conf.eth0.arp_announce={v}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    arp_announce("0");
    let err = lab.viscum_err(&["redirect", "add", "tcp://198.51.100.7:80", "--ns", &ns]);
    assert!(
        err.contains(&format!(
            "namespace {ns} is not a complete viscum service namespace: its settings were never applied"
        )),
        "{err}"
    );
    arp_announce("2");
    lab.viscum_ok(&["redirect", "add", "tcp://198.51.100.7:80", "--ns", &ns]);
}

fn check_refuses(dir: &Path, text: &[u8]) -> String {
    let path = dir.join("viscum.toml");
    fs::write(&path, text).unwrap();
    let out = Command::new(viscum_bin())
        .args(["run", "--check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "accepted:\n{}\n{err}",
        String::from_utf8_lossy(text)
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn configuration_files_name_every_problem_in_the_files_terms() {
    if skip_unless_root() {
        return;
    }
    let files = DaemonFiles::new();
    let dir = files.dir();
    let svc = |extra: &str| {
        format!(
            "[[service]]\nname = \"web\"\nmatch = [\"tcp://198.51.100.7:80\"]\ncommand = [\"x\"]\n{extra}\n"
        )
    };
    let long = "y".repeat(10_000);
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            "[[service]\nname = \"web\"\n".into(),
            vec!["not valid TOML", "line 1"],
        ),
        ("name = \"web\"\n".into(), vec!["file: name: unknown section (expected [engine], [fleet] and [[service]])"]),
        ("service = 3\n".into(), vec!["file: service: must be an array of tables: write each one as [[service]]"]),
        (
            "[engine]\ncolour = \"blue\"\n".into(),
            vec!["engine: colour: unknown key (valid keys: interfaces, bpffs, control, run_dir, max_load, load_scope, storage_dir, metrics, dns, network)"],
        ),
        (
            format!(
                "[engine]\n[engine.network]\nrate = \"fast\"\nother_share = 0\n{}",
                svc("[service.network]\nshare = 101\nmax = \"20mb\"")
            ),
            vec![
                "engine: network.rate: 'fast' is not a rate: write a number and a unit, such as \"20mbit\"",
                "engine: network.other_share: 0 is not a share: a whole number from 1 to 100 (a weight)",
                "service web: network.share: 101 is not a share: a whole number from 1 to 100 (a weight)",
                "service web: network.max: '20mb': unknown unit 'mb' (bit, kbit, mbit, gbit, tbit,",
            ],
        ),
        (
            svc("[service.network]\nshare = \"big\"\nburst = 1"),
            vec![
                "service web: network.share: expected a whole number, found the string \"big\"",
                "service web: network.burst: unknown key (valid keys: share or max)",
            ],
        ),
        (
            svc("[service.network]\nshare = 3"),
            vec!["service web: network: needs [engine.network] with the client-facing link's rate (rate = \"100mbit\"): shares divide that link"],
        ),
        (
            "[engine.network]\nother_share = 2\n".into(),
            vec!["engine: network.rate: missing: the client-facing link's rate, such as \"100mbit\""],
        ),
        (
            svc("comand = [\"typo\"]"),
            vec!["service web: comand: unknown key (valid keys: name, match, command,"],
        ),
        (
            "[engine]\ninterfaces = \"br-lan\"\nmax_load = \"high\"\ncontrol = 5\n".into(),
            vec![
                "engine: interfaces: expected an array such as [\"a\", \"b\"], found the string \"br-lan\"",
                "engine: max_load: expected a number, found the string \"high\"",
                "engine: control: expected a path (a string in quotes), found the whole number 5",
            ],
        ),
        (
            svc("restart = 3\nnat = \"yes\"\n[service.health]\ninterval_ms = \"fast\"\n[service.limits]\nmemory = true\npids = 1.5"),
            vec![
                "service web: restart: expected a string (in quotes), found the whole number 3",
                "service web: nat: expected true or false, found the string \"yes\"",
                "service web: health.interval_ms: expected a whole number, found the string \"fast\"",
                "service web: limits.memory: expected a size: a string such as \"64M\", or a number of bytes",
                "service web: limits.pids: expected a whole number, found the number 1.5",
            ],
        ),
        (
            svc("health = 5"),
            vec!["service web: health: expected a table, found the whole number 5"],
        ),
        (
            svc("learn_ms = 700000\nstop_grace_ms = -1\n[service.health]\ntcp = 70000\nrise = 0\ninterval_ms = 100\ntimeout_ms = 200\n[service.limits]\ncpu = -1\nmemory = \"64Q\""),
            vec![
                "service web: learn_ms: 700000 must be between 0 and 600000",
                "service web: stop_grace_ms: -1 is negative",
                "service web: health.tcp: port 70000 out of range (1-65535)",
                "service web: health.rise: 0 must be between 1 and 1000",
                "service web: health.timeout_ms: 200 is longer than interval_ms (100)",
                "service web: limits.cpu: -1 must be a positive number of CPUs",
                "service web: limits.memory: '64Q' is not a size such as 64M, 512K or 1G",
            ],
        ),
        (
            svc("[service.limits]\nmemory = 64"),
            vec![
                "service web: limits.memory: 64 bytes is below the 1M minimum: give a unit, e.g. \"64M\"",
            ],
        ),
        (
            "[engine]\nmetrics = \"nope\"\ndns = [\"resolver.lan\"]\nbpffs = \"rel/dir\"\nmax_load = -1\n\n[[service]]\nname = \"web\"\nmatch = [\"tcp://198.51.100.300:80\", \"tcp://198.51.100.0/33:80\", \"sctp://198.51.100.7:80\", \"tcp://198.51.100.7:0\"]\ncommand = [\"x\"]\nfrom = \"192.0.2.0/40\"\nnat_to = \"10.0.0.1:99999\"\n".into(),
            vec![
                "engine: metrics: 'nope' is not an ADDRESS:PORT such as 127.0.0.1:9310",
                "engine: dns[0]: 'resolver.lan' is not an ADDRESS or ADDRESS:PORT",
                "engine: bpffs: 'rel/dir' must be an absolute path",
                "engine: max_load: -1 must be a positive fraction such as 0.9",
                "service web: match[0]: '198.51.100.300' is not an IPv4 or IPv6 address",
                "service web: match[1]: ",
                "service web: match[2]: unknown protocol 'sctp'",
                "service web: match[3]: port 0 is not a valid port",
                "service web: from: ",
                "service web: nat_to: port '99999' in '10.0.0.1:99999' is not a number between 1 and 65535",
            ],
        ),
        (
            "[engine]\ninterfaces = [\"lo\", \"vh-web\", \"../x\", \"a/b\", \"a:b\", \"br-lan\", \"br-lan\", \"this-is-too-long0\"]\n".into(),
            vec![
                "engine: interfaces[0]: 'lo' is the loopback interface: name the client-facing interface (e.g. br-lan)",
                "engine: interfaces[1]: 'vh-web' is the host side of service namespace web's veth",
                "engine: interfaces[2]: '../x' is not a valid interface name (1-15 characters, no '/', ':' or spaces)",
                "engine: interfaces[3]: 'a/b' is not a valid interface name",
                "engine: interfaces[4]: 'a:b' is not a valid interface name",
                "engine: interfaces[6]: br-lan is listed twice",
                "engine: interfaces[7]: 'this-is-too-long0' is not a valid interface name",
            ],
        ),
        (
            format!("{}{}", svc(""), svc("")),
            vec![
                "service #2: name: 'web' is already the name of service #1: each service needs a name of its own (it also names its namespace)",
                "service #2: match[0]: tcp://198.51.100.7:80 is already matched by service #1 (match[0])",
            ],
        ),
        (
            format!(
                "{}[[service]]\nname = \"api\"\nmatch = [\"tcp://198.51.100.9:443\", \"tcp://198.51.100.7:80\"]\ncommand = [\"x\"]\n",
                svc("")
            ),
            vec!["service api: match[1]: tcp://198.51.100.7:80 is already matched by service web (match[0])"],
        ),
        (
            format!(
                "[[service]]\nname = \"../x\"\nmatch = [\"tcp://198.51.100.1:80\"]\ncommand = [\"x\"]\n[[service]]\nname = \"a/b\"\nmatch = [\"tcp://198.51.100.2:80\"]\ncommand = [\"x\"]\n[[service]]\nname = \"$(x)\"\nmatch = [\"tcp://198.51.100.3:80\"]\ncommand = [\"x\"]\n[[service]]\nname = \"{long}\"\nmatch = [\"tcp://198.51.100.4:80\"]\ncommand = [\"x\"]\n[[service]]\nmatch = [\"tcp://198.51.100.5:80\"]\ncommand = [\"x\"]\n"
            ),
            vec![
                "service ../x: name: namespace name '../x' is invalid: use 1-12 characters a-z 0-9 - _",
                "service a/b: name: namespace name 'a/b' is invalid",
                "service $(x): name: namespace name '$(x)' is invalid",
                "name: namespace name 'yyyy",
                "service #5: name: missing",
            ],
        ),
        (
            svc("nat = false"),
            vec!["service web: nat: false is not a mode: a service's entries are translated (NAT) unless anyip = true or mirror = true"],
        ),
        (
            svc("anyip = true\nmirror = true\nnat_to = \"10.0.0.1\"\nuser = \"no-such-user\"\nenv = { \"A=B\" = \"1\" }"),
            vec![
                "service web: mode: anyip and NAT (nat, nat_to) cannot be combined: give one mode",
                "service web: mode: anyip and mirror cannot be combined: give one mode",
                "service web: user: unknown user 'no-such-user'",
                "service web: env.A=B: is not a valid variable name",
            ],
        ),
        ("[[service]]\n".into(), vec!["service #1: name: missing", "service #1: match: missing", "service #1: command: missing"]),
        // `[fleet]` (docs/configuration.md): every problem under its key.
        (
            "[fleet]\nservers = [\"nats://[bad\"]\nbox = \"a.b\"\ngroups = [\"g\", \"g\"]\nuser = \"u\"\nnkey = \"/k\"\nstatus_interval_ms = 5\ncheckpoint = \"rel\"\ncolour = \"red\"\n".into(),
            vec![
                "fleet: servers[0]: 'nats://[bad' is not a NATS server URL",
                "fleet: box: 'a.b' may hold only A-Z a-z 0-9 _ -",
                "fleet: groups[1]: g is listed twice",
                "fleet: user, nkey are given: use one kind of credentials (user and password, nkey or creds)",
                "fleet: status_interval_ms: 5 is below 100 (milliseconds)",
                "fleet: checkpoint: 'rel' is not an absolute path",
                "fleet: colour: unknown key (valid keys: servers, box, groups, user, password, nkey, creds, tls, status_interval_ms, checkpoint)",
            ],
        ),
        (
            "[fleet]\n[fleet.tls]\ncert = \"/c.pem\"\n".into(),
            vec![
                "fleet: servers: missing: at least one NATS server URL",
                "fleet: box: missing: this box's id",
                "fleet: tls.key: missing: a client certificate needs both cert and key",
            ],
        ),
        (
            svc("artifact = { name = \"a/b\", sha256 = \"zz\" }"),
            vec![
                "service web: artifact: only a service from the fleet's desired state (viscum_desired) may name an artifact",
                "service web: artifact.name: 'a/b' may not contain '/'",
                "service web: artifact.sha256: 'zz' is not a SHA-256 digest (64 hex digits)",
            ],
        ),
    ];
    for (text, wants) in &cases {
        let err = check_refuses(dir, text.as_bytes());
        for want in wants {
            assert!(
                err.contains(want),
                "expected {want:?} for\n{text}\nin:\n{err}"
            );
        }
        for rust in ["i64", "f64", "sequence", "struct Raw", "untagged enum"] {
            assert!(!err.contains(rust), "Rust's {rust:?} in:\n{err}");
        }
    }
    // Not text at all, and not a file.
    let err = check_refuses(dir, b"\xff\xfe[engine]\n");
    assert!(err.contains("cannot read configuration"), "{err}");
    assert!(err.contains("valid UTF-8"), "{err}");
    let out = Command::new(viscum_bin())
        .args(["run", "--check", "--config"])
        .arg(dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot read configuration"), "{err}");
    // `nat = false` next to the mode it leaves is accepted: it says what it does.
    let path = dir.join("viscum.toml");
    fs::write(&path, svc("nat = false\nanyip = true")).unwrap();
    let out = Command::new(viscum_bin())
        .args(["run", "--check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_reload_with_one_bad_service_changes_nothing() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let (a, b) = (lab.service_ns_name(), lab.service_ns_name());
    let with = |services: &[Service], extra_iface: Option<&str>| {
        let mut config = files.config();
        config.services = services.to_vec();
        if let Some(i) = extra_iface {
            config.engine.interfaces.push(i.into());
        }
        files.write(&config);
    };
    with(&[files.service(&a, 8080, "edge-a")], None);
    let daemon = Daemon::start(&lab, &files);
    let pid_a = daemon.wait_redirected(&a, UP);
    let entries = lab.viscum_ok(&["redirect", "list", "--json"]);
    let ctl = files.control();
    let ctl = ctl.to_str().unwrap();
    let unchanged = |daemon: &Daemon, what: &str| {
        let status = daemon.status();
        let names: Vec<&str> = status["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [a.as_str()], "{what}: {status:#}");
        let svc = daemon.service(&a);
        assert_eq!(svc["pid"], pid_a, "{what}: A was restarted");
        assert_eq!(svc["redirected"], true, "{what}");
        assert_eq!(
            lab.viscum_ok(&["redirect", "list", "--json"]),
            entries,
            "{what}: entries changed"
        );
        assert!(
            !viscum::netns::named_exists(&b),
            "{what}: B's namespace made"
        );
    };

    // A changed, B added, and one bad service: refused as a whole.
    let bad = Service {
        matches: vec!["tcp://198.51.100.7:70000".into()],
        ..files.service("bad", 8090, "edge-bad")
    };
    with(
        &[
            files.service(&a, 8080, "edge-a2"),
            files.service(&b, 8082, "edge-b"),
            bad,
        ],
        None,
    );
    let err = lab.viscum_err(&["reload", "--control", ctl]);
    assert!(
        err.contains("invalid configuration, nothing changed"),
        "{err}"
    );
    assert!(
        err.contains("service bad: match[0]: port '70000' is not a number between 1 and 65535"),
        "{err}"
    );
    unchanged(&daemon, "reload with a bad service");
    // The same file by SIGHUP.
    send_signal(daemon.pid(), Signal::SIGHUP);
    assert!(
        wait_until(UP, || daemon.log().contains("reload refused")),
        "{}",
        daemon.log()
    );
    // Named once, with the problem (a refused reload was logged twice).
    let log = daemon.log();
    assert_eq!(log.matches("port '70000'").count(), 1, "{log}");
    unchanged(&daemon, "SIGHUP with a bad service");
    // The same over the raw protocol: every problem listed.
    let r = daemon.request(r#"{"cmd":"reload"}"#).unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["problems"][0]
            .as_str()
            .unwrap()
            .starts_with("service bad: match[0]"),
        "{r}"
    );
    // A file that is valid but cannot be applied (an interface that does not exist, a
    // setting only a restart changes) is refused before anything is touched.
    with(
        &[
            files.service(&a, 8080, "edge-a2"),
            files.service(&b, 8082, "edge-b"),
        ],
        Some("nosuch0"),
    );
    let err = lab.viscum_err(&["reload", "--control", ctl]);
    assert!(err.contains("cannot apply, nothing changed"), "{err}");
    assert!(
        err.contains("engine: interfaces[1]: interface nosuch0 does not exist"),
        "{err}"
    );
    unchanged(&daemon, "reload with a missing interface");
    let mut config = files.config();
    config.services = vec![files.service(&a, 8080, "edge-a")];
    config.engine.run_dir = files.dir().join("elsewhere");
    files.write(&config);
    let err = lab.viscum_err(&["reload", "--control", ctl]);
    assert!(
        err.contains("engine: run_dir: cannot change while running (restart the daemon)"),
        "{err}"
    );
    unchanged(&daemon, "reload changing run_dir");
    // And a good file is applied, so the checks above could see a change.
    with(
        &[
            files.service(&a, 8080, "edge-a"),
            files.service(&b, 8082, "edge-b"),
        ],
        None,
    );
    let out = lab.viscum_ok(&["reload", "--control", ctl]);
    assert!(out.contains(&format!("added: {b}")), "{out}");
    daemon.wait_redirected(&b, UP);
    assert_eq!(daemon.service(&a)["pid"], pid_a);
}

/// A connection to the control socket with a read timeout.
fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Reads one reply line.
fn reply(reader: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// Everything left on the connection until the daemon closes it (within the read timeout).
fn rest(mut s: UnixStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A `status` from a fresh client answers, promptly.
fn status_is_prompt(daemon: &Daemon, during: &str) {
    let t = Instant::now();
    let r = daemon.request(r#"{"cmd":"status"}"#);
    let took = t.elapsed();
    assert_eq!(
        r.as_ref().map(|r| r["ok"] == true),
        Some(true),
        "status during {during}: {r:?}"
    );
    assert!(took < PROMPT, "status took {took:?} during {during}");
}

fn open_fds(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Lets this process hold `n` more descriptors (1,000 client sockets).
fn raise_fd_limit(n: libc::rlim_t) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim), 0);
        lim.rlim_cur = lim.rlim_max.min(lim.rlim_cur.max(n));
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim), 0);
    }
}

#[test]
fn the_control_socket_survives_hostile_clients_and_serves_the_others() {
    if skip_unless_root() {
        return;
    }
    raise_fd_limit(4096);
    let lab = Lab::new();
    let files = DaemonFiles::new();
    let web = lab.service_ns_name();
    let mut config = files.config();
    config.services.push(files.service(&web, 8080, "edge"));
    files.write(&config);
    let daemon = Daemon::start(&lab, &files);
    daemon.wait_redirected(&web, UP);
    let path = files.control();
    let fds_before = open_fds(daemon.pid());
    let started = Instant::now();

    // Slow misbehaviour first, so its timeouts run while the rest is tried: one client that
    // connects and says nothing, one that dribbles a line that never ends.
    let silent = connect(&path);
    let dribbler = {
        let mut s = connect(&path);
        thread::spawn(move || {
            let t = Instant::now();
            while s.write_all(b"x").is_ok() && t.elapsed() < Duration::from_secs(30) {
                thread::sleep(Duration::from_millis(100));
            }
            t.elapsed()
        })
    };
    // One that sends requests and never reads a reply.
    let greedy = {
        let mut s = connect(&path);
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        thread::spawn(move || {
            let t = Instant::now();
            let line = br#"{"cmd":"status"}"#.to_vec();
            let mut sent = 0usize;
            while s.write_all(&line).and_then(|()| s.write_all(b"\n")).is_ok() {
                sent += 1;
            }
            (sent, t.elapsed())
        })
    };
    status_is_prompt(&daemon, "a silent, a dribbling and a never-reading client");

    // Malformed requests: each gets an error naming the problem, and the same connection
    // still serves a good request afterwards.
    let deep = "[".repeat(60_000);
    let cases: &[(&[u8], &str)] = &[
        (
            b"nonsense",
            "bad request: not JSON: expected ident at line 1 column 2",
        ),
        (b"{\"cmd\":", "bad request: not JSON: EOF while parsing"),
        (
            b"[]",
            "bad request: expected a JSON object such as {\"cmd\":\"status\"}, got an array",
        ),
        (
            b"42",
            "bad request: expected a JSON object such as {\"cmd\":\"status\"}, got a number",
        ),
        (
            b"{}",
            "bad request: missing \"cmd\": one of status, start, stop, restart, reload",
        ),
        (
            b"{\"cmd\":null}",
            "bad request: \"cmd\" must be a string (one of status, start, stop, restart, reload, redirect-add, redirect-del), got null",
        ),
        (
            b"{\"cmd\":\"explode\"}",
            "bad request: unknown command \"explode\": expected one of status, start, stop, restart, reload",
        ),
        (
            b"{\"cmd\":\"stop\"}",
            "bad request: \"stop\" needs \"service\": the name of a configured service",
        ),
        (
            b"{\"cmd\":\"restart\",\"service\":[1]}",
            "bad request: \"service\" must be a string (a service name), got an array",
        ),
        (
            b"{\"cmd\":\"stop\",\"service\":\"../x\"}",
            "bad request: \"../x\" is not a service name (1-12 characters a-z 0-9 - _)",
        ),
        (
            b"{\"cmd\":\"start\",\"service\":\"$(x)\"}",
            "bad request: \"$(x)\" is not a service name",
        ),
        (
            b"{\"cmd\":\"stop\",\"service\":\"nosuch\"}",
            "no service named nosuch (configured: ",
        ),
        (
            b"{\"cmd\":\"reload\",\"service\":\"web\"}",
            "bad request: unknown key \"service\" for \"reload\" (it takes no other key)",
        ),
        (
            b"{\"cmd\":\"status\",\"verbose\":true}",
            "bad request: unknown key \"verbose\" for \"status\" (it takes no other key)",
        ),
        (b"\xff\xfe\xfd", "bad request: not UTF-8 text"),
        (b"\0\0\0", "bad request: not JSON"),
        (
            deep.as_bytes(),
            "bad request: not JSON: recursion limit exceeded",
        ),
    ];
    for (line, want) in cases {
        let mut s = connect(&path);
        let mut reader = BufReader::new(s.try_clone().unwrap());
        s.write_all(line).unwrap();
        s.write_all(b"\n").unwrap();
        let r = reply(&mut reader);
        let got = r["error"].as_str().unwrap_or_default();
        assert_eq!(r["ok"], false, "{}: {r}", String::from_utf8_lossy(line));
        assert!(
            got.starts_with(want),
            "{}: {got:?} does not start with {want:?}",
            String::from_utf8_lossy(&line[..line.len().min(80)])
        );
        s.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
        assert_eq!(reply(&mut reader)["ok"], true, "the connection broke");
    }

    // A request written in pieces (a byte at a time) is one request.
    let mut s = connect(&path);
    let mut reader = BufReader::new(s.try_clone().unwrap());
    for b in b"{\"cmd\":\"status\"}\n" {
        s.write_all(&[*b]).unwrap();
        thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(reply(&mut reader)["ok"], true);
    // The last line without its newline, then end of file: still answered.
    s.write_all(b"{\"cmd\":\"sta").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let r = reply(&mut reader);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .starts_with("bad request: not JSON: EOF while parsing"),
        "{r}"
    );
    // Connect and leave at once, many times: nothing to answer, nothing broken.
    for _ in 0..100 {
        drop(UnixStream::connect(&path).unwrap());
    }

    // An oversized line: an error, then the connection is closed.
    let mut s = connect(&path);
    let big = vec![b'x'; 100_000];
    let _ = s.write_all(&big); // the daemon may close before taking it all
    let got = rest(s);
    assert!(
        got.contains("bad request: line longer than 65536 bytes: closing the connection"),
        "{got:?}"
    );
    status_is_prompt(&daemon, "an oversized line");

    // 1,000 concurrent connections: all open at once, each served.
    let t = Instant::now();
    let clients: Vec<UnixStream> = (0..1000).map(|_| connect(&path)).collect();
    status_is_prompt(&daemon, "1,000 idle connections");
    for mut c in &clients {
        c.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    }
    let served = clients
        .into_iter()
        .filter(|c| reply(&mut BufReader::new(c.try_clone().unwrap()))["ok"] == true)
        .count();
    assert_eq!(served, 1000);
    println!(
        "1,000 concurrent status requests served in {:?}",
        t.elapsed()
    );

    // The never-reading client is dropped once its replies no longer fit (5 s write
    // timeout); the others were served meanwhile.
    let (sent, took) = greedy.join().unwrap();
    println!("a client that never reads was disconnected after {sent} requests, {took:?}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    // The silent and the dribbling clients are told and disconnected after 10 s.
    let got = rest(silent);
    assert!(
        got.contains("no complete request line within 10 s: closing the connection"),
        "{got:?}"
    );
    let took = dribbler.join().unwrap();
    assert!(
        took < Duration::from_secs(20),
        "a never-ending line kept its connection for {took:?}"
    );
    println!("silent and dribbling clients disconnected ({took:?})");

    // Still alive, still serving, and nothing left open by all of this.
    status_is_prompt(&daemon, "the end");
    assert!(
        wait_until(Duration::from_secs(10), || open_fds(daemon.pid())
            <= fds_before),
        "the daemon holds {} descriptors, {fds_before} before",
        open_fds(daemon.pid())
    );
    println!("hostile clients handled in {:?}", started.elapsed());
    daemon.wait_redirected(&web, UP);
    assert!(daemon.stop().success());
}
