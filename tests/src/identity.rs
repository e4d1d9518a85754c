//! Identity servers and their clients: every copy of a service in a test answers with its own
//! name, so a test can tell whether the cloud or the edge answered.
//!
//! The UDP side answers the way a well-behaved server does: it learns the address each
//! request was sent to (`IP_PKTINFO` / `IPV6_RECVPKTINFO`) and sends the reply from exactly
//! that address. That is what lets a copy in a service namespace answer as the cloud address
//! it holds only a `local` route for. The clients use connected sockets, so, like real
//! clients, they ignore a reply from any other source.

use std::{
    io::{self, IoSlice, IoSliceMut, Read, Write},
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV6, TcpListener, TcpStream,
        UdpSocket,
    },
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, SockaddrIn6, SockaddrStorage, setsockopt, sockopt,
};
use viscum::netns;

/// How long a server waits for a client to send its request line.
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the clients send.
const REQUEST: &[u8] = b"who are you?\n";

/// Transport protocol, for table-driven tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// The four listening sockets of one server.
struct Sockets {
    tcp4: TcpListener,
    tcp6: TcpListener,
    udp4: UdpSocket,
    udp6: UdpSocket,
}

/// A TCP and UDP server on `0.0.0.0:PORT` and `[::]:PORT` in one namespace that answers every
/// request with its identity string. Stops on drop.
///
/// TCP: reads one line, writes the identity and `\n`, closes. UDP: answers each datagram with
/// the identity, from the address the datagram was sent to.
pub struct IdentityServer {
    port: u16,
    identity: String,
    /// Dropping it wakes the serving thread (end of file on the other end) to stop it.
    stop: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
    tcp_hits: Arc<AtomicUsize>,
    udp_hits: Arc<AtomicUsize>,
}

impl IdentityServer {
    /// Starts serving in namespace `ns` on `port` (0: any free port, the same for all four
    /// sockets; see [`IdentityServer::port`]). The sockets are bound before this returns, so
    /// the server is ready at once. Panics if it cannot bind.
    pub fn start(ns: &str, port: u16, identity: &str) -> IdentityServer {
        let sockets = netns::in_netns(ns, move || bind_all(port))
            .unwrap_or_else(|e| panic!("identity server in {ns}: {e:?}"))
            .unwrap_or_else(|e| panic!("identity server in {ns} on port {port}: {e}"));
        let port = sockets.tcp4.local_addr().expect("bound address").port();
        let (stop, stop_rx) = UnixStream::pair().expect("socket pair");
        let tcp_hits = Arc::new(AtomicUsize::new(0));
        let udp_hits = Arc::new(AtomicUsize::new(0));
        let thread = {
            let identity = identity.to_string();
            let (tcp_hits, udp_hits) = (tcp_hits.clone(), udp_hits.clone());
            thread::Builder::new()
                .name(format!("identity-{identity}"))
                .spawn(move || serve(sockets, stop_rx, &identity, &tcp_hits, &udp_hits))
                .expect("spawn identity server")
        };
        IdentityServer {
            port,
            identity: identity.to_string(),
            stop: Some(stop),
            thread: Some(thread),
            tcp_hits,
            udp_hits,
        }
    }

    /// The port all four sockets listen on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The identity it answers with.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// TCP connections answered so far (counted before the answer is sent).
    pub fn tcp_hits(&self) -> usize {
        self.tcp_hits.load(Ordering::SeqCst)
    }

    /// UDP datagrams answered so far (counted before the answer is sent).
    pub fn udp_hits(&self) -> usize {
        self.udp_hits.load(Ordering::SeqCst)
    }
}

impl Drop for IdentityServer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Binds TCP and UDP on both wildcard addresses. IPv6 sockets are `IPV6_V6ONLY`, so the IPv4
/// wildcard sockets can share the port and each family gets its own packet-info option.
fn bind_all(port: u16) -> io::Result<Sockets> {
    let tcp4 = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
    let port = tcp4.local_addr()?.port();
    let tcp6 = TcpListener::from(bind_v6only(SockType::Stream, port)?);
    let udp4 = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
    let udp6 = UdpSocket::from(bind_v6only(SockType::Datagram, port)?);
    setsockopt(&udp4, sockopt::Ipv4PacketInfo, &true)?;
    setsockopt(&udp6, sockopt::Ipv6RecvPacketInfo, &true)?;
    tcp4.set_nonblocking(true)?;
    tcp6.set_nonblocking(true)?;
    udp4.set_nonblocking(true)?;
    udp6.set_nonblocking(true)?;
    Ok(Sockets {
        tcp4,
        tcp6,
        udp4,
        udp6,
    })
}

