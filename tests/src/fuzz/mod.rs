//! The packet fuzzer: generated frames ([`frames`]) through the *loaded* `viscum_ingress` and
//! `viscum_reply` with `BPF_PROG_TEST_RUN`, each verdict and written-back frame checked against
//! the reference model ([`model`]). `docs/fuzzing.md` describes what is generated, the model,
//! the properties and how to reproduce a seed.
//!
//! Setup happens once per run: `viscum attach` on the lab's client-facing interface, two
//! service namespaces, and the entries of `ENTRIES` through the real CLI. Then the frames
//! run in epochs of [`Options::epoch`] packets; at each epoch start the flow, reply and
//! fragment tables are emptied in the kernel and in the model, so the model's tables never
//! meet LRU eviction or a timeout (an epoch takes milliseconds; the shortest timeout, the
//! 10 s linger of a closed TCP flow, is checked against every epoch's wall time).
//!
//! # Properties checked on every frame
//!
//! * the action is a valid TC action and the model's (so nothing unparsable or unmatched is
//!   ever redirected, and nothing of ours is missed);
//! * the frame written back is exactly the model's: the input where nothing was rewritten,
//!   the predicted rewrites (NAT address/port, MSS, TTL, stripped VLAN tag, MAC) otherwise,
//!   byte for byte outside the checksum fields, with the same length;
//! * every checksum that was valid before a rewrite is valid after it (IPv4 header, TCP, UDP,
//!   ICMP, ICMPv6 over the pseudo-header, a quoted IPv4 header), recomputed from scratch.

