//! The layout version of an instance's pinned maps, and what a binary does with pins of
//! another one.
//!
//! A pinned map outlives the binary that made it: after an upgrade, the new binary finds the
//! old maps and (through aya, which reuses a pin of the right name without looking at it)
//! would hand them to its classifier, which would then read old records with new offsets.
//! So every instance records its layout, [`MAP_LAYOUT_VERSION`], as a directory
//! `<bpffs>/layout/<N>` (bpffs holds directories and pins only) written by `attach`. Pins
//! without it were written before the marker existed and count as layout 1.
//!
//! [`check`] compares, before anything uses the pins:
//! * the marker with this binary's version: a newer one is refused; an older one is
//!   migrated when every map that changed since ([`CHANGES`]) holds soft state only (the flow
//!   tables: their records are dropped, and `attach` loads the new classifier over the kept
//!   entry maps), and refused when an entry map changed;
//! * every pinned map's type and key/value sizes (and fixed capacities) with what this
//!   binary's types need: a difference nothing announced (a forgotten bump) is refused too.
//!
//! A refusal is [`EngineError::Layout`], which names the command that starts over
//! (`viscum detach --all --purge`, then `viscum attach`). Nothing is ever misread.

use std::{fs, path::PathBuf};

use aya::maps::{MapError, MapInfo, MapType};
use viscum_common::{
    CONFIG_MAP, DatapathConfig, ENTRY_STATS_MAP, EntryStats, FLOWS_MAP, FRAGS_MAP, FlowKey,
    FlowState, FragKey, FragPorts, GLOBAL_COUNTERS, GLOBAL_STATS_MAP, JUMP_MAP, JUMP_SLOTS,
    MAP_LAYOUT_VERSION, MAX_RULES, PORTS_MAP, PREFIXES_MAP, PrefixData, PrefixNode, REPLIES_MAP,
    RULES_MAP, ReplyKey, ReplyState, SERVICES_MAP, SHARES_ENTRIES, SHARES_MAP, ServiceEntry,
    ServiceKey,
};

use super::{EngineError, Pins};

/// The per-CPU scratch record of the flow code (not named in `viscum-common`).
const SCRATCH_MAP: &str = "VISCUM_SCRATCH";

/// What each layout bump changed: (version, maps whose key or value layout changed from the
/// version before). Add a row whenever [`MAP_LAYOUT_VERSION`] is bumped. A migration over
/// versions whose rows name only [`SOFT_MAPS`] drops those maps' records; any other map
/// makes it a refusal.
pub const CHANGES: &[(u32, &[&str])] = &[
    // 2: the marker itself; one edge-flow record per flow (VISCUM_REPLIES' value grew to
    // carry the flow's timestamps, VISCUM_FLOWS keeps only UDP cloud decisions in a smaller
    // record, the scratch slot holds an edge record); the address half of the miss
    // pre-filter (VISCUM_PORTS grew); a counter for recovered flows (VISCUM_GLOBAL grew);
    // the flow-recovery program's slot (VISCUM_JUMP grew).
    (
        2,
        &[
            FLOWS_MAP,
            REPLIES_MAP,
            SCRATCH_MAP,
            PORTS_MAP,
            GLOBAL_STATS_MAP,
            JUMP_MAP,
        ],
    ),
    // 3: the edge-flow record carries the reply program's FIB result and the service's
    // network-share class (VISCUM_REPLIES' value and the scratch slot grew from 40 to 72 bytes).
    (3, &[REPLIES_MAP, SCRATCH_MAP]),
    // 4: the miss pre-filter is made `BPF_F_MMAPABLE` (user space maps its words instead of
    // a bpf(2) call per word); same key and value, rebuilt from the entries.
    (4, &[PORTS_MAP]),
    // 5: entries and rules hold their target only, one copy for all CPUs (VISCUM_SERVICES
    // a hash, VISCUM_RULES an array, 56-byte values); their counters moved to
    // VISCUM_ENTRY_STATS, one region per CPU, whose stride the config records (40 bytes);
    // the miss pre-filter's map grew the entries' generation and the slot bitmap.
    (
        5,
        &[
            SERVICES_MAP,
            RULES_MAP,
            PORTS_MAP,
            ENTRY_STATS_MAP,
            CONFIG_MAP,
        ],
    ),
    // 6: the classifier counts a redirect or a new flow once, in its entry's counters; the
    // global `redirected` and flow slots keep what removed entries counted (moved there by
    // user space), so an older classifier's own counts there must not be added to the
    // entries'.
    (6, &[GLOBAL_STATS_MAP]),
];

