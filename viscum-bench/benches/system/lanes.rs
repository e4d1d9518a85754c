//! Lanes: one complete, isolated topology per variant, all built before the first
//! measurement and kept until the last, so the variants can be interleaved round by round.
//!
//! Every lane has its own namespaces, so addresses repeat across lanes and every client talks
//! to the same cloud address, `198.51.100.7`, whatever serves it:
//!
//! ```text
//! wire     C eth0 198.51.100.2 ───────────────────────────────── T eth0 198.51.100.7
//! route    C eth0 192.0.2.2 ── lan0 [E: forwarding] wan0 ─────── T eth0 198.51.100.7
//! noop     as route, plus bench_noop (returns TC_ACT_OK) at TC ingress of lan0
//! hook     C ── lan0 [E: bench_hook, bpf_redirect_peer of every frame] vs0 ── T (AnyIP)
//! viscum   C ── lan0 [E: viscum attach + redirect add --ns] vh-NAME ── T = viscum ns NAME
//! viscum-anyip  as viscum, with `redirect add --ns NAME --anyip` (no NAT: T answers as
//!          the cloud address, as in hook and tc-mirred; see below)
//! iptables C ── lan0 [E: nat PREROUTING DNAT to 10.77.0.2] vs0 ── T eth0 10.77.0.2
//! nft      C ── lan0 [E: ip daddr . tcp dport vmap { … : goto dnat }] vs0 ── T
//! tc-mirred C ── lan0 [E: tc flower + skbmod dmac + mirred egress redirect] vs0 ── T (AnyIP)
//!          (u32 + mirred where the kernel lacks flower/skbmod, see `flower`)
//! proxy    C ── lan0 [E: haproxy on 198.51.100.7 (or socat)] vs0 ── T eth0 10.77.0.2
//! ```
//!
//! B6 adds one *strict* topology that two lanes share, an OpenWrt-like edge with both a
//! cloud uplink and a Viscum service namespace (built by [`build_strict`]):
//!
//! ```text
//!                                             ┌ vh-NAME ── S = viscum ns NAME (edge copy)
//! strict   C eth0 192.0.2.2 ── lan0 [E: viscum attach lan0, strict firewall]
//!                                             └ wan0 ─── K eth0 198.51.100.7, 198.51.100.8 (cloud)
//! ```
//!
//! E's forward chain drops `ct state invalid` (nft `table inet`, hook forward, priority
//! filter), `nf_conntrack_tcp_loose = 0`, and `rp_filter = 1` on every interface, as the
//! tests' `harden` sets it up. `198.51.100.7:5201` (and the identity port) are redirected to
//! the edge copy (`redirect add --ns`, translated to the namespace's own address);
//! `198.51.100.8` is the same cloud server under an address Viscum has no entry for. The lane
//! `strict-edge` downloads from `.7` (served by the edge copy through the classifier and the
//! reply classifier), `strict-cloud` from `.8` (served by the cloud, forwarded normally by E
//! through the same firewall, a classifier miss at lan0 as on a real box).
//!
//! "AnyIP" = a `local 198.51.100.7/32 dev lo` route in T, as Viscum's own namespaces have. T
//! runs the RR/CRR/identity servers and `iperf3 -s`, pinned to the server CPU. Neighbours are
//! permanent entries (no ARP during runs, and none possible where every frame is redirected).
//! rp_filter is off in E (Viscum's reply path is measured by its own tests, not here).
//!
//! A lane with a fill carries that many unrelated entries/rules besides the service's own
//! (iptables: the service's rule comes *last*, as `iptables -A` leaves it).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TcAttachType},
};
use nix::sys::signal::Signal;
use viscum_common::{ServiceEntry, TARGET_F_PEER};
use viscum_lab::{Lab, Netns};

use crate::{
    support::{
        bpffs::PrivateBpffs,
        netns::{self, exec_in, ip, neigh, sysctl, veth},
        sys::{self, Proc},
    },
    tools::{self, CRR_PORT, IDENT_PORT, IPERF_PORT, RR_PORT},
    viscum_cli::Viscum,
};

/// The reference programs (noop, hook).
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/viscum-bench"));

