//! Debian kernels for the matrix: found, downloaded and unpacked with apt and
//! dpkg-deb, never installed.
//!
//! # Host apt state stays untouched
//!
//! Foreign-architecture packages need package lists for those architectures.
//! Instead of `dpkg --add-architecture` plus `apt-get update` on the host
//! (which changes the host's dpkg and apt state and leaves it half-changed if
//! interrupted), apt runs with a private state under `target/vm/apt/`: its own
//! lists and cache directories and its own `APT::Architectures`, with the
//! host's sources and configuration (mirrors, proxies). Nothing outside
//! `target/` is written, so an interrupted run cannot leave the host's apt
//! broken, and no root is needed.
//!
//! # Layout under `target/vm/`
//!
//! - `apt/lists`, `apt/cache`: the private apt state.
//! - `kernels/<package>_<version>_<arch>/`: `vmlinuz`, `modules/NN-name.ko`
//!   (decompressed, dependency order) and `kernel.json`, written last, which
//!   marks the directory complete. The unpacked package is deleted once
//!   these are extracted.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::matrix::{Arch, Vm};
use crate::process;

/// Modules the guest runner needs, by module name. Built-in ones need no file.
pub const REQUIRED_MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf"];
/// Modules the runner uses when present (VLAN cases).
pub const OPTIONAL_MODULES: &[&str] = &["8021q"];

/// On a developer machine, package lists older than this are refreshed.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// A kernel ready to boot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Kernel {
    /// Debian package name, e.g. `linux-image-6.1.0-57-amd64-unsigned`.
    pub package: String,
    /// Debian package version, e.g. `6.1.192-3`.
    pub version: String,
    /// `uname -r` of the kernel, e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// Module names built into this kernel (no file needed).
    pub builtin: Vec<String>,
    /// Optional modules this kernel has neither as file nor built in.
    pub missing_optional: Vec<String>,
    /// `modules/NN-name.ko` file names, in load order.
    pub modules: Vec<String>,
    /// The required and optional modules this directory was made for; a
    /// change of [`REQUIRED_MODULES`]/[`OPTIONAL_MODULES`] invalidates it.
    pub wanted: Vec<String>,
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The module files in load order.
    pub fn module_paths(&self) -> Vec<PathBuf> {
        let dir = self.dir.join("modules");
        self.modules.iter().map(|m| dir.join(m)).collect()
    }
}

fn wanted_modules() -> Vec<String> {
    REQUIRED_MODULES
        .iter()
        .chain(OPTIONAL_MODULES)
        .map(std::string::ToString::to_string)
        .collect()
}

