//! `viscum fleet apply|rm|status|put-artifact`: the operator's side of the fleet
//! (`docs/fleet.md`). Desired state goes into the NATS JetStream Key-Value bucket
//! `viscum_desired`, one `[[service]]` block per key; boxes report into `viscum_status`;
//! artifacts go into the Object Store `viscum_artifacts`. Needs no privileges on this
//! machine: only a NATS connection.
//!
//! Every command checks its whole input before it connects, and `apply` validates every
//! block before it writes the first, so bad input changes nothing.

use std::{
    collections::BTreeMap,
    fmt,
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow, bail};
use async_nats::jetstream::{self, kv};
use clap::{Args, Subcommand};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

use super::Result;
use crate::{
    config::{
        Config, ConfigError,
        fleet::{Credentials, TlsFiles},
    },
    fleet::{
        buckets,
        connect::{self, ConnectSettings},
        schema::{
            self, BoxStatus, DEFAULT_STATUS_INTERVAL, DEFAULT_STATUS_TTL, DESIRED_BUCKET,
            DesiredKey, STATUS_BUCKET,
        },
    },
};

/// `viscum fleet ...`: connection options, then the command.
#[derive(Debug, Args)]
pub struct FleetArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Validate every `[[service]]` block of a file (the daemon's schema and errors), then put
    /// each under `group.<g>.svc.<name>` or `box.<id>.svc.<name>` of the desired-state bucket
    /// (created if missing). Prints each key and its new revision. Nothing is written if any
    /// block is invalid.
    Apply(ApplyArgs),
    /// Delete one service from a group's or a box's desired state; the boxes stop it.
    Rm(RmArgs),
    /// Every box reporting into the status bucket and its services, in one table: applied
    /// revision, age of its last heartbeat (stale past three heartbeat intervals; boxes
    /// silent past the bucket's TTL are gone), errors.
    Status(StatusArgs),
    /// Upload a file (a tarball or a static binary) to the artifact store, showing progress
    /// on stderr; prints its name and SHA-256 as the `artifact = { ... }` line of a
    /// `[[service]]` block.
    PutArtifact(PutArtifactArgs),
}

/// How to reach and authenticate to the NATS servers.
#[derive(Debug, Args)]
pub struct ConnArgs {
    /// A NATS server URL (`nats://host:4222`, `tls://host:4222`); repeat for a cluster.
    #[arg(
        long = "server",
        value_name = "URL",
        env = "VISCUM_NATS_URL",
        value_delimiter = ',',
        global = true
    )]
    pub servers: Vec<String>,
    /// A NATS credentials file (JWT and NKey seed, from `nsc`).
    #[arg(long, value_name = "FILE", global = true)]
    pub creds: Option<PathBuf>,
    /// User name (with --password).
    #[arg(long, global = true)]
    pub user: Option<String>,
    /// Password of --user.
    #[arg(
        long,
        env = "VISCUM_NATS_PASSWORD",
        hide_env_values = true,
        global = true
    )]
    pub password: Option<String>,
    /// A file holding an NKey seed (`SU...`).
    #[arg(long, value_name = "FILE", global = true)]
    pub nkey: Option<PathBuf>,
    /// CA certificate(s) (PEM) to verify the server's TLS certificate; turns TLS on.
    #[arg(long, value_name = "FILE", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --tls-key.
    #[arg(long, value_name = "FILE", global = true, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", global = true, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How long to wait for the server, for a connection and for each request, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, global = true)]
    pub timeout: u64,
}

/// Where a desired-state key lives: a group's keys or one box's overrides.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// For every box in this group: keys `group.<GROUP>.svc.<name>`.
    #[arg(long, value_parser = parse_group)]
    pub group: Option<String>,
    /// For this box only (overrides its groups' service of the same name):
    /// keys `box.<ID>.svc.<name>`.
    #[arg(long = "box", value_name = "ID", value_parser = parse_box)]
    pub box_id: Option<String>,
}

