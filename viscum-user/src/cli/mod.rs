//! The `viscum` command line: argument definitions here, one module per command.

mod attach;
mod config;
mod doctor;
#[cfg(feature = "fleet")]
mod fleet;
mod logs;
mod ns;
mod redirect;
mod reload;
mod run;
mod service;
mod stats;
mod status;
pub mod trace;

use std::{io::Write as _, path::PathBuf};

use clap::{Parser, Subcommand};

use crate::engine::Pins;

/// Viscum: serve cloud addresses from local copies at the edge, with an eBPF
/// classifier at TC ingress.
#[derive(Debug, Parser)]
#[command(name = "viscum", version = VERSION, propagate_version = true)]
pub struct Cli {
    /// bpffs directory holding this instance's pinned program, maps and links.
    /// Independent instances use different directories. A bpffs is mounted
    /// there if none is.
    #[arg(
        long,
        global = true,
        env = "VISCUM_BPFFS",
        default_value = "/sys/fs/bpf/viscum"
    )]
    pub bpffs: PathBuf,

    /// Verbosity of viscum's own messages: off, error, warn, info, debug, trace.
    /// `debug` also turns on the classifier's per-packet decision records
    /// for commands that stream them (`viscum trace`).
    /// Default: info for `run` (a daemon reports its lifecycle), warn otherwise.
    #[arg(long, global = true, env = "VISCUM_LOG", value_parser = parse_log_level)]
    pub log_level: Option<log::LevelFilter>,

    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The `viscum` subcommands; each variant's arguments live in its own module.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the classifier at TC ingress of client-facing interfaces (idempotent; re-attaches
    /// over stale records and re-points entries whose target veth was re-created).
    Attach(attach::AttachArgs),
    /// Detach the classifier from interfaces; entries stay pinned for a later attach.
    Detach(attach::DetachArgs),
    /// Manage service namespaces.
    #[command(subcommand)]
    Ns(ns::NsCommand),
    /// Manage redirect entries.
    #[command(subcommand)]
    Redirect(redirect::RedirectCommand),
    /// Show datapath counters and entries.
    Stats(stats::StatsArgs),
    /// Stream the classifier's per-packet decisions until Ctrl-C ("edge tcp/80 -> vh-web
    /// (ifindex 4): redirected", "miss", "cloud"). Packets to a protocol and port no entry
    /// uses are passed by the pre-filter before any record.
    Trace(trace::TraceArgs),
    /// Run the daemon: services from a configuration file, each redirected only while healthy.
    Run(run::RunArgs),
    /// Show the daemon's services: state, health, redirect, counters.
    Status(status::StatusArgs),
    /// Start, stop or restart one of the daemon's services.
    #[command(subcommand)]
    Service(service::ServiceCommand),
    /// Show a service's output (stdout and stderr).
    Logs(logs::LogsArgs),
    /// Make the running daemon re-read its configuration file.
    Reload(reload::ReloadArgs),
    /// Report kernel features (TCX/clsact, BTF, JIT, BPF helpers) and the verifier's
    /// statistics of the loaded programs.
    Doctor(doctor::DoctorArgs),
    /// Convert configurations: OpenWrt's UCI file to the TOML of `viscum run`.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// The operator's side of a fleet on NATS JetStream (docs/fleet.md): put services into a
    /// group's or a box's desired state, remove them, upload artifacts, see every box.
    #[cfg(feature = "fleet")]
    Fleet(fleet::FleetArgs),
}

/// Failure of a command, printed as `viscum: <message>: <causes>`.
pub type Result<T> = anyhow::Result<T>;

