//! What this kernel offers the datapath, probed rather than guessed from the
//! version where a probe is cheap: attach mode (TCX or clsact), BTF, JIT,
//! and each BPF helper the classifiers use or may fall back from.
//!
//! `viscum attach` prints the choice it made and `viscum doctor` the whole
//! report, so a user on a router can see why something is degraded.
//!
//! Helper probes follow bpftool's `feature probe`: load a three-instruction
//! `BPF_PROG_TYPE_SCHED_CLS` program that calls the helper with
//! uninitialised arguments. A kernel that knows the helper rejects it for the
//! arguments (`R1 !read_ok`); one that does not says `invalid func` /
//! `unknown func`. Nothing stays loaded.

use std::{ffi::CStr, fs, path::Path};

use aya::util::KernelVersion;
use serde::Serialize;

use crate::engine::{EngineError, Pins};

/// `uname -r`, or `unknown` if even that fails.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// TCX (BPF links on the TC hooks, kernel commit e420bed02507, v6.6) or a
/// clsact qdisc with a `cls_bpf` filter before that. This is the rule aya
/// itself applies in `SchedClassifier::attach`, so report and action agree.
pub fn has_tcx() -> bool {
    kernel_at_least(6, 6)
}

/// Kernel version check; an unreadable version counts as "new enough"
/// because every box we target runs a modern kernel.
pub fn kernel_at_least(major: u8, minor: u8) -> bool {
    match KernelVersion::current() {
        Ok(v) => v >= KernelVersion::new(major, minor, 0),
        Err(_) => true,
    }
}

/// The embedded object's byte order must be the CPU's: a `bpfel` object on a
/// big-endian kernel (s390x, MIPS) or the reverse loads nothing useful, and
/// aya's error for it is obscure. ELF `EI_DATA` is byte 5 of the header.
///
/// # Errors
/// [`EngineError::Unsupported`] naming both byte orders.
pub fn check_object(object: &[u8]) -> Result<(), EngineError> {
    check_object_endian(object, cfg!(target_endian = "big"))
}

fn check_object_endian(object: &[u8], cpu_big: bool) -> Result<(), EngineError> {
    if object.len() < 6 || &object[..4] != b"\x7fELF" {
        return Err(EngineError::Unsupported(
            "the embedded eBPF object is not an ELF file (broken build)".into(),
        ));
    }
    let obj_big = match object[5] {
        1 => false,
        2 => true,
        other => {
            return Err(EngineError::Unsupported(format!(
                "the embedded eBPF object has an unknown ELF byte order ({other})"
            )));
        }
    };
    if obj_big != cpu_big {
        let name = |big: bool| if big { "big-endian" } else { "little-endian" };
        let obj = if obj_big { "bpfeb" } else { "bpfel" };
        return Err(EngineError::Unsupported(format!(
            "the embedded eBPF object is {} ({obj}) but this CPU is {}: this viscum binary was \
             built wrongly (build it for this target so aya-build picks the matching object)",
            name(obj_big),
            name(cpu_big)
        )));
    }
    Ok(())
}

/// BPF helpers the classifiers use, or might use where present, with the
/// kernel release that added each (include/uapi/linux/bpf.h).
pub const HELPERS: &[(&str, u32, &str)] = &[
    ("bpf_redirect", 23, "4.4"),
    ("bpf_clone_redirect", 13, "4.2"),
    ("bpf_skb_vlan_pop", 19, "4.3"),
    ("bpf_csum_diff", 28, "4.6"),
    ("bpf_fib_lookup", 69, "4.18"),
    ("bpf_skc_lookup_tcp", 99, "5.2"),
    ("bpf_jiffies64", 118, "5.5"),
    ("bpf_sk_assign", 124, "5.7"),
    ("bpf_redirect_neigh", 152, "5.10"),
    ("bpf_redirect_peer", 155, "5.10"),
    ("bpf_check_mtu", 163, "5.12"),
];

