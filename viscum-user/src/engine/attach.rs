//! Loading the classifier once, attaching it at TC ingress of interfaces,
//! and pinning program, maps and links so the datapath outlives us.

use std::{fs, io};

use aya::{
    EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc,
    },
};
use viscum_common::{FLOWS_MAP, INGRESS_PROG, REPLIES_MAP, REPLY_PROG, SERVICES_MAP};

use super::{EngineError, Pins, ifindex};

/// What `attach` did for one interface.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum AttachOutcome {
    /// Newly attached with a pinned TCX link.
    Tcx,
    /// Newly attached through a clsact qdisc (kernels < 6.6); nothing to pin.
    Clsact,
    /// Was already attached: nothing changed.
    AlreadyAttached,
}

use crate::features::has_tcx;
pub use crate::features::kernel_at_least;

/// Loads the classifier (or reopens the pinned one) and attaches it at TC
/// ingress of each interface. Idempotent per interface.
///
/// All interfaces are checked before anything is loaded, so a typo in the
/// third name changes nothing.
pub fn attach(
    pins: &Pins,
    ifaces: &[String],
    sizes: MapSizes,
) -> Result<Vec<(String, AttachOutcome)>, EngineError> {
    for name in ifaces {
        ifindex(name)?;
    }
    crate::bpffs::ensure(&pins.dir)?;
    let mut prog = load_or_open(pins, sizes, INGRESS_PROG)?;
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
    Ok(out)
}

/// Map capacities, fixed when the datapath is first loaded.
#[derive(Debug, Clone, Copy)]
pub struct MapSizes {
    pub services: u32,
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
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            io::Error::last_os_error()
        );
    }
    crate::features::check_object(crate::EBPF_OBJECT)?;
    crate::features::check_required_helpers()?;
    // Maps are pinned by name in the directory; if they are already there
    // (a previous attach whose program was purged), aya reuses them and the
    // entries survive.
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&pins.dir)
        .map_max_entries(SERVICES_MAP, sizes.services)
        .map_max_entries(FLOWS_MAP, sizes.flows)
        .map_max_entries(REPLIES_MAP, sizes.flows)
        .load(crate::EBPF_OBJECT)
        .map_err(|e| EngineError::Load(Box::new(e)))?;
    for (name, pin) in [
        (INGRESS_PROG, pins.program()),
        (REPLY_PROG, pins.reply_program()),
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
        prog.load().map_err(|e| rejected(name, e))?;
        prog.pin(&pin).map_err(|e| {
            EngineError::io(
                format!("cannot pin the classifier at {}", pin.display()),
                io::Error::other(e),
            )
        })?;
    }
    Ok(())
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
    out.extend(
        [pins.program(), pins.reply_program()]
            .into_iter()
            .filter(|p| p.exists()),
    );
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
pub fn attach_reply(pins: &Pins, name: &str) -> Result<AttachOutcome, EngineError> {
    ifindex(name)?;
    let mut prog = load_or_open(pins, MapSizes::default(), REPLY_PROG)?;
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
    attach_at(&mut prog, prog_id, name, &pins.reply_link(name))
}

