//! Shape of the embedded eBPF object that the verifier of some kernels insists on, checked
//! at build time on every host rather than only where such a kernel boots.

use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

/// A program that tail-calls (the classifiers reach the ICMP and flow-recovery programs
/// that way) may not also make a BPF-to-BPF call when the kernel runs the interpreter: 6.1
/// on s390x has no JIT here and refuses such a program ("tail_calls are not allowed in
/// non-JITed programs with bpf-to-bpf calls", kernel/bpf/verifier.c). LLVM turns a
/// `memset`/`memcpy` it could not expand, or a function it chose not to inline, into
/// exactly such a call, and nothing on an x86 host with a JIT would notice. So no program
/// may call into `.text` at all.
#[test]
fn no_program_calls_a_subprogram() {
    let file = object::File::parse(viscum::EBPF_OBJECT).expect("the embedded eBPF object is ELF");
    let mut calls = Vec::new();
    let programs: Vec<_> = file
        .sections()
        .filter(|s| s.name().is_ok_and(|n| n == "classifier"))
        .collect();
    assert!(!programs.is_empty(), "no classifier section in the object");
    for section in programs {
        for (offset, reloc) in section.relocations() {
            let RelocationTarget::Symbol(index) = reloc.target() else {
                continue;
            };
            let Ok(symbol) = file.symbol_by_index(index) else {
                continue;
            };
            let target_section = symbol
                .section_index()
                .and_then(|i| file.section_by_index(i).ok())
                .and_then(|s| s.name().ok().map(str::to_string));
            if target_section.as_deref() == Some(".text") {
                // The program the call sits in: the last function symbol at or before it.
                let caller = file
                    .symbols()
                    .filter(|s| {
                        s.section_index() == Some(section.index())
                            && s.kind() == object::SymbolKind::Text
                            && s.address() <= offset
                    })
                    .max_by_key(object::ObjectSymbol::address)
                    .and_then(|s| s.name().ok().map(str::to_string))
                    .unwrap_or_default();
                calls.push(format!(
                    "{caller} calls {} (at +{offset:#x})",
                    symbol.name().unwrap_or("?")
                ));
            }
        }
    }
    assert!(
        calls.is_empty(),
        "BPF-to-BPF calls in the classifiers: {calls:?}"
    );
}
