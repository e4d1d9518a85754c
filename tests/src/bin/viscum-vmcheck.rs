//! `viscum-vmcheck`: the guest runner of the VM kernel matrix. See [`viscum_tests::vmcheck`].

fn main() -> std::process::ExitCode {
    viscum_tests::vmcheck::main()
}
