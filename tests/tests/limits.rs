//! `[service.limits]` through the real daemon on this machine's cgroup layout (the v1
//! controllers of a hybrid host here; the VM kernel matrix runs the same check,
//! [`viscum_tests::vmcheck::limits`], on cgroup v2): pids and cpu enforced, and a service over
//! its memory limit OOM-killed inside its own group, restarted, and reported in `status`.

use std::path::PathBuf;

use viscum_tests::{Lab, lab::LAN_IF, skip_unless_root, vmcheck::limits::cgroup_limits};

#[test]
fn memory_cpu_pids_limits_oom_kill_and_restart() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let hog = PathBuf::from(env!("CARGO_BIN_EXE_viscum-vmcheck"));
    let case = cgroup_limits(&lab, &hog, &[LAN_IF]);
    println!("{} ({} ms): {}", case.name, case.ms, case.detail);
    assert!(case.pass, "{}", case.detail);
}
