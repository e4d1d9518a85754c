//! Running the real `viscum` binary (the one xtask built for this bench with the release
//! profile's settings, passed as `VISCUM_BIN`) inside a namespace, on one of this run's bpffs
//! directories.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::support::sys::{self, Finished};

#[derive(Clone, Debug)]
pub struct Viscum {
    pub bin: PathBuf,
    pub bpffs: Option<PathBuf>,
}

impl Viscum {
    /// The binary named by `VISCUM_BIN` (`cargo xtask bench` sets it).
    pub fn from_env() -> Result<Viscum> {
        let Some(bin) = std::env::var_os("VISCUM_BIN") else {
            bail!(
                "VISCUM_BIN is not set: run the benches through `cargo xtask bench`, which builds viscum with the release profile and names it"
            );
        };
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("VISCUM_BIN={} is not a file", bin.display());
        }
        Ok(Viscum { bin, bpffs: None })
    }

    pub fn with_bpffs(&self, dir: &Path) -> Viscum {
        Viscum {
            bin: self.bin.clone(),
            bpffs: Some(dir.to_owned()),
        }
    }

    /// `viscum --bpffs DIR ARGS...` set up to run inside `ns` (nothing started yet).
    pub fn command(&self, ns: &str, args: &[&str]) -> Result<Command> {
        let mut cmd = sys::command_in(Some(ns), None, &self.bin)?;
        if let Some(d) = &self.bpffs {
            cmd.arg("--bpffs").arg(d);
        }
        cmd.args(args);
        Ok(cmd)
    }

    /// Runs `viscum ARGS` in `ns` the way a shell on the router would start it: from a thread
    /// that entered `ns` (the child inherits the thread's namespace) and with no `pre_exec`,
    /// so std starts it with `posix_spawn` (a vfork-like clone) instead of `fork`. A `fork`
    /// of this benchmark, large and busy with prober and server threads, copies its page
    /// tables and makes every page those threads then write a copy-on-write fault: cost of
    /// the harness, not of the command timed. `Finished::started` is just before the spawn.
    pub fn run_spawned(&self, ns: &str, args: &[&str]) -> Result<Finished> {
        let mut cmd = Command::new(&self.bin);
        if let Some(d) = &self.bpffs {
            cmd.arg("--bpffs").arg(d);
        }
        cmd.args(args).stdin(std::process::Stdio::null());
        let what = format!("viscum {}", args.join(" "));
        viscum::netns::in_netns(ns, move || {
            sys::run(&mut cmd, None, Duration::from_secs(60))
                .with_context(|| what.clone())?
                .ok(&what)
        })
        .with_context(|| format!("cannot enter {ns}"))?
    }

    /// Runs any `program ARGS` in `ns` as [`Viscum::run_spawned`] does (for the floors).
    pub fn spawn_other(ns: &str, program: &Path, args: &[&str]) -> Result<Finished> {
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(std::process::Stdio::null());
        let what = program.display().to_string();
        viscum::netns::in_netns(ns, move || {
            sys::run(&mut cmd, None, Duration::from_secs(60))
                .with_context(|| what.clone())?
                .ok(&what)
        })
        .with_context(|| format!("cannot enter {ns}"))?
    }

    /// Runs `viscum ARGS` in `ns`; fails with its stderr unless it exits 0.
    pub fn run(&self, ns: &str, args: &[&str]) -> Result<Finished> {
        let mut cmd = self.command(ns, args)?;
        sys::run(&mut cmd, None, Duration::from_secs(60))
            .with_context(|| format!("viscum {}", args.join(" ")))?
            .ok(&format!("viscum {}", args.join(" ")))
    }
}