pub mod frames;
pub mod model;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::{
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use viscum::{
    endpoint::Endpoint,
    engine::{Engine, Pins},
    netns,
};
use viscum_common::{FLOWS_MAP, FRAGS_MAP, FlowKey, FlowState, FragKey, REPLIES_MAP, ReplyKey};

use self::{
    frames::{Gen, Prog},
    model::{Entry, Kd, Model, Parsed, Prediction, Target},
};
use crate::{cases::error_chain, lab::Lab, packet::checksum};

/// One installed entry: its match, its namespace (0 or 1), local-route mode, and the model's
/// reading of the match.
struct Fixture {
    spec: &'static str,
    ns: usize,
    anyip: bool,
    proto: u8,
    addr: &'static str,
    plen: u8,
    ports: (u16, u16),
    from: Option<(&'static str, u8)>,
    cold: Cold,
}

/// Entries that send new flows to the cloud while their open flows stay at the edge.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cold {
    /// An ordinary entry.
    No,
    /// Drained (`viscum redirect drain`): `TARGET_F_DRAINING`.
    Drain,
    /// Still learning (`--learn-ms` far beyond the run): `active_after_ns` in the future.
    Learn,
}

/// `f` made a draining or learning entry.
const fn cold(mut f: Fixture, cold: Cold) -> Fixture {
    f.cold = cold;
    f
}

#[expect(
    clippy::too_many_arguments,
    reason = "one table row per call, read like the table"
)]
const fn fx(
    spec: &'static str,
    ns: usize,
    anyip: bool,
    proto: u8,
    addr: &'static str,
    plen: u8,
    ports: (u16, u16),
    from: Option<(&'static str, u8)>,
) -> Fixture {
    Fixture {
        spec,
        ns,
        anyip,
        proto,
        addr,
        plen,
        ports,
        from,
        cold: Cold::No,
    }
}

/// The entries: exact, all ports (and an exact port beating it into the other namespace),
/// port ranges, nested destination prefixes, source-restricted rules over a plain one, IPv6,
/// the local-route mode. Precedence-sensitive pairs go to different namespaces, so the
/// translated destination address shows which entry won.
const ENTRIES: [Fixture; 18] = [
    fx(
        "tcp://203.0.113.10:80",
        0,
        false,
        6,
        "203.0.113.10",
        32,
        (80, 80),
        None,
    ),
    fx(
        "udp://203.0.113.10:53",
        0,
        false,
        17,
        "203.0.113.10",
        32,
        (53, 53),
        None,
    ),
    fx(
        "tcp://203.0.113.11",
        0,
        false,
        6,
        "203.0.113.11",
        32,
        (1, 65535),
        None,
    ),
    fx(
        "tcp://203.0.113.11:443",
        1,
        false,
        6,
        "203.0.113.11",
        32,
        (443, 443),
        None,
    ),
    fx(
        "tcp://203.0.113.12:8000-8099",
        1,
        false,
        6,
        "203.0.113.12",
        32,
        (8000, 8099),
        None,
    ),
    fx(
        "tcp://203.0.113.13:80",
        0,
        true,
        6,
        "203.0.113.13",
        32,
        (80, 80),
        None,
    ),
    fx(
        "udp://203.0.113.20",
        1,
        false,
        17,
        "203.0.113.20",
        32,
        (1, 65535),
        None,
    ),
    fx(
        "tcp://203.0.113.128/25:443",
        0,
        false,
        6,
        "203.0.113.128",
        25,
        (443, 443),
        None,
    ),
    fx(
        "tcp://203.0.113.0/24:400-500",
        1,
        false,
        6,
        "203.0.113.0",
        24,
        (400, 500),
        None,
    ),
    fx(
        "tcp://203.0.113.64/26:22?from=192.0.2.0/28",
        0,
        false,
        6,
        "203.0.113.64",
        26,
        (22, 22),
        Some(("192.0.2.0", 28)),
    ),
    fx(
        "tcp://203.0.113.64/26:20-30",
        1,
        false,
        6,
        "203.0.113.64",
        26,
        (20, 30),
        None,
    ),
    fx(
        "tcp://[2001:db8:e::10]:80",
        0,
        false,
        6,
        "2001:db8:e::10",
        128,
        (80, 80),
        None,
    ),
    fx(
        "udp://[2001:db8:e::10]:53",
        1,
        false,
        17,
        "2001:db8:e::10",
        128,
        (53, 53),
        None,
    ),
    fx(
        "tcp://[2001:db8:e:1::]/64:443",
        1,
        false,
        6,
        "2001:db8:e:1::",
        64,
        (443, 443),
        None,
    ),
    fx(
        "tcp://[2001:db8:e:2::]/64:22?from=2001:db8:c::/60",
        0,
        false,
        6,
        "2001:db8:e:2::",
        64,
        (22, 22),
        Some(("2001:db8:c::", 60)),
    ),
    // New flows to the cloud, open ones at the edge: a drained TCP entry, a learning UDP
    // entry, a drained IPv6 UDP entry (UDP cloud decisions are kept in VISCUM_FLOWS).
    cold(
        fx(
            "tcp://203.0.113.14:80",
            1,
            false,
            6,
            "203.0.113.14",
            32,
            (80, 80),
            None,
        ),
        Cold::Drain,
    ),
    cold(
        fx(
            "udp://203.0.113.14:53",
            0,
            false,
            17,
            "203.0.113.14",
            32,
            (53, 53),
            None,
        ),
        Cold::Learn,
    ),
    cold(
        fx(
            "udp://[2001:db8:e::13]:53",
            0,
            false,
            17,
            "2001:db8:e::13",
            128,
            (53, 53),
            None,
        ),
        Cold::Drain,
    ),
];

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The generator's seed.
    pub seed: u64,
    /// How many frames.
    pub packets: u64,
    /// Frames per epoch (tables emptied in between).
    pub epoch: u64,
    /// Print at most this many violations in full (all are counted).
    pub print_violations: u64,
}

impl Options {
    /// `packets` frames from `seed`, epochs of 8192.
    pub fn new(seed: u64, packets: u64) -> Options {
        Options {
            seed,
            packets,
            epoch: 8192,
            print_violations: 50,
        }
    }
}

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// The seed.
    pub seed: u64,
    /// Frames run.
    pub packets: u64,
    /// Frames per generator class.
    pub classes: BTreeMap<&'static str, u64>,
    /// Frames per (program, action).
    pub actions: BTreeMap<String, u64>,
    /// Frames whose verdict or output broke a property (kernel and model disagree).
    pub violations: u64,
    /// The first violations in full.
    pub examples: Vec<String>,
    /// Known-defect hits: frames where today's datapath (and so the model with
    /// [`Kd::CURRENT`]) acts although the documented semantics would pass; per defect, the
    /// count and the first frame's hex.
    pub known_defects: BTreeMap<&'static str, (u64, String)>,
    /// Frames the model does not cover (ICMP sent into the reply program), not checked.
    pub unmodelled: u64,
    /// Frames `BPF_PROG_TEST_RUN` refuses to run (see `test_run_refuses`).
    pub refused: u64,
    /// Epochs slower than half the shortest flow timeout (verdicts may then have aged).
    pub slow_epochs: u64,
    /// Wall time of the frames (setup excluded).
    pub elapsed: Duration,
}