/// Finds, fetches and unpacks the newest kernel of every VM in `vms`.
///
/// `work` is `target/vm`. With `fresh` (CI) the private apt state and every
/// previously unpacked kernel are deleted first, so everything booted was
/// fetched in this run; otherwise unpacked kernels of the same package
/// version are reused and lists are refreshed once a day.
///
/// Returns the kernel for each VM name.
pub fn prepare(vms: &[Vm], work: &Path, fresh: bool) -> Result<HashMap<String, Kernel>> {
    let apt = Apt::new(work.join("apt"), vms.iter().map(|vm| vm.arch));
    let kernels_dir = work.join("kernels");
    if fresh {
        for dir in [&apt.root, &kernels_dir] {
            if dir.exists() {
                fs::remove_dir_all(dir)
                    .with_context(|| format!("cannot remove {}", dir.display()))?;
            }
        }
    }
    apt.update_if_needed()?;
    let names = apt.kernel_package_names()?;

    // Which package of which architecture each VM boots.
    let mut chosen: Vec<(String, Arch, String)> = Vec::new(); // (vm, arch, package)
    for vm in vms {
        let package =
            select_newest(&vm.packages, names.iter().map(String::as_str)).with_context(|| {
                format!(
                    "VM {}: no {} package matches {:?} in the package lists",
                    vm.name, vm.arch, vm.packages
                )
            })?;
        chosen.push((vm.name.clone(), vm.arch, package.to_owned()));
    }

    // Resolve versions, find what is already unpacked, download the rest at once.
    let mut by_package: BTreeMap<(String, Arch), (String, PathBuf)> = BTreeMap::new();
    for (_, arch, package) in &chosen {
        if by_package.contains_key(&(package.clone(), *arch)) {
            continue;
        }
        let version = apt.candidate_version(package, *arch)?;
        let dir = kernels_dir.join(format!("{package}_{version}_{arch}"));
        by_package.insert((package.clone(), *arch), (version, dir));
    }
    let mut ready: HashMap<(String, Arch), Kernel> = HashMap::new();
    let mut missing = Vec::new();
    for ((package, arch), (version, dir)) in &by_package {
        match read_complete(dir) {
            Some(kernel) => {
                println!(
                    "vm: kernels: reusing {package} {version} ({arch}) from {}",
                    dir.display()
                );
                ready.insert((package.clone(), *arch), kernel);
            }
            None => missing.push((package.clone(), *arch, version.clone(), dir.clone())),
        }
    }
    if !missing.is_empty() {
        let downloads = work.join("downloads");
        if downloads.exists() {
            fs::remove_dir_all(&downloads)?;
        }
        fs::create_dir_all(&downloads)?;
        let specs: Vec<(String, Arch, String)> = missing
            .iter()
            .map(|(p, a, v, _)| (p.clone(), *a, v.clone()))
            .collect();
        apt.download(&specs, &downloads)?;
        for (package, arch, version, dir) in &missing {
            let deb = find_deb(&downloads, package, *arch)?;
            let kernel = unpack(&deb, package, version, dir)?;
            fs::remove_file(&deb).ok();
            ready.insert((package.clone(), *arch), kernel);
        }
        fs::remove_dir_all(&downloads).ok();
    }
    Ok(chosen
        .into_iter()
        .map(|(vm, arch, package)| {
            let kernel = ready[&(package, arch)].clone();
            (vm, kernel)
        })
        .collect())
}

/// The kernel unpacked in `dir`, if that finished and was made for the
/// current module lists.
fn read_complete(dir: &Path) -> Option<Kernel> {
    let text = fs::read_to_string(dir.join("kernel.json")).ok()?;
    let mut kernel: Kernel = serde_json::from_str(&text).ok()?;
    kernel.dir = dir.to_path_buf();
    let files_there =
        kernel.vmlinuz().is_file() && kernel.module_paths().iter().all(|p| p.is_file());
    (kernel.wanted == wanted_modules() && files_there).then_some(kernel)
}

/// apt with a private state directory (see the module docs).
struct Apt {
    root: PathBuf,
    arches: Vec<Arch>,
}

