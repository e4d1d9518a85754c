//! `viscum trace`: the classifier's per-packet decisions, live.

use anyhow::Context as _;
use clap::Args;
use tokio::io::{Interest, unix::AsyncFd};

use super::Result;
use crate::engine::{Engine, Pins};

/// `viscum trace` takes no arguments of its own.
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

/// A classifier debug record made readable: protocol numbers as names, the target's
/// interface index with its name in this namespace, the TC verdict by name
/// (include/uapi/linux/pkt_cls.h). `name_of` names an interface index (`None` if there is
/// none). Records of another shape pass unchanged.
///
/// `edge proto=6 port=80 -> ifindex 4 action 7` reads `edge tcp/80 -> vh-web (ifindex 4):
/// redirected`; `miss proto=17 port=53` reads `miss udp/53: no entry, left to the routing
/// (the cloud)`.
pub fn describe(record: &str, name_of: impl Fn(u32) -> Option<String>) -> String {
    let words: Vec<&str> = record.split_whitespace().collect();
    let field = |key: &str| {
        words
            .iter()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    };
    let (Some(proto), Some(port)) = (field("proto"), field("port")) else {
        return record.to_owned();
    };
    let proto = match proto {
        "6" => "tcp".to_owned(),
        "17" => "udp".to_owned(),
        n => format!("proto {n}"),
    };
    let flow = format!("{proto}/{port}");
    match words.first().copied() {
        Some("edge") => {
            let after = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|i| words.get(i + 1))
                    .and_then(|v| v.parse::<i64>().ok())
            };
            let (Some(ifindex), Some(action)) = (after("ifindex"), after("action")) else {
                return record.to_owned();
            };
            let target = u32::try_from(ifindex)
                .ok()
                .and_then(&name_of)
                .unwrap_or_else(|| "gone".to_owned());
            let verdict = match action {
                -1 => "left to the stack".to_owned(),
                0 => "passed".to_owned(),
                2 => "dropped".to_owned(),
                7 => "redirected".to_owned(),
                n => format!("verdict {n}"),
            };
            format!("edge {flow} -> {target} (ifindex {ifindex}): {verdict}")
        }
        Some("miss") => format!("miss {flow}: no entry, left to the routing (the cloud)"),
        Some("cloud") => format!("cloud {flow}: a flow the cloud has, left to the routing"),
        _ => record.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::describe;

    fn name_of(i: u32) -> Option<String> {
        (i == 4).then(|| "vh-web".to_owned())
    }

    #[test]
    fn records_read_as_words() {
        assert_eq!(
            describe("edge proto=6 port=80 -> ifindex 4 action 7", name_of),
            "edge tcp/80 -> vh-web (ifindex 4): redirected"
        );
        assert_eq!(
            describe("edge proto=17 port=53 -> ifindex 9 action 2", name_of),
            "edge udp/53 -> gone (ifindex 9): dropped"
        );
        assert_eq!(
            describe("miss proto=17 port=53", name_of),
            "miss udp/53: no entry, left to the routing (the cloud)"
        );
        assert_eq!(
            describe("cloud flow proto=6 port=443", name_of),
            "cloud tcp/443: a flow the cloud has, left to the routing"
        );
        assert_eq!(
            describe("edge proto=132 port=9 -> ifindex 4 action -1", name_of),
            "edge proto 132/9 -> vh-web (ifindex 4): left to the stack"
        );
        // Anything else as it came.
        for other in [
            "something else",
            "edge proto=6",
            "edge proto=6 port=80 -> ifindex x",
        ] {
            assert_eq!(describe(other, name_of), other);
        }
    }
}
