//! `cargo xtask vm`: the VM kernel matrix. Boots Debian's own kernels under
//! qemu (TCG) with the guest runner `viscum-vmcheck` as PID 1 and checks what
//! it reports, including the verifier budget. `cargo xtask test` runs it after
//! the host tests.
//!
//! # Layout
//!
//! - [`matrix`]: the VMs (`tests/vm/kernels.toml`) and per-architecture facts
//!   (qemu machine, console, Rust target, cross linker).
//! - [`kernels`]: find, download (`apt-get download`) and unpack
//!   (`dpkg-deb -x`) the kernel packages; pick and decompress modules.
//! - [`guest`]: cross-build the static guest binaries and check them.
//! - [`initramfs`]: write the guest's cpio archive.
//! - [`qemu`]: boot a VM, follow its console, kill it when it hangs.
//! - [`report`]: parse the guest's `VMCHECK` records.
//! - [`budget`]: compare verifier counts with `tests/vm/budget.toml`.
//! - [`summary`]: the closing tables and `target/vm/summary.json`.
//!
//! Everything is written under `target/vm/`: `kernels/`, `apt/` and per VM
//! `<name>/console.log` (plus `initramfs.cpio` and `boot.sh` with `--keep`).

use std::{
    collections::{HashMap, VecDeque},
    fs,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{process, setup};

pub mod budget;
pub mod guest;
pub mod initramfs;
pub mod kernels;
pub mod matrix;
pub mod qemu;
pub mod report;
pub mod summary;

use self::{budget::Budgets, kernels::Kernel, matrix::Vm, summary::Outcome};

/// Options of `cargo xtask vm` (also used by `cargo xtask test`).
#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// Run only this VM (repeatable); see `--list` for names.
    #[arg(long = "vm", value_name = "NAME")]
    pub vms: Vec<String>,
    /// Keep each VM's initramfs and write a boot.sh to boot it again by hand.
    #[arg(long)]
    pub keep: bool,
    /// How many VMs run at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_JOBS)]
    pub jobs: usize,
    /// Kill a guest after this many seconds (default: each VM's timeout_s, else 900).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// List the VMs of the matrix and exit.
    #[arg(long)]
    pub list: bool,
    /// Boot `DIR/<rust-target>/init` as PID 1 instead of building viscum-vmcheck
    /// (for testing the harness with a stand-in; `viscum` is still built).
    #[arg(long, value_name = "DIR", hide = true)]
    pub guest_init: Option<PathBuf>,
}

/// How many VMs run at once by default.
pub const DEFAULT_JOBS: usize = 2;

impl Default for Options {
    /// What `cargo xtask test` runs: every VM, the default parallelism.
    fn default() -> Self {
        Options {
            vms: Vec::new(),
            keep: false,
            jobs: DEFAULT_JOBS,
            timeout: None,
            list: false,
            guest_init: None,
        }
    }
}

