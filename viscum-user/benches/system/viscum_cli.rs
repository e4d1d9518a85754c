//! Running the real `viscum` binary (the one cargo built for this bench, with the release
//! profile's settings) inside a namespace, on one of this run's bpffs directories.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::support::sys::{self, Finished};

#[derive(Clone, Debug)]
pub struct Viscum {
    pub bin: PathBuf,
    pub bpffs: Option<PathBuf>,
}

impl Viscum {
    pub fn new() -> Viscum {
        Viscum {
            bin: PathBuf::from(env!("CARGO_BIN_EXE_viscum")),
            bpffs: None,
        }
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

    /// Runs `viscum ARGS` in `ns`; fails with its stderr unless it exits 0.
    pub fn run(&self, ns: &str, args: &[&str]) -> Result<Finished> {
        let mut cmd = self.command(ns, args)?;
        sys::run(&mut cmd, None, Duration::from_secs(60))
            .with_context(|| format!("viscum {}", args.join(" ")))?
            .ok(&format!("viscum {}", args.join(" ")))
    }
}