impl Apt {
    fn new(root: PathBuf, arches: impl IntoIterator<Item = Arch>) -> Apt {
        let mut list: Vec<Arch> = Vec::new();
        for arch in arches {
            if !list.contains(&arch) {
                list.push(arch);
            }
        }
        Apt { root, arches: list }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        let lists = self.root.join("lists");
        let cache = self.root.join("cache");
        cmd.arg("-o")
            .arg(format!("Dir::State::Lists={}", lists.display()))
            .arg("-o")
            .arg(format!("Dir::Cache={}", cache.display()));
        // `::=` appends to the list; setting it at all replaces dpkg's own
        // (host-configured) architecture list for this command only.
        for arch in &self.arches {
            cmd.arg("-o")
                .arg(format!("APT::Architectures::={}", arch.deb()));
        }
        // Only Packages indices: no translations, no AppStream metadata.
        for opt in [
            "Acquire::Languages=none",
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false",
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false",
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false",
        ] {
            cmd.args(["-o", opt]);
        }
        if process::is_root() {
            // apt drops to the `_apt` user for downloads, which cannot write
            // into a root-owned target/ (it warns and carries on as root).
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        cmd
    }

    fn stamp(&self) -> PathBuf {
        self.root.join("updated")
    }

    /// `apt-get update` into the private lists, unless they are there and
    /// younger than [`LISTS_MAX_AGE`] and made for the same architectures.
    fn update_if_needed(&self) -> Result<()> {
        let arches = self
            .arches
            .iter()
            .map(|a| a.deb())
            .collect::<Vec<_>>()
            .join(" ");
        let fresh_enough = fs::read_to_string(self.stamp()).is_ok_and(|s| s.trim() == arches)
            && fs::metadata(self.stamp())
                .and_then(|m| m.modified())
                .is_ok_and(|t| {
                    SystemTime::now()
                        .duration_since(t)
                        .is_ok_and(|age| age < LISTS_MAX_AGE)
                });
        if fresh_enough {
            return Ok(());
        }
        for dir in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(self.root.join(dir))
                .with_context(|| format!("cannot create {}", self.root.join(dir).display()))?;
        }
        let mut cmd = self.command("apt-get");
        cmd.args(["-q", "update"]);
        let out = process::capture(&mut cmd)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!(
                "`{}` failed ({}):\n{stdout}{stderr}",
                process::display(&cmd),
                out.status
            );
        }
        if let Some(summary) = stdout.lines().find(|l| l.starts_with("Fetched")) {
            println!("vm: kernels: package lists for {arches}: {summary}");
        }
        fs::write(self.stamp(), &arches)?;
        Ok(())
    }

    /// Every `linux-image-*` package name in the private lists (any architecture).
    fn kernel_package_names(&self) -> Result<Vec<String>> {
        let text = process::output(self.command("apt-cache").args([
            "search",
            "--names-only",
            "^linux-image-",
        ]))?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(" - ").map(|(name, _)| name.trim().to_owned()))
            .collect())
    }

    /// The version `apt-get download` would fetch.
    fn candidate_version(&self, package: &str, arch: Arch) -> Result<String> {
        let text = process::output(self.command("apt-cache").args([
            "show",
            "--no-all-versions",
            &format!("{package}:{}", arch.deb()),
        ]))?;
        text.lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("apt-cache show {package}:{arch} gives no Version"))
    }

    fn download(&self, specs: &[(String, Arch, String)], into: &Path) -> Result<()> {
        let mut cmd = self.command("apt-get");
        cmd.args(["-q", "download"]).current_dir(into);
        for (package, arch, version) in specs {
            cmd.arg(format!("{package}:{}={version}", arch.deb()));
        }
        println!("+ {}", process::display(&cmd));
        let out = process::capture(&mut cmd)?;
        if !out.status.success() {
            bail!(
                "`{}` failed ({}):\n{}{}",
                process::display(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if let Some(summary) = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("Fetched"))
        {
            println!("vm: kernels: {summary}");
        }
        Ok(())
    }
}

/// The `.deb` apt-get downloaded for `package` (`<package>_<version>_<arch>.deb`).
fn find_deb(dir: &Path, package: &str, arch: Arch) -> Result<PathBuf> {
    let prefix = format!("{package}_");
    let suffix = format!("_{}.deb", arch.deb());
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(&suffix) {
            return Ok(dir.join(name));
        }
    }
    bail!(
        "apt-get download left no {prefix}*{suffix} in {}",
        dir.display()
    )
}

