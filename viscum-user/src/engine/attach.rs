//! Loading the classifier once, attaching it at TC ingress of interfaces,
//! and pinning program, maps and links so the datapath outlives us.
//!
//! An attachment belongs to one *instance* of an interface: when the interface is deleted
//! (OpenWrt's `network restart`, a bridge or PPPoE link re-created), its TCX links go
//! defunct and its clsact qdisc with its filters disappears, while our pin or record under
//! `<bpffs>/links/` stays. So the records say only what was attached; whether it still is,
//! [`attachment`] asks the kernel (the interface's TCX programs, or its clsact filters, for
//! our program's id), and [`attach`] re-attaches over a stale record instead of answering
//! "already attached".
//!
//! Redirect targets are kept by ifindex in the maps; [`attach_reply`] also records the name
//! behind each ifindex (`<bpffs>/targets/<ifindex>/<ifname>`, directories: bpffs holds no
//! plain files), so an entry whose target veth was deleted can be re-pointed at a new veth of
//! the same name ([`target_name`], used by [`crate::lifecycle`]).

use std::{collections::HashSet, fs, io, path::Path, time::Instant};

use aya::{
    EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, TcAttachOptions},
    },
};
use viscum_common::{
    CONFIG_MAP, DatapathConfig, ENTRY_STATS_MAP, FLOW_CACHE_MAP, FLOWS_MAP, ICMP_INGRESS_PROG,
    ICMP_REPLY_PROG, INGRESS_PROG, PORTS_MAP, RECOVER_PROG, REPLIES_MAP, REPLY_CACHE_MAP,
    REPLY_PROG, SERVICES_MAP, entry_stats_slots, flow_cache_entries, ports_words,
    reply_cache_entries,
};

use super::{EngineError, Pins, ifindex, layout::Verdict};

/// What `attach` did for one interface.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum AttachOutcome {
    /// Newly attached with a pinned TCX link.
    Tcx,
    /// Newly attached through a clsact qdisc (kernels < 6.6); nothing to pin.
    Clsact,
    /// Was already attached: nothing changed.
    AlreadyAttached,
    /// Attached afresh over a stale record: the interface had been deleted and re-created
    /// (or the classifier removed behind Viscum's back). `tcx` says which mechanism.
    Reattached {
        /// `true`: a TCX link; `false`: a clsact qdisc filter.
        tcx: bool,
    },
}

use crate::features::has_tcx;
pub use crate::features::kernel_at_least;

/// Loads the classifier (or reopens the pinned one) and attaches it at TC
/// ingress of each interface. Idempotent per interface.
///
/// All interfaces are checked before anything is loaded, so a typo in the
/// third name changes nothing.
///
/// # Errors
/// [`EngineError::BadInterfaceName`] / [`EngineError::UnknownInterface`] before anything
/// is loaded; [`EngineError::Bpffs`] for the pin directory; [`EngineError::Unsupported`],
/// [`EngineError::Load`] or [`EngineError::Rejected`] when this kernel cannot load the
/// object; [`EngineError::Program`] / [`EngineError::Io`] when attaching or pinning fails
/// (interfaces before the failing one stay attached).
pub fn attach(
    pins: &Pins,
    ifaces: &[String],
    sizes: MapSizes,
) -> Result<Vec<(String, AttachOutcome)>, EngineError> {
    for name in ifaces {
        ifindex(name)?;
    }
    let _lock = super::lock::lock_creating(pins)?;
    let (again, replies) = match super::layout::check(pins)? {
        Verdict::Migrate { from, drop } if !drop.is_empty() => migrate(pins, from, &drop)?,
        _ => (Vec::new(), Vec::new()),
    };
    let mut prog = load_or_open(pins, sizes, INGRESS_PROG)?;
    // Only now: a load that failed leaves the pins as they were, marker included.
    super::layout::write_marker(pins)?;
    let prog_id = prog
        .info()
        .map_err(|e| EngineError::prog("cannot read the classifier's info", e))?
        .id();
    fs::create_dir_all(pins.links_dir())
        .map_err(|e| EngineError::io(format!("cannot create {}", pins.links_dir().display()), e))?;

    let mut out = Vec::new();
    for name in ifaces {
        let outcome = attach_one(pins, &mut prog, prog_id, name)?;
        out.push((name.clone(), outcome));
    }
    // A migration detached everything from the old programs: back onto the new ones.
    for name in again.iter().filter(|n| !ifaces.contains(n)) {
        if let Err(e) = attach_one(pins, &mut prog, prog_id, name) {
            log::warn!("migration: cannot re-attach to {name}: {}", chain(&e));
        }
    }
    for veth in &replies {
        if let Err(e) = attach_reply(pins, veth) {
            log::warn!(
                "migration: cannot re-attach the reply path to {veth}: {}",
                chain(&e)
            );
        }
    }
    Ok(out)
}

