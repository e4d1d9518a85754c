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
