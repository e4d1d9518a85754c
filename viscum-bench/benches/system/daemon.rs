//! Running `viscum run` (the daemon) for B8 and B9: a configuration file written for the
//! run, the daemon inside an edge namespace, its status read with `viscum status --json`.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};
use viscum_lab::daemon::{Check, DaemonConfig, Engine, Health, Service};

use crate::{
    lanes::Env,
    support::sys::{self, Proc},
    viscum_cli::Viscum,
};

/// One service of a generated configuration.
pub struct ServiceDef {
    pub name: String,
    pub matches: Vec<String>,
    pub command: Vec<String>,
    pub health_port: u16,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

pub struct Daemon {
    proc: Option<Proc>,
    pub cli: Viscum,
    pub control: PathBuf,
    pub edge: String,
    /// Its stderr (the log, at info level with `viscum run`'s default).
    log: PathBuf,
}

impl ServiceDef {
    /// The `[[service]]`: as root, never restarted, checked by TCP (rise and fall 2).
    fn to_config(&self) -> Service {
        Service {
            matches: self.matches.clone(),
            user: Some("root".into()),
            restart: Some("never".into()),
            health: Some(Health {
                check: Check::Tcp(self.health_port.into()),
                interval_ms: self.interval_ms,
                timeout_ms: self.timeout_ms,
                rise: 2,
                fall: 2,
            }),
            ..Service::new(&self.name, self.command.clone())
        }
    }
}

impl Daemon {
    /// Writes the configuration and starts `viscum run` in `edge`, attached to `iface`, on a
    /// fresh instance of its own.
    pub fn start(
        env: &Env<'_>,
        edge: &str,
        tag: &str,
        iface: &str,
        services: &[ServiceDef],
    ) -> Result<Daemon> {
        let bpffs = env.bpffs.subdir(&format!("{tag}-bpf"))?;
        Daemon::start_on(env, edge, tag, iface, bpffs, services)
    }

    /// [`Daemon::start`] on the instance pinned in `bpffs` (one the CLI made already).
    pub fn start_on(
        env: &Env<'_>,
        edge: &str,
        tag: &str,
        iface: &str,
        bpffs: PathBuf,
        services: &[ServiceDef],
    ) -> Result<Daemon> {
        let control = env.work.join(format!("{tag}.sock"));
        let run_dir = env.work.join(format!("{tag}-run"));
        // The configuration type of the tests' daemon fixture, serialised as viscum reads it.
        let cfg = DaemonConfig {
            engine: Engine {
                interfaces: vec![iface.to_owned()],
                bpffs: Some(bpffs.clone()),
                control: control.clone(),
                run_dir,
                metrics: None,
                dns: Vec::new(),
            },
            services: services.iter().map(ServiceDef::to_config).collect(),
        }
        .to_toml();
        let config = env.work.join(format!("{tag}.toml"));
        std::fs::write(&config, cfg)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let cli = env.viscum.with_bpffs(&bpffs);
        cli.run(
            edge,
            &["run", "--config", &config.display().to_string(), "--check"],
        )
        .context("the generated configuration is invalid")?;
        let log_path = env.work.join(format!("{tag}-daemon.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = sys::command_in_with(Some(edge), None, Some(Signal::SIGTERM), &cli.bin)?;
        cmd.arg("--bpffs")
            .arg(&bpffs)
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log);
        let proc = Proc::spawn(format!("viscum run ({tag})"), cmd)?;
        Ok(Daemon {
            proc: Some(proc),
            cli,
            control,
            edge: edge.to_owned(),
            log: log_path,
        })
    }

    /// What the daemon has written to its log so far (empty if unreadable).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// `viscum status --json`.
    pub fn status(&mut self) -> Result<serde_json::Value> {
        if let Some(p) = &mut self.proc {
            p.check_alive()?;
        }
        let done = self.cli.run(
            &self.edge,
            &[
                "status",
                "--json",
                "--control",
                &self.control.display().to_string(),
            ],
        )?;
        Ok(serde_json::from_str(&done.stdout)?)
    }

    /// Polls the status until `ready(status)` holds.
    pub fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            sys::check_stop()?;
            match self.status() {
                Ok(s) if ready(&s) => return Ok(s),
                Ok(s) => last = s.to_string().chars().take(400).collect(),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                bail!("daemon: {what} not reached after {timeout:?} (last status: {last})");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Resident and peak memory of the daemon process, KiB (VmRSS, VmHWM).
    pub fn rss_kib(&self) -> Option<(u64, u64)> {
        let pid = self.pid()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let get = |key: &str| {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        };
        Some((get("VmRSS:")?, get("VmHWM:")?))
    }

    /// SIGTERM (the daemon's clean shutdown removes what it made), then waits.
    pub fn shutdown(&mut self, timeout: Duration) {
        if let Some(mut p) = self.proc.take() {
            let _ = signal::kill(Pid::from_raw(p.pid() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = p.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("bench: the daemon did not stop within {timeout:?}; killing it");
            // Drop: SIGTERM again, then SIGKILL.
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(30));
    }
}