/// Migrates pins of an older layout whose changed maps are all soft state (see
/// [`super::layout`]): detaches the old programs everywhere, unpins them and the maps in
/// `drop`, so that the load that follows creates those maps afresh and reuses every other
/// pinned map (the entries) as it is. Returns the interfaces and service veths to attach
/// again. Traffic goes to the cloud from here until they are.
fn migrate(
    pins: &Pins,
    from: u32,
    drop: &[&str],
) -> Result<(Vec<String>, Vec<String>), EngineError> {
    log::warn!(
        "{}: migrating pins of map layout {from} to {}: dropping the records of {}",
        pins.dir.display(),
        viscum_common::MAP_LAYOUT_VERSION,
        drop.join(", ")
    );
    let ifaces = recorded_interfaces(pins);
    let replies: Vec<String> = fs::read_dir(pins.reply_links_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    for name in &ifaces {
        detach_one(pins, name)?;
    }
    for veth in &replies {
        detach_reply(pins, veth)?;
    }
    for p in pins.program_pins() {
        if p.exists() {
            fs::remove_file(&p)
                .map_err(|e| EngineError::io(format!("cannot remove {}", p.display()), e))?;
        }
    }
    for m in drop {
        let p = pins.map(m);
        fs::remove_file(&p)
            .map_err(|e| EngineError::io(format!("cannot remove {}", p.display()), e))?;
    }
    Ok((ifaces, replies))
}

/// Map capacities, fixed when the datapath is first loaded.
#[derive(Debug, Clone, Copy)]
pub struct MapSizes {
    /// Capacity of the exact-match map `VISCUM_SERVICES`, in entries (the CLI's
    /// `--max-entries`; default [`viscum_common::DEFAULT_MAX_ENTRIES`]).
    pub services: u32,
    /// Capacity of the flow table `VISCUM_FLOWS` and of its reverse index
    /// `VISCUM_REPLIES`, in flows each (default [`viscum_common::DEFAULT_FLOW_ENTRIES`]).
    pub flows: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            services: viscum_common::DEFAULT_MAX_ENTRIES,
            flows: viscum_common::DEFAULT_FLOW_ENTRIES,
        }
    }
}

/// Opens one of the two pinned programs, loading and pinning both on first use.
fn load_or_open(pins: &Pins, sizes: MapSizes, which: &str) -> Result<SchedClassifier, EngineError> {
    let path = if which == REPLY_PROG {
        pins.reply_program()
    } else {
        pins.program()
    };
    if path.exists() {
        return SchedClassifier::from_pin(&path).map_err(|e| {
            EngineError::prog(
                format!("cannot open the pinned classifier {}", path.display()),
                e,
            )
        });
    }
    // A load that fails half-way (the verifier rejects the second program,
    // say) must leave the bpffs as it found it: the maps aya pinned and any
    // program already pinned would otherwise make the next attempt reuse a
    // half-made datapath, and `viscum detach --all --purge` the only way out.
    let before = our_pins(pins);
    if let Err(e) = load_and_pin(pins, sizes) {
        for p in our_pins(pins) {
            if !before.contains(&p) {
                let _ = fs::remove_file(&p);
            }
        }
        return Err(e);
    }
    // Reopen from the pin so the caller owns a handle independent of `ebpf`.
    SchedClassifier::from_pin(&path).map_err(|e| {
        EngineError::prog(
            format!("cannot open the pinned classifier {}", path.display()),
            e,
        )
    })
}

