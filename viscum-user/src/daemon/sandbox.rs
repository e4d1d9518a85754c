//! What a service process is denied before its first instruction: capabilities, new
//! privileges, the host's `/tmp`, and the system calls a network service never needs.
//!
//! [`process::spawn_child`](super::process::spawn_child) applies it between fork and exec,
//! around the change of account:
//!
//! 1. [`Sandbox::private_tmp`]: a mount namespace of its own (`unshare(CLONE_NEWNS)`), `/`
//!    made a recursive slave (mounts made inside never reach the host; the host's still
//!    arrive), and a fresh tmpfs on `/tmp` (mode 1777, `nosuid,nodev`). The service sees an
//!    empty `/tmp`, not the host's sockets, lock files and keys; its files vanish with it.
//!    `/var/tmp` is not made private.
//! 2. [`Sandbox::drop_bounding_set`]: every capability out of the bounding set
//!    (`PR_CAPBSET_DROP` needs `CAP_SETPCAP`, so this comes before the uid changes).
//! 3. `setgroups`, `setgid`, `setuid` (in process.rs).
//! 4. [`Sandbox::finish`]: the ambient set cleared, then `capset` with every set
//!    (effective, permitted, inheritable) empty, so even a service configured as `root`
//!    runs without capabilities and, with the bounding set empty, gets none back at exec;
//!    `no_new_privs`, so no setuid binary or file capability gives any back either; last
//!    the seccomp filters, which need `no_new_privs` (or `CAP_SYS_ADMIN`, already gone).
//!
//! The seccomp filter (the policy in [`seccomp_bpf`]) allows everything
//! except, answered with `EPERM`: kernel modules (`init_module`, `finit_module`,
//! `delete_module`), `bpf`, mounts (`mount`, `umount`, `umount2`, `pivot_root`, `move_mount`,
//! `fsopen`, `fsconfig`, `fsmount`, `fspick`, `open_tree`, `open_tree_attr`,
//! `mount_setattr`), `ptrace`, `process_vm_readv`/`writev`, `kexec_load`/`kexec_file_load`,
//! `reboot`, `swapon`/`swapoff`, `perf_event_open`, the kernel keyring (`keyctl`, `add_key`,
//! `request_key`), `open_by_handle_at` (reads any file by handle), `userfaultfd`, `acct`,
//! and new user namespaces (`unshare` or `clone` with `CLONE_NEWUSER`, the door to most
//! of the above for an unprivileged process); `clone3`, whose flags a filter cannot read,
//! answers `ENOSYS`, so the C library falls back to `clone` (as Docker's default profile
//! does). `setns` is left alone: entering a user namespace needs `CAP_SYS_ADMIN` in it,
//! which only its creator has, and creating one is what is denied.
//!
//! Each filter first checks the architecture (`seccomp_data.arch`): a system call made
//! through another ABI (a 32-bit i386 binary on x86_64) kills the process, since its
//! numbers would slip past the list. On x86_64 the x32 numbers of the listed calls are
//! denied too. On x86_64, aarch64 and riscv64 the `seccompiler` crate (rust-vmm's, as used
//! by Firecracker) compiles the policy; on arm (EABI), mips and mipsel (o32), s390x and
//! 32-bit powerpc, which it has no tables for, [`seccomp_bpf::build`]
//! writes the same policy as a classic-BPF program itself. On any other architecture
//! (big-endian arm, mips64, ...) the service runs without a filter and [`seccomp_status`]
//! says so; everything else above applies everywhere. A kernel built without
//! `CONFIG_SECCOMP_FILTER` is the same: no filter, said once in the daemon's log.

use std::{io, sync::OnceLock};

use super::seccomp_bpf;

/// The capability sets of `capset(2)` (`struct __user_cap_header_struct`).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// One 32-bit slice of the capability sets (`struct __user_cap_data_struct`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, as two [`CapData`].
const CAP_VERSION_3: u32 = 0x2008_0522;