/// Helpers `viscum_ingress`/`viscum_reply` call unconditionally: without any
/// of them the object cannot load, so attach refuses up front with a clear
/// message instead of a verifier dump.
pub const REQUIRED_HELPERS: &[&str] = &[
    "bpf_redirect",
    "bpf_clone_redirect",
    "bpf_skb_vlan_pop",
    "bpf_csum_diff",
    "bpf_fib_lookup",
    "bpf_redirect_neigh",
    "bpf_redirect_peer",
    "bpf_check_mtu",
];

/// One helper's probe result.
#[derive(Debug, Clone, Serialize)]
pub struct HelperSupport {
    /// The helper's name (`bpf_redirect_peer`), as in bpf-helpers(7).
    pub name: &'static str,
    /// Its `BPF_FUNC_*` number in include/uapi/linux/bpf.h.
    pub id: u32,
    /// The kernel release that added it (`"5.10"`).
    pub since: &'static str,
    /// `None` when the probe itself could not run (no CAP_BPF, say).
    pub available: Option<bool>,
}

/// The verifier's and the JIT's view of one loaded program.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramStats {
    /// The program's name in the object (`viscum_ingress`, `viscum_reply`, ...).
    pub name: String,
    /// The kernel's program id (as `bpftool prog show id N` takes it).
    pub id: u32,
    /// Instructions the verifier processed (`verified_insns`, kernel >= 5.16).
    pub verified_insns: Option<u32>,
    /// Size of the translated (post-verifier) program, bytes.
    pub xlated_bytes: Option<u32>,
    /// Size of the JIT image, bytes; `None` when interpreted.
    pub jited_bytes: Option<u32>,
}

/// How long the kernel took to load one program (`BPF_PROG_LOAD`: the verifier, then the
/// JIT), as `viscum attach` and the daemon log it at level info when they load the datapath
/// (a reused pin loads nothing). The verifier dominates, and it is what grows with the
/// program and differs by kernel: `verified_insns` is the work, this the time it took here.
/// Logged as one line ([`ProgramLoad`]'s `Display`), which [`ProgramLoad::parse`] reads back
/// (the VM kernel matrix collects it from `viscum attach --log-level info`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProgramLoad {
    /// The program's name in the object (`viscum_ingress`, ...).
    pub name: String,
    /// Wall time of the load, ms.
    pub load_ms: f64,
    /// Instructions the verifier processed (`verified_insns`, kernel >= 5.16).
    pub verified_insns: Option<u32>,
}

/// What every [`ProgramLoad`] line starts with.
const LOADED: &str = "loaded program ";

impl std::fmt::Display for ProgramLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{LOADED}{} in {:.1} ms (verifier and JIT), verified_insns ",
            self.name, self.load_ms
        )?;
        match self.verified_insns {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("n/a"),
        }
    }
}

impl ProgramLoad {
    /// Reads a line of `viscum attach`'s log back: `None` unless the line holds one written by
    /// `Display` (a log line's prefix before it is skipped).
    pub fn parse(line: &str) -> Option<ProgramLoad> {
        let rest = &line[line.find(LOADED)? + LOADED.len()..];
        let (name, rest) = rest.split_once(" in ")?;
        let (ms, rest) = rest.split_once(" ms (verifier and JIT), verified_insns ")?;
        let insns = rest.split_whitespace().next()?;
        Some(ProgramLoad {
            name: name.to_owned(),
            load_ms: ms.parse().ok()?,
            verified_insns: if insns == "n/a" {
                None
            } else {
                Some(insns.parse().ok()?)
            },
        })
    }
}