impl Summary {
    /// A multi-line report: seed, counts, violations, wall time.
    pub fn report(&self) -> String {
        let mut s = String::new();
        let secs = self.elapsed.as_secs_f64();
        let _ = writeln!(
            s,
            "fuzz seed {} ({:#x}): {} packets in {:.1} s ({:.0} packets/s), {} violations",
            self.seed,
            self.seed,
            self.packets,
            secs,
            self.packets as f64 / secs.max(1e-9),
            self.violations
        );
        let _ = writeln!(s, "classes:");
        for (c, n) in &self.classes {
            let _ = writeln!(s, "  {c:<22} {n}");
        }
        let _ = writeln!(s, "verdicts:");
        for (c, n) in &self.actions {
            let _ = writeln!(s, "  {c:<22} {n}");
        }
        let _ = writeln!(
            s,
            "known datapath defects (model with Kd::CURRENT; see docs/fuzzing.md):"
        );
        for (k, (n, ex)) in &self.known_defects {
            let _ = writeln!(s, "  {k:<22} {n} frames, e.g. {ex}");
        }
        let _ = writeln!(
            s,
            "not checked: {} frames the kernel's test run refuses (IP frames shorter than the IP \
             header), {} unmodelled; slow epochs: {}",
            self.refused, self.unmodelled, self.slow_epochs
        );
        for e in &self.examples {
            let _ = writeln!(s, "VIOLATION {e}");
        }
        s
    }
}

fn ip16(s: &str) -> [u8; 16] {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => {
            let mut x = [0u8; 16];
            x[..4].copy_from_slice(&a.octets());
            x
        }
        Ok(IpAddr::V6(a)) => a.octets(),
        Err(_) => panic!("fixture address {s} does not parse"),
    }
}

/// Sets up namespaces and entries (the datapath must be attached to `lab.lan_if()`), and
/// returns the model with its entries and where the programs are.
fn setup(lab: &Lab) -> Result<(Model, Pins, u32, [String; 2]), String> {
    let pins = Pins::new(lab.bpffs.path());
    let names = [lab.service_ns_name(), lab.service_ns_name()];
    for ns in &names {
        lab.viscum_checked(&["ns", "add", ns])?;
    }
    for f in &ENTRIES {
        // Learning for ten minutes: longer than any run's epoch.
        let learn = if f.cold == Cold::Learn { "600000" } else { "0" };
        let mut args = vec![
            "redirect",
            "add",
            f.spec,
            "--ns",
            &names[f.ns],
            "--learn-ms",
            learn,
        ];
        if f.anyip {
            args.push("--anyip");
        }
        lab.viscum_checked(&args)?;
        if f.cold == Cold::Drain {
            lab.viscum_checked(&["redirect", "drain", f.spec])?;
        }
    }
    let engine =
        Engine::open(&pins).map_err(|e| format!("open the engine: {}", error_chain(&e)))?;
    let mut model = Model::default();
    for f in &ENTRIES {
        let ep: Endpoint = f
            .spec
            .parse()
            .map_err(|e| format!("fixture entry {} does not parse: {e}", f.spec))?;
        let v = engine
            .get(&ep)
            .map_err(|e| format!("read {}: {}", f.spec, error_chain(&e)))?
            .ok_or_else(|| format!("{} is not in the datapath's maps", f.spec))?;
        let nat = v.flags & viscum_common::TARGET_F_NAT != 0;
        let draining = v.flags & viscum_common::TARGET_F_DRAINING != 0;
        if nat == f.anyip || draining != (f.cold == Cold::Drain) {
            return Err(format!("{} has flags {:#x}", f.spec, v.flags));
        }
        let addr = ip16(f.addr);
        model.entries.push(Entry {
            name: f.spec.to_string(),
            proto: f.proto,
            family: if f.addr.contains(':') { 6 } else { 4 },
            addr,
            plen: f.plen,
            ports: f.ports,
            from: f.from.map(|(a, l)| (ip16(a), l)),
            cloud_new: f.cold != Cold::No,
            target: Target {
                ifindex: v.target.ifindex,
                flags: v.flags,
                mac: v.target.mac,
                nat: nat.then_some((v.target.nat_addr, u16::from_be(v.target.nat_port))),
            },
        });
    }
    model.reply_ifindex = lab.edge_ifindex(&netns::host_veth_name(&names[0]));
    let lan = lab.edge_ifindex(lab.lan_if());
    Ok((model, pins, lan, names))
}

