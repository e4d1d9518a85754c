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
    for (headers, values) in counter_tables(&g) {
        print_table(&headers, &[values]);
        println!();
    }
    super::redirect::print_entries(&report.entries);
    Ok(())
}

/// The global counters as tables: one per registry row ([`StatsRow`]), columns in registry
/// order; each is (headers, values).
fn counter_tables(g: &GlobalStats) -> Vec<(Vec<&'static str>, Vec<String>)> {
    StatsRow::ALL
        .iter()
        .map(|&row| {
            g.iter()
                .filter(|(info, _)| info.row == row)
                .map(|(info, v)| (info.column, v.to_string()))
                .unzip()
        })
        .collect()
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
            "flows_recovered",
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
        // The tables show every counter once, under its own column, with its own value.
        let mut numbered = GlobalStats::default();
        for (i, info) in viscum_common::GLOBAL_COUNTER_INFO.iter().enumerate() {
            *numbered.get_mut(info.counter) = 1000 + i as u64;
        }
        let cells: Vec<(&str, String)> = counter_tables(&numbered)
            .into_iter()
            .flat_map(|(h, v)| h.into_iter().zip(v))
            .collect();
        assert_eq!(cells.len(), viscum_common::GLOBAL_COUNTER_INFO.len());
        for (i, info) in viscum_common::GLOBAL_COUNTER_INFO.iter().enumerate() {
            let hits: Vec<_> = cells.iter().filter(|(h, _)| *h == info.column).collect();
            assert_eq!(hits.len(), 1, "column {}", info.column);
            assert_eq!(hits[0].1, (1000 + i).to_string(), "column {}", info.column);
        }
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
