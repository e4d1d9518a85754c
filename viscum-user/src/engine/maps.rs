//! Reading and editing the pinned maps of a running datapath.

use aya::maps::{
    Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray,
    lpm_trie::Key as LpmKey,
};
use viscum_common::{
    CONFIG_MAP, CounterInfo, DatapathConfig, ENTRIES_GEN_WORD, ENTRY_STATS_MAP, EntryStats,
    FLOWS_MAP, FlowCacheSlot, GLOBAL_COUNTER_INFO, GLOBAL_STATS_MAP, GlobalCounter, INGRESS_EXITS,
    LATE_REDIRECTS_SLOT, MAX_RULES, PORT_FILTER_BITMAP_WORDS, PORT_FILTER_BUILT, PORT_FILTER_WORDS,
    PORTS_MAP, PREFIXES_MAP, PortFilter, PortRule, PrefixData, PrefixNode, REPLIES_MAP,
    REPLY_F_DROP, RULES_MAP, RULES_PER_PREFIX, ReplyKey, ReplyState, SERVICES_MAP, STATS_HINT_WORD,
    STATS_IDS_BASE, ServiceEntry, ServiceKey, addr_filter_slot, entry_stats_id, port_filter_slot,
    stats_stride,
};

use super::{EngineError, Pins, layout::Pinned};
use crate::endpoint::Endpoint;

/// 64-bit words of one [`EntryStats`] in the counters array's mapped memory (its fields in
/// order; the kernel lays array values out back to back, each rounded up to 8 bytes).
const STATS_WORDS: u32 = (size_of::<EntryStats>() / 8) as u32;
const _: () = assert!(size_of::<EntryStats>().is_multiple_of(8));

/// Reads one counter of an entry's [`EntryStats`].
type EntryField = fn(&EntryStats) -> u64;

/// The global counters the classifier counts only per entry, with the entry counter each
/// sums: a global value is its slot (what reset entry slots counted, see
/// [`Engine::retire`]) plus the live entries' and rules' counters.
const RETIRED: [(GlobalCounter, EntryField); 3] = [
    (GlobalCounter::Redirected, |s| s.packets),
    (GlobalCounter::FlowsEdge, |s| s.new_flows),
    (GlobalCounter::FlowsCloud, |s| s.cloud_flows),
];

/// `BPF_EXIST`: update only an existing element.
const BPF_EXIST: u64 = 2;
/// `BPF_NOEXIST`: fail instead of overwriting, so a duplicate add is caught
/// by the kernel atomically rather than by a racy check.
const BPF_NOEXIST: u64 = 1;

/// Handles to the pinned maps of one Viscum instance.
pub struct Engine {
    pins: Pins,
    services: HashMap<MapData, ServiceKey, ServiceEntry>,
    global: PerCpuArray<MapData, u64>,
    config: Array<MapData, DatapathConfig>,
    /// The edge flows (`VISCUM_REPLIES`: one record per flow served at the edge).
    edge: HashMap<MapData, ReplyKey, ReplyState>,
    prefixes: LpmTrie<MapData, PrefixData, PrefixNode>,
    rules: Array<MapData, ServiceEntry>,
    /// Every entry's and rule's counters, one region per CPU ([`ENTRY_STATS_MAP`]).
    stats: Array<MapData, EntryStats>,
    /// The miss pre-filter (`None` under pins made by a version without one).
    ports: Option<super::filter_words::FilterWords>,
    /// Regions of the counters array, one per possible CPU id (see [`super::cpus`]).
    cpu_regions: u32,
    /// The classifier's flow cache, opened at the first read of the counters and kept while
    /// the same program is pinned (see [`super::flow_cache`]).
    flow_cache: std::sync::Mutex<Option<super::flow_cache::Handle>>,
    /// The UDP flow table (`VISCUM_FLOWS`), which no method reads: held only so that
    /// [`Engine::repin`] can pin it again with the maps above (`None` under pins without it).
    flows: Option<MapData>,
    /// The pin directory, kept open for this engine's write locks (`None` if it could not
    /// be opened; each lock then opens it).
    _dir: Option<super::lock::DirHandle>,
}

/// One redirect entry with its counters summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryView {
    /// The match, rebuilt from the map key (exact) or the prefix rule.
    pub endpoint: Endpoint,
    /// The target as written.
    pub target: ServiceEntry,
    /// Ifindex of the target's host-side veth, in the classifier's namespace.
    pub ifindex: u32,
    /// The entry's `TARGET_F_*` bits ([`viscum_common::TARGET_F_NAT`], ...).
    pub flags: u32,
    /// Packets redirected, summed over CPUs.
    pub packets: u64,
    /// Bytes redirected (L2 length at ingress), summed over CPUs.
    pub bytes: u64,
    /// Flows that started at the edge, summed over CPUs.
    pub new_flows: u64,
    /// New flows that matched but went to the cloud (learning or draining),
    /// summed over CPUs.
    pub cloud_flows: u64,
}

/// Generates [`GlobalStats`] from the counter registry ([`viscum_common::global_counters!`]).
macro_rules! global_stats_view {
    ($($variant:ident = $slot:literal, $name:ident, $column:literal, $row:ident, $family:ident,
       $label:literal, $help:literal;)*) => {
        /// The global counters summed over CPUs: one field per registry row, named and ordered
        /// as the registry says (so serialised keys are the registry's names).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[serde(default)]
        pub struct GlobalStats {
            $(#[doc = $help] pub $name: u64,)*
        }

        impl GlobalStats {
            /// The value of one counter.
            pub fn get(&self, counter: GlobalCounter) -> u64 {
                match counter {
                    $(GlobalCounter::$variant => self.$name,)*
                }
            }

            /// The field holding one counter.
            pub fn get_mut(&mut self, counter: GlobalCounter) -> &mut u64 {
                match counter {
                    $(GlobalCounter::$variant => &mut self.$name,)*
                }
            }
        }
    };
}
viscum_common::global_counters!(global_stats_view);

impl GlobalStats {
    /// Every counter with its registry row, in display order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static CounterInfo, u64)> + '_ {
        GLOBAL_COUNTER_INFO
            .iter()
            .map(move |info| (info, self.get(info.counter)))
    }
}

/// The maps an engine uses, each opened once from its pin: the typed handles are made from
/// these very handles, and [`Engine::repin`] pins them again. `None`: no such pin.
struct Opened {
    services: Option<Result<MapData, MapError>>,
    prefixes: Option<Result<MapData, MapError>>,
    rules: Option<Result<MapData, MapError>>,
    stats: Option<Result<MapData, MapError>>,
    config: Option<Result<MapData, MapError>>,
    ports: Option<Result<MapData, MapError>>,
    global: Option<Result<MapData, MapError>>,
    edge: Option<Result<MapData, MapError>>,
    flows: Option<Result<MapData, MapError>>,
}

