//! Builds the eBPF objects for the benches: the same aya-build step as the product's
//! (viscum-user/build.rs, reused as it is), so `OUT_DIR/viscum-bench` holds the reference
//! programs (noop, hook) the benches load.

#[path = "../viscum-user/build.rs"]
mod product;

fn main() -> anyhow::Result<()> {
    product::main()
}
