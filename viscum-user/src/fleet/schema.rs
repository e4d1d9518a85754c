//! The contract between boxes and operators: bucket names, key layout, value formats.
//!
//! Both sides of the fleet (the agent in `viscum run`, [`super::agent`], and the operator's
//! `viscum fleet` commands) build and read keys and values only through this module, so the
//! two cannot drift apart.
//!
//! # `viscum_desired` (Key-Value): what every box should run
//!
//! | key | meaning |
//! |---|---|
//! | `group.<group>.svc.<service>` | service `<service>` for every box in group `<group>` |
//! | `box.<box>.svc.<service>` | an override for box `<box>` alone: it replaces the group service of the same name on that box (or adds one) |
//!
//! The value is UTF-8 TOML holding exactly one `[[service]]` block of the daemon's
//! configuration schema ([`crate::config`]), validated by the same code with the same
//! messages; the block's `name` must be the key's `<service>`. Deleting or purging a key
//! removes the service from the boxes it applied to. A block may name an artifact from
//! `viscum_artifacts`: `artifact = { name = "speedtest-1.2.tar.gz", sha256 = "<64 hex>" }`.
//!
//! Group and box ids, and service names, are single key tokens: 1 to 64 of `A-Z a-z 0-9 _ -`
//! ([`validate_id`]; service names are narrower still: the namespace rules of the config).
//! A box watches only `group.<g>.svc.>` for each of its groups and `box.<id>.svc.>`
//! ([`group_filter`], [`box_filter`]), so its credentials can be limited to those subjects.
//!
//! # `viscum_status` (Key-Value, with a `max_age`): what every box runs
//!
//! Key `status.<box>` ([`status_key`]); value the JSON of [`BoxStatus`]. A box re-puts it every
//! `status_interval` (default [`DEFAULT_STATUS_INTERVAL`]) and right after every apply; the
//! bucket's `max_age` (default [`DEFAULT_STATUS_TTL`]) makes the key of a box that stopped
//! heartbeating disappear.
//!
//! # `viscum_artifacts` (Object Store): service packages
//!
//! Object name = artifact name. A `.tar.gz`/`.tgz` object is unpacked, anything else is
//! installed as one executable file named like the object; either way into a directory of its
//! own per service and digest, which becomes the service's working directory
//! ([`super::artifact`]).

use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, ServiceConfig};

/// The desired-state Key-Value bucket.
pub const DESIRED_BUCKET: &str = "viscum_desired";
/// The status Key-Value bucket (created with a `max_age`, see [`DEFAULT_STATUS_TTL`]).
pub const STATUS_BUCKET: &str = "viscum_status";
/// The artifact Object Store bucket.
pub const ARTIFACT_BUCKET: &str = "viscum_artifacts";
/// `max_age` of [`STATUS_BUCKET`] when the operator does not choose one: three status
/// intervals, so one lost heartbeat does not make a box vanish.
pub const DEFAULT_STATUS_TTL: Duration = Duration::from_secs(30);
/// How often a box re-puts its status when `[fleet] status_interval_ms` is not set.
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Longest group id, box id or key token this module accepts.
pub const MAX_ID_LEN: usize = 64;

/// Why a key or a value of the fleet buckets was refused.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A group or box id breaks the key token rules.
    #[error("{kind} '{id}': {why}")]
    BadId {
        /// `group`, `box` or `service`.
        kind: &'static str,
        /// The id as given.
        id: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A key of [`DESIRED_BUCKET`] that is neither `group.<g>.svc.<name>` nor
    /// `box.<id>.svc.<name>`.
    #[error(
        "key '{0}': not a desired-state key (expected group.<group>.svc.<service> or box.<box>.svc.<service>)"
    )]
    BadKey(String),
    /// The value is not UTF-8.
    #[error("key '{key}': the value is not UTF-8 text")]
    NotUtf8 {
        /// The key.
        key: String,
    },
    /// The value is TOML but not exactly one `[[service]]` block.
    #[error("key '{key}': {why}")]
    NotOneService {
        /// The key.
        key: String,
        /// What was found instead.
        why: String,
    },
    /// The block breaks the configuration schema: the same problems a configuration file
    /// would get ([`ConfigError`]), with the key as the origin.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The block's `name` is not the key's service.
    #[error("key '{key}': the service block is named '{name}', but the key names '{expected}'")]
    NameMismatch {
        /// The key.
        key: String,
        /// The block's `name`.
        name: String,
        /// The key's `<service>` token.
        expected: String,
    },
}

