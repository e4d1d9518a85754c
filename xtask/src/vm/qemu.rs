//! Booting one VM under qemu (TCG) and following its console.
//!
//! qemu runs with `-nographic`, so the guest's console (serial or SCLP) is
//! qemu's stdout. Every byte goes to `target/vm/<name>/console.log`; lines
//! holding `VMCHECK` records are parsed as they come and echoed with the VM's
//! name in front, so a developer sees progress of VMs running side by side.

use std::{
    collections::VecDeque,
    fs,
    io::{BufRead as _, BufReader, Read, Write as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{
    kernels::Kernel,
    matrix::Vm,
    report::{Record, Transcript, parse_line},
};
use crate::process;

/// Console lines kept for the report of a failed or hung guest.
const TAIL_LINES: usize = 25;
/// How long a guest may take to power off after its `VMCHECK-RESULT`
/// (normally well under a second).
const POWER_OFF_GRACE: Duration = Duration::from_secs(20);

/// What one boot produced.
#[derive(Debug)]
pub struct Boot {
    pub transcript: Transcript,
    /// From starting qemu to qemu's exit (or to killing it).
    pub wall: Duration,
    /// From starting qemu to the guest's first `VMCHECK` record: kernel boot
    /// plus the runner's start.
    pub first_record: Option<Duration>,
    /// qemu's exit status; `None` when it was killed.
    pub status: Option<ExitStatus>,
    /// Why the boot itself went wrong (hung, qemu error).
    pub problems: Vec<String>,
    /// Oddities that do not change the verdict (a guest that printed its
    /// result but did not power off and was killed).
    pub warnings: Vec<String>,
    /// The last console lines.
    pub tail: Vec<String>,
    pub console_log: PathBuf,
}

/// The qemu command line for `vm` (also written to `boot.sh` with `--keep`).
pub fn command(vm: &Vm, kernel: &Kernel, initramfs: &Path) -> Command {
    let (program, machine) = vm.arch.qemu();
    let mut cmd = Command::new(program);
    cmd.args(machine)
        // KVM here is a nested software hypervisor stock kernels do not boot
        // under (docs/kernel-matrix.md); TCG it is, on every arch.
        // thread=single runs both vCPUs in one host thread: with multi-threaded
        // TCG, the x86 kernels' int3-based live code patching races between
        // vCPUs and oopses at boot ("Oops: int3" in sched_clock_cpu: 1 of 30
        // 6.12 boots, none of 30 single-threaded, at the same boot time). The
        // runner's heavy work (the verifier) is single-threaded anyway, and
        // one host core per VM is what two VMs at a time on two cores get.
        .args(["-accel", "tcg,thread=single", "-smp", "2", "-m", "1024"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(format!(
            "console={} panic=-1 quiet vmcheck.name={}",
            vm.arch.console(),
            vm.name
        ));
    cmd
}

enum Event {
    Line(String),
    Eof,
}

/// Boots `vm` and follows it until qemu exits or `timeout` passes (then the
/// guest is killed and reported with its last console lines).
pub fn boot(
    vm: &Vm,
    kernel: &Kernel,
    initramfs: &Path,
    dir: &Path,
    timeout: Duration,
) -> Result<Boot> {
    let console_log = dir.join("console.log");
    let mut log = fs::File::create(&console_log)
        .with_context(|| format!("cannot create {}", console_log.display()))?;
    let mut cmd = command(vm, kernel, initramfs);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    writeln!(log, "# {}", process::display(&cmd))?;
    println!("[{}] + {}", vm.name, process::display(&cmd));
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", process::display(&cmd)))?;

    let (tx, rx) = mpsc::channel();
    let readers = [
        spawn_reader(child.stdout.take().expect("piped"), "", tx.clone()),
        spawn_reader(child.stderr.take().expect("piped"), "qemu: ", tx),
    ];

    let mut transcript = Transcript::default();
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut first_record = None;
    let mut result_at: Option<Instant> = None;
    let mut open_streams = readers.len();
    let mut killed = false;
    while open_streams > 0 {
        let deadline = match result_at {
            Some(at) => (at + POWER_OFF_GRACE).min(started + timeout),
            None => started + timeout,
        };
        let wait = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Event::Line(line)) => {
                writeln!(log, "{line}")?;
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.clone());
                if let Some(record) = parse_line(&line) {
                    first_record.get_or_insert_with(|| started.elapsed());
                    if matches!(record, Record::Result(_)) {
                        result_at = Some(Instant::now());
                    }
                    echo(&vm.name, &record, started.elapsed());
                    transcript.add(record);
                } else if is_alarming(&line) {
                    println!("[{}] console: {}", vm.name, line.trim());
                }
            }
            Ok(Event::Eof) => open_streams -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if result_at.is_some() {
                    // Everything the guest had to say is in. Seen once in
                    // about 25 s390x boots: the runner called
                    // reboot(RB_POWER_OFF) and the 6.1 kernel never got to
                    // power off under TCG. Not the code under test: a
                    // warning, not a failure.
                    let why = format!(
                        "the guest did not power off within {}s of its VMCHECK-RESULT; killed it",
                        POWER_OFF_GRACE.as_secs()
                    );
                    println!("[{}] warning: {why}", vm.name);
                    warnings.push(why);
                } else {
                    let why = format!(
                        "timed out after {}s: the guest was killed",
                        timeout.as_secs()
                    );
                    println!("[{}] {why}", vm.name);
                    problems.push(why);
                }
                let _ = child.kill();
                killed = true;
                // The readers see EOF once qemu is gone.
                while let Ok(event) = rx.recv_timeout(Duration::from_secs(10)) {
                    if let Event::Line(line) = event {
                        writeln!(log, "{line}")?;
                    }
                }
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().context("waiting for qemu")?;
    let wall = started.elapsed();
    for reader in readers {
        let _ = reader.join();
    }
    writeln!(log, "# qemu: {status}, {:.1}s", wall.as_secs_f64())?;
    let status = (!killed).then_some(status);
    if let Some(status) = status
        && !status.success()
    {
        problems.push(format!("qemu exited with {status}"));
    }
    Ok(Boot {
        transcript,
        wall,
        first_record,
        status,
        problems,
        warnings,
        tail: tail.into(),
        console_log,
    })
}

/// Forwards the lines of `stream` (lossy UTF-8, see [`clean`]) until EOF.
fn spawn_reader(
    stream: impl Read + Send + 'static,
    prefix: &'static str,
    tx: mpsc::Sender<Event>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = clean(&String::from_utf8_lossy(&buf));
                    if tx.send(Event::Line(format!("{prefix}{line}"))).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Event::Eof);
    })
}

