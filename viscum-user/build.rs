//! Builds the eBPF classifier with aya-build so the `viscum` binary embeds it
//! (one file is all an edge box needs).

use anyhow::{Context as _, anyhow};

pub(crate) fn main() -> anyhow::Result<()> {
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
    // aya-build asks to rerun when the eBPF package's directory changes, but
    // cargo compares a directory's own mtime, which an edit of a file inside
    // it does not touch: name every source file of the eBPF crate and of the
    // types it shares, or an edited classifier is silently not rebuilt.
    for dir in [root_dir.join("src"), root_dir.join("../viscum-common/src")] {
        watch(dir.as_std_path())?;
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// `rerun-if-changed` for every file under `dir`, recursively.
fn watch(dir: &std::path::Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            watch(&path)?;
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    println!("cargo:rerun-if-changed={}", dir.display());
    Ok(())
}
