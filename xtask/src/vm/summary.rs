//! The verdict on each VM and the closing summary: a table of VMs with wall
//! times, a table of verifier counts against the budget, then the reasons of
//! every failure. Also written as `target/vm/summary.json`.

use std::{fs, path::Path, time::Duration};

use anyhow::Result;
use serde_json::json;

use super::{
    budget::{self, Budgets},
    kernels::Kernel,
    matrix::Vm,
    qemu::Boot,
    report::Report,
};

/// Everything known about one VM's run.
#[derive(Debug)]
pub struct Outcome {
    pub vm: Vm,
    pub kernel: Kernel,
    /// `None` when qemu could not even be started (see `problems`).
    pub boot: Option<Boot>,
    pub budget: Vec<budget::Line>,
    /// Every reason this VM fails; empty when it passed.
    pub problems: Vec<String>,
}

impl Outcome {
    pub fn new(vm: &Vm, kernel: &Kernel, boot: Result<Boot>, budgets: &Budgets) -> Outcome {
        let mut problems = Vec::new();
        let boot = match boot {
            Ok(boot) => Some(boot),
            Err(e) => {
                problems.push(format!("could not boot: {e:#}"));
                None
            }
        };
        let mut lines = Vec::new();
        if let Some(boot) = &boot {
            problems.extend(boot.problems.iter().cloned());
            problems.extend(boot.transcript.problems());
            if let Some(report) = &boot.transcript.report {
                problems.extend(identity_problems(vm, kernel, report));
                lines = budgets.check(&vm.name, report);
                for line in lines.iter().filter(|l| l.verdict.is_failure()) {
                    problems.push(budget_problem(&vm.name, line));
                }
            }
        }
        Outcome {
            vm: vm.clone(),
            kernel: kernel.clone(),
            boot,
            budget: lines,
            problems,
        }
    }

    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }

    fn report(&self) -> Option<&Report> {
        self.boot.as_ref()?.transcript.report.as_ref()
    }
}

/// What a failed budget line means, and what to do about it.
fn budget_problem(vm: &str, line: &budget::Line) -> String {
    let program = &line.program;
    match line.verdict {
        budget::Verdict::Over => format!(
            "verifier budget: {program} took {} verified instructions, over its budget of {} \
             (tests/vm/budget.toml): the datapath change made the program harder to verify",
            opt(line.verified_insns),
            opt(line.budget)
        ),
        budget::Verdict::NoBudget => format!(
            "verifier budget: {program} has no budget for {vm}{}: add `{program} = <max \
             verified_insns>` under [budget.\"{vm}\"] in tests/vm/budget.toml",
            line.verified_insns
                .map(|n| format!(" (it took {n})"))
                .unwrap_or_default()
        ),
        budget::Verdict::NotReported => format!(
            "verifier budget: no verified_insns for {program}, budgeted at {} (this kernel \
             reports the count: did the program load? is it still part of the datapath?)",
            opt(line.budget)
        ),
        budget::Verdict::Within | budget::Verdict::Unsupported => String::new(),
    }
}

/// A report from another VM, kernel or architecture means the harness booted
/// the wrong thing: the numbers would be misattributed.
fn identity_problems(vm: &Vm, kernel: &Kernel, report: &Report) -> Vec<String> {
    let mut problems = Vec::new();
    if report.vm != vm.name {
        problems.push(format!(
            "the report names VM {:?}, not {}",
            report.vm, vm.name
        ));
    }
    if report.kernel != kernel.release {
        problems.push(format!(
            "the guest runs kernel {}, not the {} of {}",
            report.kernel, kernel.release, kernel.package
        ));
    }
    if report.arch != vm.arch.uname_machine() {
        problems.push(format!(
            "the guest is {}, not {}",
            report.arch,
            vm.arch.uname_machine()
        ));
    }
    problems
}

/// Wall times of the matrix's phases.
#[derive(Debug)]
pub struct Totals {
    pub fetch: Duration,
    pub build: Duration,
    pub boots: Duration,
    pub total: Duration,
    pub jobs: usize,
}

fn opt(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 60.0 {
        format!("{}m{:04.1}s", (s / 60.0) as u64, s % 60.0)
    } else {
        format!("{s:.1}s")
    }
}

/// Left-aligned text table with a header row.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(
        header
            .iter()
            .map(std::string::ToString::to_string)
            .collect(),
    );
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.clone()));
        out.push('\n');
    }
    out
}

