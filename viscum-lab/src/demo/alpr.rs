//! License-plate recognition (`cargo xtask run --demo alpr`), the paper's first use case:
//! cameras upload images of hundreds of kilobytes; the recognizer sends a collector in the
//! cloud one short text result per image. Served at the edge, only those results cross the
//! uplink: "kilobytes to a hundred bytes".
//!
//! ```text
//!  client (camera) --- edge --------- uplink (wan0) --------- cloud
//!  POST /recognize      |                                      alpr :8000 (the cloud service)
//!  ~200 KB each       alpr (viscum run service) :8000          collector udp :9000
//!                       `--> one ~100-byte UDP datagram per image -->'
//! ```
//!
//! The client uploads the same images twice to the cloud address: first with the cloud
//! serving, then with the edge copy serving. Each time the demo counts the bytes the client
//! uploaded and the bytes the edge's uplink carried (its `tx_bytes`), and shows
//! `viscum stats`, whose entry counts the bytes that stayed at the edge. The recognizer is a
//! small Python HTTP server (the "unmodified cloud service"); its recognition is a stand-in
//! (a plate derived from the image's hash), since the network is what the demo is about.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use viscum::netns;

use super::{Proc, human_bytes, tx_bytes, wait_listening, write_script};
use crate::{
    Check, Daemon, DaemonFiles, Lab, Service,
    daemon::Health,
    lab::{CLOUD_V4, WAN_IF},
    say,
};

/// The recognizer's port.
const PORT: u16 = 8000;
/// The collector's UDP port, in the cloud.
const COLLECTOR_PORT: u16 = 9000;
/// Size of one camera image.
const IMAGE_BYTES: usize = 200_000;

/// The recognizer: `python3 alpr.py PORT COLLECTOR_HOST COLLECTOR_PORT SITE`. `POST
/// /recognize` with an image answers `{"plate": ...}` and sends the collector one UDP
/// datagram `{"site":..,"camera":..,"plate":..,"bytes":..}`; `GET /healthz` answers 200.
pub const ALPR_PY: &str = r#"
import hashlib, http.server, json, socket, sys
port, host, cport, site = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def do_POST(self):
        image = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        h = hashlib.sha256(image).hexdigest()
        plate = "%s-%s" % ("".join(chr(65 + int(c, 16) % 26) for c in h[:3]), str(int(h[3:9], 16) % 10000).zfill(4))
        result = json.dumps({"site": site, "camera": self.headers.get("X-Camera", "?"), "plate": plate, "bytes": len(image)}, separators=(",", ":"))
        out.sendto(result.encode(), (host, cport))
        body = json.dumps({"plate": plate}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
print("alpr on", port, "results to", host, cport, flush=True)
Server(("::", port), Handler).serve_forever()
"#;

/// One run's counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Images uploaded.
    pub images: usize,
    /// Bytes the client sent (requests with their images).
    pub uploaded: u64,
    /// Bytes the edge's uplink interface sent meanwhile (frames, headers included).
    pub uplink: u64,
    /// Results the collector received, and their bytes.
    pub results: (u64, u64),
    /// The plates the client was told.
    pub plates: Vec<String>,
}

/// What the demo measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Figures {
    /// The cloud serving.
    pub cloud: Run,
    /// The edge copy serving.
    pub edge: Run,
    /// Bytes `viscum stats` counts for the recognizer's entry (redirected at the edge).
    pub stats_bytes: u64,
}

/// The collector: a UDP socket on `[::]:9000` in the cloud, served by a thread of this
/// process; counts datagrams and bytes.
struct Collector {
    // usize, not u64: 32-bit MIPS (the cross-checked router target) has no 64-bit atomics.
    count: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Collector {
    /// Ends the thread, which closes the socket: the cloud namespace is not kept alive.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Collector {
    fn start(cloud: &str) -> Result<Collector> {
        let sock = netns::in_netns(cloud, || {
            UdpSocket::bind((Ipv6Addr::UNSPECIFIED, COLLECTOR_PORT))
        })??;
        // Woken now and then to see whether it should stop.
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let (count, bytes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, b, s) = (count.clone(), bytes.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::SeqCst) {
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    c.fetch_add(1, Ordering::SeqCst);
                    b.fetch_add(n, Ordering::SeqCst);
                }
            }
        });
        Ok(Collector {
            count,
            bytes,
            stop,
            thread: Some(thread),
        })
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::SeqCst) as u64,
            self.bytes.load(Ordering::SeqCst) as u64,
        )
    }
}