/// The highest capability number any kernel knows so far is 40 (`CAP_CHECKPOINT_RESTORE`);
/// the bounding-set loop stops at the kernel's own last one, or at `EINVAL`.
const CAP_LAST_FALLBACK: u32 = 63;

/// Everything the sandbox needs, prepared before the fork (the child may not allocate).
pub struct Sandbox {
    /// `/proc/sys/kernel/cap_last_cap`.
    cap_last: u32,
    /// Compiled filters, installed in order; empty where unsupported.
    filters: &'static [Vec<libc::sock_filter>],
}

/// Whether services get a seccomp filter here, and if not, why (for the log).
pub fn seccomp_status() -> Result<(), &'static str> {
    if filters().is_empty() {
        return Err(if SUPPORTED_ARCH {
            "the kernel has no seccomp filters (CONFIG_SECCOMP_FILTER)"
        } else {
            "the seccomp filter is not available on this architecture"
        });
    }
    Ok(())
}

impl Sandbox {
    /// Reads what the child will need. Never fails: unknowns fall back to safe defaults.
    pub fn prepare() -> Sandbox {
        static CHECKED: std::sync::Once = std::sync::Once::new();
        CHECKED.call_once(check_own_capabilities);
        let cap_last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(CAP_LAST_FALLBACK);
        Sandbox {
            cap_last,
            filters: filters(),
        }
    }

    /// Step 1 (before the account changes): own mount namespace, fresh `/tmp`.
    /// Async-signal-safe.
    ///
    /// # Errors
    /// The errno of `unshare` or `mount`; the step is also named on stderr (the service log).
    pub fn private_tmp(&self) -> io::Result<()> {
        // SAFETY: raw syscalls on static C strings.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return fail(b"viscum: cannot enter a mount namespace of its own\n");
            }
            if libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ) != 0
            {
                return fail(b"viscum: cannot make / a slave mount\n");
            }
            if libc::mount(
                c"tmpfs".as_ptr(),
                c"/tmp".as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=1777".as_ptr().cast(),
            ) != 0
            {
                return fail(b"viscum: cannot mount a private tmpfs on /tmp\n");
            }
        }
        Ok(())
    }

    /// Step 2 (before the account changes): empties the bounding set. Async-signal-safe.
    ///
    /// # Errors
    /// The errno of `prctl(PR_CAPBSET_DROP)` other than `EINVAL` (a capability this kernel
    /// does not know).
    pub fn drop_bounding_set(&self) -> io::Result<()> {
        for cap in 0..=self.cap_last {
            // SAFETY: plain prctl.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) } != 0
            {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return fail_with(b"viscum: cannot drop the capability bounding set\n", e);
            }
        }
        Ok(())
    }

    /// Step 4 (after the account changed): no capabilities in any set, `no_new_privs`,
    /// the seccomp filters. Async-signal-safe.
    ///
    /// # Errors
    /// The errno of the failing call (named on stderr). A kernel without ambient
    /// capabilities (before 4.3) or without seccomp filters is not an error.
    pub fn finish(&self) -> io::Result<()> {
        // SAFETY: raw syscalls on data owned by `self` or on the stack.
        unsafe {
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
                && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return fail(b"viscum: cannot clear the ambient capabilities\n");
            }
            let header = CapHeader {
                version: CAP_VERSION_3,
                pid: 0,
            };
            let data = [CapData::default(); 2];
            if libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) != 0 {
                return fail(b"viscum: cannot clear the capability sets\n");
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return fail(b"viscum: cannot set no_new_privs\n");
            }
            for filter in self.filters {
                let prog = libc::sock_fprog {
                    len: filter.len() as libc::c_ushort,
                    filter: filter.as_ptr().cast_mut(),
                };
                if libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &raw const prog,
                ) != 0
                {
                    return fail(b"viscum: cannot install the seccomp filter\n");
                }
            }
        }
        Ok(())
    }
}

