//! The project's own small traffic tools: the servers (run as `system __serve` inside a target
//! namespace) and the clients (threads that enter the client namespace).
//!
//! * **RR** (port 5001): one TCP connection, 1-byte request, 1-byte response, repeated
//!   (TCP_RR); every round trip is timed, so p50/p99 come from all of them.
//! * **CRR** (port 5002): connect, 1-byte request, 1-byte response, close, repeated by a few
//!   concurrent connections (TCP_CRR). The server closes first and the client closes on
//!   reading EOF, so the client side never holds TIME_WAIT and cannot run out of ports.
//! * **identity** (port 5003): accept, write one byte naming the server ('S' for an edge
//!   copy, 'K' for the cloud), close. Probing it shows which side serves a new connection.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::support::sys;

pub const RR_PORT: u16 = 5001;
pub const CRR_PORT: u16 = 5002;
pub const IDENT_PORT: u16 = 5003;
pub const IPERF_PORT: u16 = 5201;

/// The cloud address every lane's client talks to.
pub const CLOUD: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

pub fn cloud(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(CLOUD, port))
}

// ---------------------------------------------------------------------------------------------
// Servers

/// `system __serve [--ident C] [--ident-only]`: serves RR, CRR and identity on 0.0.0.0 until
/// killed. Prints `ready` once every socket listens.
pub fn serve_main(args: Vec<String>) -> ExitCode {
    let mut ident = b'T';
    let mut ident_only = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--ident" => ident = it.next().and_then(|s| s.bytes().next()).unwrap_or(b'T'),
            "--ident-only" => ident_only = true,
            other => {
                eprintln!("serve: unknown argument {other}");
                return ExitCode::FAILURE;
            }
        }
    }
    match serve(ident, ident_only) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serve: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn any(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
}

fn serve(ident: u8, ident_only: bool) -> Result<()> {
    let id = TcpListener::bind(any(IDENT_PORT)).context("bind identity port")?;
    thread::spawn(move || {
        for conn in id.incoming().flatten() {
            let mut c = conn;
            let _ = c.write_all(&[ident]);
        }
    });
    if ident_only {
        println!("ready");
        loop {
            thread::park();
        }
    }
    let rr = TcpListener::bind(any(RR_PORT)).context("bind RR port")?;
    thread::spawn(move || {
        for conn in rr.incoming().flatten() {
            thread::spawn(move || {
                let mut c = conn;
                let _ = c.set_nodelay(true);
                let mut b = [0u8; 1];
                while c.read_exact(&mut b).is_ok() {
                    if c.write_all(&b).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let l = tokio::net::TcpListener::bind(any(CRR_PORT))
            .await
            .context("bind CRR port")?;
        println!("ready");
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = c.set_nodelay(true);
                let mut b = [0u8; 1];
                if c.read_exact(&mut b).await.is_ok() {
                    let _ = c.write_all(&b).await;
                }
                // Dropping closes first: the TIME_WAIT stays on this side.
            });
        }
        #[allow(unreachable_code, reason = "the accept loop ends with the process")]
        Ok::<(), anyhow::Error>(())
    })
}

// ---------------------------------------------------------------------------------------------
// Clients

/// One RR run.
pub struct RrRun {
    pub tps: f64,
    /// Every measured round trip, ns.
    pub lat_ns: Vec<u32>,
}

/// Ping-pongs one byte over one connection for `warmup + duration` from namespace `ns`,
/// pinned to the client CPU; only the `duration` part is recorded.
pub fn rr(ns: &str, addr: SocketAddr, warmup: Duration, duration: Duration) -> Result<RrRun> {
    viscum::netns::in_netns(ns, move || -> Result<RrRun> {
        sys::pin_current_thread(sys::client_cpu());
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connect {addr}"))?;
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut b = [7u8; 1];
        let warm_end = Instant::now() + warmup;
        while Instant::now() < warm_end {
            c.write_all(&b)?;
            c.read_exact(&mut b).context("RR response")?;
        }
        let mut lat = Vec::with_capacity(1 << 18);
        let start = Instant::now();
        let end = start + duration;
        let mut i = 0u32;
        loop {
            let t = Instant::now();
            if t >= end {
                break;
            }
            c.write_all(&b)?;
            c.read_exact(&mut b).context("RR response")?;
            lat.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
            i += 1;
            if i.is_multiple_of(4096) {
                sys::check_stop()?;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(RrRun {
            tps: lat.len() as f64 / secs,
            lat_ns: lat,
        })
    })
    .context("cannot enter the client namespace")?
}

/// One CRR run.
pub struct CrrRun {
    pub conns_per_s: f64,
    pub errors: u64,
}

/// `concurrency` connections at a time, each doing connect / 1 byte / 1 byte / close in a
/// loop, for `warmup + duration`; counts the transactions completed in `duration`.
pub fn crr(
    ns: &str,
    addr: SocketAddr,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<CrrRun> {
    viscum::netns::in_netns(ns, move || -> Result<CrrRun> {
        sys::pin_current_thread(sys::client_cpu());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let start = Instant::now() + warmup;
            let end = start + duration;
            let mut tasks = Vec::new();
            for _ in 0..concurrency {
                tasks.push(tokio::spawn(async move {
                    let (mut ok, mut err) = (0u64, 0u64);
                    loop {
                        let now = Instant::now();
                        if now >= end || sys::stopped() {
                            break;
                        }
                        let one = async {
                            let mut c = tokio::net::TcpStream::connect(addr).await?;
                            c.set_nodelay(true)?;
                            c.write_all(&[9]).await?;
                            let mut buf = [0u8; 8];
                            let mut got = 0;
                            loop {
                                let n = c.read(&mut buf[got..]).await?;
                                if n == 0 {
                                    break;
                                }
                                got += n;
                            }
                            Ok::<usize, std::io::Error>(got)
                        };
                        let r = tokio::time::timeout(Duration::from_secs(2), one).await;
                        let counted = now >= start;
                        match r {
                            Ok(Ok(1)) => ok += u64::from(counted),
                            _ => err += u64::from(counted),
                        }
                    }
                    (ok, err)
                }));
            }
            let (mut ok, mut err) = (0u64, 0u64);
            for t in tasks {
                let (o, e) = t.await?;
                ok += o;
                err += e;
            }
            Ok(CrrRun {
                conns_per_s: ok as f64 / duration.as_secs_f64(),
                errors: err,
            })
        })
    })
    .context("cannot enter the client namespace")?
}

/// Asks the identity port once: which side served a new connection.
pub fn ask(ns: &str, addr: SocketAddr) -> Result<u8> {
    viscum::netns::in_netns(ns, move || ask_here(addr))
        .context("cannot enter the client namespace")?
}

fn ask_here(addr: SocketAddr) -> Result<u8> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    c.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut b = [0u8; 1];
    c.read_exact(&mut b)?;
    Ok(b[0])
}

/// One probe: when it finished and who answered (`None`: it failed).
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub started: Instant,
    pub done: Instant,
    pub ident: Option<u8>,
}