/// Empties the kernel's flow, reply and fragment tables.
fn clear_maps(maps: &mut Maps) -> Result<(), String> {
    fn clear<const K: usize, const V: usize>(
        m: &mut HashMap<MapData, [u8; K], [u8; V]>,
    ) -> Result<(), String> {
        let keys: Vec<[u8; K]> = m.keys().filter_map(Result::ok).collect();
        for k in keys {
            m.remove(&k).map_err(|e| format!("clear a table: {e}"))?;
        }
        Ok(())
    }
    clear(&mut maps.flows)?;
    clear(&mut maps.replies)?;
    clear(&mut maps.frags)
}

const FK: usize = size_of::<FlowKey>();
const FV: usize = size_of::<FlowState>();
const RK: usize = size_of::<ReplyKey>();
const RV: usize = size_of::<viscum_common::ReplyState>();
const GK: usize = size_of::<FragKey>();
const GV: usize = size_of::<viscum_common::FragPorts>();

struct Maps {
    flows: HashMap<MapData, [u8; FK], [u8; FV]>,
    replies: HashMap<MapData, [u8; RK], [u8; RV]>,
    frags: HashMap<MapData, [u8; GK], [u8; GV]>,
}

fn open_maps(pins: &Pins) -> Result<Maps, String> {
    fn open<const K: usize, const V: usize>(
        path: PathBuf,
    ) -> Result<HashMap<MapData, [u8; K], [u8; V]>, String> {
        let data = MapData::from_pin(&path)
            .map_err(|e| format!("open {}: {}", path.display(), error_chain(&e)))?;
        HashMap::try_from(aya::maps::Map::from_map_data(data).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{}: {}", path.display(), error_chain(&e)))
    }
    Ok(Maps {
        flows: open(pins.map(FLOWS_MAP))?,
        replies: open(pins.map(REPLIES_MAP))?,
        frags: open(pins.map(FRAGS_MAP))?,
    })
}

/// The MTU of `ifname` in the current network namespace.
fn mtu_of(ifname: &str) -> Result<u32, String> {
    // SAFETY: plain socket/ioctl/close calls with a zeroed ifreq we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err("socket for SIOCGIFMTU".into());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in ifname.bytes().take(15).enumerate() {
            req.ifr_name[i] = b as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFMTU, &mut req);
        libc::close(fd);
        if rc < 0 {
            return Err(format!("SIOCGIFMTU {ifname}"));
        }
        Ok(req.ifr_ifru.ifru_mtu as u32)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// Runs the fuzzer against the datapath attached on `lab.lan_if()` (call `viscum attach`
/// first); `progress` gets a line now and then. Errors are setup failures; violations are in
/// the summary.
pub fn run(lab: &Lab, opts: Options, progress: &mut dyn FnMut(&str)) -> Result<Summary, String> {
    let (mut model, pins, lan, names) = setup(lab)?;
    let edge = lab.edge.name().to_string();
    let lan_name = lab.lan_if().to_string();
    progress(&format!(
        "fuzz: seed {} ({:#x}), {} packets, {} entries in 2 namespaces",
        opts.seed,
        opts.seed,
        opts.packets,
        model.entries.len()
    ));
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let handle = std::thread::spawn(move || {
        netns::in_netns(&edge, move || -> Result<Summary, String> {
            model.mtu = mtu_of(&lan_name)?;
            run_in_ns(&mut model, &pins, lan, opts, &tx)
        })
    });
    for line in rx {
        progress(&line);
    }
    let sum = handle
        .join()
        .map_err(|_| "the fuzz thread panicked".to_string())?
        .map_err(|e| format!("enter the edge namespace: {e}"))??;
    cleanup(lab, &names)?;
    Ok(sum)
}

fn open_prog(path: &PathBuf) -> Result<SchedClassifier, String> {
    SchedClassifier::from_pin(path).map_err(|e| {
        format!(
            "open the pinned program {}: {}",
            path.display(),
            error_chain(&e)
        )
    })
}

/// Would the documented semantics (`kd`) act on `f` at all, with the header the current
/// datapath sees (`cur`)?
fn acts_under(model: &Model, f: &[u8], prog: Prog, ifindex: u32, kd: Kd, cur: &Parsed) -> bool {
    match (model::parse(f, kd), cur) {
        (Parsed::L4(h), Parsed::L4(c)) => {
            (h.src, h.dst, h.sport, h.dport, h.proto, h.flags, h.frag)
                == (c.src, c.dst, c.sport, c.dport, c.proto, c.flags, c.frag)
        }
        (Parsed::Icmp(h), Parsed::Icmp(_)) => model::quoted(f, &h).is_some_and(|q| match prog {
            Prog::Ingress => {
                model.edge_entry_of(&q, h.family).is_some() && (kd.icmp_outer_dst || h.dst == q.src)
            }
            Prog::Reply => {
                let rkey = (q.src, q.sport, q.dport, q.proto, h.family, ifindex);
                model.replies.contains_key(&rkey)
            }
        }),
        _ => false,
    }
}

/// Names the known defects that make today's datapath act on `f` where the documented
/// semantics would pass it.
fn known_defects(model: &Model, f: &[u8], prog: Prog, ifindex: u32) -> Vec<&'static str> {
    let cur = model::parse(f, Kd::CURRENT);
    if acts_under(model, f, prog, ifindex, Kd::NONE, &cur) {
        return Vec::new();
    }
    let c = Kd::CURRENT;
    let each = [
        ("KD1-ip-length", Kd { ip_len: false, ..c }),
        (
            "KD2-short-l4-header",
            Kd {
                l4_short: false,
                ..c
            },
        ),
        (
            "KD3-icmp-other-family",
            Kd {
                icmp_family: false,
                ..c
            },
        ),
        (
            "KD4-ext-len-255",
            Kd {
                ext_len_255: false,
                ..c
            },
        ),
        (
            "KD5-icmp-outer-dst",
            Kd {
                icmp_outer_dst: false,
                ..c
            },
        ),
    ];
    let mut v: Vec<&'static str> = each
        .iter()
        .filter(|(_, kd)| !acts_under(model, f, prog, ifindex, *kd, &cur))
        .map(|(n, _)| *n)
        .collect();
    if v.is_empty() {
        v.push("KD-combined");
    }
    v
}

