//! Runs of part of the suite (`cargo xtask bench --only fleet`, say): their results must not
//! replace the last full run's. The JSON goes to `results/<date>-<kernel>-<groups>.json`, and
//! `RESULTS.md` gets (or has replaced) one marked block, `<!-- bench-<groups>:begin -->` …
//! `<!-- bench-<groups>:end -->`, with the sections of the benchmarks that ran; the rest of the
//! report stays as it was, and a later full render keeps the block
//! ([`super::render::keep_marked_blocks`]).

use std::{fmt::Write as _, fs, path::PathBuf};

use anyhow::{Context as _, Result};
use serde_json::Value;

use super::{compare, render};
use crate::process;

/// The block's name for the groups that ran, e.g. `bench-fleet`.
fn block_name(groups: &[String]) -> String {
    format!("bench-{}", groups.join("+"))
}

/// Writes the JSON and the report block; returns (json path, report path).
pub fn write(doc: &Value, groups: &[String], quick: bool) -> Result<(PathBuf, PathBuf)> {
    let root = process::workspace_root().join("bench");
    let results = root.join("results");
    fs::create_dir_all(&results).with_context(|| format!("cannot create {}", results.display()))?;
    let date = doc["started_utc"]
        .as_str()
        .and_then(|s| s.get(..10))
        .unwrap_or("0000-00-00");
    let kernel = doc["machine"]["kernel"]
        .as_str()
        .unwrap_or("unknown")
        .replace('/', "_");
    let suffix = if quick { "-quick" } else { "" };
    let json_path = results.join(format!("{date}-{kernel}-{}{suffix}.json", groups.join("+")));
    fs::write(&json_path, serde_json::to_string_pretty(doc)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;

    let plots_dir_name = if quick { "plots-quick" } else { "plots" };
    let plots_dir = root.join(plots_dir_name);
    fs::create_dir_all(&plots_dir)?;
    for frag in doc["fragments"].as_array().into_iter().flatten() {
        for plot in frag["plots"].as_array().into_iter().flatten() {
            if let (Some(file), Some(text)) = (plot["file"].as_str(), super::svg::render(plot)) {
                fs::write(plots_dir.join(format!("{file}.svg")), text)?;
            }
        }
    }
    let json_rel = super::link_from_bench(&json_path);
    let full = render::markdown(
        compare::Run {
            doc,
            json_rel: &json_rel,
        },
        None,
        plots_dir_name,
        &plots_dir,
    );
    let block = block(doc, groups, &json_rel, &full, quick);
    let report = root.join(format!("RESULTS{suffix}.md"));
    let old = fs::read_to_string(&report).unwrap_or_default();
    fs::write(&report, replace_block(&old, &block_name(groups), &block))
        .with_context(|| format!("cannot write {}", report.display()))?;
    Ok((json_path, report))
}

/// The marked block: provenance, then the benchmark sections of the full rendering.
fn block(doc: &Value, groups: &[String], json_rel: &str, full: &str, quick: bool) -> String {
    let name = block_name(groups);
    let mut s = format!("<!-- {name}:begin -->\n");
    let first = doc["fragments"]
        .as_array()
        .and_then(|f| f.first())
        .and_then(|f| f["id"].as_str())
        .map(|id| format!("\n## {id} "));
    let sections = first
        .and_then(|h| full.find(&h))
        .map_or("", |at| &full[at + 1..]);
    let mut lines = sections.lines();
    if let Some(heading) = lines.next() {
        let _ = writeln!(s, "{heading}\n");
    }
    let _ = writeln!(
        s,
        "From a run of part of the suite: `cargo xtask bench{} --only {}`, [{json_rel}]({json_rel}), \
         started {} UTC, took {:.0} s, kernel {}, commit {}.",
        if quick { " --quick" } else { "" },
        groups.join(","),
        doc["started_utc"]
            .as_str()
            .unwrap_or("?")
            .replace('T', " ")
            .trim_end_matches('Z'),
        doc["seconds"].as_f64().unwrap_or(0.0),
        doc["machine"]["kernel"].as_str().unwrap_or("?"),
        doc["machine"]["git_commit"]
            .as_str()
            .or_else(|| doc["machine"]["commit"].as_str())
            .unwrap_or("?"),
    );
    for line in lines {
        s.push_str(line);
        s.push('\n');
    }
    if !s.ends_with('\n') {
        s.push('\n');
    }
    let _ = writeln!(s, "<!-- {name}:end -->");
    s
}

/// `old` with block `name` replaced by `block`, or `block` appended.
fn replace_block(old: &str, name: &str, block: &str) -> String {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    if let Some(b) = old.find(&begin)
        && let Some(e) = old[b..].find(&end)
    {
        let after = &old[b + e + end.len()..];
        let after = after.strip_prefix('\n').unwrap_or(after);
        return format!("{}{block}{after}", &old[..b]);
    }
    let mut out = old.to_owned();
    if !out.is_empty() && !out.ends_with("\n\n") {
        out.push('\n');
    }
    out.push_str(block);
    out
}

/// Whether a selection of groups leaves part of the suite out.
pub fn is_partial(only: &[String]) -> bool {
    !only.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_is_replaced_in_place_or_appended() {
        let block = "<!-- bench-fleet:begin -->\nnew\n<!-- bench-fleet:end -->\n";
        let old = "# r\n\n<!-- bench-fleet:begin -->\nold\n<!-- bench-fleet:end -->\ntail\n";
        assert_eq!(
            replace_block(old, "bench-fleet", block),
            "# r\n\n<!-- bench-fleet:begin -->\nnew\n<!-- bench-fleet:end -->\ntail\n"
        );
        assert_eq!(
            replace_block("# r\n", "bench-fleet", block),
            format!("# r\n\n{block}")
        );
    }

    #[test]
    fn block_takes_the_sections_only() {
        let doc = serde_json::json!({"fragments": [{"id": "B10"}], "started_utc": "2026-11-30T07:00:00Z",
            "seconds": 90.0, "machine": {"kernel": "6.18"}});
        let full =
            "# Viscum benchmark results\n\n## Machine\n\n## Summary\n\n## B10 Fleet\n\n| t |\n";
        let b = block(&doc, &["fleet".into()], "results/x.json", full, false);
        assert!(
            b.starts_with("<!-- bench-fleet:begin -->\n## B10 Fleet\n\nFrom a run of part"),
            "{b}"
        );
        assert!(b.contains("| t |\n<!-- bench-fleet:end -->"), "{b}");
        assert!(!b.contains("## Machine"), "{b}");
    }
}