/// Loads both programs from the embedded object and pins them (and, through
/// aya, the maps). The caller undoes the pins if this fails.
fn load_and_pin(pins: &Pins, sizes: MapSizes) -> Result<(), EngineError> {
    // Kernels >= 5.11 account BPF memory to the cgroup; older ones need a
    // higher memlock limit. Raising it fails without CAP_SYS_RESOURCE, which
    // is harmless on the former, so the error is only logged.
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const rlim) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            io::Error::last_os_error()
        );
    }
    crate::features::check_object(crate::EBPF_OBJECT)?;
    crate::features::check_required_helpers()?;
    // One region per possible CPU id in the arrays the datapath indexes by CPU (see `cpus`).
    let cpus = super::cpus::cpu_regions()?;
    // Maps are pinned by name in the directory; if they are already there
    // (a previous attach whose program was purged), aya reuses them and the
    // entries survive.
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&pins.dir)
        .map_max_entries(SERVICES_MAP, sizes.services)
        .map_max_entries(
            ENTRY_STATS_MAP,
            entry_stats_slots(sizes.services).saturating_mul(cpus),
        )
        .map_max_entries(PORTS_MAP, ports_words(sizes.services))
        .map_max_entries(FLOW_CACHE_MAP, flow_cache_entries(cpus))
        .map_max_entries(REPLY_CACHE_MAP, reply_cache_entries(cpus))
        .map_max_entries(FLOWS_MAP, sizes.flows)
        .map_max_entries(REPLIES_MAP, sizes.flows)
        .load(crate::EBPF_OBJECT)
        .map_err(|e| EngineError::Load(Box::new(e)))?;
    write_stats_stride(&mut ebpf, cpus)?;
    for (name, pin) in [
        (INGRESS_PROG, pins.program()),
        (REPLY_PROG, pins.reply_program()),
        (ICMP_INGRESS_PROG, pins.icmp_ingress_program()),
        (ICMP_REPLY_PROG, pins.icmp_reply_program()),
        (RECOVER_PROG, pins.recover_program()),
    ] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| {
                EngineError::io(
                    format!("the embedded object has no program {name}"),
                    io::ErrorKind::NotFound.into(),
                )
            })?
            .try_into()
            .map_err(|e| {
                EngineError::prog(format!("the embedded program {name} has the wrong type"), e)
            })?;
        let started = Instant::now();
        prog.load().map_err(|e| rejected(name, e))?;
        // What the verifier cost on this kernel, for the operator of a slow router (and the VM
        // kernel matrix, which reads it back): see `ProgramLoad`.
        let load = crate::features::ProgramLoad {
            name: name.to_owned(),
            load_ms: started.elapsed().as_secs_f64() * 1e3,
            verified_insns: prog
                .info()
                .ok()
                .and_then(|i| i.verified_instruction_count())
                .filter(|&n| n > 0),
        };
        log::info!("{load}");
        prog.pin(&pin).map_err(|e| {
            EngineError::io(
                format!("cannot pin the classifier at {}", pin.display()),
                io::Error::other(e),
            )
        })?;
    }
    super::jump::fill(&mut ebpf)?;
    Ok(())
}

/// Writes the counters array's per-CPU stride ([`DatapathConfig::stats_stride`]) into the
/// datapath config of a loaded object, before any program is attached: the array as loaded
/// (a kept pin may have been sized by an earlier attach) divided by `cpus`, the possible
/// CPU regions it was sized for ([`cpu_regions`](super::cpus::cpu_regions)). Used by
/// `attach`, and by anything that loads the object itself (the benchmarks).
///
/// # Errors
/// [`EngineError::Io`] if the object lacks the maps; [`EngineError::Map`] if the config
/// cannot be written.
pub fn write_stats_stride(ebpf: &mut aya::Ebpf, cpus: u32) -> Result<(), EngineError> {
    let len = ebpf
        .map(ENTRY_STATS_MAP)
        .and_then(|m| match m {
            aya::maps::Map::Array(data) => data.info().ok().map(|i| i.max_entries()),
            _ => None,
        })
        .ok_or_else(|| {
            EngineError::io(
                "the embedded object has no entry counters array",
                io::ErrorKind::NotFound.into(),
            )
        })?;
    let map = ebpf.map_mut(CONFIG_MAP).ok_or_else(|| {
        EngineError::io(
            "the embedded object has no config map",
            io::ErrorKind::NotFound.into(),
        )
    })?;
    let mut config: aya::maps::Array<&mut aya::maps::MapData, DatapathConfig> =
        aya::maps::Array::try_from(map)
            .map_err(|e| EngineError::map("the config map has an unexpected layout", e))?;
    let cur = config.get(&0, 0).unwrap_or_default();
    config
        .set(
            0,
            DatapathConfig {
                stats_stride: viscum_common::stats_stride(len, cpus),
                ..cur
            },
            0,
        )
        .map_err(|e| EngineError::map("cannot write the datapath config", e))
}

/// How many lines of the verifier's log a rejection quotes: the verdict and
/// the statistics line are at the end, the instruction trace before them.
const VERIFIER_TAIL_LINES: usize = 16;

/// Turns a failed `BPF_PROG_LOAD` into an error that names the kernel, the
/// program and the verifier's last lines, which is what a user on a router
/// needs to report or understand the failure.
fn rejected(program: &str, e: aya::programs::ProgramError) -> EngineError {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(VERIFIER_TAIL_LINES)..].join("\n  ");
            EngineError::Rejected {
                program: program.to_owned(),
                kernel: crate::features::kernel_release(),
                source: io_error,
                verifier_tail: tail,
            }
        }
        other => EngineError::prog(format!("cannot load the classifier {program}"), other),
    }
}

/// Our pins directly under the instance directory (programs and maps).
fn our_pins(pins: &Pins) -> Vec<std::path::PathBuf> {
    let mut out: Vec<std::path::PathBuf> = fs::read_dir(&pins.dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("VISCUM_") || n == "AYA_LOGS")
        })
        .collect();
    out.extend(pins.program_pins().into_iter().filter(|p| p.exists()));
    out
}

