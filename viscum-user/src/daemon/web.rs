//! The daemon's HTTP listener (`[engine] metrics = "ADDR:PORT"`): the Prometheus endpoint, a
//! read-only status page and the JSON the page polls.
//!
//! | path | answer |
//! |---|---|
//! | `/metrics` | Prometheus text ([`super::metrics`]) |
//! | `/` | the page (`page.html`, embedded: HTML, inline CSS and JS, no external assets, so it works on a router with no internet) |
//! | `/api/status` | [`ApiStatus`] as JSON; `?since=T` sends only the samples newer than `T` |
//!
//! Served with hyper's HTTP/1 server on the daemon's tokio runtime. The listener never
//! touches the daemon's state: for every answer it asks the supervisor for a
//! [`DaemonStatus`] snapshot over a channel ([`Scrape`]), the same snapshot `viscum status`
//! shows, and renders it here.
//!
//! The charts need history on first load, so a sampler task takes a snapshot every
//! [`SAMPLE_INTERVAL`] and keeps the last [`HISTORY_LEN`] ([`History`], 10 minutes) in
//! memory: a few hundred bytes per service per sample, nothing on disk.
//!
//! Adding a number to the page: a field of [`ServiceStatus`] (or [`DaemonStatus`]) is in
//! `status` at once, and the page's `COLUMNS` table in `page.html` shows it; a number to chart
//! over time is also a field of [`ServiceSample`] (filled in its `From<&ServiceStatus>`) and
//! an entry of the page's `CHARTS` table.
//!
//! Bounds: a request head must arrive within 5 s; at most [`MAX_CONNECTIONS`] connections
//! are served at once (more are closed at once); only `GET` and `HEAD` are answered (`405`
//! otherwise).

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc, oneshot},
};

use super::{
    control::{DaemonStatus, Health, ServiceStatus},
    metrics,
};

/// A request for the current status: the supervisor answers with a snapshot.
pub type Scrape = oneshot::Sender<DaemonStatus>;

/// How often the sampler records a [`Sample`] for the charts.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// How many samples [`History`] keeps: 10 minutes at [`SAMPLE_INTERVAL`].
pub const HISTORY_LEN: usize = 120;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// The page, embedded in the binary.
const PAGE: &str = include_str!("page.html");

/// One service in a [`Sample`]: the numbers the page charts.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ServiceSample {
    /// Flows started at the edge so far ([`ServiceStatus::edge_flows`]).
    pub edge_flows: u64,
    /// Matched flows that went to the cloud so far ([`ServiceStatus::cloud_flows`]).
    pub cloud_flows: u64,
    /// Edge flows open at the time of the sample.
    pub live_flows: u64,
    /// Packets redirected to the service so far.
    pub packets: u64,
    /// Bytes redirected to the service so far: client traffic that stayed off the uplink.
    pub bytes: u64,
    /// Automatic restarts so far.
    pub restarts: u32,
    /// The health checks passed at the time of the sample.
    pub healthy: bool,
}

impl From<&ServiceStatus> for ServiceSample {
    fn from(s: &ServiceStatus) -> Self {
        ServiceSample {
            edge_flows: s.edge_flows,
            cloud_flows: s.cloud_flows,
            live_flows: s.live_flows,
            packets: s.packets,
            bytes: s.bytes,
            restarts: s.restarts,
            healthy: s.health == Health::Healthy,
        }
    }
}

/// The daemon's numbers at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Milliseconds since the listener started (monotonic: wall-clock steps do not bend the
    /// charts).
    pub t_ms: u64,
    /// The load figure, with `max_load` set ([`DaemonStatus::load`]).
    pub load: Option<f64>,
    /// Services were held back to the cloud because of load.
    pub shedding: bool,
    /// Every service, by name.
    pub services: BTreeMap<String, ServiceSample>,
}

impl Sample {
    /// The sample of `status` taken at `t_ms`.
    pub fn of(status: &DaemonStatus, t_ms: u64) -> Sample {
        Sample {
            t_ms,
            load: status.load,
            shedding: status.shedding,
            services: status
                .services
                .iter()
                .map(|s| (s.name.clone(), ServiceSample::from(s)))
                .collect(),
        }
    }
}

/// A ring buffer of the most recent samples, oldest first.
#[derive(Debug, Clone)]
pub struct History {
    samples: VecDeque<Sample>,
    capacity: usize,
}

