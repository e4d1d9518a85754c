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

use std::{
    collections::HashMap,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
};

use aya::{
    maps::{Array, IterableMap as _, MapData, MapInfo},
    programs::SchedClassifier,
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

/// The ingress program's flow cache, or `None` when there is no pinned program or it has
/// no such map (an object from before the cache).
///
/// # Errors
/// [`EngineError::Program`] / [`EngineError::Map`] if the program's maps cannot be listed
/// or the cache opened.
fn open(program: &Path) -> Result<Option<MapData>, EngineError> {
    if !program.exists() {
        return Ok(None);
    }
    let prog = SchedClassifier::from_pin(program)
        .map_err(|e| EngineError::prog("cannot open the pinned classifier", e))?;
    let ids = prog
        .info()
        .and_then(|info| info.map_ids())
        .map_err(|e| EngineError::prog("cannot list the classifier's maps", e))?
        .unwrap_or_default();
    for id in ids {
        // A map that went away between the listing and here is not the cache.
        let Ok(info) = MapInfo::from_id(id) else {
            continue;
        };
        if info.name_as_str() == Some(FLOW_CACHE_MAP) {
            return MapData::from_id(id)
                .map(Some)
                .map_err(|e| EngineError::map("cannot open the classifier's flow cache", e));
        }
    }
    Ok(None)
}

/// Reads what the flow cache of the classifier pinned at `program` holds (see
/// [`PendingCounts`]). `generation`: the entries' generation now
/// (`viscum_common::ENTRIES_GEN_WORD`); a slot filled under another may count for an entry
/// that is gone, which `still_owns` decides as the classifier does
/// (`viscum_ebpf::lookup::still_owns`).
///
/// A cache that cannot be opened (a reader without `CAP_SYS_ADMIN`) counts as empty, with
/// a warning, once per process.
///
/// # Errors
/// [`EngineError::Map`] if the cache is not an array of slots or a slot cannot be read
/// through bpf(2); `still_owns`'s errors.
pub(super) fn pending(
    program: &Path,
    generation: Option<u64>,
    still_owns: impl Fn(&FlowCacheSlot) -> Result<bool, EngineError>,
) -> Result<PendingCounts, EngineError> {
    let mut out = PendingCounts::default();
    let data = match open(program) {
        Ok(Some(data)) => data,
        Ok(None) => return Ok(out),
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
            return Ok(out);
        }
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
    let slots: Array<MapData, FlowCacheSlot> = Array::try_from(aya::maps::Map::Array(data))
        .map_err(|e| EngineError::map("the flow cache has an unexpected layout", e))?;
    let n = slots.len();
    if let Some(mem) = filter_words::map_words(slots.map(), n.saturating_mul(SLOT_WORDS)) {
        for i in 0..n {
            let base = i * SLOT_WORDS;
            if mem.load(base + FLOW_CACHE_PENDING_WORD as u32) != Some(0) {
                let mut words = [0u64; SLOT_WORDS as usize];
                for (w, word) in words.iter_mut().enumerate() {
                    *word = mem.load(base + w as u32).unwrap_or(0);
                }
                // SAFETY: a plain-integer `repr(C)` struct of exactly these 128 bytes.
                let slot = unsafe { std::mem::transmute::<[u64; 16], FlowCacheSlot>(words) };
                add(&slot)?;
            }
        }
        return Ok(out);
    }
    for i in 0..n {
        let slot = slots
            .get(&i, 0)
            .map_err(|e| EngineError::map("cannot read the flow cache", e))?;
        if slot.pending != 0 {
            add(&slot)?;
        }
    }
    Ok(out)
}
