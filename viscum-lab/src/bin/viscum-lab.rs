//! `viscum-lab` (started by `cargo xtask run`): a client, an edge box running viscum and a
//! cloud, as network namespaces on this machine, left running until Ctrl-C.
//!
//! ```text
//!  vlab-client            vlab-edge (viscum on lan0)          vlab-cloud
//!  eth0 192.0.2.2  <-> lan0 192.0.2.1   wan0 198.51.100.1 <-> eth0 198.51.100.7
//!                           |                                  web server :80 "CLOUD"
//!                        vlabsvc (viscum ns): web server :80 "EDGE copy"
//! ```
//!
//! The topology is [`viscum_lab::Lab`], the one the integration tests and the benchmarks
//! build, with fixed names (`--prefix`, `vlab` by default), so a new lab removes whatever a
//! crashed one left behind. The two web servers are threads of this process (a socket
//! opened inside each namespace), so they end with it.
//!
//! Teardown is dropping the lab: on Ctrl-C, SIGTERM or SIGHUP, on any error and on panic.
//! Nothing here writes with `println!`: with the output in a pipe (`cargo xtask run | tee
//! log`), Ctrl-C ends the reader too, and a panicking `println!` during teardown used to leave
//! every namespace and the bpffs behind ([`viscum_lab::say`]).

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use viscum::netns;
use viscum_lab::{
    Bpffs, Lab, LabNames, LabOptions,
    guard::delete_quietly,
    lab::{CLOUD_V4, CLOUD_V6},
    say, shout,
};

/// Options of the lab.
#[derive(Parser)]
#[command(about = "Viscum's lab: client, edge (viscum) and cloud namespaces until Ctrl-C")]
struct Args {
    /// The viscum binary to run in the edge namespace.
    #[arg(long, value_name = "PATH")]
    viscum: PathBuf,
    /// Names: PREFIX-client, PREFIX-edge, PREFIX-cloud and the service namespace PREFIXsvc
    /// (at most 9 characters, for viscum's 12-character service names).
    #[arg(long, default_value = "vlab")]
    prefix: String,
    /// Directory for viscum's pins (a bpffs is mounted on DIR/bpf). Outside /sys on purpose:
    /// `ip netns exec` gives its command a fresh sysfs, so a bpffs under /sys/fs/bpf is not
    /// shared across commands, while one under /run is.
    #[arg(long, value_name = "DIR", default_value = "/run/viscum-lab")]
    dir: PathBuf,
}

const CLOUD_PAGE: &str = "hello from the CLOUD (198.51.100.7)";
/// How long one viscum command may take (loading the datapath included).
const VISCUM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one page fetch from the client may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Set by SIGINT/SIGTERM/SIGHUP; the lab polls it between steps and while it waits.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: nothing else is async-signal-safe here.
    STOP.store(true, Ordering::SeqCst);
}

fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            shout!("error: lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab creates network namespaces and attaches eBPF programs: run it as root");
    }
    if args.prefix.is_empty() || args.prefix.len() > 9 {
        bail!(
            "--prefix {:?}: must be 1 to 9 characters (the service namespace PREFIXsvc is limited to 12)",
            args.prefix
        );
    }
    let viscum = std::path::absolute(&args.viscum)
        .with_context(|| format!("cannot resolve {}", args.viscum.display()))?;
    if !viscum.is_file() {
        bail!("--viscum {}: no such file", viscum.display());
    }
    install_signal_handlers()?;

    let names = LabNames::with_prefix(&args.prefix);
    let service = format!("{}svc", args.prefix);
    let leftovers: Vec<&str> = names
        .all()
        .into_iter()
        .chain([service.as_str()])
        .filter(|n| netns::named_exists(n))
        .collect();
    if !leftovers.is_empty() {
        say!("lab: removing what a previous lab left behind: {leftovers:?}");
        for name in leftovers {
            delete_quietly(name);
        }
    }

    let bpffs_dir = args.dir.join("bpf");
    let bpffs = Bpffs::mount_at(&bpffs_dir)
        .with_context(|| format!("cannot mount a bpffs on {}", bpffs_dir.display()))?;
    say!(
        "+ lab: namespaces {}, {}, {}; bpffs {}",
        names.client,
        names.edge,
        names.cloud,
        bpffs_dir.display()
    );
    // Once the bpffs (and with it DIR/bpf) is gone, DIR goes too; plain rmdir, so nothing
    // but an empty directory is ever removed.
    let remove_dir = || {
        let _ = std::fs::remove_dir(&args.dir);
    };
    let lab = match Lab::build(&names, bpffs, LabOptions::default()) {
        Ok(lab) => lab,
        Err(e) => {
            remove_dir();
            return Err(e.into());
        }
    };
    // From here on the lab is removed when `lab` is dropped: on return, error or panic.
    if let Err(e) = start(&lab, &viscum, &service) {
        let code = if stop_requested() {
            // Ctrl-C during setup: not an error worth showing.
            say!("\nlab: interrupted while starting; removing it");
            ExitCode::from(130)
        } else {
            shout!("error: lab: {e:#}");
            say!("lab: removing it");
            ExitCode::FAILURE
        };
        drop(lab);
        remove_dir();
        return Ok(code);
    }
    print_banner(&lab, &viscum, &service);
    // The line tests and scripts wait for.
    say!("lab: ready");

    while !stop_requested() {
        // Polling a flag set by the signal handler; 200 ms is plenty for Ctrl-C.
        thread::sleep(Duration::from_millis(200));
    }
    say!("\nlab: stopping");
    drop(lab);
    remove_dir();
    say!("lab: removed");
    Ok(ExitCode::SUCCESS)
}

fn install_signal_handlers() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        // SA_RESTART: a signal must not turn a half-done `read` into an error; the flag is
        // what tells us to stop.
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

/// Fails with "interrupted" once a signal asked the lab to stop, so setup does not carry on
/// building a lab that is about to be removed.
fn checkpoint() -> Result<()> {
    if stop_requested() {
        bail!("interrupted");
    }
    Ok(())
}

/// Starts the cloud's server, attaches viscum, makes the service namespace with its copy and
/// points viscum at it.
fn start(lab: &Lab, viscum: &Path, service: &str) -> Result<()> {
    serve(lab.cloud.name(), CLOUD_PAGE)?;
    // Before any redirect the cloud must answer: if not, the topology is broken and nothing
    // viscum does later would mean anything.
    for addr in lab.cloud_addrs(80) {
        expect_page(lab, addr, "CLOUD")
            .with_context(|| format!("the client cannot reach the cloud at {addr}"))?;
    }
    checkpoint()?;

    run_viscum(lab, viscum, &["attach", lab.lan_if()])?;
    checkpoint()?;
    lab.own_service_ns(service);
    run_viscum(lab, viscum, &["ns", "add", service])?;
    serve(
        service,
        &format!("hello from the EDGE copy (namespace {service})"),
    )?;
    checkpoint()?;
    for addr in lab.cloud_addrs(80) {
        run_viscum(
            lab,
            viscum,
            &["redirect", "add", &format!("tcp://{addr}"), "--ns", service],
        )?;
    }
    // The redirect is what the lab is for, but a broken one is exactly when a developer
    // wants the lab up to look at it: warn, keep going.
    for addr in lab.cloud_addrs(80) {
        if let Err(e) = expect_page(lab, addr, "EDGE") {
            shout!("warning: lab: the redirect does not work yet: {e:#}");
        }
    }
    Ok(())
}

