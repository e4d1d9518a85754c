//! OpenWrt `.ipk` packages (opkg, OpenWrt up to 24.10) assembled from a static `viscum`.
//!
//! An ipk is what OpenWrt's `scripts/ipkg-build` makes: a gzip'd tar (not an `ar` archive
//! like a `.deb`, although opkg reads both) holding `./debian-binary` (`2.0`),
//! `./data.tar.gz` (the files, rooted at `./`) and `./control.tar.gz` (`./control`,
//! `./conffiles`, `./postinst`, `./prerm`). Every member is owned by 0:0 and dated
//! `SOURCE_DATE_EPOCH` (else the binary's mtime), and gzip headers carry no time or name, so
//! the same inputs give the same bytes.
//!
//! # Architectures
//!
//! opkg installs a package only if its `Architecture` is one the box lists
//! (`opkg print-architecture`), and OpenWrt names architectures by CPU and FPU
//! (`arm_cortex-a7_neon-vfpv4`), not by Rust target. The binary is static (musl), so the
//! box's C library and float ABI do not matter, only the instruction set: one Rust target
//! serves several OpenWrt architectures, and [`ipks`] writes one package per name in
//! [`ARCHES`] (same binary, different `Architecture` field). Left out on purpose:
//!
//! * ARM: names with an FPU suffix get the `armv7-...-musleabihf` binary (it needs
//!   VFPv3-D16), names without one (`arm_cortex-a9` on BCM4708, built soft-float by OpenWrt
//!   because the SoC may have no VFP) the soft-float `armv7-...-musleabi` one. ARMv5/v6
//!   (`arm_arm926ej-s`, `arm_xscale`, `arm_arm1176jzf-s_vfp`) need an `arm-`/`armv5te-` Rust
//!   target that `dist` does not build.
//! * `mips_mips32`, `mipsel_mips32` (BCM47xx/63xx): MIPS32 release 1 CPUs, and Rust's
//!   `mips(el)-unknown-linux-musl` emit release 2 instructions. `mips_4kec` (also release 2)
//!   is left out until someone runs it.
//! * `i386_*`, `mips64_*`, `powerpc_*`, `riscv64_*`, `loongarch64_*`: no dist target.
//!
//! On an architecture not listed, `opkg install --force-arch` or an `arch NAME PRIO` line in
//! `/etc/opkg.conf` installs the nearest package, at the owner's risk. OpenWrt 25.12 replaced
//! opkg with apk (apk-tools 3), which cannot install an ipk: see `docs/openwrt.md`.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use flate2::{Compression, GzBuilder};

/// Rust target -> the OpenWrt package architectures its static binary runs on; the first is
/// the one [`ipk`] uses (the most common routers of that family).
pub const ARCHES: &[(&str, &[&str])] = &[
    ("x86_64-unknown-linux-musl", &["x86_64"]),
    (
        "aarch64-unknown-linux-musl",
        // cortex-a53: MediaTek Filogic, Qualcomm IPQ807x/IPQ60xx, Raspberry Pi 3;
        // generic: armsr, Rockchip; a72: Raspberry Pi 4, Marvell CN913x; a76: Raspberry Pi 5.
        &[
            "aarch64_cortex-a53",
            "aarch64_generic",
            "aarch64_cortex-a72",
            "aarch64_cortex-a76",
        ],
    ),
    (
        "armv7-unknown-linux-musleabihf",
        // Hard-float ARMv7 with at least VFPv3-D16 (what Rust's armv7 hf target assumes).
        // a7_neon-vfpv4: Qualcomm IPQ40xx, Allwinner H3; a9_vfpv3-d16: Marvell Armada 38x;
        // a15_neon-vfpv4: Qualcomm IPQ806x.
        &[
            "arm_cortex-a7_neon-vfpv4",
            "arm_cortex-a9_vfpv3-d16",
            "arm_cortex-a15_neon-vfpv4",
            "arm_cortex-a7_vfpv4",
            "arm_cortex-a5_vfpv4",
            "arm_cortex-a8_vfpv3",
            "arm_cortex-a9_neon",
        ],
    ),
    (
        "armv7-unknown-linux-musleabi",
        // Soft-float ARMv7 (no VFP instruction): the boards OpenWrt builds without an FPU.
        // a9: Broadcom Northstar BCM4708/4709 (bcm53xx); a7: MediaTek MT7629.
        &["arm_cortex-a9", "arm_cortex-a7"],
    ),
    // MIPS32 release 2, soft float (fine on FPU boards too: the binary is static).
    // 24kc: Atheros/Qualcomm ath79, Lantiq xrx200.
    ("mips-unknown-linux-musl", &["mips_24kc"]),
    // 24kc: MediaTek MT7621/MT76x8 (ramips); 74kc: Ralink RT3883; 24kc_24kf: ramips with FPU.
    (
        "mipsel-unknown-linux-musl",
        &["mipsel_24kc", "mipsel_74kc", "mipsel_24kc_24kf"],
    ),
];