/// Ports a lane serves (and Viscum redirects, iptables DNATs, ...).
pub const PORTS: [u16; 4] = [RR_PORT, CRR_PORT, IDENT_PORT, IPERF_PORT];

const MAC_C: &str = "02:bb:00:00:00:02";
const MAC_LAN: &str = "02:bb:00:00:00:01";
const MAC_WAN: &str = "02:bb:00:00:01:01";
const MAC_K: &str = "02:bb:00:00:01:07";
const MAC_VS: &str = "02:bb:00:00:02:01";
const MAC_S: &str = "02:bb:00:00:02:02";

/// What sits between client and server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Wire,
    Route,
    Noop,
    Hook,
    Viscum,
    /// Viscum in AnyIP mode (`--anyip`): no address translation either way, the mechanism
    /// hook and tc-mirred have; `viscum` is the default for `--ns`, NAT.
    ViscumAnyip,
    Iptables,
    Nft,
    Flower,
    Proxy,
    /// Download from the edge copy through the strict edge (built by [`build_strict`]).
    StrictEdge,
    /// Download from the cloud through the same strict edge (built by [`build_strict`]).
    StrictCloud,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Wire => "wire",
            Kind::Route => "route",
            Kind::Noop => "noop",
            Kind::Hook => "hook",
            Kind::Viscum => "viscum",
            Kind::ViscumAnyip => "viscum-anyip",
            Kind::Iptables => "iptables",
            Kind::Nft => "nft",
            Kind::Flower => "tc-mirred",
            Kind::Proxy => "proxy",
            Kind::StrictEdge => "strict-edge",
            Kind::StrictCloud => "strict-cloud",
        }
    }
}

/// A variant: kind plus the number of unrelated entries/rules it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    pub kind: Kind,
    pub fill: u32,
}

impl Spec {
    pub const fn new(kind: Kind, fill: u32) -> Spec {
        Spec { kind, fill }
    }

    /// "viscum", "iptables@10k".
    pub fn label(&self) -> String {
        match self.fill {
            0 => self.kind.name().to_owned(),
            n if n % 1000 == 0 => format!("{}@{}k", self.kind.name(), n / 1000),
            n => format!("{}@{n}", self.kind.name()),
        }
    }
}

/// A program whose bpf stats B3 reads: opened from viscum's pins, or one of ours.
pub enum Watched {
    Pinned {
        name: String,
        prog: Box<SchedClassifier>,
    },
    Own {
        name: &'static str,
    },
}

/// Cumulative bpf stats of one program.
#[derive(Clone, Debug)]
pub struct ProgStats {
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// A built lane. Fields drop in order: processes, programs, then namespaces.
pub struct Lane {
    pub spec: Spec,
    pub label: String,
    /// Client namespace.
    pub client: String,
    /// Namespace of the servers.
    pub target: String,
    /// Edge namespace (none for `wire`).
    pub edge: Option<String>,
    /// The proxy in use ("haproxy 2.6" / "socat").
    pub proxy: Option<String>,
    /// How the lane was realised, where that varies by machine (tc-mirred).
    pub note: Option<String>,
    /// Programs to read bpf stats from (viscum ingress/reply, noop, hook).
    pub watched: Vec<Watched>,
    /// Where the bulk benchmark's `iperf3 -c` connects ([`tools::CLOUD`] but for
    /// `strict-cloud`), and whether it downloads (`-R`: the server sends).
    pub iperf_addr: Ipv4Addr,
    pub download: bool,
    /// The identity probe that proves the lane is served by the right side, and the answer.
    pub ident: (SocketAddr, u8),
    /// The lane's Viscum maps, for counters around a run (strict lanes).
    pub engine: Option<viscum::engine::Engine>,
    /// Namespace whose strict firewall (`inet vbstrict forward`) counts drops.
    pub firewall: Option<String>,
    procs: Vec<Proc>,
    _progs: Option<Ebpf>,
    _namespaces: Vec<Netns>,
    /// The lab topology, where the lane is one (strict).
    _lab: Option<Lab>,
}

/// Everything lanes need from the run.
pub struct Env<'a> {
    pub run_id: &'a str,
    pub bpffs: &'a PrivateBpffs,
    pub viscum: &'a Viscum,
    /// This binary, to start servers with `__serve`.
    pub exe: PathBuf,
    /// Where config files go (haproxy).
    pub work: PathBuf,
}