/// Says once, in the daemon's log, why every service would fail to start when the daemon
/// lacks what the sandbox needs (a unit file's `CapabilityBoundingSet=` without them): the
/// child can only report an errno.
fn check_own_capabilities() {
    const NEEDED: [(u32, &str, &str); 2] = [
        (
            8,
            "CAP_SETPCAP",
            "empty the services' capability bounding set",
        ),
        (21, "CAP_SYS_ADMIN", "give services a private /tmp"),
    ];
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return;
    };
    for (cap, name, why) in NEEDED {
        if eff & (1 << cap) == 0 {
            log::error!(
                "the daemon lacks {name}, needed to {why}: services will not start (add it to the daemon's capabilities)"
            );
        }
    }
}

/// Names the failed step on stderr (already the service's log) and returns the errno.
fn fail(msg: &[u8]) -> io::Result<()> {
    fail_with(msg, io::Error::last_os_error())
}

fn fail_with(msg: &[u8], e: io::Error) -> io::Result<()> {
    // SAFETY: write(2) of a static buffer is async-signal-safe; its result does not matter.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    Err(e)
}

/// Does this kernel take seccomp filters? `PR_GET_SECCOMP` fails with `EINVAL` without
/// `CONFIG_SECCOMP`; the filter mode itself is probed by installing nothing: a
/// `SECCOMP_GET_ACTION_AVAIL` query (Linux 4.14) answers only where filters exist.
fn kernel_has_seccomp_filters() -> bool {
    let action: u32 = libc::SECCOMP_RET_ERRNO;
    // SAFETY: plain syscall reading a u32 we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &raw const action,
        )
    };
    rc == 0
}

/// Whether `seccompiler` builds this architecture's filters.
const SECCOMPILER_ARCH: bool = cfg!(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
));

/// Whether this build has the filters at all.
const SUPPORTED_ARCH: bool = SECCOMPILER_ARCH || seccomp_bpf::native().is_some();

/// The filters of this architecture: `seccompiler`'s where it has tables, else the
/// hand-built program of [`seccomp_bpf`].
fn build_filters() -> Result<Vec<Vec<libc::sock_filter>>, String> {
    #[cfg(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    ))]
    return filter::build();
    #[cfg(not(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    )))]
    match seccomp_bpf::native() {
        Some(abi) => seccomp_bpf::build(abi).map(|p| vec![p]),
        None => Ok(Vec::new()),
    }
}

/// The compiled filters, built once per daemon.
fn filters() -> &'static [Vec<libc::sock_filter>] {
    static FILTERS: OnceLock<Vec<Vec<libc::sock_filter>>> = OnceLock::new();
    FILTERS.get_or_init(|| {
        if !SUPPORTED_ARCH {
            log::info!(
                "services run without a seccomp filter: none is built for this architecture (docs/operations.md)"
            );
        } else if !kernel_has_seccomp_filters() {
            log::warn!(
                "services run without a seccomp filter: the kernel has none (CONFIG_SECCOMP_FILTER)"
            );
        } else {
            match build_filters() {
                Ok(f) => return f,
                Err(e) => log::error!("cannot build the services' seccomp filter: {e}"),
            }
        }
        Vec::new()
    })
}

#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
mod filter {
    //! The policy of [`seccomp_bpf`] as `seccompiler` rules, numbered by the `libc` crate.

