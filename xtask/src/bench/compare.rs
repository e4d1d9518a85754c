//! Before/after: a baseline results file rendered beside a new one (`--baseline`).
//!
//! Rows are paired by benchmark id (`B1` …), then table, then metric label:
//!
//! * a table pairs with the baseline table of the same title, or else with the one whose
//!   title is the same once every number in it is replaced (`9 rounds` and `3 rounds`,
//!   `100000 per fill level` and `20000 per fill level` name the same table in a full and a
//!   quick run), when exactly one baseline table of that fragment matches that way;
//! * a row pairs with the row of exactly the same name in the paired table (names carry the
//!   variant: `1k entries` and `1M entries` are different rows, so no number is ignored
//!   there); the first unpaired one when a name repeats.
//!
//! Whatever pairs with nothing is still shown, with "–" on the side it is missing from:
//! new rows and tables in the new run's order, then the baseline's leftovers.
//!
//! [`goals`] renders the table of issue #12 ("Datapath v3") from both runs: each goal names
//! the rows its figure comes from ([`GOALS`]).

use std::fmt::Write as _;

use serde_json::Value;

use super::svg::num;

/// One results file with the link to it from `bench/RESULTS.md`.
#[derive(Clone, Copy)]
pub struct Run<'a> {
    pub doc: &'a Value,
    /// Link target relative to `bench/` (or an absolute path).
    pub json_rel: &'a str,
}

impl Run<'_> {
    /// "2026-11-29 23:15 UTC, commit a66ab8c, full run, kernel 6.18.44-fc-v669".
    pub fn label(&self) -> String {
        let d = self.doc;
        let started = d["started_utc"]
            .as_str()
            .map_or_else(|| "?".into(), |s| s.replace('T', " ").replace('Z', " UTC"));
        let commit = d["machine"]["git_commit"]
            .as_str()
            .map_or("?", |c| c.get(..7).unwrap_or(c));
        let dirty = match d["machine"]["git_dirty_files"].as_u64() {
            Some(0) | None => String::new(),
            Some(n) => format!(" + {n} uncommitted files"),
        };
        format!(
            "started {started}, commit {commit}{dirty}, {} run, kernel {}",
            d["mode"].as_str().unwrap_or("?"),
            d["machine"]["kernel"].as_str().unwrap_or("?")
        )
    }

    /// "2026-11-29, a66ab8c".
    fn short(&self) -> String {
        let d = self.doc;
        format!(
            "{}, {}",
            d["started_utc"]
                .as_str()
                .and_then(|s| s.get(..10))
                .unwrap_or("?"),
            d["machine"]["git_commit"]
                .as_str()
                .map_or("?", |c| c.get(..7).unwrap_or(c))
        )
    }
}

/// The fragment (benchmark section) with this id.
pub fn fragment<'a>(doc: &'a Value, id: &str) -> Option<&'a Value> {
    doc["fragments"]
        .as_array()?
        .iter()
        .find(|f| f["id"].as_str() == Some(id))
}

fn tables(frag: Option<&Value>) -> &[Value] {
    frag.and_then(|f| f["tables"].as_array())
        .map_or(&[], Vec::as_slice)
}

fn rows(table: Option<&Value>) -> &[Value] {
    table
        .and_then(|t| t["rows"].as_array())
        .map_or(&[], Vec::as_slice)
}

/// A title with every run of digits (and decimal points between them) replaced by `#`.
fn shape(title: &str) -> String {
    let mut out = String::with_capacity(title.len());
    let mut chars = title.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            while chars
                .peek()
                .is_some_and(|n| n.is_ascii_digit() || *n == '.')
            {
                chars.next();
            }
            out.push('#');
        } else {
            out.push(c);
        }
    }
    out
}

