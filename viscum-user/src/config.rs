//! The daemon's declarative configuration (`viscum run --config FILE`).
//!
//! ```toml
//! [engine]
//! interfaces = ["br-lan"]          # client-facing interfaces (TC ingress)
//! bpffs = "/sys/fs/bpf/viscum"     # optional, else the global --bpffs
//! control = "/run/viscum.sock"     # optional control socket
//! run_dir = "/run/viscum"          # optional: logs/ and state/ live here
//! max_load = 0.9                   # optional load shedding threshold
//! metrics = "127.0.0.1:9310"       # optional Prometheus endpoint
//!
//! [[service]]
//! name = "speedtest"
//! match = ["tcp://198.51.100.7:5201", "udp://198.51.100.7:5201"]
//! command = ["iperf3", "-s", "-p", "5201"]
//! user = "nobody"
//! env = { KEY = "value" }
//! restart = "on-failure"
//! stop_grace_ms = 5000
//! drain_timeout_ms = 10000           # on a deliberate stop, wait this long for edge flows to end
//! [service.health]
//! tcp = 5201
//! interval_ms = 500
//! timeout_ms = 300
//! rise = 2
//! fall = 2
//! [service.limits]
//! memory = "64M"
//! cpu = 0.5
//! pids = 64
//! ```
//!
//! Parsing happens in two passes so that one run reports *every* problem: the file is first
//! read as a plain TOML table (only a syntax error stops here), then each section is decoded
//! on its own (unknown fields and wrong types are reported per service, and the other
//! services are still checked), and finally the decoded values are validated one by one and
//! across services (duplicate names, duplicate matches). Each problem names its service and
//! field: `service speedtest: match[1]: port '70000' is not a number between 1 and 65535`.
//! A file with any problem yields no [`Config`] at all, so an invalid file never changes a
//! running daemon.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
    fmt,
    hash::{Hash, Hasher},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{endpoint::Endpoint, hostnames::HostMatch, netns};

/// Interval between health checks when the file does not say.
pub const DEFAULT_INTERVAL_MS: u64 = 1000;
/// Health check timeout when the file does not say.
pub const DEFAULT_TIMEOUT_MS: u64 = 500;
/// Consecutive successes before a service is redirected, when the file does not say.
pub const DEFAULT_RISE: u32 = 2;
/// Consecutive failures before a service's redirect is removed, when the file does not say.
pub const DEFAULT_FALL: u32 = 2;
/// Time between SIGTERM and SIGKILL when stopping a service.
pub const DEFAULT_STOP_GRACE_MS: u64 = 5000;
/// Default bound on draining a deliberately stopped service's edge flows.
const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 10_000;
/// Services run unprivileged unless told otherwise.
pub const DEFAULT_USER: &str = "nobody";

/// A validated configuration. Built only by [`Config::load`] / [`Config::parse`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The `[engine]` table.
    pub engine: EngineConfig,
    /// The `[[service]]` tables, in file order.
    pub services: Vec<ServiceConfig>,
    /// The file this came from; `viscum reload` and SIGHUP re-read it.
    pub source: Option<PathBuf>,
}

/// The `[engine]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Client-facing interfaces where the classifier runs at TC ingress.
    pub interfaces: Vec<String>,
    /// bpffs directory for the pins (`None`: the global `--bpffs`).
    pub bpffs: Option<PathBuf>,
    /// Control socket path (`None`: derived from the bpffs directory).
    pub control: Option<PathBuf>,
    /// Directory for logs and state files (`None`: derived from the bpffs directory).
    pub run_dir: Option<PathBuf>,
    /// Shed every service to the cloud while the load is above this fraction.
    pub max_load: Option<f64>,
    /// Address of the Prometheus text endpoint.
    pub metrics: Option<SocketAddr>,
    /// DNS servers for host-name matches (empty: the box's /etc/resolv.conf).
    pub dns: Vec<SocketAddr>,
}

/// One `[[service]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// Service and namespace name (netns name rules: 1-12 of a-z 0-9 - _).
    pub name: String,
    /// What the classifier redirects into the namespace while the service is healthy.
    pub matches: Vec<Endpoint>,
    /// Cloud host names: one entry per address they resolve to, kept in step with DNS.
    pub host_matches: Vec<HostMatch>,
    /// Program and arguments, run inside the namespace.
    pub command: Vec<String>,
    /// The account the command runs as.
    pub user: ServiceUser,
    /// Extra environment on top of a minimal one (PATH, HOME, USER, LOGNAME).
    pub env: BTreeMap<String, String>,
    /// What to do when the process exits.
    pub restart: RestartPolicy,
    /// When the service counts as able to answer.
    pub health: HealthConfig,
    /// Resource limits (cgroups).
    pub limits: Limits,
    /// Time between SIGTERM and SIGKILL when stopping.
    pub stop_grace: Duration,
    /// On a deliberate stop, how long the entries drain (no new flows; open
    /// edge flows continue) before the process is stopped. 0 = no draining.
    pub drain_timeout: Duration,
}