impl History {
    /// An empty history that keeps at most `capacity` samples (at least one).
    pub fn new(capacity: usize) -> History {
        let capacity = capacity.max(1);
        History {
            samples: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Appends `sample`, dropping the oldest when full.
    pub fn push(&mut self, sample: Sample) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// The samples taken after `t_ms` (all of them for `None`), oldest first.
    pub fn since(&self, t_ms: Option<u64>) -> Vec<Sample> {
        self.samples
            .iter()
            .filter(|s| t_ms.is_none_or(|t| s.t_ms > t))
            .cloned()
            .collect()
    }

    /// How many samples are kept now.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// No sample yet.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// The answer of `/api/status`.
#[derive(Debug, Serialize)]
pub struct ApiStatus<'a> {
    /// The listener's clock (as [`Sample::t_ms`]) when `status` was taken.
    pub now_ms: u64,
    /// Seconds between samples ([`SAMPLE_INTERVAL`]).
    pub interval_s: u64,
    /// Seconds of history kept ([`HISTORY_LEN`] samples).
    pub window_s: u64,
    /// The daemon now, exactly as `viscum status --json` has it.
    pub status: &'a DaemonStatus,
    /// Samples newer than the request's `since` (all kept ones without it), oldest first.
    pub history: Vec<Sample>,
}

/// What the connections and the sampler share.
struct Shared {
    tx: mpsc::Sender<Scrape>,
    started: Instant,
    history: Mutex<History>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A snapshot of the daemon now, with the listener's clock; `None` once the supervisor is
    /// gone. Never cached: an answer reflects the daemon at the time it was asked (a scrape
    /// right after a change sees it), and a snapshot is cheap next to a browser's 2 s poll.
    async fn status(&self) -> Option<(u64, DaemonStatus)> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(reply).await.ok()?;
        let status = rx.await.ok()?;
        Some((self.now_ms(), status))
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        // A panic while holding the lock leaves a consistent ring buffer: keep using it.
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Aborts a task when dropped (the sampler goes with the listener).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds the listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/metrics`, `/` and `/api/status` and samples the history, until `tx`'s receiver
/// goes or the future is dropped.
pub async fn serve(listener: TcpListener, tx: mpsc::Sender<Scrape>) {
    let shared = Arc::new(Shared {
        tx,
        started: Instant::now(),
        history: Mutex::new(History::new(HISTORY_LEN)),
    });
    let _sampler = AbortOnDrop(tokio::spawn(sample(shared.clone())));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            log::debug!("metrics: {MAX_CONNECTIONS} connections open, closing one from {peer}");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(&req, &shared).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                log::debug!("metrics: connection from {peer}: {e}");
            }
            drop(slot);
        });
    }
}

/// Records a sample every [`SAMPLE_INTERVAL`], the first at once.
async fn sample(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some((t, status)) = shared.status().await else {
            return;
        };
        shared.history().push(Sample::of(&status, t));
    }
}

fn reply(code: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = code;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_str(content_type)
            .unwrap_or(header::HeaderValue::from_static("text/plain")),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    response
}

fn unavailable() -> Response<Full<Bytes>> {
    reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "text/plain; charset=utf-8",
        "shutting down\n",
    )
}

/// The `since` parameter of a query string, if there is a valid one.
fn since(query: Option<&str>) -> Option<u64> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("since="))
        .and_then(|v| v.parse().ok())
}

async fn answer(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/" => {
            let mut r = reply(StatusCode::OK, "text/html; charset=utf-8", PAGE);
            // Everything the page needs is inline; it may only talk back to this listener.
            r.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                header::HeaderValue::from_static(
                    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; img-src data:",
                ),
            );
            r
        }
        "/metrics" => match shared.status().await {
            Some((_, status)) => reply(
                StatusCode::OK,
                metrics::CONTENT_TYPE,
                metrics::render(&status),
            ),
            None => unavailable(),
        },
        "/api/status" => match shared.status().await {
            Some((now_ms, status)) => {
                let body = ApiStatus {
                    now_ms,
                    interval_s: SAMPLE_INTERVAL.as_secs(),
                    window_s: SAMPLE_INTERVAL.as_secs() * HISTORY_LEN as u64,
                    status: &status,
                    history: shared.history().since(since(req.uri().query())),
                };
                match serde_json::to_vec(&body) {
                    Ok(json) => reply(StatusCode::OK, "application/json", json),
                    Err(e) => reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain; charset=utf-8",
                        format!("cannot encode the status: {e}\n"),
                    ),
                }
            }
            None => unavailable(),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /, /metrics or /api/status\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(edge: u64) -> DaemonStatus {
        DaemonStatus {
            services: vec![ServiceStatus {
                name: "web".into(),
                health: Health::Healthy,
                edge_flows: edge,
                bytes: edge * 100,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn history_keeps_the_newest_and_answers_since() {
        let mut h = History::new(3);
        assert!(h.is_empty());
        for i in 0..5 {
            h.push(Sample::of(&status(i), i * 5000));
        }
        assert_eq!(h.len(), 3);
        let all = h.since(None);
        assert_eq!(
            all.iter().map(|s| s.t_ms).collect::<Vec<_>>(),
            [10_000, 15_000, 20_000]
        );
        assert_eq!(all[2].services["web"].edge_flows, 4);
        assert_eq!(all[2].services["web"].bytes, 400);
        assert!(all[2].services["web"].healthy);
        assert_eq!(h.since(Some(15_000)).len(), 1);
        assert!(h.since(Some(20_000)).is_empty());
    }

    #[test]
    fn since_parameter() {
        assert_eq!(since(Some("since=1234")), Some(1234));
        assert_eq!(since(Some("a=b&since=7")), Some(7));
        assert_eq!(since(Some("since=x")), None);
        assert_eq!(since(None), None);
    }

    /// The page is served whole and self-contained: no asset from elsewhere.
    #[test]
    fn page_has_no_external_assets() {
        assert!(PAGE.contains("/api/status"));
        for bad in ["http://", "https://", "src=\"//", "href=\"//", "@import"] {
            // The SVG namespace is an identifier, not a fetch.
            let hits = PAGE
                .match_indices(bad)
                .filter(|(i, _)| !PAGE[*i..].starts_with("http://www.w3.org/2000/svg"))
                .count();
            assert_eq!(hits, 0, "{bad}");
        }
    }

    /// End to end over a real socket: the routes, with a fake supervisor answering snapshots.
    #[test]
    fn serves_the_routes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, mut rx) = mpsc::channel::<Scrape>(4);
            // The fake supervisor's numbers grow with every snapshot it is asked for: the
            // first (the sampler's, at once) has 1 edge flow, the next 2, and so on.
            tokio::spawn(async move {
                let mut n = 0;
                while let Some(reply) = rx.recv().await {
                    n += 1;
                    let _ = reply.send(status(n));
                }
            });
            let server = tokio::spawn(serve(listener, tx));
            let get = |path: &'static str, method: &'static str| async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(format!("{method} {path} HTTP/1.0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                out
            };
            let page = get("/", "GET").await;
            assert!(page.starts_with("HTTP/1.0 200 OK"), "{page}");
            assert!(page.contains("content-type: text/html"), "{page}");
            assert!(page.contains("/api/status"));
            let api = |path: &'static str| async move {
                let answer = get(path, "GET").await;
                let json = answer.split("\r\n\r\n").nth(1).unwrap().to_string();
                serde_json::from_str::<serde_json::Value>(&json).unwrap()
            };
            // The sampler's first sample is taken at once (the next one 5 s later).
            let mut first = serde_json::Value::Null;
            for _ in 0..100 {
                first = api("/api/status").await;
                if !first["history"].as_array().unwrap().is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let samples = first["history"].as_array().unwrap();
            assert_eq!(samples.len(), 1, "{first:#}");
            let edge = samples[0]["services"]["web"]["edge_flows"]
                .as_u64()
                .unwrap();
            assert_eq!(samples[0]["services"]["web"]["bytes"], edge * 100);
            assert_eq!(first["interval_s"], 5);
            assert_eq!(first["window_s"], 600);
            assert_eq!(first["status"]["services"][0]["name"], "web");
            // Each answer is a new snapshot (no cache hides a change from a scraper).
            let n = first["status"]["services"][0]["edge_flows"]
                .as_u64()
                .unwrap();
            for i in 1..=2 {
                let text = get("/metrics", "GET").await;
                assert!(text.starts_with("HTTP/1.0 200 OK"), "{text}");
                let want = format!(
                    "viscum_service_flows_total{{service=\"web\",where=\"edge\"}} {}\n",
                    n + i
                );
                assert!(text.contains(&want), "{want}: {text}");
            }
            let again = api("/api/status").await;
            assert_eq!(again["status"]["services"][0]["edge_flows"], n + 3);
            assert_eq!(again["history"].as_array().unwrap().len(), 1);
            let later = get("/api/status?since=99999999", "GET").await;
            assert!(later.contains("\"history\":[]"), "{later}");
            assert!(get("/nope", "GET").await.starts_with("HTTP/1.0 404"));
            assert!(get("/", "POST").await.starts_with("HTTP/1.0 405"));
            server.abort();
        });
    }
}
