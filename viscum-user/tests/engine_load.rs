//! Privileged tests of loading the datapath: a load that fails leaves the
//! bpffs exactly as it was, and a good one reports the verifier's work.
//!
//! Each test works in its own named network namespace (removed on drop) and
//! its own bpffs mounted under /run (unmounted on drop). Skipped when not root.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use viscum::{
    engine::{self, MapSizes, Pins},
    features, netns,
};

fn skip_unless_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("skipping: needs root");
    true
}

/// A namespace and a bpffs directory of our own, both removed on drop.
struct Scratch {
    ns: String,
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let ns = format!("vl{}x{n}", std::process::id() % 10_000_000);
        netns::create_named(&ns).expect("create namespace");
        let dir = PathBuf::from(format!("/run/viscum-test-{ns}"));
        viscum::bpffs::ensure(&dir).expect("mount a bpffs");
        Scratch { ns, dir }
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        netns::in_netns(&self.ns, f).expect("enter the namespace")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let dir = self.dir.clone();
        let _ = self.run(move || engine::purge(&Pins::new(&dir)));
        let _ = nix::mount::umount(&self.dir);
        let _ = fs::remove_dir(&self.dir);
        let _ = netns::delete_named(&self.ns);
    }
}

/// Everything under `dir`, for before/after comparisons.
fn listing(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

#[test]
fn a_failed_load_leaves_nothing_pinned() {
    if skip_unless_root() {
        return;
    }
    let s = Scratch::new();
    let before = listing(&s.dir);
    let dir = s.dir.clone();
    // A zero-sized flow table is refused by the kernel when the maps are
    // created, after others may already have been created and pinned.
    let err = s
        .run(move || {
            engine::attach(
                &Pins::new(&dir),
                &["lo".to_owned()],
                MapSizes {
                    services: 64,
                    flows: 0,
                },
            )
        })
        .expect_err("a zero-sized flow table must be refused");
    assert!(!err.to_string().is_empty());
    assert_eq!(
        listing(&s.dir),
        before,
        "the failed load left pins behind: {err:#}"
    );

    // And the same directory then takes a good load.
    let dir = s.dir.clone();
    let done = s
        .run(move || engine::attach(&Pins::new(&dir), &["lo".to_owned()], MapSizes::default()))
        .expect("a good load after a failed one");
    assert_eq!(done.len(), 1);
}

#[test]
fn loaded_programs_report_verifier_statistics() {
    if skip_unless_root() {
        return;
    }
    let s = Scratch::new();
    let dir = s.dir.clone();
    s.run(move || engine::attach(&Pins::new(&dir), &["lo".to_owned()], MapSizes::default()))
        .expect("attach");
    let stats = features::program_stats(&Pins::new(&s.dir));
    let names: Vec<&str> = stats.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "viscum_ingress",
            "viscum_reply",
            "viscum_icmp_ingress",
            "viscum_icmp_reply",
            "viscum_recover"
        ]
    );
    for p in &stats {
        let insns = p
            .verified_insns
            .expect("kernels >= 5.16 report verified_insns");
        assert!(
            insns > 100 && insns < 1_000_000,
            "{}: {insns} verified insns",
            p.name
        );
        assert!(p.xlated_bytes.is_some_and(|b| b > 0), "{p:?}");
    }
    let report = features::Report::probe(&Pins::new(&s.dir));
    assert!(report.missing.is_empty(), "{report:?}");
    assert_eq!(report.programs.len(), 5);
}

/// The miss pre-filter is written through a shared mapping of the map (`BPF_F_MMAPABLE`),
/// and what the engine stores there is what the kernel's map holds: read back through
/// bpf(2), the new entry's port and address bits are clear (managed) and the "built" marker
/// is set, while a port no entry uses stays filtered.
#[test]
fn the_miss_prefilter_is_written_through_shared_memory() {
    use aya::maps::{Array, Map, MapData};
    use viscum_common::{
        PORT_FILTER_BITMAP_WORDS, PORT_FILTER_BUILT, PORTS_MAP, PROTO_TCP, ServiceEntry,
        addr_filter_slot, port_filter_slot,
    };
    if skip_unless_root() {
        return;
    }
    let s = Scratch::new();
    let dir = s.dir.clone();
    s.run(move || {
        let pins = Pins::new(&dir);
        engine::attach(&pins, &["lo".to_owned()], MapSizes::default()).expect("attach");
        let mut e = engine::Engine::open(&pins).expect("open");
        assert!(e.filter_mapped(), "the filter was not mapped");
        let ep: viscum::endpoint::Endpoint = "tcp://192.0.2.9:8080".parse().unwrap();
        e.insert(&ep, ServiceEntry::new(1, 0, [0; 6]))
            .expect("insert");
        let words: Array<MapData, u64> =
            Array::try_from(Map::Array(MapData::from_pin(pins.map(PORTS_MAP)).unwrap())).unwrap();
        let (w, bit) = port_filter_slot(PROTO_TCP, 8080);
        assert_eq!(
            words.get(&w, 0).unwrap() & bit,
            0,
            "port 8080 still filtered"
        );
        let (w, bit) = port_filter_slot(PROTO_TCP, 8081);
        assert_ne!(words.get(&w, 0).unwrap() & bit, 0, "port 8081 not filtered");
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[192, 0, 2, 9]);
        let (w, bit) = addr_filter_slot(&addr);
        assert_eq!(
            words.get(&w, 0).unwrap() & bit,
            0,
            "the address still filtered"
        );
        assert_eq!(
            words.get(&PORT_FILTER_BITMAP_WORDS, 0).unwrap(),
            PORT_FILTER_BUILT
        );
    });
}