impl ServiceConfig {
    /// A fingerprint of everything that shapes the running process. A daemon that restarts
    /// only adopts a process left by its predecessor when the fingerprint it recorded matches
    /// the current configuration; otherwise the process is replaced.
    pub fn fingerprint(&self) -> String {
        // SipHash with fixed keys: stable within a build, and a change across builds only
        // costs a service restart, never a wrong adoption.
        #[expect(
            deprecated,
            reason = "SipHasher is the stable, keyed-by-zero hasher we want here"
        )]
        let mut h = std::hash::SipHasher::new();
        format!("{self:?}").hash(&mut h);
        format!("{:016x}", h.finish())
    }
}

/// A resolved account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from the group database), set with setgroups.
    pub groups: Vec<u32>,
    pub home: PathBuf,
}

/// `restart = "always" | "on-failure" | "never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// Should a process that ended like this be started again?
    pub fn restarts(self, success: bool) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        }
    }
}

/// The `[service.health]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub check: HealthCheck,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes before the redirect is installed.
    pub rise: u32,
    /// Consecutive failures before the redirect is removed.
    pub fall: u32,
}

/// What a health check does; all of them run inside the service namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// TCP connect to 127.0.0.1:port.
    Tcp { port: u16 },
    /// `GET path` on 127.0.0.1:port; any 2xx passes.
    Http { path: String, port: u16 },
    /// Runs a command (as the service's user); exit status 0 passes.
    Exec { command: Vec<String> },
}

impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthCheck::Tcp { port } => write!(f, "tcp 127.0.0.1:{port}"),
            HealthCheck::Http { path, port } => write!(f, "http 127.0.0.1:{port}{path}"),
            HealthCheck::Exec { command } => write!(f, "exec {}", command.join(" ")),
        }
    }
}

/// The `[service.limits]` table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Limits {
    /// Bytes.
    pub memory: Option<u64>,
    /// CPUs (0.5 = half of one CPU).
    pub cpu: Option<f64>,
    /// Maximum number of tasks.
    pub pids: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.memory.is_none() && self.cpu.is_none() && self.pids.is_none()
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: not valid TOML")]
    Syntax {
        origin: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{origin}: {} problem{}:\n  {}", problems.len(), if problems.len() == 1 { "" } else { "s" },
        problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// Each problem as one line (for the control protocol).
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid { problems, .. } => {
                problems.iter().map(ToString::to_string).collect()
            }
            ConfigError::Syntax { source, .. } => {
                vec![format!("{self}: {}", source.to_string().trim())]
            }
            ConfigError::Read { source, .. } => vec![format!("{self}: {source}")],
        }
    }
}

/// One thing wrong in a file: where (`service speedtest`, `engine`), which field
/// (`match[1]`, `health.timeout_ms`) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub scope: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.scope, self.message)
        } else {
            write!(f, "{}: {}: {}", self.scope, self.field, self.message)
        }
    }
}

/// Collects problems under one scope.
struct Problems<'a> {
    scope: String,
    out: &'a mut Vec<Problem>,
}

