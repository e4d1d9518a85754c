//! `cargo xtask profile [--group traffic] [--full]`: where the classifier's time goes under a
//! benchmark group's load, by kernel function it calls and by source line of its own code.
//!
//! The benchmarks say how long a packet takes; this says why. While one group of
//! `cargo xtask bench` runs (quick mode unless `--full`), `perf record -a -g -e cpu-clock`
//! samples every CPU, and a watcher reads each Viscum program the benchmark loads while it is
//! loaded: its JIT line table (`bpf_prog_info.jited_line_info`, the address of each line-info
//! record in the JIT image: kernel commit c454a46b5efd, "bpf: Add bpf_line_info support") and
//! its translated instructions with source lines (`bpftool prog dump xlated linum`). A sample
//! whose call chain holds a program is then the program's: a sample in its own code goes to
//! the source line of the instruction at the sampled address, one anywhere below it to the
//! kernel function the program called (a helper, a map operation the JIT did not inline) or
//! was interrupted by.
//!
//! `cpu-clock` is a software event (an hrtimer): it works in VMs without a PMU, and a sample's
//! address is the instruction about to run when the timer fired, so a stalled load shows on
//! the address after it; each own-code sample is looked up one byte back, inside the
//! instruction that was running. The report goes to `target/profile/<run id>.md` and stdout.
//! Numbers are shares of samples, not nanoseconds: compare lines within one profile, and
//! measure a change with `cargo xtask bench`.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{sys::signal, unistd::Pid};

use crate::{bench, process, setup};

/// Options of `cargo xtask profile`.
#[derive(clap::Args)]
pub struct Options {
    /// The benchmark group whose load is profiled (a name `cargo xtask bench --only` takes,
    /// or a benchmark id such as B3).
    #[arg(long, default_value = "traffic")]
    group: String,
    /// Run the group's full benchmarks instead of quick mode (longer, more samples).
    #[arg(long)]
    full: bool,
    /// Samples per second per CPU.
    #[arg(long, default_value_t = 1999, value_parser = clap::value_parser!(u32).range(10..=20_000))]
    frequency: u32,
    /// Rows per table.
    #[arg(long, default_value_t = 25)]
    top: usize,
}

/// Programs whose samples are reported: the product's, and the benchmarks' reference ones.
const PROGRAM_PREFIXES: [&str; 2] = ["viscum_", "bench_"];