/// Pairs of (before, after) in the after order, then what only the baseline has; `same`
/// decides a pairing, tried first with `exact` and then (when given) with `loose`, the
/// loose one only when it is unambiguous on both sides.
fn pair<'a>(
    before: &'a [Value],
    after: &'a [Value],
    exact: impl Fn(&Value) -> String,
    loose: Option<&dyn Fn(&Value) -> String>,
) -> Vec<(Option<&'a Value>, Option<&'a Value>)> {
    let mut used = vec![false; before.len()];
    let mut out: Vec<(Option<&Value>, Option<&Value>)> = Vec::new();
    let mut pending = Vec::new();
    for (i, a) in after.iter().enumerate() {
        let key = exact(a);
        match (0..before.len()).find(|&j| !used[j] && exact(&before[j]) == key) {
            Some(j) => {
                used[j] = true;
                out.push((Some(&before[j]), Some(a)));
            }
            None => {
                // (index in `after`, index in `out`) for the loose pass.
                pending.push((i, out.len()));
                out.push((None, Some(a)));
            }
        }
    }
    if let Some(loose) = loose {
        for (i, slot) in pending {
            let key = loose(&after[i]);
            let candidates: Vec<usize> = (0..before.len())
                .filter(|&j| !used[j] && loose(&before[j]) == key)
                .collect();
            let rivals = after.iter().filter(|a| loose(a) == key).count();
            if let ([j], 1) = (candidates.as_slice(), rivals) {
                used[*j] = true;
                out[slot].0 = Some(&before[*j]);
            }
        }
    }
    out.extend(
        before
            .iter()
            .zip(&used)
            .filter(|(_, u)| !**u)
            .map(|(b, _)| (Some(b), None)),
    );
    out
}

fn title(t: &Value) -> String {
    t["title"].as_str().unwrap_or("").to_owned()
}

/// The tables of one benchmark paired across the runs.
pub fn pair_tables<'a>(
    before: Option<&'a Value>,
    after: Option<&'a Value>,
) -> Vec<(Option<&'a Value>, Option<&'a Value>)> {
    let loose = |t: &Value| shape(&title(t));
    pair(tables(before), tables(after), title, Some(&loose))
}

/// The rows of one table paired across the runs (by exact metric label).
pub fn pair_rows<'a>(
    before: Option<&'a Value>,
    after: Option<&'a Value>,
) -> Vec<(Option<&'a Value>, Option<&'a Value>)> {
    pair(
        rows(before),
        rows(after),
        |r| r["name"].as_str().unwrap_or("").to_owned(),
        None,
    )
}

/// Median of a row's `value` (or `ratio`) summary; `None` when the row has none.
fn median(row: Option<&Value>, field: &str) -> Option<f64> {
    row?[field]["median"].as_f64().filter(|v| v.is_finite())
}

/// Signed, with a real minus sign.
fn signed(x: f64) -> String {
    if x < 0.0 {
        format!("−{}", num(-x))
    } else {
        format!("+{}", num(x))
    }
}

/// "−112 (0.38×)": after − before, and after / before when both are positive; the Δ alone
/// for rows that are ratios already (unit "×").
pub fn change(before: Option<&Value>, after: Option<&Value>) -> String {
    let (Some(b), Some(a)) = (median(before, "value"), median(after, "value")) else {
        return "–".into();
    };
    let ratio_unit = after.is_some_and(|r| r["unit"] == "×");
    if ratio_unit || b <= 0.0 || a < 0.0 {
        signed(a - b)
    } else {
        format!("{} ({}×)", signed(a - b), num(a / b))
    }
}

fn med_cell(row: Option<&Value>, field: &str) -> String {
    median(row, field).map_or_else(|| "–".into(), num)
}

/// "✅", "❌", "" (no verdict) or "–" (no such row).
pub fn met(row: Option<&Value>) -> &'static str {
    match row.map(|r| r["met"].as_bool()) {
        None => "–",
        Some(Some(true)) => "✅",
        Some(Some(false)) => "❌",
        Some(None) => "",
    }
}

/// The before and after medians of a row's value.
pub fn values(before: Option<&Value>, after: Option<&Value>) -> (String, String) {
    (med_cell(before, "value"), med_cell(after, "value"))
}

/// "4.29 → 1.20× vs B1 hit …", or "–" when neither row has a ratio.
pub fn ratios(before: Option<&Value>, after: Option<&Value>) -> String {
    let (b, a) = (median(before, "ratio"), median(after, "ratio"));
    if b.is_none() && a.is_none() {
        return "–".into();
    }
    let reference = after
        .or(before)
        .and_then(|r| r["reference"].as_str())
        .unwrap_or("");
    let show = |v: Option<f64>| v.map_or_else(|| "–".into(), num);
    format!("{} → {}× vs {reference}", show(b), show(a))
}