impl Problems<'_> {
    fn add(&mut self, field: impl Into<String>, message: impl fmt::Display) {
        self.out.push(Problem {
            scope: self.scope.clone(),
            field: field.into(),
            message: message.to_string(),
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Raw shapes, as serde sees them. Every field is optional so that a missing one is reported
// by the validator together with everything else, rather than stopping serde at the first.

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    interfaces: Option<Vec<String>>,
    bpffs: Option<PathBuf>,
    control: Option<PathBuf>,
    run_dir: Option<PathBuf>,
    max_load: Option<f64>,
    metrics: Option<String>,
    dns: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<String>,
    #[serde(rename = "match")]
    matches: Option<Vec<String>>,
    command: Option<Vec<String>>,
    user: Option<String>,
    env: Option<BTreeMap<String, String>>,
    restart: Option<String>,
    stop_grace_ms: Option<i64>,
    drain_timeout_ms: Option<i64>,
    health: Option<RawHealth>,
    limits: Option<RawLimits>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    tcp: Option<i64>,
    http: Option<String>,
    port: Option<i64>,
    exec: Option<Vec<String>>,
    interval_ms: Option<i64>,
    timeout_ms: Option<i64>,
    rise: Option<i64>,
    fall: Option<i64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory: Option<SizeValue>,
    cpu: Option<f64>,
    pids: Option<i64>,
}

/// `memory = "64M"` or `memory = 67108864`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(i64),
    Text(String),
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse_named(&text, &path.display().to_string())?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Validates a configuration given as text (no file behind it).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_named(text, "configuration")
    }

    fn parse_named(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|source| ConfigError::Syntax {
            origin: origin.to_owned(),
            source,
        })?;
        let mut problems = Vec::new();

        for key in table.keys() {
            if key != "engine" && key != "service" {
                problems.push(Problem {
                    scope: "file".into(),
                    field: key.clone(),
                    message: "unknown section (expected [engine] and [[service]])".into(),
                });
            }
        }

        let engine = {
            let mut p = Problems {
                scope: "engine".into(),
                out: &mut problems,
            };
            let raw = match table.get("engine") {
                None => Some((RawEngine::default(), Vec::new())),
                Some(v) => decode::<RawEngine>(v, &[], &mut p),
            };
            raw.and_then(|(raw, dropped)| {
                let since = p.out.len();
                let engine = validate_engine(raw, &mut p);
                forget_dropped(p.out, since, "engine", &dropped);
                // A dropped key is a problem already reported: no config either way.
                engine.filter(|_| dropped.is_empty())
            })
        };

        let raw_services: Vec<toml::Value> = match table.get("service") {
            None => Vec::new(),
            Some(toml::Value::Array(items)) => items.clone(),
            Some(_) => {
                problems.push(Problem {
                    scope: "file".into(),
                    field: "service".into(),
                    message: "must be an array of tables: write each one as [[service]]".into(),
                });
                Vec::new()
            }
        };

        let mut services = Vec::new();
        let mut seen_names: HashMap<String, usize> = HashMap::new();
        let mut seen_matches: HashMap<Endpoint, (usize, String)> = HashMap::new();
        for (i, value) in raw_services.into_iter().enumerate() {
            // Name the service in messages even when the rest of its table is broken.
            let label = value
                .get("name")
                .and_then(|n| n.as_str())
                .filter(|n| !n.is_empty())
                .map(|n| format!("service {n}"))
                .unwrap_or_else(|| format!("service #{}", i + 1));
            let mut p = Problems {
                scope: label,
                out: &mut problems,
            };
            let Some((raw, dropped)) = decode::<RawService>(
                &value,
                &[
                    ("health", decode_nested::<RawHealth>),
                    ("limits", decode_nested::<RawLimits>),
                ],
                &mut p,
            ) else {
                continue;
            };
            let since = p.out.len();
            if let Some(name) = &raw.name {
                if let Some(first) = seen_names.get(name) {
                    p.add(
                        "name",
                        format!("duplicate service name (also service #{})", first + 1),
                    );
                } else {
                    seen_names.insert(name.clone(), i);
                }
            }
            // Across services, every match that parses counts, even in a service with other
            // problems: fixing those must not reveal a new one.
            let owner = raw.name.clone().unwrap_or_else(|| format!("#{}", i + 1));
            let mut cross = Vec::new();
            for (j, text) in raw.matches.iter().flatten().enumerate() {
                if let Ok(ep) = text.parse::<Endpoint>() {
                    match seen_matches.get(&ep) {
                        Some((k, other)) if *k != i => cross.push((
                            format!("match[{j}]"),
                            format!("{ep} is already matched by service {other}"),
                        )),
                        Some(_) => {} // within one service: reported by validate_service
                        None => {
                            seen_matches.insert(ep, (i, owner.clone()));
                        }
                    }
                }
            }
            let svc = validate_service(raw, &mut p);
            let scope = p.scope.clone();
            forget_dropped(p.out, since, &scope, &dropped);
            for (field, msg) in cross {
                p.add(field, msg);
            }
            if let Some(svc) = svc {
                services.push(svc);
            }
        }

        match engine {
            Some(engine) if problems.is_empty() => Ok(Config {
                engine,
                services,
                source: None,
            }),
            _ => Err(ConfigError::Invalid {
                origin: origin.to_owned(),
                problems,
            }),
        }
    }

    /// The configured service called `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// serde's messages from `Value::try_into` carry no position; keep them on one line.
fn clean_serde(e: &toml::de::Error) -> String {
    e.message().trim().replace('\n', " ")
}

