//! `viscum logs NAME [--follow]`: a service's stdout and stderr.

use std::path::PathBuf;

use clap::Args;

use super::{Result, status::ControlArg};
use crate::{
    daemon::{control::Request, logs, state},
    engine::Pins,
};

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The service's name.
    #[arg(value_parser = super::parse_service_name)]
    pub name: String,
    /// Keep printing what the service writes, until Ctrl-C.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// How many lines of history to print first.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub lines: usize,
    #[command(flatten)]
    pub control: ControlArg,
}

pub async fn run(pins: &Pins, args: LogsArgs) -> Result<()> {
    let path = locate(pins, &args).await?;
    print!("{}", logs::tail(&path, args.lines)?);
    if args.follow {
        let from = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let mut out = std::io::stdout();
        tokio::select! {
            r = logs::follow(&path, from, &mut out) => r?,
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    Ok(())
}

/// The log file: as the running daemon reports it, else where the default run directory of
/// this instance would keep it (logs outlive a stopped daemon).
async fn locate(pins: &Pins, args: &LogsArgs) -> Result<PathBuf> {
    match args.control.send(pins, &Request::Status).await {
        Ok(response) => {
            let status = response.status.unwrap_or_default();
            match status.services.iter().find(|s| s.name == args.name) {
                Some(s) => Ok(s.log.clone()),
                None => anyhow::bail!(
                    "the daemon has no service named {} (it has: {})",
                    args.name,
                    status
                        .services
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        Err(e) => {
            let path = state::RunPaths::new(state::default_run_dir(&pins.dir)).log(&args.name);
            if path.exists() {
                log::warn!("{e:#}; showing {}", path.display());
                Ok(path)
            } else {
                Err(e)
            }
        }
    }
}