#[expect(clippy::too_many_lines, reason = "the run loop, spelled out")]
fn run_in_ns(
    model: &mut Model,
    pins: &Pins,
    lan: u32,
    opts: Options,
    tx: &std::sync::mpsc::Sender<String>,
) -> Result<Summary, String> {
    let ingress = open_prog(&pins.program())?;
    let reply = open_prog(&pins.reply_program())?;
    let mut maps = open_maps(pins)?;
    let mut generator = Gen::new(opts.seed);
    let mut sum = Summary {
        seed: opts.seed,
        ..Summary::default()
    };
    let mut out = vec![0u8; 8192];
    let start = Instant::now();
    let mut epoch_start = Instant::now();
    let mut last_progress = Instant::now();
    for i in 0..opts.packets {
        if i % opts.epoch == 0 {
            if i > 0 && epoch_start.elapsed() > Duration::from_secs(5) {
                sum.slow_epochs += 1;
            }
            clear_maps(&mut maps)?;
            model.clear();
            generator.clear();
            epoch_start = Instant::now();
        }
        let frame = generator.next(model);
        *sum.classes.entry(frame.class).or_default() += 1;
        let (prog, ifindex) = match frame.prog {
            Prog::Ingress => (&ingress, lan),
            Prog::Reply => (&reply, frame.ifindex.unwrap_or(model.reply_ifindex)),
        };
        let pred: Option<Prediction> = match frame.prog {
            Prog::Ingress => Some(model.ingress(&frame.bytes, Kd::CURRENT)),
            Prog::Reply => model.reply(&frame.bytes, ifindex, Kd::CURRENT),
        };
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let need = frame.bytes.len() + 256;
        if out.len() < need {
            out.resize(need, 0);
        }
        let r = match prog.test_run(TestRunOptions {
            data_in: Some(&frame.bytes),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        }) {
            Ok(r) => r,
            Err(_) if test_run_refuses(&frame.bytes) => {
                sum.refused += 1;
                continue;
            }
            Err(e) => {
                return Err(format!(
                    "BPF_PROG_TEST_RUN of packet {i} ({}, {} bytes: {}): {}",
                    frame.class,
                    frame.bytes.len(),
                    hex(&frame.bytes),
                    error_chain(&e)
                ));
            }
        };
        let action = r.return_value as i32;
        let got = &out[..(r.data_size_out as usize).min(out.len())];
        *sum.actions
            .entry(format!("{:?} {}", frame.prog, action_name(action)))
            .or_default() += 1;
        sum.packets += 1;
        let Some(pred) = pred else {
            sum.unmodelled += 1;
            continue;
        };
        let mut problems = Vec::new();
        if !matches!(action, -1..=8) {
            problems.push(format!("invalid TC action {action}"));
        }
        if action != pred.action {
            problems.push(format!(
                "kernel {} ({action}), model {} ({})",
                action_name(action),
                action_name(pred.action),
                pred.action
            ));
        } else {
            check_output(&frame.bytes, got, &pred, &mut problems);
        }
        if pred.action != model::UNSPEC {
            let kds = known_defects(model, &frame.bytes, frame.prog, ifindex);
            let only = kds.len() == 1;
            for kd in kds {
                let e = sum.known_defects.entry(kd).or_insert((0, String::new()));
                e.0 += 1;
                // The example: the first frame this defect alone explains, else the first.
                if e.1.is_empty() || (only && e.1.starts_with('+')) {
                    let mark = if only { "" } else { "+" };
                    e.1 = format!(
                        "{mark}packet {i} ({}, {}): {}",
                        frame.class,
                        action_name(pred.action),
                        hex(&frame.bytes)
                    );
                }
            }
        }
        if !problems.is_empty() {
            sum.violations += 1;
            if sum.violations <= opts.print_violations {
                let line = format!(
                    "seed {} packet {i} class {} prog {:?}: {}\n  in:  {}\n  out: {}",
                    opts.seed,
                    frame.class,
                    frame.prog,
                    problems.join("; "),
                    hex(&frame.bytes),
                    hex(got)
                );
                let _ = tx.send(format!("VIOLATION {line}"));
                sum.examples.push(line);
            }
        }
        if last_progress.elapsed() > Duration::from_secs(10) {
            last_progress = Instant::now();
            let _ = tx.send(format!(
                "fuzz: {} packets, {} violations, {:.0} packets/s",
                i + 1,
                sum.violations,
                (i + 1) as f64 / start.elapsed().as_secs_f64()
            ));
        }
    }
    sum.elapsed = start.elapsed();
    clear_maps(&mut maps)?;
    Ok(sum)
}