impl Opened {
    fn open(pins: &Pins) -> Opened {
        // One BPF_OBJ_GET each; a missing pin is ENOENT, not a stat first.
        let open = |name: &str| match MapData::from_pin(pins.map(name)) {
            Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
                None
            }
            other => Some(other),
        };
        Opened {
            services: open(SERVICES_MAP),
            prefixes: open(PREFIXES_MAP),
            rules: open(RULES_MAP),
            stats: open(ENTRY_STATS_MAP),
            config: open(CONFIG_MAP),
            ports: open(PORTS_MAP),
            global: open(GLOBAL_STATS_MAP),
            edge: open(REPLIES_MAP),
            flows: open(FLOWS_MAP),
        }
    }

    /// The open handle of `name`, if it is one of these maps (outer `None`: it is not).
    fn get(&self, name: &str) -> Option<Option<&Result<MapData, MapError>>> {
        let slot = match name {
            SERVICES_MAP => &self.services,
            PREFIXES_MAP => &self.prefixes,
            RULES_MAP => &self.rules,
            ENTRY_STATS_MAP => &self.stats,
            CONFIG_MAP => &self.config,
            PORTS_MAP => &self.ports,
            GLOBAL_STATS_MAP => &self.global,
            REPLIES_MAP => &self.edge,
            FLOWS_MAP => &self.flows,
            _ => return None,
        };
        Some(slot.as_ref())
    }

    /// The layout check's view of `name`: from the open handle when it is one of these
    /// maps (a `BPF_OBJ_GET_INFO_BY_FD`, no second open), else from its pin.
    fn info(&self, pins: &Pins, name: &str) -> Pinned {
        match self.get(name) {
            Some(None) => Pinned::Absent,
            Some(Some(Ok(data))) => data.info().into(),
            // The open failed: the check reports the map as unreadable, as for a pin.
            Some(Some(Err(_))) => Pinned::Unreadable,
            None => super::layout::info_from_pin(pins, name),
        }
    }
}

/// A map the engine cannot do without, from [`Opened`]: a missing pin means nothing is
/// attached there; one that cannot be opened is an error naming it.
fn required(
    pins: &Pins,
    name: &str,
    slot: Option<Result<MapData, MapError>>,
) -> Result<MapData, EngineError> {
    match slot {
        None => Err(EngineError::NotAttached(pins.dir.clone())),
        Some(r) => {
            r.map_err(|e| EngineError::map(format!("cannot open {}", pins.map(name).display()), e))
        }
    }
}

/// [`required`] as the typed handle `T`; `what` names the map in a layout error.
fn typed<T: TryFrom<Map, Error = MapError>>(
    pins: &Pins,
    name: &str,
    slot: Option<Result<MapData, MapError>>,
    what: &str,
) -> Result<T, EngineError> {
    let map = Map::from_map_data(required(pins, name, slot)?)
        .map_err(|e| EngineError::map(format!("cannot open {}", pins.map(name).display()), e))?;
    T::try_from(map).map_err(|e| EngineError::map(format!("{what} has an unexpected layout"), e))
}

impl Engine {
    /// Opens the maps pinned under `pins.dir`; fails with
    /// [`EngineError::NotAttached`] when nothing was ever attached there.
    ///
    /// Each map is opened once: the layout check reads what the kernel says about the very
    /// handles the engine then keeps (and [`Engine::repin`] pins again). A fresh process's
    /// `redirect add` opens the maps for nothing else, so every second open was on its
    /// critical path (B7).
    ///
    /// # Errors
    /// [`EngineError::NotAttached`] as above, or when a map pin is missing;
    /// [`EngineError::Layout`] / [`EngineError::NeedsMigration`] for pins of another map
    /// layout (see [`super::layout`]); [`EngineError::Map`] if a pinned map cannot be opened
    /// or has an unexpected layout; [`EngineError::Io`] if the CPU count is unknown.
    pub fn open(pins: &Pins) -> Result<Self, EngineError> {
        if !pins.dir.exists() || !pins.program().exists() {
            return Err(EngineError::NotAttached(pins.dir.clone()));
        }
        let opened = Opened::open(pins);
        let verdict = super::layout::check_with(pins, |name| opened.info(pins, name))?;
        super::layout::usable(pins, verdict)?;
        let Opened {
            services,
            prefixes,
            rules,
            stats,
            config,
            ports,
            global,
            edge,
            flows,
        } = opened;
        let services = typed(pins, SERVICES_MAP, services, "the services map")?;
        let global = typed(pins, GLOBAL_STATS_MAP, global, "the counters map")?;
        let config = typed(pins, CONFIG_MAP, config, "the config map")?;
        let edge = typed(pins, REPLIES_MAP, edge, "the edge flow table")?;
        let prefixes = typed(pins, PREFIXES_MAP, prefixes, "the prefix table")?;
        let rules = typed(pins, RULES_MAP, rules, "the rules array")?;
        let stats: Array<MapData, EntryStats> =
            typed(pins, ENTRY_STATS_MAP, stats, "the entry counters array")?;
        let ports = match ports {
            None => None,
            Some(r) => Some(super::filter_words::FilterWords::new(required(
                pins,
                PORTS_MAP,
                Some(r),
            )?)?),
        };
        let flows = match flows {
            None => None,
            Some(r) => Some(required(pins, FLOWS_MAP, Some(r))?),
        };
        let cpu_regions = super::cpus::cpu_regions()?;
        let mut engine = Engine {
            pins: pins.clone(),
            services,
            global,
            config,
            edge,
            prefixes,
            rules,
            stats,
            ports,
            cpu_regions,
            flow_cache: std::sync::Mutex::new(None),
            flows,
            _dir: super::lock::keep_open(pins),
        };
        engine.ensure_port_filter()?;
        Ok(engine)
    }

    /// Builds the miss pre-filter from the maps if nobody has yet (a fresh attach, or maps
    /// that an older version filled). Until then the all-zero filter lets every packet
    /// through to the lookups, so nothing is ever missed.
    fn ensure_port_filter(&mut self) -> Result<(), EngineError> {
        let built = |e: &Self| {
            e.ports
                .as_ref()
                .and_then(|m| m.get(PORT_FILTER_BITMAP_WORDS).ok())
                == Some(PORT_FILTER_BUILT)
        };
        if self.ports.is_none() || built(self) {
            return Ok(());
        }
        let _lock = self.write_lock()?;
        if !built(self) {
            // The counter slots first: the filter's marker, written last, says both are built.
            self.rebuild_stats_slots()?;
            self.rebuild_port_filter(&[(0, PORT_FILTER_WORDS - 1)])?;
        }
        Ok(())
    }

    /// Marks in the slot bitmap ([`STATS_IDS_BASE`]) the counter slot of every exact entry
    /// and clears the rest. The caller holds [`Self::write_lock`]. O(entries): run when the
    /// filter map is new, i.e. right after `attach` (when there are none, or after pins were
    /// made again over kept entries).
    fn rebuild_stats_slots(&mut self) -> Result<(), EngineError> {
        let mut words = vec![0u64; self.stats_slot_words() as usize];
        for item in &self.services {
            let (_, entry) =
                item.map_err(|e| EngineError::map("cannot read the services map", e))?;
            if let Some(slot) = entry.stats_id.checked_sub(MAX_RULES)
                && let Some(w) = words.get_mut(slot as usize / 64)
            {
                *w |= 1 << (slot % 64);
            }
        }
        let Some(ports) = self.ports.as_mut() else {
            return Ok(());
        };
        for (i, want) in (STATS_IDS_BASE..).zip(words) {
            if ports.get(i)? != want {
                ports.set(i, want)?;
            }
        }
        ports.set(STATS_HINT_WORD, 0)
    }