/// [`decode`] for a nested table (`health`, `limits`): the table without its bad keys, and
/// those keys (with the prefix).
type Nested = fn(&toml::Value, &str, &mut Problems<'_>) -> (toml::Value, Vec<String>);

/// Decodes a table into `T` (all of whose fields are optional, with `deny_unknown_fields`),
/// returning it with the keys that had to be dropped.
///
/// serde stops at the first unknown field or wrong type and does not say which key it was in.
/// So when the table as a whole does not decode, each key is decoded on its own (a table with
/// just that key decodes exactly when the key is known and well typed), every bad key is
/// reported under its own name (`health.interval_ms: invalid type: ...`), and the table
/// without the bad keys is decoded, so that the rest of it is still validated. The caller
/// passes the dropped keys to [`forget_dropped`] so they are not also reported as missing.
fn decode<T: serde::de::DeserializeOwned>(
    value: &toml::Value,
    nested: &[(&str, Nested)],
    p: &mut Problems<'_>,
) -> Option<(T, Vec<String>)> {
    let Some(table) = value.as_table() else {
        p.add("", "must be a table");
        return None;
    };
    if let Ok(t) = value.clone().try_into::<T>() {
        return Some((t, Vec::new()));
    }
    let mut clean = table.clone();
    let mut dropped = Vec::new();
    for (key, v) in table {
        if let Some((_, inner)) = nested.iter().find(|(k, _)| k == key)
            && v.is_table()
        {
            let (kept, bad) = inner(v, &format!("{key}."), p);
            clean.insert(key.clone(), kept);
            dropped.extend(bad);
            continue;
        }
        let one = toml::Value::Table(toml::Table::from_iter([(key.clone(), v.clone())]));
        if let Err(e) = one.try_into::<T>() {
            p.add(key.clone(), clean_serde(&e));
            clean.remove(key);
            dropped.push(key.clone());
        }
    }
    match toml::Value::Table(clean).try_into::<T>() {
        Ok(t) => Some((t, dropped)),
        Err(e) => {
            // Not expected (each remaining key decoded on its own), but never silent.
            p.add("", clean_serde(&e));
            None
        }
    }
}

/// Drops the problems (from index `since`) about keys [`decode`] had to drop: they are
/// reported already, with the real reason.
fn forget_dropped(out: &mut Vec<Problem>, since: usize, scope: &str, dropped: &[String]) {
    let mut i = since;
    while i < out.len() {
        let f = &out[i].field;
        let about_dropped = out[i].scope == scope
            && dropped.iter().any(|k| {
                f == k || f.starts_with(&format!("{k}.")) || f.starts_with(&format!("{k}["))
            });
        if about_dropped {
            out.remove(i);
        } else {
            i += 1;
        }
    }
}

/// [`Nested`] for a table type `T`: reports its bad keys under `prefix`.
fn decode_nested<T: serde::de::DeserializeOwned>(
    value: &toml::Value,
    prefix: &str,
    p: &mut Problems<'_>,
) -> (toml::Value, Vec<String>) {
    let mut kept = value.as_table().cloned().unwrap_or_default();
    let mut dropped = Vec::new();
    if value.clone().try_into::<T>().is_err() {
        for (key, v) in value.as_table().into_iter().flatten() {
            let one = toml::Value::Table(toml::Table::from_iter([(key.clone(), v.clone())]));
            if let Err(e) = one.try_into::<T>() {
                p.add(format!("{prefix}{key}"), clean_serde(&e));
                kept.remove(key);
                dropped.push(format!("{prefix}{key}"));
            }
        }
    }
    (toml::Value::Table(kept), dropped)
}

fn validate_engine(raw: RawEngine, p: &mut Problems<'_>) -> Option<EngineConfig> {
    let before = p.out.len();
    let interfaces = raw.interfaces.unwrap_or_default();
    for (i, name) in interfaces.iter().enumerate() {
        if name.is_empty()
            || name.len() > 15
            || name.contains('/')
            || name.contains(char::is_whitespace)
        {
            p.add(
                format!("interfaces[{i}]"),
                format!("'{name}' is not a valid interface name"),
            );
        } else if interfaces[..i].contains(name) {
            p.add(
                format!("interfaces[{i}]"),
                format!("{name} is listed twice"),
            );
        }
    }
    for (field, path) in [
        ("bpffs", &raw.bpffs),
        ("control", &raw.control),
        ("run_dir", &raw.run_dir),
    ] {
        if let Some(path) = path
            && !path.is_absolute()
        {
            p.add(
                field,
                format!("'{}' must be an absolute path", path.display()),
            );
        }
    }
    if let Some(load) = raw.max_load
        && !(load.is_finite() && load > 0.0)
    {
        p.add(
            "max_load",
            format!("{load} must be a positive fraction such as 0.9"),
        );
    }
    let metrics = match raw.metrics {
        None => None,
        Some(text) => match text.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                p.add(
                    "metrics",
                    format!("'{text}' is not an ADDRESS:PORT such as 127.0.0.1:9310"),
                );
                None
            }
        },
    };
    let mut dns = Vec::new();
    for (i, text) in raw.dns.unwrap_or_default().iter().enumerate() {
        match text.parse::<std::net::IpAddr>() {
            Ok(ip) => dns.push(SocketAddr::new(ip, 53)),
            Err(_) => match text.parse::<SocketAddr>() {
                Ok(addr) => dns.push(addr),
                Err(_) => p.add(
                    format!("dns[{i}]"),
                    format!("'{text}' is not an ADDRESS or ADDRESS:PORT"),
                ),
            },
        }
    }
    (p.out.len() == before).then_some(EngineConfig {
        interfaces,
        bpffs: raw.bpffs,
        control: raw.control,
        run_dir: raw.run_dir,
        max_load: raw.max_load,
        metrics,
        dns,
    })
}

