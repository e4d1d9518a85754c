//! `viscum trace`: the classifier's per-packet decisions, live.

use anyhow::Context as _;
use clap::Args;
use tokio::io::{Interest, unix::AsyncFd};

use super::Result;
use crate::engine::{Engine, Pins};

#[derive(Debug, Args)]
pub struct TraceArgs {}

/// Turns the kernel-side debug records on, prints them through the `log`
/// facade until Ctrl-C, and turns them off again: they cost a ring-buffer
/// write per packet, so they are never left on.
pub async fn run(pins: &Pins, _args: TraceArgs) -> Result<()> {
    let mut engine = Engine::open(pins)?;
    let prog_id = engine.program_id()?;
    let logger = aya_log::EbpfLogger::init_from_id(prog_id)
        .context("cannot open the classifier's log ring")?;
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd
    // owns the logger, so the registered fd stays valid until deregistration.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot watch the classifier's log ring: {}",
                e.into_parts().1
            )
        })?;
    engine.set_log_debug(true)?;
    eprintln!(
        "tracing decisions of {} (Ctrl-C to stop)",
        pins.dir.display()
    );
    let result = async {
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break Ok(()),
                guard = logger.readable_mut() => {
                    let mut guard = guard?;
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            }
        }
    }
    .await;
    engine.set_log_debug(false)?;
    result
}