impl SchemaError {
    /// Each problem as one line (every problem of a [`SchemaError::Config`]).
    pub fn problems(&self) -> Vec<String> {
        match self {
            SchemaError::Config(e) => e.problems(),
            other => vec![other.to_string()],
        }
    }
}

/// Checks a group id, box id or service token: 1 to [`MAX_ID_LEN`] of `A-Z a-z 0-9 _ -`.
/// (KV keys also allow `.`, `/` and `=`; a dot would split the token and change which
/// subjects a filter matches, and the others are refused to keep ids plain.)
///
/// # Errors
/// [`SchemaError::BadId`] naming `kind` (`group`, `box`, `service`) and the rule broken.
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), SchemaError> {
    let bad = |why| {
        Err(SchemaError::BadId {
            kind,
            id: id.to_owned(),
            why,
        })
    };
    if id.is_empty() {
        return bad("must not be empty");
    }
    if id.len() > MAX_ID_LEN {
        return bad("longer than 64 characters");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return bad("may hold only A-Z a-z 0-9 _ - (it is one token of a NATS subject)");
    }
    Ok(())
}

/// Whom a desired-state key is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Every box in this group.
    Group(String),
    /// This box alone.
    Box(String),
}

/// A parsed [`DESIRED_BUCKET`] key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DesiredKey {
    /// The group or box it is for.
    pub scope: Scope,
    /// The service's name (the block's `name`).
    pub service: String,
}

impl DesiredKey {
    /// `group.<group>.svc.<service>`.
    ///
    /// # Errors
    /// [`SchemaError::BadId`] if either token breaks [`validate_id`].
    pub fn group(group: &str, service: &str) -> Result<DesiredKey, SchemaError> {
        validate_id("group", group)?;
        validate_id("service", service)?;
        Ok(DesiredKey {
            scope: Scope::Group(group.to_owned()),
            service: service.to_owned(),
        })
    }

    /// `box.<box>.svc.<service>`.
    ///
    /// # Errors
    /// [`SchemaError::BadId`] if either token breaks [`validate_id`].
    pub fn for_box(box_id: &str, service: &str) -> Result<DesiredKey, SchemaError> {
        validate_id("box", box_id)?;
        validate_id("service", service)?;
        Ok(DesiredKey {
            scope: Scope::Box(box_id.to_owned()),
            service: service.to_owned(),
        })
    }

    /// Parses a key of [`DESIRED_BUCKET`].
    ///
    /// # Errors
    /// [`SchemaError::BadKey`] if it has another shape, [`SchemaError::BadId`] if a token
    /// breaks [`validate_id`].
    pub fn parse(key: &str) -> Result<DesiredKey, SchemaError> {
        let parts: Vec<&str> = key.split('.').collect();
        match parts.as_slice() {
            ["group", g, "svc", name] => DesiredKey::group(g, name),
            ["box", b, "svc", name] => DesiredKey::for_box(b, name),
            _ => Err(SchemaError::BadKey(key.to_owned())),
        }
    }

    /// Where the service comes from, as [`ServiceStatus::source`] says it:
    /// `group:<group>` or `box:<box>`.
    pub fn source(&self) -> String {
        match &self.scope {
            Scope::Group(g) => format!("group:{g}"),
            Scope::Box(b) => format!("box:{b}"),
        }
    }
}

impl fmt::Display for DesiredKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            Scope::Group(g) => write!(f, "group.{g}.svc.{}", self.service),
            Scope::Box(b) => write!(f, "box.{b}.svc.{}", self.service),
        }
    }
}

/// The watch filter of a group's services: `group.<group>.svc.>`.
pub fn group_filter(group: &str) -> String {
    format!("group.{group}.svc.>")
}

/// The watch filter of a box's overrides: `box.<box>.svc.>`.
pub fn box_filter(box_id: &str) -> String {
    format!("box.{box_id}.svc.>")
}

/// The inbox prefix of a box's connection: `_INBOX_<box>` (replies and watch deliveries
/// come to `_INBOX_<box>.>`). With the shared `_INBOX.>` a box allowed to receive its replies
/// could also subscribe to every other box's; operators grant each box `_INBOX_<box>.>` only.
pub fn box_inbox_prefix(box_id: &str) -> String {
    format!("_INBOX_{box_id}")
}

