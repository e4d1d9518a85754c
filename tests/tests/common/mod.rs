//! Pieces shared by the datapath v2 tests: long-lived connections, naive servers, offload
//! switches. (Each test file compiles this module on its own; not every file uses all of it.)
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use viscum::netns;
use viscum_tests::Lab;

pub const TIMEOUT: Duration = Duration::from_secs(3);

/// A line echo server (`identity:line`) on `[::]:port` (dual-stack) that keeps connections
/// open, so a test can hold a long transfer across a cutover.
pub struct EchoServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    pub fn start(ns: &str, port: u16, identity: &str) -> EchoServer {
        let listener =
            netns::in_netns(ns, move || TcpListener::bind(("::", port)).unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, id) = (stop.clone(), identity.to_string());
        thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let id = id.clone();
                        thread::spawn(move || echo(conn, &id));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        EchoServer { port, stop }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn echo(conn: TcpStream, id: &str) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut w = conn.try_clone().unwrap();
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if writeln!(w, "{id}:{line}").is_err() {
            return;
        }
    }
}

/// A client connection held open across a test.
pub struct Held {
    conn: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Held {
    pub fn open(ns: &str, addr: SocketAddr) -> Held {
        let conn = netns::in_netns(ns, move || TcpStream::connect_timeout(&addr, TIMEOUT))
            .unwrap()
            .unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        // `writeln!` writes a line in several pieces: without this, Nagle holds each
        // line's tail until the server's delayed ACK (40 ms) per exchange.
        conn.set_nodelay(true).unwrap();
        let reader = BufReader::new(conn.try_clone().unwrap());
        Held { conn, reader }
    }

    /// Sends `n` lines and returns the answers; an error means the connection broke.
    pub fn exchange(&mut self, tag: &str, n: usize) -> std::io::Result<Vec<String>> {
        let mut out = Vec::new();
        for i in 0..n {
            writeln!(self.conn, "{tag}{i}")?;
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            out.push(line.trim().to_string());
        }
        Ok(out)
    }

    pub fn close(self) {
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
    }
}

/// A UDP server that answers with a plain `sendto()` from a socket bound to the wildcard
/// address, like iperf3 and most off-the-shelf servers: its replies leave from whatever
/// source the routing picks (the namespace's own address), not the address the request was
/// sent to.
pub struct NaiveUdpServer {
    stop: Arc<AtomicBool>,
}

impl NaiveUdpServer {
    pub fn start(ns: &str, port: u16, identity: &str, v6: bool) -> NaiveUdpServer {
        let sock = netns::in_netns(ns, move || {
            if v6 {
                UdpSocket::bind(("::", port))
            } else {
                UdpSocket::bind(("0.0.0.0", port))
            }
        })
        .unwrap()
        .unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, id) = (stop.clone(), identity.to_string());
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::SeqCst) {
                if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(id.as_bytes(), peer);
                }
            }
        });
        NaiveUdpServer { stop }
    }
}

impl Drop for NaiveUdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Turns TX and RX checksum offload off on `ifname` in `ns`, so every TCP/UDP checksum on
/// that link is computed in software and verified by the receiving stack.
pub fn no_checksum_offload(ns: &str, ifname: &str) {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_SRXCSUM: u32 = 0x15;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let ifname = ifname.to_string();
    netns::in_netns(ns, move || {
        // SAFETY: plain ioctl on a throwaway socket with valid structures.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(fd >= 0);
            for cmd in [ETHTOOL_STXCSUM, ETHTOOL_SRXCSUM] {
                let mut val = EthtoolValue { cmd, data: 0 };
                let mut ifr: libc::ifreq = std::mem::zeroed();
                for (d, s) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
                    *d = s as libc::c_char;
                }
                ifr.ifr_ifru.ifru_data = (&raw mut val).cast();
                let rc = libc::ioctl(fd, SIOCETHTOOL, &mut ifr);
                assert_eq!(
                    rc,
                    0,
                    "ethtool {cmd:#x} on {ifname}: {}",
                    std::io::Error::last_os_error()
                );
            }
            libc::close(fd);
        }
    })
    .unwrap();
}

