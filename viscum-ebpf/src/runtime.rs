//! What every eBPF object of this crate carries besides its programs: the panic handler a
//! `no_std` binary needs (the verifier rejects any program that could reach it, so it is
//! never called) and the license section the kernel reads at load time (GPL-compatible, so
//! GPL-only helpers such as `bpf_redirect_peer` and `bpf_check_mtu` may be called).
//! Shared by `main.rs` (the product's object) and `bin/bench.rs` (the benchmark floors).

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