/// `cargo xtask profile`.
pub fn run(opts: &Options) -> Result<ExitCode> {
    if !process::is_root() {
        bail!("profiling loads eBPF programs and samples every CPU: run it as root");
    }
    let group = bench::group(&opts.group)?;
    setup::ensure()?;
    bench::ensure_tools();
    ensure_profilers()?;

    let (run_id, run_dir) = bench::sweep::begin()?;
    let out_dir = process::workspace_root().join("target/profile");
    fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let (exes, viscum) = bench::build()?;
    let exe = exes
        .iter()
        .find(|(n, _)| n == group.bench)
        .map(|(_, p)| p.clone())
        .with_context(|| format!("cargo built no `{}` bench binary", group.bench))?;

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || watch_programs(&stop))
    };
    let perf_data = run_dir.join("perf.data");
    let mut perf = Command::new("perf");
    perf.args([
        "record",
        "--all-cpus",
        "--call-graph",
        "fp",
        "--event",
        "cpu-clock",
    ])
    .arg("--freq")
    .arg(opts.frequency.to_string())
    .arg("--output")
    .arg(&perf_data)
    .stdout(Stdio::null());
    println!("+ {}", process::display(&perf));
    let mut perf = perf
        .spawn()
        .with_context(|| format!("cannot start `{}`", process::display(&perf)))?;
    // perf creates its output once it samples; bounded wait, then the load starts.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !perf_data.exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let limit = if opts.full {
        group.full_limit
    } else {
        group.quick_limit
    };
    let started = Instant::now();
    let result = bench::run_group(
        &exe,
        &viscum,
        group,
        !opts.full,
        &run_id,
        &run_dir.join(format!("{}.json", group.name)),
        &run_dir.join("datapath.json"),
        limit,
    );
    let load_secs = started.elapsed().as_secs_f64();
    bench::sweep::run_leftovers(&run_id);
    let _ = signal::kill(Pid::from_raw(perf.id() as i32), signal::Signal::SIGINT);
    let perf_status = perf.wait().context("waiting for perf")?;
    stop.store(true, Ordering::SeqCst);
    let programs = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the program watcher panicked"))?;
    if let Err(e) = &result {
        eprintln!(
            "profile: the {} group failed ({e:#}); profiling what ran",
            group.name
        );
    }
    if !perf_status.success() && !perf_data.exists() {
        bail!("perf record failed ({perf_status})");
    }

    let mut profile = Profile::default();
    let mut script = Command::new("perf");
    script
        .args(["script", "--fields", "comm,tid,ip,sym,symoff", "--input"])
        .arg(&perf_data)
        .stderr(Stdio::null());
    let mut frames: Vec<String> = Vec::new();
    let status = process::each_stdout_line(&mut script, |line| {
        if line.starts_with(['\t', ' ']) {
            frames.push(line.to_owned());
        } else {
            profile.add(&frames);
            frames.clear();
        }
    })?;
    profile.add(&frames);
    if !status.success() {
        bail!("perf script failed ({status})");
    }
    let _ = fs::remove_file(&perf_data);
    bench::sweep::finish(&run_id);

    let heading = format!(
        "{} ({}), {} mode, {:.0} s of load; perf cpu-clock at {} Hz on every CPU; commit {}",
        group.name,
        group
            .ids
            .iter()
            .map(|(id, _)| *id)
            .collect::<Vec<_>>()
            .join(", "),
        if opts.full { "full" } else { "quick" },
        load_secs,
        opts.frequency,
        git_commit()
    );
    let report = profile.render(&heading, &programs, opts.top);
    let path = out_dir.join(format!("{run_id}-{}.md", group.name));
    fs::write(&path, &report).with_context(|| format!("cannot write {}", path.display()))?;
    println!("{report}");
    println!("profile: report in {}", path.display());
    Ok(ExitCode::SUCCESS)
}

/// Installs perf and bpftool when missing (Debian's linux-perf and bpftool packages).
fn ensure_profilers() -> Result<()> {
    let missing = process::missing_packages(&[("perf", "linux-perf"), ("bpftool", "bpftool")]);
    if missing.is_empty() {
        return Ok(());
    }
    println!("profile: installing {}", missing.join(" "));
    process::apt_install(&missing)
}

