//! The lab: a client, an edge box running viscum and a cloud, as network
//! namespaces on this machine, left running until Ctrl-C.
//!
//! ```text
//!  vlab-client            vlab-edge (viscum on lan0)          vlab-cloud
//!  eth0 192.0.2.2  <-> lan0 192.0.2.1   wan0 198.51.100.1 <-> eth0 198.51.100.7
//!                           |                                  http.server :80 "CLOUD"
//!                        labsvc (viscum ns): http.server :80 "EDGE copy"
//! ```
//!
//! This is a developer tool, so unlike the product it may drive `ip`,
//! `python3`, `curl` and `nsenter`. Everything it creates has a fixed name
//! (fine for a lab that exists once per machine), which is what lets a new lab
//! remove whatever a crashed one left behind. Teardown runs on Ctrl-C, on
//! SIGTERM/SIGHUP, on any error and on panic (a `Drop` guard).

use std::{
    fs::{self, File},
    io::Read as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    mount::{MntFlags, umount2},
    sched::{CloneFlags, setns},
    sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal},
    unistd::Pid,
};

use crate::process;

const CLIENT_NS: &str = "vlab-client";
const EDGE_NS: &str = "vlab-edge";
const CLOUD_NS: &str = "vlab-cloud";
/// Created and removed by viscum itself (`viscum ns add/del`).
const SERVICE_NS: &str = "labsvc";
/// The client-facing interface of the edge, where viscum's classifier sits.
const LAN_IFACE: &str = "lan0";

const LAB_DIR: &str = "/run/viscum-lab";
/// viscum's pins. Outside /sys on purpose: `ip netns exec` gives its command
/// a fresh sysfs, so a bpffs under /sys/fs/bpf is not shared across commands,
/// while one under /run (in the root mount namespace) is.
const BPFFS: &str = "/run/viscum-lab/bpf";

const CLOUD_V4: &str = "198.51.100.7";
const CLOUD_V6: &str = "2001:db8:f::7";
const CLOUD_PAGE: &str = "hello from the CLOUD (198.51.100.7)";
const EDGE_PAGE: &str = "hello from the EDGE copy (namespace labsvc)";

/// How long a server gets to start listening before the lab gives up.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(15);

/// Set by SIGINT/SIGTERM/SIGHUP; the lab polls it between steps and while it waits.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    // Only an atomic store: nothing else is async-signal-safe here.
    STOP.store(true, Ordering::SeqCst);
}

fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Starts the lab with the `viscum` binary at `viscum` and keeps it up until
/// a signal; always removes it again.
pub fn run(viscum: &Path) -> Result<ExitCode> {
    if !process::is_root() {
        bail!("the lab creates network namespaces and attaches eBPF programs: run it as root");
    }
    install_signal_handlers()?;

    let mut lab = Lab {
        viscum: viscum.to_path_buf(),
        servers: Vec::new(),
        torn_down: false,
    };
    if leftovers_exist() {
        println!("lab: removing what a previous lab left behind");
        lab.teardown();
    }
    lab.torn_down = false;

    if let Err(e) = lab.start() {
        if stop_requested() {
            // Ctrl-C during setup: whatever step was running died of it too;
            // that is not an error worth showing.
            println!("\nlab: interrupted while starting");
            lab.teardown();
            return Ok(ExitCode::from(130));
        }
        return Err(e);
    }
    print_banner(viscum);

    let mut reported_dead = vec![false; lab.servers.len()];
    while !stop_requested() {
        for (server, reported) in lab.servers.iter_mut().zip(&mut reported_dead) {
            if !*reported && let Ok(Some(status)) = server.child.try_wait() {
                eprintln!(
                    "warning: lab: the {} server exited ({status}); see {}",
                    server.name,
                    server.log.display()
                );
                *reported = true;
            }
        }
        // Polling a flag set by the signal handler; 200 ms is plenty for Ctrl-C.
        thread::sleep(Duration::from_millis(200));
    }
    println!("\nlab: stopping");
    let errors = lab.teardown();
    if errors > 0 {
        eprintln!("lab: teardown finished with {errors} error(s), see above");
        return Ok(ExitCode::FAILURE);
    }
    println!("lab: removed");
    Ok(ExitCode::SUCCESS)
}