/// Runs `viscum --bpffs <lab bpffs> ARGS` in the edge namespace, printing it and its output;
/// fails with its stderr.
fn run_viscum(lab: &Lab, viscum: &Path, args: &[&str]) -> Result<()> {
    say!(
        "+ viscum --bpffs {} {}",
        lab.bpffs.path().display(),
        args.join(" ")
    );
    let out = lab
        .run_viscum(viscum, VISCUM_TIMEOUT, args)
        .with_context(|| format!("viscum {}", args.join(" ")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        say!("{}", stdout.trim_end());
    }
    if !out.status.success() {
        bail!(
            "viscum {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A web server on `[::]:80` (IPv4 and IPv6) in namespace `ns`, answering every request with
/// `page`: a socket opened inside the namespace, served by a thread of this process.
fn serve(ns: &str, page: &str) -> Result<()> {
    let listener = netns::in_netns(ns, || TcpListener::bind((Ipv6Addr::UNSPECIFIED, 80)))
        .with_context(|| format!("cannot enter {ns}"))?
        .with_context(|| format!("cannot listen on port 80 in {ns}"))?;
    let page = page.to_owned();
    say!("+ lab: web server on [::]:80 in {ns}: {page:?}");
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let _ = answer(conn, &page);
        }
    });
    Ok(())
}

/// Reads one request (up to its blank line) and answers 200 with `page`.
fn answer(mut conn: TcpStream, page: &str) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        match conn.read(&mut buf)? {
            0 => break,
            n => request.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!("{page}\n");
    write!(
        conn,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Fetches `http://ADDR/` from the client namespace and checks the page has `want` in it.
fn expect_page(lab: &Lab, addr: SocketAddr, want: &str) -> Result<()> {
    let page = fetch(lab.client.name(), addr)?;
    if !page.contains(want) {
        bail!(
            "http://{addr}/ from {} answered {page:?}, expected the {want} page",
            lab.client.name()
        );
    }
    say!(
        "lab: {} -> http://{addr}/: {}",
        lab.client.name(),
        page.trim()
    );
    Ok(())
}

/// The body of `GET /` at `addr`, fetched from a thread inside namespace `ns`.
fn fetch(ns: &str, addr: SocketAddr) -> Result<String> {
    let text = netns::in_netns(ns, move || -> io::Result<String> {
        let mut conn = TcpStream::connect_timeout(&addr, FETCH_TIMEOUT)?;
        conn.set_read_timeout(Some(FETCH_TIMEOUT))?;
        let host = match addr.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        write!(conn, "GET / HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        Ok(text)
    })
    .with_context(|| format!("cannot enter {ns}"))?
    .with_context(|| format!("GET http://{addr}/ from {ns}"))?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or(text))
}

fn print_banner(lab: &Lab, viscum: &Path, service: &str) {
    let (client, edge, cloud) = (lab.client.name(), lab.edge.name(), lab.cloud.name());
    let v = format!(
        "nsenter --net=/run/netns/{edge} {} --bpffs {}",
        viscum.display(),
        lab.bpffs.path().display()
    );
    say!(
        r#"
================================ Viscum lab ================================

  {client}            {edge}                          {cloud}
  eth0 192.0.2.2  <-> lan0 192.0.2.1    wan0 198.51.100.1 <-> eth0 198.51.100.7
       2001:db8:c::2       2001:db8:c::1      2001:db8:f::1          2001:db8:f::7
                       viscum on lan0 (TC ingress)           web server :80: CLOUD page
                        |  tcp/80 to the cloud address
                        v
                      {service} (viscum ns): web server :80: EDGE page

  The client talks to the cloud address; viscum hands tcp/80 for it to the
  copy in {service}, which answers as {CLOUD_V4} / {CLOUD_V6}.

Try, in another terminal, as root:

  ip netns exec {client} curl -s http://{CLOUD_V4}/
  ip netns exec {client} curl -s -g 'http://[{CLOUD_V6}]/'
  {v} redirect list
  {v} stats
  {v} redirect del tcp://{CLOUD_V4}:80
  ip netns exec {client} curl -s http://{CLOUD_V4}/     # the CLOUD answers again
  {v} redirect add tcp://{CLOUD_V4}:80 --ns {service}   # the EDGE copy is back

Ctrl-C removes the whole lab.
============================================================================"#
    );
}
