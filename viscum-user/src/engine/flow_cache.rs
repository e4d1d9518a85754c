//! The classifier's flow cache (`VISCUM_FCACHE`) as user space reads it: the redirects its
//! slots counted and have not yet added to their entries' counters
//! (`viscum_common::FlowCacheSlot::pending`).
//!
//! A cache hit counts in its slot, not in the entry's counter line (a cache and TLB miss per
//! packet with many entries); the classifier adds a slot's counts to the entry when the slot
//! is filled again or emptied. Until then they are here, so every reader of the counters
//! adds them: what `viscum stats` shows is exact even for a flow that went quiet.
//!
//! The cache is not pinned (a fresh load of the classifier starts it empty): it is found
//! among the maps of the pinned ingress program. It is `BPF_F_MMAPABLE`, so a read is a pass
//! over shared memory (16,384 slots of 128 bytes per CPU: a word each, and the slot itself
//! when it holds counts), not a bpf(2) call per slot, except on CPUs without 64-bit atomics.
//!
//! The read maps the cache one 64 KiB window at a time ([`filter_words::WindowReader`]),
//! never whole and never between reads. The kernel maps every page of such an array at `mmap`
//! (`remap_vmalloc_range`), so a whole mapping kept between reads made the cache's 2 MiB per
//! CPU count in the daemon's resident memory for as long as it ran (B9, `docs/benchmarks.md`:
//! 4 of an idle daemon's 17.0 MiB on 2 CPUs), and a whole mapping made for each read showed
//! as 4 MiB spikes in the RSS of a daemon read often (the soak test read them as growth).
//! A window costs a `mmap`/`munmap` pair per 512 slots; the memory is the map's, charged to
//! it whether mapped or not.

use std::{
    collections::HashMap,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
};

use aya::{
    maps::{Array, IterableMap as _, MapData, MapError, MapInfo},
    programs::ProgramInfo,
};
use viscum_common::{
    FLOW_CACHE_MAP, FLOW_CACHE_PENDING_WORD, FlowCacheSlot, pending_bytes, pending_packets,
};

use super::{EngineError, filter_words};

/// Words (`u64`) per slot.
const SLOT_WORDS: u32 = (size_of::<FlowCacheSlot>() / 8) as u32;
const _: () = assert!(size_of::<FlowCacheSlot>() == 128);

/// What the cache's slots hold that the entries' counters do not have yet.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct PendingCounts {
    /// By counter slot (`ServiceEntry::stats_id`): (packets, bytes) of slots whose entry
    /// still owns that counter slot.
    pub by_id: HashMap<u32, (u64, u64)>,
    /// Packets of every slot, whatever its entry: part of the global `redirected`.
    pub packets: u64,
}

impl PendingCounts {
    /// (packets, bytes) pending for counter slot `id`.
    pub fn of(&self, id: u32) -> (u64, u64) {
        self.by_id.get(&id).copied().unwrap_or_default()
    }
}

/// The flow cache of one loaded ingress program, opened once and kept by the
/// [`super::Engine`] for as long as that program stays pinned (a re-attach that loads a new
/// object brings a new cache, found again by the program's id). Mapped a window at a time
/// by each read (see the module docs).
pub(super) struct Handle {
    program_id: u32,
    slots: Array<MapData, FlowCacheSlot>,
}

/// What the kernel says of the program pinned at `program` (its id, its maps), or `None`
/// without a pin.
fn pinned(program: &Path) -> Result<Option<ProgramInfo>, EngineError> {
    if !program.exists() {
        return Ok(None);
    }
    // Not through `SchedClassifier::from_pin`, which makes aya probe the kernel's features
    // (see `attach::pinned_program_id`).
    ProgramInfo::from_pin(program)
        .map(Some)
        .map_err(|e| EngineError::prog("cannot read the pinned classifier's info", e))
}