/// A name for a watch consumer of box `box_id` (`vbox_<box>_<unique>`): named, so that its
/// create request's subject (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`) carries
/// the filter and permissions can restrict a box to its own keys; unique, so that a
/// consumer left by an earlier session or daemon never clashes with a new one.
pub fn watch_consumer_name(box_id: &str, unique: u64) -> String {
    format!("vbox_{box_id}_{unique}")
}

/// A box's key in [`STATUS_BUCKET`]: `status.<box>`.
pub fn status_key(box_id: &str) -> String {
    format!("status.{box_id}")
}

/// The box id of a [`STATUS_BUCKET`] key (`status.<box>`), if it is one.
pub fn box_of_status_key(key: &str) -> Option<&str> {
    key.strip_prefix("status.")
        .filter(|b| validate_id("box", b).is_ok())
}

/// Decodes and validates a [`DESIRED_BUCKET`] value: UTF-8 TOML holding exactly one
/// `[[service]]` block of the configuration schema, whose `name` is the key's service.
///
/// The block is checked by the configuration's own decoder and validator
/// ([`crate::config`]), so its problems read exactly as in a file, with the key as the origin
/// (`group.lab.svc.web: 1 problem: service web: match[0]: ...`). Unlike a local file, the
/// block may name an `artifact`.
///
/// # Errors
/// [`SchemaError::BadKey`]/[`SchemaError::BadId`] for the key; [`SchemaError::NotUtf8`],
/// [`SchemaError::NotOneService`], [`SchemaError::Config`] (syntax or schema problems) and
/// [`SchemaError::NameMismatch`] for the value.
pub fn service_from_value(key: &str, value: &[u8]) -> Result<ServiceConfig, SchemaError> {
    let parsed = DesiredKey::parse(key)?;
    let text = std::str::from_utf8(value).map_err(|_| SchemaError::NotUtf8 {
        key: key.to_owned(),
    })?;
    let table: toml::Table = toml::from_str(text).map_err(|source| ConfigError::Syntax {
        origin: key.to_owned(),
        source,
    })?;
    let not_one = |why: String| SchemaError::NotOneService {
        key: key.to_owned(),
        why,
    };
    if let Some(other) = table.keys().find(|k| *k != "service") {
        return Err(not_one(format!(
            "holds [{other}]: a desired-state value is exactly one [[service]] block"
        )));
    }
    let block = match table.get("service") {
        Some(toml::Value::Array(items)) if items.len() == 1 => &items[0],
        Some(toml::Value::Array(items)) => {
            return Err(not_one(format!(
                "holds {} [[service]] blocks: a desired-state value is exactly one",
                items.len()
            )));
        }
        Some(_) => return Err(not_one("service must be written as [[service]]".into())),
        None => return Err(not_one("holds no [[service]] block".into())),
    };
    let svc = crate::config::fleet::service_block(block, key)?;
    if svc.name != parsed.service {
        return Err(SchemaError::NameMismatch {
            key: key.to_owned(),
            name: svc.name,
            expected: parsed.service,
        });
    }
    Ok(svc)
}

/// TOML text for one service as a [`DESIRED_BUCKET`] value: the `[[service]]` table `block`
/// (as read from a file) written on its own.
///
/// # Errors
/// If the table cannot be written as TOML (it came from TOML, so only a bug would do that).
pub fn value_from_block(block: &toml::Table) -> Result<String, toml::ser::Error> {
    let mut doc = toml::Table::new();
    doc.insert(
        "service".into(),
        toml::Value::Array(vec![toml::Value::Table(block.clone())]),
    );
    toml::to_string(&doc)
}

/// A box's report in [`STATUS_BUCKET`] (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoxStatus {
    /// The box's id (`[fleet] box`).
    pub box_id: String,
    /// The [`DESIRED_BUCKET`] revision last applied: the newest stream sequence among the
    /// keys this box watches (its groups' and its own), as of its last successful apply. 0
    /// before any.
    pub revision: u64,
    /// When that apply finished, in milliseconds since the Unix epoch (0: never).
    pub applied_at_ms: u64,
    /// When this status was written, in milliseconds since the Unix epoch; a reader flags a
    /// box whose heartbeat is older than a few status intervals as stale.
    pub heartbeat_ms: u64,
    /// The box's `viscum` version.
    pub viscum_version: String,
    /// Why the newest desired state is not applied (bad value, name clash, artifact
    /// refused, ...); `None` when `revision` is the newest the box has seen.
    pub error: Option<String>,
    /// Every service the box runs, local and fleet, in name order.
    pub services: Vec<ServiceStatus>,
}

