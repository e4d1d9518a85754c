//! B1 and B2 of `docs/benchmarks.md`: what the classifier costs per packet, measured
//! in the kernel with `BPF_PROG_TEST_RUN` (aya's `TestRun` on `SchedClassifier`); and B11,
//! what loading it costs the verifier (see [`b11`]).
//!
//! Two ways of running a packet are used, and both are reported:
//!
//! * **hot**: one packet, `repeat` = 1e6 in one call; the kernel times the loop and returns the
//!   mean per run. Every map access hits the L1 cache after the first run, so this is the
//!   instruction cost of a path (what the published ~13 ns no-op / ~20 ns lookup anchors are).
//! * **spread**: a different packet per call (`repeat` = 1), cycling over 4 096 flows whose
//!   destinations are spread over every entry of the map, ≥ 1e6 calls in all (a quarter in
//!   quick mode). The kernel's figure for one run then includes its own timer reads, which the
//!   no-op program measured the same way cancels: rows report "over noop". B2's "wide" table
//!   uses 65 536 flows, whose working set grows with the map and shows cache and TLB misses.
//!
//! The noop reference is `bench_noop` from the `viscum-bench` object (returns `TC_ACT_OK`
//! without reading the packet). An ARP frame through the real classifier (parses the ethertype,
//! bumps two counters, passes) is reported beside it as "parse only".
//!
//! Every measured call's return value is checked (hit = `TC_ACT_REDIRECT`, everything else =
//! `TC_ACT_OK` or `TC_ACT_UNSPEC`), so a benchmark can never time the wrong path silently. `bpf_redirect_peer`
//! inside a test run only records the target; nothing is sent.
//!
//! When the object has a flow table (`VISCUM_FLOWS`), "hit with flow-table insert" sends the
//! first packet (SYN) of a never-seen flow per call; without one, that row is skipped.

mod support;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::ExitCode,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use serde_json::json;
use viscum::endpoint::Endpoint;
use viscum_common::{
    ENTRY_STATS_MAP, FLOW_CACHE_MAP, FLOWS_MAP, ICMP_INGRESS_PROG, ICMP_REPLY_PROG, INGRESS_PROG,
    PORT_FILTER_BITMAP_WORDS, PORT_FILTER_BUILT, PORTS_MAP, PortFilter, RECOVER_PROG, REPLIES_MAP,
    REPLY_CACHE_MAP, REPLY_PROG, SERVICES_MAP, ServiceEntry, ServiceKey, TARGET_F_NAT,
    TARGET_F_PEER, TARGET_F_SET_MAC, entry_stats_id, entry_stats_slots, flow_cache_entries,
    reply_cache_entries,
};

use crate::support::{
    bpffs::PrivateBpffs,
    cli::Args,
    netns,
    report::{self, Bar, Fragment, Plot, Row, Series, Table},
    sys,
};

/// The reference programs (noop and hook), built by aya-build from viscum-ebpf's
/// `viscum-bench` binary target.
static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/viscum-bench"));

/// Verdicts, as the test run reports them (the program's i32 return as u32).
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
/// `TC_ACT_UNSPEC` (-1): no verdict, the packet continues (TCX runs the next program).
const TC_ACT_UNSPEC: u32 = u32::MAX;

/// Does a test run's return value mean what we expected? Letting a packet through may be
/// spelt `TC_ACT_OK` or `TC_ACT_UNSPEC`; both leave it to the stack.
fn verdict_ok(want: u32, got: u32) -> bool {
    got == want || (want == TC_ACT_OK && got == TC_ACT_UNSPEC)
}
/// Distinct flows the spread mode cycles through (benchmarks.md: "keys spread over ≥ 4k
/// flows"): a working set that stays the same size whatever the map holds, so B2 isolates the
/// lookup's dependence on the number of entries.
const SPREAD_FLOWS: usize = 4_096;
/// The cache-hostile variant of B2: 16× more flows, whose working set grows with the map up
/// to 64k distinct entries.
const WIDE_FLOWS: usize = 65_536;
/// Flow and reply table size of the instances whose flows must all stay known (4× the
/// flows in play: an LRU map starts evicting before it is completely full).
const ROOMY_FLOW_TABLE: u32 = 4 * WIDE_FLOWS as u32;
/// Entries of each family in B1's map ("an edge box with a thousand services").
const B1_ENTRIES: u32 = 1_000;