/// Everything `viscum doctor` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The kernel release ([`kernel_release`], `uname -r`).
    pub kernel: String,
    /// The machine (`uname -m`: `x86_64`, `aarch64`, `mips`, ...), `unknown` if
    /// uname fails.
    pub arch: String,
    /// This build's byte order and so the BPF object it embeds:
    /// `little-endian (bpfel)` or `big-endian (bpfeb)`.
    pub byte_order: &'static str,
    /// `tcx` or `clsact`.
    pub attach_mode: &'static str,
    /// `/sys/kernel/btf/vmlinux` exists.
    pub btf: bool,
    /// `/proc/sys/net/core/bpf_jit_enable`: 0 off (interpreter), 1 on, 2 on with debug.
    pub jit: Option<u8>,
    /// How redirects into service namespaces are made on this kernel.
    pub redirect: &'static str,
    /// Each helper of [`HELPERS`], probed with `BPF_PROG_TYPE_SCHED_CLS`.
    pub helpers: Vec<HelperSupport>,
    /// Helpers the datapath requires that this kernel lacks (empty = fine).
    pub missing: Vec<&'static str>,
    /// Programs pinned under the instance's bpffs directory, if loaded.
    pub programs: Vec<ProgramStats>,
    /// What this network namespace's forwarding settings break ([`forwarding_problems`]);
    /// empty when both families forward.
    pub forwarding: Vec<String>,
}

/// The families whose forwarding is off in this network namespace, as warnings naming the
/// sysctl: replies from service namespaces are forwarded to clients (`bpf_fib_lookup` answers
/// `BPF_FIB_LKUP_RET_FWD_DISABLED` and the stack drops them when it is off), so edge flows of
/// that family hang while their entries count them as live. Read from
/// `/proc/sys/net/ipv4/ip_forward` and `/proc/sys/net/ipv6/conf/all/forwarding`; a family
/// whose file cannot be read (IPv6 disabled) is not reported.
pub fn forwarding_problems() -> Vec<String> {
    let off = |path: &str| {
        fs::read_to_string(path)
            .map(|v| v.trim() == "0")
            .unwrap_or(false)
    };
    let mut out = Vec::new();
    for (family, path, sysctl) in [
        (
            "IPv4",
            "/proc/sys/net/ipv4/ip_forward",
            "net.ipv4.ip_forward",
        ),
        (
            "IPv6",
            "/proc/sys/net/ipv6/conf/all/forwarding",
            "net.ipv6.conf.all.forwarding",
        ),
    ] {
        if off(path) {
            out.push(format!(
                "{family} forwarding is off in this network namespace: replies from service namespaces cannot reach {family} clients (sysctl -w {sysctl}=1)"
            ));
        }
    }
    out
}

impl Report {
    /// Probes this kernel and reads the programs pinned under `pins`.
    pub fn probe(pins: &Pins) -> Report {
        let programs = program_stats(pins);
        let helpers = probe_helpers(|_| true);
        let missing = missing_helpers(&helpers);
        let peer = helpers
            .iter()
            .find(|h| h.name == "bpf_redirect_peer")
            .and_then(|h| h.available)
            .unwrap_or(true);
        Report {
            kernel: kernel_release(),
            arch: nix::sys::utsname::uname()
                .map(|u| u.machine().to_string_lossy().into_owned())
                .unwrap_or_else(|_| "unknown".into()),
            byte_order: if cfg!(target_endian = "big") {
                "big-endian (bpfeb)"
            } else {
                "little-endian (bpfel)"
            },
            attach_mode: if has_tcx() { "tcx" } else { "clsact" },
            btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
            jit: jit_setting(&programs),
            redirect: redirect_mode(peer),
            helpers,
            missing,
            programs,
            forwarding: forwarding_problems(),
        }
    }
}

/// `net.core.bpf_jit_enable`. The sysctl exists only in the initial network
/// namespace; run elsewhere (`nsenter --net=...`), a loaded program with a
/// JIT image still shows the JIT is on.
fn jit_setting(programs: &[ProgramStats]) -> Option<u8> {
    fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .or_else(|| {
            programs
                .iter()
                .any(|p| p.jited_bytes.is_some())
                .then_some(1)
        })
}