/// One service in a [`BoxStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The service's name.
    pub name: String,
    /// Where it comes from: `local` (the box's file), `group:<group>` or `box:<box>`.
    pub source: String,
    /// Its process's state as `viscum status` names it (`starting`, `running`, `backoff`,
    /// ...), or `dry-run` from the [`super::agent::DryRun`] applier.
    pub state: String,
    /// `unknown`, `healthy` or `unhealthy` (`unknown` from a dry run).
    pub health: String,
    /// Flows that started at the edge.
    pub edge_flows: u64,
    /// Matched flows that went to the cloud, when the applier counts them.
    pub cloud_flows: Option<u64>,
    /// Bytes of matched traffic that went to the edge copy instead of over the uplink.
    pub bytes_kept_off_uplink: u64,
    /// The artifact it runs, if it names one.
    pub artifact: Option<ArtifactStatus>,
}

/// An artifact a service runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactStatus {
    /// The object's name in [`ARTIFACT_BUCKET`].
    pub name: String,
    /// Its SHA-256, 64 lowercase hex digits.
    pub sha256: String,
}

/// The [`DESIRED_BUCKET`] configuration operators create it with ([`super::buckets`]: not
/// `create_key_value`, which cannot talk to nats-server 2.9): a few revisions of
/// history per key (for `viscum fleet` to show what changed), no TTL.
pub fn desired_bucket_config() -> async_nats::jetstream::kv::Config {
    async_nats::jetstream::kv::Config {
        bucket: DESIRED_BUCKET.into(),
        description: "viscum: desired services per group and box".into(),
        history: 5,
        ..Default::default()
    }
}

/// The [`STATUS_BUCKET`] configuration: one value per key, expiring after `ttl`
/// ([`DEFAULT_STATUS_TTL`] unless the operator chooses).
pub fn status_bucket_config(ttl: Duration) -> async_nats::jetstream::kv::Config {
    async_nats::jetstream::kv::Config {
        bucket: STATUS_BUCKET.into(),
        description: "viscum: status per box (expires when a box stops heartbeating)".into(),
        history: 1,
        max_age: ttl,
        ..Default::default()
    }
}