    /// Words of the slot bitmap: enough for every slot of the counters array past the rules'.
    fn stats_slot_words(&self) -> u32 {
        let slots = self.stats_stride().saturating_sub(MAX_RULES);
        let words = slots.div_ceil(64);
        let room = self
            .ports
            .as_ref()
            .map_or(0, |p| p.len().saturating_sub(STATS_IDS_BASE));
        words.min(room)
    }

    /// The [`ServiceEntry::stats_epoch`] of an entry given a counter slot now: the entries'
    /// generation after the change that adds it (never 0, the epoch of entries written
    /// before there were epochs). Every change moves the generation, so an entry that
    /// takes over a removed one's slot has another epoch. The caller holds
    /// [`Self::write_lock`].
    fn next_stats_epoch(&self) -> Result<u32, EngineError> {
        let generation = self.entries_generation()?.unwrap_or(0);
        Ok((generation.wrapping_add(1) as u32).max(1))
    }

    /// The entries' generation ([`ENTRIES_GEN_WORD`]; `None` under pins whose filter map
    /// has no such word).
    fn entries_generation(&self) -> Result<Option<u64>, EngineError> {
        match self.ports.as_ref() {
            Some(ports) if ENTRIES_GEN_WORD < ports.len() => Ok(Some(ports.get(ENTRIES_GEN_WORD)?)),
            _ => Ok(None),
        }
    }

    /// Claims a free counter slot for a new exact entry and zeroes its counters (a slot
    /// freed by a removed entry keeps what that entry counted last). The caller holds
    /// [`Self::write_lock`]. Returns the entry's `stats_id`.
    ///
    /// # Errors
    /// [`EngineError::Full`] when every slot is taken (as many as the services map has room
    /// for); [`EngineError::Map`] if the bitmap or the counters cannot be written.
    fn claim_stats_slot(&mut self) -> Result<u32, EngineError> {
        let slots = self.stats_stride().saturating_sub(MAX_RULES);
        let words = self.stats_slot_words();
        let Some(ports) = self.ports.as_mut() else {
            return Err(EngineError::Full(0));
        };
        // From the hint on (every word before it is full), then once around from the start
        // in case a hint was lost: a claim scans a word or two, not the whole bitmap.
        let hint = ports.get(STATS_HINT_WORD)?;
        let hint = u32::try_from(hint).ok().filter(|&h| h < words).unwrap_or(0);
        for w in (hint..words).chain(0..hint) {
            let cur = ports.get(STATS_IDS_BASE + w)?;
            if cur == u64::MAX {
                continue;
            }
            let bit = (!cur).trailing_zeros();
            let slot = w * 64 + bit;
            if slot >= slots {
                continue;
            }
            ports.set(STATS_IDS_BASE + w, cur | 1 << bit)?;
            if w != hint {
                ports.set(STATS_HINT_WORD, u64::from(w))?;
            }
            let id = entry_stats_id(slot);
            self.zero_stats(id)?;
            return Ok(id);
        }
        Err(EngineError::Full(slots))
    }

    /// Gives back the counter slot of a removed exact entry (rules' slots are their rule
    /// ids, never in the bitmap). The caller holds [`Self::write_lock`].
    fn release_stats_slot(&mut self, id: u32) -> Result<(), EngineError> {
        let Some(slot) = id.checked_sub(MAX_RULES) else {
            return Ok(());
        };
        let Some(ports) = self.ports.as_mut() else {
            return Ok(());
        };
        let i = STATS_IDS_BASE + slot / 64;
        if i >= ports.len() {
            return Ok(());
        }
        let cur = ports.get(i)?;
        let bit = 1u64 << (slot % 64);
        if cur & bit != 0 {
            ports.set(i, cur & !bit)?;
        }
        // Out of the live slots `global_stats` sums: what it counted moves to the global
        // slots now, and a packet counted in it later (delivered by a flow-cache slot filled
        // before the entries' generation moved) when the slot is claimed again.
        self.zero_stats(id)?;
        let Some(ports) = self.ports.as_mut() else {
            return Ok(());
        };
        // The freed word may now be the first with room.
        if u64::from(slot / 64) < ports.get(STATS_HINT_WORD)? {
            ports.set(STATS_HINT_WORD, u64::from(slot / 64))?;
        }
        Ok(())
    }

    /// Moves the entries' generation ([`ENTRIES_GEN_WORD`]) after a change to an entry, a
    /// rule or the flows they own: the flow cache's slots filled before it are no longer
    /// used. The caller holds [`Self::write_lock`] and has made the change.
    fn entries_changed(&mut self) -> Result<(), EngineError> {
        let Some(ports) = self.ports.as_mut() else {
            return Ok(());
        };
        if ENTRIES_GEN_WORD >= ports.len() {
            return Ok(());
        }
        let cur = ports.get(ENTRIES_GEN_WORD)?;
        ports.set(ENTRIES_GEN_WORD, cur.wrapping_add(1))
    }

    /// Slots per CPU region of [`ENTRY_STATS_MAP`] (`attach` sized it for every possible
    /// CPU, and wrote the same stride into the datapath config).
    fn stats_stride(&self) -> u32 {
        stats_stride(self.stats.len(), self.cpu_regions)
    }

    /// The indexes of slot `id` in every CPU's region.
    fn stats_indexes(&self, id: u32) -> impl Iterator<Item = u32> + use<> {
        let stride = self.stats_stride();
        (0..self.cpu_regions).map(move |cpu| cpu * stride + id)
    }

    /// Every CPU's counters of slot `id` set to zero, what they counted first moved to the
    /// global slots (see [`Self::retire`]). The caller holds [`Self::write_lock`].
    fn zero_stats(&mut self, id: u32) -> Result<(), EngineError> {
        let counted = self.stats_sum(id)?;
        self.retire(&counted)?;
        for i in self.stats_indexes(id) {
            self.stats
                .set(i, EntryStats::default(), 0)
                .map_err(|e| EngineError::map("cannot reset the entry counters", e))?;
        }
        Ok(())
    }

    /// Adds `counted` (a slot's counters about to be reset) to the global slots they are
    /// sums into, CPU 0's value of each ([`RETIRED`]): a removed entry's counts, or late
    /// packets of one removed before its slot was reused. The classifier counts redirects
    /// and new flows only in the entries' counters (and its flow cache's slots, then the late
    /// slot, see [`Self::global_stats`]), and [`Self::global_stats`] sums the live ones with
    /// these. It never writes these slots, so a read-modify-write under
    /// [`Self::write_lock`] is exact.
    fn retire(&mut self, counted: &EntryStats) -> Result<(), EngineError> {
        for (counter, n) in RETIRED.map(|(c, field)| (c, field(counted))) {
            if n == 0 {
                continue;
            }
            let slot = counter as u32;
            let cur = self
                .global
                .get(&slot, 0)
                .map_err(|e| EngineError::map("cannot read the global counters", e))?;
            let mut values: Vec<u64> = cur.iter().copied().collect();
            if let Some(first) = values.first_mut() {
                *first = first.wrapping_add(n);
            }
            let values = aya::maps::PerCpuValues::try_from(values).map_err(|e| {
                EngineError::map("cannot write the global counters", MapError::IoError(e))
            })?;
            self.global
                .set(slot, values, 0)
                .map_err(|e| EngineError::map("cannot write the global counters", e))?;
        }
        Ok(())
    }

