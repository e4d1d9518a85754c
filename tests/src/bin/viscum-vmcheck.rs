//! `viscum-vmcheck`: the guest runner of the VM kernel matrix. See [`viscum_tests::vmcheck`].

fn main() -> std::process::ExitCode {
    // `viscum-vmcheck hog ...`: the load of the multi-tenant checks (see viscum_tests::hog).
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("hog") {
        return std::process::ExitCode::from(viscum_tests::hog::main(&args[1..]));
    }
    viscum_tests::vmcheck::main()
}
