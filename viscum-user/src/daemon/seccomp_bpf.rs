//! The services' seccomp policy, and its classic-BPF program built by hand for the
//! architectures the `seccompiler` crate has no tables for: arm (EABI), mips and mipsel
//! (o32), s390x and powerpc (32-bit).
//!
//! [`DENIED`], [`DENIED_NEWUSER`] and [`ENOSYS`] are the one policy, by system call name;
//! [`sandbox`](super::sandbox) compiles it with `seccompiler` on x86_64, aarch64 and
//! riscv64 and with [`build`] everywhere else. Each [`Abi`] maps the names to that ABI's
//! numbers; a name missing from a table must be listed in its `absent` (the call does not
//! exist there), or [`build`] refuses the table.
//!
//! # The program
//!
//! As described in seccomp(2) and the kernel's
//! `Documentation/userspace-api/seccomp_filter.rst`: the filter runs over `struct
//! seccomp_data` (`int nr` at offset 0, `__u32 arch` at 4, `__u64 instruction_pointer` at
//! 8, `__u64 args[6]` at 16), whose 32-bit loads (`BPF_LD|BPF_W|BPF_ABS`) read the
//! machine's own byte order:
//!
//! 1. `arch` not this ABI's `AUDIT_ARCH_*` (include/uapi/linux/audit.h) →
//!    `SECCOMP_RET_KILL_PROCESS`: another ABI's numbers would slip past the list.
//! 2. On mips, `nr` outside the o32 range 4000-4999 → `SECCOMP_RET_KILL_PROCESS`: a 64-bit
//!    MIPS kernel takes n64 (5000-) and n32 (6000-) numbers from the same instruction
//!    (arch/mips/kernel/scall64-o32.S, `not_o32_scall`), while `arch` still says o32.
//! 3. Each number of [`DENIED`] → `SECCOMP_RET_ERRNO | EPERM`.
//! 4. [`DENIED_NEWUSER`] (`unshare`, `clone`) → to a test of the flags argument's low 32
//!    bits (`CLONE_NEWUSER` is bit 28): set → `EPERM`, clear → allow. `args` are `__u64`
//!    whatever the ABI, so the low word is at `16 + 8 * i` on little-endian machines and
//!    `16 + 8 * i + 4` on big-endian ones. The flags are argument 0, except `clone` on
//!    s390x (`CONFIG_CLONE_BACKWARDS2` in kernel/fork.c: `clone(newsp, clone_flags, ...)`).
//! 5. [`ENOSYS`] (`clone3`, whose flags sit in memory a filter cannot read) →
//!    `SECCOMP_RET_ERRNO | ENOSYS`, so the C library falls back to `clone`.
//! 6. Anything else → `SECCOMP_RET_ALLOW`.
//!
//! # Where the numbers come from
//!
//! The `libc` crate's `SYS_*` constants for each target (0.2.191:
//! `src/unix/linux_like/linux/musl/b32/arm/mod.rs`, `.../musl/b32/mips/mod.rs` (o32 is
//! 4000 + n), `.../musl/b64/s390x.rs`, `.../musl/b32/powerpc.rs`), written out here so that
//! every table can be built and tested on any host; where `libc` lacks a call, the kernel's
//! tables: `arch/arm/tools/syscall.tbl` (`kexec_file_load` 401, `umount` is OABI-only so
//! absent on EABI), `arch/s390/kernel/syscalls/syscall.tbl`, and 467 (`open_tree_attr`,
//! Linux 6.15) in every table since the numbers were unified at 424. A unit test compiled
//! for the native target compares the table with `libc`'s constants.

use libc::sock_filter;

/// System calls answered `EPERM` whatever their arguments: kernel modules, `bpf`, every
/// mount call (`umount` is the flag-less old form some ABIs still have), `ptrace` and
/// cross-process memory access, kexec, `reboot`, swap, `perf_event_open`, the kernel
/// keyring, `open_by_handle_at` (reads any file by handle), `userfaultfd`, `acct`.
pub const DENIED: &[&str] = &[
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "open_tree",
    "open_tree_attr",
    "mount_setattr",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "open_by_handle_at",
    "userfaultfd",
    "acct",
];

/// System calls answered `EPERM` when their flags ask for a new user namespace
/// (`CLONE_NEWUSER`), the door to most of [`DENIED`] for an unprivileged process.
pub const DENIED_NEWUSER: &[&str] = &["unshare", "clone"];