fn validate_service(raw: RawService, p: &mut Problems<'_>) -> Option<ServiceConfig> {
    let before = p.out.len();

    let name = match raw.name {
        None => {
            p.add("name", "missing");
            String::new()
        }
        Some(name) => {
            if let Err(e) = netns::validate_name(&name) {
                p.add("name", e);
            }
            name
        }
    };

    let mut matches = Vec::new();
    let mut host_matches: Vec<HostMatch> = Vec::new();
    match raw.matches {
        None => p.add(
            "match",
            "missing: list what to redirect, e.g. [\"tcp://198.51.100.7:80\"]",
        ),
        Some(list) if list.is_empty() => p.add(
            "match",
            "empty: list at least one tcp:// or udp:// endpoint",
        ),
        Some(list) => {
            for (i, text) in list.iter().enumerate() {
                match text.parse::<Endpoint>() {
                    Ok(ep) if matches.contains(&ep) => {
                        p.add(format!("match[{i}]"), format!("{ep} is listed twice"))
                    }
                    Ok(ep) => matches.push(ep),
                    Err(e) => match text.parse::<HostMatch>() {
                        Ok(h) if host_matches.contains(&h) => {
                            p.add(format!("match[{i}]"), format!("{h} is listed twice"))
                        }
                        Ok(h) => host_matches.push(h),
                        Err(crate::hostnames::HostError::NotAHost(_)) => {
                            p.add(format!("match[{i}]"), e)
                        }
                        Err(host_err) => p.add(format!("match[{i}]"), host_err),
                    },
                }
            }
        }
    }

    let command = match raw.command {
        None => {
            p.add("command", "missing");
            Vec::new()
        }
        Some(c) if c.is_empty() || c[0].is_empty() => {
            p.add(
                "command",
                "empty: give the program and its arguments, e.g. [\"iperf3\", \"-s\"]",
            );
            Vec::new()
        }
        Some(c) => {
            if c.iter().any(|a| a.contains('\0')) {
                p.add("command", "contains a NUL character");
            }
            c
        }
    };

    let user_name = raw.user.unwrap_or_else(|| DEFAULT_USER.to_owned());
    let user = match resolve_user(&user_name) {
        Ok(u) => Some(u),
        Err(msg) => {
            p.add("user", msg);
            None
        }
    };

    let env = raw.env.unwrap_or_default();
    for key in env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            p.add(format!("env.{key}"), "is not a valid variable name");
        }
    }
    for (key, value) in &env {
        if value.contains('\0') {
            p.add(format!("env.{key}"), "value contains a NUL character");
        }
    }

    let restart = match raw.restart.as_deref() {
        None | Some("on-failure") => RestartPolicy::OnFailure,
        Some("always") => RestartPolicy::Always,
        Some("never") => RestartPolicy::Never,
        Some(other) => {
            p.add(
                "restart",
                format!("'{other}' is not one of always, on-failure, never"),
            );
            RestartPolicy::OnFailure
        }
    };

    let stop_grace = match raw.stop_grace_ms {
        None => Duration::from_millis(DEFAULT_STOP_GRACE_MS),
        Some(ms) if ms < 0 => {
            p.add("stop_grace_ms", format!("{ms} is negative"));
            Duration::ZERO
        }
        Some(ms) => Duration::from_millis(ms as u64),
    };

    let drain_timeout = match raw.drain_timeout_ms {
        None => Duration::from_millis(DEFAULT_DRAIN_TIMEOUT_MS),
        Some(ms) if ms < 0 => {
            p.add("drain_timeout_ms", format!("{ms} is negative"));
            Duration::ZERO
        }
        Some(ms) => Duration::from_millis(ms as u64),
    };

    let health = validate_health(raw.health, &matches, p);
    let limits = validate_limits(raw.limits.unwrap_or_default(), p);

    if p.out.len() != before {
        return None;
    }
    Some(ServiceConfig {
        name,
        matches,
        host_matches,
        command,
        user: user?,
        env,
        restart,
        health: health?,
        limits,
        stop_grace,
        drain_timeout,
    })
}

fn port_of(value: i64, field: &str, p: &mut Problems<'_>) -> Option<u16> {
    if (1..=65535).contains(&value) {
        Some(value as u16)
    } else {
        p.add(field, format!("port {value} out of range (1-65535)"));
        None
    }
}

/// The port of the first TCP match that names one: the natural thing to check when the
/// file does not say.
fn first_tcp_port(matches: &[Endpoint]) -> Option<u16> {
    matches
        .iter()
        .find(|m| m.proto == crate::endpoint::Proto::Tcp)
        .and_then(|m| m.port)
}

fn validate_health(
    raw: Option<RawHealth>,
    matches: &[Endpoint],
    p: &mut Problems<'_>,
) -> Option<HealthConfig> {
    let before = p.out.len();
    let raw = raw.unwrap_or_default();
    let kinds = usize::from(raw.tcp.is_some())
        + usize::from(raw.http.is_some())
        + usize::from(raw.exec.is_some());
    let check = if kinds > 1 {
        p.add("health", "give only one of tcp, http, exec");
        None
    } else if let Some(port) = raw.tcp {
        if raw.port.is_some() {
            p.add(
                "health.port",
                "only used with http (tcp names its port itself)",
            );
        }
        port_of(port, "health.tcp", p).map(|port| HealthCheck::Tcp { port })
    } else if let Some(path) = raw.http {
        if !path.starts_with('/') || path.contains(char::is_whitespace) {
            p.add(
                "health.http",
                format!("'{path}' must be a path starting with '/', without spaces"),
            );
        }
        let port = match raw.port {
            Some(port) => port_of(port, "health.port", p),
            None => first_tcp_port(matches).or_else(|| {
                p.add(
                    "health.port",
                    "missing: no tcp match with a port to take it from",
                );
                None
            }),
        };
        port.map(|port| HealthCheck::Http { path, port })
    } else if let Some(command) = raw.exec {
        if command.is_empty() || command[0].is_empty() {
            p.add("health.exec", "empty: give the program and its arguments");
        }
        if raw.port.is_some() {
            p.add("health.port", "only used with http");
        }
        Some(HealthCheck::Exec { command })
    } else {
        match first_tcp_port(matches) {
            Some(port) => Some(HealthCheck::Tcp { port }),
            None if matches.is_empty() => None, // `match` is reported already
            None => {
                p.add("health", "missing: no tcp match with a port to derive a check from; set tcp, http or exec");
                None
            }
        }
    };

    let ms = |value: Option<i64>, default: u64, field: &str, p: &mut Problems<'_>| -> u64 {
        match value {
            None => default,
            Some(v) if v <= 0 => {
                p.add(field, format!("{v} must be at least 1"));
                default
            }
            Some(v) => v as u64,
        }
    };
    let interval = ms(
        raw.interval_ms,
        DEFAULT_INTERVAL_MS,
        "health.interval_ms",
        p,
    );
    let timeout = ms(
        raw.timeout_ms,
        DEFAULT_TIMEOUT_MS.min(interval),
        "health.timeout_ms",
        p,
    );
    if timeout > interval {
        p.add(
            "health.timeout_ms",
            format!("{timeout} is longer than interval_ms ({interval})"),
        );
    }
    let count = |value: Option<i64>, default: u32, field: &str, p: &mut Problems<'_>| -> u32 {
        match value {
            None => default,
            Some(v) if v <= 0 || v > 1000 => {
                p.add(field, format!("{v} must be between 1 and 1000"));
                default
            }
            Some(v) => v as u32,
        }
    };
    let rise = count(raw.rise, DEFAULT_RISE, "health.rise", p);
    let fall = count(raw.fall, DEFAULT_FALL, "health.fall", p);

    if p.out.len() != before {
        return None;
    }
    Some(HealthConfig {
        check: check?,
        interval: Duration::from_millis(interval),
        timeout: Duration::from_millis(timeout),
        rise,
        fall,
    })
}