/// `cargo xtask vm`.
pub fn run(opts: &Options) -> Result<ExitCode> {
    if opts.list {
        let vms = matrix::load(&kernels_toml())?;
        for vm in vms {
            println!("{:<20} {:<6} {}", vm.name, vm.arch.deb(), vm.why);
            println!("{:<20} {:<6} packages: {}", "", "", vm.packages.join(", "));
        }
        return Ok(ExitCode::SUCCESS);
    }
    // A mistyped --vm fails before minutes of setup and building.
    matrix::select(matrix::load(&kernels_toml())?, &opts.vms)?;
    setup::ensure()?;
    setup::ensure_vm()?;
    Ok(if run_matrix(opts)? {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn kernels_toml() -> PathBuf {
    process::workspace_root().join("tests/vm/kernels.toml")
}

fn budget_toml() -> PathBuf {
    process::workspace_root().join("tests/vm/budget.toml")
}

/// `target/vm`.
pub fn work_dir() -> PathBuf {
    // Follow CARGO_TARGET_DIR like cargo does, so the matrix's files land
    // next to the binaries it boots.
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| process::workspace_root().join("target"))
        .join("vm")
}

/// Runs the matrix (the caller has run setup). Returns whether every VM passed.
pub fn run_matrix(opts: &Options) -> Result<bool> {
    let started = Instant::now();
    let vms = matrix::select(matrix::load(&kernels_toml())?, &opts.vms)?;
    if vms.is_empty() {
        bail!("tests/vm/kernels.toml lists no VM");
    }
    // Read the budget before spending minutes on builds and boots.
    let budgets = Budgets::load(&budget_toml())?;
    let work = work_dir();
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let _lock = lock(&work)?;
    let fresh = process::is_ci();
    let mut arches = Vec::new();
    for vm in &vms {
        if !arches.contains(&vm.arch) {
            arches.push(vm.arch);
        }
    }
    println!(
        "vm: matrix of {} VMs: {}{}",
        vms.len(),
        vms.iter()
            .map(|vm| vm.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        if fresh {
            " (CI: kernels fetched fresh)"
        } else {
            ""
        }
    );

    // Fetching and unpacking kernels is mostly network and xz; it runs while
    // cargo builds the guest binaries.
    let fetch = {
        let vms = vms.clone();
        let work = work.clone();
        thread::spawn(move || {
            let t = Instant::now();
            kernels::prepare(&vms, &work, fresh).map(|k| (k, t.elapsed()))
        })
    };
    let build_started = Instant::now();
    let built = guest::build(&arches, opts.guest_init.is_none());
    let build_time = build_started.elapsed();
    let fetched = fetch
        .join()
        .map_err(|_| anyhow::anyhow!("the kernel fetching thread panicked"))?;
    let bins = built.context("building the guest binaries")?;
    let (kernels, fetch_time) = fetched.context("fetching the kernels")?;
    println!("vm: kernels ready in {fetch_time:.0?}, guest binaries in {build_time:.0?}");

    // One initramfs per VM: they differ in modules and binaries.
    let mut jobs = VecDeque::new();
    for vm in &vms {
        let dir = work.join(&vm.name);
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        fs::create_dir_all(&dir)?;
        let kernel = kernels[&vm.name].clone();
        let bins = &bins[&vm.arch];
        let init = match (&opts.guest_init, &bins.vmcheck) {
            (Some(dir), _) => dir.join(vm.arch.rust_target()).join("init"),
            (None, Some(vmcheck)) => vmcheck.clone(),
            (None, None) => unreachable!("guest::build builds viscum-vmcheck without --guest-init"),
        };
        let initramfs = dir.join("initramfs.cpio");
        let size = initramfs::write(&initramfs, &init, &bins.viscum, &kernel.module_paths())?;
        println!(
            "vm: {}: {} ({:.1} MB: {} + viscum + {} modules)",
            vm.name,
            initramfs.display(),
            size as f64 / 1e6,
            init.file_name().unwrap_or_default().to_string_lossy(),
            kernel.modules.len()
        );
        if opts.keep {
            write_boot_sh(vm, &kernel, &initramfs, &dir)?;
        }
        jobs.push_back((vm.clone(), kernel, initramfs, dir));
    }

    let boot_started = Instant::now();
    let outcomes = run_boots(jobs, opts, &budgets)?;
    let boots_wall = boot_started.elapsed();

    if !opts.keep {
        for vm in &vms {
            let _ = fs::remove_file(work.join(&vm.name).join("initramfs.cpio"));
        }
    }
    let totals = summary::Totals {
        fetch: fetch_time,
        build: build_time,
        boots: boots_wall,
        total: started.elapsed(),
        jobs: opts.jobs.max(1),
    };
    summary::print(&outcomes, &totals);
    summary::write_json(&work.join("summary.json"), &outcomes, &totals)?;
    Ok(outcomes.iter().all(Outcome::passed))
}

/// Holds `target/vm/.lock` for the whole run: the target directory is shared
/// (developers and helpers on one machine), and two matrices at once would
/// overwrite each other's initramfs, console logs and apt state.
fn lock(work: &std::path::Path) -> Result<nix::fcntl::Flock<fs::File>> {
    use nix::{
        errno::Errno,
        fcntl::{Flock, FlockArg},
    };
    let path = work.join(".lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((file, Errno::EWOULDBLOCK)) => {
            println!(
                "vm: another VM matrix run holds {}; waiting for it",
                path.display()
            );
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| anyhow::anyhow!("cannot lock {}: {e}", path.display()))
        }
        Err((_, e)) => bail!("cannot lock {}: {e}", path.display()),
    }
}

/// Boots the VMs, `opts.jobs` at a time, in matrix order.
fn run_boots(
    jobs: VecDeque<(Vm, Kernel, PathBuf, PathBuf)>,
    opts: &Options,
    budgets: &Budgets,
) -> Result<Vec<Outcome>> {
    let order: Vec<String> = jobs.iter().map(|j| j.0.name.clone()).collect();
    let queue = Arc::new(Mutex::new(jobs));
    let results: Arc<Mutex<HashMap<String, Outcome>>> = Arc::default();
    thread::scope(|s| {
        for _ in 0..opts.jobs.max(1) {
            let queue = Arc::clone(&queue);
            let results = Arc::clone(&results);
            s.spawn(move || {
                loop {
                    let Some((vm, kernel, initramfs, dir)) = queue.lock().unwrap().pop_front()
                    else {
                        break;
                    };
                    let timeout = Duration::from_secs(opts.timeout.unwrap_or(vm.timeout_s()));
                    let boot = boot_with_retry(&vm, &kernel, &initramfs, &dir, timeout);
                    let outcome = Outcome::new(&vm, &kernel, boot, budgets);
                    results.lock().unwrap().insert(vm.name.clone(), outcome);
                }
            });
        }
    });
    let mut results = Arc::try_unwrap(results)
        .map_err(|_| anyhow::anyhow!("boot threads still hold the results"))?
        .into_inner()
        .unwrap();
    Ok(order
        .iter()
        .filter_map(|name| results.remove(name))
        .collect())
}

/// Boots `vm`, once more if the first boot ended before the guest printed any
/// record: then the kernel died while booting, before the code under test ran
/// (emulation races do that now and then). The first attempt's console stays
/// as `console.1.log` and a warning names it; two such boots fail the VM.
fn boot_with_retry(
    vm: &Vm,
    kernel: &Kernel,
    initramfs: &std::path::Path,
    dir: &std::path::Path,
    timeout: Duration,
) -> Result<qemu::Boot> {
    let first = qemu::boot(vm, kernel, initramfs, dir, timeout)?;
    let timed_out = first.status.is_none();
    if first.first_record.is_some() || timed_out {
        return Ok(first);
    }
    let kept = dir.join("console.1.log");
    fs::rename(&first.console_log, &kept)?;
    let why = format!(
        "the first boot ended before the guest printed anything (console: {}); booted again",
        kept.display()
    );
    println!("[{}] {why}", vm.name);
    let mut second = qemu::boot(vm, kernel, initramfs, dir, timeout)?;
    second.warnings.push(why);
    Ok(second)
}

/// `target/vm/<name>/boot.sh`: the same boot, by hand (with `--keep`).
fn write_boot_sh(
    vm: &Vm,
    kernel: &Kernel,
    initramfs: &std::path::Path,
    dir: &std::path::Path,
) -> Result<()> {
    let cmd = qemu::command(vm, kernel, initramfs);
    let path = dir.join("boot.sh");
    fs::write(
        &path,
        format!(
            "#!/bin/sh\n# Boots {} as `cargo xtask vm --keep` did (Ctrl-A X quits qemu).\nexec {}\n",
            vm.name,
            process::display(&cmd)
        ),
    )?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}
