//! `viscum config from-uci FILE [-o OUT] [--shell]`: OpenWrt's UCI configuration as the
//! daemon's TOML ([`crate::uci`]), for the OpenWrt init script.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use clap::{Args, Subcommand};

use super::Result;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Map a UCI file (/etc/config/viscum) onto the TOML configuration of `viscum run` and
    /// validate it. Prints the TOML (or writes it with -o); on a problem, prints every one,
    /// each naming the UCI section, option and line, writes nothing and exits 1.
    FromUci(FromUciArgs),
}

#[derive(Debug, Args)]
pub struct FromUciArgs {
    /// The UCI file.
    #[arg(default_value = "/etc/config/viscum")]
    pub file: PathBuf,
    /// Write the TOML to this file (atomically: a temporary file renamed over it) instead of
    /// printing it.
    #[arg(long, short = 'o', value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Print shell variable assignments for the init scripts instead of the TOML:
    /// VISCUM_ENABLED, VISCUM_TERM_TIMEOUT (seconds procd waits for a clean stop),
    /// VISCUM_RESTART_KEY (changes when only a restart applies the file) and
    /// VISCUM_INTERFACES. With -o the TOML is still written.
    #[arg(long)]
    pub shell: bool,
}

/// `viscum config ...`: needs no privileges (it only reads and writes files).
pub fn run(cmd: ConfigCommand) -> Result<()> {
    match cmd {
        ConfigCommand::FromUci(args) => from_uci(args),
    }
}

fn from_uci(args: FromUciArgs) -> Result<()> {
    let mapped = crate::uci::load(&args.file)?;
    if let Some(out) = &args.output {
        write_atomically(out, mapped.toml.as_bytes())?;
    }
    let mut stdout = std::io::stdout().lock();
    if args.shell {
        stdout.write_all(mapped.shell().as_bytes())?;
    } else if args.output.is_none() {
        stdout.write_all(mapped.toml.as_bytes())?;
    }
    Ok(())
}

/// Writes `OUT.tmp` and renames it over `out`, so a reader (the daemon on SIGHUP) never sees
/// half a file.
fn write_atomically(out: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot rename {} to {}", tmp.display(), out.display())
    })?;
    Ok(())
}