/// Maps holding soft state only, which a migration may drop: flow and fragment records the
/// datapath re-learns (a flow that loses its record is decided again by its next packet; an
/// edge TCP flow whose service still holds the connection gets its record back, see the
/// classifier's flow module), the miss pre-filter (rebuilt from the entries by the next
/// command that opens the maps), the global counters (they start again from zero;
/// `redirected` and the flow counts from the kept entries' counters), and the tail-call
/// table (`attach` fills it with the programs it loads).
pub const SOFT_MAPS: &[&str] = &[
    FLOWS_MAP,
    REPLIES_MAP,
    FRAGS_MAP,
    SCRATCH_MAP,
    PORTS_MAP,
    GLOBAL_STATS_MAP,
    JUMP_MAP,
];

/// Layout of pins that carry no marker.
pub const UNMARKED_LAYOUT: u32 = 1;

/// What a pinned map of this binary's layout looks like.
struct Expected {
    name: &'static str,
    map_type: MapType,
    key: u32,
    value: u32,
    /// Fixed capacity (`None`: chosen at attach, like the services map's `--max-entries`).
    max_entries: Option<u32>,
}

/// `size_of::<T>()` as the kernel's `u32` (map records are a few hundred bytes).
fn size<T>() -> u32 {
    u32::try_from(size_of::<T>()).unwrap_or(u32::MAX)
}

/// Every map the classifier pins, as this binary's types define it.
fn expected() -> [Expected; 13] {
    let e = |name, map_type, key, value, max_entries| Expected {
        name,
        map_type,
        key,
        value,
        max_entries,
    };
    [
        e(
            SERVICES_MAP,
            MapType::Hash,
            size::<ServiceKey>(),
            size::<ServiceEntry>(),
            None,
        ),
        e(
            ENTRY_STATS_MAP,
            MapType::Array,
            4,
            size::<EntryStats>(),
            None,
        ),
        e(
            PREFIXES_MAP,
            MapType::LpmTrie,
            4 + size::<PrefixData>(),
            size::<PrefixNode>(),
            Some(MAX_RULES),
        ),
        e(
            RULES_MAP,
            MapType::Array,
            4,
            size::<ServiceEntry>(),
            Some(MAX_RULES),
        ),
        // The filter, then the counter-slot bitmap sized with the services map.
        e(PORTS_MAP, MapType::Array, 4, 8, None),
        e(
            GLOBAL_STATS_MAP,
            MapType::PerCpuArray,
            4,
            8,
            Some(GLOBAL_COUNTERS),
        ),
        e(
            CONFIG_MAP,
            MapType::Array,
            4,
            size::<DatapathConfig>(),
            Some(1),
        ),
        e(
            FLOWS_MAP,
            MapType::LruHash,
            size::<FlowKey>(),
            size::<FlowState>(),
            None,
        ),
        e(
            REPLIES_MAP,
            MapType::LruHash,
            size::<ReplyKey>(),
            size::<ReplyState>(),
            None,
        ),
        e(
            FRAGS_MAP,
            MapType::LruHash,
            size::<FragKey>(),
            size::<FragPorts>(),
            None,
        ),
        e(
            SCRATCH_MAP,
            MapType::PerCpuArray,
            4,
            size::<ReplyState>(),
            Some(1),
        ),
        e(JUMP_MAP, MapType::ProgramArray, 4, 4, Some(JUMP_SLOTS)),
        // Added without a layout bump: pins without it get it from the next `attach` (aya
        // creates a missing pinned map), and older binaries never open it.
        e(SHARES_MAP, MapType::Hash, 4, 4, Some(SHARES_ENTRIES)),
    ]
}

/// `<dir>/layout`: holds one directory named after the layout version.
fn marker_dir(pins: &Pins) -> PathBuf {
    pins.dir.join("layout")
}