/// Where a goal's figure comes from.
enum Rows {
    /// These rows, one figure each, shown "a / b / c".
    Each(&'static [&'static str]),
    /// Every row whose name starts with this, shown as their min–max.
    Range(&'static str),
}

/// One line of the goal table of issue #12.
struct Goal {
    measure: &'static str,
    /// Benchmark id and the start of the table title.
    id: &'static str,
    table: &'static str,
    rows: Rows,
    /// Use the row's ratio summary instead of its value.
    ratio: bool,
    unit: &'static str,
    goal: &'static str,
    pass: fn(f64) -> bool,
}

/// The rows of issue #12's goal table (its "today" column is the 2026-11-23 run), with
/// where each figure is in a results file.
const GOALS: &[Goal] = &[
    Goal {
        measure: "B1 miss over noop (IPv4 / IPv6)",
        id: "B1",
        table: "hot:",
        rows: Rows::Each(&["miss IPv4, over noop", "miss IPv6, over noop"]),
        ratio: false,
        unit: "ns",
        goal: "≤ 25 ns",
        pass: |v| v <= 25.0,
    },
    Goal {
        measure: "B1 hit over noop, established flow (IPv4 / IPv6)",
        id: "B1",
        table: "hot:",
        rows: Rows::Each(&["hit IPv4, over noop", "hit IPv6, over noop"]),
        ratio: false,
        unit: "ns",
        goal: "≤ 60 ns",
        pass: |v| v <= 60.0,
    },
    Goal {
        measure: "B1 hit that creates a flow (SYN)",
        id: "B1",
        table: "spread:",
        rows: Rows::Each(&["hit IPv4 with flow-table insert (new flow per packet), over noop"]),
        ratio: false,
        unit: "ns",
        goal: "≤ 250 ns",
        pass: |v| v <= 250.0,
    },
    Goal {
        measure: "reply program per packet (B3, every lane and load)",
        id: "B3",
        table: "ns per packet inside the kernel",
        rows: Rows::Range("viscum_reply in "),
        ratio: false,
        unit: "ns",
        goal: "≤ 120 ns",
        pass: |v| v <= 120.0,
    },
    Goal {
        measure: "B2 spread hit, 1M vs 1 entry",
        id: "B2",
        table: "spread:",
        rows: Rows::Each(&["hit IPv4, 1M entries, over noop"]),
        ratio: true,
        unit: "×",
        goal: "≤ 2.0×",
        pass: |v| v <= 2.0,
    },
    Goal {
        measure: "B3 in-kernel under CRR / RR / bulk, over B1 hit",
        id: "B3",
        table: "viscum_ingress net of the bench_noop",
        rows: Rows::Each(&[
            "viscum_ingress − bench_noop, viscum, CRR",
            "viscum_ingress − bench_noop, viscum, RR",
            "viscum_ingress − bench_noop, viscum, bulk",
        ]),
        ratio: true,
        unit: "×",
        goal: "≤ 1.5×",
        pass: |v| v <= 1.5,
    },
    Goal {
        measure: "B5 viscum / hook",
        id: "B5",
        table: "ratios of connections/s",
        rows: Rows::Each(&["viscum / hook"]),
        ratio: false,
        unit: "×",
        goal: "≥ 0.97",
        pass: |v| v >= 0.97,
    },
    Goal {
        measure: "B6 viscum / hook, raw",
        id: "B6",
        table: "ratios (per round)",
        rows: Rows::Each(&["viscum / hook, raw"]),
        ratio: false,
        unit: "×",
        goal: "≥ 0.97",
        pass: |v| v >= 0.97,
    },
    Goal {
        measure: "B4 viscum / tc-mirred",
        id: "B4",
        table: "ratios of transactions/s",
        rows: Rows::Each(&["viscum / tc-mirred"]),
        ratio: false,
        unit: "×",
        goal: "≥ 1.0",
        pass: |v| v >= 1.0,
    },
    Goal {
        measure: "B5 viscum / tc-mirred",
        id: "B5",
        table: "ratios of connections/s",
        rows: Rows::Each(&["viscum / tc-mirred"]),
        ratio: false,
        unit: "×",
        goal: "≥ 1.0",
        pass: |v| v >= 1.0,
    },
    Goal {
        measure: "B6 viscum / tc-mirred, per core",
        id: "B6",
        table: "ratios (per round)",
        rows: Rows::Each(&["viscum / tc-mirred, per core"]),
        ratio: false,
        unit: "×",
        goal: "≥ 1.0",
        pass: |v| v >= 1.0,
    },
    Goal {
        measure: "B7 CLI time-to-effect (`viscum redirect add`)",
        id: "B7",
        table: "time to effect",
        rows: Rows::Each(&["viscum redirect add → first connection served locally"]),
        ratio: false,
        unit: "ms",
        goal: "< 1 ms",
        pass: |v| v < 1.0,
    },
];