/// `BPF_PROG_TEST_RUN` refuses (`EINVAL`) an untagged IPv4/IPv6 frame shorter than the
/// fixed IP header (newer kernels check it before running the program), so such frames
/// cannot be run; they are counted, not checked. On the wire the classifier parses them as
/// malformed and passes them (the truncation cases just longer than the IP header cover that
/// path).
fn test_run_refuses(f: &[u8]) -> bool {
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 => f.len() < 14 + 20,
        0x86dd => f.len() < 14 + 40,
        _ => false,
    }
}

/// A name for a TC action.
pub fn action_name(action: i32) -> &'static str {
    crate::verdicts::action_name(action)
}

/// Compares the written-back frame with the prediction and verifies its checksums.
fn check_output(input: &[u8], got: &[u8], pred: &Prediction, problems: &mut Vec<String>) {
    let Some(want) = &pred.out else {
        return;
    };
    if got.len() != want.len() {
        problems.push(format!(
            "output length {} (input {}), model {}",
            got.len(),
            input.len(),
            want.len()
        ));
        return;
    }
    let shift = pred.sums.shift;
    let skip = |i: usize| {
        pred.free.iter().any(|&(a, b)| i >= a && i < b)
            || pred
                .csum_fields
                .iter()
                .any(|&c| c >= shift && (i == c - shift || i == c + 1 - shift))
    };
    let diff: Vec<usize> = (0..got.len())
        .filter(|&i| got[i] != want[i] && !skip(i))
        .collect();
    if !diff.is_empty() {
        problems.push(format!(
            "output differs from the model at bytes {:?}",
            &diff[..diff.len().min(16)]
        ));
    }
    let s = pred.sums;
    let check = |what: &str, ok_in: Option<bool>, ok_out: Option<bool>, p: &mut Vec<String>| {
        if ok_in == Some(true) && ok_out != Some(true) {
            p.push(format!(
                "{what} checksum valid before the rewrite, not after"
            ));
        }
    };
    if let Some(ip) = s.ip {
        check(
            "IPv4 header",
            ipv4_ok(input, ip),
            ipv4_ok(got, ip - shift),
            problems,
        );
    }
    if let Some(ip) = s.inner_ip {
        check(
            "quoted IPv4 header",
            ipv4_ok(input, ip),
            ipv4_ok(got, ip - shift),
            problems,
        );
    }
    if let Some((l3, l4, proto)) = s.l4 {
        check(
            "L4",
            l4_ok(input, l3, l4, proto),
            l4_ok(got, l3 - shift, l4 - shift, proto),
            problems,
        );
    }
}