    /// The rule id of every prefix rule (its slot in `VISCUM_RULES` and its counter slot).
    fn rule_ids(&self) -> Result<Vec<u32>, EngineError> {
        Ok(self
            .nodes()?
            .iter()
            .flat_map(|(_, _, n)| n.rules[..n.count as usize].iter().map(|r| r.rule_id))
            .collect())
    }

    /// The counter slots in use: every prefix rule's (its rule id) and every exact entry's
    /// (a set bit of the slot bitmap, see [`STATS_IDS_BASE`]).
    fn live_stats_ids(&self) -> Result<Vec<u32>, EngineError> {
        let mut ids = self.rule_ids()?;
        if let Some(ports) = self.ports.as_ref() {
            for w in 0..self.stats_slot_words() {
                let mut word = ports.get(STATS_IDS_BASE + w)?;
                while word != 0 {
                    let bit = word.trailing_zeros();
                    word &= word - 1;
                    ids.push(entry_stats_id(w * 64 + bit));
                }
            }
        }
        Ok(ids)
    }

    /// The counters of slot `id`, summed over CPUs.
    fn stats_sum(&self, id: u32) -> Result<EntryStats, EngineError> {
        Ok(self.stats_sums(&[id])?.remove(&id).unwrap_or_default())
    }

    /// The counters of each slot of `ids`, summed over CPUs, by slot.
    ///
    /// Read from the array's memory (`BPF_F_MMAPABLE`) one window at a time, in ascending
    /// order so that each window is mapped once
    /// ([`super::filter_words::WindowReader`]): never the whole array, whose region per CPU
    /// would otherwise stay in the daemon's resident memory (0.6 MiB per CPU). Through bpf(2),
    /// a call per slot and CPU, where it cannot be mapped.
    fn stats_sums(
        &self,
        ids: &[u32],
    ) -> Result<std::collections::HashMap<u32, EntryStats>, EngineError> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut sums: std::collections::HashMap<u32, EntryStats> =
            ids.iter().map(|&id| (id, EntryStats::default())).collect();
        let mut mem = super::filter_words::WindowReader::new(
            self.stats.map(),
            self.stats.len().saturating_mul(STATS_WORDS),
        );
        let stride = self.stats_stride();
        for cpu in 0..self.cpu_regions {
            for &id in &ids {
                let i = cpu * stride + id;
                let base = i * STATS_WORDS;
                let mapped = match mem.load(base) {
                    None => None,
                    Some(packets) => (|| {
                        Some(EntryStats {
                            packets,
                            bytes: mem.load(base + 1)?,
                            new_flows: mem.load(base + 2)?,
                            cloud_flows: mem.load(base + 3)?,
                        })
                    })(),
                };
                let v = match mapped {
                    Some(v) => v,
                    None => self
                        .stats
                        .get(&i, 0)
                        .map_err(|e| EngineError::map("cannot read the entry counters", e))?,
                };
                let sum = sums.entry(id).or_default();
                sum.packets += v.packets;
                sum.bytes += v.bytes;
                sum.new_flows += v.new_flows;
                sum.cloud_flows += v.cloud_flows;
            }
        }
        Ok(sums)
    }

    /// Whether this engine writes the miss pre-filter through a shared mapping of its memory
    /// (a map made `BPF_F_MMAPABLE`, layout 4 on) rather than a bpf(2) call per word; false
    /// for a filter pinned without the flag, or none at all.
    pub fn filter_mapped(&self) -> bool {
        self.ports
            .as_ref()
            .is_some_and(super::filter_words::FilterWords::mapped)
    }

    /// The instance's write lock ([`super::lock()`]), taken by every method that changes the
    /// maps, for its whole read-modify-write: the rule id choice, the miss pre-filter's
    /// maintenance (a rebuild that read the maps just before another process added an entry
    /// would otherwise mark that entry's port unmanaged). Re-entrant within the process, so
    /// callers holding it around several steps ([`crate::redirect::add_with`], a daemon
    /// reload) pay only a lookup here.
    fn write_lock(&self) -> Result<super::WriteLock, EngineError> {
        super::lock(&self.pins)
    }

    /// Recomputes the filter from every key of the services map and every prefix rule, and
    /// writes those of the words in the ranges `(first, last)` (inclusive) that changed,
    /// then the "built" marker. The caller holds [`Self::write_lock`]. Costs one read per
    /// services-map key (O(entries)) plus one per word in the ranges; a removal passes only
    /// its own words (the only ones it can make unmanaged; an insert clears its own bits
    /// itself). Words past the end of a map pinned by an older version (no address
    /// bitmap) are skipped.
    fn rebuild_port_filter(&mut self, ranges: &[(u32, u32)]) -> Result<(), EngineError> {
        if self.ports.is_none() {
            return Ok(());
        }
        let mut filter = PortFilter::new();
        for key in self.services.keys() {
            let key = key.map_err(|e| EngineError::map("cannot read the services map", e))?;
            filter.manage_key(&key);
        }
        for (_, data, node) in self.nodes()? {
            for rule in &node.rules[..node.count as usize] {
                filter.manage(data.proto, rule.port_lo, rule.port_hi);
            }
        }
        let Some(ports) = self.ports.as_mut() else {
            return Ok(());
        };
        let len = ports.len();
        for i in ranges
            .iter()
            .flat_map(|&(first, last)| first..=last.min(len.saturating_sub(1)))
        {
            let Some(want) = filter.word(i) else { continue };
            if ports.get(i)? != want {
                ports.set(i, want)?;
            }
        }
        ports.set(PORT_FILTER_BITMAP_WORDS, PORT_FILTER_BUILT)
    }

    /// Marks `proto` ports `lo..=hi` (host order) as managed in the filter, before an entry
    /// or rule for them becomes visible to the classifier. The caller holds
    /// [`Self::write_lock`].
    fn manage_ports(&mut self, proto: u8, lo: u16, hi: u16) -> Result<(), EngineError> {
        let Some(ports) = self.ports.as_mut() else {
            return Ok(());
        };
        let (first, _) = port_filter_slot(proto, lo);
        let (last, _) = port_filter_slot(proto, hi);
        let mut want = PortFilter::new();
        want.manage(proto, lo, hi);
        for i in first..=last {
            let cur = ports.get(i)?;
            let new = cur & want.words[i as usize];
            if new != cur {
                ports.set(i, new)?;
            }
        }
        Ok(())
    }

    /// Marks destination address `addr` as managed in the address bitmap, before an entry
    /// for it becomes visible to the classifier. The caller holds [`Self::write_lock`].
    /// A filter pinned by an older version (no address bitmap) is left alone.
    fn manage_address(&mut self, addr: &[u8; 16]) -> Result<(), EngineError> {
        let Some(ports) = self.ports.as_mut() else {
            return Ok(());
        };
        let (i, bit) = addr_filter_slot(addr);
        if i >= ports.len() {
            return Ok(());
        }
        let cur = ports.get(i)?;
        if cur & bit != 0 {
            ports.set(i, cur & !bit)?;
        }
        Ok(())
    }

    /// Pins the maps this engine holds open again under its pin directory, where their pins
    /// are gone (the bpffs was unmounted, or the directory removed, behind its back), and
    /// records the layout: an `attach` then loads the classifier over these very maps, so
    /// the entries, flows and counters survive and this engine (a running daemon's) keeps
    /// writing to the maps the datapath reads. Without it `attach` would create fresh, empty
    /// maps, and the daemon would go on editing ones no program uses. Returns how many were
    /// pinned. The caller holds the write lock and has mounted the bpffs.
    ///
    /// # Errors
    /// [`EngineError::Io`] if the directory cannot be made or a map cannot be pinned.
    pub fn repin(&self) -> Result<usize, EngineError> {
        std::fs::create_dir_all(&self.pins.dir).map_err(|e| {
            EngineError::io(format!("cannot create {}", self.pins.dir.display()), e)
        })?;
        let mut pinned = 0;
        for (name, data) in self.held() {
            let path = self.pins.map(name);
            if path.exists() {
                continue;
            }
            data.pin(&path).map_err(|e| {
                EngineError::io(
                    format!("cannot pin {name} again at {}", path.display()),
                    std::io::Error::other(e),
                )
            })?;
            pinned += 1;
        }
        if pinned > 0 {
            super::layout::write_marker(&self.pins)?;
        }
        Ok(pinned)
    }

    /// The maps whose contents outlive a program (entries, rules, filter, counters, flows),
    /// by pin name: what [`Engine::repin`] pins again.
    fn held(&self) -> impl Iterator<Item = (&'static str, &MapData)> {
        [
            (SERVICES_MAP, Some(self.services.map())),
            (PREFIXES_MAP, Some(self.prefixes.map())),
            (RULES_MAP, Some(self.rules.map())),
            (ENTRY_STATS_MAP, Some(self.stats.map())),
            (CONFIG_MAP, Some(self.config.map())),
            (
                PORTS_MAP,
                self.ports
                    .as_ref()
                    .map(super::filter_words::FilterWords::map_data),
            ),
            (GLOBAL_STATS_MAP, Some(self.global.map())),
            (REPLIES_MAP, Some(self.edge.map())),
            (FLOWS_MAP, self.flows.as_ref()),
        ]
        .into_iter()
        .filter_map(|(name, data)| Some((name, data?)))
    }

    /// The pin paths this engine was opened from.
    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// A prefix rule's target.
    fn rule(&self, id: u32) -> Result<ServiceEntry, EngineError> {
        self.rules
            .get(&id, 0)
            .map_err(|e| EngineError::map("cannot read the rules array", e))
    }

    /// Every entry, sorted by its match for stable output.
    ///
    /// # Errors
    /// [`EngineError::Map`] if a map cannot be read.
    pub fn entries(&self) -> Result<Vec<EntryView>, EngineError> {
        let pending = self.pending()?;
        let mut found = Vec::new();
        for item in &self.services {
            let (key, target) =
                item.map_err(|e| EngineError::map("cannot read the services map", e))?;
            let Some(endpoint) = Endpoint::from_key(&key) else {
                log::warn!("skipping an undecodable key in the services map: {key:?}");
                continue;
            };
            found.push((endpoint, target));
        }
        for (len, data, node) in self.nodes()? {
            for rule in &node.rules[..node.count as usize] {
                let Some(endpoint) = Endpoint::from_rule(len, &data, rule) else {
                    continue;
                };
                found.push((endpoint, self.rule(rule.rule_id)?));
            }
        }
        // Every counter in one pass over the array.
        let ids: Vec<u32> = found.iter().map(|(_, t)| t.stats_id).collect();
        let sums = self.stats_sums(&ids)?;
        let mut out: Vec<EntryView> = found
            .into_iter()
            .map(|(endpoint, target)| {
                let counted = sums.get(&target.stats_id).copied().unwrap_or_default();
                Self::view(endpoint, target, &counted, &pending)
            })
            .collect();
        out.sort_by_key(|e| {
            (
                e.endpoint.addr,
                e.endpoint.prefix_len,
                e.endpoint.proto as u8,
                e.endpoint.port,
            )
        });
        Ok(out)
    }

    /// Every prefix node: (LPM prefix length, data, node).
    fn nodes(&self) -> Result<Vec<(u32, PrefixData, PrefixNode)>, EngineError> {
        let mut out = Vec::new();
        for item in &self.prefixes {
            let (key, node) =
                item.map_err(|e| EngineError::map("cannot read the prefix table", e))?;
            out.push((key.prefix_len(), key.data(), node));
        }
        Ok(out)
    }

    /// The node stored at exactly this prefix (an LPM lookup would also
    /// return shorter ones).
    fn node_at(&self, len: u32, data: PrefixData) -> Result<Option<PrefixNode>, EngineError> {
        match self.prefixes.get(&LpmKey::new(len, data), 0) {
            Ok(node) if node.prefix_len == len => Ok(Some(node)),
            Ok(_) | Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(None)
            }
            Err(e) => Err(EngineError::map("cannot read the prefix table", e)),
        }
    }

    /// The rule for `endpoint` (a non-exact match), with its node.
    fn find_rule(&self, endpoint: &Endpoint) -> Result<Option<(PrefixNode, usize)>, EngineError> {
        let (len, data) = endpoint.prefix_key();
        let want = endpoint.port_rule();
        let Some(node) = self.node_at(len, data)? else {
            return Ok(None);
        };
        let idx = node.rules[..node.count as usize]
            .iter()
            .position(|r| PortRule { rule_id: 0, ..*r } == want);
        Ok(idx.map(|i| (node, i)))
    }

    fn sync_rule_count(&mut self) -> Result<(), EngineError> {
        let n: u32 = self.nodes()?.iter().map(|(_, _, n)| n.count).sum();
        let cur = self.config.get(&0, 0).unwrap_or_default();
        self.config
            .set(
                0,
                DatapathConfig {
                    prefix_rules: n,
                    ..cur
                },
                0,
            )
            .map_err(|e| EngineError::map("cannot write the datapath config", e))
    }

    fn insert_rule(&mut self, endpoint: &Endpoint, value: ServiceEntry) -> Result<(), EngineError> {
        let _lock = self.write_lock()?;
        if self.find_rule(endpoint)?.is_some() {
            return Err(EngineError::Duplicate(endpoint.to_string()));
        }
        let (len, data) = endpoint.prefix_key();
        let mut node = self.node_at(len, data)?.unwrap_or(PrefixNode {
            rules: [PortRule {
                src: [0; 16],
                src_mask: [0; 16],
                port_lo: 0,
                port_hi: 0,
                src_prefix: 0,
                _pad: [0; 3],
                rule_id: 0,
            }; RULES_PER_PREFIX],
            count: 0,
            prefix_len: len,
        });
        if node.count as usize >= RULES_PER_PREFIX {
            return Err(EngineError::PrefixFull {
                prefix: endpoint.to_string(),
                max: RULES_PER_PREFIX,
            });
        }
        let used: std::collections::HashSet<u32> = self.rule_ids()?.into_iter().collect();
        let id = (0..MAX_RULES)
            .find(|i| !used.contains(i))
            .ok_or(EngineError::Full(MAX_RULES))?;
        // The filter's bits, the slot, then the node that points at it: the
        // datapath never follows a rule to an empty slot, nor filters out a
        // port of a rule it can find.
        let want = endpoint.port_rule();
        self.manage_ports(data.proto, want.port_lo, want.port_hi)?;
        self.zero_stats(id)?;
        let value = ServiceEntry {
            stats_id: id,
            stats_epoch: self.next_stats_epoch()?,
            ..value
        };
        self.rules
            .set(id, value, 0)
            .map_err(|e| EngineError::map("cannot write the rules array", e))?;
        let mut rules: Vec<PortRule> = node.rules[..node.count as usize].to_vec();
        rules.push(PortRule {
            rule_id: id,
            ..endpoint.port_rule()
        });
        rules.sort_by_key(Endpoint::rule_rank);
        set_rules(&mut node, &rules);
        self.prefixes
            .insert(&LpmKey::new(len, data), node, 0)
            .map_err(|e| EngineError::map(format!("cannot add the rule for {endpoint}"), e))?;
        self.entries_changed()?;
        self.sync_rule_count()
    }

    fn remove_rule(&mut self, endpoint: &Endpoint) -> Result<(), EngineError> {
        let _lock = self.write_lock()?;
        let Some((mut node, idx)) = self.find_rule(endpoint)? else {
            return Err(EngineError::NoSuchEntry(endpoint.to_string()));
        };
        let id = node.rules[idx].rule_id;
        let (len, data) = endpoint.prefix_key();
        let mut rules: Vec<PortRule> = node.rules[..node.count as usize].to_vec();
        rules.remove(idx);
        if rules.is_empty() {
            self.prefixes.remove(&LpmKey::new(len, data)).map_err(|e| {
                EngineError::map(format!("cannot delete the rule for {endpoint}"), e)
            })?;
        } else {
            set_rules(&mut node, &rules);
            self.prefixes
                .insert(&LpmKey::new(len, data), node, 0)
                .map_err(|e| {
                    EngineError::map(format!("cannot delete the rule for {endpoint}"), e)
                })?;
        }
        self.rules
            .set(id, ServiceEntry::new(0, 0, [0; 6]), 0)
            .map_err(|e| EngineError::map("cannot clear the rules slot", e))?;
        // The generation first: a flow-cache slot of the rule flushed after this checks that
        // the rule still owns its counters (it does not), instead of adding to a slot reset.
        self.entries_changed()?;
        // No longer a live slot: its counts move to the global slots.
        self.zero_stats(id)?;
        self.sync_rule_count()?;
        let rule = endpoint.port_rule();
        let (first, _) = port_filter_slot(data.proto, rule.port_lo);
        let (last, _) = port_filter_slot(data.proto, rule.port_hi);
        self.rebuild_port_filter(&[(first, last)])
    }

    /// What the classifier's flow cache counted and has not yet added to the entries'
    /// counters (see [`super::flow_cache`]), attributed as the classifier will.
    fn pending(&self) -> Result<super::flow_cache::PendingCounts, EngineError> {
        let generation = self.entries_generation()?;
        // A poisoned lock only means a reader panicked mid-read: the handle is still whole.
        let mut handle = self
            .flow_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        super::flow_cache::pending(&self.pins.program(), &mut handle, generation, |slot| {
            self.still_owns(slot)
        })
    }

    /// Does the entry a flow-cache slot was filled for still own its counter slot? As the
    /// classifier decides it (`viscum_ebpf::lookup::still_owns`): an exact entry is still the
    /// services map's entry for the slot's destination, a rule still in its rule slot, with
    /// the same counter slot and [`ServiceEntry::stats_epoch`].
    fn still_owns(&self, slot: &FlowCacheSlot) -> Result<bool, EngineError> {
        let t = &slot.target;
        if t.stats_id < MAX_RULES {
            let r = self.rule(t.stats_id)?;
            return Ok(r.ifindex != 0 && r.owns_counters_of(t));
        }
        match self.services.get(&slot.service_key(), 0) {
            Ok(e) => Ok(e.owns_counters_of(t)),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(EngineError::map("cannot read the services map", e)),
        }
    }

    /// What an entry shows: its counters `counted` (summed over CPUs) and what the flow
    /// cache holds for it (`pending`).
    fn view(
        endpoint: Endpoint,
        target: ServiceEntry,
        counted: &EntryStats,
        pending: &super::flow_cache::PendingCounts,
    ) -> EntryView {
        let (packets, bytes) = pending.of(target.stats_id);
        EntryView {
            endpoint,
            target,
            ifindex: target.ifindex,
            flags: target.flags,
            packets: counted.packets + packets,
            bytes: counted.bytes + bytes,
            new_flows: counted.new_flows,
            cloud_flows: counted.cloud_flows,
        }
    }

    /// [`Self::view`] of one entry, its counters read for it.
    fn view_one(&self, endpoint: Endpoint, target: ServiceEntry) -> Result<EntryView, EngineError> {
        let counted = self.stats_sum(target.stats_id)?;
        Ok(Self::view(endpoint, target, &counted, &self.pending()?))
    }

    /// One entry, if present.
    ///
    /// # Errors
    /// [`EngineError::Map`] if a map cannot be read; a missing entry is `Ok(None)`.
    pub fn get(&self, endpoint: &Endpoint) -> Result<Option<EntryView>, EngineError> {
        if !endpoint.is_exact() {
            let Some((node, idx)) = self.find_rule(endpoint)? else {
                return Ok(None);
            };
            let target = self.rule(node.rules[idx].rule_id)?;
            return Ok(Some(self.view_one(*endpoint, target)?));
        }
        match self.services.get(&endpoint.key(), 0) {
            Ok(target) => Ok(Some(self.view_one(*endpoint, target)?)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(EngineError::map(
                format!("cannot read the entry for {endpoint}"),
                e,
            )),
        }
    }

    /// Adds an entry; fails if one exists for the same match.
    ///
    /// # Errors
    /// [`EngineError::Duplicate`] if an entry has this exact match; [`EngineError::Full`] or
    /// [`EngineError::PrefixFull`] when there is no room; [`EngineError::Map`] otherwise.
    pub fn insert(&mut self, endpoint: &Endpoint, target: ServiceEntry) -> Result<(), EngineError> {
        if !endpoint.is_exact() {
            return self.insert_rule(endpoint, target);
        }
        let key = endpoint.key();
        let _lock = self.write_lock()?;
        // The port is marked managed before the entry exists, so no packet the entry
        // matches is ever filtered out. A failed insert leaves it marked: that only
        // costs the port's unmanaged traffic a lookup until the next rebuild.
        match u16::from_be(key.port) {
            0 => self.manage_ports(key.proto, 0, u16::MAX)?,
            port => self.manage_ports(key.proto, port, port)?,
        }
        self.manage_address(&key.addr)?;
        // A free slot, reset: a duplicate is refused by the insert below (`BPF_NOEXIST`),
        // and the slot, never seen by the datapath, is given back.
        let value = ServiceEntry {
            stats_id: self.claim_stats_slot()?,
            stats_epoch: self.next_stats_epoch()?,
            ..target
        };
        let result = self.services.insert(key, value, BPF_NOEXIST);
        if result.is_err() {
            self.release_stats_slot(value.stats_id)?;
        }
        match result {
            // A new exact entry may shadow a prefix rule that flows were decided by.
            Ok(()) => self.entries_changed(),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Err(EngineError::Duplicate(endpoint.to_string()))
            }
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                // Asked only now: a full map is rare, and every open would pay for it.
                let max = self.services.map().info().map_or(0, |i| i.max_entries());
                Err(EngineError::Full(max))
            }
            Err(e) => Err(EngineError::map(
                format!("cannot add the entry for {endpoint}"),
                e,
            )),
        }
    }

    /// Changes an entry's flags (e.g. sets `TARGET_F_DRAINING`), keeping the rest of its
    /// target and its counters (which live apart, in [`ENTRY_STATS_MAP`]). An exact entry's
    /// value is swapped whole by the kernel; a rule's is rewritten in place.
    ///
    /// # Errors
    /// [`EngineError::NoSuchEntry`] if there is no entry; [`EngineError::Map`] if reading or
    /// writing it fails.
    pub fn update_flags(
        &mut self,
        endpoint: &Endpoint,
        f: impl Fn(u32) -> u32,
    ) -> Result<(), EngineError> {
        let _lock = self.write_lock()?;
        if !endpoint.is_exact() {
            let Some((node, idx)) = self.find_rule(endpoint)? else {
                return Err(EngineError::NoSuchEntry(endpoint.to_string()));
            };
            let id = node.rules[idx].rule_id;
            let value = self.rule(id)?;
            let value = ServiceEntry {
                flags: f(value.flags),
                ..value
            };
            self.rules
                .set(id, value, 0)
                .map_err(|e| EngineError::map("cannot update the rule", e))?;
            return self.entries_changed();
        }
        let value = match self.services.get(&endpoint.key(), 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => {
                return Err(EngineError::NoSuchEntry(endpoint.to_string()));
            }
            Err(e) => {
                return Err(EngineError::map(
                    format!("cannot read the entry for {endpoint}"),
                    e,
                ));
            }
        };
        let value = ServiceEntry {
            flags: f(value.flags),
            ..value
        };
        self.services
            .insert(endpoint.key(), value, BPF_EXIST)
            .map_err(|e| EngineError::map(format!("cannot update the entry for {endpoint}"), e))?;
        self.entries_changed()
    }

    /// Open edge flows per target ifindex (for draining and `stats`). A flow
    /// that has seen FIN/RST is finishing and no longer counts, nor does a half-open TCP
    /// flow (a SYN nobody followed: [`REPLY_F_ESTABLISHED`](viscum_common::REPLY_F_ESTABLISHED)).
    ///
    /// # Errors
    /// None today: unreadable flow records are skipped.
    pub fn edge_flows(&self) -> Result<std::collections::HashMap<u32, u64>, EngineError> {
        let now = monotonic_ns();
        let cfg = self.config.get(&0, 0).unwrap_or_default();
        let mut out = std::collections::HashMap::new();
        for item in &self.edge {
            let Ok((key, state)) = item else { continue };
            if state.flags & REPLY_F_DROP != 0 || !open_flow(&key, &state, now, &cfg) {
                continue;
            }
            *out.entry(key.ifindex).or_insert(0) += 1;
        }
        Ok(out)
    }

    /// Live edge flows that `endpoint`'s entry (redirecting to `ifindex`)
    /// sent to the edge: what a drain waits for.
    ///
    /// # Errors
    /// None today: unreadable flow records are skipped.
    pub fn edge_flows_of(
        &self,
        endpoint: &crate::endpoint::Endpoint,
        ifindex: u32,
    ) -> Result<u64, EngineError> {
        Ok(self.live_edge_flows(&[(*endpoint, ifindex)])[0])
    }

    /// [`Engine::edge_flows_of`] for several entries (endpoint, target ifindex) in one
    /// pass over the flow table: the count per entry, in order.
    pub fn live_edge_flows(&self, entries: &[(crate::endpoint::Endpoint, u32)]) -> Vec<u64> {
        let now = monotonic_ns();
        let cfg = self.config.get(&0, 0).unwrap_or_default();
        let mut counts = vec![0; entries.len()];
        for (key, state) in self.edge.iter().flatten() {
            if !open_flow(&key, &state, now, &cfg) {
                continue;
            }
            for (count, (endpoint, ifindex)) in counts.iter_mut().zip(entries) {
                if flow_of(&key, &state, endpoint, *ifindex) {
                    *count += 1;
                }
            }
        }
        counts
    }

    /// Forgets every flow record of `endpoint`'s entry into `ifindex` (the
    /// entry is gone: its flows must not be counted, nor decide for a later
    /// entry of the same match). Returns how many were removed.
    ///
    /// # Errors
    /// [`EngineError::Busy`] / [`EngineError::Io`] from the write lock; unreadable records are
    /// skipped, and a record the LRU evicted meanwhile
    /// counts as removed.
    pub fn forget_flows(
        &mut self,
        endpoint: &crate::endpoint::Endpoint,
        ifindex: u32,
    ) -> Result<usize, EngineError> {
        let _lock = self.write_lock()?;
        let keys: Vec<ReplyKey> = self
            .edge
            .iter()
            .flatten()
            .filter(|(key, state)| flow_of(key, state, endpoint, ifindex))
            .map(|(key, _)| key)
            .collect();
        for k in &keys {
            // Already evicted by the LRU in between: nothing to do.
            let _ = self.edge.remove(k);
        }
        if !keys.is_empty() {
            // The flow cache must not go on serving the forgotten flows.
            self.entries_changed()?;
        }
        Ok(keys.len())
    }

    /// Writes the flow timeouts, in nanoseconds (the `bpf_ktime_get_ns` clock): idle time
    /// after which a TCP or a UDP flow is forgotten, and how long a closing TCP flow
    /// lingers after FIN/RST. 0 keeps the datapath's default (2 h, 30 s, 10 s).
    ///
    /// # Errors
    /// [`EngineError::Map`] if `VISCUM_CONFIG` cannot be written.
    pub fn set_timeouts(
        &mut self,
        tcp_idle_ns: u64,
        udp_idle_ns: u64,
        linger_ns: u64,
    ) -> Result<(), EngineError> {
        let _lock = self.write_lock()?;
        let cur = self.config.get(&0, 0).unwrap_or_default();
        let cfg = DatapathConfig {
            tcp_idle_ns,
            udp_idle_ns,
            linger_ns,
            ..cur
        };
        self.config
            .set(0, cfg, 0)
            .map_err(|e| EngineError::map("cannot write the datapath config", e))
    }

    /// Removes an entry; fails if there is none.
    ///
    /// # Errors
    /// [`EngineError::NoSuchEntry`] if there is none; [`EngineError::Map`] if deleting fails.
    pub fn remove(&mut self, endpoint: &Endpoint) -> Result<(), EngineError> {
        if !endpoint.is_exact() {
            return self.remove_rule(endpoint);
        }
        let _lock = self.write_lock()?;
        let key = endpoint.key();
        let (first, last) = match u16::from_be(key.port) {
            0 => (
                port_filter_slot(key.proto, 0).0,
                port_filter_slot(key.proto, u16::MAX).0,
            ),
            port => {
                let (w, _) = port_filter_slot(key.proto, port);
                (w, w)
            }
        };
        let (addr_word, _) = addr_filter_slot(&key.addr);
        // Its counter slot, given back once the entry is gone.
        let stats_id = self.services.get(&key, 0).ok().map(|e| e.stats_id);
        match self.services.remove(&key) {
            Ok(()) => {
                self.entries_changed()?;
                if let Some(id) = stats_id {
                    self.release_stats_slot(id)?;
                }
                self.rebuild_port_filter(&[(first, last), (addr_word, addr_word)])
            }
            Err(MapError::KeyNotFound) => Err(EngineError::NoSuchEntry(endpoint.to_string())),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Err(EngineError::NoSuchEntry(endpoint.to_string()))
            }
            Err(e) => Err(EngineError::map(
                format!("cannot delete the entry for {endpoint}"),
                e,
            )),
        }
    }

    /// Global counters summed over CPUs.
    ///
    /// # Errors
    /// [`EngineError::Map`] if `VISCUM_GLOBAL` cannot be read.
    pub fn global_stats(&self) -> Result<GlobalStats, EngineError> {
        // A slot of the global array, summed over CPUs.
        let read = |slot: u32| -> Result<u64, EngineError> {
            let v = self
                .global
                .get(&slot, 0)
                .map_err(|e| EngineError::map("cannot read the global counters", e))?;
            Ok(v.iter().sum())
        };
        // A writer moves a reset slot's counts into the global slots: under the lock the sums
        // below see them in one place or the other, never both or neither. The classifier
        // moving a flow-cache slot's counts is not under it (see `super::flow_cache::pending`).
        let _lock = self.write_lock()?;
        let mut stats = GlobalStats::default();
        for info in GLOBAL_COUNTER_INFO {
            if info.counter != GlobalCounter::Seen {
                *stats.get_mut(info.counter) = read(info.counter as u32)?;
            }
        }
        // Counted by the classifier in the entries' counters only (see `retire`), or in its
        // flow cache's slots until it adds them to those (see `super::flow_cache`), or, for
        // a slot's counts whose entry was gone by then, in the slot of `seen`, which it
        // does not count otherwise (see `LATE_REDIRECTS_SLOT`).
        let late = read(LATE_REDIRECTS_SLOT)?;
        let redirected = stats.get_mut(GlobalCounter::Redirected);
        *redirected = redirected
            .wrapping_add(late)
            .wrapping_add(self.pending()?.packets);
        for counted in self.stats_sums(&self.live_stats_ids()?)?.values() {
            for (counter, field) in RETIRED {
                let total = stats.get_mut(counter);
                *total = total.wrapping_add(field(counted));
            }
        }
        // Not counted by the classifier: every packet ends in one of its exits.
        stats.seen = INGRESS_EXITS.iter().map(|&c| stats.get(c)).sum();
        Ok(stats)
    }

    /// Turns the classifier's per-decision debug records on or off.
    ///
    /// # Errors
    /// [`EngineError::Map`] if `VISCUM_CONFIG` cannot be written.
    pub fn set_log_debug(&mut self, on: bool) -> Result<(), EngineError> {
        let _lock = self.write_lock()?;
        let cur = self.config.get(&0, 0).unwrap_or_default();
        let cfg = DatapathConfig {
            log_debug: u32::from(on),
            ..cur
        };
        self.config
            .set(0, cfg, 0)
            .map_err(|e| EngineError::map("cannot write the datapath config", e))
    }

    /// Id of the pinned classifier (for aya-log's `init_from_id`).
    ///
    /// # Errors
    /// [`EngineError::Program`] if the program pin cannot be opened or queried.
    pub fn program_id(&self) -> Result<u32, EngineError> {
        // Not through `SchedClassifier::from_pin`, which makes aya probe the kernel's
        // features (see `attach::pinned_program_id`).
        let info = aya::programs::ProgramInfo::from_pin(self.pins.program())
            .map_err(|e| EngineError::prog("cannot read the pinned classifier's info", e))?;
        Ok(info.id())
    }
}