fn attach_one(
    pins: &Pins,
    prog: &mut SchedClassifier,
    prog_id: u32,
    name: &str,
) -> Result<AttachOutcome, EngineError> {
    attach_at(prog, prog_id, name, &pins.link(name))
}

/// Attaches the reply classifier at ingress of a service's host veth
/// (idempotent). Replies then go straight to the client-facing interface.
///
/// Also records `name` as the interface behind its current ifindex, so an entry pointing
/// there can find its target again by name after the veth is re-created ([`target_name`]).
///
/// # Errors
/// As [`attach`] for loading; [`EngineError::UnknownInterface`] if the veth is gone;
/// [`EngineError::Io`] if the link or the target record cannot be written.
pub fn attach_reply(pins: &Pins, name: &str) -> Result<AttachOutcome, EngineError> {
    let index = ifindex(name)?;
    let _lock = super::lock::lock_creating(pins)?;
    super::layout::ensure_usable(pins)?;
    let mut prog = load_or_open(pins, MapSizes::default(), REPLY_PROG)?;
    super::layout::write_marker(pins)?;
    let prog_id = prog
        .info()
        .map_err(|e| EngineError::prog("cannot read the reply classifier's info", e))?
        .id();
    fs::create_dir_all(pins.reply_links_dir()).map_err(|e| {
        EngineError::io(
            format!("cannot create {}", pins.reply_links_dir().display()),
            e,
        )
    })?;
    let outcome = attach_at(&mut prog, prog_id, name, &pins.reply_link(name))?;
    note_target(pins, index, name)?;
    Ok(outcome)
}

/// Detaches the reply classifier from a service veth, if attached; a veth
/// that is already gone took its link with it, so only the pin is removed.
/// The veth's target records go too.
///
/// # Errors
/// [`EngineError::Io`] if a TCX link pin cannot be opened or unpinned (clsact
/// leftovers are removed best-effort and never fail).
pub fn detach_reply(pins: &Pins, name: &str) -> Result<(), EngineError> {
    let _lock = match super::lock::lock_if_attached(pins)? {
        Some(l) => l,
        None => return Ok(()),
    };
    let path = pins.reply_link(name);
    if path.is_dir() {
        if record_is_for(&path, name) {
            let _ = tc::qdisc_detach_program(name, TcAttachType::Ingress, REPLY_PROG);
            let _ = release_clsact(name, &path);
        }
        let _ = remove_record(&path);
    } else if path.exists() {
        let link = PinnedLink::from_pin(&path).map_err(|e| {
            EngineError::io(
                format!("cannot open the link pin {}", path.display()),
                io::Error::other(e),
            )
        })?;
        drop(
            link.unpin()
                .map_err(|e| EngineError::io(format!("cannot unpin {}", path.display()), e))?,
        );
    }
    forget_target(pins, name);
    Ok(())
}

/// Environment variable that forces new attachments through a clsact qdisc on a TCX kernel
/// (value `clsact`), so the pre-6.6 path can be exercised on any box. Existing attachments
/// keep the mechanism their record shows.
pub const ATTACH_MODE_ENV: &str = "VISCUM_ATTACH_MODE";

/// Does a new attachment use TCX? (See [`ATTACH_MODE_ENV`].)
fn use_tcx() -> bool {
    has_tcx() && std::env::var(ATTACH_MODE_ENV).map_or(true, |m| m != "clsact")
}

