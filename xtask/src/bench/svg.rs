//! Hand-written SVG for the three plot kinds the benchmarks emit (no plotting dependency in
//! xtask, which must build before anything else is installed):
//!
//! * `bars`: one horizontal bar per variant (median) with a min–max whisker;
//! * `lines`: series of (x, y) points, x optionally logarithmic (scaling curves);
//! * `cdf`: latency against percentile, the percentile axis stretched towards the tail
//!   (p50, p90, p99, p99.9 equally spaced) and the latency axis optionally logarithmic.

use std::fmt::Write as _;

use serde_json::Value;

const PALETTE: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];
const WIDTH: f64 = 760.0;
const FONT: &str = "font-family=\"sans-serif\" font-size=\"12\"";
const TITLE_FONT: &str = "font-family=\"sans-serif\" font-size=\"14\" font-weight=\"bold\"";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Short number for axes and labels.
pub fn num(x: f64) -> String {
    let a = x.abs();
    if !x.is_finite() {
        "–".into()
    } else if a >= 1e6 {
        format!("{:.3}M", x / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if x == x.trunc() {
        format!("{x:.0}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// Label of the power of ten 10^e: 1, 10, 100, 1k, 10k, 100k, 1M, …; 0.1, 0.01 below one.
fn pow10(e: i32) -> String {
    match e {
        e if e < 0 => format!("{}", 10f64.powi(e)),
        0..=2 => format!("{}", 10i64.pow(e as u32)),
        3..=5 => format!("{}k", 10i64.pow(e as u32 - 3)),
        6..=8 => format!("{}M", 10i64.pow(e as u32 - 6)),
        e => format!("1e{e}"),
    }
}

/// Renders one plot; `None` when it has no data.
pub fn render(plot: &Value) -> Option<String> {
    match plot["kind"].as_str()? {
        "bars" => bars(plot),
        "lines" => lines(plot, false),
        "cdf" => lines(plot, true),
        _ => None,
    }
}

fn head(w: f64, h: f64, title: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" {TITLE_FONT}>{}</text>\n",
        w / 2.0,
        esc(title)
    );
    s
}

/// Nice tick positions covering 0..=max.
fn ticks(max: f64) -> Vec<f64> {
    if max <= 0.0 || !max.is_finite() {
        return vec![0.0];
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| max / s <= 6.0)
        .unwrap_or(mag * 10.0);
    (0..=((max / step).ceil() as usize))
        .map(|i| i as f64 * step)
        .collect()
}

fn bars(plot: &Value) -> Option<String> {
    let bars = plot["bars"].as_array()?;
    if bars.is_empty() {
        return None;
    }
    let unit = plot["unit"].as_str().unwrap_or("");
    // Room for the longest label (about 6.6 px per character at 12 px).
    let longest = bars
        .iter()
        .filter_map(|b| b["label"].as_str())
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(0);
    let left = (6.6 * longest as f64 + 16.0).max(120.0);
    let right = 90.0;
    let width = (left + 440.0 + right).max(WIDTH);
    let row = 24.0;
    let top = 40.0;
    let h = top + row * bars.len() as f64 + 50.0;
    let get = |b: &Value, k: &str| b[k].as_f64().unwrap_or(f64::NAN);
    let max = bars
        .iter()
        .map(|b| get(b, "max").max(get(b, "median")))
        .filter(|x| x.is_finite())
        .fold(0.0, f64::max);
    let min = bars
        .iter()
        .map(|b| get(b, "min").min(get(b, "median")))
        .filter(|x| x.is_finite())
        .fold(0.0, f64::min);
    let ts = ticks(max.max(-min));
    let hi = *ts.last().unwrap_or(&1.0);
    let lo = if min < 0.0 { -hi } else { 0.0 };
    let plot_w = width - left - right;
    let x = |v: f64| left + (v - lo) / (hi - lo).max(f64::MIN_POSITIVE) * plot_w;
    let mut s = head(width, h, plot["title"].as_str().unwrap_or(""));
    let axis_y = top + row * bars.len() as f64;
    for t in &ts {
        let _ = writeln!(
            s,
            "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{axis_y}\" stroke=\"#ddd\"/>",
            x(*t)
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" {FONT}>{}</text>",
            x(*t),
            axis_y + 16.0,
            num(*t)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" {FONT}>{}</text>",
        left + plot_w / 2.0,
        axis_y + 36.0,
        esc(unit)
    );
    for (i, b) in bars.iter().enumerate() {
        let y = top + row * i as f64;
        let (m, mn, mx) = (get(b, "median"), get(b, "min"), get(b, "max"));
        let label = b["label"].as_str().unwrap_or("");
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" {FONT}>{}</text>",
            left - 8.0,
            y + row * 0.65,
            esc(label)
        );
        if !m.is_finite() {
            continue;
        }
        let (x0, x1) = (x(0.0_f64.max(lo)), x(m));
        let _ = writeln!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\" opacity=\"0.8\"/>",
            x0.min(x1),
            y + 4.0,
            (x1 - x0).abs(),
            row - 8.0,
            PALETTE[i % PALETTE.len()]
        );
        if mn.is_finite() && mx.is_finite() {
            let cy = y + row / 2.0;
            let _ = writeln!(
                s,
                "<line x1=\"{:.1}\" y1=\"{cy:.1}\" x2=\"{:.1}\" y2=\"{cy:.1}\" stroke=\"black\"/>",
                x(mn),
                x(mx)
            );
            for v in [mn, mx] {
                let _ = writeln!(
                    s,
                    "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"black\"/>",
                    x(v),
                    cy - 5.0,
                    cy + 5.0
                );
            }
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" {FONT}>{}</text>",
            x(m.max(mx)) + 6.0,
            y + row * 0.65,
            num(m)
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{axis_y}\" stroke=\"black\"/>",
        x(0.0_f64.max(lo))
    );
    s.push_str("</svg>\n");
    Some(s)
}

/// Percentile axis transform: -log10(1 - q), so p50, p90, p99, p99.9 are evenly spaced.
fn tail(q: f64) -> f64 {
    -(1.0 - q.min(0.99995)).log10()
}

fn lines(plot: &Value, cdf: bool) -> Option<String> {
    let series = plot["series"].as_array()?;
    let pts: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| {
            let name = s["name"].as_str().unwrap_or("").to_owned();
            let p = s["points"]
                .as_array()
                .map(|v| {
                    v.iter()
                        .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
                        // CDF points arrive as (value, quantile): plot percentile across, value up.
                        .map(|(a, b)| if cdf { (tail(b), a) } else { (a, b) })
                        .filter(|(a, b)| a.is_finite() && b.is_finite())
                        .collect()
                })
                .unwrap_or_default();
            (name, p)
        })
        .filter(|(_, p): &(String, Vec<(f64, f64)>)| !p.is_empty())
        .collect();
    if pts.is_empty() {
        return None;
    }
    // For a CDF, log_x in the data means a logarithmic *value* axis, which is vertical here.
    let log_x = !cdf && plot["log_x"].as_bool().unwrap_or(false);
    let log_y = if cdf {
        plot["log_x"].as_bool().unwrap_or(false)
    } else {
        plot["log_y"].as_bool().unwrap_or(false)
    };
    let longest = pts
        .iter()
        .map(|(n, _)| n.chars().count())
        .max()
        .unwrap_or(0) as f64;
    let (left, right, top, bottom) = (70.0, (7.0 * longest + 50.0).max(120.0), 40.0, 55.0);
    let h = 420.0;
    let (pw, ph) = (WIDTH - left - right, h - top - bottom);
    let all: Vec<(f64, f64)> = pts.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let fx = |v: f64| if log_x { v.max(1e-12).log10() } else { v };
    let fy = |v: f64| if log_y { v.max(1e-12).log10() } else { v };
    let (mut x0, mut x1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| {
        (a.min(fx(*x)), b.max(fx(*x)))
    });
    let (mut y0, mut y1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| {
        (a.min(fy(*y)), b.max(fy(*y)))
    });
    if cdf {
        x0 = 0.0;
        x1 = x1.max(tail(0.999));
    }
    if log_x {
        x0 = x0.floor();
        x1 = x1.ceil().max(x0 + 1.0);
    } else if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if log_y {
        y0 = y0.floor();
        y1 = y1.ceil().max(y0 + 1.0);
    } else {
        y0 = y0.min(0.0);
        let t = ticks(y1);
        y1 = *t.last().unwrap_or(&1.0);
    }
    // Both scales take values already transformed (log10 where the axis is logarithmic).
    let sx = |v: f64| left + (v - x0) / (x1 - x0) * pw;
    let sy = |v: f64| top + ph - (v - y0) / (y1 - y0).max(f64::MIN_POSITIVE) * ph;
    let mut s = head(WIDTH, h, plot["title"].as_str().unwrap_or(""));
    // Grid and ticks.
    let xt: Vec<(f64, String)> = if cdf {
        [
            (0.5, "p50"),
            (0.9, "p90"),
            (0.99, "p99"),
            (0.999, "p99.9"),
            (0.9999, "p99.99"),
        ]
        .iter()
        .filter(|(q, _)| tail(*q) <= x1 + 1e-9)
        .map(|(q, l)| (tail(*q), l.to_string()))
        .chain(std::iter::once((0.0, "p0".to_string())))
        .collect()
    } else if log_x {
        (x0 as i32..=x1 as i32)
            .map(|e| (f64::from(e), pow10(e)))
            .collect()
    } else {
        ticks(x1)
            .into_iter()
            .filter(|t| *t >= x0)
            .map(|t| (t, num(t)))
            .collect()
    };
    for (v, label) in &xt {
        let _ = writeln!(
            s,
            "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"#ddd\"/>",
            sx(*v),
            top + ph
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" {FONT}>{}</text>",
            sx(*v),
            top + ph + 16.0,
            esc(label)
        );
    }
    let yt: Vec<(f64, String)> = if log_y {
        (y0 as i32..=y1 as i32)
            .map(|e| (f64::from(e), pow10(e)))
            .collect()
    } else {
        ticks(y1).into_iter().map(|t| (t, num(t))).collect()
    };
    for (v, label) in &yt {
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/>",
            sy(*v),
            left + pw
        );
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" {FONT}>{}</text>",
            left - 6.0,
            sy(*v) + 4.0,
            esc(label)
        );
    }
    let _ = writeln!(
        s,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"black\"/>"
    );
    let (xl, yl) = if cdf {
        (
            "percentile".to_owned(),
            plot["unit"].as_str().unwrap_or("").to_owned(),
        )
    } else {
        (
            plot["x_label"].as_str().unwrap_or("").to_owned(),
            plot["y_label"].as_str().unwrap_or("").to_owned(),
        )
    };
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" {FONT}>{}</text>",
        left + pw / 2.0,
        h - 14.0,
        esc(&xl)
    );
    let _ = writeln!(
        s,
        "<text x=\"16\" y=\"{0}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {0})\" {FONT}>{1}</text>",
        top + ph / 2.0,
        esc(&yl)
    );
    for (i, (name, p)) in pts.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let path: Vec<String> = p
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(fx(*x)), sy(fy(*y))))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        if !cdf {
            for (x, y) in p {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>",
                    sx(fx(*x)),
                    sy(fy(*y))
                );
            }
        }
        let ly = top + 14.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            "<line x1=\"{0}\" y1=\"{ly}\" x2=\"{1}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"/>",
            left + pw + 10.0,
            left + pw + 30.0
        );
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" {FONT}>{}</text>",
            left + pw + 36.0,
            ly + 4.0,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    Some(s)
}