fn ipv4_ok(f: &[u8], ip: usize) -> Option<bool> {
    let ihl = usize::from(*f.get(ip)? & 0xf) * 4;
    Some(checksum(&[f.get(ip..ip + ihl)?]) == 0)
}

/// Whether the TCP/UDP/ICMP/ICMPv6 checksum of the datagram at `l3` verifies (`None` when
/// it cannot be computed: truncated, inconsistent lengths).
fn l4_ok(f: &[u8], l3: usize, l4: usize, proto: u8) -> Option<bool> {
    let v = *f.get(l3)? >> 4;
    let end = if v == 4 {
        l3 + usize::from(u16::from_be_bytes([*f.get(l3 + 2)?, *f.get(l3 + 3)?]))
    } else {
        l3 + 40 + usize::from(u16::from_be_bytes([*f.get(l3 + 4)?, *f.get(l3 + 5)?]))
    };
    if end > f.len() || l4 > end {
        return None;
    }
    let seg = &f[l4..end];
    let min = match proto {
        6 => 20,
        17 => 8,
        _ => 4,
    };
    if seg.len() < min {
        return None;
    }
    if v == 4 && proto == 17 && seg[6] == 0 && seg[7] == 0 {
        return Some(true);
    }
    let len = seg.len();
    let sum = if v == 4 {
        if proto == 1 {
            checksum(&[seg])
        } else {
            let mut p = Vec::with_capacity(12);
            p.extend_from_slice(&f[l3 + 12..l3 + 20]);
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
            checksum(&[&p, seg])
        }
    } else {
        let mut p = Vec::with_capacity(40);
        p.extend_from_slice(&f[l3 + 8..l3 + 40]);
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, proto]);
        checksum(&[&p, seg])
    };
    Some(sum == 0)
}

/// Deletes the fixture entries and namespaces again.
fn cleanup(lab: &Lab, names: &[String; 2]) -> Result<(), String> {
    for f in &ENTRIES {
        lab.viscum_checked(&["redirect", "del", f.spec, "--now"])?;
    }
    for ns in names {
        lab.viscum_checked(&["ns", "del", ns])?;
    }
    Ok(())
}
