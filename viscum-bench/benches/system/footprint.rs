//! B9: footprint.
//!
//! * Binary size: the `viscum` binary cargo built for this bench (release profile settings:
//!   LTO, opt-level "z", stripped), and every `target/dist/viscum-<triple>` that
//!   `cargo xtask dist` left (static musl where the target is installed), with whether each is
//!   statically linked (no ELF interpreter).
//! * Daemon RSS: `viscum run` attached to one interface with no services (idle), and with 100
//!   services (each an identity server in its own namespace, redirected while healthy).
//! * CLI peak RSS (`wait4` maxrss) of `viscum stats --json` and `viscum status --json`
//!   against the 100-service daemon.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use viscum_lab::Netns;

use crate::{
    daemon::{Daemon, ServiceDef},
    lanes::Env,
    support::{
        cli::Args,
        netns::{self, remove_namespace},
        report::{Bar, Fragment, Plot, Row, Table},
        sys,
    },
    tools::IDENT_PORT,
};

const B9: (&str, &str) = ("B9", "Footprint: memory and binary size");
const MIB: f64 = 1024.0 * 1024.0;

pub fn run(args: &Args, env: &Env<'_>) -> Vec<Fragment> {
    let mut f = Fragment::new(B9.0, B9.1);
    let mut tables = Vec::new();
    tables.push(Table {
        title: "binary size (stripped)".into(),
        rows: sizes(env),
    });
    match rss(args, env, &mut f) {
        Ok(rows) => tables.push(Table {
            title: "memory".into(),
            rows,
        }),
        Err(e) => tables.push(Table {
            title: "memory".into(),
            rows: vec![Row::failed("daemon RSS", format!("{e:#}"))],
        }),
    }
    f.tables = tables;
    let bars: Vec<Bar> = f
        .tables
        .iter()
        .flat_map(|t| &t.rows)
        .filter(|r| r.unit == "MiB")
        .filter_map(Bar::from_row)
        .collect();
    f.plots.push(Plot::Bars {
        file: "b9-footprint".into(),
        title: "B9: sizes and resident memory".into(),
        unit: "MiB".into(),
        bars,
    });
    vec![f.finish()]
}

/// `Some(true)` when the ELF file (32- or 64-bit, either byte order) has no PT_INTERP
/// program header, i.e. is statically linked.
fn is_static(path: &Path) -> Option<bool> {
    let b = std::fs::read(path).ok()?;
    if b.len() < 52 || &b[..4] != b"\x7fELF" {
        return None;
    }
    let wide = b[4] == 2;
    let le = b[5] == 1;
    let u16_at = |o: usize| {
        let a = [*b.get(o)?, *b.get(o + 1)?];
        Some(if le {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        })
    };
    let u32_at = |o: usize| {
        let a = [*b.get(o)?, *b.get(o + 1)?, *b.get(o + 2)?, *b.get(o + 3)?];
        Some(if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        })
    };
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b.get(o..o + 8)?);
        Some(if le {
            u64::from_le_bytes(a)
        } else {
            u64::from_be_bytes(a)
        })
    };
    let (phoff, phentsize, phnum) = if wide {
        (
            u64_at(0x20)? as usize,
            usize::from(u16_at(0x36)?),
            usize::from(u16_at(0x38)?),
        )
    } else {
        (
            u32_at(0x1c)? as usize,
            usize::from(u16_at(0x2a)?),
            usize::from(u16_at(0x2c)?),
        )
    };
    for i in 0..phnum {
        if u32_at(phoff + i * phentsize)? == 3 {
            return Some(false);
        }
    }
    Some(true)
}

/// A binary's size; `budget`: judged against the 5 MiB of a release target (the lean router
/// builds of `cargo xtask dist`), or only reported (`None`, with why).
fn size_row(name: &str, path: &Path, budget: Result<(), &str>) -> Row {
    match std::fs::metadata(path) {
        Ok(m) => {
            let kind = match is_static(path) {
                Some(true) => "static",
                Some(false) => "dynamic",
                None => "not an ELF file",
            };
            let row = Row::new(name, "MiB", vec![m.len() as f64 / MIB]);
            let row = match budget {
                Ok(()) => row.target_value("≤ 5 MiB", |v| v <= 5.0),
                Err(why) => row.note(why.to_owned()),
            };
            row.note(format!("{kind}, {} bytes, {}", m.len(), path.display()))
        }
        Err(e) => Row::failed(name, format!("{}: {e}", path.display())),
    }
}