/// Detaches the reply classifier from a service veth, if attached; a veth
/// that is already gone took its link with it, so only the pin is removed.
pub fn detach_reply(pins: &Pins, name: &str) -> Result<(), EngineError> {
    let path = pins.reply_link(name);
    if path.is_dir() {
        let _ = tc::qdisc_detach_program(name, TcAttachType::Ingress, REPLY_PROG);
        let _ = release_clsact(name, &path);
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
    Ok(())
}

fn attach_at(
    prog: &mut SchedClassifier,
    prog_id: u32,
    name: &str,
    link_pin: &std::path::Path,
) -> Result<AttachOutcome, EngineError> {
    if is_attached(link_pin, prog_id, name)? {
        return Ok(AttachOutcome::AlreadyAttached);
    }
    let link_pin = link_pin.to_path_buf();
    if link_pin.exists() {
        // A pin for a link that no longer points at this interface (it was
        // deleted and recreated): drop it so we can attach afresh.
        let _ = fs::remove_file(&link_pin);
    }
    if has_tcx() {
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
        fd_link.pin(&link_pin).map_err(|e| {
            EngineError::io(
                format!("cannot pin the link at {}", link_pin.display()),
                io::Error::other(e),
            )
        })?;
        Ok(AttachOutcome::Tcx)
    } else {
        let ifindex = super::ifindex(name)?;
        let created = if super::clsact::present(ifindex)? {
            false
        } else {
            tc::qdisc_add_clsact(name).map_err(|e| {
                EngineError::io(
                    format!("cannot add a clsact qdisc to {name}"),
                    io::Error::other(e),
                )
            })?;
            true
        };
        let id = prog
            .attach(name, TcAttachType::Ingress)
            .map_err(|e| EngineError::prog(format!("cannot attach to {name}"), e))?;
        // A netlink filter stays in the kernel after we exit; forget the
        // link so dropping it does not detach.
        let link = prog
            .take_link(id)
            .map_err(|e| EngineError::prog("cannot take the tc link", e))?;
        std::mem::forget(link);
        // Record the attachment so `detach`/`stats` know about it (bpffs
        // holds directories and pins, no plain files), and whether the
        // qdisc is ours to remove on detach.
        fs::create_dir_all(&link_pin).map_err(|e| {
            EngineError::io(
                format!("cannot record the attachment at {}", link_pin.display()),
                e,
            )
        })?;
        if created {
            let marker = link_pin.join(CLSACT_CREATED);
            fs::create_dir_all(&marker).map_err(|e| {
                EngineError::io(
                    format!("cannot record the qdisc at {}", marker.display()),
                    e,
                )
            })?;
        }
        Ok(AttachOutcome::Clsact)
    }
}

/// Marker directory inside a clsact attachment record: Viscum added the
/// qdisc, so detach may remove it.
const CLSACT_CREATED: &str = "clsact-created";

/// Removes a clsact attachment record (and its marker).
fn remove_record(path: &std::path::Path) -> Result<(), EngineError> {
    let _ = fs::remove_dir(path.join(CLSACT_CREATED));
    fs::remove_dir(path)
        .map_err(|e| EngineError::io(format!("cannot remove {}", path.display()), e))
}

/// After our filter left `name`: remove the clsact qdisc if Viscum added it
/// and nothing else uses it.
fn release_clsact(name: &str, record: &std::path::Path) -> Result<(), EngineError> {
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

/// Is our program (by id) attached at ingress of `name`?
fn is_attached(link_pin: &std::path::Path, prog_id: u32, name: &str) -> Result<bool, EngineError> {
    if has_tcx() {
        let (_, progs) = SchedClassifier::query_tcx(name, TcAttachType::Ingress)
            .map_err(|e| EngineError::prog(format!("cannot query TCX programs on {name}"), e))?;
        Ok(progs.iter().any(|p| p.id() == prog_id) && link_pin.exists())
    } else {
        Ok(link_pin.is_dir())
    }
}

/// Interfaces this instance is attached to (by its link pins).
pub fn attached_interfaces(pins: &Pins) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(pins.links_dir())
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Detaches the classifier from each interface. The maps (and so the
/// redirect entries) stay pinned for a later `attach`.
pub fn detach(pins: &Pins, ifaces: &[String]) -> Result<(), EngineError> {
    let attached = attached_interfaces(pins);
    for name in ifaces {
        if !attached.iter().any(|a| a == name) {
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
        remove_record(&path)?;
        return Ok(());
    }
    // Unpinning and dropping the last reference to a TCX link detaches it.
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

/// Detaches everywhere and removes every pin of this instance: program,
/// maps (and with them all entries) and the directory.
pub fn purge(pins: &Pins) -> Result<(), EngineError> {
    for name in attached_interfaces(pins) {
        detach_one(pins, &name)?;
    }
    let _ = fs::remove_dir(pins.links_dir());
    if let Ok(rd) = fs::read_dir(pins.reply_links_dir()) {
        for e in rd.flatten() {
            detach_reply(pins, &e.file_name().to_string_lossy())?;
        }
    }
    let _ = fs::remove_dir(pins.reply_links_dir());
    // Only our own pins: a bpffs mounted right on the directory also holds
    // the kernel's `maps.debug`/`progs.debug` iterators.
    let ours = [pins.program(), pins.reply_program()].into_iter().chain(
        fs::read_dir(&pins.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("VISCUM_") || n == "AYA_LOGS")
            }),
    );
    for p in ours {
        if p.exists() {
            fs::remove_file(&p)
                .map_err(|e| EngineError::io(format!("cannot remove {}", p.display()), e))?;
        }
    }
    // Fails harmlessly when the directory is itself a bpffs mount point.
    let _ = fs::remove_dir(&pins.dir);
    Ok(())
}