fn main() -> ExitCode {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("datapath bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    sys::install_signal_handlers();
    let fragments = run(&args);
    match report::write(&args, &fragments) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("datapath bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const B1_TITLE: &str = "Classifier cost per packet (BPF_PROG_TEST_RUN)";
const B2_TITLE: &str = "Hit cost against map size";
const B11_TITLE: &str = "Verifier: instructions and load time per kernel";

fn run(args: &Args) -> Vec<Fragment> {
    let bpffs = match PrivateBpffs::mount(&args.run_id) {
        Ok(b) => b,
        Err(e) => {
            return vec![
                Fragment::failed("B1", B1_TITLE, &e),
                Fragment::failed("B2", B2_TITLE, &e),
                Fragment::failed("B11", B11_TITLE, &e),
            ];
        }
    };
    // The measured loop runs on the calling CPU; keep it on one (the "server" CPU, away
    // from where xtask and its children usually sit).
    sys::pin_current_thread(sys::server_cpu());
    let mut out = Vec::new();
    if args.wants("B1") {
        out.push(b1(args, &bpffs).unwrap_or_else(|e| Fragment::failed("B1", B1_TITLE, &e)));
    }
    if args.wants("B2") {
        out.push(b2(args, &bpffs).unwrap_or_else(|e| Fragment::failed("B2", B2_TITLE, &e)));
    }
    if args.wants("B11") {
        out.push(b11(args, &bpffs).unwrap_or_else(|e| Fragment::failed("B11", B11_TITLE, &e)));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Loading and filling

/// One loaded copy of the classifier with its own maps (pinned by name under its own bpffs
/// subdirectory, because the object declares them pinned).
struct Loaded {
    ebpf: Ebpf,
    prog_name: &'static str,
    /// The miss pre-filter of everything filled so far (written as `viscum` would).
    filter: PortFilter,
}

impl Loaded {
    /// The product's classifier; `flow_entries` overrides the flow and reply table sizes
    /// (`None`: the object's defaults, as `viscum attach` uses them).
    fn viscum(
        bpffs: &PrivateBpffs,
        tag: &str,
        max_entries: u32,
        flow_entries: Option<u32>,
    ) -> Result<Loaded> {
        Loaded::viscum_in(&bpffs.subdir(tag)?, max_entries, flow_entries)
    }

    /// [`Loaded::viscum`] with its maps pinned in `dir`.
    fn viscum_in(dir: &Path, max_entries: u32, flow_entries: Option<u32>) -> Result<Loaded> {
        // As `viscum attach` sizes them: a region per possible CPU id.
        let cpus = viscum::engine::cpus::cpu_regions()?;
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(dir)
            .map_max_entries(SERVICES_MAP, max_entries)
            .map_max_entries(
                ENTRY_STATS_MAP,
                entry_stats_slots(max_entries).saturating_mul(cpus),
            )
            .map_max_entries(FLOW_CACHE_MAP, flow_cache_entries(cpus))
            .map_max_entries(REPLY_CACHE_MAP, reply_cache_entries(cpus));
        if let Some(n) = flow_entries {
            loader
                .map_max_entries(FLOWS_MAP, n)
                .map_max_entries(REPLIES_MAP, n);
        }
        let mut ebpf = loader.load(viscum::EBPF_OBJECT).with_context(|| {
            format!("cannot load the classifier with {max_entries} map entries")
        })?;
        viscum::engine::attach::write_stats_stride(&mut ebpf, cpus)?;
        load_prog(&mut ebpf, INGRESS_PROG)?;
        Ok(Loaded {
            ebpf,
            prog_name: INGRESS_PROG,
            filter: PortFilter::new(),
        })
    }

    fn noop(bpffs: &PrivateBpffs) -> Result<Loaded> {
        Loaded::noop_in(&bpffs.subdir("noop")?)
    }

    /// [`Loaded::noop`] with its maps pinned in `dir`.
    fn noop_in(dir: &Path) -> Result<Loaded> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .load(BENCH_OBJECT)
            .context("cannot load the viscum-bench object")?;
        load_prog(&mut ebpf, "bench_noop")?;
        // The mechanism's floor beside it (B1's hook row); HOOK_IFINDEX stays 0, which
        // BPF_PROG_TEST_RUN never redirects to.
        load_prog(&mut ebpf, "bench_hook")?;
        Ok(Loaded {
            ebpf,
            prog_name: "bench_noop",
            filter: PortFilter::new(),
        })
    }

    fn prog(&self) -> Result<&SchedClassifier> {
        self.named_prog(self.prog_name)
    }

    fn named_prog(&self, name: &str) -> Result<&SchedClassifier> {
        let p = self
            .ebpf
            .program(name)
            .with_context(|| format!("no program {name}"))?;
        Ok(p.try_into()?)
    }

    fn has_flow_table(&self) -> bool {
        self.ebpf.map(FLOWS_MAP).is_some()
    }

    fn services(&mut self) -> Result<HashMap<&mut MapData, ServiceKey, ServiceEntry>> {
        let map = self
            .ebpf
            .map_mut(SERVICES_MAP)
            .context("the object has no services map")?;
        Ok(HashMap::try_from(map)?)
    }

    /// Inserts `keys` as entries redirecting to ifindex 1 (any ifindex will do: a test run
    /// only records the redirect target).
    fn fill(&mut self, keys: impl Iterator<Item = ServiceKey>) -> Result<usize> {
        // The flags `redirect add` gives an entry on this kernel, so the rows measure what a
        // router running it pays (on 6.15+ no PACKET_HOST mark: the kernel sets it).
        let entry = ServiceEntry::new(
            1,
            viscum::features::entry_redirect_flags(),
            [0x02, 0, 0, 0, 0, 0x53],
        );
        let mut filter = self.filter.clone();
        let mut map = self.services()?;
        let mut count = 0;
        for key in keys {
            // Each entry its own counter slot, as `redirect add` gives it.
            let value = ServiceEntry {
                stats_id: entry_stats_id(count as u32),
                ..entry
            };
            map.insert(key, value, 0)
                .with_context(|| format!("cannot insert entry {count}"))?;
            filter.manage_key(&key);
            count += 1;
            if count % 65_536 == 0 {
                sys::check_stop()?;
            }
        }
        self.filter = filter;
        self.write_port_filter()?;
        Ok(count)
    }

    /// Writes the miss pre-filter for the entries filled so far, as `viscum`'s engine keeps
    /// it, when the object has one (older objects do not).
    fn write_port_filter(&mut self) -> Result<()> {
        let Some(map) = self.ebpf.map_mut(PORTS_MAP) else {
            return Ok(());
        };
        let mut ports: Array<&mut MapData, u64> = Array::try_from(map)?;
        let len = ports.len();
        for i in (0..len).filter(|&i| i != PORT_FILTER_BITMAP_WORDS) {
            if let Some(w) = self.filter.word(i) {
                ports.set(i, w, 0)?;
            }
        }
        ports.set(PORT_FILTER_BITMAP_WORDS, PORT_FILTER_BUILT, 0)?;
        Ok(())
    }
}

fn load_prog(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .with_context(|| format!("the object has no program {name}"))?
        .try_into()?;
    prog.load()
        .with_context(|| format!("the kernel rejected {name}"))?;
    Ok(())
}

/// Entry `i` of the IPv4 family: 10.0.0.0 + i, TCP port 80.
fn v4_entry(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + i)
}

/// Entry `i` of the IPv6 family: 2001:db8:1:: + i, TCP port 80.
fn v6_entry(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(0x2001_0db8_0001_0000_0000_0000_0000_0000u128 + u128::from(i))
}

/// The key `viscum redirect add tcp://ADDR:80` would insert (parsed like the CLI does, so
/// the benchmark follows the product's encoding whatever it becomes).
fn key(addr: IpAddr) -> ServiceKey {
    let text = match addr {
        IpAddr::V4(a) => format!("tcp://{a}:80"),
        IpAddr::V6(a) => format!("tcp://[{a}]:80"),
    };
    match text.parse::<Endpoint>() {
        Ok(e) => e.key(),
        // Every address generated here is a valid unicast one.
        Err(e) => unreachable!("{text}: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Packets

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

fn eth(ethertype: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(80);
    p.extend(DST_MAC);
    p.extend(SRC_MAC);
    p.extend(ethertype.to_be_bytes());
    p
}

fn tcp_header(p: &mut Vec<u8>, sport: u16, dport: u16, flags: u8) {
    p.extend(sport.to_be_bytes());
    p.extend(dport.to_be_bytes());
    p.extend(1u32.to_be_bytes()); // seq
    p.extend(u32::from(flags & TCP_ACK != 0).to_be_bytes());
    p.push(5 << 4); // data offset
    p.push(flags);
    p.extend(64_240u16.to_be_bytes());
    p.extend([0, 0, 0, 0]); // checksum (not verified at TC ingress), urgent pointer
}

fn v4_tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = eth(0x0800);
    let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !(sum as u16);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend(ip);
    tcp_header(&mut p, sport, dport, flags);
    p
}

fn v6_tcp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = eth(0x86dd);
    p.extend([0x60, 0, 0, 0]);
    p.extend(20u16.to_be_bytes());
    p.extend([6, 64]);
    p.extend(src.octets());
    p.extend(dst.octets());
    tcp_header(&mut p, sport, dport, flags);
    p
}

fn arp() -> Vec<u8> {
    let mut p = eth(0x0806);
    p.extend([0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend(SRC_MAC);
    p.extend([192, 0, 2, 2]);
    p.extend([0; 6]);
    p.extend([192, 0, 2, 1]);
    p
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 2);

/// Client side of flow `f`: its own source address and port.
fn flow_src(f: usize) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::from(u32::from(CLIENT) + (f as u32 >> 14)),
        1024 + (f as u16 & 0x3fff),
    )
}

/// 65 536 packets to entries spread over all `n` entries of the IPv4 family (or to addresses
/// not in the map when `n` is 0: misses).
fn spread_packets(n: u32, flags: u8, flows: usize) -> Vec<Vec<u8>> {
    (0..flows)
        .map(|f| {
            let dst = if n == 0 {
                Ipv4Addr::new(10, 200, (f >> 8) as u8, f as u8)
            } else {
                // Multiplicative spread: consecutive flows land far apart in the key space.
                v4_entry(((f as u64 * 2_654_435_761) % u64::from(n)) as u32)
            };
            let (src, sport) = flow_src(f);
            v4_tcp(src, dst, sport, 80, flags)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Measuring

/// Mean ns per run of `pkt` repeated `repeat` times in one call (the kernel's figure).
fn hot(prog: &SchedClassifier, pkt: &[u8], repeat: u32, want: u32) -> Result<f64> {
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            repeat,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN failed")?;
    if !verdict_ok(want, r.return_value) {
        bail!("returned {} instead of {want}", r.return_value as i32);
    }
    Ok(r.duration.as_nanos() as f64)
}

/// ns of single runs of `calls` packets taken in turn from `pkts`, summarised as the mean of
/// the calls below the 99th percentile (interrupts and preemption land in the top 1 %).
fn spread(
    prog: &SchedClassifier,
    pkts: &[Vec<u8>],
    start: usize,
    calls: usize,
    want: u32,
) -> Result<(f64, Vec<u32>)> {
    let mut ns = Vec::with_capacity(calls);
    for i in 0..calls {
        ns.push(single_run(
            prog,
            &pkts[(start + i) % pkts.len()],
            None,
            want,
            i,
        )?);
    }
    Ok((trimmed_mean(&ns), ns))
}

/// Call `i` of a series of single runs: `pkt` once (a fresh copy), with context `ctx` when
/// given; its duration in ns, or an error if it returned other than `want`. Checks for a
/// stop request every 16k calls.
fn single_run(
    prog: &SchedClassifier,
    pkt: &[u8],
    ctx: Option<&[u8]>,
    want: u32,
    i: usize,
) -> Result<u32> {
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            ctx_in: ctx,
            repeat: 1,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN failed")?;
    if !verdict_ok(want, r.return_value) {
        bail!(
            "call {i} returned {} instead of {want}",
            r.return_value as i32
        );
    }
    if i.is_multiple_of(16_384) {
        sys::check_stop()?;
    }
    Ok(r.duration.as_nanos() as u32)
}

/// Runs each packet once, expecting a redirect: the packets (SYNs, a handshake's ACK) that
/// open the flows later packets belong to.
fn prewarm(prog: &SchedClassifier, syns: &[Vec<u8>]) -> Result<()> {
    for (i, pkt) in syns.iter().enumerate() {
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                repeat: 1,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN failed")?;
        if r.return_value != TC_ACT_REDIRECT {
            bail!(
                "opening flows: packet {i} returned {} instead of {TC_ACT_REDIRECT}",
                r.return_value as i32
            );
        }
    }
    Ok(())
}

/// Single runs where every call is the first packet of a new flow (for the flow table).
fn spread_new_flows(
    prog: &SchedClassifier,
    dst: Ipv4Addr,
    first_flow: usize,
    calls: usize,
    want: u32,
) -> Result<f64> {
    let mut ns = Vec::with_capacity(calls);
    for i in 0..calls {
        let f = first_flow + i;
        let src = Ipv4Addr::from(0x6440_0000 + (f as u32 >> 14)); // 100.64/10: never reused
        let pkt = v4_tcp(src, dst, 1024 + (f as u16 & 0x3fff), 80, TCP_SYN);
        ns.push(single_run(prog, &pkt, None, want, i)?);
    }
    Ok(trimmed_mean(&ns))
}

fn trimmed_mean(ns: &[u32]) -> f64 {
    let cut = report::quantile_u32(ns, 0.99);
    let kept: Vec<f64> = ns
        .iter()
        .map(|&x| f64::from(x))
        .filter(|&x| x <= cut)
        .collect();
    kept.iter().sum::<f64>() / kept.len().max(1) as f64
}

/// Per-round differences a_r - b_r.
fn minus(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// Per-round ratios a_r / b_r.
fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// Knobs of one run.
struct Plan {
    /// Rounds of the interleaved schedule (a sample per variant per round).
    rounds: usize,
    /// `repeat` of a hot call.
    repeat: u32,
    /// Single-run calls per variant per round in spread mode.
    spread_calls: usize,
}

impl Plan {
    fn of(args: &Args) -> Plan {
        let rounds = args.pick(5, 9);
        // ≥ 1e6 spread calls per variant in a full run; a quarter of that in quick mode.
        let spread_calls = args.pick(250_000usize, 1_000_000).div_ceil(rounds);
        Plan {
            rounds,
            repeat: 1_000_000,
            spread_calls,
        }
    }
}

fn bpf_stats_note(f: &mut Fragment) {
    match sys::read_trim("/proc/sys/kernel/bpf_stats_enabled").as_deref() {
        Some("0") => f.note("bpf_stats_enabled was 0 (no per-run accounting overhead in these numbers)."),
        Some(v) => f.note(format!(
            "warning: kernel.bpf_stats_enabled = {v} during the run (someone else enabled it): every run includes two extra clock reads"
        )),
        None => {}
    }
}

// ---------------------------------------------------------------------------------------------
// B1

fn b1(args: &Args, bpffs: &PrivateBpffs) -> Result<Fragment> {
    let plan = Plan::of(args);
    let mut f = Fragment::new("B1", B1_TITLE);
    bpf_stats_note(&mut f);
    let noop = Loaded::noop(bpffs)?;
    let mut vis = Loaded::viscum(bpffs, "b1", 4 * B1_ENTRIES, Some(ROOMY_FLOW_TABLE))?;
    vis.fill((0..B1_ENTRIES).map(|i| key(IpAddr::V4(v4_entry(i)))))?;
    vis.fill((0..B1_ENTRIES).map(|i| key(IpAddr::V6(v6_entry(i)))))?;
    let flows = vis.has_flow_table();
    // New flows go to their own copy with the product's default flow-table size, so its LRU
    // churn never evicts the established flows the other rows rely on.
    let ins = if flows {
        let mut l = Loaded::viscum(bpffs, "b1-insert", 4 * B1_ENTRIES, None)?;
        l.fill((0..B1_ENTRIES).map(|i| key(IpAddr::V4(v4_entry(i)))))?;
        Some(l)
    } else {
        None
    };

    let np = noop.prog()?;
    let hp = noop.named_prog("bench_hook")?;
    let vp = vis.prog()?;
    let hit_dst = v4_entry(B1_ENTRIES / 2);
    let hit6_dst = v6_entry(B1_ENTRIES / 2);
    // Hits are packets of established connections (ACK) whose flow began at the edge: the
    // SYN of each went through first, as it does on the wire, so the flow table knows them.
    prewarm(
        vp,
        &[
            v4_tcp(CLIENT, hit_dst, 40_000, 80, TCP_SYN),
            v6_tcp(CLIENT6, hit6_dst, 40_000, 80, TCP_SYN),
        ],
    )?;
    prewarm(vp, &spread_packets(B1_ENTRIES, TCP_SYN, SPREAD_FLOWS))?;
    let pkts: Vec<(&str, &SchedClassifier, Vec<u8>, u32)> = vec![
        (
            "noop",
            np,
            v4_tcp(CLIENT, hit_dst, 40_000, 80, TCP_ACK),
            TC_ACT_OK,
        ),
        ("parse only (ARP)", vp, arp(), TC_ACT_OK),
        (
            "miss IPv4",
            vp,
            v4_tcp(CLIENT, Ipv4Addr::new(10, 200, 0, 1), 40_000, 80, TCP_ACK),
            TC_ACT_OK,
        ),
        (
            "miss IPv6",
            vp,
            v6_tcp(
                CLIENT6,
                Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1),
                40_000,
                80,
                TCP_ACK,
            ),
            TC_ACT_OK,
        ),
        (
            "hit IPv4",
            vp,
            v4_tcp(CLIENT, hit_dst, 40_000, 80, TCP_ACK),
            TC_ACT_REDIRECT,
        ),
        (
            "hit IPv6",
            vp,
            v6_tcp(CLIENT6, hit6_dst, 40_000, 80, TCP_ACK),
            TC_ACT_REDIRECT,
        ),
        // Appended (the indices above are used below): the common miss on a router, a
        // port no entry uses, which the port pre-filter rejects before any hashing.
        (
            "miss IPv4, unmanaged port",
            vp,
            v4_tcp(CLIENT, Ipv4Addr::new(10, 200, 0, 1), 40_000, 443, TCP_ACK),
            TC_ACT_OK,
        ),
        (
            "miss IPv6, unmanaged port",
            vp,
            v6_tcp(
                CLIENT6,
                Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1),
                40_000,
                443,
                TCP_ACK,
            ),
            TC_ACT_OK,
        ),
        // The floor of the mechanism: bpf_redirect_peer alone, no parsing or lookup. An
        // established hit's cost over this row is what Viscum's own work adds.
        (
            "hook (bench_hook: bpf_redirect_peer only)",
            hp,
            v4_tcp(CLIENT, hit_dst, 40_000, 80, TCP_ACK),
            TC_ACT_REDIRECT,
        ),
    ];
    let miss_spread = spread_packets(0, TCP_ACK, SPREAD_FLOWS);
    let hit_spread = spread_packets(B1_ENTRIES, TCP_ACK, SPREAD_FLOWS);
    let ip = ins.as_ref().map(Loaded::prog).transpose()?;

    let mut hot_samples: Vec<Vec<f64>> = vec![Vec::new(); pkts.len()];
    let mut hot_errors: Vec<Option<String>> = vec![None; pkts.len()];
    // spread: noop, miss, hit, (flow insert)
    let mut sp: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let mut sp_errors: Vec<Option<String>> = vec![None; 4];
    let mut last_hist: Option<Vec<u32>> = None;
    let mut next_flow = 0usize;
    let started = Instant::now();
    for round in 0..plan.rounds {
        sys::check_stop()?;
        // Alternate the order every round so drift does not favour whoever runs first.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..pkts.len()).collect()
        } else {
            (0..pkts.len()).rev().collect()
        };
        for i in order {
            let (_, prog, pkt, want) = &pkts[i];
            match hot(prog, pkt, plan.repeat, *want) {
                Ok(ns) => hot_samples[i].push(ns),
                Err(e) => hot_errors[i] = Some(format!("{e:#}")),
            }
        }
        let start = round * plan.spread_calls;
        let jobs: [(usize, &SchedClassifier, &[Vec<u8>], u32); 3] = [
            (0, np, &hit_spread, TC_ACT_OK),
            (1, vp, &miss_spread, TC_ACT_OK),
            (2, vp, &hit_spread, TC_ACT_REDIRECT),
        ];
        for (slot, prog, set, want) in jobs {
            match spread(prog, set, start, plan.spread_calls, want) {
                Ok((mean, hist)) => {
                    sp[slot].push(mean);
                    if slot == 2 {
                        last_hist = Some(hist);
                    }
                }
                Err(e) => sp_errors[slot] = Some(format!("{e:#}")),
            }
        }
        if let Some(ip) = ip {
            match spread_new_flows(ip, hit_dst, next_flow, plan.spread_calls, TC_ACT_REDIRECT) {
                Ok(mean) => sp[3].push(mean),
                Err(e) => sp_errors[3] = Some(format!("{e:#}")),
            }
            next_flow += plan.spread_calls;
        }
    }

    // Hot table: raw ns and ns over noop.
    let noop_hot = hot_samples[0].clone();
    let mut rows = Vec::new();
    for (i, (name, _, _, _)) in pkts.iter().enumerate() {
        if let Some(e) = &hot_errors[i] {
            rows.push(Row::failed(*name, e.clone()));
            continue;
        }
        let row = if i == 0 {
            Row::new(
                "noop (bench_noop, returns TC_ACT_OK)",
                "ns",
                hot_samples[0].clone(),
            )
            .note("reference")
        } else {
            let over = minus(&hot_samples[i], &noop_hot);
            let raw = report::Stat::of(&hot_samples[i])
                .map(|s| s.median)
                .unwrap_or(f64::NAN);
            let mut row =
                Row::new(format!("{name}, over noop"), "ns", over).note(format!("raw {raw:.0} ns"));
            if name.starts_with("miss") {
                row = row.target_value("≤ 30 ns", |v| v <= 30.0);
            } else if name.starts_with("hit") {
                row = row.target_value("≤ 60 ns", |v| v <= 60.0);
            }
            row
        };
        rows.push(row);
    }
    f.tables.push(Table {
        title: format!(
            "hot: one packet, repeat = {} per call, {} rounds",
            plan.repeat, plan.rounds
        ),
        rows,
    });

    let mut rows = Vec::new();
    let names = [
        "noop (bench_noop)",
        "miss IPv4",
        "hit IPv4",
        "hit IPv4 with flow-table insert (new flow per packet)",
    ];
    for (slot, name) in names.iter().enumerate() {
        if slot == 3 && !flows {
            continue;
        }
        if let Some(e) = &sp_errors[slot] {
            rows.push(Row::failed(*name, e.clone()));
            continue;
        }
        let row = if slot == 0 {
            Row::new(*name, "ns", sp[0].clone())
                .note("reference; includes the kernel's two timer reads per call")
        } else {
            let raw = report::Stat::of(&sp[slot])
                .map(|s| s.median)
                .unwrap_or(f64::NAN);
            let mut row = Row::new(format!("{name}, over noop"), "ns", minus(&sp[slot], &sp[0]))
                .note(format!("raw {raw:.1} ns"));
            row = match slot {
                1 => row.target_value("≤ 30 ns", |v| v <= 30.0),
                2 => row.target_value("≤ 60 ns", |v| v <= 60.0),
                _ => row,
            };
            row
        };
        rows.push(row);
    }
    f.tables.push(Table {
        title: format!(
            "spread: one run per call over {SPREAD_FLOWS} flows, {} calls per variant per round (mean below p99)",
            plan.spread_calls
        ),
        rows,
    });
    if !flows {
        f.note(format!(
            "hit with flow-table insert: not measured, the classifier object has no {FLOWS_MAP} map yet (issue 4); it is measured automatically once it does."
        ));
    } else {
        f.note("hit with flow-table insert: a TCP SYN of a never-seen flow (fresh source address/port) per call.");
    }
    f.note(format!(
        "map: {B1_ENTRIES} IPv4 + {B1_ENTRIES} IPv6 entries (TCP port 80, redirect flags {}: what `redirect add` gives on this kernel); packets are TCP ACKs of 54/74 bytes; miss = address not in the map (exact-port then all-ports lookup); miss, unmanaged port = TCP port 443, which no entry uses (rejected by the port pre-filter where the object has one).",
        redirect_flag_names(viscum::features::entry_redirect_flags())
    ));
    f.note("hot = the kernel's mean over repeat = 1e6 runs of one packet (all in cache); spread = one run per BPF_PROG_TEST_RUN call, a different flow every call.");

    f.tables.push(reply_table(bpffs, &args.run_id, &plan));
    f.note(format!(
        "reply program: in a namespace of its own, an AnyIP entry ({REPLY_CLOUD}:80) and a NAT entry ({REPLY_CLOUD_NAT}:80, served at {REPLY_SERVICE}) on host veth vh0, each with a flow opened by a SYN and an ACK through viscum_ingress; then a 54-byte TCP ACK back from the service, run on vh0 (__sk_buff.ifindex), forwarded to the client behind lan0 (permanent neighbour) by the reply cache's copy after the first call. One run per call: the program rewrites the packet (TTL, and the source in NAT mode), so a repeated run would not see the same packet twice."
    ));

    let bars: Vec<Bar> = f.tables[0].rows.iter().filter_map(Bar::from_row).collect();
    f.plots.push(Plot::Bars {
        file: "b1-hot".into(),
        title: "B1: ns per packet (hot), over noop".into(),
        unit: "ns".into(),
        bars,
    });
    if let Some(hist) = &last_hist {
        let v: Vec<f64> = hist.iter().map(|&x| f64::from(x)).collect();
        f.plots.push(Plot::Cdf {
            file: "b1-spread-hit-cdf".into(),
            title: "B1: hit IPv4, single-run durations (spread, last round, incl. timer)".into(),
            unit: "ns".into(),
            log_x: true,
            series: vec![Series {
                name: "hit IPv4".into(),
                points: report::cdf_points(&v),
            }],
        });
    }
    f.raw(
        "hot_ns",
        json!(
            pkts.iter()
                .enumerate()
                .map(|(i, p)| (p.0, &hot_samples[i]))
                .collect::<std::collections::BTreeMap<_, _>>()
        ),
    );
    f.raw(
        "spread_ns",
        json!({ "noop": sp[0], "miss_v4": sp[1], "hit_v4": sp[2], "hit_v4_flow_insert": sp[3] }),
    );
    f.raw("plan", json!({ "rounds": plan.rounds, "repeat": plan.repeat, "spread_calls_per_round": plan.spread_calls, "flow_table": flows }));
    f.raw("seconds", started.elapsed().as_secs_f64());
    // What B3 compares the in-kernel cost under load against.
    if let Some(s) = report::Stat::of(&hot_samples[4]) {
        f.raw("hit_v4_hot_raw_ns", s.median);
    }
    if let Some(s) = report::Stat::of(&sp[2]) {
        f.raw("hit_v4_spread_raw_ns", s.median);
    }
    if let Some(s) = report::Stat::of(&minus(&hot_samples[4], &hot_samples[0])) {
        f.raw("hit_v4_hot_net_ns", s.median);
    }
    Ok(f.finish())
}

// ---------------------------------------------------------------------------------------------
// B1: the reply program

/// The cloud address of the reply rows' AnyIP entry.
const REPLY_CLOUD: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// The cloud address of their NAT entry, and the service's own address it translates to.
const REPLY_CLOUD_NAT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);
const REPLY_SERVICE: Ipv4Addr = Ipv4Addr::new(169, 254, 128, 2);

/// Per round, the single-run mean (ns) of bench_noop and of viscum_reply on each reply.
struct ReplyRuns {
    noop: Vec<f64>,
    anyip: Vec<f64>,
    nat: Vec<f64>,
    calls: usize,
}

/// B1's reply table: what `viscum_reply` costs per packet on a reply of an established edge
/// flow, with and without the source rewrite, over bench_noop measured the same way. A
/// failure becomes the table's one row; the rest of B1 stands.
fn reply_table(bpffs: &PrivateBpffs, run_id: &str, plan: &Plan) -> Table {
    let title = |calls: usize| {
        format!(
            "reply: viscum_reply on a reply of an established edge flow, one run per call, {calls} calls per variant per round (mean below p99)"
        )
    };
    let r = match reply_runs(bpffs, run_id, plan) {
        Ok(r) => r,
        Err(e) => {
            return Table {
                title: title(plan.spread_calls),
                rows: vec![Row::failed("reply program", format!("{e:#}"))],
            };
        }
    };
    let over = |name: &str, v: &[f64]| {
        let raw = report::Stat::of(v).map(|s| s.median).unwrap_or(f64::NAN);
        Row::new(format!("{name}, over noop"), "ns", minus(v, &r.noop))
            .note(format!("raw {raw:.1} ns"))
            .target_value("≤ 120 ns", |v| v <= 120.0)
    };
    Table {
        title: title(r.calls),
        rows: vec![
            Row::new(
                "noop (bench_noop), same packet and device",
                "ns",
                r.noop.clone(),
            )
            .note("reference; includes the kernel's two timer reads per call"),
            over("reply, AnyIP (forwarded as it came)", &r.anyip),
            over("reply, NAT (source rewritten to the cloud address)", &r.nat),
        ],
    }
}

/// Builds the reply rows' namespace (client-facing `lan0` with the client as a permanent
/// neighbour, host veth `vh0`, forwarding on) and measures in it.
fn reply_runs(bpffs: &PrivateBpffs, run_id: &str, plan: &Plan) -> Result<ReplyRuns> {
    let name = format!("{run_id}-b1r");
    let _ns = netns::create(&name)?;
    for (a, b) in [("vh0", "vs0"), ("lan0", "lan1")] {
        netns::ip(&[
            "-n", &name, "link", "add", a, "type", "veth", "peer", "name", b,
        ])?;
    }
    for dev in ["vh0", "vs0", "lan0", "lan1"] {
        netns::ip(&["-n", &name, "link", "set", dev, "up"])?;
    }
    netns::ip(&["-n", &name, "addr", "add", "169.254.128.1/30", "dev", "vh0"])?;
    netns::ip(&["-n", &name, "addr", "add", "192.0.2.1/24", "dev", "lan0"])?;
    netns::neigh(&name, "lan0", &CLIENT.to_string(), "02:00:00:00:00:02")?;
    netns::sysctl(&name, "net/ipv4/ip_forward", "1")?;
    let dirs = (bpffs.subdir("b1-reply")?, bpffs.subdir("b1-reply-noop")?);
    let (rounds, calls) = (plan.rounds, plan.spread_calls);
    // The FIB lookups and the target checks act in the thread's namespace.
    viscum::netns::in_netns(&name, move || {
        reply_runs_here(&dirs.0, &dirs.1, rounds, calls)
    })
    .with_context(|| format!("cannot enter {name}"))?
}

/// [`reply_runs`], on a thread inside the namespace.
fn reply_runs_here(
    vis_dir: &Path,
    noop_dir: &Path,
    rounds: usize,
    calls: usize,
) -> Result<ReplyRuns> {
    // SAFETY: a NUL-terminated name; the call only reads it.
    let vh0 = unsafe { libc::if_nametoindex(c"vh0".as_ptr()) };
    if vh0 == 0 {
        bail!("no vh0 in the namespace");
    }
    let noop = Loaded::noop_in(noop_dir)?;
    let mut vis = Loaded::viscum_in(vis_dir, 64, None)?;
    load_prog(&mut vis.ebpf, REPLY_PROG)?;
    let flags = viscum::features::entry_redirect_flags();
    let anyip = ServiceEntry {
        stats_id: entry_stats_id(0),
        ..ServiceEntry::new(vh0, flags, [0x02, 0, 0, 0, 0, 0x53])
    };
    let nat = ServiceEntry {
        stats_id: entry_stats_id(1),
        flags: flags | TARGET_F_NAT,
        nat_addr: key(IpAddr::V4(REPLY_SERVICE)).addr,
        ..anyip
    };
    let entries = [
        (key(IpAddr::V4(REPLY_CLOUD)), anyip),
        (key(IpAddr::V4(REPLY_CLOUD_NAT)), nat),
    ];
    {
        let mut map = vis.services()?;
        for (k, v) in &entries {
            map.insert(k, v, 0)
                .context("cannot insert a reply-row entry")?;
        }
    }
    for (k, _) in &entries {
        vis.filter.manage_key(k);
    }
    vis.write_port_filter()?;

    // The flows, opened as on the wire (SYN, then the handshake's ACK); each its own client
    // port, as the edge records are keyed by the client's side and the veth.
    let mut opening = Vec::new();
    for (dst, port) in [(REPLY_CLOUD, 40_000), (REPLY_CLOUD_NAT, 40_001)] {
        for tcp_flags in [TCP_SYN, TCP_ACK] {
            opening.push(v4_tcp(CLIENT, dst, port, 80, tcp_flags));
        }
    }
    prewarm(vis.prog()?, &opening)?;
    let reply = vis.named_prog(REPLY_PROG)?;
    let np = noop.prog()?;
    let anyip_pkt = v4_tcp(REPLY_CLOUD, CLIENT, 80, 40_000, TCP_ACK);
    let nat_pkt = v4_tcp(REPLY_SERVICE, CLIENT, 80, 40_001, TCP_ACK);
    // struct __sk_buff up to `ifindex` (include/uapi/linux/bpf.h: offset 40); a test run
    // with an ifindex runs on that device (net/bpf/test_run.c), as a reply arriving on vh0.
    let mut skb = [0u8; 44];
    skb[40..44].copy_from_slice(&vh0.to_ne_bytes());
    let mut out = ReplyRuns {
        noop: Vec::new(),
        anyip: Vec::new(),
        nat: Vec::new(),
        calls,
    };
    for round in 0..rounds {
        sys::check_stop()?;
        let mut jobs: [(usize, &SchedClassifier, &[u8], u32); 3] = [
            (0, np, &anyip_pkt, TC_ACT_OK),
            (1, reply, &anyip_pkt, TC_ACT_REDIRECT),
            (2, reply, &nat_pkt, TC_ACT_REDIRECT),
        ];
        if round % 2 == 1 {
            jobs.reverse();
        }
        for (slot, prog, pkt, want) in jobs {
            let mean = single_runs(prog, pkt, &skb, calls, want)?;
            match slot {
                0 => out.noop.push(mean),
                1 => out.anyip.push(mean),
                _ => out.nat.push(mean),
            }
        }
    }
    Ok(out)
}

/// `calls` single runs of `pkt` (a fresh copy each) with context `ctx`; the mean below p99.
fn single_runs(
    prog: &SchedClassifier,
    pkt: &[u8],
    ctx: &[u8],
    calls: usize,
    want: u32,
) -> Result<f64> {
    let mut ns = Vec::with_capacity(calls);
    for i in 0..calls {
        ns.push(single_run(prog, pkt, Some(ctx), want, i)?);
    }
    Ok(trimmed_mean(&ns))
}

// ---------------------------------------------------------------------------------------------
// B2

fn b2(args: &Args, bpffs: &PrivateBpffs) -> Result<Fragment> {
    let plan = Plan::of(args);
    let mut f = Fragment::new("B2", B2_TITLE);
    bpf_stats_note(&mut f);
    let sizes: [u32; 4] = [1, 1_000, 100_000, 1_000_000];
    let noop = Loaded::noop(bpffs)?;
    let mut loaded = Vec::new();
    let fill_start = Instant::now();
    for &n in &sizes {
        let mut l = Loaded::viscum(bpffs, &format!("b2-{n}"), n, Some(ROOMY_FLOW_TABLE))?;
        l.fill((0..n).map(|i| key(IpAddr::V4(v4_entry(i)))))?;
        prewarm(
            l.prog()?,
            &[v4_tcp(CLIENT, v4_entry(n / 2), 40_000, 80, TCP_SYN)],
        )?;
        prewarm(l.prog()?, &spread_packets(n, TCP_SYN, WIDE_FLOWS))?;
        loaded.push(l);
    }
    f.note(format!(
        "filling the four maps took {:.1} s",
        fill_start.elapsed().as_secs_f64()
    ));
    let np = noop.prog()?;
    let progs: Vec<&SchedClassifier> = loaded.iter().map(Loaded::prog).collect::<Result<_>>()?;
    let hot_pkts: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&n| v4_tcp(CLIENT, v4_entry(n / 2), 40_000, 80, TCP_ACK))
        .collect();
    let spread_pkts: Vec<Vec<Vec<u8>>> = sizes
        .iter()
        .map(|&n| spread_packets(n, TCP_ACK, SPREAD_FLOWS))
        .collect();
    let wide_pkts: Vec<Vec<Vec<u8>>> = sizes
        .iter()
        .map(|&n| spread_packets(n, TCP_ACK, WIDE_FLOWS))
        .collect();

    // Slot k is the noop program (fed the N = 1 packets).
    let k = sizes.len();
    let mut hot_s: Vec<Vec<f64>> = vec![Vec::new(); k + 1];
    let mut sp_s: Vec<Vec<f64>> = vec![Vec::new(); k + 1];
    let mut wide_s: Vec<Vec<f64>> = vec![Vec::new(); k + 1];
    for round in 0..plan.rounds {
        sys::check_stop()?;
        let order: Vec<usize> = if round % 2 == 0 {
            (0..=k).collect()
        } else {
            (0..=k).rev().collect()
        };
        for i in order {
            let start = round * plan.spread_calls;
            let j = if i == k { 0 } else { i };
            let (prog, want) = if i == k {
                (np, TC_ACT_OK)
            } else {
                (progs[i], TC_ACT_REDIRECT)
            };
            hot_s[i].push(
                hot(prog, &hot_pkts[j], plan.repeat, want)
                    .with_context(|| format!("hot run, slot {i}"))?,
            );
            sp_s[i].push(
                spread(prog, &spread_pkts[j], start, plan.spread_calls, want)
                    .with_context(|| format!("spread run, slot {i}"))?
                    .0,
            );
            wide_s[i].push(
                spread(prog, &wide_pkts[j], start, plan.spread_calls, want)
                    .with_context(|| format!("wide run, slot {i}"))?
                    .0,
            );
        }
    }
    let label = |n: u32| match n {
        1 => "1".to_string(),
        1_000 => "1k".into(),
        100_000 => "100k".into(),
        1_000_000 => "1M".into(),
        n => n.to_string(),
    };
    let mut tables = Vec::new();
    let mut plot_series = Vec::new();
    for (mode, samples) in [("spread", &sp_s), ("wide", &wide_s), ("hot", &hot_s)] {
        let noop_s = &samples[k];
        let net: Vec<Vec<f64>> = (0..k).map(|i| minus(&samples[i], noop_s)).collect();
        let mut rows = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let raw = report::Stat::of(&samples[i])
                .map(|s| s.median)
                .unwrap_or(f64::NAN);
            let mut row = Row::new(
                format!("hit IPv4, {} entries, over noop", label(n)),
                "ns",
                net[i].clone(),
            )
            .ratio("1 entry", ratios(&net[i], &net[0]))
            .note(format!("raw {raw:.1} ns"));
            if n == 1_000_000 && mode == "spread" {
                row = row.target_ratio("≤ 2.5×", |r| r <= 2.5);
            }
            rows.push(row);
        }
        plot_series.push(Series {
            name: mode.to_string(),
            points: sizes
                .iter()
                .enumerate()
                .filter_map(|(i, &n)| report::Stat::of(&net[i]).map(|s| [f64::from(n), s.median]))
                .collect(),
        });
        let title = match mode {
            "spread" => format!(
                "spread: {SPREAD_FLOWS} flows over the whole map, one run per call (the B2 measure), {} rounds",
                plan.rounds
            ),
            "wide" => format!(
                "wide: {WIDE_FLOWS} flows over the whole map (working set grows with the map: cache and TLB misses), {} rounds",
                plan.rounds
            ),
            _ => format!(
                "hot: one packet, repeat = {} (everything cached), {} rounds",
                plan.repeat, plan.rounds
            ),
        };
        tables.push(Table { title, rows });
    }
    f.tables = tables;
    // Flat, not linear: from 1k to 1M entries (1000× more) the cost may grow by a cache miss
    // or two, not by anything proportional.
    if let (Some(a), Some(b)) = (
        report::Stat::of(&minus(&sp_s[1], &sp_s[k])),
        report::Stat::of(&minus(&sp_s[3], &sp_s[k])),
    ) {
        f.note(format!(
            "flatness: 1k → 1M entries (1000× more) changes the spread hit cost from {:.1} to {:.1} ns over noop ({:.2}×).",
            a.median,
            b.median,
            b.median / a.median
        ));
    }
    f.note("ratio = per-round (hit(N) − noop) / (hit(1) − noop); the target is judged on the spread table.");
    f.plots.push(Plot::Lines {
        file: "b2-scaling".into(),
        title: "B2: hit cost over noop vs entries".into(),
        x_label: "entries in the services map".into(),
        y_label: "ns per packet over noop".into(),
        log_x: true,
        log_y: false,
        series: plot_series,
    });
    f.raw("sizes", sizes);
    f.raw(
        "hot_ns",
        json!({ "per_size": &hot_s[..k], "noop": hot_s[k] }),
    );
    f.raw(
        "spread_ns",
        json!({ "per_size": &sp_s[..k], "noop": sp_s[k] }),
    );
    f.raw(
        "wide_ns",
        json!({ "per_size": &wide_s[..k], "noop": wide_s[k] }),
    );
    f.raw("plan", json!({ "rounds": plan.rounds, "repeat": plan.repeat, "spread_calls_per_round": plan.spread_calls }));
    Ok(f.finish())
}

/// `TARGET_F_*` redirect bits by name, for the report.
fn redirect_flag_names(flags: u32) -> String {
    let names: Vec<&str> = [(TARGET_F_PEER, "PEER"), (TARGET_F_SET_MAC, "SET_MAC")]
        .into_iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| name)
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join("|")
    }
}

