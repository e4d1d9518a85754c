//! The verdict fixtures (`viscum_tests::verdicts`) on this machine's kernel: every frame
//! through the loaded `viscum_ingress` / `viscum_reply` with `BPF_PROG_TEST_RUN`, exact TC
//! actions and counters. The same fixtures run inside every guest of the VM kernel matrix.

use viscum_tests::{Lab, skip_unless_root, verdicts};

#[test]
fn verdict_fixtures_on_this_kernel() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    lab.viscum_ok(&["attach", lab.lan_if()]);
    let results = verdicts::run(&lab, &mut |c| {
        eprintln!(
            "{} {} {} ms: {}",
            if c.pass { "pass" } else { "FAIL" },
            c.name,
            c.ms,
            c.detail
        );
    });
    assert!(
        results.len() >= 30,
        "only {} cases ran (setup failed?): {results:#?}",
        results.len()
    );
    let failed: Vec<String> = results
        .iter()
        .filter(|c| !c.pass)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        results.len(),
        failed.join("\n")
    );
}