/// Unpacks `deb`, works out the modules to load and writes the kernel
/// directory `dir` (see the module docs).
fn unpack(deb: &Path, package: &str, version: &str, dir: &Path) -> Result<Kernel> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    let root = dir.with_extension("unpacked");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    fs::create_dir_all(&root)?;
    process::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;

    let boot = root.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("{package} has no /boot"))?
        .filter_map(std::result::Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("vmlinuz-") || n.starts_with("vmlinux-"))
        .with_context(|| format!("{package} has no /boot/vmlinuz-*"))?;
    let release = vmlinuz
        .split_once('-')
        .map(|(_, r)| r.to_owned())
        .context("kernel file name without release")?;
    let lib = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|l| root.join(l))
        .find(|l| l.join(&release).is_dir())
        .with_context(|| format!("{package} has no lib/modules/{release}"))?;
    let moddir = lib.join(&release);

    // Debian's packages do not ship modules.dep: depmod writes it at install
    // time. depmod -b makes it for the unpacked tree (any architecture or
    // byte order).
    process::run(Command::new("depmod").arg("-b").arg(&root).arg(&release))
        .context("depmod (Debian package kmod) could not index the kernel's modules")?;
    let dep = fs::read_to_string(moddir.join("modules.dep"))
        .with_context(|| format!("depmod wrote no {}", moddir.join("modules.dep").display()))?;
    let builtin = fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let db = ModuleDb::parse(&dep, &builtin);
    let plan = db.load_order(REQUIRED_MODULES, OPTIONAL_MODULES)?;

    fs::create_dir_all(dir.join("modules"))?;
    fs::copy(boot.join(&vmlinuz), dir.join("vmlinuz"))?;
    let mut files = Vec::new();
    for (i, rel) in plan.files.iter().enumerate() {
        let name = format!("{:02}-{}.ko", i + 1, module_name(rel));
        decompress_module(&moddir.join(rel), &dir.join("modules").join(&name))?;
        files.push(name);
    }
    fs::remove_dir_all(&root).ok();
    let kernel = Kernel {
        package: package.to_owned(),
        version: version.to_owned(),
        release,
        builtin: plan.builtin,
        missing_optional: plan.missing_optional,
        modules: files,
        wanted: wanted_modules(),
        dir: dir.to_path_buf(),
    };
    fs::write(
        dir.join("kernel.json"),
        serde_json::to_string_pretty(&kernel)?,
    )?;
    println!(
        "vm: kernels: {package} {version}: kernel {}, modules {}{}",
        kernel.release,
        kernel.modules.join(" "),
        if kernel.builtin.is_empty() {
            String::new()
        } else {
            format!(", built in: {}", kernel.builtin.join(" "))
        }
    );
    Ok(kernel)
}

/// Writes the plain `.ko` of `src` (`.ko`, `.ko.xz`, `.ko.zst` or `.ko.gz`) to `dst`.
/// The guest loads modules with `finit_module` without flags, so they must
/// be uncompressed (the in-kernel decompressor is optional in 6.1).
fn decompress_module(src: &Path, dst: &Path) -> Result<()> {
    let name = src.to_string_lossy();
    let tool = if name.ends_with(".ko") {
        fs::copy(src, dst).with_context(|| format!("cannot copy {}", src.display()))?;
        return Ok(());
    } else if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        bail!("unknown module file type: {}", src.display());
    };
    let out = fs::File::create(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    let mut cmd = Command::new(tool);
    cmd.arg("-dc").arg(src).stdout(out);
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", process::display(&cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", process::display(&cmd));
    }
    Ok(())
}

/// The module name of a module file path: `kernel/net/8021q/8021q.ko.xz` ->
/// `8021q`, with `-` read as `_` as the kernel does.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// `modules.dep` and `modules.builtin` of one kernel.
#[derive(Debug, Default)]
pub struct ModuleDb {
    /// Module file path (relative to the modules directory) -> its dependencies' paths.
    deps: HashMap<String, Vec<String>>,
    /// Module name -> file path.
    by_name: HashMap<String, String>,
    builtin: HashSet<String>,
}

/// What to put into the initramfs for one kernel.
#[derive(Debug, PartialEq, Eq)]
pub struct LoadPlan {
    /// Module file paths, every dependency before its users.
    pub files: Vec<String>,
    /// Wanted modules built into the kernel.
    pub builtin: Vec<String>,
    /// Optional modules the kernel does not have.
    pub missing_optional: Vec<String>,
}