impl Target {
    fn key(&self, service: &str) -> std::result::Result<DesiredKey, schema::SchemaError> {
        match (&self.group, &self.box_id) {
            (Some(g), _) => DesiredKey::group(g, service),
            (None, Some(b)) => DesiredKey::for_box(b, service),
            (None, None) => unreachable!("clap requires --group or --box"),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.group, &self.box_id) {
            (Some(g), _) => write!(f, "group {g}"),
            (_, Some(b)) => write!(f, "box {b}"),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A TOML file of `[[service]]` blocks (the daemon's schema; no `[engine]`).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
    #[command(flatten)]
    pub target: Target,
    /// Replicas of each bucket this command has to create (1, or 3/5 on a JetStream
    /// cluster); existing buckets keep theirs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: u8,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// The service's name.
    #[arg(value_parser = super::parse_service_name)]
    pub name: String,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// The boxes' heartbeat interval in seconds; a box is stale once its last heartbeat is
    /// older than three of them.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_STATUS_INTERVAL.as_secs())]
    pub heartbeat_interval: u64,
}

#[derive(Debug, Args)]
pub struct PutArtifactArgs {
    /// The file to upload.
    pub file: PathBuf,
    /// The object's name (default: the file's name).
    #[arg(long, value_parser = parse_artifact_name)]
    pub name: Option<String>,
}

/// `--group`: one key token ([`schema::validate_id`]).
fn parse_group(s: &str) -> std::result::Result<String, String> {
    schema::validate_id("group", s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

/// `--box`: one key token ([`schema::validate_id`]).
fn parse_box(s: &str) -> std::result::Result<String, String> {
    schema::validate_id("box", s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

/// An artifact name: 1-128 characters `A-Z a-z 0-9 _ - .`, not starting with `.`.
fn parse_artifact_name(s: &str) -> std::result::Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "'{}' is not an artifact name: 1-128 characters A-Z a-z 0-9 _ - ., not starting with '.'",
            s.escape_debug()
        ))
    }
}

/// `viscum fleet ...`.
pub async fn run(args: FleetArgs) -> Result<()> {
    // Everything local is checked before the first byte goes to a server.
    match args.command {
        FleetCommand::Apply(a) => {
            let blocks = service_blocks(&a.file, &a.target)?;
            let js = connect(&args.conn).await?;
            apply(&js, &blocks, usize::from(a.replicas)).await
        }
        FleetCommand::Rm(a) => {
            let js = connect(&args.conn).await?;
            rm(&js, &a).await
        }
        FleetCommand::Status(a) => {
            let js = connect(&args.conn).await?;
            status(&js, &a).await
        }
        FleetCommand::PutArtifact(a) => {
            let name = match &a.name {
                Some(n) => n.clone(),
                None => {
                    let n = a.file.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                        anyhow!("{} has no file name: give --name", a.file.display())
                    })?;
                    parse_artifact_name(n).map_err(|e| anyhow!("{e} (give --name)"))?
                }
            };
            let file = tokio::fs::File::open(&a.file)
                .await
                .with_context(|| format!("cannot open {}", a.file.display()))?;
            let meta = file
                .metadata()
                .await
                .with_context(|| format!("cannot stat {}", a.file.display()))?;
            if !meta.is_file() {
                bail!("{} is not a regular file", a.file.display());
            }
            let js = connect(&args.conn).await?;
            put_artifact(&js, &name, file, meta.len()).await
        }
    }
}

/// Checks the connection flags (files readable, one way to authenticate) and connects with
/// the box's own connection code ([`connect::connect`]).
async fn connect(conn: &ConnArgs) -> Result<jetstream::Context> {
    if conn.servers.is_empty() {
        bail!("no NATS server: give --server URL (or set VISCUM_NATS_URL)");
    }
    let auths = [
        conn.creds.is_some(),
        conn.user.is_some(),
        conn.nkey.is_some(),
    ]
    .into_iter()
    .filter(|&x| x)
    .count();
    if auths > 1 {
        bail!("give one way to authenticate: --creds, --user/--password or --nkey");
    }
    if conn.user.is_some() != conn.password.is_some() {
        bail!("--user and --password go together");
    }
    for file in [
        &conn.creds,
        &conn.nkey,
        &conn.tls_ca,
        &conn.tls_cert,
        &conn.tls_key,
    ]
    .into_iter()
    .flatten()
    {
        std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    }
    for s in &conn.servers {
        s.parse::<async_nats::ServerAddr>()
            .map_err(|e| anyhow!("'{}' is not a NATS server URL: {e}", s.escape_debug()))?;
    }
    let credentials = match (&conn.creds, &conn.user, &conn.password, &conn.nkey) {
        (Some(c), ..) => Credentials::Creds(c.clone()),
        (_, Some(user), Some(password), _) => Credentials::UserPassword {
            user: user.clone(),
            password: password.clone(),
        },
        (.., Some(n)) => Credentials::Nkey(n.clone()),
        _ => Credentials::None,
    };
    let tls = (conn.tls_ca.is_some() || conn.tls_cert.is_some()).then(|| TlsFiles {
        ca: conn.tls_ca.clone(),
        cert: conn.tls_cert.clone(),
        key: conn.tls_key.clone(),
    });
    let timeout = Duration::from_secs(conn.timeout.max(1));
    let settings = ConnectSettings {
        servers: conn.servers.clone(),
        name: "viscum-fleet-cli".into(),
        credentials,
        tls,
        connect_timeout: timeout,
        max_reconnect_delay: Duration::from_secs(1),
        inbox_prefix: None,
    };
    let fleet = connect::connect(&settings, None).await?;
    let mut js = fleet.jetstream;
    js.set_timeout(timeout);
    Ok(js)
}

/// One `[[service]]` block of an `apply` file, with its key and the value stored there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceBlock {
    /// `group.<g>.svc.<name>` or `box.<id>.svc.<name>`.
    pub key: String,
    /// TOML text of exactly one `[[service]]` block.
    pub value: String,
}