fn validate_limits(raw: RawLimits, p: &mut Problems<'_>) -> Limits {
    let memory = match raw.memory {
        None => None,
        Some(SizeValue::Bytes(b)) if b > 0 => Some(b as u64),
        Some(SizeValue::Bytes(b)) => {
            p.add(
                "limits.memory",
                format!("{b} must be a positive number of bytes"),
            );
            None
        }
        Some(SizeValue::Text(t)) => match parse_size(&t) {
            Some(b) if b > 0 => Some(b),
            _ => {
                p.add(
                    "limits.memory",
                    format!("'{t}' is not a size such as 64M, 512K or 1G"),
                );
                None
            }
        },
    };
    let cpu = match raw.cpu {
        Some(c) if !(c.is_finite() && c > 0.0) => {
            p.add(
                "limits.cpu",
                format!("{c} must be a positive number of CPUs such as 0.5"),
            );
            None
        }
        other => other,
    };
    let pids = match raw.pids {
        Some(n) if n <= 0 => {
            p.add("limits.pids", format!("{n} must be at least 1"));
            None
        }
        other => other.map(|n| n as u64),
    };
    Limits { memory, cpu, pids }
}

/// `64M`, `64MiB`, `512k`, `1G`, `1048576` (powers of 1024). `None` if unparsable.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    if num.is_empty() {
        return None;
    }
    if num.contains('.') {
        let v: f64 = num.parse().ok()?;
        let bytes = v * mult as f64;
        (bytes.is_finite() && bytes < u64::MAX as f64).then_some(bytes as u64)
    } else {
        num.parse::<u64>().ok()?.checked_mul(mult)
    }
}

