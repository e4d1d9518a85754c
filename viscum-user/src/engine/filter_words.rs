//! The miss pre-filter's words (`VISCUM_PORTS`), read and written through a shared mapping
//! of the map's memory.
//!
//! Every entry change reads and may write a word or two of the filter (its port, its address)
//! under the writers' lock. Through bpf(2) that is a system call per word, most of a library
//! update's time (B7 in `docs/benchmarks.md`: `Engine::insert` is otherwise one map update).
//! The classifier declares the array `BPF_F_MMAPABLE` (Linux 5.5, commit fc9702273e2e "bpf:
//! Add mmap() support for BPF_MAP_TYPE_ARRAY"), so user space maps it `MAP_SHARED` and a
//! word is a load or a store, seen by the classifier as soon as it is made. A filter pinned
//! by an older version without the flag cannot be mapped: its words then go through bpf(2)
//! as before.
//!
//! Each word is accessed as an `AtomicU64`: the kernel and other processes use the same
//! memory, and a word is only ever replaced whole (the writers' lock orders the writers;
//! the classifier only reads). A store is followed by the map update that makes an entry
//! visible, a system call, which orders it before the entry. CPUs without 64-bit atomics
//! (32-bit MIPS, PowerPC) keep bpf(2), which replaces a word whole in the kernel.

#[cfg(target_has_atomic = "64")]
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Array, IterableMap as _, MapData};

use super::EngineError;

/// The filter's words: the map, and its memory when it could be mapped.
pub(super) struct FilterWords {
    map: Array<MapData, u64>,
    mem: Option<Mapping>,
}

/// A shared mapping of an array map's values.
#[cfg(target_has_atomic = "64")]
pub(super) struct Mapping {
    ptr: NonNull<AtomicU64>,
    words: u32,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory, accessed only through atomics.
#[cfg(target_has_atomic = "64")]
unsafe impl Send for Mapping {}
// SAFETY: as above.
#[cfg(target_has_atomic = "64")]
unsafe impl Sync for Mapping {}

#[cfg(target_has_atomic = "64")]
impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map_words` mapped; nothing borrows it past `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// Without 64-bit atomics a word could not be stored whole: there is never a mapping.
#[cfg(not(target_has_atomic = "64"))]
pub(super) enum Mapping {}

#[cfg(not(target_has_atomic = "64"))]
impl Mapping {
    pub(super) fn load(&self, _i: u32) -> Option<u64> {
        match *self {}
    }

    pub(super) fn store(&self, _i: u32, _value: u64) -> bool {
        match *self {}
    }
}

#[cfg(not(target_has_atomic = "64"))]
pub(super) fn map_words(_data: &MapData, _words: u32) -> Option<Mapping> {
    None
}

#[cfg(not(target_has_atomic = "64"))]
pub(super) fn map_window(_data: &MapData, _first_page: usize, _words: u32) -> Option<Mapping> {
    None
}

/// The size of a memory page, in bytes.
pub(super) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

#[cfg(target_has_atomic = "64")]
impl Mapping {
    /// Word `i`, or `None` past the mapping's end.
    pub(super) fn load(&self, i: u32) -> Option<u64> {
        if i >= self.words {
            return None;
        }
        // SAFETY: `i` is within the mapping.
        Some(unsafe { self.ptr.add(i as usize).as_ref() }.load(Ordering::Acquire))
    }

    /// Stores word `i`; false (nothing stored) past the mapping's end.
    pub(super) fn store(&self, i: u32, value: u64) -> bool {
        if i >= self.words {
            return false;
        }
        // SAFETY: `i` is within the mapping.
        unsafe { self.ptr.add(i as usize).as_ref() }.store(value, Ordering::Release);
        true
    }
}

/// Maps the `words` values of array map `data` (8 bytes each), or `None` if the kernel
/// refuses (a map made without `BPF_F_MMAPABLE`).
#[cfg(target_has_atomic = "64")]
pub(super) fn map_words(data: &MapData, words: u32) -> Option<Mapping> {
    map_window(data, 0, words)
}

/// Maps `words` values (8 bytes each) of array map `data` from its page `first_page` on (the
/// values from byte `first_page * page_size()`): a window of a large map, or `None` if the
/// kernel refuses (a map made without `BPF_F_MMAPABLE`, a window past the map's end).
/// Word 0 of the mapping is the window's first.
#[cfg(target_has_atomic = "64")]
pub(super) fn map_window(data: &MapData, first_page: usize, words: u32) -> Option<Mapping> {
    if words == 0 {
        return None;
    }
    let page = page_size();
    let bytes = (words as usize * 8).div_ceil(page) * page;
    let offset = libc::off_t::try_from(first_page.checked_mul(page)?).ok()?;
    // SAFETY: a fresh shared mapping of the map's descriptor; the kernel checks the offset and
    // length against the map's size and the flag (array_map_mmap, kernel/bpf/arraymap.c).
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            data.fd().as_fd().as_raw_fd(),
            offset,
        )
    };
    if ptr == libc::MAP_FAILED {
        return None;
    }
    Some(Mapping {
        ptr: NonNull::new(ptr.cast())?,
        words,
        bytes,
    })
}

