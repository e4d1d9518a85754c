//! What a guest says on its console (the guest contract in notes/team.md)
//! and what the harness makes of it.
//!
//! Records are single lines starting with `VMCHECK`:
//!
//! ```text
//! VMCHECK <free text progress>
//! VMCHECK-CASE <name> pass|fail <ms> <detail>
//! VMCHECK-REPORT <single-line JSON, see Report>
//! VMCHECK-RESULT PASS|FAIL
//! ```
//!
//! A serial console can put bytes in front of a record (terminal escape
//! sequences from firmware, the tail of a kernel message), so a record is
//! recognised anywhere in a line, from its `VMCHECK` token on.

use serde::{Deserialize, Serialize};

/// One console record.
#[derive(Debug, PartialEq)]
pub enum Record {
    Progress(String),
    Case(Case),
    Report(Box<Report>),
    Result(bool),
    /// A `VMCHECK...` line that does not parse; kept so it can be shown.
    Malformed {
        line: String,
        why: String,
    },
}

/// `VMCHECK-CASE`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Case {
    pub name: String,
    pub pass: bool,
    pub ms: u64,
    #[serde(default)]
    pub detail: String,
}

/// `VMCHECK-REPORT`: the runner's findings about the kernel and the loaded programs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `vmcheck.name=` from the kernel command line.
    pub vm: String,
    /// `uname -r`.
    pub kernel: String,
    /// `uname -m`.
    pub arch: String,
    /// What `viscum attach` printed (attach mode and helpers chosen).
    #[serde(default)]
    pub attach: String,
    #[serde(default)]
    pub programs: Vec<Program>,
    /// `/proc/sys/net/core/bpf_jit_enable`; `None` when the kernel has no JIT.
    pub jit: Option<String>,
    /// Whether `/sys/kernel/btf/vmlinux` exists.
    pub btf: bool,
    #[serde(default)]
    pub cases: Vec<Case>,
}

/// One loaded program's verifier statistics (`bpf_prog_info`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub name: String,
    /// Instructions the verifier processed; `None` if unknown (not loaded,
    /// or a kernel before 5.16).
    pub verified_insns: Option<u64>,
    pub xlated_bytes: Option<u64>,
    pub jited_bytes: Option<u64>,
    /// How long `viscum attach` took to load it (verifier and JIT), ms, from its log; under
    /// TCG, comparable only within the matrix. `None`: not reported (a runner before this
    /// field, or the load failed).
    #[serde(default)]
    pub load_ms: Option<f64>,
}

/// Parses one console line; `None` when it holds no record.
pub fn parse_line(line: &str) -> Option<Record> {
    let start = find_token(line)?;
    let rec = line[start..].trim_end_matches(['\r', '\n']).trim_end();
    let (tag, rest) = match rec.split_once(' ') {
        Some((tag, rest)) => (tag, rest.trim()),
        None => (rec, ""),
    };
    let malformed = |why: &str| {
        Some(Record::Malformed {
            line: rec.to_owned(),
            why: why.to_owned(),
        })
    };
    match tag {
        "VMCHECK" => Some(Record::Progress(rest.to_owned())),
        "VMCHECK-RESULT" => match rest {
            "PASS" => Some(Record::Result(true)),
            "FAIL" => Some(Record::Result(false)),
            _ => malformed("expected PASS or FAIL"),
        },
        "VMCHECK-REPORT" => match serde_json::from_str::<Report>(rest) {
            Ok(report) => Some(Record::Report(Box::new(report))),
            Err(e) => malformed(&format!("bad JSON: {e}")),
        },
        "VMCHECK-CASE" => {
            let mut parts = rest.splitn(4, ' ');
            let name = parts.next().unwrap_or_default();
            let verdict = parts.next().unwrap_or_default();
            let ms = parts.next().unwrap_or_default();
            let detail = parts.next().unwrap_or_default().trim();
            let pass = match verdict {
                "pass" => true,
                "fail" => false,
                _ => return malformed("expected `<name> pass|fail <ms> <detail>`"),
            };
            let Ok(ms) = ms.parse() else {
                return malformed("the time is not a whole number of milliseconds");
            };
            if name.is_empty() {
                return malformed("case without a name");
            }
            Some(Record::Case(Case {
                name: name.to_owned(),
                pass,
                ms,
                detail: detail.to_owned(),
            }))
        }
        // e.g. "VMCHECKED": not ours.
        _ => None,
    }
}

/// Where the record token starts: `VMCHECK` followed by a space, `-` or the
/// end of the line.
fn find_token(line: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = line[from..].find("VMCHECK") {
        let at = from + i;
        let after = line[at + 7..].chars().next();
        if matches!(after, None | Some(' ' | '-' | '\r' | '\n')) {
            return Some(at);
        }
        from = at + 7;
    }
    None
}

/// Everything one guest said, collected from its console.
#[derive(Debug, Default)]
pub struct Transcript {
    pub progress: Vec<String>,
    pub cases: Vec<Case>,
    pub report: Option<Report>,
    /// The last `VMCHECK-RESULT`.
    pub result: Option<bool>,
    pub malformed: Vec<String>,
}

impl Transcript {
    pub fn add(&mut self, record: Record) {
        match record {
            Record::Progress(text) => self.progress.push(text),
            Record::Case(case) => self.cases.push(case),
            Record::Report(report) => self.report = Some(*report),
            Record::Result(pass) => self.result = Some(pass),
            Record::Malformed { line, why } => self.malformed.push(format!("{line} ({why})")),
        }
    }