/// The redirect flags (`TARGET_F_PEER`, `TARGET_F_SET_MAC`) `redirect add` gives an entry
/// into a namespace on this kernel. Always a peer redirect: `bpf_redirect_peer` (5.10) is
/// one of [`REQUIRED_HELPERS`], `attach` refuses a kernel without it, and an add has the
/// loaded classifier, which calls it, so it is not probed again (a `BPF_PROG_LOAD`, a tenth
/// of a CLI add's own time, B7). The frame must reach the namespace as its own
/// (`PACKET_HOST`): a peer redirect kept the client-facing interface's classification
/// before 6.15, so the classifier marks the skb itself (`TARGET_F_SET_MAC`); from 6.15 the
/// helper does (kernel commit c4327229948879) and the flag, a helper call on every packet
/// of every edge flow, is left off, as [`redirect_mode`] reports.
pub fn entry_redirect_flags() -> u32 {
    use viscum_common::{TARGET_F_PEER, TARGET_F_SET_MAC};
    if kernel_at_least(6, 15) {
        TARGET_F_PEER
    } else {
        TARGET_F_PEER | TARGET_F_SET_MAC
    }
}

/// How a hit enters its namespace, given `bpf_redirect_peer` support.
pub fn redirect_mode(peer: bool) -> &'static str {
    if !peer {
        return "bpf_redirect to the host veth + destination MAC rewrite";
    }
    // What `redirect add` writes on this kernel ([`entry_redirect_flags`] holds the 6.15 rule).
    if entry_redirect_flags() & viscum_common::TARGET_F_SET_MAC != 0 {
        "bpf_redirect_peer + PACKET_HOST mark"
    } else {
        "bpf_redirect_peer"
    }
}

/// Is `bpf_redirect_peer` usable? Probed once per process; assumed when the
/// probe cannot run.
pub fn has_redirect_peer() -> bool {
    static PEER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PEER.get_or_init(|| probe_helper(155).unwrap_or(true))
}

/// Probes the helpers of [`HELPERS`] whose names `which` selects.
fn probe_helpers(which: impl Fn(&str) -> bool) -> Vec<HelperSupport> {
    HELPERS
        .iter()
        .filter(|(name, _, _)| which(name))
        .map(|&(name, id, since)| HelperSupport {
            name,
            id,
            since,
            available: probe_helper(id),
        })
        .collect()
}

fn missing_helpers(helpers: &[HelperSupport]) -> Vec<&'static str> {
    helpers
        .iter()
        .filter(|h| REQUIRED_HELPERS.contains(&h.name) && h.available == Some(false))
        .map(|h| h.name)
        .collect()
}

/// Refuses, naming every missing helper, when this kernel cannot run the
/// datapath at all.
///
/// # Errors
/// [`EngineError::Unsupported`] listing each of [`REQUIRED_HELPERS`] the probe found
/// missing, with the release that added it. A probe that cannot run (no `CAP_BPF`)
/// counts as present: the load then gives the real answer.
pub fn check_required_helpers() -> Result<(), EngineError> {
    let helpers = probe_helpers(|name| REQUIRED_HELPERS.contains(&name));
    let missing: Vec<String> = helpers
        .iter()
        .filter(|h| h.available == Some(false))
        .map(|h| format!("{} (Linux {})", h.name, h.since))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(EngineError::Unsupported(format!(
        "kernel {} lacks BPF helpers the datapath needs: {}; Viscum needs Linux 5.12 or later (5.15 and 6.1+ are tested)",
        kernel_release(),
        missing.join(", ")
    )))
}