/// The OpenWrt architectures of a Rust target (a `-gnu` host target counts as its musl twin:
/// only a static binary belongs in a package, and the caller checks that).
pub fn openwrt_arches(target: &str) -> Result<&'static [&'static str]> {
    let musl = target
        .replace("-gnueabihf", "-musleabihf")
        .replace("-gnu", "-musl");
    ARCHES
        .iter()
        .find(|(t, _)| *t == musl)
        .map(|(_, a)| *a)
        .with_context(|| {
            format!(
                "no OpenWrt architecture for target {target} (known: {})",
                ARCHES
                    .iter()
                    .map(|(t, _)| *t)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// Package name.
pub const PACKAGE: &str = "viscum";
/// What the package needs from OpenWrt's kernel: TC ingress/clsact (`sch_ingress`,
/// kmod-sched-core), `cls_bpf`/`act_bpf` (kmod-sched-bpf) and veth pairs (kmod-veth).
/// No `libc`: the binary is static.
pub const DEPENDS: &str = "kmod-sched-core, kmod-sched-bpf, kmod-veth";

const INIT: &str = include_str!("../../../dist/openwrt/files/viscum.init");
const CONFIG: &str = include_str!("../../../dist/openwrt/files/viscum.config");
const HOTPLUG: &str = include_str!("../../../dist/openwrt/files/viscum.hotplug");

/// OpenWrt's stock maintainer scripts (what `package-pack.mk` writes): enable and start the
/// init script after install, stop and disable it before removal, unless building an image.
const POSTINST: &str = "#!/bin/sh\n[ \"${IPKG_NO_SCRIPT}\" = \"1\" ] && exit 0\n[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n. ${IPKG_INSTROOT}/lib/functions.sh\ndefault_postinst $0 $@\n";
const PRERM: &str = "#!/bin/sh\n[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n. ${IPKG_INSTROOT}/lib/functions.sh\ndefault_prerm $0 $@\n";

/// Builds `viscum_<version>_<arch>.ipk` in `out_dir` for the first OpenWrt architecture of
/// `target` (see [`ARCHES`]) from the static binary `binary`, and returns its path.
///
/// `version` is used as is and should follow OpenWrt's `VERSION-rRELEASE` (`0.1.0-r1`).
/// Errors: unknown target, unreadable binary, unwritable `out_dir`.
#[allow(
    dead_code,
    reason = "`cargo xtask dist --openwrt` packs every architecture (ipks)"
)]
pub fn ipk(binary: &Path, target: &str, version: &str, out_dir: &Path) -> Result<PathBuf> {
    let arch = openwrt_arches(target)?[0];
    ipk_for_arch(binary, arch, version, out_dir)
}

/// [`ipk`] for every OpenWrt architecture of `target`: one package each.
pub fn ipks(binary: &Path, target: &str, version: &str, out_dir: &Path) -> Result<Vec<PathBuf>> {
    openwrt_arches(target)?
        .iter()
        .map(|arch| ipk_for_arch(binary, arch, version, out_dir))
        .collect()
}

/// One member of an archive.
struct Member<'a> {
    /// Path without the leading `./`; a trailing `/` makes a directory.
    path: &'a str,
    mode: u32,
    data: &'a [u8],
}

/// Builds the package for one OpenWrt architecture name.
pub fn ipk_for_arch(binary: &Path, arch: &str, version: &str, out_dir: &Path) -> Result<PathBuf> {
    if version.is_empty() || version.contains(char::is_whitespace) || version.contains('_') {
        bail!("package version '{version}' must be non-empty, without blanks or '_'");
    }
    let exe = fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    let mtime = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .with_context(|| format!("SOURCE_DATE_EPOCH '{s}' is not a number of seconds"))?,
        Err(_) => fs::metadata(binary)?
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };

    let data = tar_gz(
        &[
            Member {
                path: "etc/",
                mode: 0o755,
                data: b"",
            },
            Member {
                path: "etc/config/",
                mode: 0o755,
                data: b"",
            },
            Member {
                path: "etc/config/viscum",
                mode: 0o600,
                data: CONFIG.as_bytes(),
            },
            Member {
                path: "etc/hotplug.d/",
                mode: 0o755,
                data: b"",
            },
            Member {
                path: "etc/hotplug.d/iface/",
                mode: 0o755,
                data: b"",
            },
            Member {
                path: "etc/hotplug.d/iface/95-viscum",
                mode: 0o644,
                data: HOTPLUG.as_bytes(),
            },
            Member {
                path: "etc/init.d/",
                mode: 0o755,
                data: b"",
            },
            Member {
                path: "etc/init.d/viscum",
                mode: 0o755,
                data: INIT.as_bytes(),
            },
            Member {
                path: "usr/",
                mode: 0o755,
                data: b"",
            },
            Member {
                path: "usr/sbin/",
                mode: 0o755,
                data: b"",
            },
            Member {
                path: "usr/sbin/viscum",
                mode: 0o755,
                data: &exe,
            },
        ],
        mtime,
    )?;
    let installed_size = exe.len() + CONFIG.len() + HOTPLUG.len() + INIT.len();
    let control = format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Depends: {DEPENDS}\n\
         Source: dist/openwrt\n\
         SourceName: {PACKAGE}\n\
         License: {license}\n\
         Section: net\n\
         SourceDateEpoch: {mtime}\n\
         {url}\
         Architecture: {arch}\n\
         Installed-Size: {installed_size}\n\
         Description: Serve cloud services from unmodified local copies at the edge: an eBPF\n \
         classifier at TC ingress redirects (protocol, cloud address, port) into service\n \
         network namespaces; a daemon runs, health-checks and drains the services.\n",
        license = env!("CARGO_PKG_LICENSE"),
        // xtask's manifest may not inherit the workspace's repository: no empty field then.
        url = match env!("CARGO_PKG_REPOSITORY") {
            "" => String::new(),
            u => format!("URL: {u}\n"),
        },
    );
    let control_tar = tar_gz(
        &[
            Member {
                path: "control",
                mode: 0o644,
                data: control.as_bytes(),
            },
            Member {
                path: "conffiles",
                mode: 0o644,
                data: b"/etc/config/viscum\n",
            },
            Member {
                path: "postinst",
                mode: 0o755,
                data: POSTINST.as_bytes(),
            },
            Member {
                path: "prerm",
                mode: 0o755,
                data: PRERM.as_bytes(),
            },
        ],
        mtime,
    )?;
    // ipkg-build's order: debian-binary, data, control.
    let outer = tar_gz(
        &[
            Member {
                path: "debian-binary",
                mode: 0o644,
                data: b"2.0\n",
            },
            Member {
                path: "data.tar.gz",
                mode: 0o644,
                data: &data,
            },
            Member {
                path: "control.tar.gz",
                mode: 0o644,
                data: &control_tar,
            },
        ],
        mtime,
    )?;

    fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let out = out_dir.join(format!("{PACKAGE}_{version}_{arch}.ipk"));
    fs::write(&out, outer).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(out)
}

