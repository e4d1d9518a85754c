//! `viscum service start|stop|restart NAME`.

use clap::{Args, Subcommand};

use super::{Result, status::ControlArg};
use crate::{daemon::control::Request, engine::Pins};

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Start a stopped (or exited) service; its redirect follows once it is healthy.
    Start(ServiceArgs),
    /// Remove the service's redirect, then stop its process; it stays stopped until started.
    Stop(ServiceArgs),
    /// Stop and start again (the redirect is off until the new process is healthy).
    Restart(ServiceArgs),
}

#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// The service's name, as in the configuration.
    #[arg(value_parser = super::parse_service_name)]
    pub name: String,
    #[command(flatten)]
    pub control: ControlArg,
}

pub async fn run(pins: &Pins, cmd: ServiceCommand) -> Result<()> {
    let (args, request) = match cmd {
        ServiceCommand::Start(a) => {
            let r = Request::Start {
                service: a.name.clone(),
            };
            (a, r)
        }
        ServiceCommand::Stop(a) => {
            let r = Request::Stop {
                service: a.name.clone(),
            };
            (a, r)
        }
        ServiceCommand::Restart(a) => {
            let r = Request::Restart {
                service: a.name.clone(),
            };
            (a, r)
        }
    };
    let response = args.control.send(pins, &request).await?;
    if let Some(msg) = response.message {
        println!("{msg}");
    }
    Ok(())
}
