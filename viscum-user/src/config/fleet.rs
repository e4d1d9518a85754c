//! The `[fleet]` section and the fleet's additions to a service: `artifact`, and services
//! that come from the fleet's desired state instead of the file.
//!
//! ```toml
//! [fleet]
//! servers = ["nats://nats.example.net:4222", "tls://nats2.example.net:4222"]
//! box = "store-0417"                  # this box's id: one key token (A-Z a-z 0-9 _ -)
//! groups = ["eu-west", "canary"]      # the groups whose services it runs
//! # Credentials: one kind at most (none: the server must allow anonymous clients).
//! user = "store-0417"                 # with password
//! password = "..."
//! # nkey = "/etc/viscum/box.nk"       # a file holding the nkey seed (SU...)
//! # creds = "/etc/viscum/box.creds"   # a NATS credentials file (JWT and seed)
//! status_interval_ms = 10000          # status heartbeat (default 10 s)
//! checkpoint = "/var/lib/viscum/fleet.json"  # default <run_dir>/fleet/checkpoint.json
//! [fleet.tls]                         # optional; any key makes TLS required
//! ca = "/etc/viscum/nats-ca.pem"
//! cert = "/etc/viscum/box.pem"        # client certificate, with key
//! key = "/etc/viscum/box.key"
//! ```
//!
//! A service of the desired state (see [`crate::fleet::schema`]) is one `[[service]]` block
//! checked by the same decoder and validator as a file's (`service_block`). Only such a
//! service may name an `artifact`; a local block that does is refused.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{
    Config, ConfigError, Problem, Problems, ServiceConfig,
    raw::{RawHealth, RawLimits, RawService, decode, decode_nested, forget_dropped},
    validate::validate_service,
};

/// The `[fleet]` section, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// NATS server URLs (`nats://host:port`, `tls://host:port` or `host[:port]`), tried in
    /// turn; at least one.
    pub servers: Vec<String>,
    /// This box's id (`box`): one key token, 1-64 of `A-Z a-z 0-9 _ -`; also the NATS
    /// connection name.
    pub box_id: String,
    /// The groups whose services this box runs (may be empty: box overrides only).
    pub groups: Vec<String>,
    /// How the box authenticates.
    pub credentials: Credentials,
    /// TLS settings (`[fleet.tls]`), if any.
    pub tls: Option<TlsFiles>,
    /// Time between two status puts (`status_interval_ms`, default
    /// [`crate::fleet::schema::DEFAULT_STATUS_INTERVAL`] when built with the fleet feature:
    /// 10 s).
    pub status_interval: Duration,
    /// Where the last applied desired state is kept (`checkpoint`); `None`:
    /// `<run_dir>/fleet/checkpoint.json`. `/run` does not survive a reboot: a box that must
    /// serve its last state after a power cut sets a path on persistent storage.
    pub checkpoint: Option<PathBuf>,
}

/// `[fleet]` credentials: at most one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// No credentials.
    None,
    /// `user` and `password`.
    UserPassword {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// `nkey`: a file holding an nkey user seed (`SU...`), read at connect time.
    Nkey(PathBuf),
    /// `creds`: a NATS credentials file (user JWT and nkey seed), read at connect time.
    Creds(PathBuf),
}

/// `[fleet.tls]`: any of it makes TLS required.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsFiles {
    /// PEM file of the certificate authorities to trust (else the system's roots).
    pub ca: Option<PathBuf>,
    /// PEM client certificate (needs `key`).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

/// `artifact = { name = "...", sha256 = "..." }` of a service from the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ArtifactRef {
    /// The object's name in the fleet's object store (`viscum_artifacts`).
    pub name: String,
    /// Its SHA-256, 64 lowercase hex digits (upper case is accepted and lowered).
    pub sha256: String,
}

/// A service from the fleet's desired state, with its key.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetService {
    /// Its key in the desired-state bucket (`group.lab.svc.web`).
    pub key: String,
    /// Where it comes from, as status reports it: `group:<group>` or `box:<box>`.
    pub source: String,
    /// The validated block.
    pub config: ServiceConfig,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    servers: Option<Vec<String>>,
    #[serde(rename = "box")]
    box_id: Option<String>,
    groups: Option<Vec<String>>,
    user: Option<String>,
    password: Option<String>,
    nkey: Option<PathBuf>,
    creds: Option<PathBuf>,
    tls: Option<RawTls>,
    status_interval_ms: Option<i64>,
    checkpoint: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// `artifact` as serde sees it.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawArtifact {
    name: Option<String>,
    sha256: Option<String>,
}