/// The layout version recorded in the pin directory; `None` without a marker.
pub fn read_marker(pins: &Pins) -> Option<u32> {
    fs::read_dir(marker_dir(pins))
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .max()
}

/// Records this binary's layout (replacing any other version). The caller holds the write
/// lock.
///
/// # Errors
/// [`EngineError::Io`] if the marker directory cannot be written.
pub fn write_marker(pins: &Pins) -> Result<(), EngineError> {
    let want = MAP_LAYOUT_VERSION.to_string();
    let path = marker_dir(pins).join(&want);
    fs::create_dir_all(&path).map_err(|e| {
        EngineError::io(format!("cannot record the layout at {}", path.display()), e)
    })?;
    for e in fs::read_dir(marker_dir(pins))
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name() != want.as_str() {
            let _ = fs::remove_dir(e.path());
        }
    }
    Ok(())
}

/// Removes the marker (`detach --purge`).
pub fn remove_marker(pins: &Pins) {
    for e in fs::read_dir(marker_dir(pins))
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = fs::remove_dir(e.path());
    }
    let _ = fs::remove_dir(marker_dir(pins));
}

/// What [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No map is pinned yet: a fresh instance.
    Fresh,
    /// The pins are of this binary's layout.
    Current,
    /// The pins are of an older layout that this binary migrates: the soft-state maps named
    /// (possibly none) are dropped by `attach`, everything else is kept as it is.
    Migrate {
        /// The version found.
        from: u32,
        /// The pinned soft-state maps to drop and re-create.
        drop: Vec<&'static str>,
    },
}

/// Compares the pins in `pins.dir` with this binary's layout (see the [module docs](self)).
///
/// # Errors
/// [`EngineError::Layout`] when the pins are of a newer layout, of an older one whose
/// entry maps changed, or differ from what their marker promises.
pub fn check(pins: &Pins) -> Result<Verdict, EngineError> {
    check_with(pins, |name| info_from_pin(pins, name))
}

/// What [`check_with`] is told about one map of the layout.
pub(super) enum Pinned {
    /// There is no pin of this name.
    Absent,
    /// The pin exists but cannot be opened or read.
    Unreadable,
    /// What the kernel says about the pinned map.
    Info(MapInfo),
}

impl From<Result<MapInfo, MapError>> for Pinned {
    fn from(r: Result<MapInfo, MapError>) -> Self {
        r.map_or(Pinned::Unreadable, Pinned::Info)
    }
}

/// What the kernel says about the map pinned as `name`, opening its pin.
pub(super) fn info_from_pin(pins: &Pins, name: &str) -> Pinned {
    match MapInfo::from_pin(pins.map(name)) {
        Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            Pinned::Absent
        }
        other => other.into(),
    }
}

/// [`check`], with each map's information from `info_of`, so that a caller that has the
/// maps open already (`Engine::open`) need not open their pins again.
///
/// # Errors
/// As [`check`].
pub(super) fn check_with(
    pins: &Pins,
    mut info_of: impl FnMut(&'static str) -> Pinned,
) -> Result<Verdict, EngineError> {
    let found = read_marker(pins);
    let mut pinned = 0;
    let mut differ = Vec::new();
    for e in expected() {
        let info = match info_of(e.name) {
            Pinned::Absent => continue,
            Pinned::Unreadable => {
                pinned += 1;
                differ.push((e.name, format!("{} cannot be read", e.name)));
                continue;
            }
            Pinned::Info(info) => info,
        };
        pinned += 1;
        let mut what = Vec::new();
        match info.map_type() {
            Ok(t) if t == e.map_type => {}
            Ok(t) => what.push(format!("type {t:?} (expected {:?})", e.map_type)),
            Err(_) => what.push("an unknown type".to_owned()),
        }
        if info.key_size() != e.key {
            what.push(format!(
                "key {} bytes (expected {})",
                info.key_size(),
                e.key
            ));
        }
        if info.value_size() != e.value {
            what.push(format!(
                "value {} bytes (expected {})",
                info.value_size(),
                e.value
            ));
        }
        if let Some(n) = e.max_entries
            && info.max_entries() != n
        {
            what.push(format!("{} entries (expected {n})", info.max_entries()));
        }
        if !what.is_empty() {
            differ.push((e.name, format!("{} {}", e.name, what.join(", "))));
        }
    }
    if pinned == 0 && found.is_none() {
        return Ok(Verdict::Fresh);
    }
    let found = found.unwrap_or(UNMARKED_LAYOUT);
    let refuse = |writer: &'static str, differ: &[(&str, String)]| EngineError::Layout {
        dir: pins.dir.clone(),
        found,
        want: MAP_LAYOUT_VERSION,
        writer,
        detail: if differ.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                differ
                    .iter()
                    .map(|(_, d)| d.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        },
    };
    if found > MAP_LAYOUT_VERSION {
        return Err(refuse("a newer viscum", &differ));
    }
    if found == MAP_LAYOUT_VERSION {
        return if differ.is_empty() {
            Ok(Verdict::Current)
        } else {
            Err(refuse("another build of viscum", &differ))
        };
    }
    // Older: what changed since, by the table, and by what the kernel says.
    let mut changed: Vec<&str> = CHANGES
        .iter()
        .filter(|(v, _)| *v > found && *v <= MAP_LAYOUT_VERSION)
        .flat_map(|(_, maps)| maps.iter().copied())
        .collect();
    changed.extend(differ.iter().map(|(name, _)| *name));
    if changed.iter().any(|m| !SOFT_MAPS.contains(m)) {
        return Err(refuse("an older viscum", &differ));
    }
    let drop = SOFT_MAPS
        .iter()
        .copied()
        .filter(|m| changed.contains(m) && pins.map(m).exists())
        .collect();
    Ok(Verdict::Migrate { from: found, drop })
}