/// System calls answered `ENOSYS`: `clone3` keeps its flags in memory, out of a filter's
/// reach, and the C library falls back to `clone` on `ENOSYS` (as Docker's default profile
/// has it).
pub const ENOSYS: &[&str] = &["clone3"];

/// `CLONE_NEWUSER` (include/uapi/linux/sched.h), the same on every architecture.
pub const CLONE_NEWUSER: u32 = 0x1000_0000;

/// One system call ABI: what the filter checks and the numbers it compares.
#[derive(Debug)]
pub struct Abi {
    /// Its name, for messages and tests.
    pub name: &'static str,
    /// `AUDIT_ARCH_*` of include/uapi/linux/audit.h (`EM_*` of elf-em.h with the 64-bit and
    /// little-endian bits), as the kernel reports it in `seccomp_data.arch`.
    pub audit_arch: u32,
    /// Byte order of the machine (of `seccomp_data`'s fields).
    pub big_endian: bool,
    /// Call numbers outside `[start, end)` kill the process (see the module docs).
    pub nr_range: Option<(u32, u32)>,
    /// Which argument of `clone` holds the flags.
    pub clone_flags_arg: u32,
    /// The policy's calls and their numbers, by name.
    pub calls: &'static [(&'static str, u32)],
    /// Policy calls this ABI does not have.
    pub absent: &'static [&'static str],
}

/// arm EABI (armv7 musleabi/musleabihf). A kernel with `OABI_COMPAT` has no seccomp filters
/// (arch/arm/Kconfig: `HAVE_ARCH_SECCOMP_FILTER if AEABI && !OABI_COMPAT`), so OABI numbers
/// never reach a filter; an arm64 kernel's 32-bit tasks report the same arch and numbers.
pub const ARM: Abi = Abi {
    name: "arm",
    audit_arch: 0x4000_0028, // EM_ARM 40 | __AUDIT_ARCH_LE
    big_endian: false,
    nr_range: None,
    clone_flags_arg: 0,
    calls: &[
        ("init_module", 128),
        ("finit_module", 379),
        ("delete_module", 129),
        ("bpf", 386),
        ("mount", 21),
        ("umount2", 52),
        ("pivot_root", 218),
        ("move_mount", 429),
        ("fsopen", 430),
        ("fsconfig", 431),
        ("fsmount", 432),
        ("fspick", 433),
        ("open_tree", 428),
        ("open_tree_attr", 467),
        ("mount_setattr", 442),
        ("ptrace", 26),
        ("process_vm_readv", 376),
        ("process_vm_writev", 377),
        ("kexec_load", 347),
        ("kexec_file_load", 401),
        ("reboot", 88),
        ("swapon", 87),
        ("swapoff", 115),
        ("perf_event_open", 364),
        ("keyctl", 311),
        ("add_key", 309),
        ("request_key", 310),
        ("open_by_handle_at", 371),
        ("userfaultfd", 388),
        ("acct", 51),
        ("unshare", 337),
        ("clone", 120),
        ("clone3", 435),
    ],
    absent: &["umount"],
};

/// MIPS o32 numbers (4000 + the table's number), for both byte orders.
const MIPS_O32_CALLS: &[(&str, u32)] = &[
    ("init_module", 4128),
    ("finit_module", 4348),
    ("delete_module", 4129),
    ("bpf", 4355),
    ("mount", 4021),
    ("umount", 4022),
    ("umount2", 4052),
    ("pivot_root", 4216),
    ("move_mount", 4429),
    ("fsopen", 4430),
    ("fsconfig", 4431),
    ("fsmount", 4432),
    ("fspick", 4433),
    ("open_tree", 4428),
    ("open_tree_attr", 4467),
    ("mount_setattr", 4442),
    ("ptrace", 4026),
    ("process_vm_readv", 4345),
    ("process_vm_writev", 4346),
    ("kexec_load", 4311),
    ("reboot", 4088),
    ("swapon", 4087),
    ("swapoff", 4115),
    ("perf_event_open", 4333),
    ("keyctl", 4282),
    ("add_key", 4280),
    ("request_key", 4281),
    ("open_by_handle_at", 4340),
    ("userfaultfd", 4357),
    ("acct", 4051),
    ("unshare", 4303),
    ("clone", 4120),
    ("clone3", 4435),
];

/// The o32 range (arch/mips/include/uapi/asm/unistd.h: `__NR_O32_Linux` 4000, 1000 slots).
const MIPS_O32_RANGE: Option<(u32, u32)> = Some((4000, 5000));