/// Validates a service's `artifact` table (called by the service validator, so its
/// problems come with the service's others).
pub(super) fn validate_artifact(
    raw: Option<RawArtifact>,
    p: &mut Problems<'_>,
) -> Option<ArtifactRef> {
    let raw = raw?;
    let name = match raw.name {
        None => {
            p.add("artifact.name", "missing");
            None
        }
        Some(n) if n.is_empty() || n.len() > 255 => {
            p.add("artifact.name", "must be 1 to 255 characters");
            None
        }
        Some(n) if n.contains('/') || n == "." || n == ".." || n.contains('\0') => {
            p.add(
                "artifact.name",
                format!("'{n}' may not contain '/' or be '.' or '..' (it names a file)"),
            );
            None
        }
        Some(n) => Some(n),
    };
    let sha256 = match raw.sha256 {
        None => {
            p.add("artifact.sha256", "missing");
            None
        }
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(h.to_ascii_lowercase())
        }
        Some(h) => {
            p.add(
                "artifact.sha256",
                format!("'{h}' is not a SHA-256 digest (64 hex digits)"),
            );
            None
        }
    };
    Some(ArtifactRef {
        name: name?,
        sha256: sha256?,
    })
}

/// Decodes and validates one `[[service]]` table from the fleet's desired state, with the
/// file's own decoder and validator; problems are scoped `service <name>` like a file's,
/// and `origin` (the key) stands where a file's path would.
///
/// # Errors
/// [`ConfigError::Invalid`] with every problem.
#[cfg_attr(not(feature = "fleet"), expect(dead_code))]
pub(crate) fn service_block(
    block: &toml::Value,
    origin: &str,
) -> Result<ServiceConfig, ConfigError> {
    let mut problems = Vec::new();
    let scope = match block.get("name").and_then(|n| n.as_str()) {
        Some(n) if !n.is_empty() => format!("service {n}"),
        _ => "service #1".into(),
    };
    let mut p = Problems {
        scope,
        out: &mut problems,
    };
    let svc = decode::<RawService>(
        block,
        &[
            ("health", decode_nested::<RawHealth>),
            ("limits", decode_nested::<RawLimits>),
            ("artifact", decode_nested::<RawArtifact>),
        ],
        &mut p,
    )
    .and_then(|(raw, dropped)| {
        let since = p.out.len();
        let svc = validate_service(raw, &mut p);
        let scope = p.scope.clone();
        forget_dropped(p.out, since, &scope, &dropped);
        svc.filter(|_| dropped.is_empty())
    });
    match svc {
        Some(svc) if problems.is_empty() => Ok(svc),
        _ => Err(ConfigError::Invalid {
            origin: origin.to_owned(),
            problems,
        }),
    }
}

/// Decodes and validates `[fleet]` (if present) and refuses `artifact` in the file's own
/// services. Called by [`Config::parse`](super::Config::parse); problems go to `out`.
pub(super) fn parse_section(
    value: Option<&toml::Value>,
    services: &[toml::Value],
    out: &mut Vec<Problem>,
) -> Option<FleetConfig> {
    for (i, svc) in services.iter().enumerate() {
        if svc.get("artifact").is_some() {
            let scope = match svc.get("name").and_then(|n| n.as_str()) {
                Some(n) if !n.is_empty() => format!("service {n}"),
                _ => format!("service #{}", i + 1),
            };
            out.push(Problem {
                scope,
                field: "artifact".into(),
                message: "only a service from the fleet's desired state (viscum_desired) may \
                          name an artifact"
                    .into(),
            });
        }
    }
    let value = value?;
    let mut p = Problems {
        scope: "fleet".into(),
        out,
    };
    if !cfg!(feature = "fleet") {
        p.add(
            "",
            "this viscum was built without the `fleet` feature (router builds leave it out): \
             remove [fleet], or use a build with it (`cargo xtask dist --fleet`, or `cargo build` \
             with the default features)",
        );
        return None;
    }
    let (raw, dropped) = decode::<RawFleet>(value, &[("tls", decode_nested::<RawTls>)], &mut p)?;
    let since = p.out.len();
    let fleet = validate_fleet(raw, &mut p);
    forget_dropped(p.out, since, "fleet", &dropped);
    fleet.filter(|_| dropped.is_empty())
}