/// An IPv6-only socket bound to `[::]:port` (listening, for a stream socket).
fn bind_v6only(ty: SockType, port: u16) -> io::Result<OwnedFd> {
    let fd = socket::socket(AddressFamily::Inet6, ty, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    socket::bind(fd.as_raw_fd(), &addr)?;
    if ty == SockType::Stream {
        socket::listen(&fd, Backlog::new(128)?)?;
    }
    Ok(fd)
}

/// The serving loop: waits on the four sockets and the stop channel, answers what is ready.
fn serve(
    sockets: Sockets,
    stop: UnixStream,
    identity: &str,
    tcp_hits: &Arc<AtomicUsize>,
    udp_hits: &AtomicUsize,
) {
    let fds = [
        sockets.tcp4.as_raw_fd(),
        sockets.tcp6.as_raw_fd(),
        sockets.udp4.as_raw_fd(),
        sockets.udp6.as_raw_fd(),
        stop.as_raw_fd(),
    ];
    loop {
        let mut pollfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: pollfds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!(
                "identity server {identity}: poll: {}",
                io::Error::last_os_error()
            );
            return;
        }
        if pollfds[4].revents != 0 {
            return;
        }
        for (listener, pfd) in [(&sockets.tcp4, &pollfds[0]), (&sockets.tcp6, &pollfds[1])] {
            if pfd.revents != 0 {
                accept_all(listener, identity, tcp_hits);
            }
        }
        for (udp, pfd) in [(&sockets.udp4, &pollfds[2]), (&sockets.udp6, &pollfds[3])] {
            if pfd.revents != 0 {
                answer_all(udp, identity, udp_hits);
            }
        }
    }
}

/// Accepts every pending connection, each answered on its own thread so a silent client
/// cannot hold up the others.
fn accept_all(listener: &TcpListener, identity: &str, hits: &Arc<AtomicUsize>) {
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                let identity = identity.to_string();
                let hits = hits.clone();
                thread::spawn(move || {
                    let _ = answer_tcp(conn, &identity, &hits);
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // ECONNABORTED and the like: that client is gone; keep serving the others.
            Err(_) => return,
        }
    }
}

fn answer_tcp(mut conn: TcpStream, identity: &str, hits: &AtomicUsize) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(SERVER_IO_TIMEOUT))?;
    conn.set_write_timeout(Some(SERVER_IO_TIMEOUT))?;
    // One line (or whatever arrives before the client stops sending) is the request.
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while request.len() < 1024 {
        match conn.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => request.push(byte[0]),
        }
    }
    // Counted before answering, so a client holding the answer can rely on the count.
    hits.fetch_add(1, Ordering::SeqCst);
    conn.write_all(format!("{identity}\n").as_bytes())?;
    conn.shutdown(Shutdown::Write)
}