/// Stats of the programs pinned under `pins` (those that exist).
pub fn program_stats(pins: &Pins) -> Vec<ProgramStats> {
    let mut out = Vec::new();
    for (name, path) in [
        (viscum_common::INGRESS_PROG, pins.program()),
        (viscum_common::REPLY_PROG, pins.reply_program()),
        (
            viscum_common::ICMP_INGRESS_PROG,
            pins.icmp_ingress_program(),
        ),
        (viscum_common::ICMP_REPLY_PROG, pins.icmp_reply_program()),
        (viscum_common::RECOVER_PROG, pins.recover_program()),
    ] {
        if !path.exists() {
            continue;
        }
        // Not through `SchedClassifier::from_pin`, which makes aya probe the kernel's
        // features (see `engine::attach`'s `pinned_program_id`).
        let Ok(info) = aya::programs::ProgramInfo::from_pin(&path) else {
            continue;
        };
        out.push(ProgramStats {
            name: name.to_owned(),
            id: info.id(),
            verified_insns: info.verified_instruction_count().filter(|&n| n > 0),
            xlated_bytes: info.size_translated().filter(|&n| n > 0),
            jited_bytes: Some(info.size_jitted()).filter(|&n| n > 0),
        });
    }
    out
}

/// `BPF_PROG_LOAD` of `call <helper>; r0 = 0; exit` as a TC classifier.
/// `Some(true)`: the kernel knows the helper; `Some(false)`: it does not;
/// `None`: the probe could not tell (no privilege, unexpected error).
pub fn probe_helper(id: u32) -> Option<bool> {
    // struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; }:
    // every register field is 0 here, so the nibble order (which follows the
    // CPU's bit-field layout) does not matter.
    fn insn(code: u8, imm: i32) -> u64 {
        let mut b = [0u8; 8];
        b[0] = code;
        b[4..8].copy_from_slice(&imm.to_ne_bytes());
        u64::from_ne_bytes(b)
    }
    const BPF_JMP_CALL: u8 = 0x85;
    const BPF_ALU64_MOV_K: u8 = 0xb7;
    const BPF_EXIT: u8 = 0x95;
    let insns = [
        insn(BPF_JMP_CALL, id as i32),
        insn(BPF_ALU64_MOV_K, 0),
        insn(BPF_EXIT, 0),
    ];
    let log = match load_raw_classifier("viscum_probe", &insns) {
        // The descriptor closes on drop: the program was only a question.
        Ok(_fd) => return Some(true),
        Err(e) => e.log,
    };
    // "invalid func" (id beyond this kernel's list), "unknown func" (older
    // wording), "cannot use helper" (known, but not for TC programs).
    if log.contains("invalid func")
        || log.contains("unknown func")
        || log.contains("cannot use helper")
    {
        Some(false)
    } else if log.is_empty() {
        None
    } else {
        Some(true)
    }
}

/// A `BPF_PROG_LOAD` the kernel refused.
#[derive(Debug)]
pub struct RawLoadError {
    /// The `bpf(2)` error (`EINVAL` for a program the verifier rejects, `EPERM` without
    /// CAP_BPF/CAP_SYS_ADMIN).
    pub error: std::io::Error,
    /// The verifier's log (level 1, at most 4 KiB), empty if it wrote none.
    pub log: String,
}