fn validate_fleet(raw: RawFleet, p: &mut Problems<'_>) -> Option<FleetConfig> {
    let before = p.out.len();
    let servers = raw.servers.unwrap_or_default();
    if servers.is_empty() {
        p.add("servers", "missing: at least one NATS server URL");
    }
    for (i, s) in servers.iter().enumerate() {
        if let Err(why) = check_server(s) {
            p.add(format!("servers[{i}]"), why);
        }
    }
    let box_id = match raw.box_id {
        None => {
            p.add("box", "missing: this box's id");
            String::new()
        }
        Some(b) => {
            if let Err(e) = check_id("box", &b) {
                p.add("box", e);
            }
            b
        }
    };
    let groups = raw.groups.unwrap_or_default();
    for (i, g) in groups.iter().enumerate() {
        if let Err(e) = check_id("group", g) {
            p.add(format!("groups[{i}]"), e);
        } else if groups[..i].contains(g) {
            p.add(format!("groups[{i}]"), format!("{g} is listed twice"));
        }
    }
    let credentials = match (raw.user, raw.password, raw.nkey, raw.creds) {
        (None, None, None, None) => Credentials::None,
        (Some(user), Some(password), None, None) => Credentials::UserPassword { user, password },
        (Some(_), None, None, None) => {
            p.add("password", "missing: user needs a password");
            Credentials::None
        }
        (None, Some(_), None, None) => {
            p.add("user", "missing: password needs a user");
            Credentials::None
        }
        (None, None, Some(seed), None) => Credentials::Nkey(seed),
        (None, None, None, Some(creds)) => Credentials::Creds(creds),
        (u, pw, n, c) => {
            let given: Vec<&str> = [
                u.map(|_| "user"),
                pw.map(|_| "password"),
                n.map(|_| "nkey"),
                c.map(|_| "creds"),
            ]
            .into_iter()
            .flatten()
            .collect();
            p.add(
                "",
                format!(
                    "{} are given: use one kind of credentials (user and password, nkey or creds)",
                    given.join(", ")
                ),
            );
            Credentials::None
        }
    };
    let tls = raw.tls.map(|t| {
        if t.cert.is_some() != t.key.is_some() {
            p.add(
                if t.cert.is_some() {
                    "tls.key"
                } else {
                    "tls.cert"
                },
                "missing: a client certificate needs both cert and key",
            );
        }
        TlsFiles {
            ca: t.ca,
            cert: t.cert,
            key: t.key,
        }
    });
    let status_interval = match raw.status_interval_ms {
        None => Duration::from_secs(10),
        Some(ms) if ms < 100 => {
            p.add(
                "status_interval_ms",
                format!("{ms} is below 100 (milliseconds)"),
            );
            Duration::ZERO
        }
        Some(ms) => Duration::from_millis(ms as u64),
    };
    if let Some(c) = &raw.checkpoint
        && !c.is_absolute()
    {
        p.add(
            "checkpoint",
            format!("'{}' is not an absolute path", c.display()),
        );
    }
    if p.out.len() != before {
        return None;
    }
    Some(FleetConfig {
        servers,
        box_id,
        groups,
        credentials,
        tls,
        status_interval,
        checkpoint: raw.checkpoint,
    })
}

#[cfg(feature = "fleet")]
fn check_id(kind: &'static str, id: &str) -> Result<(), String> {
    crate::fleet::schema::validate_id(kind, id).map_err(|e| match e {
        crate::fleet::schema::SchemaError::BadId { why, .. } => format!("'{id}' {why}"),
        other => other.to_string(),
    })
}

#[cfg(not(feature = "fleet"))]
fn check_id(_: &'static str, _: &str) -> Result<(), String> {
    Ok(())
}

#[cfg(feature = "fleet")]
fn check_server(url: &str) -> Result<(), String> {
    url.parse::<async_nats::ServerAddr>()
        .map(drop)
        .map_err(|e| format!("'{url}' is not a NATS server URL: {e}"))
}

#[cfg(not(feature = "fleet"))]
fn check_server(_: &str) -> Result<(), String> {
    Ok(())
}