/// Runs a parsed command line.
///
/// # Errors
/// Whatever the command fails with, as an [`anyhow::Error`] whose chain holds the
/// cause; also when the process lacks `CAP_NET_ADMIN` or `CAP_SYS_ADMIN` (every
/// command but `config`).
pub async fn run(cli: Cli) -> Result<()> {
    if let Command::Config(cmd) = cli.command {
        return config::run(cmd); // only files: no privileges needed
    }
    #[cfg(feature = "fleet")]
    if let Command::Fleet(args) = cli.command {
        return fleet::run(args).await; // only a NATS connection: no privileges needed
    }
    check_privileges()?;
    let pins = Pins::new(&cli.bpffs);
    if !matches!(cli.command, Command::Run(_)) {
        warn_other_netns(&pins);
    }
    match cli.command {
        Command::Attach(args) => attach::attach(&pins, args),
        Command::Detach(args) => attach::detach(&pins, args),
        Command::Ns(cmd) => ns::run(&pins, cmd).await,
        Command::Redirect(cmd) => redirect::run(&pins, cmd).await,
        Command::Stats(args) => stats::run(&pins, args).await,
        Command::Trace(args) => trace::run(&pins, args).await,
        Command::Run(args) => run::run(&pins, args).await,
        Command::Status(args) => status::run(&pins, args).await,
        Command::Service(cmd) => service::run(&pins, cmd).await,
        Command::Logs(args) => logs::run(&pins, args).await,
        Command::Reload(args) => reload::run(&pins, args).await,
        Command::Doctor(args) => doctor::run(&pins, args),
        Command::Config(_) => unreachable!("handled above"),
        #[cfg(feature = "fleet")]
        Command::Fleet(_) => unreachable!("handled above"),
    }
}

/// Warns when this instance is attached in another network namespace than the command
/// runs in (a `viscum` started outside the edge's namespace, e.g. without `nsenter --net=...`):
/// what it would show or change (interface names, indexes, service namespaces) is this
/// namespace's, not the instance's. The daemon logs the same (`viscum run`).
fn warn_other_netns(pins: &Pins) {
    let elsewhere = crate::engine::attach::attached_elsewhere(pins);
    if !elsewhere.is_empty() {
        eprintln!(
            "viscum: warning: the classifier in {} is attached to {} in another network namespace than this command's; interfaces, indexes and namespaces shown or changed here are this namespace's: run viscum in the namespace where it was attached (nsenter --net=/run/netns/NAME viscum ...)",
            pins.dir.display(),
            elsewhere.join(", ")
        );
    }
}

/// Capabilities the commands need: CAP_NET_ADMIN for netlink and TC,
/// CAP_BPF (or CAP_SYS_ADMIN) for maps and programs, CAP_SYS_ADMIN for
/// namespaces and mounts. Checked up front so an unprivileged run fails with
/// one clear line instead of an EPERM from deep inside.
fn check_privileges() -> Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    if !has(CAP_NET_ADMIN) || !has(CAP_SYS_ADMIN) {
        anyhow::bail!(
            "viscum needs root privileges (CAP_NET_ADMIN and CAP_SYS_ADMIN): run it as root"
        );
    }
    Ok(())
}

/// Prints `value` as pretty JSON on stdout.
fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Prints rows as a left-aligned table with a header.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// An interface name argument: one Linux can have (see [`crate::config::interface_name`]).
fn parse_iface(s: &str) -> std::result::Result<String, String> {
    crate::config::interface_name(s).map(|()| s.to_owned())
}

/// A service name argument (`viscum logs`, `viscum service`): the names `[[service]]` allows,
/// so that nothing else reaches a path or the control socket.
fn parse_service_name(s: &str) -> std::result::Result<String, String> {
    crate::netns::validate_name(s)
        .map(|()| s.to_owned())
        .map_err(|_| {
            format!(
                "'{}' is not a service name: 1-12 characters a-z 0-9 - _, not starting with '-'",
                s.escape_debug()
            )
        })
}

/// `--log-level`: one of the `log` crate's level names, any case; the error lists them all.
fn parse_log_level(s: &str) -> std::result::Result<log::LevelFilter, String> {
    s.parse().map_err(|_| {
        format!("'{s}' is not a log level: give off, error, warn, info, debug or trace")
    })
}

/// `--version`: the crate version and the optional features built in (a router build leaves
/// `fleet` out, see docs/router-builds.md), e.g. `0.1.0 (features: fleet)`.
const VERSION: &str = if cfg!(feature = "fleet") {
    concat!(env!("CARGO_PKG_VERSION"), " (features: fleet)")
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (features: none)")
};