/// Looks an account up in the user database (getpwnam), with its groups.
fn resolve_user(name: &str) -> Result<ServiceUser, String> {
    use nix::unistd::{Gid, User, getgrouplist};
    let user = match User::from_name(name) {
        Ok(Some(u)) => u,
        Ok(None) => return Err(format!("unknown user '{name}'")),
        Err(e) => return Err(format!("cannot look up user '{name}': {e}")),
    };
    let groups = CString::new(name)
        .ok()
        .and_then(|c| getgrouplist(&c, user.gid).ok())
        .unwrap_or_else(|| vec![user.gid])
        .into_iter()
        .map(Gid::as_raw)
        .collect();
    Ok(ServiceUser {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups,
        home: user.dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[engine]
interfaces = ["br-lan"]
max_load = 0.9
metrics = "127.0.0.1:9310"

[[service]]
name = "speedtest"
match = ["tcp://198.51.100.7:5201", "udp://198.51.100.7:5201"]
command = ["iperf3", "-s", "-p", "5201"]
user = "nobody"
env = { KEY = "value" }
restart = "on-failure"
[service.health]
tcp = 5201
interval_ms = 500
timeout_ms = 300
rise = 2
fall = 2
[service.limits]
memory = "64M"
cpu = 0.5
pids = 64
"#;

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text) {
            Ok(_) => panic!("expected problems in:\n{text}"),
            Err(e) => e.problems(),
        }
    }

    fn has(problems: &[String], needle: &str) {
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "no problem containing {needle:?} in {problems:#?}"
        );
    }

    #[test]
    fn parses_the_documented_example() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.engine.interfaces, vec!["br-lan".to_string()]);
        assert_eq!(c.engine.max_load, Some(0.9));
        assert_eq!(c.engine.metrics, Some("127.0.0.1:9310".parse().unwrap()));
        let s = &c.services[0];
        assert_eq!(s.name, "speedtest");
        assert_eq!(s.matches.len(), 2);
        assert_eq!(s.user.name, "nobody");
        assert_ne!(s.user.uid, 0);
        assert_eq!(s.restart, RestartPolicy::OnFailure);
        assert_eq!(s.health.check, HealthCheck::Tcp { port: 5201 });
        assert_eq!(s.health.interval, Duration::from_millis(500));
        assert_eq!(s.limits.memory, Some(64 << 20));
        assert_eq!(s.limits.cpu, Some(0.5));
        assert_eq!(s.limits.pids, Some(64));
        assert_eq!(s.stop_grace, Duration::from_secs(5));
        assert_eq!(s.env.get("KEY").map(String::as_str), Some("value"));
    }

    #[test]
    fn host_names_and_dns_servers() {
        let c = Config::parse(
            r#"
[engine]
dns = ["192.0.2.53", "[2001:db8::53]:5353"]

[[service]]
name = "alpr"
match = ["tcp://alpr.example.net:443", "tcp://198.51.100.7:443"]
command = ["true"]
drain_timeout_ms = 0
"#,
        )
        .unwrap();
        assert_eq!(
            c.engine.dns,
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[2001:db8::53]:5353".parse().unwrap()
            ]
        );
        let s = &c.services[0];
        assert_eq!(s.host_matches.len(), 1);
        assert_eq!(s.host_matches[0].to_string(), "tcp://alpr.example.net:443");
        assert_eq!(s.matches.len(), 1);
        assert_eq!(s.drain_timeout, Duration::ZERO);
        let err = Config::parse(
            r#"
[engine]
dns = ["resolver.lan"]
[[service]]
name = "alpr"
match = ["tcp://bad_host.example:443", "tcp://ok.example:443", "tcp://ok.example:443"]
command = ["true"]
drain_timeout_ms = -1
"#,
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "engine: dns[0]: 'resolver.lan' is not an ADDRESS",
            "service alpr: match[0]",
            "service alpr: match[2]: tcp://ok.example:443 is listed twice",
            "service alpr: drain_timeout_ms: -1 is negative",
        ] {
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
    }

    #[test]
    fn defaults_fill_in() {
        let c = Config::parse(
            r#"
[[service]]
name = "web"
match = ["tcp://198.51.100.7:80"]
command = ["true"]
"#,
        )
        .unwrap();
        let s = &c.services[0];
        assert!(c.engine.interfaces.is_empty());
        assert_eq!(s.user.name, "nobody");
        assert_eq!(s.health.check, HealthCheck::Tcp { port: 80 });
        assert_eq!((s.health.rise, s.health.fall), (DEFAULT_RISE, DEFAULT_FALL));
        assert!(s.limits.is_empty());
    }

    #[test]
    fn reports_every_problem_with_service_and_field() {
        let text = r#"
[[service]]
name = "speedtest"
match = ["tcp://198.51.100.7:5201", "udp://198.51.100.7:70000"]
command = []
user = "no-such-user-here"
[service.health]
tcp = 5201
interval_ms = 0
timeout_ms = 300
rise = 0
fall = 0
[service.limits]
memory = "64Q"

[[service]]
name = "speedtest"
match = ["tcp://198.51.100.7:5201"]
command = ["x"]

[[service]]
name = "Bad Name!"
match = ["tcp://198.51.100.8:80"]
command = ["x"]
[service.health]
tcp = 80
interval_ms = 100
timeout_ms = 200
"#;
        let p = problems(text);
        has(
            &p,
            "service speedtest: match[1]: port '70000' is not a number between 1 and 65535",
        );
        has(&p, "service speedtest: command: empty");
        has(
            &p,
            "service speedtest: user: unknown user 'no-such-user-here'",
        );
        has(
            &p,
            "service speedtest: health.interval_ms: 0 must be at least 1",
        );
        has(
            &p,
            "service speedtest: health.rise: 0 must be between 1 and 1000",
        );
        has(
            &p,
            "service speedtest: health.fall: 0 must be between 1 and 1000",
        );
        has(&p, "service speedtest: limits.memory: '64Q' is not a size");
        has(&p, "service speedtest: name: duplicate service name");
        has(
            &p,
            "match[0]: tcp://198.51.100.7:5201 is already matched by service speedtest",
        );
        has(
            &p,
            "service Bad Name!: name: namespace name 'Bad Name!' is invalid",
        );
        has(
            &p,
            "service Bad Name!: health.timeout_ms: 200 is longer than interval_ms (100)",
        );
    }

    #[test]
    fn unknown_fields_are_rejected_per_service() {
        let text = r#"
[engine]
interfaces = ["eth0"]
colour = "blue"

[[service]]
name = "a"
match = ["tcp://198.51.100.7:80"]
command = ["x"]
comand = ["typo"]

[[service]]
name = "b"
match = ["tcp://198.51.100.7:81"]
command = ["x"]
[service.health]
tcp = 81
intervall_ms = 3

[[service]]
name = "c"
match = ["tcp://198.51.100.7:70000"]
command = ["x"]

[extra]
"#;
        let p = problems(text);
        has(&p, "engine: colour: unknown field `colour`");
        has(&p, "service a: comand: unknown field `comand`");
        has(
            &p,
            "service b: health.intervall_ms: unknown field `intervall_ms`",
        );
        // The broken services do not hide problems in the others.
        has(&p, "service c: match[0]: port '70000'");
        has(&p, "file: extra: unknown section");
    }

    #[test]
    fn wrong_types_name_the_service() {
        let p = problems(
            r#"
[[service]]
name = "a"
match = "tcp://198.51.100.7:80"
command = ["x"]
"#,
        );
        has(
            &p,
            "service a: match: invalid type: string \"tcp://198.51.100.7:80\", expected a sequence",
        );
        // A dropped key is not also reported as missing.
        assert!(!p.iter().any(|x| x.contains("match: missing")), "{p:#?}");
    }

    #[test]
    fn every_type_error_is_reported_with_its_field() {
        let p = problems(
            r#"
[engine]
interfaces = "eth0"
max_load = "high"

[[service]]
name = "web"
match = ["tcp://198.51.100.7:80", "tcp://198.51.100.7:0"]
command = ["x"]
restart = 3
[service.health]
interval_ms = "fast"
rise = 0
[service.limits]
pids = "many"
memory = "64M"
"#,
        );
        has(
            &p,
            "engine: interfaces: invalid type: string \"eth0\", expected a sequence",
        );
        has(&p, "engine: max_load: invalid type: string \"high\"");
        has(
            &p,
            "service web: restart: invalid type: integer `3`, expected a string",
        );
        has(
            &p,
            "service web: health.interval_ms: invalid type: string \"fast\", expected i64",
        );
        has(
            &p,
            "service web: limits.pids: invalid type: string \"many\", expected i64",
        );
        // The well-typed rest of the service is still validated.
        has(&p, "service web: match[1]: port 0 is not a valid port");
        has(&p, "service web: health.rise: 0 must be between 1 and 1000");
        assert_eq!(p.len(), 7, "{p:#?}");
    }

    #[test]
    fn health_variants() {
        let base = |health: &str| {
            format!(
                "[[service]]\nname = \"h\"\nmatch = [\"tcp://198.51.100.7:8080\", \"udp://198.51.100.7:53\"]\ncommand = [\"x\"]\n[service.health]\n{health}\n"
            )
        };
        let c = Config::parse(&base("http = \"/healthz\"")).unwrap();
        assert_eq!(
            c.services[0].health.check,
            HealthCheck::Http {
                path: "/healthz".into(),
                port: 8080
            }
        );
        let c = Config::parse(&base("http = \"/\"\nport = 9000")).unwrap();
        assert_eq!(
            c.services[0].health.check,
            HealthCheck::Http {
                path: "/".into(),
                port: 9000
            }
        );
        let c = Config::parse(&base("exec = [\"true\"]")).unwrap();
        assert_eq!(
            c.services[0].health.check,
            HealthCheck::Exec {
                command: vec!["true".into()]
            }
        );
        has(
            &problems(&base("tcp = 1\nexec = [\"true\"]")),
            "service h: health: give only one of tcp, http, exec",
        );
        has(
            &problems(&base("tcp = 0")),
            "service h: health.tcp: port 0 out of range",
        );
        has(
            &problems(&base("http = \"healthz\"")),
            "service h: health.http: 'healthz' must be a path",
        );
        has(
            &problems(&base("exec = []")),
            "service h: health.exec: empty",
        );
        let udp_only =
            "[[service]]\nname = \"dns\"\nmatch = [\"udp://198.51.100.7:53\"]\ncommand = [\"x\"]\n";
        has(&problems(udp_only), "service dns: health: missing");
    }

    #[test]
    fn engine_problems() {
        let p = problems(
            "[engine]\ninterfaces = [\"eth0\", \"eth0\", \"a/b\"]\nbpffs = \"rel\"\nmax_load = -1\nmetrics = \"nope\"\n",
        );
        has(&p, "engine: interfaces[1]: eth0 is listed twice");
        has(
            &p,
            "engine: interfaces[2]: 'a/b' is not a valid interface name",
        );
        has(&p, "engine: bpffs: 'rel' must be an absolute path");
        has(&p, "engine: max_load: -1 must be a positive fraction");
        has(&p, "engine: metrics: 'nope' is not an ADDRESS:PORT");
    }

    #[test]
    fn syntax_errors_are_reported() {
        let e = Config::parse("[[service]\nname=").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
        assert!(e.problems()[0].contains("line 1"), "{:?}", e.problems());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("512k"), Some(512 << 10));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("1.5K"), Some(1536));
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("64Q"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn fingerprint_follows_the_spec() {
        let a = Config::parse(GOOD).unwrap().services.remove(0);
        let mut b = a.clone();
        assert_eq!(a.fingerprint(), b.fingerprint());
        b.command.push("-V".into());
        assert_ne!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn restart_policy() {
        assert!(RestartPolicy::Always.restarts(true));
        assert!(!RestartPolicy::OnFailure.restarts(true));
        assert!(RestartPolicy::OnFailure.restarts(false));
        assert!(!RestartPolicy::Never.restarts(false));
    }
}
