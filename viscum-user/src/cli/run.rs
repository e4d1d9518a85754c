//! `viscum run --config FILE [--check]`: the daemon.

use std::path::PathBuf;

use clap::Args;

use super::Result;
use crate::{
    config::Config,
    daemon::{self, RunOptions},
    engine::Pins,
};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML): [engine] and one [[service]] per local service.
    #[arg(long, short = 'c', env = "VISCUM_CONFIG")]
    pub config: PathBuf,
    /// Only validate the file: print every problem it has (exit status 1) or "ok", and exit.
    #[arg(long)]
    pub check: bool,
}

pub async fn run(pins: &Pins, args: RunArgs) -> Result<()> {
    // Every problem, each naming its service and field, comes out in the error.
    let config = Config::load(&args.config)?;
    if args.check {
        let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        let services = match names.len() {
            0 => "0 services".to_owned(),
            1 => format!("1 service: {}", names[0]),
            n => format!("{n} services: {}", names.join(", ")),
        };
        println!("{}: ok ({services})", args.config.display());
        // Not an error: a daemon attaches an interface that appears later (a bridge made
        // after it starts). But a name that exists nowhere here is as often a typo, or a
        // check run in another network namespace than the daemon's.
        for iface in &config.engine.interfaces {
            if crate::engine::ifindex(iface).is_err() {
                eprintln!(
                    "note: interface {iface} does not exist in this network namespace (the daemon attaches it when it appears)"
                );
            }
        }
        return Ok(());
    }
    daemon::run(
        config,
        RunOptions {
            bpffs: pins.dir.clone(),
        },
        shutdown_signal()?,
    )
    .await?;
    Ok(())
}

/// Completes at the first SIGINT or SIGTERM: the clean shutdown that removes everything the
/// daemon made. (A daemon killed by SIGKILL leaves the datapath serving instead; the next one
/// adopts it.)
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => log::info!("SIGINT: shutting down"),
            _ = term.recv() => log::info!("SIGTERM: shutting down"),
        }
    })
}
