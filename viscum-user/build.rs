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
    )?;
    strip_dwarf()
}

/// Drops the DWARF sections from the eBPF object before it is embedded. bpf-linker needs
/// them to write the object's BTF (`debug = 2` in the workspace profile), but the loader
/// reads only the BTF (`.BTF`, `.BTF.ext`: types, function and line info for the verifier);
/// the `.debug_*` sections and their relocations are ~830 KB of a 1.05 MB object, in every
/// `viscum` binary (a router's budget is 5 MiB, docs/router-builds.md). `llvm-objcopy
/// --strip-debug` keeps every other section. Without an llvm-objcopy the object is embedded
/// whole, with a warning.
fn strip_dwarf() -> anyhow::Result<()> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    let object = out.join("viscum");
    println!("cargo:rerun-if-env-changed=LLVM_OBJCOPY");
    // The LLVM that bpf-linker uses (llvm-config-22, docs/toolchain.md), then PATH.
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("LLVM_OBJCOPY") {
        candidates.push(p.into());
    }
    if let Ok(o) = std::process::Command::new("llvm-config-22")
        .arg("--bindir")
        .output()
        && o.status.success()
    {
        let dir = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        candidates.push(std::path::Path::new(&dir).join("llvm-objcopy"));
    }
    candidates.extend(["llvm-objcopy-22".into(), "llvm-objcopy".into()]);
    for tool in &candidates {
        match std::process::Command::new(tool)
            .arg("--strip-debug")
            .arg(&object)
            .status()
        {
            Ok(s) if s.success() => return Ok(()),
            Ok(s) => anyhow::bail!("{} --strip-debug {}: {s}", tool.display(), object.display()),
            Err(_) => continue,
        }
    }
    println!(
        "cargo:warning=no llvm-objcopy found (tried {}): the eBPF object is embedded with its DWARF (~830 KB more)",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
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