/// Fewest packets per run for a B3 program row to speak for the lane's traffic: below it the
/// program is not on the lane's path and saw only stray packets (the reply program on the
/// strict-cloud lane, whose namespace's own neighbour traffic is a packet now and then, each
/// cache-cold: one packet of 2.7 µs in one round of five made "every lane" read 2,724 ns).
/// The benchmark applies the same floor when it writes B3 (`MIN_PACKETS_PER_RUN` in
/// `viscum-bench/benches/system/traffic.rs`); this one also reads results written before it.
const B3_MIN_PACKETS_PER_RUN: f64 = 100.0;

/// Whether B3 row `name` ("PROG in LANE, BENCH") saw at least [`B3_MIN_PACKETS_PER_RUN`]
/// packets per run, from the fragment's raw `BENCH/LANE/PROG` (`[run_time_ns, run_cnt]` per
/// round); rows of other benchmarks, or without raw counts, count.
fn on_path(frag: Option<&Value>, name: &str) -> bool {
    let Some((prog, rest)) = name.split_once(" in ") else {
        return true;
    };
    let Some((lane, bench)) = rest.rsplit_once(", ") else {
        return true;
    };
    let Some(rounds) = frag
        .and_then(|f| f["raw"][format!("{bench}/{lane}/{prog}")].as_array())
        .filter(|r| !r.is_empty())
    else {
        return true;
    };
    let packets: f64 = rounds.iter().filter_map(|r| r[1].as_f64()).sum();
    packets / rounds.len() as f64 >= B3_MIN_PACKETS_PER_RUN
}

/// One run's figure for a goal: the cell text and the verdict (`None` when a figure is
/// missing and none of the others fails).
fn figure(doc: &Value, g: &Goal) -> (String, Option<bool>) {
    let table = tables(fragment(doc, g.id))
        .iter()
        .find(|t| t["title"].as_str().is_some_and(|s| s.starts_with(g.table)));
    let field = if g.ratio { "ratio" } else { "value" };
    let all = rows(table);
    let picked: Vec<Option<f64>> = match g.rows {
        Rows::Each(names) => names
            .iter()
            .map(|n| median(all.iter().find(|r| r["name"] == *n), field))
            .collect(),
        Rows::Range(prefix) => {
            let frag = fragment(doc, g.id);
            let v: Vec<Option<f64>> = all
                .iter()
                .filter(|r| r["name"].as_str().is_some_and(|s| s.starts_with(prefix)))
                .filter(|r| on_path(frag, r["name"].as_str().unwrap_or_default()))
                .map(|r| median(Some(r), field))
                .collect();
            if v.is_empty() { vec![None] } else { v }
        }
    };
    let fails = picked.iter().flatten().any(|v| !(g.pass)(*v));
    let verdict = if fails {
        Some(false)
    } else if picked.iter().all(Option::is_some) {
        Some(true)
    } else {
        None
    };
    let unit = |s: String| match g.unit {
        "×" => format!("{s}×"),
        u => format!("{s} {u}"),
    };
    let text = match g.rows {
        Rows::Each(_) => {
            if picked.iter().all(Option::is_none) {
                "–".into()
            } else if g.unit == "×" {
                picked
                    .iter()
                    .map(|v| v.map_or_else(|| "–".into(), |v| unit(num(v))))
                    .collect::<Vec<_>>()
                    .join(" / ")
            } else {
                unit(
                    picked
                        .iter()
                        .map(|v| v.map_or_else(|| "–".into(), num))
                        .collect::<Vec<_>>()
                        .join(" / "),
                )
            }
        }
        Rows::Range(_) => {
            let known: Vec<f64> = picked.iter().flatten().copied().collect();
            let lo = known.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = known.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            match known.len() {
                0 => "–".into(),
                1 => unit(num(lo)),
                n => format!("{} ({n} rows)", unit(format!("{}–{}", num(lo), num(hi)))),
            }
        }
    };
    (text, verdict)
}