    /// Why the guest's own verdict is not a pass (empty: it passed).
    ///
    /// The runner's `VMCHECK-RESULT PASS` only counts with a report and no
    /// failed case: a runner that contradicts itself is a failure too.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match self.result {
            None => problems.push("the guest printed no VMCHECK-RESULT".to_owned()),
            Some(false) => problems.push("the guest reported VMCHECK-RESULT FAIL".to_owned()),
            Some(true) => {}
        }
        if self.report.is_none() {
            problems.push("the guest printed no VMCHECK-REPORT".to_owned());
        }
        let failed: Vec<&Case> = self.cases.iter().filter(|c| !c.pass).collect();
        if !failed.is_empty() {
            problems.push(format!(
                "{} of {} cases failed: {}",
                failed.len(),
                self.cases.len(),
                failed
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for m in &self.malformed {
            problems.push(format!("malformed record: {m}"));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = r#"{"vm":"debian-6.1-amd64","kernel":"6.1.0-57-amd64","arch":"x86_64","attach":"clsact","programs":[{"name":"viscum_ingress","verified_insns":123456,"xlated_bytes":9000,"jited_bytes":null},{"name":"viscum_reply","verified_insns":null,"xlated_bytes":null,"jited_bytes":null}],"jit":"1","btf":true,"cases":[{"name":"verdict-v4","pass":true,"ms":12,"detail":"ok"}]}"#;

    #[test]
    fn records() {
        assert_eq!(
            parse_line("VMCHECK loading modules\r\n"),
            Some(Record::Progress("loading modules".into()))
        );
        assert_eq!(
            parse_line("VMCHECK-RESULT PASS"),
            Some(Record::Result(true))
        );
        assert_eq!(
            parse_line("VMCHECK-RESULT FAIL\r"),
            Some(Record::Result(false))
        );
        assert_eq!(
            parse_line(
                "VMCHECK-CASE attach-clsact fail 61234 the kernel rejected viscum_ingress: too large"
            ),
            Some(Record::Case(Case {
                name: "attach-clsact".into(),
                pass: false,
                ms: 61234,
                detail: "the kernel rejected viscum_ingress: too large".into(),
            }))
        );
        assert_eq!(
            parse_line("VMCHECK-CASE x pass 5"),
            Some(Record::Case(Case {
                name: "x".into(),
                pass: true,
                ms: 5,
                detail: String::new()
            }))
        );
    }

    #[test]
    fn records_behind_console_noise() {
        // What qemu's x86 firmware leaves in front of the first line.
        assert_eq!(
            parse_line("Booting from ROM..c\x1b[?7l\x1b[2JVMCHECK-RESULT PASS"),
            Some(Record::Result(true))
        );
        assert_eq!(parse_line("[    2.441099] reboot: Power down"), None);
        assert_eq!(parse_line("VMCHECKED nothing"), None);
        assert_eq!(parse_line(""), None);
    }

    #[test]
    fn report_json() {
        let Some(Record::Report(report)) = parse_line(&format!("VMCHECK-REPORT {REPORT}")) else {
            panic!("no report");
        };
        assert_eq!(report.vm, "debian-6.1-amd64");
        assert_eq!(report.programs[0].verified_insns, Some(123456));
        assert_eq!(report.programs[1].verified_insns, None);
        assert_eq!(report.jit.as_deref(), Some("1"));
        assert_eq!(report.cases.len(), 1);
        // No JIT: "jit": null.
        let nojit = REPORT.replace(r#""jit":"1""#, r#""jit":null"#);
        let Some(Record::Report(report)) = parse_line(&format!("VMCHECK-REPORT {nojit}")) else {
            panic!("no report");
        };
        assert_eq!(report.jit, None);
    }

    #[test]
    fn malformed_records_are_kept() {
        assert!(matches!(
            parse_line("VMCHECK-RESULT maybe"),
            Some(Record::Malformed { .. })
        ));
        assert!(matches!(
            parse_line("VMCHECK-CASE x perhaps 1 y"),
            Some(Record::Malformed { .. })
        ));
        assert!(matches!(
            parse_line("VMCHECK-CASE x pass soon"),
            Some(Record::Malformed { .. })
        ));
        assert!(matches!(
            parse_line("VMCHECK-REPORT {not json"),
            Some(Record::Malformed { .. })
        ));
    }

    #[test]
    fn transcript_verdict() {
        let mut t = Transcript::default();
        for line in [
            "VMCHECK starting".to_string(),
            "VMCHECK-CASE a pass 1 fine".to_string(),
            format!("VMCHECK-REPORT {REPORT}"),
            "VMCHECK-RESULT PASS".to_string(),
        ] {
            t.add(parse_line(&line).unwrap());
        }
        assert!(t.problems().is_empty(), "{:?}", t.problems());
        // A failed case contradicts a PASS.
        t.add(parse_line("VMCHECK-CASE b fail 2 broken").unwrap());
        assert_eq!(t.problems().len(), 1);
        assert!(t.problems()[0].contains("1 of 2 cases failed: b"));
        // Nothing at all.
        let empty = Transcript::default();
        assert_eq!(empty.problems().len(), 2);
    }
}
