//! `cargo xtask test`: set up, build `viscum`, run every test, then the VM
//! kernel matrix ([`crate::vm`]).

use std::{ffi::OsString, process::ExitCode, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::{build, process, setup, vm};

/// Options of `cargo xtask test`.
#[derive(clap::Args)]
pub struct Options {
    /// Skip the VM kernel matrix (developer machines only: refused when CI=true).
    #[arg(long)]
    no_vm: bool,
    /// Extra arguments for the test binaries, e.g. a test name filter.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "TEST_ARGS"
    )]
    args: Vec<OsString>,
}

/// `cargo xtask test`.
pub fn run(opts: &Options) -> Result<ExitCode> {
    let ci = process::is_ci();
    if opts.no_vm && ci {
        // The matrix is the only proof the datapath loads on the kernels
        // people run; CI never skips it.
        bail!("CI=true: --no-vm is refused, CI always runs the VM kernel matrix");
    }
    if !process::is_root() {
        if ci {
            // Privileged tests skip themselves without root; in CI that would
            // turn the run green without testing the datapath at all.
            bail!(
                "CI=true but not running as root: the privileged integration tests must run in CI"
            );
        }
        eprintln!("warning: not root: the privileged integration tests will skip themselves");
    }
    setup::ensure()?;
    if !opts.no_vm {
        setup::ensure_vm()?;
    }
    let started = Instant::now();
    // The OpenWrt init and hotplug scripts (dist/) are shell: checked here, failing the run.
    let scripts_ok = crate::package::shellcheck()?;
    let lints_started = Instant::now();
    let lints_ok = lints()?;
    println!(
        "test: lints (clippy, rustdoc) {} in {:.0?}",
        if lints_ok { "passed" } else { "FAILED" },
        lints_started.elapsed()
    );
    let viscum = build::viscum_debug()?;
    let mut cmd = process::cargo();
    // The integration tests build namespaces, veths and bpffs pins and attach
    // programs: they run one at a time so they cannot see each other's state.
    // --no-fail-fast: one CI run should show every failing test binary,
    // not just the first.
    cmd.args([
        "test",
        "--workspace",
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ])
    .args(&opts.args)
    // Tests that drive the real CLI run exactly the binary just built.
    .env("VISCUM_BIN", &viscum);
    println!("+ {}", process::display(&cmd));
    let status = cmd.status().context("cannot start cargo test")?;
    let status = if scripts_ok && lints_ok {
        status
    } else {
        failed_status()
    };
    let host_time = started.elapsed();
    if !status.success() {
        eprintln!("error: host tests failed ({status})");
    }
    if opts.no_vm {
        println!("test: VM kernel matrix skipped (--no-vm)");
        return Ok(process::exit_code(status));
    }
    // The router cross check (docs/router-builds.md): big-endian tier-3
    // mips-unknown-linux-musl built and unit-tested under qemu-user.
    let cross_started = Instant::now();
    let cross_passed = crate::dist::ci_check()?;
    let cross_time = cross_started.elapsed();
    // The matrix runs even when host tests failed: one CI run shows both.
    let vm_started = Instant::now();
    let vms_passed = vm::run_matrix(&vm::Options::default())?;
    println!(
        "test: host tests {} in {:.0?}; mips cross check {} in {:.0?}; VM matrix {} in {:.0?}",
        if status.success() { "passed" } else { "FAILED" },
        host_time,
        if cross_passed { "passed" } else { "FAILED" },
        cross_time,
        if vms_passed { "passed" } else { "FAILED" },
        vm_started.elapsed()
    );
    if !status.success() {
        return Ok(process::exit_code(status));
    }
    Ok(if vms_passed && cross_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The workspace's lints as CI holds them: `cargo clippy --workspace --all-targets -- -D
/// warnings` (the lint set is `[workspace.lints]` in Cargo.toml) and `cargo doc --no-deps`
/// with rustdoc warnings (broken intra-doc links, bad HTML) as errors. Both run to the end,
/// so one run shows every finding; `Ok(false)` if either failed.
fn lints() -> Result<bool> {
    let mut clippy = process::cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    println!("+ {}", process::display(&clippy));
    let clippy_ok = clippy
        .status()
        .context("cannot start cargo clippy")?
        .success();
    let mut doc = process::cargo();
    doc.args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings");
    println!("+ RUSTDOCFLAGS='-D warnings' {}", process::display(&doc));
    let doc_ok = doc.status().context("cannot start cargo doc")?.success();
    if !clippy_ok {
        eprintln!("error: cargo clippy found problems (see above)");
    }
    if !doc_ok {
        eprintln!("error: cargo doc found problems (see above)");
    }
    Ok(clippy_ok && doc_ok)
}

/// A failed exit status, for a run whose shell scripts or lints did not pass.
fn failed_status() -> std::process::ExitStatus {
    use std::os::unix::process::ExitStatusExt as _;
    std::process::ExitStatus::from_raw(1 << 8)
}