fn install_signal_handlers() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        // SA_RESTART: a signal must not turn a half-done `read` in std into an
        // error; the flag is what tells us to stop.
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { signal::sigaction(sig, &action) }
            .with_context(|| format!("cannot handle {sig}"))?;
    }
    Ok(())
}

/// A server process the lab started, and where its output goes.
struct Server {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// The running lab. Dropping it tears everything down.
struct Lab {
    /// Absolute path of the `viscum` binary (also printed in the banner).
    viscum: PathBuf,
    /// Servers to stop first on teardown; each leads its own process group.
    servers: Vec<Server>,
    /// Set once torn down, so `Drop` does not do it twice.
    torn_down: bool,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.torn_down {
            println!("lab: tearing down after an error");
            self.teardown();
        }
    }
}

impl Lab {
    /// Builds the topology, starts both servers and points viscum at the edge copy.
    fn start(&mut self) -> Result<()> {
        self.topology()?;
        checkpoint()?;

        let cloud_www = web_root("www-cloud", CLOUD_PAGE)?;
        self.serve("cloud", CLOUD_NS, &cloud_www)?;
        // Before any redirect the cloud must answer: if not, the topology is
        // broken and nothing viscum does later would mean anything.
        expect_page(&format!("http://{CLOUD_V4}/"), "CLOUD")
            .context("the client cannot reach the cloud over IPv4")?;
        expect_page(&format!("http://[{CLOUD_V6}]/"), "CLOUD")
            .context("the client cannot reach the cloud over IPv6")?;
        checkpoint()?;

        fs::create_dir_all(BPFFS).with_context(|| format!("cannot create {BPFFS}"))?;
        self.viscum(&["attach", LAN_IFACE])?;
        self.viscum(&["ns", "add", SERVICE_NS])?;
        let edge_www = web_root("www-edge", EDGE_PAGE)?;
        self.serve("edge copy", SERVICE_NS, &edge_www)?;
        checkpoint()?;
        self.viscum(&[
            "redirect",
            "add",
            &format!("tcp://{CLOUD_V4}:80"),
            "--ns",
            SERVICE_NS,
        ])?;
        self.viscum(&[
            "redirect",
            "add",
            &format!("tcp://[{CLOUD_V6}]:80"),
            "--ns",
            SERVICE_NS,
        ])?;

        // The redirect is what the lab is for, but a broken one is exactly
        // when a developer wants the lab up to look at it: warn, keep going.
        for url in [
            format!("http://{CLOUD_V4}/"),
            format!("http://[{CLOUD_V6}]/"),
        ] {
            if let Err(e) = expect_page(&url, "EDGE") {
                eprintln!("warning: lab: the redirect does not work yet: {e:#}");
            }
        }
        Ok(())
    }

    /// Namespaces, veths, addresses, routes and forwarding.
    fn topology(&self) -> Result<()> {
        for ns in [CLIENT_NS, EDGE_NS, CLOUD_NS] {
            ip(&["netns", "add", ns])?;
        }
        // Each veth is created in one namespace with its peer in the edge.
        ip(&[
            "-n", CLIENT_NS, "link", "add", "eth0", "type", "veth", "peer", "name", LAN_IFACE,
            "netns", EDGE_NS,
        ])?;
        ip(&[
            "-n", CLOUD_NS, "link", "add", "eth0", "type", "veth", "peer", "name", "wan0", "netns",
            EDGE_NS,
        ])?;

        // nodad: the lab must be usable at once, not after IPv6 duplicate
        // address detection has finished (about a second of "tentative").
        let addrs: [(&str, &str, &str, &str); 4] = [
            (CLIENT_NS, "eth0", "192.0.2.2/24", "2001:db8:c::2/64"),
            (EDGE_NS, LAN_IFACE, "192.0.2.1/24", "2001:db8:c::1/64"),
            (EDGE_NS, "wan0", "198.51.100.1/24", "2001:db8:f::1/64"),
            (CLOUD_NS, "eth0", "198.51.100.7/24", "2001:db8:f::7/64"),
        ];
        for (ns, dev, v4, v6) in addrs {
            ip(&["-n", ns, "addr", "add", v4, "dev", dev])?;
            ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        for ns in [CLIENT_NS, EDGE_NS, CLOUD_NS] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&[
            "-n",
            CLIENT_NS,
            "route",
            "add",
            "default",
            "via",
            "192.0.2.1",
        ])?;
        ip(&[
            "-n",
            CLIENT_NS,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:c::1",
        ])?;
        ip(&[
            "-n",
            CLOUD_NS,
            "route",
            "add",
            "default",
            "via",
            "198.51.100.1",
        ])?;
        ip(&[
            "-n",
            CLOUD_NS,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:f::1",
        ])?;

        // The edge routes between client and cloud. Written from a thread
        // inside the namespace: /proc/sys/net belongs to the writer's netns,
        // and this way we do not depend on procps' `sysctl` being installed.
        in_netns(EDGE_NS, || {
            for (key, value) in [
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv6/conf/all/forwarding", "1"),
            ] {
                println!("+ [{EDGE_NS}] sysctl {}={value}", key.replace('/', "."));
                fs::write(Path::new("/proc/sys").join(key), value)
                    .with_context(|| format!("cannot set {key}"))?;
            }
            Ok(())
        })
    }