/// Big-endian MIPS32, o32 (mips-unknown-linux-musl: OpenWrt ath79).
pub const MIPS: Abi = Abi {
    name: "mips",
    audit_arch: 0x0000_0008, // EM_MIPS 8
    big_endian: true,
    nr_range: MIPS_O32_RANGE,
    clone_flags_arg: 0,
    calls: MIPS_O32_CALLS,
    absent: &["kexec_file_load"],
};

/// Little-endian MIPS32, o32 (mipsel-unknown-linux-musl: OpenWrt ramips).
pub const MIPSEL: Abi = Abi {
    name: "mipsel",
    audit_arch: 0x4000_0008, // EM_MIPS 8 | __AUDIT_ARCH_LE
    big_endian: false,
    nr_range: MIPS_O32_RANGE,
    clone_flags_arg: 0,
    calls: MIPS_O32_CALLS,
    absent: &["kexec_file_load"],
};

/// s390x (64-bit, big-endian). Its 31-bit compat tasks report `AUDIT_ARCH_S390` and are
/// killed by the arch check.
pub const S390X: Abi = Abi {
    name: "s390x",
    audit_arch: 0x8000_0016, // EM_S390 22 | __AUDIT_ARCH_64BIT
    big_endian: true,
    nr_range: None,
    clone_flags_arg: 1,
    calls: &[
        ("init_module", 128),
        ("finit_module", 344),
        ("delete_module", 129),
        ("bpf", 351),
        ("mount", 21),
        ("umount", 22),
        ("umount2", 52),
        ("pivot_root", 217),
        ("move_mount", 429),
        ("fsopen", 430),
        ("fsconfig", 431),
        ("fsmount", 432),
        ("fspick", 433),
        ("open_tree", 428),
        ("open_tree_attr", 467),
        ("mount_setattr", 442),
        ("ptrace", 26),
        ("process_vm_readv", 340),
        ("process_vm_writev", 341),
        ("kexec_load", 277),
        ("kexec_file_load", 381),
        ("reboot", 88),
        ("swapon", 87),
        ("swapoff", 115),
        ("perf_event_open", 331),
        ("keyctl", 280),
        ("add_key", 278),
        ("request_key", 279),
        ("open_by_handle_at", 336),
        ("userfaultfd", 355),
        ("acct", 51),
        ("unshare", 303),
        ("clone", 120),
        ("clone3", 435),
    ],
    absent: &[],
};

/// 32-bit big-endian PowerPC (no release target; built where a build for it runs).
pub const POWERPC: Abi = Abi {
    name: "powerpc",
    audit_arch: 0x0000_0014, // EM_PPC 20
    big_endian: true,
    nr_range: None,
    clone_flags_arg: 0,
    calls: &[
        ("init_module", 128),
        ("finit_module", 353),
        ("delete_module", 129),
        ("bpf", 361),
        ("mount", 21),
        ("umount", 22),
        ("umount2", 52),
        ("pivot_root", 203),
        ("move_mount", 429),
        ("fsopen", 430),
        ("fsconfig", 431),
        ("fsmount", 432),
        ("fspick", 433),
        ("open_tree", 428),
        ("open_tree_attr", 467),
        ("mount_setattr", 442),
        ("ptrace", 26),
        ("process_vm_readv", 351),
        ("process_vm_writev", 352),
        ("kexec_load", 268),
        ("kexec_file_load", 382),
        ("reboot", 88),
        ("swapon", 87),
        ("swapoff", 115),
        ("perf_event_open", 319),
        ("keyctl", 271),
        ("add_key", 269),
        ("request_key", 270),
        ("open_by_handle_at", 346),
        ("userfaultfd", 364),
        ("acct", 51),
        ("unshare", 282),
        ("clone", 120),
        ("clone3", 435),
    ],
    absent: &[],
};

/// Every ABI [`build`] knows.
pub const ABIS: &[&Abi] = &[&ARM, &MIPS, &MIPSEL, &S390X, &POWERPC];

/// The ABI of this build, if [`build`] has it (the `seccompiler` architectures do not
/// need it; big-endian arm, mips64 and others have no table).
pub const fn native() -> Option<&'static Abi> {
    if cfg!(all(target_arch = "arm", target_endian = "little")) {
        Some(&ARM)
    } else if cfg!(all(target_arch = "mips", target_endian = "big")) {
        Some(&MIPS)
    } else if cfg!(all(target_arch = "mips", target_endian = "little")) {
        Some(&MIPSEL)
    } else if cfg!(target_arch = "s390x") {
        Some(&S390X)
    } else if cfg!(target_arch = "powerpc") {
        Some(&POWERPC)
    } else {
        None
    }
}

