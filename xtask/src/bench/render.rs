//! `bench/RESULTS.md`: the machine, a summary of targets met, then a section per benchmark
//! with its notes, its tables (median, min–max, ratio, target, met) and its plots.

use std::{fmt::Write as _, path::Path};

use serde_json::Value;

use super::{
    compare::{self, Run},
    svg::num,
};

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// Targets met / targets with a verdict, over all fragments.
fn counts(doc: &Value) -> (usize, usize) {
    let rows = doc["fragments"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|f| f["tables"].as_array().into_iter().flatten())
        .flat_map(|t| t["rows"].as_array().into_iter().flatten());
    let (mut met, mut judged) = (0, 0);
    for r in rows {
        if let Some(m) = r["met"].as_bool() {
            judged += 1;
            met += usize::from(m);
        }
    }
    (met, judged)
}

/// "9 benchmarks: 7 ok, 1 partial, 1 error; targets met 12/20".
pub fn summary_line(doc: &Value) -> String {
    let frags = doc["fragments"].as_array().cloned().unwrap_or_default();
    let count = |s: &str| frags.iter().filter(|f| f["status"] == s).count();
    let (met, judged) = counts(doc);
    format!(
        "{} benchmarks: {} ok, {} partial, {} error, {} skipped; targets met {met}/{judged}",
        frags.len(),
        count("ok"),
        count("partial"),
        count("error"),
        count("skipped")
    )
}

fn stat(v: &Value) -> (String, String) {
    if v.is_null() {
        return ("–".into(), "–".into());
    }
    let (m, lo, hi) = (
        v["median"].as_f64().unwrap_or(f64::NAN),
        v["min"].as_f64().unwrap_or(f64::NAN),
        v["max"].as_f64().unwrap_or(f64::NAN),
    );
    let spread = if v["n"].as_u64().unwrap_or(0) > 1 {
        format!("{} – {}", num(lo), num(hi))
    } else {
        "–".into()
    };
    (num(m), spread)
}

/// One machine fact of `m` as a table cell ("–" when absent).
fn fact(m: &Value, k: &str) -> String {
    match &m[k] {
        Value::Null => "–".into(),
        Value::String(v) => cell(v),
        v => cell(&v.to_string()),
    }
}

/// The machine table's (label, cell) lines for `doc`.
fn machine(doc: &Value) -> Vec<(String, String)> {
    let m = &doc["machine"];
    let mut out = Vec::new();
    for (label, key) in [
        ("kernel", "kernel"),
        ("TC attach", "tc_attach"),
        ("BPF JIT (bpf_jit_enable / harden)", "bpf_jit_enable"),
        ("CPU", "cpu"),
        ("CPUs", "cpus"),
        ("virtualised", "virtualized"),
        ("memory (MiB)", "memory_mib"),
        ("clock source", "clocksource"),
        ("load average at start / end", "load_before"),
        ("git commit (dirty files)", "git_commit"),
    ] {
        let v = match key {
            "bpf_jit_enable" => format!(
                "{} / {}",
                fact(m, "bpf_jit_enable"),
                fact(m, "bpf_jit_harden")
            ),
            "load_before" => format!("{} / {}", fact(m, "load_before"), fact(m, "load_after")),
            "git_commit" => format!("{} ({})", fact(m, "git_commit"), fact(m, "git_dirty_files")),
            _ => fact(m, key),
        };
        out.push((label.to_owned(), v));
    }
    if let Some(tools) = m["tools"].as_object() {
        for (k, v) in tools {
            out.push((
                k.clone(),
                v.as_str()
                    .map(cell)
                    .unwrap_or_else(|| "not installed".into()),
            ));
        }
    }
    out
}

/// "3 / 6" targets met in one benchmark, or "–" when none has a verdict.
fn frag_met(f: Option<&Value>) -> String {
    let Some(f) = f else {
        return "–".into();
    };
    let judged: Vec<bool> = f["tables"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["rows"].as_array().into_iter().flatten())
        .filter_map(|r| r["met"].as_bool())
        .collect();
    if judged.is_empty() {
        "–".into()
    } else {
        format!(
            "{} / {}",
            judged.iter().filter(|x| **x).count(),
            judged.len()
        )
    }
}

fn started(doc: &Value) -> String {
    doc["started_utc"]
        .as_str()
        .unwrap_or("?")
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_owned()
}

fn anchor(f: &Value) -> String {
    format!(
        "{}-{}",
        f["id"].as_str().unwrap_or("?").to_lowercase(),
        f["title"]
            .as_str()
            .unwrap_or("")
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
            .collect::<String>()
            .replace(' ', "-")
    )
}

