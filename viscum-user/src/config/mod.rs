//! The daemon's declarative configuration (`viscum run --config FILE`).
//!
//! ```toml
//! [engine]
//! interfaces = ["br-lan"]          # client-facing interfaces (TC ingress)
//! bpffs = "/sys/fs/bpf/viscum"     # optional, else the global --bpffs
//! control = "/run/viscum.sock"     # optional control socket
//! run_dir = "/run/viscum"          # optional: logs/ and state/ live here
//! max_load = 0.9                   # optional load shedding threshold
//! load_scope = "system"            # or "services": whose pressure max_load compares
//! storage_dir = "/var/lib/viscum/storage"  # optional: where [service.storage] images live
//! metrics = "127.0.0.1:9310"       # optional Prometheus endpoint
//! [engine.network]                 # optional: network shares (crate::shares)
//! rate = "100mbit"                 # the client-facing link's rate
//! other_share = 1                  # weight of all other traffic to clients
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
//! # How the entries redirect: the keys of `viscum redirect add`'s flags (one spec, one
//! # validation: crate::spec). All optional; the default is NAT to the namespace's address.
//! # from = "192.0.2.0/24"          # only these clients (every address match)
//! # nat_to = "10.0.0.5:8080"       # NAT to this address/port (or nat = true; or anyip = true;
//! # mirror = true                  # or mirror = true: one mode at most)
//! # learn_ms = 1000                # learning period before new flows go to the edge
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
//! [service.network]                # its share of the client-facing link
//! share = 3                        # weight 1-100 (default 1)
//! max = "20mbit"                   # optional ceiling
//! [service.storage]                # optional: a private working directory (config::storage)
//! size = "64M"
//! keep = false
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
    fmt,
    hash::{Hash, Hasher},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{endpoint::Endpoint, hostnames::HostMatch, redirect::RedirectOptions};

pub mod fleet;
mod raw;
mod storage;
mod validate;

pub use fleet::{ArtifactRef, FleetConfig, FleetService};
use raw::{RawEngine, RawHealth, RawLimits, RawService, decode, decode_nested, forget_dropped};
pub use storage::{DEFAULT_STORAGE_DIR, MIN_STORAGE_BYTES, Storage};
pub use validate::{client_interface, interface_name, parse_size};
use validate::{validate_engine, validate_service};

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
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 10_000;
/// Services run unprivileged unless told otherwise.
pub const DEFAULT_USER: &str = "nobody";

/// A validated configuration. Built only by [`Config::load`] / [`Config::parse`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The `[engine]` table.
    pub engine: EngineConfig,
    /// The `[[service]]` tables, in file order (with the fleet's after them in the
    /// configuration a daemon runs, see [`fleet::merge`]).
    pub services: Vec<ServiceConfig>,
    /// The `[fleet]` section: desired state from NATS JetStream ([`fleet`]).
    pub fleet: Option<FleetConfig>,
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
    /// Shed every service to the cloud while the load is above this fraction (0.9 = 90%),
    /// as [`crate::daemon::load`] measures it: PSI `some avg10` of CPU and memory, else the
    /// 1-minute load average per CPU. `None`: never shed.
    pub max_load: Option<f64>,
    /// Whose pressure `max_load` is compared with (`load_scope`, default
    /// [`LoadScope::System`]).
    pub load_scope: LoadScope,
    /// Directory of the `[service.storage]` images (`storage_dir`, default
    /// [`DEFAULT_STORAGE_DIR`]).
    pub storage_dir: PathBuf,
    /// Address of the Prometheus text endpoint.
    pub metrics: Option<SocketAddr>,
    /// DNS servers for host-name matches (empty: the box's /etc/resolv.conf).
    pub dns: Vec<SocketAddr>,
    /// `[engine.network]`: the client-facing link's rate, which turns network shares on
    /// ([`crate::shares`]); `None`: no shaping.
    pub network: Option<crate::shares::LinkConfig>,
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
    /// How the entries redirect (mode and learning period): the keys `nat`, `nat_to`,
    /// `anyip`, `mirror` and `learn_ms`, validated like `viscum redirect add`'s flags
    /// ([`crate::spec::RedirectSpec`]). `from` is folded into `matches`.
    pub redirect: RedirectOptions,
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
    /// A private, size-limited working directory (`[service.storage]`), if any.
    pub storage: Option<Storage>,
    /// Time between SIGTERM and SIGKILL when stopping (`stop_grace_ms`, default
    /// [`DEFAULT_STOP_GRACE_MS`]).
    pub stop_grace: Duration,
    /// On a deliberate stop, how long the entries drain (no new flows; open
    /// edge flows continue) before the process is stopped (`drain_timeout_ms`, default
    /// [`DEFAULT_DRAIN_TIMEOUT_MS`]). 0 = no draining.
    pub drain_timeout: Duration,
    /// The fleet artifact it runs (`artifact`; only services from the fleet's desired state).
    pub artifact: Option<ArtifactRef>,
    /// Working directory of its process and health checks: the installed artifact's
    /// directory, set by the fleet agent once it is unpacked; `None`: its storage, if it has
    /// one, else its private, empty `/tmp`.
    pub workdir: Option<PathBuf>,
    /// `[service.network]`: the service's share of the client-facing link and its cap
    /// ([`crate::shares`]); `None`: the defaults (share 1, no cap). Needs `[engine.network]`.
    pub network: Option<crate::shares::ServiceNetwork>,
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