fn attach_at(
    prog: &mut SchedClassifier,
    prog_id: u32,
    name: &str,
    link_pin: &Path,
) -> Result<AttachOutcome, EngineError> {
    let index = super::ifindex(name)?;
    let stale = link_pin.exists();
    if stale && on_hook(prog_id, name, index, !link_pin.is_dir())? {
        return Ok(AttachOutcome::AlreadyAttached);
    }
    // A record without our program on the hook: the interface was deleted and re-created
    // (its hooks went with the old one; a TCX pin then holds a defunct link), or our
    // link/filter was removed behind our back. Drop the record and attach afresh. The clsact
    // qdisc stays ours to remove on detach only if it is still the one we added: same
    // interface instance (ifindex) as recorded.
    let mut qdisc_ours = false;
    if link_pin.is_dir() {
        qdisc_ours =
            link_pin.join(CLSACT_CREATED).is_dir() && record_ifindex(link_pin) == Some(index);
        remove_record(link_pin)?;
    } else if stale {
        fs::remove_file(link_pin).map_err(|e| {
            EngineError::io(
                format!("cannot remove the stale link pin {}", link_pin.display()),
                e,
            )
        })?;
    }
    let tcx = use_tcx();
    if tcx {
        let id = prog
            .attach(name, TcAttachType::Ingress)
            .map_err(|e| EngineError::prog(format!("cannot attach to {name}"), e))?;
        let link = prog
            .take_link(id)
            .map_err(|e| EngineError::prog("cannot take the TCX link", e))?;
        let fd_link: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| {
                EngineError::io("TCX link has no fd", io::Error::other(e))
            })?;
        fd_link.pin(link_pin).map_err(|e| {
            EngineError::io(
                format!("cannot pin the link at {}", link_pin.display()),
                io::Error::other(e),
            )
        })?;
    } else {
        let created = if super::clsact::present(index)? {
            qdisc_ours
        } else {
            match tc::qdisc_add_clsact(name) {
                Ok(()) => true,
                // Added in between by someone outside Viscum's lock (another instance, `tc`):
                // there is one to attach to, and it is not ours to remove.
                Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                    false
                }
                Err(e) => {
                    return Err(EngineError::io(
                        format!("cannot add a clsact qdisc to {name}"),
                        io::Error::other(e),
                    ));
                }
            }
        };
        // Netlink explicitly: on a TCX kernel (ATTACH_MODE_ENV) aya would pick TCX.
        let id = prog
            .attach_with_options(
                name,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .map_err(|e| EngineError::prog(format!("cannot attach to {name}"), e))?;
        // A netlink filter stays in the kernel after we exit; forget the
        // link so dropping it does not detach.
        let link = prog
            .take_link(id)
            .map_err(|e| EngineError::prog("cannot take the tc link", e))?;
        std::mem::forget(link);
        // Record the attachment so `detach`/`stats` know about it (bpffs
        // holds directories and pins, no plain files): whether the qdisc is
        // ours to remove on detach, and which instance of the interface
        // (ifindex) it is on.
        for dir in [
            Some(link_pin.to_path_buf()),
            created.then(|| link_pin.join(CLSACT_CREATED)),
            Some(link_pin.join(format!("{IFINDEX_PREFIX}{index}"))),
        ]
        .into_iter()
        .flatten()
        {
            fs::create_dir_all(&dir).map_err(|e| {
                EngineError::io(
                    format!("cannot record the attachment at {}", dir.display()),
                    e,
                )
            })?;
        }
    }
    Ok(match (stale, tcx) {
        (true, tcx) => AttachOutcome::Reattached { tcx },
        (false, true) => AttachOutcome::Tcx,
        (false, false) => AttachOutcome::Clsact,
    })
}

/// Marker directory inside a clsact attachment record: Viscum added the
/// qdisc, so detach may remove it.
const CLSACT_CREATED: &str = "clsact-created";

/// Directory `ifindex-N` inside a clsact attachment record: the interface instance the
/// filter was added to (records of older versions have none).
const IFINDEX_PREFIX: &str = "ifindex-";

/// The ifindex a clsact record was made for, if it says.
fn record_ifindex(record: &Path) -> Option<u32> {
    fs::read_dir(record).ok()?.flatten().find_map(|e| {
        e.file_name()
            .to_str()?
            .strip_prefix(IFINDEX_PREFIX)?
            .parse()
            .ok()
    })
}

/// Is the interface called `name` now the instance a clsact record was made for? (Records
/// without an ifindex are taken at their word.) A re-created interface carries nothing of
/// ours, so detach must not touch its qdisc or filters.
fn record_is_for(record: &Path, name: &str) -> bool {
    match (super::ifindex(name), record_ifindex(record)) {
        (Err(_), _) => false,
        (Ok(_), None) => true,
        (Ok(now), Some(then)) => now == then,
    }
}

/// Removes a clsact attachment record (and the directories inside it).
fn remove_record(path: &Path) -> Result<(), EngineError> {
    for e in fs::read_dir(path).into_iter().flatten().flatten() {
        let _ = fs::remove_dir(e.path());
    }
    fs::remove_dir(path)
        .map_err(|e| EngineError::io(format!("cannot remove {}", path.display()), e))
}

/// After our filter left `name`: remove the clsact qdisc if Viscum added it
/// and nothing else uses it.
fn release_clsact(name: &str, record: &Path) -> Result<(), EngineError> {
    if !record.join(CLSACT_CREATED).is_dir() {
        return Ok(());
    }
    let Ok(ifindex) = super::ifindex(name) else {
        // The interface is gone, and its qdisc with it.
        return Ok(());
    };
    if super::clsact::present(ifindex)? && super::clsact::filter_count(ifindex)? == 0 {
        super::clsact::delete(ifindex)?;
    }
    Ok(())
}