/// A camera image: `IMAGE_BYTES` of deterministic noise (a JPEG does not compress either).
fn image(n: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (n as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
    (0..IMAGE_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Uploads image `n` from the client namespace; (bytes sent, plate).
fn upload(client: &str, n: usize) -> Result<(u64, String)> {
    let addr = SocketAddr::new(IpAddr::V4(CLOUD_V4), PORT);
    let body = image(n);
    netns::in_netns(client, move || -> Result<(u64, String)> {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let head = format!(
            "POST /recognize HTTP/1.0\r\nHost: {CLOUD_V4}\r\nContent-Type: image/jpeg\r\n\
             X-Camera: cam{}\r\nContent-Length: {}\r\n\r\n",
            n % 4,
            body.len()
        );
        c.write_all(head.as_bytes())?;
        c.write_all(&body)?;
        let mut answer = String::new();
        c.read_to_string(&mut answer)?;
        let plate = answer
            .split("\"plate\": \"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .with_context(|| format!("no plate in the answer {answer:?}"))?;
        Ok(((head.len() + body.len()) as u64, plate.to_owned()))
    })?
}

/// Uploads `images` images and counts (see [`Run`]).
fn uploads(lab: &Lab, collector: &Collector, images: usize) -> Result<Run> {
    let (edge, client) = (lab.edge.name(), lab.client.name());
    let before = collector.counts();
    let tx_before = tx_bytes(edge, WAN_IF)?;
    let mut uploaded = 0;
    let mut plates = Vec::new();
    for n in 0..images {
        let (sent, plate) = upload(client, n).with_context(|| format!("upload image {n}"))?;
        uploaded += sent;
        plates.push(plate);
    }
    // The last results are datagrams still on their way: wait for them (bounded).
    crate::wait_until(Duration::from_secs(5), || {
        collector.counts().0 - before.0 >= images as u64
    });
    let after = collector.counts();
    Ok(Run {
        images,
        uploaded,
        uplink: tx_bytes(edge, WAN_IF)? - tx_before,
        results: (after.0 - before.0, after.1 - before.1),
        plates,
    })
}

/// Runs the demo in `lab` (see the [module](self)).
///
/// # Errors
/// A step that failed.
pub fn run(lab: &Lab, smoke: bool) -> Result<Figures> {
    let images = if smoke { 4 } else { 20 };
    let cloud = lab.cloud.name();
    let files = DaemonFiles::new();
    let script = write_script(files.dir(), "alpr.py", ALPR_PY)?;
    let script = script.display().to_string();
    let port = PORT.to_string();
    let cport = COLLECTOR_PORT.to_string();

    let collector = Collector::start(cloud).context("start the collector in the cloud")?;
    let _cloud_alpr = Proc::spawn(
        cloud,
        &["python3", &script, &port, "127.0.0.1", &cport, "cloud"],
    )?;
    wait_listening(cloud, PORT)?;
    say!(
        "demo: the cloud's recognizer on {CLOUD_V4}:{PORT}, its collector on udp {COLLECTOR_PORT}; \
         the camera uploads {images} images of {}...",
        human_bytes(IMAGE_BYTES as u64)
    );
    let from_cloud = uploads(lab, &collector, images).context("uploads to the cloud")?;

    let name = lab.service_ns_name();
    let mut config = files.config();
    config.services.push(Service {
        matches: vec![format!("tcp://{CLOUD_V4}:{PORT}")],
        health: Some(Health {
            check: Check::Http("/healthz".into()),
            interval_ms: 500,
            timeout_ms: 400,
            rise: 1,
            fall: 3,
        }),
        ..Service::new(
            &name,
            vec![
                "/usr/bin/python3".into(),
                script.clone(),
                port.clone(),
                CLOUD_V4.to_string(),
                cport.clone(),
                "edge".into(),
            ],
        )
    });
    files.write(&config);
    say!(
        "demo: viscum run with service {name}: the same recognizer, matching tcp \
         {CLOUD_V4}:{PORT}, its results to the cloud's collector"
    );
    let daemon = Daemon::start(lab, &files);
    daemon.wait_redirected(&name, Duration::from_secs(30));
    say!("demo: the edge copy is healthy and redirected; the camera uploads the same images...");
    let at_edge = uploads(lab, &collector, images).context("uploads served at the edge")?;

    let stats = lab.viscum_checked(&["stats"]).map_err(anyhow::Error::msg)?;
    let json: serde_json::Value = serde_json::from_str(
        &lab.viscum_checked(&["stats", "--json"])
            .map_err(anyhow::Error::msg)?,
    )
    .context("viscum stats --json")?;
    let stats_bytes = json["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["port"] == PORT)
        .filter_map(|e| e["bytes"].as_u64())
        .sum();
    let status = daemon.stop();
    if !status.success() {
        bail!("the daemon exited with {status}");
    }
    say!(
        "demo: viscum stats (while the edge copy served):\n{}",
        stats.trim_end()
    );

    let figures = Figures {
        cloud: from_cloud,
        edge: at_edge,
        stats_bytes,
    };
    print(&figures);
    Ok(figures)
}

fn print(f: &Figures) {
    let per = |r: &Run| r.uplink / r.images.max(1) as u64;
    say!(
        r#"
============================== alpr: results ==============================
                                   cloud serving        edge copy serving
  images uploaded by the camera    {:>6}               {:>6}
  bytes uploaded by the camera     {:>12}         {:>12}
  bytes that crossed the uplink    {:>12}         {:>12}
    per image                      {:>12}         {:>12}
  results at the cloud collector   {:>6} ({:>8})   {:>6} ({:>8})

  At the edge, each {} image stays on the box and only its ~{}
  result (one datagram, {} on the wire) goes upstream: {:.2} % of the
  uploaded bytes crossed the uplink. viscum stats counted {} redirected
  into the edge copy by its entry tcp://{CLOUD_V4}:{PORT}.
==========================================================================="#,
        f.cloud.images,
        f.edge.images,
        human_bytes(f.cloud.uploaded),
        human_bytes(f.edge.uploaded),
        human_bytes(f.cloud.uplink),
        human_bytes(f.edge.uplink),
        human_bytes(per(&f.cloud)),
        human_bytes(per(&f.edge)),
        f.cloud.results.0,
        human_bytes(f.cloud.results.1),
        f.edge.results.0,
        human_bytes(f.edge.results.1),
        human_bytes(IMAGE_BYTES as u64),
        human_bytes(f.edge.results.1 / f.edge.results.0.max(1)),
        human_bytes(per(&f.edge)),
        f.edge.uplink as f64 * 100.0 / f.edge.uploaded.max(1) as f64,
        human_bytes(f.stats_bytes),
    );
}