impl Lane {
    /// Builds lane number `idx` for `spec`.
    pub fn build(env: &Env<'_>, idx: usize, spec: Spec) -> Result<Lane> {
        let base = format!("{}-{idx:02}", env.run_id);
        if matches!(spec.kind, Kind::StrictEdge | Kind::StrictCloud) {
            bail!("the strict lanes are built in pairs by build_strict");
        }
        let mut lane = Lane::blank(spec, &base);
        let c = lane.ns(&format!("{base}c"))?;
        sysctl(&c, "net/ipv4/ip_local_port_range", "1024 65535")?;
        if spec.kind == Kind::Wire {
            let t = lane.ns(&lane.target.clone())?;
            veth(&c, "eth0", MAC_C, &t, "eth0", MAC_K)?;
            ip(&["-n", &c, "addr", "add", "198.51.100.2/24", "dev", "eth0"])?;
            ip(&["-n", &t, "addr", "add", "198.51.100.7/24", "dev", "eth0"])?;
            neigh(&c, "eth0", "198.51.100.7", MAC_K)?;
            neigh(&t, "eth0", "198.51.100.2", MAC_C)?;
            lane.start_servers(env, &t)?;
            return Ok(lane);
        }
        let e = lane.ns(&format!("{base}e"))?;
        lane.edge = Some(e.clone());
        veth(&c, "eth0", MAC_C, &e, "lan0", MAC_LAN)?;
        ip(&["-n", &c, "addr", "add", "192.0.2.2/24", "dev", "eth0"])?;
        ip(&["-n", &e, "addr", "add", "192.0.2.1/24", "dev", "lan0"])?;
        ip(&["-n", &c, "route", "add", "default", "via", "192.0.2.1"])?;
        neigh(&c, "eth0", "192.0.2.1", MAC_LAN)?;
        neigh(&e, "lan0", "192.0.2.2", MAC_C)?;
        sysctl(&e, "net/ipv4/ip_forward", "1")?;
        for key in ["all", "default", "lan0"] {
            sysctl(&e, &format!("net/ipv4/conf/{key}/rp_filter"), "0")?;
        }

        match spec.kind {
            Kind::Wire | Kind::StrictEdge | Kind::StrictCloud => unreachable!("handled above"),
            Kind::Route | Kind::Noop => {
                let t = lane.ns(&lane.target.clone())?;
                veth(&e, "wan0", MAC_WAN, &t, "eth0", MAC_K)?;
                ip(&["-n", &e, "addr", "add", "198.51.100.1/24", "dev", "wan0"])?;
                ip(&["-n", &t, "addr", "add", "198.51.100.7/24", "dev", "eth0"])?;
                ip(&["-n", &t, "route", "add", "default", "via", "198.51.100.1"])?;
                neigh(&e, "wan0", "198.51.100.7", MAC_K)?;
                neigh(&t, "eth0", "198.51.100.1", MAC_WAN)?;
                if spec.kind == Kind::Noop {
                    lane.load_bench_prog(&e, "bench_noop", 0)?;
                }
                lane.start_servers(env, &t)?;
            }
            Kind::Viscum => lane.build_viscum(env, &e, &base, false)?,
            Kind::ViscumAnyip => lane.build_viscum(env, &e, &base, true)?,
            Kind::Hook | Kind::Iptables | Kind::Nft | Kind::Flower | Kind::Proxy => {
                let t = lane.ns(&lane.target.clone())?;
                veth(&e, "vs0", MAC_VS, &t, "eth0", MAC_S)?;
                ip(&["-n", &e, "addr", "add", "10.77.0.1/30", "dev", "vs0"])?;
                ip(&["-n", &t, "addr", "add", "10.77.0.2/30", "dev", "eth0"])?;
                ip(&["-n", &t, "route", "add", "default", "via", "10.77.0.1"])?;
                neigh(&e, "vs0", "10.77.0.2", MAC_S)?;
                neigh(&t, "eth0", "10.77.0.1", MAC_VS)?;
                sysctl(&e, "net/ipv4/conf/vs0/rp_filter", "0")?;
                match spec.kind {
                    Kind::Hook => {
                        ip(&[
                            "-n",
                            &t,
                            "route",
                            "add",
                            "local",
                            "198.51.100.7/32",
                            "dev",
                            "lo",
                        ])?;
                        let vs0 = ifindex_in(&e, "vs0")?;
                        lane.load_bench_prog(&e, "bench_hook", vs0)?;
                    }
                    Kind::Flower => {
                        ip(&[
                            "-n",
                            &t,
                            "route",
                            "add",
                            "local",
                            "198.51.100.7/32",
                            "dev",
                            "lo",
                        ])?;
                        self_note(&mut lane, flower(&e, &t)?);
                    }
                    Kind::Iptables => iptables(&e, spec.fill)?,
                    Kind::Nft => nft(&e, spec.fill)?,
                    Kind::Proxy => {
                        ip(&["-n", &e, "addr", "add", "198.51.100.7/32", "dev", "lo"])?;
                    }
                    _ => {}
                }
                lane.start_servers(env, &t)?;
                if spec.kind == Kind::Proxy {
                    lane.start_proxy(env, &e)?;
                }
            }
        }
        Ok(lane)
    }