fn verdict(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "✅",
        Some(false) => "❌",
        None => "–",
    }
}

/// "## Issue #12 goals, before → after": one line per goal of the issue.
pub fn goals(before: Run<'_>, after: Run<'_>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Issue #12 goals, before → after\n\n\
         Before: {}; after: {} (the runs named above). The goals are those of issue #12 \
         (\"Datapath v3\"); each figure is its run's median of the row named in the \
         benchmark's table below. A line is met when every figure in it meets the goal; \
         \"–\": the run has no such row.\n",
        before.short(),
        after.short(),
    );
    let _ = writeln!(
        s,
        "| measure | before | after | goal | met before | met after |\n|---|---:|---:|---|:---:|:---:|"
    );
    for g in GOALS {
        let (b, bm) = figure(before.doc, g);
        let (a, am) = figure(after.doc, g);
        let _ = writeln!(
            s,
            "| {} | {b} | {a} | {} | {} | {} |",
            g.measure,
            g.goal,
            verdict(bm),
            verdict(am)
        );
    }
    let met = |doc: &Value| {
        let verdicts: Vec<Option<bool>> = GOALS.iter().map(|g| figure(doc, g).1).collect();
        let met = verdicts.iter().filter(|v| **v == Some(true)).count();
        match verdicts.iter().filter(|v| v.is_none()).count() {
            0 => format!("{met} / {}", GOALS.len()),
            open => format!("{met} / {} ({open} without a figure)", GOALS.len()),
        }
    };
    let _ = writeln!(
        s,
        "\nGoals met: {} before, {} after. Sources: B1 hot table (miss, established hit), \
         B1 spread table (SYN), B3 raw table (every `viscum_reply` row), B2 spread table (ratio of \
         the 1M row to 1 entry), B3 judged table (ratios to B1 hit), the ratio tables of B4–B6, \
         B7 time to effect.\n",
        met(before.doc),
        met(after.doc),
    );
    s
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn row(name: &str, median: f64, met: Option<bool>) -> Value {
        json!({ "name": name, "unit": "ns", "met": met,
                "value": { "median": median, "min": median, "max": median, "n": 1 } })
    }

    #[test]
    fn tables_pair_exactly_then_by_shape_and_leftovers_follow() {
        let before = json!({ "tables": [
            { "title": "hot: 9 rounds", "rows": [] },
            { "title": "gone", "rows": [] },
            { "title": "spread: 4096 flows", "rows": [] },
        ]});
        let after = json!({ "tables": [
            { "title": "spread: 4096 flows", "rows": [] },
            { "title": "hot: 3 rounds", "rows": [] },
            { "title": "new", "rows": [] },
        ]});
        let p = pair_tables(Some(&before), Some(&after));
        let titles: Vec<(String, String)> = p
            .iter()
            .map(|(b, a)| (b.map_or("-".into(), title), a.map_or("-".into(), title)))
            .collect();
        assert_eq!(
            titles,
            [
                ("spread: 4096 flows".into(), "spread: 4096 flows".into()),
                ("hot: 9 rounds".into(), "hot: 3 rounds".into()),
                ("-".into(), "new".into()),
                ("gone".into(), "-".into()),
            ]
        );
    }

    /// A program that saw only stray packets on a lane (fewer than the minimum per run) is
    /// left out of a goal's range; the lanes it serves count.
    #[test]
    fn a_goal_range_leaves_out_programs_off_the_lanes_path() {
        let doc = json!({ "fragments": [{ "id": "B3",
            "raw": {
                "bulk/strict-edge/viscum_reply": [[441_000, 1000], [450_000, 1000]],
                "bulk/strict-cloud/viscum_reply": [[0, 0], [2724, 1]],
            },
            "tables": [{ "title": "ns per packet inside the kernel, by program", "rows": [
                row("viscum_reply in strict-edge, bulk", 441.0, None),
                row("viscum_reply in strict-cloud, bulk", 2724.0, None),
            ]}],
        }]});
        let goal = GOALS
            .iter()
            .find(|g| matches!(g.rows, Rows::Range(_)))
            .unwrap();
        let (text, verdict) = figure(&doc, goal);
        assert_eq!(text, "441 ns");
        assert_eq!(verdict, Some(false));
    }

    #[test]
    fn ambiguous_shapes_do_not_pair() {
        let before =
            json!({ "tables": [{ "title": "x 1", "rows": [] }, { "title": "x 2", "rows": [] }] });
        let after = json!({ "tables": [{ "title": "x 3", "rows": [] }] });
        let p = pair_tables(Some(&before), Some(&after));
        assert_eq!(p.len(), 3);
        assert!(p[0].0.is_none());
    }

    #[test]
    fn rows_pair_by_exact_name_only() {
        let b = json!({ "rows": [row("hit, 1k entries", 1.0, None), row("hit, 1M entries", 2.0, None)] });
        let a = json!({ "rows": [row("hit, 1M entries", 3.0, None), row("hit, 100k entries", 4.0, None)] });
        let p = pair_rows(Some(&b), Some(&a));
        let names: Vec<(Option<f64>, Option<f64>)> = p
            .iter()
            .map(|(b, a)| (median(*b, "value"), median(*a, "value")))
            .collect();
        assert_eq!(
            names,
            [(Some(2.0), Some(3.0)), (None, Some(4.0)), (Some(1.0), None)]
        );
    }

    #[test]
    fn change_is_delta_and_ratio() {
        let b = row("m", 180.0, None);
        let a = row("m", 45.0, None);
        assert_eq!(change(Some(&b), Some(&a)), "−135 (0.250×)");
        assert_eq!(change(None, Some(&a)), "–");
        let mut r = row("m", 0.95, None);
        r["unit"] = json!("×");
        let mut r2 = row("m", 1.0, None);
        r2["unit"] = json!("×");
        assert_eq!(change(Some(&r), Some(&r2)), "+0.050");
    }

    fn doc(miss4: f64, miss6: Option<f64>) -> Value {
        let mut rows = vec![row("miss IPv4, over noop", miss4, None)];
        if let Some(m) = miss6 {
            rows.push(row("miss IPv6, over noop", m, None));
        }
        json!({ "fragments": [{ "id": "B1", "tables": [{ "title": "hot: one packet", "rows": rows }] }] })
    }

    #[test]
    fn goal_figures_and_verdicts() {
        let g = &GOALS[0];
        assert_eq!(
            figure(&doc(20.0, Some(24.0)), g),
            ("20.0 / 24.0 ns".into(), Some(true))
        );
        assert_eq!(
            figure(&doc(20.0, Some(39.0)), g),
            ("20.0 / 39.0 ns".into(), Some(false))
        );
        assert_eq!(figure(&doc(20.0, None), g), ("20.0 / – ns".into(), None));
        assert_eq!(
            figure(&doc(30.0, None), g),
            ("30.0 / – ns".into(), Some(false))
        );
        assert_eq!(figure(&json!({}), g), ("–".into(), None));
    }

    #[test]
    fn range_goal_spans_every_matching_row() {
        let d = json!({ "fragments": [{ "id": "B3", "tables": [{
            "title": "ns per packet inside the kernel, by program",
            "rows": [row("viscum_reply in viscum, CRR", 503.0, None),
                     row("viscum_ingress in viscum, CRR", 900.0, None),
                     row("viscum_reply in viscum, RR", 689.0, None)] }] }] });
        let g = GOALS
            .iter()
            .find(|g| matches!(g.rows, Rows::Range(_)))
            .unwrap();
        assert_eq!(figure(&d, g), ("503–689 ns (2 rows)".into(), Some(false)));
    }
}