/// Is the program `prog_id` on the ingress hook of interface `name` (index `index`), as a
/// TCX program or as a clsact `bpf` filter?
fn on_hook(prog_id: u32, name: &str, index: u32, tcx: bool) -> Result<bool, EngineError> {
    if tcx {
        let (_, progs) = SchedClassifier::query_tcx(name, TcAttachType::Ingress)
            .map_err(|e| EngineError::prog(format!("cannot query TCX programs on {name}"), e))?;
        Ok(progs.iter().any(|p| p.id() == prog_id))
    } else {
        super::clsact::has_prog(index, prog_id)
    }
}

/// The id of the program pinned at `path`.
///
/// Through `ProgramInfo::from_pin`, not `SchedClassifier::from_pin`: the latter asks for
/// the program's name as a string, which makes aya probe the kernel's features first (a
/// score of bpf(2) calls, five of them program loads) in every process that reads a pin,
/// every CLI command among them.
fn pinned_program_id(path: &Path) -> Result<u32, EngineError> {
    Ok(aya::programs::ProgramInfo::from_pin(path)
        .map_err(|e| {
            EngineError::prog(
                format!("cannot open the pinned program {}", path.display()),
                e,
            )
        })?
        .id())
}

/// Where a recorded attachment stands in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachState {
    /// Our program is on the interface's ingress hook.
    Attached,
    /// Recorded, but no interface of that name exists: it was deleted. Traffic it would
    /// carry is not classified; a re-created interface is re-attached by `viscum attach`
    /// (and by `viscum run` on its own).
    InterfaceGone,
    /// Recorded, the interface exists, but our program is not on it: the interface was
    /// re-created (or the link/filter removed behind Viscum's back).
    Missing,
    /// Attached, but to an interface of another network namespace: the TCX link still
    /// holds a live interface, which this namespace does not have under that name. The
    /// command runs in the wrong namespace (the instance's interfaces, indexes and service
    /// namespaces are not this one's); run it where `viscum attach` ran.
    OtherNetns,
    /// Never attached here, or detached.
    NotAttached,
    /// The kernel could not be asked (see [`Attachment::error`]).
    Unknown,
}

/// One interface's attachment, as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    /// The interface's name.
    pub interface: String,
    /// What the kernel reports for it now.
    pub state: AttachState,
    /// `tcx` or `clsact`, from the record; `None` without one.
    pub mode: Option<String>,
    /// Why the state is [`AttachState::Unknown`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Attachment {
    /// For people: `attached (tcx)`, `missing (interface gone)`, ...
    pub fn describe(&self) -> String {
        match self.state {
            AttachState::Attached => {
                format!("attached ({})", self.mode.as_deref().unwrap_or("?"))
            }
            AttachState::InterfaceGone => "missing (interface gone)".into(),
            AttachState::OtherNetns => {
                "attached in another network namespace (run viscum there)".into()
            }
            AttachState::Missing => {
                "missing (interface re-created, or the classifier removed)".into()
            }
            AttachState::NotAttached => "not attached".into(),
            AttachState::Unknown => format!(
                "unknown ({})",
                self.error
                    .as_deref()
                    .unwrap_or("the kernel could not be asked")
            ),
        }
    }
}

/// The attachment of the classifier to `name`, checked in the kernel (not just the record).
pub fn attachment(pins: &Pins, name: &str) -> Attachment {
    state_of(&pins.program(), &pins.link(name), name)
}

/// Is the reply classifier really on the ingress hook of service veth `name`?
pub fn reply_attached(pins: &Pins, name: &str) -> bool {
    state_of(&pins.reply_program(), &pins.reply_link(name), name).state == AttachState::Attached
}

fn state_of(program: &Path, record: &Path, name: &str) -> Attachment {
    let mut a = Attachment {
        interface: name.to_owned(),
        state: AttachState::NotAttached,
        mode: None,
        error: None,
    };
    if !record.exists() {
        return a;
    }
    let tcx = !record.is_dir();
    a.mode = Some(if tcx { "tcx" } else { "clsact" }.to_owned());
    // Read once: both the hook query and the other-namespace check compare against it.
    let prog_id = pinned_program_id(program);
    // The link's own interface, alive (non-zero) and not this namespace's `name`: the
    // attachment is in another namespace (clsact records cannot tell, and read as gone).
    // The link is alive (on some interface) and holds the program pinned here.
    let elsewhere = |prog: Option<u32>| {
        tcx && prog.is_some_and(
            |prog| matches!(tcx_link(record), Some((i, link_prog)) if i != 0 && link_prog == prog),
        )
    };
    let Ok(index) = ifindex(name) else {
        a.state = if elsewhere(prog_id.as_ref().ok().copied()) {
            AttachState::OtherNetns
        } else {
            AttachState::InterfaceGone
        };
        return a;
    };
    let checked = prog_id.and_then(|id| on_hook(id, name, index, tcx).map(|on| (on, id)));
    match checked {
        Ok((true, _)) if !tcx && !record_is_for(record, name) => {
            // Our program, but on an interface instance we never recorded: someone
            // attached it by hand. Ours is gone with the old instance.
            a.state = AttachState::Missing;
        }
        Ok((true, _)) => a.state = AttachState::Attached,
        // A live link of our program, which is not on this namespace's interface of the
        // name: the link's interface is another one (a re-created or detached one would
        // read 0), in another namespace, whatever its index (indexes are per namespace).
        Ok((false, id)) if elsewhere(Some(id)) => a.state = AttachState::OtherNetns,
        Ok((false, _)) => a.state = AttachState::Missing,
        Err(e) => {
            a.state = AttachState::Unknown;
            a.error = Some(chain(&e));
        }
    }
    a
}

