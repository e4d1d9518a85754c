//! `viscum stats`.

use clap::Args;
use viscum_common::StatsRow;

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
    // One table per registry row, columns in registry order.
    for row in StatsRow::ALL {
        let (headers, values): (Vec<&str>, Vec<String>) = g
            .iter()
            .filter(|(info, _)| info.row == row)
            .map(|(info, v)| (info.column, v.to_string()))
            .unzip();
        print_table(&headers, &[values]);
        println!();
    }
    super::redirect::print_entries(&report.entries);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `viscum stats --json` and the daemon's status are read by scripts: the keys of
    /// `global` are an interface, whatever the registry's internals.
    #[test]
    fn global_json_keys_are_stable() {
        let g = GlobalStats {
            seen: 7,
            target_gone: 3,
            ..Default::default()
        };
        let v = serde_json::to_value(g).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = [
            "seen",
            "redirected",
            "passed",
            "fragments",
            "fragments_unknown",
            "unparsable",
            "redirect_errors",
            "flows_edge",
            "flows_cloud",
            "flow_orphans",
            "replies_forwarded",
            "replies_rewritten",
            "replies_to_stack",
            "replies_unknown",
            "mirrored",
            "icmp_to_edge",
            "icmp_to_client",
            "icmp_dropped",
            "mss_clamped",
            "target_gone",
        ];
        let mut keys_sorted = keys.clone();
        keys_sorted.sort_unstable();
        want.sort_unstable();
        assert_eq!(keys_sorted, want);
        assert_eq!(v["seen"], 7);
        assert_eq!(v["target_gone"], 3);
        assert_eq!(g.get(viscum_common::GlobalCounter::TargetGone), 3);
        // Each counter's value sits in its own field (no two rows share one).
        for info in viscum_common::GLOBAL_COUNTER_INFO {
            let mut one = GlobalStats::default();
            *one.get_mut(info.counter) = 1;
            let v = serde_json::to_value(one).unwrap();
            assert_eq!(v[info.name], 1, "{}", info.name);
            assert_eq!(one.iter().map(|(_, v)| v).sum::<u64>(), 1);
        }
    }
}
