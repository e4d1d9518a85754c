//! Command-line flags of the bench binaries.
//!
//! `cargo xtask bench` runs the binaries directly with these flags; `cargo bench` passes
//! `--bench`, which is accepted and ignored, so both ways work.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

/// Parsed flags.
#[derive(Debug, Clone)]
pub struct Args {
    /// Fewer rounds, shorter runs, smaller fills (the whole suite in under five minutes).
    pub quick: bool,
    /// Where to write the JSON fragments; stdout when absent.
    pub out: Option<PathBuf>,
    /// Prefix of every namespace, interface and directory this run creates (e.g. `vb3f2a`), so
    /// leftovers of a crashed run are recognisable and runs never collide.
    pub run_id: String,
    /// Which group of benchmarks to run (binary specific; `all` by default).
    pub group: String,
    /// Everything after a leading `__serve` (internal helper mode of the system bench).
    pub serve: Option<Vec<String>>,
    /// The datapath bench's JSON output, for figures that compare against B1.
    pub reference: Option<PathBuf>,
}

impl Args {
    pub fn parse() -> Result<Args> {
        let mut it = std::env::args().skip(1).peekable();
        if it.peek().map(String::as_str) == Some("__serve") {
            it.next();
            return Ok(Args {
                quick: false,
                out: None,
                run_id: String::new(),
                group: String::new(),
                serve: Some(it.collect()),
                reference: None,
            });
        }
        let mut args = Args {
            quick: false,
            out: None,
            run_id: format!("vb{:04x}", std::process::id() & 0xffff),
            group: "all".into(),
            serve: None,
            reference: None,
        };
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--quick" => args.quick = true,
                "--bench" => {}
                "--out" => args.out = Some(it.next().context("--out needs a file")?.into()),
                "--run-id" => args.run_id = it.next().context("--run-id needs a value")?,
                "--group" => args.group = it.next().context("--group needs a value")?,
                "--ref" => args.reference = Some(it.next().context("--ref needs a file")?.into()),
                other => bail!(
                    "unknown argument '{other}' (expected --quick, --out FILE, --run-id ID, --group NAME, --ref FILE)"
                ),
            }
        }
        let valid = args.run_id.len() <= 6
            && args.run_id.starts_with("vb")
            && args
                .run_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !valid {
            bail!(
                "--run-id must be 'vb' plus up to four lower-case letters or digits, got '{}'",
                args.run_id
            );
        }
        Ok(args)
    }

    /// `quick` or `full` value of a knob.
    pub fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick { quick } else { full }
    }

    /// Does this invocation run group `name`?
    pub fn wants(&self, name: &str) -> bool {
        self.group == "all" || self.group.split(',').any(|g| g.eq_ignore_ascii_case(name))
    }
}