fn sizes(env: &Env<'_>) -> Vec<Row> {
    // The host build has the default features, the fleet agent among them (NATS, TLS): the
    // budget is the router's, for what `cargo xtask dist` builds for it.
    let mut rows = vec![size_row(
        "viscum (host, release profile as built for this bench)",
        &env.viscum.bin,
        Err(
            "default features (the fleet agent included); the 5 MiB budget is the release targets'",
        ),
    )];
    let dist = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dist");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dist)
        .map(|rd| {
            rd.filter_map(std::result::Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("viscum-"))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    if found.is_empty() {
        rows.push(Row::new(
            "target/dist: none (a full `cargo xtask bench` runs `cargo xtask dist` first)",
            "",
            Vec::new(),
        ));
    }
    for p in found {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let age = std::fs::metadata(&p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        // `dist --fleet` builds are the opt-in variant with the fleet agent (docs/router-builds.md):
        // reported beside the lean build of the same target, which carries the budget.
        let budget = if name.starts_with("viscum-fleet-") {
            Err(
                "the opt-in fleet variant (`cargo xtask dist --fleet`); the budget is the lean build's",
            )
        } else {
            Ok(())
        };
        let mut row = size_row(&format!("{name} (cargo xtask dist)"), &p, budget);
        if let Some(a) = age {
            row = row.note(format!("built {:.0} min ago", a.as_secs_f64() / 60.0));
        }
        rows.push(row);
    }
    rows
}

fn rss(args: &Args, env: &Env<'_>, f: &mut Fragment) -> Result<Vec<Row>> {
    let n_services: usize = args.pick(100, 100);
    let mut rows = Vec::new();
    let e = netns::with_lan0(&format!("{}-9e", env.run_id))?;

    // Idle.
    {
        let mut d = Daemon::start(env, e.name(), "b9idle", "lan0", &[])?;
        d.wait("answering", Duration::from_secs(20), |s| s["pid"].is_u64())?;
        sys::sleep(Duration::from_secs(1))?;
        let (rss, hwm) = d.rss_kib().context("cannot read the daemon's memory")?;
        rows.push(
            Row::new(
                "daemon RSS, idle (attached, no services)",
                "MiB",
                vec![rss as f64 / 1024.0],
            )
            .target_value("≤ 10 MiB", |v| v <= 10.0)
            .note(format!("peak {:.1} MiB", hwm as f64 / 1024.0)),
        );
        d.shutdown(Duration::from_secs(20));
    }
    sys::check_stop()?;

    // 100 services.
    let names: Vec<String> = (0..n_services)
        .map(|i| format!("{}-s{i:02}", env.run_id))
        .collect();
    let _guards: Vec<Netns> = names.iter().map(|n| Netns::adopt(n)).collect();
    let services: Vec<ServiceDef> = names
        .iter()
        .enumerate()
        .map(|(i, n)| ServiceDef {
            name: n.clone(),
            matches: vec![format!(
                "tcp://10.99.{}.{}:{IDENT_PORT}",
                i / 250,
                1 + i % 250
            )],
            command: vec![
                env.exe.display().to_string(),
                "__serve".into(),
                "--ident-only".into(),
            ],
            health_port: IDENT_PORT,
            interval_ms: 1000,
            timeout_ms: 500,
        })
        .collect();
    let t = Instant::now();
    let mut d = Daemon::start(env, e.name(), "b9full", "lan0", &services)?;
    let want = n_services;
    d.wait(
        &format!("{want} services redirected"),
        Duration::from_secs(180),
        |s| {
            s["services"].as_array().is_some_and(|v| {
                v.iter()
                    .filter(|x| x["redirected"].as_bool() == Some(true))
                    .count()
                    >= want
            })
        },
    )?;
    f.note(format!(
        "{n_services} services started and redirected in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    sys::sleep(Duration::from_secs(2))?;
    let (rss, hwm) = d.rss_kib().context("cannot read the daemon's memory")?;
    rows.push(
        Row::new(
            format!("daemon RSS, {n_services} services"),
            "MiB",
            vec![rss as f64 / 1024.0],
        )
        .note(format!(
            "peak {:.1} MiB; the services' own processes not included",
            hwm as f64 / 1024.0
        )),
    );
    let control = d.control.display().to_string();
    for (label, cmd) in [
        ("viscum stats --json (peak RSS)", vec!["stats", "--json"]),
        (
            "viscum status --json (peak RSS)",
            vec!["status", "--json", "--control", &control],
        ),
    ] {
        match d.cli.run(e.name(), &cmd) {
            Ok(done) => rows.push(Row::new(
                format!("{label}, {n_services} services"),
                "MiB",
                vec![done.max_rss_kib as f64 / 1024.0],
            )),
            Err(err) => rows.push(Row::failed(label, format!("{err:#}"))),
        }
    }
    d.shutdown(Duration::from_secs(60));
    for n in &names {
        remove_namespace(n);
    }
    f.raw("services", n_services);
    Ok(rows)
}
