//! The verifier budget (`tests/vm/budget.toml`): the most instructions the
//! kernel's verifier may process for each program on each VM.
//!
//! ```toml
//! [budget."debian-6.1-amd64"]
//! viscum_ingress = 120000   # max verified_insns allowed
//! viscum_reply = 60000
//! ```

use std::{collections::BTreeMap, fmt, fs, path::Path};

use anyhow::{Context as _, Result};
use serde::Deserialize;

use super::report::Report;

/// Budgets by VM name, then program name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budgets {
    #[serde(default)]
    budget: BTreeMap<String, BTreeMap<String, u64>>,
}

/// How one program of one VM fares against its budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `verified_insns` <= budget.
    Within,
    /// `verified_insns` > budget.
    Over,
    /// The program has no budget for this VM.
    NoBudget,
    /// The kernel reports `verified_insns` (5.16+) but the guest gave none:
    /// the program did not load, or the runner could not read its info.
    NotReported,
    /// The kernel predates `verified_insns` (before 5.16): nothing to compare.
    Unsupported,
}

impl Verdict {
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Verdict::Over | Verdict::NoBudget | Verdict::NotReported
        )
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Within => "ok",
            Verdict::Over => "OVER BUDGET",
            Verdict::NoBudget => "NO BUDGET",
            Verdict::NotReported => "NOT REPORTED",
            Verdict::Unsupported => "n/a (kernel < 5.16)",
        })
    }
}

/// One row of the budget table.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    pub program: String,
    pub verified_insns: Option<u64>,
    pub budget: Option<u64>,
    pub verdict: Verdict,
}

impl Budgets {
    pub fn load(path: &Path) -> Result<Budgets> {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Budgets::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Budgets> {
        Ok(toml::from_str(text)?)
    }

    /// Compares the programs `report` lists, and every program budgeted for
    /// `vm`, with the budget. Programs come in report order, then budgeted
    /// programs the report did not list.
    pub fn check(&self, vm: &str, report: &Report) -> Vec<Line> {
        let budgets = self.budget.get(vm);
        let supported = supports_verified_insns(&report.kernel);
        let verdict = |count: Option<u64>, budget: Option<u64>| match (count, budget) {
            (_, None) => Verdict::NoBudget,
            (Some(n), Some(b)) if n > b => Verdict::Over,
            (Some(_), Some(_)) => Verdict::Within,
            (None, Some(_)) if supported => Verdict::NotReported,
            (None, Some(_)) => Verdict::Unsupported,
        };
        let mut lines: Vec<Line> = report
            .programs
            .iter()
            .map(|p| {
                let budget = budgets.and_then(|b| b.get(&p.name)).copied();
                Line {
                    program: p.name.clone(),
                    verified_insns: p.verified_insns,
                    budget,
                    verdict: verdict(p.verified_insns, budget),
                }
            })
            .collect();
        for (program, budget) in budgets.into_iter().flatten() {
            if !report.programs.iter().any(|p| &p.name == program) {
                lines.push(Line {
                    program: program.clone(),
                    verified_insns: None,
                    budget: Some(*budget),
                    verdict: verdict(None, Some(*budget)),
                });
            }
        }
        lines
    }
}

/// Whether a kernel of release `release` (`uname -r`, e.g. `6.1.0-57-amd64`)
/// fills `bpf_prog_info.verified_insns`: added in Linux 5.16. An unreadable
/// release counts as supporting it (so a missing count is not excused).
pub fn supports_verified_insns(release: &str) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= (5, 16),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::report::Program;

    fn report(kernel: &str, programs: &[(&str, Option<u64>)]) -> Report {
        Report {
            vm: "vm1".into(),
            kernel: kernel.into(),
            arch: "x86_64".into(),
            attach: String::new(),
            programs: programs
                .iter()
                .map(|(name, n)| Program {
                    name: name.to_string(),
                    verified_insns: *n,
                    xlated_bytes: None,
                    jited_bytes: None,
                    load_ms: None,
                })
                .collect(),
            jit: None,
            btf: true,
            cases: vec![],
        }
    }

    const BUDGETS: &str = r#"
        [budget."vm1"]
        viscum_ingress = 1000   # comment
        viscum_reply = 500
    "#;

    #[test]
    fn within_over_and_at_the_limit() {
        let b = Budgets::parse(BUDGETS).unwrap();
        let lines = b.check(
            "vm1",
            &report(
                "6.1.0-57-amd64",
                &[("viscum_ingress", Some(1000)), ("viscum_reply", Some(501))],
            ),
        );
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].verdict, Verdict::Within);
        assert_eq!(lines[1].verdict, Verdict::Over);
        assert_eq!(lines[1].budget, Some(500));
        assert!(lines[1].verdict.is_failure());
    }

    #[test]
    fn missing_counts_fail_only_where_the_kernel_has_them() {
        let b = Budgets::parse(BUDGETS).unwrap();
        // The reply program is not listed at all, ingress has no count.
        let lines = b.check(
            "vm1",
            &report("6.12.117+deb12-amd64", &[("viscum_ingress", None)]),
        );
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].verdict, Verdict::NotReported);
        assert_eq!(lines[1].program, "viscum_reply");
        assert_eq!(lines[1].verdict, Verdict::NotReported);
        let lines = b.check(
            "vm1",
            &report("5.15.0-91-generic", &[("viscum_ingress", None)]),
        );
        assert_eq!(lines[0].verdict, Verdict::Unsupported);
        assert!(!lines[0].verdict.is_failure());
    }

    #[test]
    fn programs_and_vms_without_budget_fail() {
        let b = Budgets::parse(BUDGETS).unwrap();
        let lines = b.check(
            "vm2",
            &report("6.1.0-1-arm64", &[("viscum_ingress", Some(1))]),
        );
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].verdict, Verdict::NoBudget);
        assert!(lines[0].verdict.is_failure());
        let lines = b.check("vm1", &report("6.1.0-1-arm64", &[("viscum_new", Some(1))]));
        assert_eq!(lines[0].verdict, Verdict::NoBudget);
    }

    #[test]
    fn kernel_versions() {
        assert!(supports_verified_insns("6.1.0-57-amd64"));
        assert!(supports_verified_insns("5.16.0"));
        assert!(!supports_verified_insns("5.15.0-91-generic"));
        assert!(!supports_verified_insns("4.19.0-26-amd64"));
        assert!(supports_verified_insns("weird"));
    }

    #[test]
    fn the_checked_in_budget_covers_the_matrix() {
        let root = crate::process::workspace_root();
        let b = Budgets::load(&root.join("tests/vm/budget.toml")).unwrap();
        let vms = crate::vm::matrix::load(&root.join("tests/vm/kernels.toml")).unwrap();
        for vm in vms {
            let programs = b
                .budget
                .get(&vm.name)
                .unwrap_or_else(|| panic!("no budget for {}", vm.name));
            assert!(programs.contains_key("viscum_ingress"), "{}", vm.name);
            assert!(programs.contains_key("viscum_reply"), "{}", vm.name);
            assert!(programs.contains_key("viscum_icmp_ingress"), "{}", vm.name);
            assert!(programs.contains_key("viscum_icmp_reply"), "{}", vm.name);
        }
    }
}
