//! `viscum reload`: the daemon re-reads its configuration file (like SIGHUP, but with an
//! answer: what changed, or every problem of a refused file).

use clap::Args;

use super::{Result, print_json, status::ControlArg};
use crate::{daemon::control::Request, engine::Pins};

#[derive(Debug, Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub control: ControlArg,
    /// Print the daemon's report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(pins: &Pins, args: ReloadArgs) -> Result<()> {
    let response = args.control.send(pins, &Request::Reload).await?;
    if args.json {
        return print_json(&response.reload.unwrap_or_default());
    }
    if let Some(msg) = &response.message {
        println!("{msg}");
    }
    if let Some(r) = &response.reload {
        for (what, names) in [
            ("added", &r.added),
            ("removed", &r.removed),
            ("changed (restarted)", &r.changed),
            ("attached", &r.attached),
            ("detached", &r.detached),
        ] {
            if !names.is_empty() {
                println!("  {what}: {}", names.join(", "));
            }
        }
    }
    Ok(())
}