fn note(r: &Value) -> String {
    match (r["error"].as_str(), r["note"].as_str()) {
        (Some(e), _) => format!("error: {}", cell(e)),
        (None, Some(n)) => cell(n),
        _ => String::new(),
    }
}

/// One table of one run, as `cargo xtask bench` without a baseline shows it.
fn table(s: &mut String, t: &Value) {
    let _ = writeln!(
        s,
        "| metric | median | min – max | unit | ratio (min – max) | target | met | notes |\n|---|---:|---:|---|---|---|:---:|---|"
    );
    for r in t["rows"].as_array().into_iter().flatten() {
        let (med, spread) = stat(&r["value"]);
        let ratio = if r["ratio"].is_null() {
            "–".into()
        } else {
            let (rm, rs) = stat(&r["ratio"]);
            format!(
                "{rm}× vs {} ({rs})",
                cell(r["reference"].as_str().unwrap_or(""))
            )
        };
        let _ = writeln!(
            s,
            "| {} | {med} | {spread} | {} | {ratio} | {} | {} | {} |",
            cell(r["name"].as_str().unwrap_or("")),
            cell(r["unit"].as_str().unwrap_or("")),
            cell(r["target"].as_str().unwrap_or("")),
            compare::met(Some(r)),
            note(r),
        );
    }
}

/// One table of both runs: the rows paired by metric label (see [`compare`]).
fn table_pair(s: &mut String, before: Option<&Value>, after: Option<&Value>) {
    let _ = writeln!(
        s,
        "| metric | before | after | change | after min – max | unit | ratio before → after | target | met before | met after | notes (after) |\n\
         |---|---:|---:|---|---:|---|---|---|:---:|:---:|---|"
    );
    for (b, a) in compare::pair_rows(before, after) {
        let Some(r) = a.or(b) else { continue };
        let (bv, av) = compare::values(b, a);
        let spread = a.map_or_else(|| "–".into(), |a| stat(&a["value"]).1);
        let target = match (
            b.and_then(|b| b["target"].as_str()),
            a.and_then(|a| a["target"].as_str()),
        ) {
            (Some(bt), Some(at)) if bt != at => format!("{} (before: {})", cell(at), cell(bt)),
            (_, Some(t)) | (Some(t), None) => cell(t),
            (None, None) => String::new(),
        };
        let notes = match a {
            Some(a) => note(a),
            None => "only in the before run".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {bv} | {av} | {} | {spread} | {} | {} | {target} | {} | {} | {notes} |",
            cell(r["name"].as_str().unwrap_or("")),
            compare::change(b, a),
            cell(r["unit"].as_str().unwrap_or("")),
            cell(&compare::ratios(b, a)),
            compare::met(b),
            compare::met(a),
        );
    }
}

/// A link relative to `bench/` as a path from the workspace root (for a command line).
fn from_root(rel: &str) -> String {
    match rel.strip_prefix("../") {
        Some(r) => r.to_owned(),
        None if rel.starts_with('/') => rel.to_owned(),
        None => format!("bench/{rel}"),
    }
}