/// The file's services with the fleet's added: the configuration the daemon runs.
///
/// `local` holds only the file's services. A fleet service with the name of a local one, or
/// matching an address another service matches, is refused, naming both sources.
///
/// # Errors
/// Every problem, one line each.
pub fn merge(local: &Config, fleet: &[FleetService]) -> Result<Config, Vec<String>> {
    let mut problems = Vec::new();
    let origin = match &local.source {
        Some(p) => format!("the local configuration {}", p.display()),
        None => "the local configuration".into(),
    };
    let mut names: HashMap<&str, String> = local
        .services
        .iter()
        .map(|s| (s.name.as_str(), origin.clone()))
        .collect();
    let mut matches: HashMap<crate::endpoint::Endpoint, String> = HashMap::new();
    for s in &local.services {
        for m in &s.matches {
            matches.insert(*m, format!("service {} of {origin}", s.name));
        }
    }
    for f in fleet {
        let here = format!("{} ({})", f.source, f.key);
        if let Some(first) = names.get(f.config.name.as_str()) {
            problems.push(format!(
                "service {}: defined by {first} and by {here}: names must be unique on a box",
                f.config.name
            ));
            continue;
        }
        names.insert(&f.config.name, here.clone());
        for (j, m) in f.config.matches.iter().enumerate() {
            match matches.get(m) {
                Some(other) => problems.push(format!(
                    "service {} of {here}: match[{j}]: {m} is already matched by {other}",
                    f.config.name
                )),
                None => {
                    matches.insert(*m, format!("service {} of {here}", f.config.name));
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut merged = local.clone();
    merged
        .services
        .extend(fleet.iter().map(|f| f.config.clone()));
    Ok(merged)
}

#[cfg(all(test, feature = "fleet"))]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text) {
            Ok(_) => panic!("expected problems in:\n{text}"),
            Err(e) => e.problems(),
        }
    }

    #[test]
    fn fleet_section() {
        let c = Config::parse(
            r#"
[fleet]
servers = ["nats://127.0.0.1:4222", "tls://n2.example.net"]
box = "store-1"
groups = ["eu", "canary"]
creds = "/etc/viscum/box.creds"
status_interval_ms = 2000
checkpoint = "/var/lib/viscum/fleet.json"
[fleet.tls]
ca = "/etc/ca.pem"
"#,
        )
        .unwrap();
        let f = c.fleet.unwrap();
        assert_eq!(f.box_id, "store-1");
        assert_eq!(f.groups, ["eu", "canary"]);
        assert_eq!(
            f.credentials,
            Credentials::Creds("/etc/viscum/box.creds".into())
        );
        assert_eq!(f.status_interval, Duration::from_secs(2));
        assert_eq!(f.tls.unwrap().ca, Some("/etc/ca.pem".into()));
        assert!(Config::parse("").unwrap().fleet.is_none());
    }

    #[test]
    fn fleet_problems_name_their_key() {
        let p = problems(
            r#"
[fleet]
servers = ["nats://[bad"]
box = "a.b"
groups = ["ok", "ok", "x y"]
user = "u"
nkey = "/k"
status_interval_ms = 5
checkpoint = "rel/path"
colour = "red"
[fleet.tls]
cert = "/c.pem"
"#,
        );
        for needle in [
            "fleet: servers[0]: 'nats://[bad' is not a NATS server URL",
            "fleet: box: 'a.b' may hold only",
            "fleet: groups[1]: ok is listed twice",
            "fleet: groups[2]: 'x y' may hold only",
            "fleet: user, nkey are given: use one kind of credentials",
            "fleet: status_interval_ms: 5 is below 100",
            "fleet: checkpoint: 'rel/path' is not an absolute path",
            "fleet: colour: unknown key",
            "fleet: tls.key: missing",
        ] {
            assert!(
                p.iter().any(|x| x.starts_with(needle)),
                "{needle:?} not in {p:#?}"
            );
        }
        let p = problems("[fleet]\ngroups = [\"g\"]\n");
        assert!(p.contains(&"fleet: servers: missing: at least one NATS server URL".into()));
        assert!(p.contains(&"fleet: box: missing: this box's id".into()));
    }

    #[test]
    fn local_services_may_not_name_artifacts() {
        let p = problems(
            r#"
[[service]]
name = "web"
match = ["tcp://198.51.100.7:80"]
command = ["./server"]
artifact = { name = "web.tar.gz", sha256 = "00" }
"#,
        );
        assert!(
            p.iter()
                .any(|x| x.starts_with("service web: artifact: only a service from the fleet")),
            "{p:#?}"
        );
    }

    fn fleet_svc(key: &str, text: &str) -> FleetService {
        FleetService {
            key: key.into(),
            source: crate::fleet::schema::DesiredKey::parse(key)
                .unwrap()
                .source(),
            config: crate::fleet::schema::service_from_value(key, text.as_bytes()).unwrap(),
        }
    }

    #[test]
    fn merge_names_both_sources() {
        let local = Config::parse(
            "[[service]]\nname = \"web\"\nmatch = [\"tcp://198.51.100.7:80\"]\ncommand = [\"x\"]\n",
        )
        .unwrap();
        let same_name = fleet_svc(
            "group.lab.svc.web",
            "[[service]]\nname = \"web\"\nmatch = [\"tcp://198.51.100.8:80\"]\ncommand = [\"x\"]\n",
        );
        let same_match = fleet_svc(
            "box.b1.svc.api",
            "[[service]]\nname = \"api\"\nmatch = [\"tcp://198.51.100.7:80\"]\ncommand = [\"x\"]\n",
        );
        let e = merge(&local, &[same_name, same_match]).unwrap_err();
        assert_eq!(
            e[0],
            "service web: defined by the local configuration and by group:lab \
             (group.lab.svc.web): names must be unique on a box"
        );
        assert_eq!(
            e[1],
            "service api of box:b1 (box.b1.svc.api): match[0]: tcp://198.51.100.7:80 is \
             already matched by service web of the local configuration"
        );
        let ok = fleet_svc(
            "group.lab.svc.api",
            "[[service]]\nname = \"api\"\nmatch = [\"tcp://198.51.100.9:80\"]\ncommand = [\"x\"]\n",
        );
        let merged = merge(&local, &[ok]).unwrap();
        assert_eq!(merged.services.len(), 2);
    }
}
