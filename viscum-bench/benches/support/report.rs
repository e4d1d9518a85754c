//! What a benchmark hands back, as JSON: `cargo xtask bench` merges the fragments of every
//! binary into `bench/results/<date>-<kernel>.json` and renders `bench/RESULTS.md` and the
//! SVG plots from them, so the layout here is the contract between the two.
//!
//! Numbers follow `docs/benchmarks.md`: variants are interleaved round by round, a
//! row's value is the median over rounds with the min–max spread, and a ratio is computed per
//! round (A_r / B_r) before taking its median, so slow drift of a shared machine cancels.

use std::{fs, io::Write as _};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::Value;

use super::cli::Args;

/// Median, minimum and maximum of a set of samples.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    /// `None` for an empty set (a variant that never produced a sample).
    pub fn of(samples: &[f64]) -> Option<Stat> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Stat {
            median: quantile_sorted(&v, 0.5),
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        })
    }
}

/// Quantile `q` (0..=1) of sorted samples, linearly interpolated.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] * (1.0 - frac) + sorted[hi] * frac
}

/// Quantile of unsorted integer samples (sorts a copy).
pub fn quantile_u32(samples: &[u32], q: f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(|&x| f64::from(x)).collect();
    v.sort_by(f64::total_cmp);
    quantile_sorted(&v, q)
}

/// A latency distribution reduced to plot points (value, cumulative fraction), log-spaced in
/// the tail so p99 and p99.9 stay visible.
pub fn cdf_points(samples: &[f64]) -> Vec<[f64; 2]> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Vec::new();
    }
    v.sort_by(f64::total_cmp);
    let mut qs: Vec<f64> = (0..=90).map(|i| f64::from(i) / 100.0).collect();
    qs.extend([
        0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0,
    ]);
    qs.into_iter()
        .map(|q| [quantile_sorted(&v, q), q])
        .collect()
}

/// One line of a results table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured ("hit IPv4 (lookup + redirect)", "viscum", ...).
    pub name: String,
    /// Unit of `value` ("ns", "transactions/s", ...).
    pub unit: String,
    /// Median and spread over rounds of the row's headline number.
    pub value: Option<Stat>,
    /// The per-round samples behind `value`, in round order.
    pub samples: Vec<f64>,
    /// Name of the row the ratio is taken against, if any.
    pub reference: Option<String>,
    /// Per-round ratio value / reference, summarised.
    pub ratio: Option<Stat>,
    /// The target from benchmarks.md, in words ("≤ 60 ns", "≥ 1.05×").
    pub target: Option<String>,
    /// Whether the median met the target; `None` when there is no target or no data.
    pub met: Option<bool>,
    /// Anything a reader needs to interpret the row.
    pub note: Option<String>,
    /// Why the row has no data.
    pub error: Option<String>,
}

impl Row {
    pub fn new(name: impl Into<String>, unit: impl Into<String>, samples: Vec<f64>) -> Row {
        Row {
            name: name.into(),
            unit: unit.into(),
            value: Stat::of(&samples),
            samples,
            reference: None,
            ratio: None,
            target: None,
            met: None,
            note: None,
            error: None,
        }
    }

    pub fn failed(name: impl Into<String>, error: impl Into<String>) -> Row {
        let mut row = Row::new(name, "", Vec::new());
        row.error = Some(error.into());
        row
    }

    /// Ratio against `reference`, from per-round ratios.
    pub fn ratio(mut self, reference: impl Into<String>, per_round: Vec<f64>) -> Row {
        self.reference = Some(reference.into());
        self.ratio = Stat::of(&per_round);
        self
    }

    /// A target and its verdict on the value's median (`check(median)`).
    pub fn target_value(mut self, target: impl Into<String>, check: impl Fn(f64) -> bool) -> Row {
        self.target = Some(target.into());
        self.met = self.value.map(|s| check(s.median));
        self
    }