impl ModuleDb {
    /// Parses `modules.dep` (`path: dep dep ...` per line) and `modules.builtin`
    /// (one path per line).
    pub fn parse(modules_dep: &str, modules_builtin: &str) -> ModuleDb {
        let mut db = ModuleDb::default();
        for line in modules_dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim().to_owned();
            db.by_name.insert(module_name(&path), path.clone());
            db.deps
                .insert(path, deps.split_whitespace().map(str::to_owned).collect());
        }
        db.builtin = modules_builtin
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| module_name(l.trim()))
            .collect();
        db
    }

    /// The files to load for `required` and `optional` module names, in
    /// dependency order. Fails when a required module is neither a file nor
    /// built in.
    pub fn load_order(&self, required: &[&str], optional: &[&str]) -> Result<LoadPlan> {
        let mut plan = LoadPlan {
            files: Vec::new(),
            builtin: Vec::new(),
            missing_optional: Vec::new(),
        };
        let mut done = HashSet::new();
        for (name, needed) in required
            .iter()
            .map(|n| (n, true))
            .chain(optional.iter().map(|n| (n, false)))
        {
            let key = name.replace('-', "_");
            if let Some(path) = self.by_name.get(&key) {
                self.visit(path, &mut done, &mut Vec::new(), &mut plan.files)?;
            } else if self.builtin.contains(&key) {
                plan.builtin.push(key);
            } else if needed {
                bail!("the kernel has no module {name}, neither as a file nor built in");
            } else {
                plan.missing_optional.push(key);
            }
        }
        Ok(plan)
    }

    /// Depth-first: dependencies first, each file once. `stack` catches
    /// dependency cycles (depmod refuses them, but the file is input).
    fn visit(
        &self,
        path: &str,
        done: &mut HashSet<String>,
        stack: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains(path) {
            return Ok(());
        }
        if stack.iter().any(|p| p == path) {
            bail!("modules.dep has a dependency cycle through {path}");
        }
        let deps = self.deps.get(path).with_context(|| {
            format!("modules.dep names {path} as a dependency but has no entry for it")
        })?;
        stack.push(path.to_owned());
        for dep in deps {
            self.visit(dep, done, stack, out)?;
        }
        stack.pop();
        done.insert(path.to_owned());
        out.push(path.to_owned());
        Ok(())
    }
}

/// The newest package among `names` that matches one of `patterns`.
///
/// A pattern is a package name with one `*` standing for a run of digits
/// (the ABI number in `linux-image-6.1.0-*-amd64`, the patch level in
/// `linux-image-6.12.*+deb12-amd64`). The match with the largest number wins;
/// between equal numbers, the earlier pattern wins (so `-unsigned` can be
/// preferred over the signed package of the same kernel).
pub fn select_newest<'a>(
    patterns: &[String],
    names: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let mut best: Option<(u64, std::cmp::Reverse<usize>, &str)> = None;
    for name in names {
        for (i, pattern) in patterns.iter().enumerate() {
            if let Some(n) = match_number(pattern, name) {
                let key = (n, std::cmp::Reverse(i), name);
                if best.is_none_or(|b| (key.0, key.1) > (b.0, b.1)) {
                    best = Some(key);
                }
            }
        }
    }
    best.map(|(_, _, name)| name)
}

