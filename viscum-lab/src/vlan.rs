//! 802.1Q tagging done by tiny TC programs, for kernels built without 8021q.
//!
//! Some kernels (this project's 6.18 test machines among them) have neither
//! `CONFIG_VLAN_8021Q` nor the `vlan` TC action, so no VLAN device can be created. The lab
//! then tags and untags frames itself with `bpf_skb_vlan_push`/`bpf_skb_vlan_pop`, which are
//! part of the core kernel: the trunk between client and edge still carries tagged frames,
//! which is what viscum's classifier must handle.
//!
//! The programs are a handful of raw instructions loaded with `bpf(2)` and attached with TCX
//! links; closing a link's descriptor detaches it. They return `TCX_NEXT`, so they never
//! hide a packet from another program on the same hook.

use std::{
    ffi::c_long,
    io, mem,
    os::fd::{FromRawFd, OwnedFd},
};

use viscum::netns;

/// `bpf(2)` commands.
const BPF_LINK_CREATE: c_long = 28;
/// `enum bpf_attach_type`.
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// Helper ids (`enum bpf_func_id`).
const FUNC_SKB_VLAN_PUSH: i32 = 18;
const FUNC_SKB_VLAN_POP: i32 = 19;
/// `TCX_NEXT`: let the next program (or the stack) decide.
const TCX_NEXT: i32 = -1;
const ETH_P_8021Q: u16 = 0x8100;

/// What a tagger does to each frame.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Tag {
    /// Push an 802.1Q tag with this VLAN id (egress).
    Push(u16),
    /// Pop the outer tag if there is one (ingress).
    Pop,
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn mov64_imm(dst: u8, imm: i32) -> Insn {
    // BPF_ALU64 | BPF_MOV | BPF_K
    Insn {
        code: 0xb7,
        regs: dst,
        off: 0,
        imm,
    }
}

const fn call(func: i32) -> Insn {
    // BPF_JMP | BPF_CALL
    Insn {
        code: 0x85,
        regs: 0,
        off: 0,
        imm: func,
    }
}

const EXIT: Insn = Insn {
    code: 0x95,
    regs: 0,
    off: 0,
    imm: 0,
};

fn program(tag: Tag) -> Vec<Insn> {
    // r1 holds the skb on entry and is what both helpers take first.
    let mut insns = match tag {
        Tag::Push(vid) => vec![
            // The protocol argument is a __be16.
            mov64_imm(2, i32::from(ETH_P_8021Q.to_be())),
            mov64_imm(3, i32::from(vid)),
            call(FUNC_SKB_VLAN_PUSH),
        ],
        Tag::Pop => vec![call(FUNC_SKB_VLAN_POP)],
    };
    insns.extend([mov64_imm(0, TCX_NEXT), EXIT]);
    insns
}

/// `union bpf_attr` for BPF_LINK_CREATE with the `tcx` member, zero-padded.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
    _zero: [u64; 4],
}

fn bpf<T>(cmd: c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix of the given size; the
    // kernel only reads it (and the buffers it points to, which outlive the call).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut::<T>(attr).cast::<libc::c_void>(),
            mem::size_of::<T>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn load(tag: Tag) -> io::Result<OwnedFd> {
    // `Insn` is `struct bpf_insn` (8 bytes, the CPU's byte order), so each is one u64.
    let insns: Vec<u64> = program(tag)
        .iter()
        .map(|i| {
            let mut b = [0u8; 8];
            b[0] = i.code;
            b[1] = i.regs;
            b[2..4].copy_from_slice(&i.off.to_ne_bytes());
            b[4..8].copy_from_slice(&i.imm.to_ne_bytes());
            u64::from_ne_bytes(b)
        })
        .collect();
    viscum::features::load_raw_classifier("lab_vlan_tag", &insns).map_err(|e| {
        io::Error::new(
            e.error.kind(),
            format!("load vlan {tag:?} program: {}: {}", e.error, e.log),
        )
    })
}

/// Loads a tagger and attaches it with a TCX link to interface `ifindex` of namespace `ns`
/// (ingress or egress). Dropping the returned link descriptor detaches it.
pub(crate) fn attach(ns: &str, ifindex: u32, ingress: bool, tag: Tag) -> io::Result<OwnedFd> {
    let prog = load(tag)?;
    // The kernel resolves target_ifindex in the calling thread's network namespace.
    netns::in_netns(ns, move || {
        let mut attr = LinkCreateAttr {
            prog_fd: std::os::fd::AsRawFd::as_raw_fd(&prog) as u32,
            target_ifindex: ifindex,
            attach_type: if ingress {
                BPF_TCX_INGRESS
            } else {
                BPF_TCX_EGRESS
            },
            flags: 0,
            relative_fd: 0,
            _pad: 0,
            expected_revision: 0,
            _zero: [0; 4],
        };
        bpf(BPF_LINK_CREATE, &mut attr)
    })
    .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_have_the_kernel_layout() {
        assert_eq!(mem::offset_of!(LinkCreateAttr, relative_fd), 16);
        assert_eq!(mem::offset_of!(LinkCreateAttr, expected_revision), 24);
        assert_eq!(mem::size_of::<Insn>(), 8);
    }

    #[test]
    fn programs_end_with_tcx_next() {
        for tag in [Tag::Push(42), Tag::Pop] {
            let p = program(tag);
            assert_eq!(p.last().unwrap().code, 0x95);
            assert_eq!(p[p.len() - 2].imm, TCX_NEXT);
        }
    }
}