impl Abi {
    /// The number of call `name`, if this ABI has it.
    pub fn nr(&self, name: &str) -> Option<u32> {
        self.calls
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, nr)| nr)
    }

    /// The offset of the low 32 bits of `seccomp_data.args[arg]`.
    fn arg_low_word(&self, arg: u32) -> u32 {
        16 + 8 * arg + if self.big_endian { 4 } else { 0 }
    }
}

// Classic BPF opcodes (include/uapi/linux/filter.h, bpf_common.h), as `sock_filter.code`.
const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// `seccomp_data` offsets.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;

/// Where a conditional jump goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum To {
    Next,
    Allow,
    Eperm,
    Enosys,
    Kill,
    /// The flags test of argument `n`.
    FlagsOf(u32),
}

/// An instruction whose jumps are still labels.
struct Insn {
    code: u16,
    jt: To,
    jf: To,
    k: u32,
}

fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: To::Next,
        jf: To::Next,
        k,
    }
}

fn jump(code: u16, k: u32, jt: To, jf: To) -> Insn {
    Insn { code, jt, jf, k }
}

/// The filter program for `abi` (see the module docs for its shape).
///
/// # Errors
/// A policy call that `abi` neither numbers nor lists as absent (a table out of step with
/// the policy), or a jump longer than classic BPF's 255 instructions.
pub fn build(abi: &Abi) -> Result<Vec<sock_filter>, String> {
    let nr = |name: &str| -> Result<Option<u32>, String> {
        match abi.nr(name) {
            Some(n) => Ok(Some(n)),
            None if abi.absent.contains(&name) => Ok(None),
            None => Err(format!(
                "the {} seccomp table has no number for {name}",
                abi.name
            )),
        }
    };
    let mut body = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JEQ_K, abi.audit_arch, To::Next, To::Kill),
        stmt(LD_W_ABS, OFF_NR),
    ];
    if let Some((start, end)) = abi.nr_range {
        body.push(jump(JGE_K, start, To::Next, To::Kill));
        body.push(jump(JGE_K, end, To::Kill, To::Next));
    }
    for name in DENIED {
        if let Some(n) = nr(name)? {
            body.push(jump(JEQ_K, n, To::Eperm, To::Next));
        }
    }
    let mut flag_args = Vec::new();
    for name in DENIED_NEWUSER {
        let arg = if *name == "clone" {
            abi.clone_flags_arg
        } else {
            0
        };
        if let Some(n) = nr(name)? {
            body.push(jump(JEQ_K, n, To::FlagsOf(arg), To::Next));
            if !flag_args.contains(&arg) {
                flag_args.push(arg);
            }
        }
    }
    for name in ENOSYS {
        if let Some(n) = nr(name)? {
            body.push(jump(JEQ_K, n, To::Enosys, To::Next));
        }
    }
    // The tail: every jump target, each a label.
    let mut labels: Vec<(To, usize)> = Vec::new();
    let mut label = |body: &mut Vec<Insn>, to: To, insns: Vec<Insn>| {
        labels.push((to, body.len()));
        body.extend(insns);
    };
    // Every jump goes forward (the kernel's checker refuses others), so the flags tests,
    // which end in an allow, are followed by a second allow; the first is the fall-through.
    body.push(stmt(RET_K, libc::SECCOMP_RET_ALLOW));
    for arg in flag_args {
        label(
            &mut body,
            To::FlagsOf(arg),
            vec![
                stmt(LD_W_ABS, abi.arg_low_word(arg)),
                jump(JSET_K, CLONE_NEWUSER, To::Eperm, To::Allow),
            ],
        );
    }
    label(
        &mut body,
        To::Allow,
        vec![stmt(RET_K, libc::SECCOMP_RET_ALLOW)],
    );
    let errno = |e: i32| libc::SECCOMP_RET_ERRNO | (e as u32 & libc::SECCOMP_RET_DATA);
    label(&mut body, To::Eperm, vec![stmt(RET_K, errno(libc::EPERM))]);
    label(
        &mut body,
        To::Enosys,
        vec![stmt(RET_K, errno(libc::ENOSYS))],
    );
    label(
        &mut body,
        To::Kill,
        vec![stmt(RET_K, libc::SECCOMP_RET_KILL_PROCESS)],
    );
    let offset = |at: usize, to: To| -> Result<u8, String> {
        if to == To::Next {
            return Ok(0);
        }
        let target = labels
            .iter()
            .find(|(l, _)| *l == to)
            .map(|&(_, i)| i)
            .ok_or("a jump to a missing label")?;
        target
            .checked_sub(at + 1)
            .and_then(|d| u8::try_from(d).ok())
            .ok_or_else(|| format!("the {} seccomp filter has a jump out of reach", abi.name))
    };
    body.iter()
        .enumerate()
        .map(|(at, i)| {
            Ok(sock_filter {
                code: i.code,
                jt: offset(at, i.jt)?,
                jf: offset(at, i.jf)?,
                k: i.k,
            })
        })
        .collect()
}