/// Answers every pending datagram from the address it was sent to.
fn answer_all(udp: &UdpSocket, identity: &str, hits: &AtomicUsize) {
    let fd = udp.as_raw_fd();
    loop {
        let mut buf = [0u8; 2048];
        let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo, libc::in_pktinfo);
        let (peer, info) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match socket::recvmsg::<SockaddrStorage>(
                fd,
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(msg) => msg,
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    eprintln!("identity server {identity}: recvmsg: {e}");
                    return;
                }
            };
            let info = msg.cmsgs().ok().and_then(|mut cmsgs| {
                cmsgs.find_map(|c| match c {
                    ControlMessageOwned::Ipv4PacketInfo(pi) => Some(PacketInfo::V4(pi)),
                    ControlMessageOwned::Ipv6PacketInfo(pi) => Some(PacketInfo::V6(pi)),
                    _ => None,
                })
            });
            (msg.address, info)
        };
        let Some(peer) = peer else { continue };
        let reply = [IoSlice::new(identity.as_bytes())];
        // Counted before answering (and taken back on failure), so a client holding the
        // answer can rely on the count.
        hits.fetch_add(1, Ordering::SeqCst);
        let sent = match info {
            Some(PacketInfo::V4(pi)) => {
                // ipi_spec_dst is the source to use; ifindex 0 leaves the route to the kernel.
                let out = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: pi.ipi_addr,
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                socket::sendmsg(
                    fd,
                    &reply,
                    &[ControlMessage::Ipv4PacketInfo(&out)],
                    MsgFlags::empty(),
                    Some(&peer),
                )
            }
            Some(PacketInfo::V6(pi)) => {
                // A link-local source only means something with its interface.
                let dst = Ipv6Addr::from(pi.ipi6_addr.s6_addr);
                let out = libc::in6_pktinfo {
                    ipi6_addr: pi.ipi6_addr,
                    ipi6_ifindex: if dst.is_unicast_link_local() {
                        pi.ipi6_ifindex
                    } else {
                        0
                    },
                };
                socket::sendmsg(
                    fd,
                    &reply,
                    &[ControlMessage::Ipv6PacketInfo(&out)],
                    MsgFlags::empty(),
                    Some(&peer),
                )
            }
            None => socket::sendmsg(fd, &reply, &[], MsgFlags::empty(), Some(&peer)),
        };
        if let Err(e) = sent {
            hits.fetch_sub(1, Ordering::SeqCst);
            eprintln!("identity server {identity}: reply to {peer}: {e}");
        }
    }
}

enum PacketInfo {
    V4(libc::in_pktinfo),
    V6(libc::in6_pktinfo),
}

/// Connects to `addr` over TCP from namespace `ns`, sends a request line and returns the
/// answer without its trailing newline. Connect, write and each read are bounded by
/// `timeout`.
pub fn tcp_ask(ns: &str, addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    netns::in_netns(ns, move || -> io::Result<String> {
        let mut conn = TcpStream::connect_timeout(&addr, timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        conn.write_all(REQUEST)?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer).map_err(timed_out)?;
        Ok(answer.trim_end_matches('\n').to_string())
    })
    .map_err(io::Error::other)?
}

/// Sends one datagram to `addr` from namespace `ns` over a *connected* UDP socket and returns
/// the answer; a reply from any other source address is dropped by the kernel, as for real
/// clients, and shows up here as a [`io::ErrorKind::TimedOut`] after `timeout`.
pub fn udp_ask(ns: &str, addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    netns::in_netns(ns, move || -> io::Result<String> {
        let local: IpAddr = match addr {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let sock = UdpSocket::bind((local, 0))?;
        sock.connect(addr)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.send(REQUEST)?;
        let mut buf = [0u8; 2048];
        let n = sock.recv(&mut buf).map_err(timed_out)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .map_err(io::Error::other)?
}

/// [`udp_ask`] from `n` sockets bound at once, one datagram each, in turn; returns the `n`
/// answers. Bound together, their source ports, hence their flows, are distinct: sockets
/// asked one after another may each be given a port an earlier, closed one had (the kernel
/// picks a free port at random), which a datapath rightly takes for the same flow.
pub fn udp_ask_distinct(
    ns: &str,
    addr: SocketAddr,
    n: usize,
    timeout: Duration,
) -> io::Result<Vec<String>> {
    netns::in_netns(ns, move || -> io::Result<Vec<String>> {
        let local: IpAddr = match addr {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let socks = (0..n)
            .map(|_| {
                let sock = UdpSocket::bind((local, 0))?;
                sock.connect(addr)?;
                sock.set_read_timeout(Some(timeout))?;
                Ok(sock)
            })
            .collect::<io::Result<Vec<_>>>()?;
        socks
            .iter()
            .map(|sock| {
                sock.send(REQUEST)?;
                let mut buf = [0u8; 2048];
                let got = sock.recv(&mut buf).map_err(timed_out)?;
                Ok(String::from_utf8_lossy(&buf[..got]).into_owned())
            })
            .collect()
    })
    .map_err(io::Error::other)?
}

/// [`tcp_ask`] or [`udp_ask`].
pub fn ask(ns: &str, proto: Proto, addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    match proto {
        Proto::Tcp => tcp_ask(ns, addr, timeout),
        Proto::Udp => udp_ask(ns, addr, timeout),
    }
}

/// SO_RCVTIMEO expiry surfaces as EAGAIN; call it what it is.
fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "no answer before the timeout")
    } else {
        e
    }
}
