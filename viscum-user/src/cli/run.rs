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
    /// An "ok" file may still get notes: an interface this network namespace lacks, a
    /// service command that is not an executable file here.
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
        // Not an error either: a command may live in the service's storage, mounted only
        // when it starts. But a path that resolves nowhere is most often a typo, and the
        // daemon would only retry it with back-off.
        for svc in &config.services {
            if let Some(program) = svc.command.first()
                && !command_found(program, svc.env.get("PATH"), svc.workdir.as_deref())
            {
                eprintln!(
                    "note: service {}: command {program} is not an executable file here (the daemon would retry it with back-off)",
                    svc.name
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

/// The search path a service starts with unless its `env` sets `PATH`
/// (`daemon::process`'s base environment).
const SERVICE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Whether `program` names an executable file as the daemon would run it: a path with a `/`
/// as it is (relative ones from `workdir`), a bare name through the service's `PATH`
/// (its `env`'s, else [`SERVICE_PATH`]), as execvp(3) searches it.
fn command_found(program: &str, path: Option<&String>, workdir: Option<&std::path::Path>) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = std::path::Path::new(program);
        return match workdir {
            Some(dir) if p.is_relative() => executable(&dir.join(p)),
            _ => executable(p),
        };
    }
    path.map_or(SERVICE_PATH, String::as_str)
        .split(':')
        .filter(|d| !d.is_empty())
        .any(|d| executable(&std::path::Path::new(d).join(program)))
}

#[cfg(test)]
mod tests {
    use super::command_found;

    #[test]
    fn commands_resolve_as_the_daemon_would_run_them() {
        assert!(command_found("/bin/sh", None, None));
        assert!(command_found("sh", None, None));
        assert!(!command_found("/usr/bin/pyth0n3", None, None));
        assert!(!command_found("pyth0n3", None, None));
        // A service PATH without /bin does not find sh there.
        assert!(!command_found("sh", Some(&"/nonexistent".to_owned()), None));
        // Relative paths from the working directory.
        assert!(command_found(
            "./sh",
            None,
            Some(std::path::Path::new("/bin"))
        ));
        // A file without an execute bit.
        let plain = std::env::temp_dir().join(format!("viscum-plain-{}", std::process::id()));
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let found = command_found(plain.to_str().unwrap(), None, None);
        std::fs::remove_file(&plain).unwrap();
        assert!(!found);
    }
}