/// The [`ARTIFACT_BUCKET`] configuration.
pub fn artifact_bucket_config() -> async_nats::jetstream::object_store::Config {
    async_nats::jetstream::object_store::Config {
        bucket: ARTIFACT_BUCKET.into(),
        description: Some("viscum: service artifacts (tarballs, static binaries)".into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = DesiredKey::parse("group.eu-west.svc.web").unwrap();
        assert_eq!(k.scope, Scope::Group("eu-west".into()));
        assert_eq!(k.service, "web");
        assert_eq!(k.to_string(), "group.eu-west.svc.web");
        assert_eq!(k.source(), "group:eu-west");
        let b = DesiredKey::parse("box.box_17.svc.web").unwrap();
        assert_eq!(b.scope, Scope::Box("box_17".into()));
        assert_eq!(b.source(), "box:box_17");
        assert_eq!(DesiredKey::for_box("box_17", "web").unwrap(), b);
        assert_eq!(group_filter("g"), "group.g.svc.>");
        assert_eq!(box_filter("b"), "box.b.svc.>");
        assert_eq!(status_key("b"), "status.b");
        assert_eq!(box_of_status_key("status.b-1"), Some("b-1"));
        assert_eq!(box_of_status_key("status.a.b"), None);
        assert_eq!(box_of_status_key("other.b"), None);
    }

    #[test]
    fn bad_keys_and_ids() {
        for key in [
            "group.g.svc",
            "group.g.service.web",
            "group..svc.web",
            "grp.g.svc.web",
            "group.g.svc.web.extra",
            "box.b.svc.",
            "",
        ] {
            assert!(DesiredKey::parse(key).is_err(), "{key:?} accepted");
        }
        assert!(matches!(
            DesiredKey::parse("group.a*b.svc.web"),
            Err(SchemaError::BadId { kind: "group", .. })
        ));
        assert!(matches!(
            DesiredKey::parse("box.b>.svc.web"),
            Err(SchemaError::BadId { kind: "box", .. })
        ));
        assert!(validate_id("group", &"g".repeat(64)).is_ok());
        let e = validate_id("group", &"g".repeat(65))
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than 64"), "{e}");
        let e = validate_id("box", "a b").unwrap_err().to_string();
        assert!(e.starts_with("box 'a b': may hold only"), "{e}");
        assert!(validate_id("box", "").is_err());
        assert!(validate_id("box", "a/b").is_err());
    }

    const WEB: &str = r#"
[[service]]
name = "web"
match = ["tcp://198.51.100.7:80"]
command = ["./server", "--port", "80"]
artifact = { name = "web-1.tar.gz", sha256 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" }
"#;

    #[test]
    fn values_are_one_service_block() {
        let svc = service_from_value("group.lab.svc.web", WEB.as_bytes()).unwrap();
        assert_eq!(svc.name, "web");
        let a = svc.artifact.as_ref().unwrap();
        assert_eq!(a.name, "web-1.tar.gz");
        assert_eq!(a.sha256, "a".repeat(64));

        let e = service_from_value("group.lab.svc.api", WEB.as_bytes()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "key 'group.lab.svc.api': the service block is named 'web', but the key names 'api'"
        );
        let two = format!("{WEB}\n{}", WEB.replace("\"web\"", "\"web2\""));
        let e = service_from_value("group.lab.svc.web", two.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("holds 2 [[service]] blocks"), "{e}");
        let e = service_from_value("group.lab.svc.web", b"[engine]\ninterfaces=[]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds [engine]"), "{e}");
        let e = service_from_value("group.lab.svc.web", b"").unwrap_err();
        assert!(e.to_string().contains("holds no [[service]] block"), "{e}");
        let e = service_from_value("group.lab.svc.web", b"\xff").unwrap_err();
        assert!(matches!(e, SchemaError::NotUtf8 { .. }));
        let e = service_from_value("group.lab.svc.web", b"[[service]\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("group.lab.svc.web: not valid TOML"),
            "{e}"
        );
        let e = service_from_value("nope", WEB.as_bytes()).unwrap_err();
        assert!(matches!(e, SchemaError::BadKey(_)));
    }

    #[test]
    fn values_get_the_config_errors() {
        let bad = WEB
            .replace(":80\"", ":70000\"")
            .replace("sha256 = \"aaaa", "sha256 = \"zzzz");
        let e = service_from_value("box.b1.svc.web", bad.as_bytes()).unwrap_err();
        let problems = e.problems();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("service web: match[0]:")),
            "{problems:#?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("service web: artifact.sha256:")),
            "{problems:#?}"
        );
        assert!(
            e.to_string().starts_with("box.b1.svc.web: 2 problems"),
            "{e}"
        );
        let unknown = WEB.replace("command", "comand");
        let e = service_from_value("box.b1.svc.web", unknown.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("comand: unknown key"), "{e}");
    }

    #[test]
    fn status_json_shape() {
        let s = BoxStatus {
            box_id: "b1".into(),
            revision: 7,
            applied_at_ms: 1,
            heartbeat_ms: 2,
            viscum_version: "0.1.0".into(),
            error: None,
            services: vec![ServiceStatus {
                name: "web".into(),
                source: "group:lab".into(),
                state: "running".into(),
                health: "healthy".into(),
                edge_flows: 3,
                cloud_flows: Some(1),
                bytes_kept_off_uplink: 1500,
                artifact: Some(ArtifactStatus {
                    name: "web-1.tar.gz".into(),
                    sha256: "a".repeat(64),
                }),
            }],
        };
        let json = serde_json::to_value(&s).unwrap();
        for key in [
            "box_id",
            "revision",
            "applied_at_ms",
            "heartbeat_ms",
            "viscum_version",
            "error",
            "services",
        ] {
            assert!(json.get(key).is_some(), "{key} missing in {json}");
        }
        assert_eq!(json["services"][0]["artifact"]["name"], "web-1.tar.gz");
        let back: BoxStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
    }
}