/// For everything but `attach`: `Ok` when the pins can be used as they are, after recording
/// the layout when an older one differs in nothing (a marker-only migration).
///
/// # Errors
/// [`EngineError::NeedsMigration`] when soft-state maps must be re-created (`attach` does
/// that); as [`check`] and [`super::lock()`] otherwise.
pub fn ensure_usable(pins: &Pins) -> Result<(), EngineError> {
    usable(pins, check(pins)?)
}

/// What [`ensure_usable`] does with a verdict of [`check`] or [`check_with`].
pub(super) fn usable(pins: &Pins, verdict: Verdict) -> Result<(), EngineError> {
    match verdict {
        Verdict::Fresh | Verdict::Current => Ok(()),
        Verdict::Migrate { drop, .. } if drop.is_empty() => {
            let _lock = super::lock(pins)?;
            write_marker(pins)
        }
        Verdict::Migrate { from, drop } => Err(EngineError::NeedsMigration {
            dir: pins.dir.clone(),
            from,
            want: MAP_LAYOUT_VERSION,
            maps: drop.join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pin directory on the ordinary file system holding only a layout marker: what the
    /// check reads besides the maps, which [`check_with`] is told about instead.
    fn marked_dir(version: u32) -> (PathBuf, Pins) {
        let dir =
            std::env::temp_dir().join(format!("viscum-layout-{}-{version}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("layout").join(version.to_string())).unwrap();
        let pins = Pins::new(&dir);
        (dir, pins)
    }

    #[test]
    fn check_with_skips_absent_maps_and_refuses_an_unreadable_one_by_name() {
        let (dir, pins) = marked_dir(MAP_LAYOUT_VERSION);
        // Nothing pinned but the marker: the current layout, nothing to refuse.
        assert_eq!(
            check_with(&pins, |_| Pinned::Absent).unwrap(),
            Verdict::Current
        );
        // A map whose pin cannot be opened or read is named, as from a pin.
        let e = check_with(&pins, |name| {
            if name == SERVICES_MAP {
                Pinned::Unreadable
            } else {
                Pinned::Absent
            }
        })
        .unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, EngineError::Layout { .. })
                && text.contains("VISCUM_SERVICES cannot be read"),
            "{text}"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn check_with_refuses_a_newer_marker_and_finds_fresh_pins() {
        let (dir, pins) = marked_dir(MAP_LAYOUT_VERSION + 1);
        let e = check_with(&pins, |_| Pinned::Absent).unwrap_err();
        assert!(e.to_string().contains("a newer viscum"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
        // No marker and no map: a fresh instance.
        assert_eq!(
            check_with(&pins, |_| Pinned::Absent).unwrap(),
            Verdict::Fresh
        );
    }
}
