//! What the tests' clients do against a daemon's services in the lab: ask who answers the
//! cloud address, wait until the answer changes, and hold a long download open.
//!
//! The services are the daemon tests' small servers (see `viscum_lab::daemon`): one line in,
//! their identity out, or for `stream KIB` a KiB every 10 ms.

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use viscum::netns;

use crate::{lab::CLOUD_V4, tcp_ask, wait_until};

/// The lab's cloud IPv4 address on `port`.
pub fn cloud_addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(CLOUD_V4), port)
}

/// Who answers a new TCP connection from namespace `client` to the cloud address on `port`
/// within `ask`: the server's identity ("edge", "cloud", ...), or `error: ...`.
pub fn who(client: &str, port: u16, ask: Duration) -> String {
    tcp_ask(client, cloud_addr(port), ask).unwrap_or_else(|e| format!("error: {e}"))
}

/// Polls [`who`] until it answers `want`, for at most `bound`; returns how long it took.
///
/// # Panics
/// When `want` was not answered within `bound`, naming the last answer.
pub fn wait_for(client: &str, port: u16, want: &str, ask: Duration, bound: Duration) -> Duration {
    let start = Instant::now();
    let mut last = String::new();
    let ok = wait_until(bound, || {
        last = who(client, port, ask);
        last == want
    });
    assert!(
        ok,
        "port {port}: wanted {want:?} within {bound:?}, last answer {last:?}"
    );
    start.elapsed()
}

/// A download in progress (see [`download`]).
pub struct Download {
    /// Bytes received so far, updated as they arrive.
    pub received: Arc<AtomicUsize>,
    /// Ends with the total once the server closes, or with the error that broke the transfer
    /// (a reset, 10 s without data).
    pub thread: thread::JoinHandle<io::Result<usize>>,
}

/// Asks the server at the cloud address on `port`, from namespace `client`, for a stream of
/// `kib` KiB (`stream KIB`, a KiB every 10 ms), in a thread of its own.
pub fn download(client: &str, port: u16, kib: usize) -> Download {
    let received = Arc::new(AtomicUsize::new(0));
    let (client, counted) = (client.to_owned(), received.clone());
    let thread = thread::spawn(move || {
        netns::in_netns(&client, move || -> io::Result<usize> {
            let mut s = TcpStream::connect_timeout(&cloud_addr(port), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            writeln!(s, "stream {kib}")?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf)? {
                    0 => return Ok(counted.load(Ordering::SeqCst)),
                    n => counted.fetch_add(n, Ordering::SeqCst),
                };
            }
        })
        .map_err(|e| io::Error::other(format!("enter {client}: {e:?}")))?
    });
    Download { received, thread }
}