    use std::collections::BTreeMap;

    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };

    use super::seccomp_bpf::{DENIED, DENIED_NEWUSER, ENOSYS};

    #[cfg(target_arch = "x86_64")]
    const ARCH: TargetArch = TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    const ARCH: TargetArch = TargetArch::aarch64;
    #[cfg(target_arch = "riscv64")]
    const ARCH: TargetArch = TargetArch::riscv64;

    /// Policy calls this architecture does not have: only `umount2` unmounts on x86_64 and
    /// asm-generic (aarch64, riscv64).
    pub(super) const ABSENT: &[&str] = &["umount"];

    /// The number of policy call `name` here (`None`: absent or unknown).
    pub(super) fn nr(name: &str) -> Option<libc::c_long> {
        Some(match name {
            "init_module" => libc::SYS_init_module,
            "finit_module" => libc::SYS_finit_module,
            "delete_module" => libc::SYS_delete_module,
            "bpf" => libc::SYS_bpf,
            "mount" => libc::SYS_mount,
            "umount2" => libc::SYS_umount2,
            "pivot_root" => libc::SYS_pivot_root,
            "move_mount" => libc::SYS_move_mount,
            "fsopen" => libc::SYS_fsopen,
            "fsconfig" => libc::SYS_fsconfig,
            "fsmount" => libc::SYS_fsmount,
            "fspick" => libc::SYS_fspick,
            "open_tree" => libc::SYS_open_tree,
            // Linux 6.15; libc has no constant yet. 467 in every table since the numbers
            // were unified at 424 (arch/x86/entry/syscalls/syscall_64.tbl,
            // include/uapi/asm-generic/unistd.h).
            "open_tree_attr" => 467,
            "mount_setattr" => libc::SYS_mount_setattr,
            "ptrace" => libc::SYS_ptrace,
            "process_vm_readv" => libc::SYS_process_vm_readv,
            "process_vm_writev" => libc::SYS_process_vm_writev,
            "kexec_load" => libc::SYS_kexec_load,
            #[cfg(target_arch = "x86_64")]
            "kexec_file_load" => libc::SYS_kexec_file_load,
            // asm-generic/unistd.h (aarch64, riscv64): 294; libc has no constant for it on
            // aarch64 musl nor riscv64.
            #[cfg(not(target_arch = "x86_64"))]
            "kexec_file_load" => 294,
            "reboot" => libc::SYS_reboot,
            "swapon" => libc::SYS_swapon,
            "swapoff" => libc::SYS_swapoff,
            "perf_event_open" => libc::SYS_perf_event_open,
            "keyctl" => libc::SYS_keyctl,
            "add_key" => libc::SYS_add_key,
            "request_key" => libc::SYS_request_key,
            "open_by_handle_at" => libc::SYS_open_by_handle_at,
            "userfaultfd" => libc::SYS_userfaultfd,
            "acct" => libc::SYS_acct,
            "unshare" => libc::SYS_unshare,
            "clone" => libc::SYS_clone,
            "clone3" => libc::SYS_clone3,
            _ => return None,
        })
    }

    /// The numbers of `names`; a name neither numbered nor in [`ABSENT`] is an error.
    fn nrs(names: &[&str]) -> Result<Vec<libc::c_long>, String> {
        let mut out = Vec::new();
        for name in names {
            match nr(name) {
                Some(n) => out.push(n),
                None if ABSENT.contains(name) => {}
                None => return Err(format!("no system call number for {name}")),
            }
        }
        Ok(out)
    }

    /// x86_64's x32 ABI: the same calls with bit 30 set; a handful have numbers of their
    /// own (x32-only entries of arch/x86/entry/syscalls/syscall_64.tbl: ptrace 521,
    /// kexec_load 528, process_vm_readv 539, process_vm_writev 540).
    #[cfg(target_arch = "x86_64")]
    pub(super) fn with_x32(nrs: &[libc::c_long], x32_only: &[libc::c_long]) -> Vec<libc::c_long> {
        const X32: libc::c_long = 0x4000_0000;
        let mut all = nrs.to_vec();
        all.extend(nrs.iter().map(|n| n | X32));
        all.extend(x32_only.iter().map(|n| n | X32));
        all
    }
    #[cfg(not(target_arch = "x86_64"))]
    pub(super) fn with_x32(nrs: &[libc::c_long], _: &[libc::c_long]) -> Vec<libc::c_long> {
        nrs.to_vec()
    }

    /// The x32-only numbers of denied calls.
    pub(super) const X32_ONLY: &[libc::c_long] = &[521, 528, 539, 540];

    /// The filters to install, in order: the `EPERM` list, then `clone3` → `ENOSYS`.
    ///
    /// # Errors
    /// `seccompiler`'s, or a policy call without a number here.
    pub(super) fn build() -> Result<Vec<Vec<libc::sock_filter>>, String> {
        let err = |e: seccompiler::BackendError| e.to_string();
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for nr in with_x32(&nrs(DENIED)?, X32_ONLY) {
            rules.insert(nr, Vec::new());
        }
        // The flags are the first argument of `unshare` and, on these three architectures,
        // of `clone` too.
        let newuser = SeccompRule::new(vec![
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(libc::CLONE_NEWUSER as u64),
                libc::CLONE_NEWUSER as u64,
            )
            .map_err(err)?,
        ])
        .map_err(err)?;
        for nr in with_x32(&nrs(DENIED_NEWUSER)?, &[]) {
            rules.insert(nr, vec![newuser.clone()]);
        }
        let eperm = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            ARCH,
        )
        .map_err(err)?;
        let clone3 = SeccompFilter::new(
            with_x32(&nrs(ENOSYS)?, &[])
                .into_iter()
                .map(|nr| (nr, Vec::new()))
                .collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            ARCH,
        )
        .map_err(err)?;
        let to_libc = |prog: BpfProgram| {
            prog.into_iter()
                .map(|i| libc::sock_filter {
                    code: i.code,
                    jt: i.jt,
                    jf: i.jf,
                    k: i.k,
                })
                .collect::<Vec<_>>()
        };
        Ok(vec![
            to_libc(BpfProgram::try_from(eperm).map_err(err)?),
            to_libc(BpfProgram::try_from(clone3).map_err(err)?),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_build_where_supported() {
        assert!(SUPPORTED_ARCH || seccomp_status().is_err());
        if !SUPPORTED_ARCH {
            return;
        }
        let built = build_filters().expect("the filters compile");
        assert!(!built.is_empty());
        // The arch check (3 instructions) and a compare per denied call at least.
        assert!(built[0].len() > 3 + seccomp_bpf::DENIED.len() - 2);
        // qemu-user (the cross targets' unit tests) has no seccomp: no filter, said so.
        if kernel_has_seccomp_filters() {
            assert_eq!(seccomp_status(), Ok(()));
            assert_eq!(filters().len(), built.len());
        } else {
            assert!(seccomp_status().is_err());
        }
    }

    /// The `seccompiler` filters of this machine keep the same policy as the hand-built
    /// ones, run through the same interpreter.
    #[cfg(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    ))]
    #[test]
    fn seccompiler_filters_enforce_the_policy() {
        use seccomp_bpf::tests::{EPERM, check_policy, seccomp_data, verdict};
        #[cfg(target_arch = "x86_64")]
        let (audit_arch, harmless) = (0xc000_003e_u32, [0, 1]); // AUDIT_ARCH_X86_64; read, write
        #[cfg(target_arch = "aarch64")]
        let (audit_arch, harmless) = (0xc000_00b7_u32, [63, 64]); // AUDIT_ARCH_AARCH64
        #[cfg(target_arch = "riscv64")]
        let (audit_arch, harmless) = (0xc000_00f3_u32, [63, 64]); // AUDIT_ARCH_RISCV64
        let progs = filter::build().expect("the filters compile");
        for name in seccomp_bpf::DENIED
            .iter()
            .chain(seccomp_bpf::DENIED_NEWUSER)
            .chain(seccomp_bpf::ENOSYS)
        {
            assert!(
                filter::nr(name).is_some() != filter::ABSENT.contains(name),
                "{name}"
            );
        }
        check_policy(
            "seccompiler",
            &progs,
            audit_arch,
            false,
            0,
            &|name| filter::nr(name).map(|n| n as u32),
            &harmless,
        );
        // x32: the same calls with bit 30, and the x32-only numbers.
        #[cfg(target_arch = "x86_64")]
        for n in filter::with_x32(
            &seccomp_bpf::DENIED
                .iter()
                .filter_map(|name| filter::nr(name))
                .collect::<Vec<_>>(),
            filter::X32_ONLY,
        ) {
            let d = seccomp_data(n as u32, audit_arch, [0; 6], false);
            assert_eq!(verdict(&progs, &d, false), EPERM, "x32 {n:#x}");
        }
    }
}