/// The report for `after`, with `baseline` beside it when given (see [`compare`]).
pub fn markdown(
    after: Run<'_>,
    baseline: Option<Run<'_>>,
    plots_dir: &str,
    plots_abs: &Path,
) -> String {
    let (doc, json_rel) = (after.doc, after.json_rel);
    let mut s = String::new();
    let quick = doc["mode"] == "quick";
    let _ = writeln!(s, "# Viscum benchmark results\n");
    if quick {
        let _ = writeln!(
            s,
            "> **Quick run** (`cargo xtask bench --quick`): fewer rounds, shorter runs, smaller fills, for development only. \
             Do not quote these numbers; run `cargo xtask bench` on a quiet machine for the published figures.\n"
        );
    }
    if let Some(b) = baseline
        && b.doc["mode"] != doc["mode"]
    {
        let _ = writeln!(
            s,
            "> **The two runs differ in mode** (before: {}, after: {}): rounds, run lengths and fills differ, \
             so tables and rows may not pair, and the figures are not comparable for publication.\n",
            b.doc["mode"].as_str().unwrap_or("?"),
            doc["mode"].as_str().unwrap_or("?")
        );
    }
    let _ = writeln!(
        s,
        "Generated by `cargo xtask bench{}{}` from [{json_rel}]({json_rel}) (raw samples, every parameter). \
         Started {} UTC, took {:.0} min. What is measured and why: `docs/benchmarks.md`; how: the doc comments of \
         `viscum-bench/benches/`.\n",
        if quick { " --quick" } else { "" },
        baseline.map_or_else(String::new, |b| format!(
            " --baseline {}",
            from_root(b.json_rel)
        )),
        started(doc),
        doc["seconds"].as_f64().unwrap_or(0.0) / 60.0
    );
    if let Some(b) = baseline {
        let _ = writeln!(
            s,
            "- **Before:** [{}]({}): {}.\n- **After:** [{json_rel}]({json_rel}): {}.\n",
            b.json_rel,
            b.json_rel,
            b.label(),
            after.label()
        );
    }
    let _ = writeln!(
        s,
        "Every figure is a median over interleaved rounds (variants run A B A B …, order alternating) with the min–max spread; ratios are taken per round, then summarised. The machine is a shared VM: compare ratios, not absolute numbers across runs.\n"
    );
    if let Some(b) = baseline {
        let _ = write!(s, "{}", compare::goals(b, after));
    }

    let now = machine(doc);
    match baseline {
        None => {
            let _ = writeln!(s, "## Machine\n\n| | |\n|---|---|");
            for (label, v) in &now {
                let _ = writeln!(s, "| {label} | {v} |");
            }
        }
        Some(b) => {
            let _ = writeln!(s, "## Machine\n\n| | before | after |\n|---|---|---|");
            let then = machine(b.doc);
            let mut labels: Vec<&String> = now.iter().map(|(l, _)| l).collect();
            labels.extend(
                then.iter()
                    .map(|(l, _)| l)
                    .filter(|l| !now.iter().any(|(n, _)| n == *l)),
            );
            let get = |lines: &[(String, String)], l: &str| {
                lines
                    .iter()
                    .find(|(n, _)| n == l)
                    .map_or_else(|| "–".into(), |(_, v)| v.clone())
            };
            for l in labels {
                let _ = writeln!(s, "| {l} | {} | {} |", get(&then, l), get(&now, l));
            }
        }
    }

    let frags = doc["fragments"].as_array().cloned().unwrap_or_default();
    // Benchmarks of the baseline this run does not have, shown after the others.
    let gone: Vec<Value> = baseline
        .and_then(|b| b.doc["fragments"].as_array())
        .into_iter()
        .flatten()
        .filter(|bf| !frags.iter().any(|f| f["id"] == bf["id"]))
        .cloned()
        .collect();
    let before_of = |f: &Value| -> Option<&Value> {
        baseline.and_then(|b| compare::fragment(b.doc, f["id"].as_str().unwrap_or("")))
    };
    let _ = writeln!(s, "\n## Summary\n\n{}", summary_line(doc));
    if let Some(b) = baseline {
        let _ = writeln!(s, "\nBefore: {}", summary_line(b.doc));
        let _ = writeln!(
            s,
            "\n| | benchmark | status before → after | targets met before → after |\n|---|---|---|---|"
        );
    } else {
        let _ = writeln!(
            s,
            "\n| | benchmark | status | targets met |\n|---|---|---|---|"
        );
    }
    for f in &frags {
        let id = f["id"].as_str().unwrap_or("?");
        let title = cell(f["title"].as_str().unwrap_or(""));
        let status = f["status"].as_str().unwrap_or("?");
        if baseline.is_some() {
            let b = before_of(f);
            let _ = writeln!(
                s,
                "| {id} | [{title}](#{}) | {} → {status} | {} → {} |",
                anchor(f),
                b.and_then(|b| b["status"].as_str()).unwrap_or("–"),
                frag_met(b),
                frag_met(Some(f)),
            );
        } else {
            let _ = writeln!(
                s,
                "| {id} | [{title}](#{}) | {status} | {} |",
                anchor(f),
                frag_met(Some(f))
            );
        }
    }
    for g in &gone {
        let _ = writeln!(
            s,
            "| {} | [{}](#{}) | {} → – | {} → – |",
            g["id"].as_str().unwrap_or("?"),
            cell(g["title"].as_str().unwrap_or("")),
            anchor(g),
            g["status"].as_str().unwrap_or("?"),
            frag_met(Some(g)),
        );
    }

    for f in &frags {
        let _ = writeln!(
            s,
            "\n## {} {}\n",
            f["id"].as_str().unwrap_or("?"),
            f["title"].as_str().unwrap_or("")
        );
        if let Some(e) = f["error"].as_str() {
            let _ = writeln!(
                s,
                "**Could not run:** `{}`\n",
                e.replace('`', "'").replace('\n', " ")
            );
        }
        let before = before_of(f);
        if let Some(e) = before.and_then(|b| b["error"].as_str()) {
            let _ = writeln!(
                s,
                "**Could not run in the before run:** `{}`\n",
                e.replace('`', "'").replace('\n', " ")
            );
        }
        for n in f["notes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            let _ = writeln!(s, "- {}", n.replace('\n', " "));
        }
        if baseline.is_some() {
            for (b, a) in compare::pair_tables(before, Some(f)) {
                let Some(t) = a.or(b) else { continue };
                let heading = match (b, a) {
                    (Some(b), Some(a)) if b["title"] != a["title"] => format!(
                        "{} (before: {})",
                        cell(a["title"].as_str().unwrap_or("")),
                        cell(b["title"].as_str().unwrap_or(""))
                    ),
                    (_, None) => format!(
                        "{} (only in the before run)",
                        cell(t["title"].as_str().unwrap_or(""))
                    ),
                    _ => cell(t["title"].as_str().unwrap_or("")),
                };
                let _ = writeln!(s, "\n**{heading}**\n");
                table_pair(&mut s, b, a);
            }
        } else {
            for t in f["tables"].as_array().into_iter().flatten() {
                let _ = writeln!(s, "\n**{}**\n", cell(t["title"].as_str().unwrap_or("")));
                table(&mut s, t);
            }
        }
        for p in f["plots"].as_array().into_iter().flatten() {
            let Some(file) = p["file"].as_str() else {
                continue;
            };
            if plots_abs.join(format!("{file}.svg")).exists() {
                let _ = writeln!(
                    s,
                    "\n![{}]({plots_dir}/{file}.svg)",
                    cell(p["title"].as_str().unwrap_or(file))
                );
            }
        }
    }
    for g in &gone {
        let _ = writeln!(
            s,
            "\n## {} {}\n\nOnly in the before run.",
            g["id"].as_str().unwrap_or("?"),
            g["title"].as_str().unwrap_or("")
        );
        for (b, _) in compare::pair_tables(Some(g), None) {
            if let Some(b) = b {
                let _ = writeln!(s, "\n**{}**\n", cell(b["title"].as_str().unwrap_or("")));
                table_pair(&mut s, Some(b), None);
            }
        }
    }
    s
}

