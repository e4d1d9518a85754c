//! The demos of `cargo xtask run --demo NAME` (the paper's use cases), run briefly
//! (`--smoke`) with their figures checked: each builds its own lab, runs the real daemon and
//! real clients, and must show what it is meant to show.

use viscum_lab::demo::{self, Demo, Report};
use viscum_tests::skip_unless_root;

/// The speed test served at the edge measures the last mile (100 Mbit/s), from the cloud
/// the backhaul (20 Mbit/s).
#[test]
fn speedtest_demo_measures_the_last_mile_at_the_edge() {
    if skip_unless_root() {
        return;
    }
    let Report::Speedtest(f) = demo::run(Demo::Speedtest, true).expect("the speedtest demo") else {
        panic!("not the speedtest's report");
    };
    let (last_mile, backhaul) = (f.links.0 as f64, f.links.1 as f64);
    assert!(
        f.cloud.tcp_mbit > backhaul * 0.5 && f.cloud.tcp_mbit < backhaul * 1.1,
        "TCP from the cloud: {:.1} Mbit/s over a {backhaul} Mbit/s backhaul",
        f.cloud.tcp_mbit
    );
    assert!(
        f.edge.tcp_mbit > last_mile * 0.6 && f.edge.tcp_mbit < last_mile * 1.1,
        "TCP at the edge: {:.1} Mbit/s over a {last_mile} Mbit/s last mile",
        f.edge.tcp_mbit
    );
    // UDP offered at 60 Mbit/s: the backhaul carries 20 of it, the last mile all of it.
    assert!(
        f.cloud.udp_mbit < backhaul * 1.1,
        "UDP from the cloud: {:.1} Mbit/s over a {backhaul} Mbit/s backhaul",
        f.cloud.udp_mbit
    );
    assert!(
        f.edge.udp_mbit > 60.0 * 0.8 && f.edge.udp_loss < 5.0,
        "UDP at the edge: {:.1} Mbit/s of 60, {:.1} % lost",
        f.edge.udp_mbit,
        f.edge.udp_loss
    );
}

/// ALPR at the edge: the images stay on the box, only the text results cross the uplink.
#[test]
fn alpr_demo_keeps_the_images_off_the_uplink() {
    if skip_unless_root() {
        return;
    }
    let Report::Alpr(f) = demo::run(Demo::Alpr, true).expect("the alpr demo") else {
        panic!("not the alpr's report");
    };
    for run in [&f.cloud, &f.edge] {
        assert_eq!(
            run.results.0, run.images as u64,
            "one result per image: {run:?}"
        );
        assert_eq!(run.plates.len(), run.images);
    }
    // The same recognizer: the same plates either way.
    assert_eq!(f.cloud.plates, f.edge.plates);
    assert!(
        f.cloud.uplink >= f.cloud.uploaded,
        "served by the cloud, the uploads cross the uplink: {:?}",
        f.cloud
    );
    let per_image = f.edge.uplink / f.edge.images as u64;
    assert!(
        per_image < 400,
        "served at the edge, {per_image} bytes per image crossed the uplink: {:?}",
        f.edge
    );
    assert!(
        f.stats_bytes >= f.edge.uploaded,
        "viscum stats counts the uploads redirected: {} of {}",
        f.stats_bytes,
        f.edge.uploaded
    );
}