    fn blank(spec: Spec, base: &str) -> Lane {
        Lane {
            spec,
            label: spec.label(),
            client: format!("{base}c"),
            target: format!("{base}t"),
            edge: None,
            proxy: None,
            note: None,
            watched: Vec::new(),
            iperf_addr: tools::CLOUD,
            download: false,
            ident: (tools::cloud(IDENT_PORT), b'T'),
            engine: None,
            firewall: None,
            procs: Vec::new(),
            _progs: None,
            _namespaces: Vec::new(),
            _lab: None,
        }
    }

    fn ns(&mut self, name: &str) -> Result<String> {
        let ns = netns::create(name)?;
        let n = ns.name().to_owned();
        self._namespaces.push(ns);
        Ok(n)
    }

    /// Loads `bench_noop`/`bench_hook` and attaches it at TC ingress of lan0 in `edge`.
    fn load_bench_prog(&mut self, edge: &str, name: &'static str, hook_ifindex: u32) -> Result<()> {
        let ebpf = viscum::netns::in_netns(edge, move || -> Result<Ebpf> {
            let mut ebpf = EbpfLoader::new()
                .override_global("HOOK_IFINDEX", &hook_ifindex, true)
                .load(BENCH_OBJECT)
                .context("cannot load the viscum-bench object")?;
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the kernel rejected {name}"))?;
            prog.attach("lan0", TcAttachType::Ingress)
                .with_context(|| format!("cannot attach {name} to lan0"))?;
            Ok(ebpf)
        })??;
        self.watched.push(Watched::Own { name });
        self._progs = Some(ebpf);
        Ok(())
    }

    /// The `viscum` lanes: `anyip` adds `--anyip` to every `redirect add` (no NAT).
    fn build_viscum(&mut self, env: &Env<'_>, e: &str, base: &str, anyip: bool) -> Result<()> {
        let pins = env.bpffs.subdir(&format!("{base}-viscum"))?;
        let v = env.viscum.with_bpffs(&pins);
        v.run(e, &["attach", "lan0"])?;
        // The service namespace: made by viscum itself, removed with the lane.
        let name = format!("{base}s");
        v.run(e, &["ns", "add", &name])?;
        self._namespaces.push(Netns::adopt(&name));
        self.target = name.clone();
        self.start_servers(env, &name)?;
        for port in PORTS {
            let target = format!("tcp://198.51.100.7:{port}");
            let mut args = vec!["redirect", "add", &target, "--ns", &name];
            if anyip {
                args.push("--anyip");
            }
            v.run(e, &args)?;
        }
        if self.spec.fill > 0 {
            let host = format!("vh-{name}");
            let ifindex = ifindex_in(e, &host)?;
            let mut engine = viscum::engine::Engine::open(&viscum::engine::Pins::new(&pins))?;
            for i in 0..self.spec.fill {
                let ep: viscum::endpoint::Endpoint =
                    format!("tcp://{}:80", filler_addr(i)).parse()?;
                engine.insert(&ep, ServiceEntry::new(ifindex, TARGET_F_PEER, [0; 6]))?;
            }
        }
        self.watch_viscum(&pins);
        Ok(())
    }