// ---------------------------------------------------------------------------------------------
// B11

/// The programs `viscum attach` loads, in its order.
const ATTACH_PROGRAMS: [&str; 5] = [
    INGRESS_PROG,
    REPLY_PROG,
    ICMP_INGRESS_PROG,
    ICMP_REPLY_PROG,
    RECOVER_PROG,
];

/// B11: what the verifier costs. On this kernel: each program of the embedded object loaded
/// (`BPF_PROG_LOAD`: the verifier, then the JIT) as `viscum attach` loads it, once per round,
/// timed, with `verified_insns` from `bpf_prog_info`. On the other kernels: the VM kernel
/// matrix's last report (`target/vm/summary.json`, written by `cargo xtask vm` and `cargo
/// xtask test`), whose load times are `viscum attach`'s own (its log at level info) under
/// TCG emulation, so comparable within the matrix only.
fn b11(args: &Args, bpffs: &PrivateBpffs) -> Result<Fragment> {
    let plan = Plan::of(args);
    let mut f = Fragment::new("B11", B11_TITLE);
    let mut ms: Vec<Vec<f64>> = vec![Vec::new(); ATTACH_PROGRAMS.len()];
    let mut insns: Vec<Option<u32>> = vec![None; ATTACH_PROGRAMS.len()];
    let cpus = viscum::engine::cpus::cpu_regions()?;
    for round in 0..plan.rounds {
        sys::check_stop()?;
        let dir = bpffs.subdir(&format!("b11-{round}"))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .map_max_entries(FLOW_CACHE_MAP, flow_cache_entries(cpus))
            .map_max_entries(REPLY_CACHE_MAP, reply_cache_entries(cpus))
            .load(viscum::EBPF_OBJECT)
            .context("cannot load the embedded object")?;
        for (i, name) in ATTACH_PROGRAMS.iter().enumerate() {
            let started = Instant::now();
            load_prog(&mut ebpf, name)?;
            ms[i].push(started.elapsed().as_secs_f64() * 1e3);
            let prog: &SchedClassifier = ebpf
                .program(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            insns[i] = prog
                .info()
                .ok()
                .and_then(|i| i.verified_instruction_count());
        }
    }
    let kernel = viscum::features::kernel_release();
    let rows = ATTACH_PROGRAMS
        .iter()
        .zip(&ms)
        .zip(&insns)
        .map(|((name, ms), insns)| {
            Row::new(format!("load {name}"), "ms", ms.clone()).note(format!(
                "verified_insns {}",
                insns.map_or("n/a".into(), |n| n.to_string())
            ))
        })
        .collect();
    f.tables.push(Table {
        title: format!(
            "this kernel ({kernel}): BPF_PROG_LOAD per program, {} loads",
            plan.rounds
        ),
        rows,
    });
    f.raw("host_load_ms", &ms);
    f.raw("host_verified_insns", &insns);

    let summary = vm_summary_path();
    match std::fs::read(&summary) {
        Ok(bytes) => {
            let doc: serde_json::Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("cannot parse {}", summary.display()))?;
            let (table, notes) = vm_table(&doc);
            f.tables.push(table);
            for n in notes {
                f.note(n);
            }
            f.raw("vm_summary", doc);
        }
        Err(e) => f.note(format!(
            "no VM kernel matrix report at {} ({e}): run `cargo xtask vm` first for the other kernels",
            summary.display()
        )),
    }
    f.note("load = the wall time of BPF_PROG_LOAD (the verifier, then the JIT); verified_insns = the instructions the verifier processed (bpf_prog_info, 5.16+), the work that grows with the program and is bounded by tests/vm/budget.toml per VM kernel.");
    Ok(f.finish())
}

