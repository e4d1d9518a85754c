//! Named checks with a verdict, a duration and a one-line detail: the unit both the verdict
//! fixtures and the guest runner report in.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    time::Instant,
};

/// The outcome of one named check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    /// Short kebab-case name, unique within a run (`v4-tcp-syn-exact`).
    pub name: String,
    /// The check passed (`false`: it returned an error or panicked).
    pub pass: bool,
    /// Wall time of the check in milliseconds.
    pub ms: u64,
    /// What was seen (on a pass) or what went wrong (on a failure). May span lines; see
    /// [`one_line`] for console records.
    pub detail: String,
}

impl CaseResult {
    /// The case as a JSON object: `{"name", "pass", "ms", "detail"}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "pass": self.pass,
            "ms": self.ms,
            "detail": self.detail,
        })
    }
}

/// Runs `check` as case `name`, timing it. `Ok(detail)` passes, `Err(detail)` fails, and a
/// panic fails with the panic message (when the binary unwinds on panic; with
/// `panic = "abort"` the process ends there, see the guest runner's panic hook).
pub fn run_case(name: &str, check: impl FnOnce() -> Result<String, String>) -> CaseResult {
    let start = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(check));
    let ms = start.elapsed().as_millis() as u64;
    let (pass, detail) = match outcome {
        Ok(Ok(detail)) => (true, detail),
        Ok(Err(detail)) => (false, detail),
        Err(panic) => (false, format!("panicked: {}", panic_message(&*panic))),
    };
    CaseResult {
        name: name.to_string(),
        pass,
        ms,
        detail,
    }
}

/// The message of a panic payload (`&str` or `String`), or a placeholder.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_string()
    }
}

/// `e` and its sources, `: `-separated (aya's and viscum's errors keep the cause, an errno for
/// instance, in their source rather than in their message).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

/// `text` on one line: line breaks become ` | ` and runs of blanks one space, so a multi-line
/// error fits a single console record.
pub fn one_line(text: &str) -> String {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_pass_fail_and_panic() {
        assert!(run_case("ok", || Ok("fine".into())).pass);
        let r = run_case("bad", || Err("broken".into()));
        assert!(!r.pass);
        assert_eq!(r.detail, "broken");
        let r = run_case("boom", || panic!("exploded {}", 42));
        assert!(!r.pass);
        assert_eq!(r.detail, "panicked: exploded 42");
        assert_eq!(r.to_json()["name"], "boom");
    }

    #[test]
    fn one_line_joins_lines() {
        assert_eq!(one_line("a  b\n\n  c\td\n"), "a b | c d");
        assert_eq!(one_line(""), "");
    }
}