/// Loads raw instructions as a `BPF_PROG_TYPE_SCHED_CLS` program named `name` (at most 15
/// bytes are kept), GPL-licensed, with no BTF and no expected attach type, through the plain
/// `bpf(BPF_PROG_LOAD)` syscall (bpf(2)). `insns` are `struct bpf_insn`s in the CPU's byte
/// order. For tiny hand-assembled programs (helper probes, test fixtures); real programs go
/// through aya. Returns the program's descriptor, or the errno and the verifier's log.
pub fn load_raw_classifier(
    name: &str,
    insns: &[u64],
) -> Result<std::os::fd::OwnedFd, RawLoadError> {
    use std::os::fd::FromRawFd as _;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    const BPF_PROG_LOAD: libc::c_long = 5;
    // `union bpf_attr` for BPF_PROG_LOAD up to `expected_attach_type`, zero-padded (the
    // kernel accepts a longer attr as long as the tail is zero).
    #[repr(C)]
    struct ProgLoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
        zero: [u64; 8],
    }
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut prog_name = [0u8; 16];
    let len = name.len().min(15);
    prog_name[..len].copy_from_slice(&name.as_bytes()[..len]);
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: u32::try_from(insns.len()).unwrap_or(u32::MAX),
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: 0,
        zero: [0; 8],
    };
    // SAFETY: the attr struct and the buffers it points to outlive the call; the kernel only
    // writes into `log`, within log_size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &raw const attr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a fresh descriptor the kernel just returned to us.
        return Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) });
    }
    let error = std::io::Error::last_os_error();
    let log = CStr::from_bytes_until_nul(&log)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    Err(RawLoadError { error, log })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(data: u8) -> Vec<u8> {
        let mut v = b"\x7fELF".to_vec();
        v.extend([2, data, 1, 0]);
        v
    }

    #[test]
    fn a_program_load_line_reads_back_from_a_log_line() {
        let load = ProgramLoad {
            name: "viscum_ingress".into(),
            load_ms: 212.46,
            verified_insns: Some(45_123),
        };
        let line = format!("[2026-12-03T08:00:00Z INFO  viscum::engine::attach] {load}");
        let back = ProgramLoad::parse(&line).unwrap();
        assert_eq!(back.name, "viscum_ingress");
        assert!((back.load_ms - 212.5).abs() < 1e-9, "{}", back.load_ms);
        assert_eq!(back.verified_insns, Some(45_123));
        let old_kernel = ProgramLoad {
            verified_insns: None,
            ..load
        };
        assert_eq!(
            ProgramLoad::parse(&old_kernel.to_string())
                .unwrap()
                .verified_insns,
            None
        );
        for other in [
            "attached to lan0 (tcx; kernel 6.1.0; redirect: peer)",
            "loaded program viscum_reply in fast ms (verifier and JIT), verified_insns 1",
            "loaded program viscum_reply in 3.0 ms (verifier and JIT), verified_insns many",
        ] {
            assert_eq!(ProgramLoad::parse(other), None, "{other}");
        }
    }

    #[test]
    fn object_byte_order_must_match_the_cpu() {
        assert!(check_object_endian(&elf(1), false).is_ok());
        assert!(check_object_endian(&elf(2), true).is_ok());
        let e = check_object_endian(&elf(2), false).unwrap_err().to_string();
        assert!(
            e.contains("big-endian (bpfeb)") && e.contains("CPU is little-endian"),
            "{e}"
        );
        let e = check_object_endian(&elf(1), true).unwrap_err().to_string();
        assert!(
            e.contains("little-endian (bpfel)") && e.contains("CPU is big-endian"),
            "{e}"
        );
        assert!(check_object_endian(b"nope", false).is_err());
        assert!(check_object_endian(&elf(7), false).is_err());
    }

    #[test]
    fn helper_probes_tell_known_from_unknown() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: probing helpers needs root");
            return;
        }
        if bpf_syscall_missing() {
            eprintln!("skipped: no bpf() here (ENOSYS: qemu-user, or a kernel without BPF)");
            return;
        }
        assert_eq!(
            probe_helper(5),
            Some(true),
            "bpf_ktime_get_ns exists everywhere"
        );
        assert_eq!(
            probe_helper(23),
            Some(true),
            "bpf_redirect exists everywhere"
        );
        assert_eq!(probe_helper(999_999), Some(false), "no such helper");
    }

    /// `true` when the bpf() system call does not exist at all: qemu-user does not emulate
    /// it, so the cross-built unit tests run there (`cargo xtask dist --test`) skip what
    /// needs it. Any other answer (EINVAL for this empty command, EPERM) means it exists.
    fn bpf_syscall_missing() -> bool {
        // SAFETY: BPF_MAP_CREATE with a NULL attr of size 0 reads no memory.
        let r = unsafe { libc::syscall(libc::SYS_bpf, 0, std::ptr::null::<u8>(), 0) };
        r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS)
    }

    #[test]
    fn the_embedded_object_matches_this_cpu() {
        check_object(crate::EBPF_OBJECT).expect("embedded object byte order");
    }
}
