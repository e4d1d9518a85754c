//! The configuration file as serde sees it, and the decoding that reports every bad key.
//!
//! Every field is optional so that a missing one is reported by the validator
//! ([`super::validate`]) together with everything else, rather than stopping serde at the
//! first. Key names follow the CLI's flags (`nat_to` is `--nat-to`). A key that is renamed
//! keeps its old name as a serde alias for one release, so configurations in the field (and
//! OpenWrt's UCI mapping) keep working.

use std::{collections::BTreeMap, path::PathBuf};

use serde::Deserialize;

use super::{Problem, Problems};

// Raw shapes, as serde sees them. Every field is optional so that a missing one is reported
// by the validator together with everything else, rather than stopping serde at the first.

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEngine {
    pub(super) interfaces: Option<Vec<String>>,
    pub(super) bpffs: Option<PathBuf>,
    pub(super) control: Option<PathBuf>,
    pub(super) run_dir: Option<PathBuf>,
    pub(super) max_load: Option<f64>,
    pub(super) load_scope: Option<String>,
    pub(super) storage_dir: Option<PathBuf>,
    pub(super) metrics: Option<String>,
    pub(super) dns: Option<Vec<String>>,
    // Read by crate::shares::config, from the table as it is.
    pub(super) network: Option<toml::Table>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) name: Option<String>,
    #[serde(rename = "match")]
    pub(super) matches: Option<Vec<String>>,
    pub(super) command: Option<Vec<String>>,
    pub(super) user: Option<String>,
    pub(super) env: Option<BTreeMap<String, String>>,
    pub(super) restart: Option<String>,
    pub(super) stop_grace_ms: Option<i64>,
    pub(super) drain_timeout_ms: Option<i64>,
    // The redirect spec's keys, named like `viscum redirect add`'s flags.
    pub(super) from: Option<String>,
    pub(super) nat: Option<bool>,
    pub(super) nat_to: Option<String>,
    pub(super) anyip: Option<bool>,
    pub(super) mirror: Option<bool>,
    pub(super) learn_ms: Option<i64>,
    pub(super) health: Option<RawHealth>,
    pub(super) limits: Option<RawLimits>,
    pub(super) artifact: Option<super::fleet::RawArtifact>,
    pub(super) network: Option<toml::Table>,
    pub(super) storage: Option<super::storage::RawStorage>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) tcp: Option<i64>,
    pub(super) http: Option<String>,
    pub(super) port: Option<i64>,
    pub(super) exec: Option<Vec<String>>,
    pub(super) interval_ms: Option<i64>,
    pub(super) timeout_ms: Option<i64>,
    pub(super) rise: Option<i64>,
    pub(super) fall: Option<i64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) memory: Option<SizeValue>,
    pub(super) cpu: Option<f64>,
    pub(super) pids: Option<i64>,
}

/// `memory = "64M"` or `memory = 67108864`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum SizeValue {
    Bytes(i64),
    Text(String),
}

/// serde's message for one key, on one line and in the file's terms: TOML's names for types
/// (`array`, `table`, `whole number`) instead of Rust's (`sequence`, `i64`, `struct RawHealth`).
pub(super) fn clean_serde(e: &toml::de::Error) -> String {
    user_terms(&e.message().trim().replace('\n', " "))
}

/// Rewrites serde's wording (`invalid type: string "x", expected i64`, `unknown field `a`,
/// expected one of ...`, `data did not match any variant of untagged enum SizeValue`) as
/// `expected a whole number, found the string "x"`, `unknown key (valid keys: ...)`,
/// `expected a size ...`. Anything else is passed through.
pub(super) fn user_terms(msg: &str) -> String {
    if let Some(rest) = msg.strip_prefix("invalid type: ")
        && let Some((found, expected)) = rest.rsplit_once(", expected ")
    {
        return format!(
            "expected {}, found {}",
            expected_term(expected),
            found_term(found)
        );
    }
    if let Some(rest) = msg.strip_prefix("invalid value: ")
        && let Some((found, expected)) = rest.rsplit_once(", expected ")
    {
        return format!(
            "expected {}, found {}",
            expected_term(expected),
            found_term(found)
        );
    }
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some((_, valid)) = rest.split_once("`, expected ")
    {
        let valid = valid.trim_start_matches("one of ").replace('`', "");
        return format!("unknown key (valid keys: {valid})");
    }
    if msg.contains("untagged enum SizeValue") {
        return "expected a size: a string such as \"64M\", or a number of bytes".into();
    }
    msg.to_owned()
}

fn expected_term(rust: &str) -> String {
    match rust {
        "a sequence" => "an array such as [\"a\", \"b\"]".into(),
        "i64" | "u64" | "u32" | "u16" | "i32" => "a whole number".into(),
        "f64" | "f32" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a map" => "a table".into(),
        "a string" => "a string (in quotes)".into(),
        "path string" => "a path (a string in quotes)".into(),
        s if s.starts_with("struct ") => "a table".into(),
        other => other.into(),
    }
}

fn found_term(serde: &str) -> String {
    let unquote = |s: &str| s.trim_matches('`').to_owned();
    if let Some(v) = serde.strip_prefix("string ") {
        format!("the string {v}")
    } else if let Some(v) = serde.strip_prefix("integer ") {
        format!("the whole number {}", unquote(v))
    } else if let Some(v) = serde.strip_prefix("floating point ") {
        format!("the number {}", unquote(v))
    } else if let Some(v) = serde.strip_prefix("boolean ") {
        unquote(v)
    } else {
        match serde {
            "sequence" => "an array".into(),
            "map" => "a table".into(),
            other => other.into(),
        }
    }
}

/// [`decode`] for a nested table (`health`, `limits`): the table without its bad keys, and
/// those keys (with the prefix).
pub(super) type Nested = fn(&toml::Value, &str, &mut Problems<'_>) -> (toml::Value, Vec<String>);

/// Decodes a table into `T` (all of whose fields are optional, with `deny_unknown_fields`),
/// returning it with the keys that had to be dropped.
///
/// serde stops at the first unknown field or wrong type and does not say which key it was in.
/// So when the table as a whole does not decode, each key is decoded on its own (a table with
/// just that key decodes exactly when the key is known and well typed), every bad key is
/// reported under its own name (`health.interval_ms: invalid type: ...`), and the table
/// without the bad keys is decoded, so that the rest of it is still validated. The caller
/// passes the dropped keys to [`forget_dropped`] so they are not also reported as missing.
pub(super) fn decode<T: serde::de::DeserializeOwned>(
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
pub(super) fn forget_dropped(
    out: &mut Vec<Problem>,
    since: usize,
    scope: &str,
    dropped: &[String],
) {
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
pub(super) fn decode_nested<T: serde::de::DeserializeOwned>(
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