/// A console line without terminal control: ANSI escape sequences (the
/// x86 firmware clears the screen) and other control characters are
/// dropped, so echoing the line cannot wreck the developer's terminal.
pub fn clean(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ parameters... final byte in @..~; other
                // escapes: ESC plus one character.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Prints a record as it arrives, prefixed with the VM name and time.
fn echo(vm: &str, record: &Record, at: Duration) {
    let t = at.as_secs_f64();
    match record {
        Record::Progress(text) => println!("[{vm} {t:6.1}s] {text}"),
        Record::Case(case) => println!(
            "[{vm} {t:6.1}s] case {} {} ({} ms){}",
            case.name,
            if case.pass { "pass" } else { "FAIL" },
            case.ms,
            if case.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", case.detail)
            }
        ),
        Record::Report(report) => println!(
            "[{vm} {t:6.1}s] report: kernel {} ({}), {} programs",
            report.kernel,
            report.arch,
            report.programs.len()
        ),
        Record::Result(pass) => println!(
            "[{vm} {t:6.1}s] result: {}",
            if *pass { "PASS" } else { "FAIL" }
        ),
        Record::Malformed { line, why } => {
            println!("[{vm} {t:6.1}s] malformed record ({why}): {line}");
        }
    }
}

/// Kernel lines worth showing live even though they are no record.
fn is_alarming(line: &str) -> bool {
    [
        "Kernel panic",
        "BUG:",
        "Oops",
        "WARNING:",
        "qemu: ",
        "Unable to mount root",
        "No working init",
    ]
    .iter()
    .any(|p| line.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_lose_terminal_control() {
        assert_eq!(
            clean("Booting from ROM..c\x1b[?7l\x1b[2JVMCHECK-RESULT PASS\r\n"),
            "Booting from ROM..cVMCHECK-RESULT PASS"
        );
        assert_eq!(clean("\x1b[0mSeaBIOS\x1bc x\ty"), "SeaBIOS x\ty");
        assert_eq!(clean("plain"), "plain");
    }
}