/// Reads `file` and makes one key and value per `[[service]]` block for `target`, every
/// block validated first.
///
/// # Errors
/// Unreadable file; the daemon's own [`ConfigError`] (naming the file, every problem listed);
/// a section other than `[[service]]`; no service at all; a block a box would refuse.
pub fn service_blocks(file: &Path, target: &Target) -> Result<Vec<ServiceBlock>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    split_services(&text, &file.display().to_string(), target)
}

/// [`Config::parse`] with the error naming `origin` (the daemon's errors, word for word).
fn parse_as(text: &str, origin: &str) -> std::result::Result<Config, ConfigError> {
    Config::parse(text).map_err(|mut e| {
        if let ConfigError::Syntax { origin: o, .. } | ConfigError::Invalid { origin: o, .. } =
            &mut e
        {
            *o = origin.to_owned();
        }
        e
    })
}

fn split_services(text: &str, origin: &str, target: &Target) -> Result<Vec<ServiceBlock>> {
    let table: toml::Table = toml::from_str(text).map_err(|source| ConfigError::Syntax {
        origin: origin.to_owned(),
        source,
    })?;
    if let Some(other) = table.keys().find(|k| *k != "service") {
        bail!(
            "{origin}: [{other}] is a box's own setting: a fleet file holds [[service]] blocks only"
        );
    }
    let Some(toml::Value::Array(services)) = table.get("service") else {
        bail!("{origin}: no [[service]] block");
    };
    // The whole file through the daemon's validator (every problem at once, duplicate names
    // and matches across blocks too), `artifact` aside: only fleet services may name one, and
    // the per-key check below validates it.
    let mut local = toml::Table::new();
    local.insert(
        "service".into(),
        toml::Value::Array(
            services
                .iter()
                .map(|b| {
                    let mut b = b.clone();
                    if let Some(t) = b.as_table_mut() {
                        t.remove("artifact");
                    }
                    b
                })
                .collect(),
        ),
    );
    let config = parse_as(
        &toml::to_string(&local).context("write the blocks as TOML")?,
        origin,
    )?;
    let mut blocks = Vec::new();
    for (service, raw) in config.services.iter().zip(services) {
        let key = target.key(&service.name)?.to_string();
        let block = raw
            .as_table()
            .ok_or_else(|| anyhow!("{origin}: service {} is not a table", service.name))?;
        let value = schema::value_from_block(block).context("write a service block as TOML")?;
        // Exactly what a box will run on the value: the artifact checked, the name matched
        // against the key.
        schema::service_from_value(&key, value.as_bytes()).map_err(|e| anyhow!("{origin}: {e}"))?;
        blocks.push(ServiceBlock { key, value });
    }
    Ok(blocks)
}

/// Opens bucket `config.bucket`, creating it (with `replicas`) if it is missing.
async fn kv_bucket(
    js: &jetstream::Context,
    mut config: kv::Config,
    replicas: usize,
) -> Result<kv::Store> {
    config.num_replicas = replicas;
    Ok(buckets::ensure_kv(js, config).await?)
}