/// A resolved account: the `user` key looked up in the user database
/// (`getpwnam(3)`, `getgrouplist(3)`) when the configuration is validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUser {
    /// Login name, as in `/etc/passwd`; also `USER` and `LOGNAME` of the service.
    pub name: String,
    /// Numeric user id the command runs as.
    pub uid: u32,
    /// Primary group id the command runs as.
    pub gid: u32,
    /// Supplementary groups (from the group database), set with setgroups.
    pub groups: Vec<u32>,
    /// Home directory from the user database; the service's `HOME`.
    pub home: PathBuf,
}

/// `restart = "always" | "on-failure" | "never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Start the process again however it ended.
    Always,
    /// Start it again only after a failure: a non-zero exit status or death by a signal.
    OnFailure,
    /// Leave it stopped.
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
    /// The probe (`tcp`, `http` or `exec`; by default a TCP connect to the
    /// first tcp match's port).
    pub check: HealthCheck,
    /// Time from the start of one check to the start of the next (`interval_ms`,
    /// default [`DEFAULT_INTERVAL_MS`]).
    pub interval: Duration,
    /// How long one check may take before it counts as failed (`timeout_ms`,
    /// default [`DEFAULT_TIMEOUT_MS`]); never longer than `interval`.
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
    Tcp {
        /// TCP port, 1-65535.
        port: u16,
    },
    /// `GET path` on 127.0.0.1:port; any 2xx passes.
    Http {
        /// Request path: starts with `/`, no whitespace.
        path: String,
        /// TCP port, 1-65535 (`health.port`, else the first tcp match's port).
        port: u16,
    },
    /// Runs a command (as the service's user); exit status 0 passes.
    Exec {
        /// Program and arguments, not empty.
        command: Vec<String>,
    },
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
    /// Memory ceiling in bytes (`memory = "64M"`: powers of 1024): cgroup v2 `memory.max`,
    /// or v1 `memory.limit_in_bytes`.
    pub memory: Option<u64>,
    /// CPUs (0.5 = half of one CPU): a CFS quota per 100 ms period, 1 ms at least (v2
    /// `cpu.max`, v1 `cpu.cfs_quota_us`).
    pub cpu: Option<f64>,
    /// Maximum number of tasks (processes and threads), cgroup `pids.max`.
    pub pids: Option<u64>,
}

impl Limits {
    /// True when none of `memory`, `cpu`, `pids` is set.
    pub fn is_empty(&self) -> bool {
        self.memory.is_none() && self.cpu.is_none() && self.pids.is_none()
    }
}