/// Stores `rules` (already in precedence order) as the node's rules.
fn set_rules(node: &mut PrefixNode, rules: &[PortRule]) {
    for (slot, r) in node.rules.iter_mut().zip(rules) {
        *slot = *r;
    }
    node.count = rules.len() as u32;
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub(crate) fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Is this edge record an open flow at `now` (ns of `CLOCK_MONOTONIC`)? Not once it saw a
/// FIN/RST (finishing), nor idle past its protocol's timeout, nor a TCP flow whose handshake
/// never went on past the SYN (a scan, a spoofed SYN, a client that gave up: nothing to wait
/// for, and a SYN flood would otherwise hold every drain for its whole timeout).
fn open_flow(key: &ReplyKey, state: &ReplyState, now: u64, cfg: &DatapathConfig) -> bool {
    let half_open = key.proto == viscum_common::PROTO_TCP
        && state.flags & viscum_common::REPLY_F_ESTABLISHED == 0;
    state.closing_at_ns == 0
        && !half_open
        && now.saturating_sub(state.last_seen_ns) <= cfg.idle_ns(key.proto)
}

/// Is this edge record a flow that `endpoint`'s entry into `ifindex` decided (mirror
/// records are not: the cloud serves those flows)?
fn flow_of(
    key: &ReplyKey,
    state: &ReplyState,
    endpoint: &crate::endpoint::Endpoint,
    ifindex: u32,
) -> bool {
    let addr = |b: [u8; 16]| {
        if key.family == viscum_common::FAMILY_V4 {
            std::net::IpAddr::from([b[0], b[1], b[2], b[3]])
        } else {
            std::net::IpAddr::from(b)
        }
    };
    state.flags & REPLY_F_DROP == 0
        && key.ifindex == ifindex
        && crate::endpoint::Proto::from_number(key.proto).is_some_and(|proto| {
            endpoint.matches(
                proto,
                addr(state.service),
                u16::from_be(state.service_port),
                addr(key.client),
            )
        })
}