/// Where `cargo xtask vm` leaves its summary (`xtask/src/vm/mod.rs`, `work_dir`).
fn vm_summary_path() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("vm/summary.json")
}

/// The VM kernel matrix's programs as a table (one row per VM and program: its load time,
/// verified_insns and budget in the note) and notes on the report itself.
fn vm_table(doc: &serde_json::Value) -> (Table, Vec<String>) {
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let vms = doc["vms"].as_array().cloned().unwrap_or_default();
    for vm in &vms {
        let name = vm["vm"].as_str().unwrap_or("?");
        let release = vm["release"].as_str().unwrap_or("?");
        if vm["passed"].as_bool() != Some(true) {
            notes.push(format!("VM {name} ({release}) did not pass its checks"));
        }
        for line in vm["budget"].as_array().cloned().unwrap_or_default() {
            let program = line["program"].as_str().unwrap_or("?");
            let n = |v: &serde_json::Value| v.as_u64().map_or("n/a".into(), |n| n.to_string());
            let note = format!(
                "verified_insns {} (budget {}, {}); kernel {release}",
                n(&line["verified_insns"]),
                n(&line["budget"]),
                line["status"].as_str().unwrap_or("?")
            );
            let label = format!("{name}: load {program}");
            rows.push(match line["load_ms"].as_f64() {
                Some(ms) => Row::new(label, "ms", vec![ms]).note(note),
                None => Row::failed(label, format!("no load time reported; {note}")),
            });
        }
    }
    if vms.is_empty() {
        notes.push("the VM kernel matrix report lists no VMs".into());
    }
    notes.push("VM rows: one `viscum attach` per kernel under qemu TCG (emulated CPU), as the matrix runs it: the times compare programs and kernels within the matrix, not with this kernel's.".into());
    (
        Table {
            title: "VM kernel matrix (last `cargo xtask vm` report): viscum attach per program"
                .into(),
            rows,
        },
        notes,
    )
}