/// The flow cache of the ingress program described by `info`, or `None` when it has no such
/// map (an object from before the cache).
///
/// # Errors
/// [`EngineError::Program`] / [`EngineError::Map`] if the program's maps cannot be listed
/// or opened (opening a map by id needs `CAP_SYS_ADMIN`).
fn open(info: &ProgramInfo) -> Result<Option<Handle>, EngineError> {
    let ids = info
        .map_ids()
        .map_err(|e| EngineError::prog("cannot list the classifier's maps", e))?
        .unwrap_or_default();
    for map_id in ids {
        let info = match MapInfo::from_id(map_id) {
            Ok(info) => info,
            // Gone between the listing and here: not the cache of a live program.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                continue;
            }
            Err(e) => return Err(EngineError::map("cannot open the classifier's maps", e)),
        };
        // The bytes, not `name_as_str`, which makes aya probe the kernel's features.
        if info.name() != FLOW_CACHE_MAP.as_bytes() {
            continue;
        }
        let data = MapData::from_id(map_id)
            .map_err(|e| EngineError::map("cannot open the classifier's flow cache", e))?;
        let slots: Array<MapData, FlowCacheSlot> = Array::try_from(aya::maps::Map::Array(data))
            .map_err(|e| EngineError::map("the flow cache has an unexpected layout", e))?;
        return Ok(Some(Handle {
            program_id: info.id(),
            slots,
        }));
    }
    Ok(None)
}

/// Reads what the flow cache of the classifier pinned at `program` holds (see
/// [`PendingCounts`]), through `handle` (kept by the caller between reads; reopened when the
/// pinned program changed). `generation`: the entries' generation now
/// (`viscum_common::ENTRIES_GEN_WORD`); a slot filled under another may count for an entry
/// that is gone, which `still_owns` decides as the classifier does
/// (`viscum_ebpf::lookup::still_owns`).
///
/// A cache that cannot be opened (a reader without `CAP_SYS_ADMIN`) counts as empty, with
/// a warning, once per process.
///
/// Not a snapshot: the classifier may move a slot's counts to its entry between this read
/// and the caller's read of the entries' counters, which then shows them twice (or, moved
/// to the late slot, not at all) until the next read.
///
/// # Errors
/// [`EngineError::Map`] if a slot cannot be read through bpf(2); `still_owns`'s errors.
pub(super) fn pending(
    program: &Path,
    handle: &mut Option<Handle>,
    generation: Option<u64>,
    still_owns: impl Fn(&FlowCacheSlot) -> Result<bool, EngineError>,
) -> Result<PendingCounts, EngineError> {
    let mut out = PendingCounts::default();
    let opened = pinned(program).and_then(|info| match (info, handle.take()) {
        (None, _) => Ok(None),
        (Some(info), Some(h)) if h.program_id == info.id() => Ok(Some(h)),
        (Some(info), _) => open(&info),
    });
    *handle = match opened {
        Ok(h) => h,
        // Opening maps by id needs CAP_SYS_ADMIN, which a reader of the pins may lack: the
        // counters are still right, only late by what the cache holds.
        Err(e) => {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "{e}: the counters leave out the classifier's latest cached hits \
                     (a fraction of a second of each busy flow's packets)"
                );
            }
            None
        }
    };
    let Some(h) = handle.as_ref() else {
        return Ok(out);
    };
    let mut add = |slot: &FlowCacheSlot| -> Result<(), EngineError> {
        let (packets, bytes) = (pending_packets(slot.pending), pending_bytes(slot.pending));
        out.packets += packets;
        if Some(slot.generation) == generation || still_owns(slot)? {
            let e = out.by_id.entry(slot.target.stats_id).or_default();
            e.0 += packets;
            e.1 += bytes;
        }
        Ok(())
    };
    let n = h.slots.len();
    let mut mem = filter_words::WindowReader::new(h.slots.map(), n.saturating_mul(SLOT_WORDS));
    for i in 0..n {
        let base = i * SLOT_WORDS;
        let slot = match mem.load(base + FLOW_CACHE_PENDING_WORD as u32) {
            Some(0) => continue,
            Some(_) => {
                let mut words = [0u64; SLOT_WORDS as usize];
                for (w, word) in words.iter_mut().enumerate() {
                    *word = mem.load(base + w as u32).unwrap_or(0);
                }
                // SAFETY: a plain-integer `repr(C)` struct of exactly these 128 bytes.
                unsafe { std::mem::transmute::<[u64; 16], FlowCacheSlot>(words) }
            }
            // Not mappable (no 64-bit atomics, a cache made without the flag): bpf(2).
            None => h
                .slots
                .get(&i, 0)
                .map_err(|e| EngineError::map("cannot read the flow cache", e))?,
        };
        if slot.pending != 0 {
            add(&slot)?;
        }
    }
    Ok(out)
}