/// Prints the closing summary.
pub fn print(outcomes: &[Outcome], totals: &Totals) {
    let passed = outcomes.iter().filter(|o| o.passed()).count();
    println!();
    println!(
        "==== VM matrix: {passed} of {} VMs passed; total {} (kernels {} alongside guest build {}; boots {} with {} at a time)",
        outcomes.len(),
        secs(totals.total),
        secs(totals.fetch),
        secs(totals.build),
        secs(totals.boots),
        totals.jobs
    );
    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|o| {
            let report = o.report();
            let boot = o.boot.as_ref();
            let cases = boot.map(|b| &b.transcript.cases);
            vec![
                o.vm.name.clone(),
                o.kernel.release.clone(),
                report.map_or("-".into(), |r| r.arch.clone()),
                report.map_or("-".into(), |r| {
                    r.jit.clone().unwrap_or_else(|| "none".into())
                }),
                report.map_or(
                    "-".into(),
                    |r| if r.btf { "yes".into() } else { "no".into() },
                ),
                cases.map_or("-".into(), |c| {
                    format!("{}/{}", c.iter().filter(|c| c.pass).count(), c.len())
                }),
                boot.and_then(|b| b.first_record).map_or("-".into(), secs),
                boot.map_or("-".into(), |b| secs(b.wall)),
                if o.passed() {
                    "PASS".into()
                } else {
                    "FAIL".into()
                },
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "VM",
                "kernel",
                "arch",
                "jit",
                "btf",
                "cases",
                "runner up",
                "wall",
                "result"
            ],
            &rows
        )
    );

    println!();
    println!(
        "verifier: verified_insns per program against tests/vm/budget.toml; load ms = \
         `viscum attach`'s BPF_PROG_LOAD (verifier and JIT) under TCG: compare within the table"
    );
    let mut rows = Vec::new();
    for o in outcomes {
        let programs = o
            .report()
            .map(|r| r.programs.as_slice())
            .unwrap_or_default();
        if o.budget.is_empty() {
            rows.push(vec![
                o.vm.name.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "no report".into(),
            ]);
        }
        for line in &o.budget {
            let p = programs.iter().find(|p| p.name == line.program);
            rows.push(vec![
                o.vm.name.clone(),
                line.program.clone(),
                opt(line.verified_insns),
                opt(line.budget),
                opt(p.and_then(|p| p.xlated_bytes)),
                opt(p.and_then(|p| p.jited_bytes)),
                p.and_then(|p| p.load_ms)
                    .map_or("-".to_string(), |ms| format!("{ms:.0}")),
                line.verdict.to_string(),
            ]);
        }
    }
    print!(
        "{}",
        table(
            &[
                "VM",
                "program",
                "verified_insns",
                "budget",
                "xlated B",
                "jited B",
                "load ms",
                "status"
            ],
            &rows
        )
    );

    for o in outcomes {
        println!();
        let status = if o.passed() { "PASS" } else { "FAIL" };
        println!(
            "{status} {} ({} {}, {})",
            o.vm.name, o.kernel.package, o.kernel.version, o.vm.arch
        );
        if let Some(report) = o.report()
            && !report.attach.trim().is_empty()
        {
            for (i, l) in report.attach.trim().lines().enumerate() {
                println!("  {} {l}", if i == 0 { "attach:" } else { "       " });
            }
        }
        if let Some(boot) = &o.boot {
            for case in boot.transcript.cases.iter().filter(|c| !c.pass) {
                println!(
                    "  case {} FAILED ({} ms): {}",
                    case.name, case.ms, case.detail
                );
            }
        }
        for p in &o.problems {
            println!("  - {p}");
        }
        for w in o.boot.iter().flat_map(|b| &b.warnings) {
            println!("  warning: {w}");
        }
        if let Some(boot) = &o.boot {
            if !o.passed() && !boot.tail.is_empty() {
                println!("  last console lines:");
                for l in &boot.tail {
                    println!("  | {l}");
                }
            }
            println!("  console: {}", boot.console_log.display());
        }
    }
}

/// Writes the summary as JSON (for CI artefacts and the closing note).
pub fn write_json(path: &Path, outcomes: &[Outcome], totals: &Totals) -> Result<()> {
    let vms: Vec<_> = outcomes
        .iter()
        .map(|o| {
            let boot = o.boot.as_ref();
            json!({
                "vm": o.vm.name,
                "arch": o.vm.arch.deb(),
                "package": o.kernel.package,
                "package_version": o.kernel.version,
                "release": o.kernel.release,
                "passed": o.passed(),
                "wall_s": boot.map(|b| b.wall.as_secs_f64()),
                "runner_up_s": boot.and_then(|b| b.first_record).map(|d| d.as_secs_f64()),
                // null: killed (hung guest)
                "qemu_status": boot.and_then(|b| b.status).map(|s| s.to_string()),
                "report": o.report(),
                "cases": boot.map(|b| &b.transcript.cases),
                "budget": o.budget.iter().map(|l| json!({
                    "program": l.program,
                    "verified_insns": l.verified_insns,
                    "budget": l.budget,
                    "load_ms": o.report().and_then(|r| r.programs.iter().find(|p| p.name == l.program)).and_then(|p| p.load_ms),
                    "status": l.verdict.to_string(),
                })).collect::<Vec<_>>(),
                "problems": o.problems,
                "warnings": boot.map(|b| &b.warnings),
                "console_log": boot.map(|b| b.console_log.display().to_string()),
            })
        })
        .collect();
    let doc = json!({
        "fetch_s": totals.fetch.as_secs_f64(),
        "build_s": totals.build.as_secs_f64(),
        "boots_s": totals.boots.as_secs_f64(),
        "total_s": totals.total.as_secs_f64(),
        "jobs": totals.jobs,
        "vms": vms,
    });
    fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_times() {
        let t = table(&["a", "bb"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "a    bb\nxxx  y\n");
        assert_eq!(secs(Duration::from_millis(6100)), "6.1s");
        assert_eq!(secs(Duration::from_secs(125)), "2m05.0s");
    }
}
