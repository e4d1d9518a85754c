//! Validation of the decoded shapes ([`super::raw`]) into a [`super::Config`]: every
//! problem is reported, each naming its field.

use std::{ffi::CString, net::SocketAddr, time::Duration};

use super::{
    DEFAULT_DRAIN_TIMEOUT_MS, DEFAULT_FALL, DEFAULT_INTERVAL_MS, DEFAULT_RISE,
    DEFAULT_STOP_GRACE_MS, DEFAULT_TIMEOUT_MS, DEFAULT_USER, EngineConfig, HealthCheck,
    HealthConfig, Limits, Problems, RestartPolicy, ServiceConfig, ServiceUser,
    raw::{RawEngine, RawHealth, RawLimits, RawService, SizeValue},
};
use crate::{
    endpoint::Endpoint,
    netns,
    redirect::{RedirectOptions, Target},
    spec::{RedirectSpec, SpecErrors, SpecFields},
};

pub(super) fn validate_engine(raw: RawEngine, p: &mut Problems<'_>) -> Option<EngineConfig> {
    let before = p.out.len();
    let interfaces = raw.interfaces.unwrap_or_default();
    for (i, name) in interfaces.iter().enumerate() {
        if let Err(why) = client_interface(name) {
            p.add(format!("interfaces[{i}]"), why);
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
    let load_scope = match raw.load_scope.as_deref() {
        None | Some("system") => super::LoadScope::System,
        Some("services") => super::LoadScope::Services,
        Some(other) => {
            p.add(
                "load_scope",
                format!("'{other}' is not one of system, services"),
            );
            super::LoadScope::System
        }
    };
    let storage_dir = super::storage::validate_storage_dir(raw.storage_dir, p);
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
    let network = raw.network.and_then(|n| {
        let mut out = Vec::new();
        let link = crate::shares::config::link(&n, &mut out);
        for (field, message) in out {
            p.add(field, message);
        }
        link
    });
    (p.out.len() == before).then_some(EngineConfig {
        network,
        interfaces,
        bpffs: raw.bpffs,
        control: raw.control,
        run_dir: raw.run_dir,
        max_load: raw.max_load,
        load_scope,
        storage_dir,
        metrics,
        dns,
    })
}

/// Checks a name for `engine.interfaces` (and `viscum attach`) before any interface is
/// looked up: a name Linux can give an interface (1-15 bytes, not `.` or `..`, no `/`, `:`
/// or whitespace; so it can never escape the pin directory it names a file in), and not one
/// that can never be client-facing: the loopback, or the host side of a service namespace's
/// veth (`vh-NAME`), where the classifier would redirect the services' own replies.
///
/// # Errors
/// Why the name is refused, quoting it.
pub fn client_interface(name: &str) -> Result<(), String> {
    interface_name(name)?;
    if name == "lo" {
        return Err(
            "'lo' is the loopback interface: name the client-facing interface (e.g. br-lan)".into(),
        );
    }
    if let Some(ns) = name.strip_prefix(netns::HOST_VETH_PREFIX) {
        return Err(format!(
            "'{name}' is the host side of service namespace {ns}'s veth: name the \
             client-facing interface (e.g. br-lan)"
        ));
    }
    Ok(())
}

/// Checks that `name` is one Linux can give an interface: 1-15 bytes, not `.` or `..`, no
/// `/`, `:`, whitespace or control characters (so it can never escape a directory it names a
/// file in).
///
/// # Errors
/// Why not, quoting the name.
pub fn interface_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
        || name.contains(char::is_control)
    {
        return Err(format!(
            "'{}' is not a valid interface name (1-15 characters, no '/', ':' or spaces)",
            name.escape_debug()
        ));
    }
    Ok(())
}

pub(super) fn validate_service(raw: RawService, p: &mut Problems<'_>) -> Option<ServiceConfig> {
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

    // `match` and the redirect keys: the same spec, and validation, as `viscum redirect add`.
    let missing_matches = raw.matches.is_none();
    if missing_matches {
        p.add(
            "match",
            "missing: list what to redirect, e.g. [\"tcp://198.51.100.7:80\"]",
        );
    }
    // `nat` is the default mode: `nat = false` would silently mean nothing unless another
    // mode replaces it.
    if raw.nat == Some(false) && raw.anyip != Some(true) && raw.mirror != Some(true) {
        p.add(
            "nat",
            "false is not a mode: a service's entries are translated (NAT) unless anyip = true \
             or mirror = true; set one of those instead, or remove nat",
        );
    }
    let fields = SpecFields {
        matches: raw.matches.unwrap_or_default(),
        from: raw.from,
        nat: raw.nat.unwrap_or(false),
        nat_to: raw.nat_to,
        anyip: raw.anyip.unwrap_or(false),
        mirror: raw.mirror.unwrap_or(false),
        learn_ms: raw.learn_ms,
    };
    let (matches, host_matches, redirect) =
        match RedirectSpec::new(&fields, Target::Namespace(name.clone())) {
            Ok(spec) => (spec.endpoints(), spec.hosts(), spec.options()),
            Err(SpecErrors(errors)) => {
                for e in errors {
                    if !(missing_matches && e.field == "match") {
                        p.add(e.field, e.message);
                    }
                }
                // Not used: a service with problems yields no config.
                let unused = RedirectOptions::for_target(&Target::Namespace(name.clone()));
                (Vec::new(), Vec::new(), unused)
            }
        };

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

    let stop_grace = duration_ms(raw.stop_grace_ms, DEFAULT_STOP_GRACE_MS, "stop_grace_ms", p);
    let drain_timeout = duration_ms(
        raw.drain_timeout_ms,
        DEFAULT_DRAIN_TIMEOUT_MS,
        "drain_timeout_ms",
        p,
    );

    let health = validate_health(raw.health, &matches, p);
    let limits = validate_limits(raw.limits.unwrap_or_default(), p);
    let artifact = super::fleet::validate_artifact(raw.artifact, p);
    let network = raw.network.map(|n| {
        let mut out = Vec::new();
        let network = crate::shares::config::service(&n, &mut out);
        for (field, message) in out {
            p.add(field, message);
        }
        network
    });
    let storage = super::storage::validate_storage(raw.storage, p);

    if p.out.len() != before {
        return None;
    }
    Some(ServiceConfig {
        name,
        matches,
        host_matches,
        redirect,
        command,
        user: user?,
        env,
        restart,
        health: health?,
        limits,
        storage,
        stop_grace,
        drain_timeout,
        artifact,
        workdir: None,
        network,
    })
}

/// A `*_ms` key that may be 0: `default` when absent, a problem when negative.
fn duration_ms(value: Option<i64>, default: u64, field: &str, p: &mut Problems<'_>) -> Duration {
    match value {
        None => Duration::from_millis(default),
        Some(ms) if ms < 0 => {
            p.add(field, format!("{ms} is negative"));
            Duration::ZERO
        }
        Some(ms) => Duration::from_millis(ms as u64),
    }
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
                    "missing: no tcp match with a port to take it from; set port = N in [service.health]",
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

/// The smallest memory limit taken: below it no process gets as far as `exec`, and the
/// service is OOM-killed in a loop (a bare `memory = 1` means one byte, not 1 MiB).
const MIN_MEMORY: u64 = 1 << 20;

fn validate_limits(raw: RawLimits, p: &mut Problems<'_>) -> Limits {
    let memory = match raw.memory {
        None => None,
        Some(SizeValue::Bytes(b)) if b > 0 && (b as u64) < MIN_MEMORY => {
            p.add(
                "limits.memory",
                format!("{b} bytes is below the 1M minimum: give a unit, e.g. \"{b}M\""),
            );
            None
        }
        Some(SizeValue::Bytes(b)) if b > 0 => Some(b as u64),
        Some(SizeValue::Bytes(b)) => {
            p.add(
                "limits.memory",
                format!("{b} must be a positive number of bytes"),
            );
            None
        }
        Some(SizeValue::Text(t)) => match parse_size(&t) {
            Some(b) if b > 0 && b < MIN_MEMORY => {
                p.add(
                    "limits.memory",
                    format!("'{t}' is below the 1M minimum (a size without a unit is in bytes)"),
                );
                None
            }
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