/// `load_scope = "system" | "services"`: whose pressure `max_load` is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadScope {
    /// The whole box: `/proc/pressure/{cpu,memory}` (loadavg without PSI).
    #[default]
    System,
    /// The services' own tasks: PSI of the daemon's `viscum` cgroup (v2), which holds
    /// every service's group. Stalls of the services count, whoever causes them; a busy box
    /// whose services are idle does not shed.
    Services,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read ([`Config::load`] only).
    #[error("cannot read configuration {path}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The error from reading it.
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML at all; nothing else was checked.
    #[error("{origin}: not valid TOML")]
    Syntax {
        /// The file's path, or `configuration` for [`Config::parse`].
        origin: String,
        /// The TOML parser's error, with line and column.
        #[source]
        source: toml::de::Error,
    },
    /// The TOML is well formed but breaks the schema or the rules; every
    /// problem found is listed, not only the first.
    #[error("{origin}: {} problem{}:\n  {}", problems.len(), if problems.len() == 1 { "" } else { "s" },
        problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid {
        /// The file's path, or `configuration` for [`Config::parse`].
        origin: String,
        /// Every problem found.
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
    /// The section: `file`, `engine`, `service NAME` or `service #N` (1-based,
    /// when the service has no usable name).
    pub scope: String,
    /// The key within the section, with indexes and nesting (`match[1]`,
    /// `health.timeout_ms`); empty when the problem is not about one key
    /// (the section is not a table, say).
    pub field: String,
    /// What is wrong, in words.
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

impl Config {
    /// Reads and validates a file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] if the file cannot be read; otherwise as [`Config::parse`].
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
    ///
    /// # Errors
    /// [`ConfigError::Syntax`] if the text is not TOML; [`ConfigError::Invalid`] with every
    /// problem found otherwise (unknown keys, wrong types, bad values, duplicate names or
    /// matches, unknown users).
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
            if key != "engine" && key != "service" && key != "fleet" {
                problems.push(Problem {
                    scope: "file".into(),
                    field: key.clone(),
                    message: "unknown section (expected [engine], [fleet] and [[service]])".into(),
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
        // Name the service in messages even when the rest of its table is broken; by its
        // place (`service #2`) when it has no usable name or shares it with another, so that
        // every message points at one table.
        let names: Vec<Option<&str>> = raw_services
            .iter()
            .map(|v| {
                v.get("name")
                    .and_then(|n| n.as_str())
                    .filter(|n| !n.is_empty())
            })
            .collect();
        let mut uses: HashMap<&str, usize> = HashMap::new();
        for n in names.iter().flatten() {
            *uses.entry(n).or_default() += 1;
        }
        let labels: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, name)| match name {
                Some(n) if uses[n] == 1 => format!("service {n}"),
                _ => format!("service #{}", i + 1),
            })
            .collect();
        for (i, value) in raw_services.iter().enumerate() {
            let label = labels[i].clone();
            let mut p = Problems {
                scope: label,
                out: &mut problems,
            };
            let Some((raw, dropped)) = decode::<RawService>(
                value,
                &[
                    ("health", decode_nested::<RawHealth>),
                    ("limits", decode_nested::<RawLimits>),
                    ("storage", decode_nested::<storage::RawStorage>),
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
                        format!(
                            "'{name}' is already the name of service #{}: each service needs a \
                             name of its own (it also names its namespace)",
                            first + 1
                        ),
                    );
                } else {
                    seen_names.insert(name.clone(), i);
                }
            }
            // Across services, every match that parses counts, even in a service with other
            // problems: fixing those must not reveal a new one.
            let owner = labels[i].clone();
            let mut cross = Vec::new();
            // The service's `from` narrows its matches: the same address with other sources
            // is another match.
            let from = raw
                .from
                .as_deref()
                .and_then(|f| crate::endpoint::parse_prefix(f).ok());
            for (j, text) in raw.matches.iter().flatten().enumerate() {
                if let Ok(mut ep) = text.parse::<Endpoint>() {
                    if ep.source.is_none() {
                        ep.source = from.filter(|(src, _)| src.is_ipv4() == ep.addr.is_ipv4());
                    }
                    match seen_matches.get(&ep) {
                        Some((k, other)) if *k != i => cross.push((
                            format!("match[{j}]"),
                            format!("{ep} is already matched by {other}"),
                        )),
                        Some(_) => {} // within one service: reported by validate_service
                        None => {
                            seen_matches.insert(ep, (i, format!("{owner} (match[{j}])")));
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
        crate::shares::config::need_link(engine.as_ref(), &services, &mut problems);

        let fleet = fleet::parse_section(table.get("fleet"), &raw_services, &mut problems);

        match engine {
            Some(engine) if problems.is_empty() => Ok(Config {
                engine,
                services,
                fleet,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's example configuration is one a user can copy: it passes the same
    /// validation as `viscum run --check` (it once lacked the `[engine.network]` its
    /// `[service.network]` needs, and its storage block sat outside the code fence).
    #[test]
    fn the_readme_example_is_valid() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("```toml\n[engine]\n")
            .expect("the README has a ```toml block starting with [engine]")
            + "```toml\n".len();
        let len = readme[start..]
            .find("```")
            .expect("the README's example is closed");
        let example = &readme[start..start + len];
        assert!(example.contains("[service.storage]"), "{example}");
        if let Err(e) = Config::parse(example) {
            panic!("the README's example is refused:\n{e}\n---\n{example}");
        }
    }

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
    fn redirect_keys_are_the_cli_flags() {
        use crate::{redirect::NatTarget, spec::Mode};
        let c = Config::parse(
            r#"
[[service]]
name = "a"
match = ["tcp://198.51.100.7:80"]
command = ["x"]
from = "192.0.2.0/24"
nat_to = "10.1.2.3:8080"
learn_ms = 250

[[service]]
name = "b"
match = ["tcp://198.51.100.7:80"]
command = ["x"]
mirror = true
"#,
        )
        .unwrap();
        let a = &c.services[0];
        assert_eq!(
            a.matches[0].source,
            Some(("192.0.2.0".parse().unwrap(), 24))
        );
        assert_eq!(
            a.redirect.mode,
            Mode::Nat {
                to: NatTarget {
                    addr: Some("10.1.2.3".parse().unwrap()),
                    port: Some(8080)
                }
            }
        );
        assert_eq!(a.redirect.learn, Some(Duration::from_millis(250)));
        // Another source makes another match: no clash with service a.
        assert_eq!(c.services[1].redirect.mode, Mode::Mirror);
        assert_eq!(c.services[1].matches[0].source, None);
        let p = problems(
            "[[service]]\nname = \"c\"\nmatch = [\"tcp://198.51.100.7:80\"]\ncommand = [\"x\"]\nanyip = true\nnat = true\nlearn_ms = 900000\nfrom = \"nope\"\n",
        );
        for want in [
            "service c: mode: anyip and NAT (nat, nat_to) cannot be combined",
            "service c: learn_ms: 900000 must be between 0 and 600000",
            "service c: from: ",
        ] {
            has(&p, want);
        }
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(
            c.services[0].redirect.mode,
            Mode::Nat {
                to: NatTarget::default()
            }
        );
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
        for want in [
            "service #1: match[1]: port '70000' is not a number between 1 and 65535",
            "service #1: command: empty",
            "service #1: user: unknown user 'no-such-user-here'",
            "service #1: health.interval_ms: 0 must be at least 1",
            "service #1: health.rise: 0 must be between 1 and 1000",
            "service #1: health.fall: 0 must be between 1 and 1000",
            "service #1: limits.memory: '64Q' is not a size",
            "service #2: name: 'speedtest' is already the name of service #1: each service needs a name of its own",
            "service #2: match[0]: tcp://198.51.100.7:5201 is already matched by service #1 (match[0])",
            "service Bad Name!: name: namespace name 'Bad Name!' is invalid",
            "service Bad Name!: health.timeout_ms: 200 is longer than interval_ms (100)",
        ] {
            has(&p, want);
        }
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
        for want in [
            "engine: colour: unknown key (valid keys: interfaces, bpffs, control,",
            "service a: comand: unknown key (valid keys: name, match, command,",
            "service b: health.intervall_ms: unknown key (valid keys: tcp, http,",
        ] {
            has(&p, want);
        }
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
            "service a: match: expected an array such as [\"a\", \"b\"], found the string \"tcp://198.51.100.7:80\"",
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
        for want in [
            "engine: interfaces: expected an array such as [\"a\", \"b\"], found the string \"eth0\"",
            "engine: max_load: expected a number, found the string \"high\"",
            "service web: restart: expected a string (in quotes), found the whole number 3",
            "service web: health.interval_ms: expected a whole number, found the string \"fast\"",
            "service web: limits.pids: expected a whole number, found the string \"many\"",
        ] {
            has(&p, want);
        }
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
        for (health, want) in [
            (
                "http = \"/healthz\"",
                HealthCheck::Http {
                    path: "/healthz".into(),
                    port: 8080,
                },
            ),
            (
                "http = \"/\"\nport = 9000",
                HealthCheck::Http {
                    path: "/".into(),
                    port: 9000,
                },
            ),
            (
                "exec = [\"true\"]",
                HealthCheck::Exec {
                    command: vec!["true".into()],
                },
            ),
        ] {
            let c = Config::parse(&base(health)).unwrap();
            assert_eq!(c.services[0].health.check, want, "{health}");
        }
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
        for want in [
            "engine: interfaces[1]: eth0 is listed twice",
            "engine: interfaces[2]: 'a/b' is not a valid interface name",
            "engine: bpffs: 'rel' must be an absolute path",
            "engine: max_load: -1 must be a positive fraction",
            "engine: metrics: 'nope' is not an ADDRESS:PORT",
        ] {
            has(&p, want);
        }
    }

    #[test]
    fn no_rust_type_names_reach_the_user() {
        let p = problems(
            r#"
[engine]
interfaces = ["lo", "vh-web", "..", "a:b", "br-lan"]
max_load = true
dns = "192.0.2.53"

[[service]]
name = "web"
match = ["tcp://198.51.100.7:80"]
command = ["x"]
env = "A=1"
nat = false
health = 5
limits = { memory = true, cpu = "half" }

[[service]]
name = "dns"
match = ["udp://198.51.100.7:53"]
command = ["x"]
nat = false
anyip = true
health = { exec = "true" }
"#,
        );
        for want in [
            "engine: interfaces[0]: 'lo' is the loopback interface",
            "engine: interfaces[1]: 'vh-web' is the host side of service namespace web's veth",
            "engine: interfaces[2]: '..' is not a valid interface name",
            "engine: interfaces[3]: 'a:b' is not a valid interface name",
            "engine: max_load: expected a number, found true",
            "engine: dns: expected an array",
            "service web: env: expected a table, found the string \"A=1\"",
            "service web: nat: false is not a mode",
            "service web: health: expected a table, found the whole number 5",
            "service web: limits.memory: expected a size: a string such as \"64M\", or a number of bytes",
            "service web: limits.cpu: expected a number, found the string \"half\"",
            "service dns: health.exec: expected an array",
        ] {
            has(&p, want);
        }
        for p in &p {
            for rust in ["Raw", "i64", "f64", "sequence", "struct", "enum", "map,"] {
                assert!(!p.contains(rust), "{rust:?} in {p:?}");
            }
        }
        // `nat = false` with another mode says what it means: accepted.
        assert!(
            !p.iter().any(|x| x.starts_with("service dns: nat")),
            "{p:#?}"
        );
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
    fn storage_and_load_scope() {
        let base =
            "[[service]]\nname = \"web\"\nmatch = [\"tcp://198.51.100.7:80\"]\ncommand = [\"x\"]\n";
        let c = Config::parse(&format!(
            "[engine]\nload_scope = \"services\"\nstorage_dir = \"/srv/v\"\n{base}[service.storage]\nsize = \"9M\"\nkeep = true\n"
        ))
        .unwrap();
        assert_eq!(c.engine.load_scope, LoadScope::Services);
        assert_eq!(c.engine.storage_dir, PathBuf::from("/srv/v"));
        assert_eq!(
            c.services[0].storage,
            Some(Storage {
                size: 9 << 20,
                keep: true
            })
        );
        let c = Config::parse(base).unwrap();
        assert_eq!(c.engine.load_scope, LoadScope::System);
        assert_eq!(c.engine.storage_dir, PathBuf::from(DEFAULT_STORAGE_DIR));
        assert_eq!(c.services[0].storage, None);
        // Rounded up to whole 4 KiB blocks.
        let c = Config::parse(&format!("{base}[service.storage]\nsize = 8388609\n")).unwrap();
        assert_eq!(
            c.services[0].storage.as_ref().unwrap().size,
            (8 << 20) + 4096
        );
        let p = problems(&format!(
            "[engine]\nload_scope = \"box\"\nstorage_dir = \"rel\"\n{base}[service.storage]\nsize = \"1M\"\nquota = 1\n"
        ));
        assert_eq!(
            p,
            [
                "engine: load_scope: 'box' is not one of system, services",
                "engine: storage_dir: 'rel' must be an absolute path",
                "service web: storage.quota: unknown key (valid keys: size or keep)",
                "service web: storage.size: 1048576 bytes is below the minimum of 8M (an ext4 file system with its journal)",
            ]
        );
        assert_eq!(
            problems(&format!("{base}[service.storage]\nkeep = true\n")),
            ["service web: storage.size: missing: give the size, e.g. \"64M\""]
        );
    }

    #[test]
    fn restart_policy() {
        assert!(RestartPolicy::Always.restarts(true));
        assert!(!RestartPolicy::OnFailure.restarts(true));
        assert!(RestartPolicy::OnFailure.restarts(false));
        assert!(!RestartPolicy::Never.restarts(false));
    }
}