/// The TCX link pinned at `record`, as the kernel has it: the index of the interface it is
/// attached to (`bpf_link_info.tcx.ifindex` from `BPF_OBJ_GET_INFO_BY_FD`; kernel/bpf/tcx.c
/// reports 0 once the interface is gone; an index of the link's own namespace, which need
/// not be this one's) and its program's id. `None` if the pin cannot be opened or is not a
/// TCX link. Raw bpf(2): aya's `LinkInfo` does not expose the link's interface.
fn tcx_link(record: &Path) -> Option<(u32, u32)> {
    use std::os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_TCX: u32 = 11;
    /// `union bpf_attr` for `BPF_OBJ_GET`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    /// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    /// The head of `struct bpf_link_info` (include/uapi/linux/bpf.h) with its union as the
    /// `tcx` member (8-byte aligned, at offset 16), and room for the union's larger members.
    #[repr(C)]
    #[derive(Default)]
    struct LinkInfo {
        type_: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        tcx_ifindex: u32,
        tcx_attach_type: u32,
        _rest: [u64; 4],
    }
    let path = std::ffi::CString::new(record.as_os_str().as_bytes()).ok()?;
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: bpf(2) with an attr of the size passed, naming a NUL-terminated path that
    // outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const get,
            size_of::<ObjGet>(),
        )
    };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: a descriptor bpf(2) just returned to us, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = LinkInfo::default();
    let req = InfoByFd {
        bpf_fd: u32::try_from(fd.as_raw_fd()).ok()?,
        info_len: size_of::<LinkInfo>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: bpf(2) writing at most `info_len` bytes into `info`, which lives past the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw const req,
            size_of::<InfoByFd>(),
        )
    };
    (rc == 0 && info.type_ == BPF_LINK_TYPE_TCX).then_some((info.tcx_ifindex, info.prog_id))
}

/// An error with its causes on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Every interface this instance has an attachment record for, with its real state.
pub fn attachments(pins: &Pins) -> Vec<Attachment> {
    recorded_interfaces(pins)
        .iter()
        .map(|name| attachment(pins, name))
        .collect()
}

/// Interfaces the classifier is really attached to right now (records whose program is on
/// the interface's hook; see [`attachments`] for the others).
pub fn attached_interfaces(pins: &Pins) -> Vec<String> {
    attachments(pins)
        .into_iter()
        .filter(|a| a.state == AttachState::Attached)
        .map(|a| a.interface)
        .collect()
}

/// Recorded interfaces whose TCX link is attached to an interface of another network
/// namespace (see [`AttachState::OtherNetns`]), for a warning before any command: a link
/// read per record, and the full check ([`attachment`]) for live links only.
pub fn attached_elsewhere(pins: &Pins) -> Vec<String> {
    recorded_interfaces(pins)
        .into_iter()
        .filter(|name| {
            let record = pins.link(name);
            if record.is_dir() {
                return false;
            }
            match tcx_link(&record) {
                Some((0, _)) | None => false,
                Some(_) => attachment(pins, name).state == AttachState::OtherNetns,
            }
        })
        .collect()
}

