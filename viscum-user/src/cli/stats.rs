//! `viscum stats`.

use clap::Args;

use super::{Result, print_json, print_table};
use crate::{
    engine::{self, Engine, GlobalStats, Pins},
    redirect::{self, EntryRow},
};

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct StatsReport {
    bpffs: String,
    interfaces: Vec<String>,
    /// Every recorded attachment with its state as the kernel has it (an interface
    /// re-created or deleted shows as missing).
    attachments: Vec<engine::attach::Attachment>,
    global: GlobalStats,
    entries: Vec<EntryRow>,
}

pub async fn run(pins: &Pins, args: StatsArgs) -> Result<()> {
    let engine = Engine::open(pins)?;
    let report = StatsReport {
        bpffs: pins.dir.display().to_string(),
        interfaces: engine::attached_interfaces(pins),
        attachments: engine::attach::attachments(pins),
        global: engine.global_stats()?,
        entries: redirect::list(&engine).await?,
    };
    if args.json {
        return print_json(&report);
    }
    let g = report.global;
    println!(
        "attached to: {}",
        if report.interfaces.is_empty() {
            "-".into()
        } else {
            report.interfaces.join(", ")
        }
    );
    for a in report
        .attachments
        .iter()
        .filter(|a| a.state != engine::attach::AttachState::Attached)
    {
        println!("interface {}: {}", a.interface, a.describe());
    }
    print_table(
        &[
            "SEEN",
            "REDIRECTED",
            "PASSED",
            "FRAGMENTS",
            "FRAGS_UNKNOWN",
            "UNPARSABLE",
            "REDIRECT_ERRORS",
        ],
        &[vec![
            g.seen.to_string(),
            g.redirected.to_string(),
            g.passed.to_string(),
            g.fragments.to_string(),
            g.fragments_unknown.to_string(),
            g.unparsable.to_string(),
            g.redirect_errors.to_string(),
        ]],
    );
    println!();
    print_table(
        &[
            "EDGE_FLOWS",
            "CLOUD_FLOWS",
            "ORPHANS",
            "REPLIES_FWD",
            "REPLIES_REWRITTEN",
            "REPLIES_TO_STACK",
            "MIRRORED",
        ],
        &[vec![
            g.flows_edge.to_string(),
            g.flows_cloud.to_string(),
            g.flow_orphans.to_string(),
            g.replies_forwarded.to_string(),
            g.replies_rewritten.to_string(),
            g.replies_to_stack.to_string(),
            g.mirrored.to_string(),
        ]],
    );
    println!();
    print_table(
        &[
            "ICMP_TO_EDGE",
            "ICMP_TO_CLIENT",
            "ICMP_DROPPED",
            "MSS_CLAMPED",
        ],
        &[vec![
            g.icmp_to_edge.to_string(),
            g.icmp_to_client.to_string(),
            g.icmp_dropped.to_string(),
            g.mss_clamped.to_string(),
        ]],
    );
    println!();
    super::redirect::print_entries(&report.entries);
    Ok(())
}