/// Bytes of an array map mapped at once by a [`WindowReader`] (a whole number of pages: page
/// sizes are powers of two up to 64 KiB; a larger page is a window of its own).
const WINDOW_BYTES: usize = 64 * 1024;

/// Reads the words of an array map through one window of its memory at a time: mapped when
/// a word outside the current one is asked for, unmapped when the next is mapped or the
/// reader drops. The kernel maps every page of a `BPF_F_MMAPABLE` array at `mmap`
/// (`remap_vmalloc_range`), so a mapping of a whole large map (the flow cache's 2 MiB per
/// CPU, the counters') counts in the reader's resident memory while it lasts: for as long as
/// a daemon runs if kept, as spikes if made for each read. Words read in ascending order map
/// each window once.
pub(super) struct WindowReader<'a> {
    data: &'a MapData,
    words: u32,
    window_words: u32,
    page: usize,
    /// The window mapped now: its first word and its mapping.
    current: Option<(u32, Mapping)>,
    /// The map cannot be mapped here (no 64-bit atomics, a map without the flag).
    unmappable: bool,
}

impl<'a> WindowReader<'a> {
    /// A reader of the first `words` words of array map `data`; nothing is mapped yet.
    pub(super) fn new(data: &'a MapData, words: u32) -> Self {
        let page = page_size();
        WindowReader {
            data,
            words,
            window_words: u32::try_from(WINDOW_BYTES.max(page) / 8).unwrap_or(u32::MAX),
            page,
            current: None,
            unmappable: false,
        }
    }

    /// Word `i`, or `None` when the map cannot be mapped (the caller reads it through
    /// bpf(2)) or `i` is past its end.
    pub(super) fn load(&mut self, i: u32) -> Option<u64> {
        if self.unmappable || i >= self.words {
            return None;
        }
        let first = i / self.window_words * self.window_words;
        if self.current.as_ref().is_none_or(|(f, _)| *f != first) {
            // The old window goes before the new one is made: one at a time, at most.
            self.current = None;
            let count = self.window_words.min(self.words - first);
            match map_window(self.data, first as usize * 8 / self.page, count) {
                Some(m) => self.current = Some((first, m)),
                None => {
                    self.unmappable = true;
                    return None;
                }
            }
        }
        self.current.as_ref()?.1.load(i - first)
    }
}

impl FilterWords {
    /// Opens the filter from its pinned map data, mapping it when the kernel allows.
    ///
    /// # Errors
    /// [`EngineError::Map`] if the map is not an array of `u64`.
    pub(super) fn new(data: MapData) -> Result<Self, EngineError> {
        let map = Array::try_from(aya::maps::Map::Array(data))
            .map_err(|e| EngineError::map("the port filter has an unexpected layout", e))?;
        // The capacity as read when the map was opened: no second query of the kernel.
        let mem = map_words(map.map(), map.len());
        Ok(FilterWords { map, mem })
    }

    /// The map itself, for pinning it again ([`super::Engine::repin`]).
    pub(super) fn map_data(&self) -> &MapData {
        self.map.map()
    }

    /// Number of words.
    pub(super) fn len(&self) -> u32 {
        self.map.len()
    }

    /// Whether the words go through shared memory (not bpf(2)).
    pub(super) const fn mapped(&self) -> bool {
        self.mem.is_some()
    }

    /// Word `i`.
    ///
    /// # Errors
    /// [`EngineError::Map`] if it cannot be read (out of range, through bpf(2)).
    pub(super) fn get(&self, i: u32) -> Result<u64, EngineError> {
        match self.mem.as_ref().and_then(|m| m.load(i)) {
            Some(word) => Ok(word),
            None => self
                .map
                .get(&i, 0)
                .map_err(|e| EngineError::map("cannot read the port filter", e)),
        }
    }

    /// Writes word `i`.
    ///
    /// # Errors
    /// [`EngineError::Map`] if it cannot be written (out of range, through bpf(2)).
    pub(super) fn set(&mut self, i: u32, value: u64) -> Result<(), EngineError> {
        if self.mem.as_ref().is_some_and(|m| m.store(i, value)) {
            return Ok(());
        }
        self.map
            .set(i, value, 0)
            .map_err(|e| EngineError::map("cannot write the port filter", e))
    }
}