/// The number `*` stands for when `name` matches `pattern` (see [`select_newest`]).
pub fn match_number(pattern: &str, name: &str) -> Option<u64> {
    let (prefix, suffix) = pattern.split_once('*')?;
    let middle = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if middle.is_empty() || !middle.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    middle.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pats(p: &[&str]) -> Vec<String> {
        p.iter().map(std::string::ToString::to_string).collect()
    }

    #[test]
    fn picks_the_newest_abi_numerically() {
        let names = [
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-57-amd64-unsigned",
            "linux-image-6.1.0-57-amd64-dbg",
            "linux-image-6.1.0-100-cloud-amd64-unsigned",
            "linux-image-6.1.0-56-amd64-unsigned",
            "linux-image-6.12.117+deb12-amd64-unsigned",
        ];
        let p = pats(&["linux-image-6.1.0-*-amd64-unsigned"]);
        assert_eq!(
            select_newest(&p, names),
            Some("linux-image-6.1.0-57-amd64-unsigned")
        );
    }

    #[test]
    fn patch_level_pattern_and_no_match() {
        let names = [
            "linux-image-6.12.9+deb12-amd64-unsigned",
            "linux-image-6.12.117+deb12-amd64-unsigned",
            "linux-image-6.12.117+deb12-rt-amd64-unsigned",
            "linux-image-6.12.115+deb12-amd64-unsigned",
        ];
        let p = pats(&["linux-image-6.12.*+deb12-amd64-unsigned"]);
        assert_eq!(
            select_newest(&p, names),
            Some("linux-image-6.12.117+deb12-amd64-unsigned")
        );
        assert_eq!(
            select_newest(&pats(&["linux-image-6.6.*-amd64"]), names),
            None
        );
    }

    #[test]
    fn newest_over_all_patterns_earlier_pattern_on_a_tie() {
        let p = pats(&[
            "linux-image-6.1.0-*-arm64-unsigned",
            "linux-image-6.1.0-*-arm64",
        ]);
        // Tie at 57: the unsigned (first pattern) wins.
        let names = [
            "linux-image-6.1.0-57-arm64",
            "linux-image-6.1.0-57-arm64-unsigned",
        ];
        assert_eq!(
            select_newest(&p, names),
            Some("linux-image-6.1.0-57-arm64-unsigned")
        );
        // The signed package is newer: it wins.
        let names = [
            "linux-image-6.1.0-58-arm64",
            "linux-image-6.1.0-57-arm64-unsigned",
        ];
        assert_eq!(select_newest(&p, names), Some("linux-image-6.1.0-58-arm64"));
    }

    #[test]
    fn star_matches_digits_only() {
        assert_eq!(match_number("a-*-b", "a-12-b"), Some(12));
        assert_eq!(match_number("a-*-b", "a--b"), None);
        assert_eq!(match_number("a-*-b", "a-1x-b"), None);
        assert_eq!(match_number("a-*-b", "a-1-b-c"), None);
        assert_eq!(match_number("no-star", "no-star"), None);
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name("kernel/net/8021q/8021q.ko.xz"), "8021q");
        assert_eq!(module_name("kernel/drivers/net/veth.ko"), "veth");
        assert_eq!(module_name("kernel/foo/nf-nat.ko.zst"), "nf_nat");
    }

    const DEP: &str = "\
kernel/drivers/net/veth.ko.xz:
kernel/net/sched/sch_ingress.ko.xz:
kernel/net/8021q/8021q.ko.xz: kernel/net/802/garp.ko.xz kernel/net/802/stp.ko.xz kernel/net/802/mrp.ko.xz kernel/net/llc/llc.ko.xz
kernel/net/802/garp.ko.xz: kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz
kernel/net/802/stp.ko.xz: kernel/net/llc/llc.ko.xz
kernel/net/802/mrp.ko.xz:
kernel/net/llc/llc.ko.xz:
";

    #[test]
    fn dependencies_come_first_builtins_need_no_file() {
        let db = ModuleDb::parse(DEP, "kernel/net/sched/cls_bpf.ko\n");
        let plan = db
            .load_order(
                &["veth", "sch_ingress", "cls_bpf"],
                &["8021q", "missing_one"],
            )
            .unwrap();
        let pos = |m: &str| plan.files.iter().position(|f| module_name(f) == m).unwrap();
        assert!(pos("llc") < pos("stp"));
        assert!(pos("stp") < pos("garp"));
        assert!(pos("garp") < pos("8021q"));
        assert!(pos("mrp") < pos("8021q"));
        assert_eq!(plan.files.len(), 7);
        assert_eq!(plan.builtin, vec!["cls_bpf"]);
        assert_eq!(plan.missing_optional, vec!["missing_one"]);
    }

    #[test]
    fn missing_required_module_fails() {
        let db = ModuleDb::parse(DEP, "");
        let err = db.load_order(&["cls_bpf"], &[]).unwrap_err();
        assert!(err.to_string().contains("cls_bpf"), "{err}");
    }

    #[test]
    fn dependency_cycles_are_refused() {
        let db = ModuleDb::parse("a.ko: b.ko\nb.ko: a.ko\n", "");
        assert!(db.load_order(&["a"], &[]).is_err());
    }
}