/// Interfaces this instance has an attachment record for (link pins or clsact records),
/// whether or not the attachment still exists.
pub fn recorded_interfaces(pins: &Pins) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(pins.links_dir())
        .map(|rd| {
            rd.filter_map(std::result::Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Detaches the classifier from each interface. The maps (and so the
/// redirect entries) stay pinned for a later `attach`. A stale record (the
/// interface deleted or re-created) is removed without touching the new interface.
///
/// # Errors
/// [`EngineError::NotAttachedTo`] for a name without a record, checked for every name
/// first (then nothing changes); [`EngineError::Program`] / [`EngineError::Io`] if a
/// detach fails (the interfaces before it are detached).
pub fn detach(pins: &Pins, ifaces: &[String]) -> Result<(), EngineError> {
    let _lock = super::lock::lock_if_attached(pins)?;
    let recorded = recorded_interfaces(pins);
    for name in ifaces {
        if !recorded.iter().any(|a| a == name) {
            return Err(EngineError::NotAttachedTo(name.clone()));
        }
    }
    for name in ifaces {
        detach_one(pins, name)?;
    }
    Ok(())
}

fn detach_one(pins: &Pins, name: &str) -> Result<(), EngineError> {
    let path = pins.link(name);
    if path.is_dir() {
        // clsact attachment (old kernels).
        if record_is_for(&path, name) {
            match tc::qdisc_detach_program(name, TcAttachType::Ingress, INGRESS_PROG) {
                Ok(()) => {}
                Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(EngineError::io(
                        format!("cannot detach from {name}"),
                        io::Error::other(e),
                    ));
                }
            }
            release_clsact(name, &path)?;
        }
        remove_record(&path)?;
        return Ok(());
    }
    // Unpinning and dropping the last reference to a TCX link detaches it (a defunct link
    // of a deleted interface just goes away).
    let link = PinnedLink::from_pin(&path).map_err(|e| {
        EngineError::io(
            format!("cannot open the link pin {}", path.display()),
            io::Error::other(e),
        )
    })?;
    let fd_link = link
        .unpin()
        .map_err(|e| EngineError::io(format!("cannot unpin {}", path.display()), e))?;
    drop(fd_link);
    Ok(())
}

/// `<bpffs>/targets`: `<ifindex>/<ifname>` for every redirect target the reply classifier
/// was attached to.
fn targets_dir(pins: &Pins) -> std::path::PathBuf {
    pins.dir.join("targets")
}

/// Records that the target with ifindex `index` is called `name`.
fn note_target(pins: &Pins, index: u32, name: &str) -> Result<(), EngineError> {
    let dir = targets_dir(pins).join(index.to_string());
    // One name per ifindex: a renamed interface replaces its old name.
    for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
        if e.file_name() != name {
            let _ = fs::remove_dir(e.path());
        }
    }
    let path = dir.join(name);
    fs::create_dir_all(&path)
        .map_err(|e| EngineError::io(format!("cannot record the target {}", path.display()), e))
}

/// The name of the interface a redirect target's ifindex belonged to when its entry was
/// added (or last re-pointed), if recorded. With the interface gone, this is how an entry
/// finds its target again once an interface of that name exists.
pub fn target_name(pins: &Pins, index: u32) -> Option<String> {
    fs::read_dir(targets_dir(pins).join(index.to_string()))
        .ok()?
        .flatten()
        .find_map(|e| e.file_name().into_string().ok())
}

/// Removes the name records of ifindexes that no interface has any more and that no entry
/// in `referenced` still points at.
pub fn prune_targets(pins: &Pins, referenced: &HashSet<u32>) {
    for e in fs::read_dir(targets_dir(pins))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(index) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if referenced.contains(&index) || crate::lifecycle::ifindex_alive(index) {
            continue;
        }
        let _ = remove_record(&e.path());
    }
}

/// Forgets every ifindex recorded for `name` (its namespace is being deleted).
fn forget_target(pins: &Pins, name: &str) {
    for e in fs::read_dir(targets_dir(pins))
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.path().join(name).is_dir() {
            let _ = remove_record(&e.path());
        }
    }
}

/// Detaches everywhere and removes every pin of this instance: program,
/// maps (and with them all entries) and the directory.
///
/// # Errors
/// [`EngineError::Program`] / [`EngineError::Io`] if a detach or removing a pin fails;
/// what was removed before stays removed.
pub fn purge(pins: &Pins) -> Result<(), EngineError> {
    // Held while the directory goes: a writer waiting for it then finds the directory gone
    // (see `lock`) rather than writing into pins nobody will read.
    let _lock = super::lock::lock_if_attached(pins)?;
    for name in recorded_interfaces(pins) {
        detach_one(pins, &name)?;
    }
    let _ = fs::remove_dir(pins.links_dir());
    if let Ok(rd) = fs::read_dir(pins.reply_links_dir()) {
        for e in rd.flatten() {
            detach_reply(pins, &e.file_name().to_string_lossy())?;
        }
    }
    let _ = fs::remove_dir(pins.reply_links_dir());
    for e in fs::read_dir(targets_dir(pins))
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = remove_record(&e.path());
    }
    let _ = fs::remove_dir(targets_dir(pins));
    super::layout::remove_marker(pins);
    // Only our own pins: a bpffs mounted right on the directory also holds
    // the kernel's `maps.debug`/`progs.debug` iterators.
    for p in our_pins(pins) {
        fs::remove_file(&p)
            .map_err(|e| EngineError::io(format!("cannot remove {}", p.display()), e))?;
    }
    // Fails harmlessly when the directory is itself a bpffs mount point.
    let _ = fs::remove_dir(&pins.dir);
    Ok(())
}