#[cfg(test)]
pub mod tests {
    //! A classic-BPF interpreter for seccomp filters, and the policy checked against every
    //! table on any host.

    use super::*;

    /// `seccomp_data` for one call, as the kernel lays it out on a machine of `big_endian`.
    pub fn seccomp_data(nr: u32, arch: u32, args: [u64; 6], big_endian: bool) -> [u8; 64] {
        let mut d = [0u8; 64];
        let put32 = |v: u32| {
            if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        d[0..4].copy_from_slice(&put32(nr));
        d[4..8].copy_from_slice(&put32(arch));
        for (i, a) in args.iter().enumerate() {
            let b = if big_endian {
                a.to_be_bytes()
            } else {
                a.to_le_bytes()
            };
            d[16 + 8 * i..24 + 8 * i].copy_from_slice(&b);
        }
        d
    }

    /// Runs `prog` over `data` as the kernel would (the subset of classic BPF that seccomp
    /// filters use: absolute word loads, `and`, conditional and plain jumps, returns).
    /// Loads read `data` in `big_endian` order. Panics on anything else, or on running off
    /// the end, as the kernel's checker would have refused such a program.
    pub fn run(prog: &[sock_filter], data: &[u8; 64], big_endian: bool) -> u32 {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        loop {
            let i = prog.get(pc).expect("ran off the end of the program");
            pc += 1;
            let code = u32::from(i.code);
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    let off = i.k as usize;
                    assert!(off.is_multiple_of(4) && off + 4 <= 64, "load at {off}");
                    let w: [u8; 4] = data[off..off + 4].try_into().unwrap();
                    a = if big_endian {
                        u32::from_be_bytes(w)
                    } else {
                        u32::from_le_bytes(w)
                    };
                }
                c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => a &= i.k,
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                c if c == libc::BPF_JMP | libc::BPF_JA => pc += i.k as usize,
                c if c & 0x07 == libc::BPF_JMP && c & 0x08 == libc::BPF_K => {
                    let taken = match c & 0xf0 {
                        x if x == libc::BPF_JEQ => a == i.k,
                        x if x == libc::BPF_JGT => a > i.k,
                        x if x == libc::BPF_JGE => a >= i.k,
                        x if x == libc::BPF_JSET => a & i.k != 0,
                        _ => panic!("unknown jump {c:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                _ => panic!("instruction {code:#x} not in the interpreter"),
            }
        }
    }

    /// The action of a stack of filters: the most severe one wins, as in the kernel
    /// (`SECCOMP_RET_ACTION_FULL` compared as a signed number, lowest first).
    pub fn verdict(progs: &[Vec<sock_filter>], data: &[u8; 64], big_endian: bool) -> u32 {
        progs
            .iter()
            .map(|p| run(p, data, big_endian))
            .min_by_key(|r| (r & libc::SECCOMP_RET_ACTION_FULL) as i32)
            .expect("at least one filter")
    }

    /// `SECCOMP_RET_ALLOW`.
    pub const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    /// `SECCOMP_RET_ERRNO` with `EPERM`.
    pub const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    /// `SECCOMP_RET_ERRNO` with `ENOSYS`.
    pub const ENOSYS_RET: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    /// `SECCOMP_RET_KILL_PROCESS`.
    pub const KILL: u32 = libc::SECCOMP_RET_KILL_PROCESS;

    /// Everything the policy promises, for one ABI's filters. `nr` names the ABI's numbers
    /// (`None`: the call does not exist there), `harmless` are numbers that must pass,
    /// `clone_flags_arg` where `clone` keeps its flags.
    pub fn check_policy(
        what: &str,
        progs: &[Vec<sock_filter>],
        audit_arch: u32,
        big_endian: bool,
        clone_flags_arg: usize,
        nr: &dyn Fn(&str) -> Option<u32>,
        harmless: &[u32],
    ) {
        let call = |n: u32, args: [u64; 6]| {
            verdict(
                progs,
                &seccomp_data(n, audit_arch, args, big_endian),
                big_endian,
            )
        };
        let mut denied = 0;
        for name in DENIED {
            if let Some(n) = nr(name) {
                assert_eq!(call(n, [0; 6]), EPERM, "{what}: {name} ({n})");
                assert_eq!(call(n, [u64::MAX; 6]), EPERM, "{what}: {name} ({n})");
                denied += 1;
            }
        }
        assert!(denied >= DENIED.len() - 2, "{what}: only {denied} denied");
        for &n in harmless {
            assert_eq!(call(n, [0; 6]), ALLOW, "{what}: harmless call {n}");
            assert_eq!(
                call(n, [u64::from(CLONE_NEWUSER); 6]),
                ALLOW,
                "{what}: harmless call {n} with bit 28 in every argument"
            );
        }
        let newuser = u64::from(CLONE_NEWUSER);
        // A thread's flags (CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|...).
        let thread = 0x003d_0f00u64;
        for name in DENIED_NEWUSER {
            let n = nr(name).unwrap_or_else(|| panic!("{what}: no {name}"));
            let at = if *name == "clone" { clone_flags_arg } else { 0 };
            let mut args = [0u64; 6];
            args[at] = newuser | thread;
            assert_eq!(call(n, args), EPERM, "{what}: {name} with CLONE_NEWUSER");
            args[at] = thread;
            // The other arguments may carry bit 28 (a stack address, say): not a reason.
            for (i, a) in args.iter_mut().enumerate() {
                if i != at {
                    *a = newuser;
                }
            }
            assert_eq!(call(n, args), ALLOW, "{what}: {name} without CLONE_NEWUSER");
            // Bit 28 of the high word is not CLONE_NEWUSER.
            let mut args = [0u64; 6];
            args[at] = newuser << 32;
            assert_eq!(call(n, args), ALLOW, "{what}: {name}, bit 60");
        }
        for name in ENOSYS {
            let n = nr(name).unwrap_or_else(|| panic!("{what}: no {name}"));
            assert_eq!(call(n, [0; 6]), ENOSYS_RET, "{what}: {name}");
        }
        // Another ABI: killed, whatever the call; and the audit arch of another byte order
        // or width (one bit off) too.
        for other in [
            0xc000_003e, // x86_64
            0x4000_0003, // i386
            0x4000_0028, // arm
            0x0000_0008, // mips
            0x4000_0008, // mipsel
            0x8000_0016, // s390x
            0x0000_0016, // s390 (31-bit)
            0x0000_0014, // powerpc
            0xc000_00b7, // aarch64
            0xc000_00f3, // riscv64
            audit_arch ^ 0x8000_0000,
            audit_arch ^ 0x4000_0000,
        ] {
            if other == audit_arch {
                continue;
            }
            for &n in harmless.iter().chain(nr("bpf").as_slice()) {
                assert_eq!(
                    verdict(
                        progs,
                        &seccomp_data(n, other, [0; 6], big_endian),
                        big_endian
                    ),
                    KILL,
                    "{what}: call {n} from arch {other:#x}"
                );
            }
        }
    }

    /// read and write of each table (their first five entries: exit, fork, read, write,
    /// open in every one of these tables, o32 at 4000 +).
    fn harmless(abi: &Abi) -> Vec<u32> {
        let base = abi.nr_range.map_or(0, |(s, _)| s);
        vec![base + 3, base + 4]
    }

    #[test]
    fn every_table_covers_the_policy() {
        for abi in ABIS {
            for name in DENIED.iter().chain(DENIED_NEWUSER).chain(ENOSYS) {
                assert!(
                    abi.nr(name).is_some() != abi.absent.contains(name),
                    "{}: {name} must be numbered or absent, not both or neither",
                    abi.name
                );
            }
            for (name, _) in abi.calls {
                assert!(
                    DENIED
                        .iter()
                        .chain(DENIED_NEWUSER)
                        .chain(ENOSYS)
                        .any(|p| p == name),
                    "{}: {name} is in the table but not in the policy",
                    abi.name
                );
            }
            let mut nrs: Vec<u32> = abi.calls.iter().map(|&(_, n)| n).collect();
            nrs.sort_unstable();
            nrs.dedup();
            assert_eq!(nrs.len(), abi.calls.len(), "{}: a number twice", abi.name);
            if let Some((start, end)) = abi.nr_range {
                assert!(nrs.iter().all(|n| (start..end).contains(n)), "{}", abi.name);
            }
        }
    }

    #[test]
    fn every_table_enforces_the_policy() {
        for abi in ABIS {
            let prog = build(abi).unwrap_or_else(|e| panic!("{e}"));
            check_policy(
                abi.name,
                &[prog],
                abi.audit_arch,
                abi.big_endian,
                abi.clone_flags_arg as usize,
                &|name| abi.nr(name),
                &harmless(abi),
            );
        }
    }

    #[test]
    fn mips_kills_numbers_of_other_abis() {
        for abi in [&MIPS, &MIPSEL] {
            let prog = build(abi).unwrap();
            // n64 bpf (5315), n32 bpf (6319), a number below the o32 range, the indirect
            // syscall (4000, which the kernel presents as the call it makes) passes.
            for (n, want) in [(5315, KILL), (6319, KILL), (315, KILL), (4000, ALLOW)] {
                let d = seccomp_data(n, abi.audit_arch, [0; 6], abi.big_endian);
                assert_eq!(run(&prog, &d, abi.big_endian), want, "{}: {n}", abi.name);
            }
        }
    }

    #[test]
    fn the_byte_order_and_argument_matter() {
        // s390x's clone flags, in the low word of args[1] (offset 16 + 8 + 4). A table that
        // got the byte order (reading the high word) or the argument (clone's stack
        // pointer) wrong lets CLONE_NEWUSER through: the checks above would catch either.
        const WRONG_ORDER: Abi = Abi {
            name: "s390x read as little-endian",
            big_endian: false,
            ..S390X
        };
        const WRONG_ARG: Abi = Abi {
            name: "s390x with clone's flags first",
            clone_flags_arg: 0,
            ..S390X
        };
        assert_eq!(S390X.arg_low_word(1), 16 + 8 + 4);
        assert_eq!(MIPSEL.arg_low_word(0), 16);
        assert_eq!(MIPS.arg_low_word(0), 20);
        let clone = S390X.nr("clone").unwrap();
        let mut args = [0u64; 6];
        args[1] = u64::from(CLONE_NEWUSER);
        let d = seccomp_data(clone, S390X.audit_arch, args, true);
        assert_eq!(run(&build(&S390X).unwrap(), &d, true), EPERM);
        assert_eq!(run(&build(&WRONG_ORDER).unwrap(), &d, true), ALLOW);
        assert_eq!(run(&build(&WRONG_ARG).unwrap(), &d, true), ALLOW);
    }

    #[test]
    fn a_table_out_of_step_is_refused() {
        const BROKEN: Abi = Abi {
            name: "broken",
            audit_arch: 1,
            big_endian: false,
            nr_range: None,
            clone_flags_arg: 0,
            calls: &[("bpf", 1)],
            absent: &[],
        };
        let e = build(&BROKEN).unwrap_err();
        assert!(e.contains("init_module"), "{e}");
    }

    /// The hand-built program of an x86_64 table (numbers from `libc`; never used outside
    /// this test, where `seccompiler` has the real one), installed in a forked child of the
    /// test on this machine's kernel: the kernel's checker takes the program's shape, and the
    /// calls get the policy's answers for real.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_kernel_takes_the_program_and_keeps_the_policy() {
        const X86_64: Abi = Abi {
            name: "x86_64 (test)",
            audit_arch: 0xc000_003e,
            big_endian: false,
            nr_range: None,
            clone_flags_arg: 0,
            calls: &[
                ("init_module", libc::SYS_init_module as u32),
                ("finit_module", libc::SYS_finit_module as u32),
                ("delete_module", libc::SYS_delete_module as u32),
                ("bpf", libc::SYS_bpf as u32),
                ("mount", libc::SYS_mount as u32),
                ("umount2", libc::SYS_umount2 as u32),
                ("pivot_root", libc::SYS_pivot_root as u32),
                ("move_mount", libc::SYS_move_mount as u32),
                ("fsopen", libc::SYS_fsopen as u32),
                ("fsconfig", libc::SYS_fsconfig as u32),
                ("fsmount", libc::SYS_fsmount as u32),
                ("fspick", libc::SYS_fspick as u32),
                ("open_tree", libc::SYS_open_tree as u32),
                ("open_tree_attr", 467),
                ("mount_setattr", libc::SYS_mount_setattr as u32),
                ("ptrace", libc::SYS_ptrace as u32),
                ("process_vm_readv", libc::SYS_process_vm_readv as u32),
                ("process_vm_writev", libc::SYS_process_vm_writev as u32),
                ("kexec_load", libc::SYS_kexec_load as u32),
                ("kexec_file_load", libc::SYS_kexec_file_load as u32),
                ("reboot", libc::SYS_reboot as u32),
                ("swapon", libc::SYS_swapon as u32),
                ("swapoff", libc::SYS_swapoff as u32),
                ("perf_event_open", libc::SYS_perf_event_open as u32),
                ("keyctl", libc::SYS_keyctl as u32),
                ("add_key", libc::SYS_add_key as u32),
                ("request_key", libc::SYS_request_key as u32),
                ("open_by_handle_at", libc::SYS_open_by_handle_at as u32),
                ("userfaultfd", libc::SYS_userfaultfd as u32),
                ("acct", libc::SYS_acct as u32),
                ("unshare", libc::SYS_unshare as u32),
                ("clone", libc::SYS_clone as u32),
                ("clone3", libc::SYS_clone3 as u32),
            ],
            absent: &["umount"],
        };
        let prog = build(&X86_64).unwrap();
        let fprog = libc::sock_fprog {
            len: prog.len() as libc::c_ushort,
            filter: prog.as_ptr().cast_mut(),
        };
        // The child reports in its exit status: 0 all as expected, else the number of the
        // first step that was not. Only raw system calls after the fork.
        // SAFETY: fork in a test; the child makes only async-signal-safe calls and _exits.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork: {}", std::io::Error::last_os_error());
        if child == 0 {
            // SAFETY: raw syscalls on data owned by this frame.
            unsafe {
                let errno = || *libc::__errno_location();
                let step = |n: i32, ok: bool| {
                    if !ok {
                        libc::_exit(n);
                    }
                };
                step(1, libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0);
                step(
                    2,
                    libc::syscall(
                        libc::SYS_seccomp,
                        libc::SECCOMP_SET_MODE_FILTER,
                        0,
                        &raw const fprog,
                    ) == 0,
                );
                step(
                    3,
                    libc::unshare(libc::CLONE_NEWUSER) == -1 && errno() == libc::EPERM,
                );
                step(
                    4,
                    libc::syscall(libc::SYS_bpf, 5, std::ptr::null::<u8>(), 0) == -1
                        && errno() == libc::EPERM,
                );
                step(
                    5,
                    libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) == -1
                        && errno() == libc::ENOSYS,
                );
                step(6, libc::unshare(libc::CLONE_FILES) == 0);
                step(7, libc::getpid() > 0);
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(child, &raw mut status, 0) }, child);
        assert!(
            libc::WIFEXITED(status),
            "the child died: status {status:#x}"
        );
        let step = libc::WEXITSTATUS(status);
        assert_eq!(
            step, 0,
            "step {step} (1 no_new_privs, 2 the kernel refused the program, 3 unshare \
             CLONE_NEWUSER, 4 bpf, 5 clone3, 6 unshare CLONE_FILES, 7 getpid)"
        );
    }

    /// On a target with a hand-built table, the table agrees with the `libc` crate.
    #[test]
    fn native_table_matches_libc() {
        #[allow(unused_macros)]
        macro_rules! libc_nrs {
            ($($c:ident),* $(,)?) => {
                vec![$((stringify!($c).trim_start_matches("SYS_"), libc::$c as u32)),*]
            };
        }
        #[allow(unused_mut)]
        let mut pairs: Vec<(&str, u32)> = Vec::new();
        #[cfg(any(
            target_arch = "arm",
            target_arch = "mips",
            target_arch = "s390x",
            target_arch = "powerpc"
        ))]
        pairs.extend(libc_nrs!(
            SYS_init_module,
            SYS_finit_module,
            SYS_delete_module,
            SYS_bpf,
            SYS_mount,
            SYS_umount2,
            SYS_pivot_root,
            SYS_move_mount,
            SYS_fsopen,
            SYS_fsconfig,
            SYS_fsmount,
            SYS_fspick,
            SYS_open_tree,
            SYS_mount_setattr,
            SYS_ptrace,
            SYS_process_vm_readv,
            SYS_process_vm_writev,
            SYS_kexec_load,
            SYS_reboot,
            SYS_swapon,
            SYS_swapoff,
            SYS_perf_event_open,
            SYS_keyctl,
            SYS_add_key,
            SYS_request_key,
            SYS_open_by_handle_at,
            SYS_userfaultfd,
            SYS_acct,
            SYS_unshare,
            SYS_clone,
            SYS_clone3,
        ));
        #[cfg(any(target_arch = "mips", target_arch = "s390x", target_arch = "powerpc"))]
        pairs.extend(libc_nrs!(SYS_umount));
        if let Some(abi) = native() {
            assert!(!pairs.is_empty());
            for (name, n) in pairs {
                assert_eq!(abi.nr(name), Some(n), "{}: {name}", abi.name);
            }
        }
    }
}