/// Blocks other tools keep in the report, `<!-- NAME:begin -->` … `<!-- NAME:end -->` (such
/// as `cargo xtask dist --budget`'s router B9 section), taken from `old` and appended to
/// `new` in their order, so that re-rendering does not lose them.
pub fn keep_marked_blocks(old: &str, mut new: String) -> String {
    let mut rest = old;
    while let Some(b) = rest.find("<!-- ") {
        let tail = &rest[b + 5..];
        let Some(name) = tail
            .find(":begin -->")
            .map(|e| &tail[..e])
            .filter(|n| !n.is_empty() && !n.contains(char::is_whitespace))
        else {
            rest = tail;
            continue;
        };
        let end = format!("<!-- {name}:end -->");
        let Some(e) = rest[b..].find(&end) else {
            rest = tail;
            continue;
        };
        let block = &rest[b..b + e + end.len()];
        if !new.contains(&format!("<!-- {name}:begin -->")) {
            if !new.ends_with("\n\n") {
                new.push('\n');
            }
            new.push_str(block);
            new.push('\n');
        }
        rest = &rest[b + e + end.len()..];
    }
    new
}

#[cfg(test)]
mod tests {
    use super::keep_marked_blocks;

    #[test]
    fn marked_blocks_survive_a_rerender() {
        let old = "# old\n\n<!-- b9-router:begin -->\n## B9 router\n| a |\n<!-- b9-router:end -->\ntrailing\n<!-- x:begin -->y<!-- x:end -->\n";
        let out = keep_marked_blocks(old, "# new\n".into());
        assert_eq!(
            out,
            "# new\n\n<!-- b9-router:begin -->\n## B9 router\n| a |\n<!-- b9-router:end -->\n\n<!-- x:begin -->y<!-- x:end -->\n"
        );
        assert_eq!(keep_marked_blocks("", "# new\n".into()), "# new\n");
        // An unterminated block is not copied.
        assert_eq!(
            keep_marked_blocks("<!-- a:begin -->\nx\n", "# new\n".into()),
            "# new\n"
        );
    }
}
