//! Builds the eBPF classifier with aya-build so the `viscum` binary embeds it
//! (one file is all an edge box needs).

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "viscum-ebpf")
        .ok_or_else(|| anyhow!("viscum-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("viscum-ebpf manifest has no parent directory"))?;
    // Profiles for the eBPF object live in the workspace manifest.
    println!("cargo:rerun-if-changed=../Cargo.toml");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