    /// Starts `python3 -m http.server 80` in `ns`, serving `root`, and waits
    /// until it listens.
    fn serve(&mut self, name: &'static str, ns: &str, root: &Path) -> Result<()> {
        let log = Path::new(LAB_DIR).join(format!("{}.log", name.replace(' ', "-")));
        let log_file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new("ip");
        // `--bind ::` makes http.server dual-stack (IPv4 and IPv6).
        cmd.args([
            "netns",
            "exec",
            ns,
            "python3",
            "-m",
            "http.server",
            "80",
            "--bind",
            "::",
        ])
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        // Own process group: Ctrl-C in the terminal reaches only xtask,
        // which then stops the servers in order during teardown.
        .process_group(0);
        println!(
            "+ (cd {} && {}) >{} 2>&1 &",
            root.display(),
            process::display(&cmd),
            log.display()
        );
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", process::display(&cmd)))?;
        let pid = child.id();
        self.servers.push(Server {
            name,
            child,
            log: log.clone(),
        });
        let server = self.servers.last_mut().expect("just pushed");

        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "the {name} server in {ns} exited ({status}):\n{}",
                    fs::read_to_string(&log).unwrap_or_default().trim()
                );
            }
            if listens_on(pid, 80) {
                return Ok(());
            }
            checkpoint()?;
            if Instant::now() > deadline {
                bail!(
                    "the {name} server in {ns} is not listening on port 80 after {LISTEN_TIMEOUT:?}; see {}",
                    log.display()
                );
            }
            // Readiness poll, bounded by the deadline above.
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `viscum --bpffs BPFFS ARGS...` in the edge namespace; fails
    /// loudly with the command and its stderr.
    fn viscum(&self, args: &[&str]) -> Result<()> {
        let mut cmd = self.viscum_cmd(args);
        println!("+ {}", process::display(&cmd));
        let out = process::capture(&mut cmd)?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            bail!(
                "`{}` failed ({}):\n{}",
                process::display(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// `nsenter --net=...`, not `ip netns exec`: the latter would give viscum
    /// a private mount namespace in which its bpffs mount is a throwaway
    /// instance, so nothing it pinned would outlive the command.
    fn viscum_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{EDGE_NS}"))
            .arg(&self.viscum)
            .args(["--bpffs", BPFFS])
            .args(args);
        cmd
    }

    /// Removes everything the lab may have created, in reverse order, going
    /// on past errors. Returns how many steps failed (each is printed).
    fn teardown(&mut self) -> usize {
        self.torn_down = true;
        let mut errors = 0;
        let mut report = |what: &str, e: anyhow::Error| {
            eprintln!("lab: teardown: {what}: {e:#}");
            errors += 1;
        };

        for server in self.servers.drain(..) {
            stop_server(server);
        }
        // Whatever else runs in the lab's namespaces (a crashed lab's
        // servers, a shell a developer left in vlab-client) would keep them
        // alive after `ip netns del`.
        for ns in [SERVICE_NS, CLOUD_NS, CLIENT_NS, EDGE_NS] {
            kill_netns_processes(ns);
        }

        let edge_exists = netns_exists(EDGE_NS);
        if netns_exists(SERVICE_NS) {
            if edge_exists && let Err(e) = self.teardown_viscum(&["ns", "del", SERVICE_NS]) {
                report("viscum ns del", e);
            }
            // viscum could not do it (or the edge is gone): do not leave it behind.
            if netns_exists(SERVICE_NS)
                && let Err(e) = ip(&["netns", "del", SERVICE_NS])
            {
                report("removing the service namespace", e);
            }
        }
        // Without a mounted bpffs there are no pins, so nothing stays attached.
        if edge_exists
            && is_mount_point(BPFFS)
            && let Err(e) = self.teardown_viscum(&["detach", LAN_IFACE])
        {
            report("viscum detach", e);
        }
        for ns in [CLIENT_NS, CLOUD_NS, EDGE_NS] {
            if netns_exists(ns)
                && let Err(e) = ip(&["netns", "del", ns])
            {
                report("removing a namespace", e);
            }
        }
        // Unmounting drops viscum's pins, and with them the maps and links.
        for _ in 0..8 {
            if !is_mount_point(BPFFS) {
                break;
            }
            println!("+ umount {BPFFS}");
            if let Err(e) = umount2(BPFFS, MntFlags::MNT_DETACH) {
                report(&format!("umount {BPFFS}"), e.into());
                break;
            }
        }
        for dir in ["www-cloud", "www-edge"] {
            let _ = fs::remove_dir_all(Path::new(LAB_DIR).join(dir));
        }
        for log in ["cloud.log", "edge-copy.log"] {
            let _ = fs::remove_file(Path::new(LAB_DIR).join(log));
        }
        // Plain rmdir, never remove_dir_all: if the bpffs is still mounted we
        // must not walk into it.
        let _ = fs::remove_dir(BPFFS);
        let _ = fs::remove_dir(LAB_DIR);
        errors
    }

    fn teardown_viscum(&self, args: &[&str]) -> Result<()> {
        let mut cmd = self.viscum_cmd(args);
        println!("+ {}", process::display(&cmd));
        process::output(&mut cmd).map(drop)
    }
}

/// Fails with "interrupted" once a signal asked the lab to stop, so setup
/// steps do not carry on building a lab that is about to be removed.
fn checkpoint() -> Result<()> {
    if stop_requested() {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs `ip ARGS...`, printing it.
fn ip(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    println!("+ {}", process::display(&cmd));
    process::output(&mut cmd).map(drop)
}

fn netns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

fn leftovers_exist() -> bool {
    [CLIENT_NS, EDGE_NS, CLOUD_NS, SERVICE_NS]
        .iter()
        .any(|ns| netns_exists(ns))
        || is_mount_point(BPFFS)
        || Path::new(LAB_DIR).exists()
}

/// Runs `f` on a thread that has entered network namespace `ns`; only that
/// thread changes namespace, the rest of xtask stays where it is.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = Path::new("/run/netns").join(ns);
    let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    thread::scope(|s| {
        s.spawn(|| {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("cannot enter network namespace {ns}"))?;
            f()
        })
        .join()
        .expect("the namespace thread panicked")
    })
}

/// Writes `index.html` with `page` into a fresh `LAB_DIR/<name>`.
fn web_root(name: &str, page: &str) -> Result<PathBuf> {
    let dir = Path::new(LAB_DIR).join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::write(dir.join("index.html"), format!("{page}\n"))?;
    Ok(dir)
}

/// `true` once the process `pid` (in its own network namespace) has a TCP
/// socket listening on `port`.
///
/// `/proc/PID/net` shows the sockets of PID's network namespace, which works
/// even where `lo` is down and needs no client tool.
fn listens_on(pid: u32, port: u16) -> bool {
    let local = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|file| {
        let mut text = String::new();
        File::open(format!("/proc/{pid}/net/{file}"))
            .and_then(|mut f| f.read_to_string(&mut text))
            .is_ok()
            && text.lines().skip(1).any(|line| {
                let mut fields = line.split_whitespace();
                // sl, local_address, rem_address, st (0A = LISTEN)
                let local_addr = fields.nth(1).unwrap_or("");
                let state = fields.nth(1).unwrap_or("");
                local_addr.ends_with(&local) && state == "0A"
            })
    })
}

