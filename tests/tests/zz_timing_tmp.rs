use std::time::Instant;
#[test]
fn timing() {
    for opts in [viscum_tests::LabOptions::default(), viscum_tests::LabOptions { vlan: Some(7) }] {
        let t = Instant::now();
        let lab = viscum_tests::Lab::with_options(opts);
        eprintln!("lab: {:?} {}", t.elapsed(), lab.edge_ifindex("lan0"));
        drop(lab);
    }
}