/// A gzip'd tar of `members` under `./`, root-owned, all dated `mtime`, in the given order.
fn tar_gz(members: &[Member<'_>], mtime: u64) -> Result<Vec<u8>> {
    // No name and time 0 in the gzip header: reproducible.
    let gz = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    let mut tar = tar::Builder::new(gz);
    let root = Member {
        path: "",
        mode: 0o755,
        data: b"",
    };
    for m in std::iter::once(&root).chain(members) {
        let dir = m.path.is_empty() || m.path.ends_with('/');
        let mut h = tar::Header::new_gnu();
        entry_header(
            &mut h,
            if dir {
                tar::EntryType::Directory
            } else {
                tar::EntryType::Regular
            },
            m.mode,
            m.data.len() as u64,
            mtime,
        );
        // `./NAME` as ipkg-build writes it: the tar crate's set_path would drop the `./`.
        let name = format!("./{}", m.path);
        let field = &mut h.as_old_mut().name;
        if name.len() >= field.len() {
            bail!("{name}: longer than a tar header's name field");
        }
        field[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        tar.append(&h, m.data)?;
    }
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    Ok(gz.finish()?)
}

fn entry_header(h: &mut tar::Header, kind: tar::EntryType, mode: u32, size: u64, mtime: u64) {
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    // ipkg-build: --numeric-owner; names help busybox tar and humans reading `tar -tv`.
    let _ = h.set_username("root");
    let _ = h.set_groupname("root");
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, io::Read as _};

    use super::*;

    /// Members of a gzip'd tar: path -> (mode, uid, gid, data).
    fn read_tar_gz(bytes: &[u8]) -> Vec<(String, u32, u64, u64, Vec<u8>)> {
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
        ar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().to_string_lossy().into_owned();
                let (mode, uid, gid) = (
                    e.header().mode().unwrap(),
                    e.header().uid().unwrap(),
                    e.header().gid().unwrap(),
                );
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (path, mode, uid, gid, data)
            })
            .collect()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("viscum-ipk-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn builds_an_ipk_opkg_can_read() {
        let dir = scratch("read");
        let bin = dir.join("viscum");
        fs::write(&bin, b"\x7fELF not really a binary").unwrap();
        // SAFETY: no other thread of this test binary reads SOURCE_DATE_EPOCH.
        unsafe { std::env::set_var("SOURCE_DATE_EPOCH", "1700000000") };
        let out = ipk(&bin, "aarch64-unknown-linux-musl", "0.1.0-r1", &dir).unwrap();
        assert_eq!(out, dir.join("viscum_0.1.0-r1_aarch64_cortex-a53.ipk"));
        let bytes = fs::read(&out).unwrap();
        assert_eq!(&bytes[..2], b"\x1f\x8b", "an ipk is a gzip'd tar");

        let outer = read_tar_gz(&bytes);
        let names: Vec<&str> = outer.iter().map(|m| m.0.as_str()).collect();
        assert_eq!(
            names,
            ["./", "./debian-binary", "./data.tar.gz", "./control.tar.gz"]
        );
        assert_eq!(outer[1].4, b"2.0\n");
        assert!(outer.iter().all(|m| m.2 == 0 && m.3 == 0), "root-owned");

        let data: BTreeMap<String, (u32, Vec<u8>)> = read_tar_gz(&outer[2].4)
            .into_iter()
            .map(|(p, mode, _, _, d)| (p, (mode, d)))
            .collect();
        assert_eq!(data["./usr/sbin/viscum"], (0o755, fs::read(&bin).unwrap()));
        assert_eq!(data["./etc/init.d/viscum"].0, 0o755);
        assert!(
            data["./etc/init.d/viscum"]
                .1
                .starts_with(b"#!/bin/sh /etc/rc.common")
        );
        assert_eq!(data["./etc/config/viscum"].1, CONFIG.as_bytes());
        assert!(data.contains_key("./etc/hotplug.d/iface/95-viscum"));
        assert!(
            data.contains_key("./usr/sbin/"),
            "directories are members too"
        );

        let control: BTreeMap<String, Vec<u8>> = read_tar_gz(&outer[3].4)
            .into_iter()
            .map(|(p, _, _, _, d)| (p, d))
            .collect();
        let text = String::from_utf8(control["./control"].clone()).unwrap();
        for line in [
            "Package: viscum\n",
            "Version: 0.1.0-r1\n",
            "Architecture: aarch64_cortex-a53\n",
            "Depends: kmod-sched-core, kmod-sched-bpf, kmod-veth\n",
            "SourceDateEpoch: 1700000000\n",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        assert!(
            !text.lines().any(|l| l.trim_end().ends_with(':')),
            "an empty field in\n{text}"
        );
        // Continuation lines of the description start with a blank (RFC 822 folding).
        assert!(
            text.lines()
                .skip_while(|l| !l.starts_with("Description:"))
                .skip(1)
                .all(|l| l.starts_with(' '))
        );
        assert_eq!(control["./conffiles"], b"/etc/config/viscum\n");
        assert!(control.contains_key("./postinst") && control.contains_key("./prerm"));

        // Same inputs, same bytes.
        let again = ipk(&bin, "aarch64-unknown-linux-musl", "0.1.0-r1", &dir).unwrap();
        assert_eq!(fs::read(again).unwrap(), bytes);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_package_per_openwrt_arch() {
        let dir = scratch("all");
        let bin = dir.join("viscum");
        fs::write(&bin, b"x").unwrap();
        let all = ipks(&bin, "armv7-unknown-linux-musleabihf", "1.0-r1", &dir).unwrap();
        assert_eq!(
            all.len(),
            openwrt_arches("armv7-unknown-linux-musleabihf")
                .unwrap()
                .len()
        );
        assert!(all[0].ends_with("viscum_1.0-r1_arm_cortex-a7_neon-vfpv4.ipk"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn arch_mapping_and_bad_input() {
        assert_eq!(
            openwrt_arches("x86_64-unknown-linux-gnu").unwrap(),
            ["x86_64"]
        );
        assert_eq!(
            openwrt_arches("mips-unknown-linux-musl").unwrap(),
            ["mips_24kc"]
        );
        assert_eq!(
            openwrt_arches("mipsel-unknown-linux-musl").unwrap()[0],
            "mipsel_24kc"
        );
        let e = openwrt_arches("riscv64gc-unknown-linux-musl")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no OpenWrt architecture for target riscv64gc"),
            "{e}"
        );
        // ARM names with an FPU get the hard-float binary, those without the soft-float one.
        for (target, arches) in ARCHES {
            for a in arches.iter().filter(|a| a.starts_with("arm_")) {
                let fpu = a.contains("vfp") || a.contains("neon");
                assert_eq!(fpu, target.ends_with("musleabihf"), "{target}: {a}");
            }
        }
        assert_eq!(
            openwrt_arches("armv7-unknown-linux-musleabi").unwrap()[0],
            "arm_cortex-a9"
        );
        let dir = scratch("bad");
        let e = ipk(
            &dir.join("missing"),
            "x86_64-unknown-linux-musl",
            "1.0-r1",
            &dir,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot read"), "{e}");
        let e = ipk(
            &dir.join("missing"),
            "x86_64-unknown-linux-musl",
            "1 0",
            &dir,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("without blanks"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }
}