async fn apply(js: &jetstream::Context, blocks: &[ServiceBlock], replicas: usize) -> Result<()> {
    let store = kv_bucket(js, schema::desired_bucket_config(), replicas).await?;
    // Boxes only put into it; creating it is the operator's right.
    kv_bucket(
        js,
        schema::status_bucket_config(DEFAULT_STATUS_TTL),
        replicas,
    )
    .await?;
    let mut out = std::io::stdout().lock();
    for block in blocks {
        let revision = store
            .put(&block.key, block.value.clone().into())
            .await
            .with_context(|| format!("cannot put {}", block.key))?;
        writeln!(out, "{}\trevision {revision}", block.key)?;
    }
    Ok(())
}

async fn rm(js: &jetstream::Context, args: &RmArgs) -> Result<()> {
    let key = args.target.key(&args.name)?.to_string();
    let store = js
        .get_key_value(DESIRED_BUCKET)
        .await
        .with_context(|| format!("cannot open bucket {DESIRED_BUCKET} (nothing applied yet?)"))?;
    let present = store
        .get(&key)
        .await
        .with_context(|| format!("cannot read {key}"))?;
    if present.is_none() {
        bail!(
            "no service '{}' in {} ({key} is not set)",
            args.name,
            args.target
        );
    }
    store
        .delete(&key)
        .await
        .with_context(|| format!("cannot delete {key}"))?;
    println!("{key}\tdeleted at revision {}", desired_revision(js).await);
    Ok(())
}

/// What `viscum fleet status --json` prints.
#[derive(Debug, Serialize)]
struct FleetStatus {
    /// The desired-state bucket's last revision (0: empty or missing).
    desired_revision: u64,
    /// Now, ms since the Unix epoch (what ages are taken against).
    now_ms: u64,
    /// The staleness threshold in ms (three heartbeat intervals).
    stale_after_ms: u64,
    boxes: Vec<BoxRow>,
}

#[derive(Debug, Serialize)]
struct BoxRow {
    /// Milliseconds since the last heartbeat.
    heartbeat_age_ms: u64,
    /// Heartbeat older than three intervals (not yet expired by the bucket's TTL).
    stale: bool,
    #[serde(flatten)]
    report: BoxStatus,
}

