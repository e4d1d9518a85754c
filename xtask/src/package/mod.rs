//! Distribution packages built from a finished `viscum` binary: [`ipk`] for OpenWrt's opkg.
//!
//! `cargo xtask dist --openwrt` ([`crate::dist`]) builds the static binaries and calls
//! [`ipk::ipk`] (or [`ipk::ipks`]) for each. The files a package installs besides the binary
//! (init script, UCI config, hotplug script) live in `dist/openwrt/files/`, shared with the
//! OpenWrt SDK `Makefile` in `dist/openwrt/`, and are embedded here at build time.

pub mod ipk;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::process;

/// The shell scripts under `dist/`: files whose first line is a `#!` naming a POSIX shell
/// or bash (OpenWrt's init scripts start `#!/bin/sh /etc/rc.common`), or named `*.sh`.
pub fn shell_scripts(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let head = std::fs::read(&path)
                .map(|b| b.into_iter().take(64).collect::<Vec<u8>>())
                .unwrap_or_default();
            let head = String::from_utf8_lossy(&head);
            let first = head.lines().next().unwrap_or("");
            let shebang = first.starts_with("#!")
                && ["/sh", "/bash", "/ash", "/dash", "env sh", "env bash"]
                    .iter()
                    .any(|s| first.contains(s));
            if shebang || path.extension().is_some_and(|e| e == "sh") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Runs shellcheck on every shell script under the workspace's `dist/` (part of
/// `cargo xtask test`); `Ok(false)` if it found problems (printed above).
pub fn shellcheck() -> Result<bool> {
    shellcheck_dir(&process::workspace_root().join("dist"))
}

/// [`shellcheck`] for the scripts under `root` (none, or no `root`: nothing to check).
pub fn shellcheck_dir(root: &Path) -> Result<bool> {
    if !root.is_dir() {
        return Ok(true);
    }
    let scripts = shell_scripts(root)?;
    if scripts.is_empty() {
        return Ok(true);
    }
    let mut cmd = Command::new("shellcheck");
    cmd.args(["--color=never", "--external-sources"])
        .args(&scripts);
    println!("+ {}", process::display(&cmd));
    let status = cmd
        .status()
        .context("cannot run shellcheck (`cargo xtask setup` installs it)")?;
    if status.success() {
        println!(
            "shellcheck: {} script(s) under {} clean",
            scripts.len(),
            root.display()
        );
    } else {
        eprintln!(
            "error: shellcheck found problems in the scripts under {} ({status})",
            root.display()
        );
    }
    Ok(status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_openwrt_scripts() {
        let scripts = shell_scripts(&process::workspace_root().join("dist")).unwrap();
        for name in ["viscum.init", "viscum.hotplug"] {
            assert!(
                scripts.iter().any(|p| p.ends_with(name)),
                "{name} not in {scripts:?}"
            );
        }
        // The UCI config and the Makefile are not shell.
        assert!(
            !scripts
                .iter()
                .any(|p| p.ends_with("viscum.config") || p.ends_with("Makefile"))
        );
    }

    #[test]
    fn shellcheck_passes_ours_and_catches_a_bad_script() {
        assert!(
            shellcheck().unwrap(),
            "the scripts under dist/ have shellcheck findings"
        );
        let dir = std::env::temp_dir().join(format!("viscum-shellcheck-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        // SC2115/SC2086: an unquoted, possibly empty variable in front of /*.
        std::fs::write(dir.join("sub/cleanup"), "#!/bin/sh\nrm -rf $1/*\n").unwrap();
        std::fs::write(dir.join("notes.txt"), "not a script $1\n").unwrap();
        assert_eq!(shell_scripts(&dir).unwrap(), [dir.join("sub/cleanup")]);
        assert!(!shellcheck_dir(&dir).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