/// A thread in the client namespace asking the identity port back to back (each probe a new
/// connection, ~0.1 ms apart), keeping every result.
pub struct Prober {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Probe>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Prober {
    pub fn start(ns: &str, addr: SocketAddr) -> Result<Prober> {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        let (s, l, ns) = (stop.clone(), log.clone(), ns.to_owned());
        let handle = thread::spawn(move || {
            let r = viscum::netns::in_netns(&ns, move || {
                while !s.load(Ordering::Relaxed) && !sys::stopped() {
                    let started = Instant::now();
                    let ident = ask_here(addr).ok();
                    let done = Instant::now();
                    if let Ok(mut v) = l.lock() {
                        v.push(Probe {
                            started,
                            done,
                            ident,
                        });
                    }
                    if ident.is_none() {
                        // A refused or timed-out probe: do not spin on an unreachable port.
                        thread::sleep(Duration::from_micros(200));
                    }
                }
            });
            if let Err(e) = r {
                eprintln!("bench: prober: {e:#}");
            }
        });
        Ok(Prober {
            stop,
            log,
            handle: Some(handle),
        })
    }

    /// Probes that started at or after `t`.
    pub fn since(&self, t: Instant) -> Vec<Probe> {
        self.log
            .lock()
            .map(|v| v.iter().filter(|p| p.started >= t).copied().collect())
            .unwrap_or_default()
    }

    /// Forgets old probes (keeps memory bounded over long runs).
    pub fn clear(&self) {
        if let Ok(mut v) = self.log.lock() {
            v.clear();
        }
    }

    /// Waits for the first probe *started* at or after `t` that `ident` answered; returns its
    /// completion time.
    pub fn wait_for(&self, ident: u8, t: Instant, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.since(t).into_iter().find(|p| p.ident == Some(ident)) {
                return Ok(p.done);
            }
            sys::check_stop()?;
            if Instant::now() >= deadline {
                let last = self.since(t).last().map(|p| p.ident);
                bail!(
                    "no probe answered by '{}' within {timeout:?} (last probe: {last:?})",
                    ident as char
                );
            }
            thread::sleep(Duration::from_micros(100));
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