/// The desired-state bucket's last revision (its stream's last sequence), read now; 0 when
/// the bucket is missing or does not answer.
async fn desired_revision(js: &jetstream::Context) -> u64 {
    let Ok(stream) = js.get_stream(format!("KV_{DESIRED_BUCKET}")).await else {
        return 0;
    };
    for _ in 0..20 {
        match stream.info_with_subjects("").await {
            Ok(i) if has_leader(&i.info) => return i.info.state.last_sequence,
            Ok(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            Err(_) => return 0,
        }
    }
    0
}

/// Whether a stream info came from the stream's leader, or from a single server: a replica
/// of a clustered stream whose leader is gone answers with its own, possibly stale, state
/// (seen on nats-server 2.9: a lagging replica listed no status keys at all).
fn has_leader(info: &jetstream::stream::Info) -> bool {
    info.cluster
        .as_ref()
        .is_none_or(|c| c.leader.as_deref().is_some_and(|l| !l.is_empty()))
}

/// Every subject of `stream` matching `filter` with its message count, from the stream's
/// leader: while the replicas elect one (a few seconds after a node is lost), asked again
/// every 250 ms for up to 5 s.
async fn leader_subjects(
    stream: &jetstream::stream::Stream,
    filter: &str,
) -> Result<Vec<(String, usize)>> {
    use futures::TryStreamExt as _;

    for _ in 0..20 {
        let info = stream
            .info_with_subjects(filter)
            .await
            .context("cannot list the status bucket")?;
        if has_leader(&info.info) {
            return info
                .try_collect()
                .await
                .context("cannot list the status bucket");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "cannot list the status bucket: its replicas have no leader (a node is down and no \
         quorum elects one); try again"
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn status(js: &jetstream::Context, args: &StatusArgs) -> Result<()> {
    let desired_revision = desired_revision(js).await;
    let now = now_ms();
    let stale_after_ms = args.heartbeat_interval.saturating_mul(3000);
    let mut reports: BTreeMap<String, BoxRow> = BTreeMap::new();
    match js.get_key_value(STATUS_BUCKET).await {
        Ok(store) => {
            // The keys from the stream's per-subject counts rather than `keys()`: that
            // needs a consumer, which nats-server 2.9 may place on an offline peer of a
            // clustered bucket (the request then times out); stream info and direct gets
            // are answered by the live replicas.
            let prefix = format!("$KV.{STATUS_BUCKET}.");
            let subjects = leader_subjects(&store.stream, &format!("{prefix}>")).await?;
            let keys = subjects
                .into_iter()
                .filter_map(|(s, _)| s.strip_prefix(&prefix).map(str::to_owned));
            for key in keys {
                let Some(value) = store
                    .get(&key)
                    .await
                    .with_context(|| format!("cannot read {key}"))?
                else {
                    continue; // expired between the listing and the read
                };
                let report: BoxStatus = match serde_json::from_slice(&value) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("viscum: warning: {key} is not a box report ({e}); skipped");
                        continue;
                    }
                };
                let age = now.saturating_sub(report.heartbeat_ms);
                reports.insert(
                    report.box_id.clone(),
                    BoxRow {
                        heartbeat_age_ms: age,
                        stale: age > stale_after_ms,
                        report,
                    },
                );
            }
        }
        Err(e) if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {}
        Err(e) => return Err(e).with_context(|| format!("cannot open bucket {STATUS_BUCKET}")),
    }
    let status = FleetStatus {
        desired_revision,
        now_ms: now,
        stale_after_ms,
        boxes: reports.into_values().collect(),
    };
    if args.json {
        return super::print_json(&status);
    }
    println!(
        "desired revision {desired_revision}; {} box{} reporting",
        status.boxes.len(),
        if status.boxes.len() == 1 { "" } else { "es" }
    );
    let mut rows = Vec::new();
    for b in &status.boxes {
        let r = &b.report;
        let state = match (&r.error, b.stale) {
            (_, true) => "STALE".to_owned(),
            (Some(e), false) => format!("error: {e}"),
            (None, false) => "ok".to_owned(),
        };
        let box_cells = [
            r.box_id.clone(),
            r.revision.to_string(),
            format!("{:.1}s", b.heartbeat_age_ms as f64 / 1000.0),
            state,
        ];
        if r.services.is_empty() {
            let mut row = box_cells.to_vec();
            row.extend(["-", "", "", "", "", "", ""].map(String::from));
            rows.push(row);
        }
        for (i, s) in r.services.iter().enumerate() {
            let mut row = if i == 0 {
                box_cells.to_vec()
            } else {
                vec![String::new(); 4]
            };
            row.extend([
                s.name.clone(),
                s.source.clone(),
                s.state.clone(),
                s.health.clone(),
                s.edge_flows.to_string(),
                s.bytes_kept_off_uplink.to_string(),
                s.artifact.as_ref().map_or_else(
                    || "-".into(),
                    |a| format!("{}@{}", a.name, a.sha256.get(..12).unwrap_or(&a.sha256)),
                ),
            ]);
            rows.push(row);
        }
    }
    super::print_table(
        &[
            "BOX",
            "REVISION",
            "HEARTBEAT",
            "STATE",
            "SERVICE",
            "SOURCE",
            "SVC-STATE",
            "HEALTH",
            "EDGE-FLOWS",
            "BYTES-KEPT",
            "ARTIFACT",
        ],
        &rows,
    );
    Ok(())
}

/// Counts bytes read and feeds them to a SHA-256, printing progress on stderr.
struct Progress<R> {
    inner: R,
    name: String,
    done: u64,
    total: u64,
    sha: Sha256,
    tty: bool,
    last_percent: Option<u64>,
}

impl<R> Progress<R> {
    fn show(&mut self) {
        let percent = (self.done * 100).checked_div(self.total).unwrap_or(100);
        if self.last_percent == Some(percent) {
            return;
        }
        self.last_percent = Some(percent);
        let line = format!(
            "{}: {} / {} bytes ({percent}%)",
            self.name, self.done, self.total
        );
        let mut err = std::io::stderr().lock();
        // On a terminal one line redrawn; in a log one line per 10%.
        if self.tty {
            let _ = write!(err, "\r{line}");
        } else if percent.is_multiple_of(10) {
            let _ = writeln!(err, "{line}");
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Progress<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                let n = new.len() as u64;
                self.sha.update(new);
                self.done += n;
                self.show();
            }
        }
        poll
    }
}

async fn put_artifact(
    js: &jetstream::Context,
    name: &str,
    file: tokio::fs::File,
    size: u64,
) -> Result<()> {
    let store = buckets::ensure_object_store(js, schema::artifact_bucket_config()).await?;
    let mut reader = Progress {
        inner: file,
        name: name.to_owned(),
        done: 0,
        total: size,
        sha: Sha256::new(),
        tty: std::io::stderr().is_terminal(),
        last_percent: None,
    };
    reader.show();
    let info = store
        .put(name, &mut reader)
        .await
        .with_context(|| format!("cannot upload {name}"))?;
    if reader.tty {
        eprintln!();
    }
    let sha256: String = reader
        .sha
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if info.size as u64 != reader.done {
        bail!(
            "uploaded {} bytes of {name} but the store recorded {}",
            reader.done,
            info.size
        );
    }
    println!("{name}\t{sha256}\t{} bytes", info.size);
    println!("artifact = {{ name = \"{name}\", sha256 = \"{sha256}\" }}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"
[[service]]
name = "web"
match = ["tcp://198.51.100.7:80"]
command = ["/bin/true"]
artifact = { name = "web-1.tar.gz", sha256 = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff" }

[[service]]
name = "dns"
match = ["udp://198.51.100.7:53"]
command = ["/bin/true"]
health = { tcp = 53 }
"#;

    fn group(g: &str) -> Target {
        Target {
            group: Some(g.into()),
            box_id: None,
        }
    }

    #[test]
    fn split_keeps_each_block_alone_and_valid() {
        let blocks = split_services(TWO, "two.toml", &group("g1")).expect("valid");
        assert_eq!(
            blocks.iter().map(|b| b.key.as_str()).collect::<Vec<_>>(),
            ["group.g1.svc.web", "group.g1.svc.dns"]
        );
        for b in &blocks {
            let svc = schema::service_from_value(&b.key, b.value.as_bytes()).expect("box accepts");
            assert!(b.key.ends_with(&svc.name));
        }
        assert!(
            blocks[0].value.contains("web-1.tar.gz"),
            "{}",
            blocks[0].value
        );
        let boxed = Target {
            group: None,
            box_id: Some("r17".into()),
        };
        let blocks = split_services(TWO, "two.toml", &boxed).expect("valid");
        assert_eq!(blocks[1].key, "box.r17.svc.dns");
    }

    #[test]
    fn split_refuses_with_the_daemon_errors() {
        let bad = TWO.replace("udp://198.51.100.7:53", "udp://198.51.100.7:0");
        let err = split_services(&bad, "bad.toml", &group("g"))
            .unwrap_err()
            .to_string();
        let local = bad.replace(
            "artifact = { name = \"web-1.tar.gz\", sha256 = \"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\" }\n",
            "",
        );
        let daemon = Config::parse(&local).unwrap_err().to_string();
        assert_eq!(err, daemon.replacen("configuration", "bad.toml", 1));
        let dup = format!(
            "{TWO}{}",
            TWO.split("[[service]]")
                .nth(2)
                .map(|b| format!("[[service]]{b}"))
                .unwrap()
        );
        let err = split_services(&dup, "dup.toml", &group("g"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("already the name of service #2"), "{err}");
        let bad_artifact = TWO.replace("sha256 = \"00", "sha256 = \"zz");
        let err = split_services(&bad_artifact, "a.toml", &group("g"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sha256"), "{err}");
        let engine = format!("[engine]\n{TWO}");
        let err = split_services(&engine, "e.toml", &group("g"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[engine] is a box's own setting"), "{err}");
        assert!(split_services("", "empty.toml", &group("g")).is_err());
        assert!(
            split_services("x = [", "s.toml", &group("g"))
                .unwrap_err()
                .to_string()
                .contains("s.toml: not valid TOML")
        );
    }

    #[test]
    fn ids_are_single_key_tokens() {
        assert!(parse_group("site-7_a").is_ok());
        for bad in ["", "a.b", "*", ">", "a b", &"x".repeat(65)] {
            assert!(parse_group(bad).is_err(), "{bad}");
            assert!(parse_box(bad).is_err(), "{bad}");
        }
        assert!(parse_artifact_name("web-1.2.tar.gz").is_ok());
        for bad in ["", "../x", ".hidden", "a/b", "a b"] {
            assert!(parse_artifact_name(bad).is_err(), "{bad}");
        }
    }
}