/// Fetches `url` from the client namespace and checks the page has `want` in it.
fn expect_page(url: &str, want: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    // -g: do not read the brackets of an IPv6 URL as a curl glob.
    cmd.args([
        "netns",
        "exec",
        CLIENT_NS,
        "curl",
        "-sS",
        "-g",
        "--max-time",
        "5",
        url,
    ]);
    let page = process::output(&mut cmd)?;
    let page = page.trim();
    if !page.contains(want) {
        bail!("{url} from {CLIENT_NS} answered {page:?}, expected the {want} page");
    }
    println!("lab: {CLIENT_NS} -> {url}: {page}");
    Ok(())
}

/// Stops a server's process group: SIGTERM, then SIGKILL if it lingers.
fn stop_server(mut server: Server) {
    let pgid = Pid::from_raw(i32::try_from(server.child.id()).expect("pid fits i32"));
    if matches!(server.child.try_wait(), Ok(None)) {
        println!("+ kill -TERM -{pgid}  # {} server", server.name);
    }
    let _ = signal::killpg(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while matches!(server.child.try_wait(), Ok(None)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let _ = signal::killpg(pgid, Signal::SIGKILL);
    let _ = server.child.wait();
}

/// Kills every process still in network namespace `ns`, if it exists.
fn kill_netns_processes(ns: &str) {
    if !netns_exists(ns) {
        return;
    }
    let Ok(pids) = process::output(Command::new("ip").args(["netns", "pids", ns])) else {
        return;
    };
    let pids: Vec<Pid> = pids
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .map(Pid::from_raw)
        .collect();
    for &pid in &pids {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default();
        println!("+ kill -TERM {pid}  # left in {ns}: {cmdline}");
        let _ = signal::kill(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while pids.iter().any(|&p| signal::kill(p, None).is_ok()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    for &pid in &pids {
        let _ = signal::kill(pid, Signal::SIGKILL);
    }
}

/// `true` when something is mounted exactly at `path` (from /proc/self/mountinfo).
fn is_mount_point(path: &str) -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines()
            .any(|l| l.split_whitespace().nth(4) == Some(path))
    })
}

fn print_banner(viscum: &Path) {
    let v = format!(
        "nsenter --net=/run/netns/{EDGE_NS} {} --bpffs {BPFFS}",
        viscum.display()
    );
    println!(
        r#"
================================ Viscum lab ================================

  {CLIENT_NS}            {EDGE_NS}                          {CLOUD_NS}
  eth0 192.0.2.2  <-> lan0 192.0.2.1    wan0 198.51.100.1 <-> eth0 198.51.100.7
       2001:db8:c::2       2001:db8:c::1      2001:db8:f::1          2001:db8:f::7
                       viscum on lan0 (TC ingress)           http.server :80: CLOUD page
                        |  tcp/80 to the cloud address
                        v
                      {SERVICE_NS} (viscum ns): http.server :80: EDGE page

  The client talks to the cloud address; viscum hands tcp/80 for it to the
  copy in {SERVICE_NS}, which answers as {CLOUD_V4} / {CLOUD_V6}.

Try, in another terminal, as root:

  ip netns exec {CLIENT_NS} curl -s http://{CLOUD_V4}/
  ip netns exec {CLIENT_NS} curl -s -g 'http://[{CLOUD_V6}]/'
  {v} redirect list
  {v} stats
  {v} redirect del tcp://{CLOUD_V4}:80
  ip netns exec {CLIENT_NS} curl -s http://{CLOUD_V4}/     # the CLOUD answers again
  {v} redirect add tcp://{CLOUD_V4}:80 --ns {SERVICE_NS}   # the EDGE copy is back

Server logs: {LAB_DIR}/cloud.log and {LAB_DIR}/edge-copy.log
Ctrl-C removes the whole lab.
============================================================================"#
    );
}