/// Pins the calling thread to `cpu` (taken modulo the CPUs there are): its packets are
/// then sent from that CPU, whose per-CPU caches (`viscum-ebpf/src/cache.rs`,
/// `reply_cache.rs`) are the ones they meet.
pub fn pin_to_cpu(cpu: usize) {
    let cpu = cpu % thread::available_parallelism().map_or(1, std::num::NonZero::get);
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The socket lines of /proc/net/tcp and /proc/net/tcp6 in namespace `ns` (headers left
/// out), split into columns: local address, remote address, state, tx:rx queues... from the
/// 2nd column on (`cols[1]` is the local address).
fn proc_tcp(ns: &str) -> Vec<Vec<String>> {
    netns::in_netns(ns, || {
        ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .flat_map(|t| {
                t.lines()
                    .skip(1)
                    .map(|l| l.split_whitespace().map(str::to_owned).collect())
                    .collect::<Vec<_>>()
            })
            .collect()
    })
    .unwrap()
}

/// TCP sockets in namespace `ns` with `port` at either end that wait for their
/// connection's close to finish: `FIN_WAIT1`, `CLOSE_WAIT`, `LAST_ACK` or `CLOSING` (the
/// states of /proc/net/tcp's 4th column: 04, 08, 09, 0B). A close whose last segments were
/// lost or refused leaves its sockets there, retransmitting.
pub fn tcp_closing(ns: &str, port: u16) -> Vec<String> {
    let want = format!(":{port:04X}");
    proc_tcp(ns)
        .into_iter()
        .filter(|cols| {
            cols.len() > 3
                && (cols[1].ends_with(&want) || cols[2].ends_with(&want))
                && ["04", "08", "09", "0B"].contains(&cols[3].as_str())
        })
        .map(|cols| cols.join(" "))
        .collect()
}

/// A TCP socket as /proc/net/tcp shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpRow {
    /// Its local port.
    pub local_port: u16,
    /// Its peer's port.
    pub remote_port: u16,
    /// Its state, the 4th column: `01` ESTABLISHED, `05` FIN_WAIT2, `06` TIME_WAIT...
    pub state: String,
    /// Bytes it sent that are not acknowledged yet (the 5th column's first half).
    pub tx_queue: u64,
}

/// TCP sockets in namespace `ns` with `port` at either end, listeners left out.
pub fn tcp_sockets(ns: &str, port: u16) -> Vec<TcpRow> {
    let port_of = |a: &str| u16::from_str_radix(a.rsplit(':').next()?, 16).ok();
    proc_tcp(ns)
        .into_iter()
        .filter_map(|cols| {
            let row = TcpRow {
                local_port: port_of(cols.get(1)?)?,
                remote_port: port_of(cols.get(2)?)?,
                state: cols.get(3)?.clone(),
                tx_queue: u64::from_str_radix(cols.get(4)?.split(':').next()?, 16).ok()?,
            };
            (row.state != "0A" && (row.local_port == port || row.remote_port == port))
                .then_some(row)
        })
        .collect()
}

/// Runs `nft ARGS` in namespace `ns`: its output, or its error output if it failed
/// (verification tooling, not the product).
pub fn nft_try(ns: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("nft")
        .args(args)
        .output()
        .expect("run nft (apt-get install nftables)");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// [`nft_try`], panicking if nft fails.
pub fn nft(ns: &str, args: &[&str]) -> String {
    nft_try(ns, args).unwrap_or_else(|e| panic!("nft {args:?} in {ns}: {e}"))
}

/// Loads nft ruleset `rules` in namespace `ns` (`nft -f`).
pub fn nft_load(ns: &str, rules: &str) {
    static LOADS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = LOADS.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("viscum-{ns}-{}-{n}.nft", std::process::id()));
    std::fs::write(&path, rules).unwrap();
    nft(ns, &["-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
}

/// The packets counted so far by the `counter` statements of nft table `inet TABLE` in
/// namespace `ns`, summed.
pub fn nft_packets(ns: &str, table: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&nft(ns, &["-j", "list", "table", "inet", table])).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["rule"]["expr"].as_array())
        .flat_map(|exprs| exprs.iter().filter_map(|e| e.get("counter")))
        .map(|c| c["packets"].as_u64().unwrap())
        .sum()
}

/// An OpenWrt-like edge: the forward chain drops what conntrack calls invalid (conntrack
/// never saw the redirected requests, so every reply would be), conntrack is strict about
/// mid-stream TCP, and reverse-path filtering is strict everywhere.
pub fn harden(lab: &Lab, ns: &str) {
    nft_load(
        lab.edge.name(),
        "table inet viscumfw {\n chain forward {\n  type filter hook forward priority filter; policy accept;\n  ct state invalid counter drop\n }\n}\n",
    );
    let host_veth = format!("vh-{ns}");
    lab.edge
        .set_sysctl("net/netfilter/nf_conntrack_tcp_loose", "0");
    for key in ["all", "default", "lan0", "wan0", host_veth.as_str()] {
        lab.edge
            .set_sysctl(&format!("net/ipv4/conf/{key}/rp_filter"), "1");
    }
}

/// Is something listening on TCP `port` in namespace `ns` (IPv4 or IPv6 table)?
pub fn tcp_listening(ns: &str, port: u16) -> bool {
    let want = format!(":{port:04X}");
    // local_address is the 2nd column, state (0A = LISTEN) the 4th.
    proc_tcp(ns)
        .iter()
        .any(|cols| cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A")
}

/// `iperf3 -s` in a namespace, killed on drop.
pub struct Iperf3Server {
    child: std::process::Child,
}

impl Iperf3Server {
    pub fn start(ns: &str, port: u16) -> Iperf3Server {
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["iperf3", "-s", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run iperf3 (apt-get install iperf3)");
        let server = Iperf3Server { child };
        assert!(
            viscum_tests::wait_until(Duration::from_secs(10), || tcp_listening(ns, port)),
            "iperf3 -s did not listen on {port} in {ns}"
        );
        server
    }
}

impl Drop for Iperf3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `iperf3 -c ADDR -p PORT -J ARGS` from namespace `ns` (bounded by `timeout`); the JSON
/// report, or the error iperf3 printed.
pub fn iperf3_client(
    ns: &str,
    addr: SocketAddr,
    args: &[&str],
) -> Result<serde_json::Value, String> {
    let out = std::process::Command::new("timeout")
        .arg("60")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args([
            "iperf3",
            "-c",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "-J",
        ])
        .args(["--connect-timeout", "3000"])
        .args(args)
        .output()
        .expect("run iperf3");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "iperf3 printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(err) = v["error"].as_str() {
        return Err(err.to_owned());
    }
    Ok(v)
}

/// Bytes the receiving side of an iperf3 run got (TCP: sum_received; UDP: the server's
/// count of datagrams times their size is not reported, so bytes of the receiver summary).
pub fn iperf3_received_bytes(report: &serde_json::Value) -> u64 {
    let end = &report["end"];
    end["sum_received"]["bytes"]
        .as_u64()
        .or_else(|| end["sum"]["bytes"].as_u64())
        .unwrap_or(0)
}

/// The `global` counters of `viscum stats --json`.
pub fn global_stats(lab: &Lab) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&lab.viscum_ok(&["stats", "--json"])).unwrap();
    v["global"].clone()
}
