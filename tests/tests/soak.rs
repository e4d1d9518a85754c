//! The soak (issue #13, item 8) as a one-minute slice: a real daemon with three services
//! under concurrent short and long clients while one service flaps, another comes and goes
//! with reloads, and a 1024-flow table (the smallest `viscum attach` takes) churns (`viscum_tests::soak` has the details and the
//! properties). `cargo xtask soak [--minutes N]` runs the same code for longer
//! (`VISCUM_SOAK_MINUTES`).
//!
//! Run with `--nocapture` to see the summary.

use viscum_tests::{
    Lab, skip_unless_root,
    soak::{self, SoakOptions},
};

#[test]
fn soak_loses_nothing_and_keeps_the_daemon_flat() {
    if skip_unless_root() {
        return;
    }
    let minutes: f64 = std::env::var("VISCUM_SOAK_MINUTES")
        .ok()
        .map(|m| m.parse().expect("VISCUM_SOAK_MINUTES: a number of minutes"))
        .unwrap_or(1.0);
    let lab = Lab::new();
    let report = soak::run(&lab, SoakOptions::minutes(minutes));
    println!("{report}");
    let problems = report.problems();
    assert!(
        problems.is_empty(),
        "soak failed:\n  {}\n{report}",
        problems.join("\n  ")
    );
    // The run must have done what it claims: real load on every path, real changes.
    for port in soak::PORTS {
        let s = &report.ports[&port];
        assert!(s.edge + s.cloud > 50, "port {port}: too little load: {s:?}");
    }
    assert!(report.ports[&soak::STABLE_PORT].edge > 0);
    assert!(report.ports[&soak::CLOUD_PORT].cloud > 0);
    assert!(report.transfers_ok > 0, "no long transfer completed");
    assert!(report.changes >= 10, "only {} changes", report.changes);
}