    /// A target and its verdict on the ratio's median.
    pub fn target_ratio(mut self, target: impl Into<String>, check: impl Fn(f64) -> bool) -> Row {
        self.target = Some(target.into());
        self.met = self.ratio.map(|s| check(s.median));
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Row {
        let note = note.into();
        self.note = Some(match self.note.take() {
            Some(old) => format!("{old}; {note}"),
            None => note,
        });
        self
    }
}

/// A titled table of rows.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub title: String,
    pub rows: Vec<Row>,
}

/// One named series of a plot.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub name: String,
    pub points: Vec<[f64; 2]>,
}

/// One bar of a bar chart: median with a min–max whisker.
#[derive(Debug, Clone, Serialize)]
pub struct Bar {
    pub label: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Bar {
    pub fn from_row(row: &Row) -> Option<Bar> {
        row.value.map(|s| Bar {
            label: row.name.clone(),
            median: s.median,
            min: s.min,
            max: s.max,
        })
    }
}

/// Plot data; xtask draws it as SVG (`file` is the SVG's base name).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Plot {
    Bars {
        file: String,
        title: String,
        unit: String,
        bars: Vec<Bar>,
    },
    Lines {
        file: String,
        title: String,
        x_label: String,
        y_label: String,
        log_x: bool,
        /// Logarithmic value axis (values spanning decades, e.g. µs against ms).
        log_y: bool,
        series: Vec<Series>,
    },
    Cdf {
        file: String,
        title: String,
        unit: String,
        log_x: bool,
        series: Vec<Series>,
    },
}

/// Outcome of one benchmark.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Ran, but some rows failed.
    Partial,
    Error,
    Skipped,
}

/// Everything one benchmark (B1 … B9) reports.
#[derive(Debug, Clone, Serialize)]
pub struct Fragment {
    pub id: String,
    pub title: String,
    pub status: Status,
    /// How it was measured, caveats, skipped parts.
    pub notes: Vec<String>,
    pub error: Option<String>,
    pub tables: Vec<Table>,
    pub plots: Vec<Plot>,
    /// Raw samples and parameters, for anyone who wants to recompute.
    pub raw: Value,
}

impl Fragment {
    pub fn new(id: &str, title: &str) -> Fragment {
        Fragment {
            id: id.into(),
            title: title.into(),
            status: Status::Ok,
            notes: Vec::new(),
            error: None,
            tables: Vec::new(),
            plots: Vec::new(),
            raw: Value::Object(Default::default()),
        }
    }

    pub fn failed(id: &str, title: &str, error: &anyhow::Error) -> Fragment {
        let mut f = Fragment::new(id, title);
        f.status = Status::Error;
        f.error = Some(format!("{error:#}"));
        f
    }

    pub fn skipped(id: &str, title: &str, why: impl Into<String>) -> Fragment {
        let mut f = Fragment::new(id, title);
        f.status = Status::Skipped;
        f.notes.push(why.into());
        f
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Sets `raw[key]`.
    pub fn raw(&mut self, key: &str, value: impl Serialize) {
        if let Value::Object(map) = &mut self.raw {
            map.insert(
                key.into(),
                serde_json::to_value(value).unwrap_or(Value::Null),
            );
        }
    }

    /// Marks the fragment partial when any row failed.
    pub fn finish(mut self) -> Fragment {
        if self.status == Status::Ok
            && self
                .tables
                .iter()
                .flat_map(|t| &t.rows)
                .any(|r| r.error.is_some())
        {
            self.status = Status::Partial;
        }
        self
    }
}

/// Writes the fragments where `--out` says (stdout without it) and prints a one-line summary
/// per fragment on stderr.
pub fn write(args: &Args, fragments: &[Fragment]) -> Result<()> {
    let doc = serde_json::json!({ "fragments": fragments });
    let text = serde_json::to_string_pretty(&doc)?;
    match &args.out {
        Some(path) => {
            fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        }
        None => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}")?;
        }
    }
    for f in fragments {
        eprintln!(
            "bench: {} {:?}{}",
            f.id,
            f.status,
            f.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