    /// Reads bpf stats of the classifier and the reply classifier pinned under `pins`.
    fn watch_viscum(&mut self, pins: &Path) {
        let p = viscum::engine::Pins::new(pins);
        for (label, path) in [
            ("viscum_ingress", p.program()),
            ("viscum_reply", p.reply_program()),
        ] {
            match SchedClassifier::from_pin(&path) {
                Ok(prog) => self.watched.push(Watched::Pinned {
                    name: label.into(),
                    prog: Box::new(prog),
                }),
                Err(e) => eprintln!("bench: {}: cannot open {}: {e}", self.label, path.display()),
            }
        }
    }

    /// RR/CRR/identity server and `iperf3 -s` in `ns`, pinned to the server CPU.
    fn start_servers(&mut self, env: &Env<'_>, ns: &str) -> Result<()> {
        self.start_servers_as(env, ns, None)
    }

    /// [`Lane::start_servers`]; with `Some(ident)`, only the identity server (answering
    /// `ident`) besides `iperf3 -s`.
    fn start_servers_as(&mut self, env: &Env<'_>, ns: &str, ident: Option<u8>) -> Result<()> {
        let mut cmd = sys::command_in_with(
            Some(ns),
            Some(sys::server_cpu()),
            Some(Signal::SIGKILL),
            &env.exe,
        )?;
        cmd.arg("__serve")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(c) = ident {
            cmd.args(["--ident", &(c as char).to_string(), "--ident-only"]);
        }
        let mut p = Proc::spawn(format!("{} servers", self.label), cmd)?;
        if ident.is_none() {
            p.wait_listening(CRR_PORT, Duration::from_secs(10))?;
            p.wait_listening(RR_PORT, Duration::from_secs(10))?;
        }
        p.wait_listening(IDENT_PORT, Duration::from_secs(10))?;
        self.procs.push(p);
        let mut cmd = sys::command_in_with(
            Some(ns),
            Some(sys::server_cpu()),
            Some(Signal::SIGKILL),
            "iperf3",
        )?;
        cmd.args([
            "-s",
            "-p",
            &IPERF_PORT.to_string(),
            "-A",
            &sys::server_cpu().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let mut p = Proc::spawn(format!("{} iperf3 -s", self.label), cmd)?;
        p.wait_listening(IPERF_PORT, Duration::from_secs(10))?;
        self.procs.push(p);
        Ok(())
    }

    /// haproxy (or socat when haproxy is missing) on the cloud address in `edge`, forwarding
    /// every port to the service namespace's own address.
    fn start_proxy(&mut self, env: &Env<'_>, edge: &str) -> Result<()> {
        if which("haproxy") {
            let mut cfg = String::from(
                "global\n    maxconn 8000\n    nbthread 1\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1m\n    timeout server 1m\n",
            );
            for port in PORTS {
                let _ = write!(
                    cfg,
                    "listen p{port}\n    bind 198.51.100.7:{port}\n    server s 10.77.0.2:{port}\n"
                );
            }
            let path = env.work.join(format!("{}-haproxy.cfg", self.target));
            std::fs::write(&path, cfg)
                .with_context(|| format!("cannot write {}", path.display()))?;
            let mut cmd = sys::command_in_with(Some(edge), None, Some(Signal::SIGKILL), "haproxy")?;
            cmd.arg("-db")
                .arg("-f")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut p = Proc::spawn(format!("{} haproxy", self.label), cmd)?;
            for port in PORTS {
                p.wait_listening(port, Duration::from_secs(10))?;
            }
            self.procs.push(p);
            self.proxy = Some(tool_version("haproxy", &["-v"]).unwrap_or_else(|| "haproxy".into()));
        } else if which("socat") {
            for port in PORTS {
                let mut cmd =
                    sys::command_in_with(Some(edge), None, Some(Signal::SIGKILL), "socat")?;
                cmd.args([
                    format!("TCP-LISTEN:{port},bind=198.51.100.7,reuseaddr,fork,backlog=1024"),
                    format!("TCP:10.77.0.2:{port},nodelay"),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
                let mut p = Proc::spawn(format!("{} socat {port}", self.label), cmd)?;
                p.wait_listening(port, Duration::from_secs(10))?;
                self.procs.push(p);
            }
            self.proxy = Some("socat (haproxy is not installed)".into());
        } else {
            bail!("neither haproxy nor socat is installed");
        }
        Ok(())
    }

    /// Current run time and count of every watched program (needs bpf stats enabled).
    pub fn prog_stats(&self) -> Vec<ProgStats> {
        let mut out = Vec::new();
        for w in &self.watched {
            let (name, info) = match w {
                Watched::Pinned { name, prog } => (name.clone(), prog.info()),
                Watched::Own { name } => {
                    let Some(p) = self._progs.as_ref().and_then(|e| e.program(name)) else {
                        continue;
                    };
                    let Ok(prog): Result<&SchedClassifier, _> = p.try_into() else {
                        continue;
                    };
                    ((*name).to_owned(), prog.info())
                }
            };
            if let Ok(info) = info {
                out.push(ProgStats {
                    name,
                    run_time_ns: info.run_time().as_nanos() as u64,
                    run_cnt: info.run_count(),
                });
            }
        }
        out
    }

    /// Fails if a server or proxy of this lane has died.
    pub fn check(&mut self) -> Result<()> {
        for p in &mut self.procs {
            p.check_alive()?;
        }
        Ok(())
    }

    /// The client reaches the lane's servers through the path under test.
    pub fn verify(&mut self) -> Result<()> {
        let (addr, want) = self.ident;
        let got = tools::ask(&self.client, addr)
            .with_context(|| format!("{}: the client gets no answer from {addr}", self.label))?;
        if got != want {
            bail!(
                "{}: {addr} answered by '{}' instead of '{}'",
                self.label,
                got as char,
                want as char
            );
        }
        self.check()
    }

    /// Viscum's global counters and the strict firewall's drop count now (what each lane
    /// has of them).
    pub fn counters(&self) -> Counters {
        Counters {
            viscum: self.engine.as_ref().and_then(|e| e.global_stats().ok()),
            invalid_drops: self
                .firewall
                .as_deref()
                .and_then(|ns| invalid_drops(ns).ok()),
        }
    }
}

/// Cumulative counters of a lane, read around each run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub viscum: Option<viscum::engine::GlobalStats>,
    /// Packets the strict edge's `ct state invalid` rule dropped.
    pub invalid_drops: Option<u64>,
}

/// The strict edge's forward chain: OpenWrt's fw4 default (`ct state invalid drop`), with a
/// counter, as the tests' `harden` loads it.
const STRICT_RULES: &str = "table inet vbstrict {\n chain forward {\n  type filter hook forward priority filter; policy accept;\n  ct state invalid counter drop\n }\n}\n";

/// Packets dropped so far by the strict firewall in `ns` (its counter).
fn invalid_drops(ns: &str) -> Result<u64> {
    let out = exec_in(
        ns,
        "nft",
        &["list", "chain", "inet", "vbstrict", "forward"],
        None,
        Duration::from_secs(10),
    )?;
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .context("no counter in the vbstrict forward chain")
}

const CLOUD_TWIN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);

/// The strict topology (see the module doc) as two lanes numbered `idx`: `strict-edge`
/// (owning client, edge and service namespace) and `strict-cloud` (owning the cloud).
pub fn build_strict(env: &Env<'_>, idx: usize) -> Result<(Lane, Lane)> {
    let base = format!("{}-{idx:02}", env.run_id);
    let mut edge_lane = Lane::blank(Spec::new(Kind::StrictEdge, 0), &base);
    let mut cloud_lane = Lane::blank(Spec::new(Kind::StrictCloud, 0), &base);
    // The lab of the tests and `cargo xtask run`; the lane keeps it (and removes it).
    let lab = netns::lab(env.bpffs, &base, &format!("{base}-viscum"))?;
    let (c, e, k) = (
        lab.client.name().to_owned(),
        lab.edge.name().to_owned(),
        lab.cloud.name().to_owned(),
    );
    let pins = lab.bpffs.path().to_owned();
    for l in [&mut edge_lane, &mut cloud_lane] {
        l.client = c.clone();
        l.edge = Some(e.clone());
        l.firewall = Some(e.clone());
        l.download = true;
    }

    // The cloud behind wan0, also under the twin address Viscum has no entry for.
    ip(&["-n", &k, "addr", "add", "198.51.100.8/24", "dev", "eth0"])?;
    let mac_k = netns::mac_of(&k, "eth0")?;
    neigh(&e, "wan0", "198.51.100.8", &mac_k)?;
    cloud_lane.target = k.clone();
    cloud_lane.start_servers_as(env, &k, Some(b'K'))?;
    cloud_lane.iperf_addr = CLOUD_TWIN;
    cloud_lane.ident = (
        SocketAddr::V4(SocketAddrV4::new(CLOUD_TWIN, IDENT_PORT)),
        b'K',
    );

    // Viscum on lan0, the edge copy in a namespace of its own.
    let v = env.viscum.with_bpffs(&pins);
    v.run(&e, &["attach", "lan0"])?;
    let name = format!("{base}s");
    lab.own_service_ns(&name);
    v.run(&e, &["ns", "add", &name])?;
    edge_lane.target = name.clone();
    edge_lane.start_servers_as(env, &name, Some(b'S'))?;
    for port in [IPERF_PORT, IDENT_PORT] {
        v.run(
            &e,
            &[
                "redirect",
                "add",
                &format!("tcp://198.51.100.7:{port}"),
                "--ns",
                &name,
            ],
        )?;
    }
    edge_lane.ident = (tools::cloud(IDENT_PORT), b'S');

    // Harden the edge (after the veths exist: rp_filter is per interface).
    exec_in(
        &e,
        "nft",
        &["-f", "-"],
        Some(STRICT_RULES.as_bytes()),
        Duration::from_secs(30),
    )
    .context("nft (apt-get install nftables)")?;
    sysctl(&e, "net/netfilter/nf_conntrack_tcp_loose", "0")?;
    let host = format!("vh-{name}");
    for key in ["all", "default", "lan0", "wan0", host.as_str()] {
        sysctl(&e, &format!("net/ipv4/conf/{key}/rp_filter"), "1")?;
    }

    for l in [&mut edge_lane, &mut cloud_lane] {
        l.engine = Some(viscum::engine::Engine::open(&viscum::engine::Pins::new(
            &pins,
        ))?);
        l.watch_viscum(&pins);
    }
    edge_lane._lab = Some(lab);
    Ok((edge_lane, cloud_lane))
}

/// Unrelated entry/rule `i`: 10.128.0.0/9, port 80.
pub fn filler_addr(i: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0x0a80_0000 + i)
}

/// ifindex of `dev` inside `ns`.
pub fn ifindex_in(ns: &str, dev: &str) -> Result<u32> {
    let d = dev.to_owned();
    viscum::netns::in_netns(ns, move || nix::net::if_::if_nametoindex(d.as_str()))?
        .with_context(|| format!("no interface {dev} in {ns}"))
}

fn self_note(lane: &mut Lane, note: String) {
    lane.note = Some(note);
}

/// The original proof of concept: `tc flower` matching the service, `skbmod` writing the
/// namespace veth's MAC, `mirred egress redirect` to the host-side veth. Kernels built
/// without cls_flower/act_skbmod (this project's CI VMs) get the same path from what they
/// have: `u32` for the match, and the namespace veth given lan0's MAC so that the frame,
/// whose destination MAC nobody rewrites, still arrives as PACKET_HOST.
fn flower(edge: &str, target: &str) -> Result<String> {
    exec_in(
        edge,
        "tc",
        &["qdisc", "add", "dev", "lan0", "clsact"],
        None,
        Duration::from_secs(10),
    )?;
    let mut batch = String::new();
    for port in PORTS {
        let _ = writeln!(
            batch,
            "filter add dev lan0 ingress protocol ip pref 10 flower ip_proto tcp dst_ip 198.51.100.7 dst_port {port} \
             action skbmod set dmac {MAC_S} pipe action mirred egress redirect dev vs0"
        );
    }
    let flower_err = match exec_in(
        edge,
        "tc",
        &["-batch", "-"],
        Some(batch.as_bytes()),
        Duration::from_secs(10),
    ) {
        Ok(_) => return Ok("tc flower + skbmod + mirred".into()),
        Err(e) => format!("{e:#}"),
    };
    let _ = exec_in(
        edge,
        "tc",
        &["filter", "del", "dev", "lan0", "ingress"],
        None,
        Duration::from_secs(10),
    );
    ip(&["-n", target, "link", "set", "eth0", "address", MAC_LAN])?;
    neigh(edge, "vs0", "10.77.0.2", MAC_LAN)?;
    let mut batch = String::new();
    for port in PORTS {
        let _ = writeln!(
            batch,
            "filter add dev lan0 ingress protocol ip pref 10 u32 match ip dst 198.51.100.7/32 match ip protocol 6 0xff \
             match ip dport {port} 0xffff action mirred egress redirect dev vs0"
        );
    }
    exec_in(
        edge,
        "tc",
        &["-batch", "-"],
        Some(batch.as_bytes()),
        Duration::from_secs(10),
    )
    .with_context(|| {
        format!(
            "neither flower ({}) nor u32 works",
            flower_err.lines().last().unwrap_or("")
        )
    })?;
    Ok("tc u32 + mirred: this kernel has no cls_flower/act_skbmod, so u32 matches and the service veth carries lan0's MAC instead of an skbmod rewrite".into())
}

/// The DNAT ruleset: `fill` unrelated rules, then the service's own (last, as `-A` puts it).
pub fn iptables_rules(fill: u32, with_service: bool) -> String {
    let mut r = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    for i in 0..fill {
        let _ = writeln!(
            r,
            "-A PREROUTING -d {}/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.77.0.2",
            filler_addr(i)
        );
    }
    if with_service {
        let ports: Vec<String> = PORTS.iter().map(u16::to_string).collect();
        let _ = writeln!(
            r,
            "-A PREROUTING -d 198.51.100.7/32 -p tcp -m multiport --dports {} -j DNAT --to-destination 10.77.0.2",
            ports.join(",")
        );
    }
    r.push_str("COMMIT\n");
    r
}

fn iptables(edge: &str, fill: u32) -> Result<()> {
    exec_in(
        edge,
        "iptables-restore",
        &["-w"],
        Some(iptables_rules(fill, true).as_bytes()),
        Duration::from_secs(300),
    )?;
    conntrack_tuning(edge);
    Ok(())
}

/// The nftables ruleset: a verdict map from (address, port) to a DNAT chain.
pub fn nft_ruleset(fill: u32, with_service: bool) -> String {
    let mut elems: Vec<String> = (0..fill)
        .map(|i| format!("{} . 80 : goto svc", filler_addr(i)))
        .collect();
    if with_service {
        elems.extend(
            PORTS
                .iter()
                .map(|p| format!("198.51.100.7 . {p} : goto svc")),
        );
    }
    let mut r = String::from(
        "table ip vbench {\n  chain svc {\n    dnat to 10.77.0.2\n  }\n  map services {\n    type ipv4_addr . inet_service : verdict\n",
    );
    if !elems.is_empty() {
        let _ = writeln!(r, "    elements = {{ {} }}", elems.join(", "));
    }
    r.push_str("  }\n  chain pre {\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr . tcp dport vmap @services\n  }\n}\n");
    r
}

fn nft(edge: &str, fill: u32) -> Result<()> {
    exec_in(
        edge,
        "nft",
        &["-f", "-"],
        Some(nft_ruleset(fill, true).as_bytes()),
        Duration::from_secs(300),
    )?;
    conntrack_tuning(edge);
    Ok(())
}

/// DNAT edges track every connection; CRR rounds open hundreds of thousands, and each
/// lingers 120 s in TIME_WAIT by default: shorten that (per namespace) so a full run stays
/// below nf_conntrack_max instead of dropping SYNs. Best effort.
fn conntrack_tuning(edge: &str) {
    if let Err(e) = sysctl(
        edge,
        "net/netfilter/nf_conntrack_tcp_timeout_time_wait",
        "10",
    ) {
        eprintln!("bench: cannot shorten conntrack TIME_WAIT in {edge}: {e:#}");
    }
}

pub fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// First line of `program ARGS` (stdout or stderr), e.g. "iperf 3.12".
pub fn tool_version(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_owned())
}