fn git_commit() -> String {
    let mut cmd = Command::new("git");
    cmd.current_dir(process::workspace_root())
        .args(["rev-parse", "--short", "HEAD"]);
    process::output(&mut cmd).map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

// ---------------------------------------------------------------------------------------------
// The programs' line tables, read while they are loaded

/// Where one loaded program's JIT code came from.
struct ProgramLines {
    /// (offset in the JIT image, translated instruction index) per line-info record, by
    /// offset.
    jited: Vec<(u64, u32)>,
    /// Source line ("file:line  text") of the instructions from each index on, from
    /// `bpftool prog dump xlated linum`.
    source: BTreeMap<u32, String>,
}

impl ProgramLines {
    /// The source line of the instruction holding JIT offset `off`.
    fn source_of(&self, off: u64) -> Option<&str> {
        let i = self
            .jited
            .partition_point(|&(o, _)| o <= off)
            .checked_sub(1)?;
        let insn = self.jited[i].1;
        self.source
            .range(..=insn)
            .next_back()
            .map(|(_, s)| s.as_str())
    }
}

/// Reads every program of ours that appears until `stop`, once per tag (copies of one
/// object share it), and returns them by tag.
fn watch_programs(stop: &AtomicBool) -> HashMap<String, ProgramLines> {
    let mut seen_ids = std::collections::HashSet::new();
    let mut by_tag: HashMap<String, ProgramLines> = HashMap::new();
    loop {
        let last = stop.load(Ordering::SeqCst);
        let mut id = 0;
        while let Some(next) = bpf::next_prog_id(id) {
            id = next;
            if !seen_ids.insert(id) {
                continue;
            }
            let Ok(info) = bpf::prog_info(id) else {
                continue;
            };
            if !PROGRAM_PREFIXES.iter().any(|p| info.name.starts_with(p))
                || by_tag.contains_key(&info.tag)
            {
                continue;
            }
            let mut cmd = Command::new("bpftool");
            cmd.args(["prog", "dump", "xlated", "id", &id.to_string(), "linum"]);
            // A program unloaded meanwhile: the next copy of the object is read instead.
            let Ok(xlated) = process::output(&mut cmd) else {
                seen_ids.remove(&id);
                continue;
            };
            by_tag.insert(
                info.tag.clone(),
                ProgramLines {
                    jited: info.jited_lines,
                    source: parse_linum(&xlated, bpf::map_name),
                },
            );
        }
        if last {
            return by_tag;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The source line each run of instructions of a `bpftool prog dump xlated linum` listing
/// comes from: `; text [file:PATH line_num:N line_col:C]` comments before instructions
/// `  12: (79) r1 = ...`. A run that loads a map (`r1 = map[id:N]`) is labelled with the
/// first map's name (`map_name`), so the inlined lookups of aya's one `fun(map, key)` line
/// tell their maps apart.
fn parse_linum(text: &str, map_name: impl Fn(u32) -> Option<String>) -> BTreeMap<u32, String> {
    let mut out: BTreeMap<u32, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    // The run being read: its first instruction, and whether its label names a map yet.
    let mut run: Option<(u32, bool)> = None;
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix(';') {
            current = Some(source_label(comment));
        } else if let Some((index, insn)) = line.trim_start().split_once(':')
            && let Ok(index) = index.parse::<u32>()
        {
            if let Some(label) = current.take() {
                out.insert(index, label);
                run = Some((index, false));
            }
            if let Some((start, false)) = run
                && let Some(id) = insn
                    .split_once("map[id:")
                    .and_then(|(_, rest)| rest.split_once(']'))
                    .and_then(|(id, _)| id.parse::<u32>().ok())
                && let Some(label) = out.get_mut(&start)
            {
                let name = map_name(id).unwrap_or_else(|| format!("map {id}"));
                let _ = write!(label, " ({name})");
                run = Some((start, true));
            }
        }
    }
    out
}

/// `file.rs:N  text` of a linum comment (` text [file:/a/b/file.rs line_num:N line_col:C]`);
/// paths inside the workspace are shown relative to it, others by their last two parts.
fn source_label(comment: &str) -> String {
    let (text, meta) = comment
        .rsplit_once('[')
        .map_or((comment, ""), |(t, m)| (t, m));
    let mut file = "?";
    let mut line = "?";
    for part in meta.trim_end_matches(']').split_whitespace() {
        if let Some(f) = part.strip_prefix("file:") {
            file = f;
        } else if let Some(l) = part.strip_prefix("line_num:") {
            line = l;
        }
    }
    let root = process::workspace_root();
    let shown = match Path::new(file).strip_prefix(&root) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => {
            let p = PathBuf::from(file);
            let parts: Vec<_> = p.iter().rev().take(2).collect();
            parts
                .iter()
                .rev()
                .map(|s| s.to_string_lossy())
                .collect::<Vec<_>>()
                .join("/")
        }
    };
    let text: String = text.trim().chars().take(70).collect();
    format!("{shown}:{line} `{text}`")
}

// ---------------------------------------------------------------------------------------------
// Samples

/// A program as perf names it: `bpf_prog_<tag>_<name>` (kernel/bpf/core.c,
/// `bpf_get_prog_name`); `None` for other symbols and programs not ours.
fn program_of(sym: &str) -> Option<(&str, &str)> {
    let rest = sym.strip_prefix("bpf_prog_")?;
    let (tag, name) = rest.split_once('_')?;
    (tag.len() == 16 && PROGRAM_PREFIXES.iter().any(|p| name.starts_with(p))).then_some((tag, name))
}

/// `sym+0xoff` of a `perf script` frame line (`\t ffffffff81234567 sym+0x1f`).
fn frame(line: &str) -> Option<(&str, u64)> {
    let symoff = line.split_whitespace().nth(1)?;
    match symoff.rsplit_once("+0x") {
        Some((sym, off)) => Some((sym, u64::from_str_radix(off, 16).ok()?)),
        None => Some((symoff, 0)),
    }
}

/// Samples of our programs, by program tag.
#[derive(Default)]
struct Profile {
    programs: BTreeMap<String, ProgramSamples>,
    all: u64,
}

#[derive(Default)]
struct ProgramSamples {
    name: String,
    total: u64,
    /// Own-code samples by JIT offset (of the instruction that was running).
    own: HashMap<u64, u64>,
    /// Samples in kernel functions, by the function the program called.
    called: HashMap<String, u64>,
}

impl Profile {
    /// Adds one sample, given its call chain (leaf first).
    fn add<S: AsRef<str>>(&mut self, chain: &[S]) {
        if chain.is_empty() {
            return;
        }
        self.all += 1;
        let frames: Vec<(&str, u64)> = chain.iter().filter_map(|l| frame(l.as_ref())).collect();
        let Some((depth, tag, name)) = frames
            .iter()
            .enumerate()
            .find_map(|(i, (sym, _))| program_of(sym).map(|(t, n)| (i, t, n)))
        else {
            return;
        };
        let p = self.programs.entry(tag.to_owned()).or_default();
        p.name = name.to_owned();
        p.total += 1;
        if depth == 0 {
            // One byte back: inside the instruction that was running (see the module docs).
            *p.own.entry(frames[0].1.saturating_sub(1)).or_default() += 1;
        } else {
            *p.called.entry(frames[depth - 1].0.to_owned()).or_default() += 1;
        }
    }

    fn render(&self, heading: &str, lines: &HashMap<String, ProgramLines>, top: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# Profile: {heading}\n");
        let _ = writeln!(
            out,
            "{} samples in all; a program's share counts the samples whose call chain holds it. Own code by source line (one byte back from the sampled address), kernel functions by the one the program called. Shares of samples, not time per packet.\n",
            self.all
        );
        let mut programs: Vec<(&String, &ProgramSamples)> = self.programs.iter().collect();
        programs.sort_by_key(|p| std::cmp::Reverse(p.1.total));
        let _ = writeln!(
            out,
            "| program | tag | samples | own code | kernel functions |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|");
        for (tag, p) in &programs {
            let own: u64 = p.own.values().sum();
            let _ = writeln!(
                out,
                "| {} | {tag} | {} | {} | {} |",
                p.name,
                p.total,
                pct(own, p.total),
                pct(p.total - own, p.total)
            );
        }
        for (tag, p) in programs {
            if !p.name.starts_with("viscum_") {
                continue;
            }
            let _ = writeln!(out, "\n## {} ({tag}), {} samples\n", p.name, p.total);
            let mut called: Vec<_> = p.called.iter().collect();
            called.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let _ = writeln!(out, "| kernel function called | samples | share |");
            let _ = writeln!(out, "|---|---:|---:|");
            for (f, n) in called.iter().take(top) {
                let _ = writeln!(out, "| {f} | {n} | {} |", pct(**n, p.total));
            }
            let mut by_line: HashMap<&str, u64> = HashMap::new();
            let table = lines.get(tag);
            for (off, n) in &p.own {
                let src = table
                    .and_then(|t| t.source_of(*off))
                    .unwrap_or("(no line table: the program was not seen loaded)");
                *by_line.entry(src).or_default() += n;
            }
            let mut by_line: Vec<_> = by_line.into_iter().collect();
            by_line.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            let _ = writeln!(out, "\n| own code, source line | samples | share |");
            let _ = writeln!(out, "|---|---:|---:|");
            for (src, n) in by_line.iter().take(top) {
                let _ = writeln!(
                    out,
                    "| {} | {n} | {} |",
                    src.replace('|', "\\|"),
                    pct(*n, p.total)
                );
            }
        }
        out
    }
}

fn pct(n: u64, total: u64) -> String {
    if total == 0 {
        return "–".into();
    }
    format!("{:.1} %", n as f64 * 100.0 / total as f64)
}

// ---------------------------------------------------------------------------------------------
// bpf(2), for what bpftool does not print without libbfd: the JIT line table

mod bpf {
    use std::{
        io,
        os::fd::{FromRawFd as _, OwnedFd},
    };

    use nix::libc;

    const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    /// Offset of `name` in struct bpf_map_info, and the struct's size up to it and past.
    const MAP_NAME: usize = 24;
    const MAP_INFO_LEN: usize = 88;

    // Offsets in struct bpf_prog_info (include/uapi/linux/bpf.h), stable ABI.
    const TAG: usize = 8;
    const NAME: usize = 64;
    const NR_LINE_INFO: usize = 148;
    const LINE_INFO: usize = 152;
    const JITED_LINE_INFO: usize = 160;
    const NR_JITED_LINE_INFO: usize = 168;
    const LINE_INFO_REC_SIZE: usize = 172;
    const JITED_LINE_INFO_REC_SIZE: usize = 176;
    const INFO_LEN: usize = 232;

    /// What the profile needs of a loaded program.
    pub struct Info {
        pub name: String,
        pub tag: String,
        /// (offset in the JIT image, translated instruction) per line-info record.
        pub jited_lines: Vec<(u64, u32)>,
    }

    fn sys_bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a buffer of its length, laid out as `cmd` expects.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// The next loaded program's id after `id`.
    pub fn next_prog_id(id: u32) -> Option<u32> {
        let mut attr = [0u8; 12];
        attr[..4].copy_from_slice(&id.to_ne_bytes());
        sys_bpf(BPF_PROG_GET_NEXT_ID, &mut attr).ok()?;
        Some(u32::from_ne_bytes(attr[4..8].try_into().ok()?))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
    }

    fn info_by_fd(fd: &OwnedFd, info: &mut [u8]) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        let mut attr = [0u8; 16];
        attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
        sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
    }

    /// The name of map `id`, if it is still loaded.
    pub fn map_name(id: u32) -> Option<String> {
        let mut attr = [0u8; 12];
        attr[..4].copy_from_slice(&id.to_ne_bytes());
        let fd = sys_bpf(BPF_MAP_GET_FD_BY_ID, &mut attr).ok()?;
        // SAFETY: a descriptor the kernel just gave us, owned from here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut info = [0u8; MAP_INFO_LEN];
        info_by_fd(&fd, &mut info).ok()?;
        let name = &info[MAP_NAME..MAP_NAME + 16];
        let len = name.iter().position(|&b| b == 0).unwrap_or(16);
        Some(String::from_utf8_lossy(&name[..len]).into_owned())
    }

    /// Name, tag and JIT line table of program `id`.
    pub fn prog_info(id: u32) -> io::Result<Info> {
        let mut attr = [0u8; 12];
        attr[..4].copy_from_slice(&id.to_ne_bytes());
        let fd = sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
        // SAFETY: a descriptor the kernel just gave us, owned from here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut info = [0u8; INFO_LEN];
        info_by_fd(&fd, &mut info)?;
        let name_bytes = &info[NAME..NAME + 16];
        let name_len = name_bytes.iter().position(|&b| b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&name_bytes[..name_len]).into_owned();
        let tag: String = info[TAG..TAG + 8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let nr_lines = u32_at(&info, NR_LINE_INFO) as usize;
        let nr_jited = u32_at(&info, NR_JITED_LINE_INFO) as usize;
        let line_rec = u32_at(&info, LINE_INFO_REC_SIZE) as usize;
        let jited_rec = u32_at(&info, JITED_LINE_INFO_REC_SIZE) as usize;
        if nr_lines == 0 || nr_jited != nr_lines || line_rec < 4 || jited_rec != 8 {
            return Ok(Info {
                name,
                tag,
                jited_lines: Vec::new(),
            });
        }
        let mut lines = vec![0u8; nr_lines * line_rec];
        let mut jited = vec![0u8; nr_jited * jited_rec];
        let mut req = [0u8; INFO_LEN];
        req[NR_LINE_INFO..NR_LINE_INFO + 4].copy_from_slice(&(nr_lines as u32).to_ne_bytes());
        req[LINE_INFO..LINE_INFO + 8].copy_from_slice(&(lines.as_mut_ptr() as u64).to_ne_bytes());
        req[JITED_LINE_INFO..JITED_LINE_INFO + 8]
            .copy_from_slice(&(jited.as_mut_ptr() as u64).to_ne_bytes());
        req[NR_JITED_LINE_INFO..NR_JITED_LINE_INFO + 4]
            .copy_from_slice(&(nr_jited as u32).to_ne_bytes());
        req[LINE_INFO_REC_SIZE..LINE_INFO_REC_SIZE + 4]
            .copy_from_slice(&(line_rec as u32).to_ne_bytes());
        req[JITED_LINE_INFO_REC_SIZE..JITED_LINE_INFO_REC_SIZE + 4]
            .copy_from_slice(&(jited_rec as u32).to_ne_bytes());
        info_by_fd(&fd, &mut req)?;
        // The first record's address is the program's start (kernel/bpf/core.c,
        // bpf_prog_fill_jited_linfo).
        let addr =
            |i: usize| u64::from_ne_bytes(jited[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let base = addr(0);
        let mut jited_lines: Vec<(u64, u32)> = (0..nr_lines)
            .map(|i| (addr(i).wrapping_sub(base), u32_at(&lines, i * line_rec)))
            .collect();
        jited_lines.sort_unstable();
        Ok(Info {
            name,
            tag,
            jited_lines,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_linum_listing_gives_each_run_of_instructions_its_source_line() {
        let text = "int viscum_ingress(struct __sk_buff * skb):\n\
            ; #[classifier] [file:/x/viscum-ebpf/src/main.rs line_num:76 line_col:1]\n   0: (bf) r6 = r1\n   1: (b7) r0 = 0\n\
            ; tick < slot.valid_until_tick [file:/x/viscum-ebpf/src/cache.rs line_num:139 line_col:5]\n   2: (79) r1 = *(u64 *)(r1 +40)\n   3: (95) exit\n\
            ; fun(map, key) [file:/r/aya-ebpf-bindings-0.2.0/src/x86_64/helpers.rs line_num:10 line_col:5]\n   4: (18) r1 = map[id:7]\n   6: (18) r2 = map[id:8]\n";
        let src = parse_linum(text, |id| (id == 7).then(|| "VISCUM_CONFIG".to_owned()));
        assert_eq!(src.len(), 3);
        assert!(
            src[&4].ends_with("`fun(map, key)` (VISCUM_CONFIG)"),
            "{}",
            src[&4]
        );
        assert!(
            src[&0].ends_with("main.rs:76 `#[classifier]`"),
            "{}",
            src[&0]
        );
        assert!(src[&2].contains("cache.rs:139"), "{}", src[&2]);
        let p = ProgramLines {
            jited: vec![(0, 0), (0x20, 2)],
            source: src,
        };
        assert!(p.source_of(0x1f).unwrap().contains("main.rs:76"));
        assert!(p.source_of(0x20).unwrap().contains("cache.rs:139"));
        assert!(p.source_of(0x400).unwrap().contains("cache.rs:139"));
    }

    #[test]
    fn samples_go_to_the_program_in_their_chain() {
        let mut prof = Profile::default();
        // Own code: the address is looked up one byte back.
        prof.add(&[
            "\t ffffffffc0001234 bpf_prog_6b9f7ddce8e65484_viscum_ingress+0x282d",
            "\t ffffffff81a00000 tcx_run+0x40",
        ]);
        // A helper's callee: the function the program called gets it.
        prof.add(&[
            "\t ffffffff81300000 bpf_lru_pop_free+0x10",
            "\t ffffffff81300100 htab_lru_map_update_elem+0x80",
            "\t ffffffffc0001234 bpf_prog_6b9f7ddce8e65484_viscum_ingress+0x100",
        ]);
        // Not ours.
        prof.add(&["\t ffffffff8225f8ab pv_native_safe_halt+0xb"]);
        prof.add(&["\t ffffffffc0009999 bpf_prog_0123456789abcdef_other_prog+0x10"]);
        assert_eq!(prof.all, 4);
        let p = &prof.programs["6b9f7ddce8e65484"];
        assert_eq!((p.name.as_str(), p.total), ("viscum_ingress", 2));
        assert_eq!(p.own.get(&0x282c), Some(&1));
        assert_eq!(p.called.get("htab_lru_map_update_elem"), Some(&1));
        assert_eq!(prof.programs.len(), 1);
    }
}
