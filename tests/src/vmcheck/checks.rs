//! The runner's checks against one lab: load and attach, real traffic, and what detaching and
//! tearing down leave behind.

use std::{
    collections::BTreeSet,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use futures::TryStreamExt as _;
use netlink_packet_route::tc::TcAttribute;
use viscum::{engine::Pins, features::ProgramLoad, netns};

use crate::{
    cases::{CaseResult, run_case},
    identity::{IdentityServer, Proto, ask},
    lab::Lab,
};

/// How long `viscum attach` may take: under an emulated CPU the verifier alone runs for about
/// a minute on a large program and twice that when it finally rejects one.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(900);

/// How long a smoke-test client waits for an answer. Generous: under TCG everything is slow,
/// and a wrong answer (not a slow one) is what the test is after.
const ASK_TIMEOUT: Duration = Duration::from_secs(15);

/// The names the kernel gives the qdiscs `viscum` may add for its clsact attachments.
const CLSACT_KINDS: [&str; 2] = ["clsact", "ingress"];

/// Sizes of one pinned program, as `bpf_prog_info` reports them (`None`: the kernel does not
/// report it, or the program is not loaded).
#[derive(Debug, Clone, PartialEq)]
pub struct ProgramStats {
    /// The program's name in the object, e.g. [`viscum_common::INGRESS_PROG`].
    pub name: &'static str,
    /// Instructions the verifier processed (kernels >= 5.16).
    pub verified_insns: Option<u32>,
    /// Size of the program after the verifier's rewrites, in bytes.
    pub xlated_bytes: Option<u32>,
    /// Size of the JIT-compiled code in bytes; `None` without a JIT (s390x 6.1 interprets).
    pub jited_bytes: Option<u32>,
    /// How long `viscum attach` took to load it (the verifier, then the JIT), ms, as its log
    /// says ([`viscum::features::ProgramLoad`]); under emulation (TCG) only comparable with
    /// other programs and kernels of the same matrix. `None`: not in the log (the load
    /// failed, or a pin was reused).
    pub load_ms: Option<f64>,
}

impl ProgramStats {
    /// The program as an object of the report's `programs` list.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "verified_insns": self.verified_insns,
            "xlated_bytes": self.xlated_bytes,
            "jited_bytes": self.jited_bytes,
            "load_ms": self.load_ms,
        })
    }

    fn summary(&self) -> String {
        let n = |v: Option<u32>| v.map_or("n/a".to_string(), |v| v.to_string());
        format!(
            "{} verified_insns={} xlated={} jited={} load_ms={}",
            self.name,
            n(self.verified_insns),
            n(self.xlated_bytes),
            n(self.jited_bytes),
            self.load_ms
                .map_or("n/a".to_string(), |ms| format!("{ms:.0}"))
        )
    }
}

/// Reads the stats of the programs pinned under `pins` (all `None` for a missing pin): the two
/// classifiers first, then the ICMP programs they tail-call, which the verifier checks (and
/// bounds) separately.
pub fn program_stats(pins: &Pins) -> Vec<ProgramStats> {
    [
        (viscum_common::INGRESS_PROG, pins.program()),
        (viscum_common::REPLY_PROG, pins.reply_program()),
        (
            viscum_common::ICMP_INGRESS_PROG,
            pins.icmp_ingress_program(),
        ),
        (viscum_common::ICMP_REPLY_PROG, pins.icmp_reply_program()),
        (viscum_common::RECOVER_PROG, pins.recover_program()),
    ]
    .into_iter()
    .map(|(name, path)| {
        let info = SchedClassifier::from_pin(&path)
            .ok()
            .and_then(|p| p.info().ok());
        ProgramStats {
            name,
            verified_insns: info
                .as_ref()
                .and_then(aya::programs::ProgramInfo::verified_instruction_count),
            xlated_bytes: info
                .as_ref()
                .and_then(aya::programs::ProgramInfo::size_translated),
            jited_bytes: info
                .as_ref()
                .map(aya::programs::ProgramInfo::size_jitted)
                .filter(|&bytes| bytes > 0),
            load_ms: None,
        }
    })
    .collect()
}

/// What check (a) found.
pub struct Attached {
    /// The `attach` case: pass when `viscum attach` exited successfully.
    pub case: CaseResult,
    /// `viscum attach`'s standard output.
    pub stdout: String,
    /// The pinned programs' sizes, read even when the attach failed (`None` fields for a
    /// program not pinned).
    pub programs: Vec<ProgramStats>,
    /// Its standard error, line by line, when it failed (the verifier's last lines are in it).
    pub error_lines: Vec<String>,
}

/// Check (a): `viscum attach lan0` in the lab, then the pinned programs' sizes.
pub fn attach(lab: &Lab) -> Attached {
    let pins = Pins::new(lab.bpffs.path());
    let mut stdout = String::new();
    let mut error_lines = Vec::new();
    let mut programs = Vec::new();
    let case = run_case("attach", || {
        // At level info, the load of each program is logged with its duration.
        let out = lab.viscum_within(
            ATTACH_TIMEOUT,
            &["attach", lab.lan_if(), "--log-level", "info"],
        );
        stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let loads: Vec<ProgramLoad> = stderr.lines().filter_map(ProgramLoad::parse).collect();
        programs = program_stats(&pins);
        for p in &mut programs {
            p.load_ms = loads.iter().find(|l| l.name == p.name).map(|l| l.load_ms);
        }
        if !out.status.success() {
            error_lines = stderr.lines().map(str::to_string).collect();
            return Err(format!(
                "viscum attach {} failed ({}):\n{}",
                lab.lan_if(),
                out.status,
                stderr.trim_end()
            ));
        }
        let sizes: Vec<String> = programs.iter().map(ProgramStats::summary).collect();
        Ok(format!("{}; {}", stdout.trim(), sizes.join("; ")))
    });
    if programs.is_empty() {
        programs = program_stats(&pins);
    }
    Attached {
        case,
        stdout,
        programs,
        error_lines,
    }
}

/// Check (c): a service namespace with an identity server answering "edge", the cloud's
/// answering "cloud" on the same port; for TCP and UDP over IPv4 and IPv6 the client gets the
/// cloud, then (entry added) the edge, then (entry deleted) the cloud again. Returns
/// `smoke-setup` and one case per protocol and family, plus the service namespace, which stays
/// (with the reply classifier attached to its veth) for [`teardown`] to remove.
pub fn smoke(lab: &Lab, report: &mut dyn FnMut(&CaseResult)) -> (Vec<CaseResult>, Option<String>) {
    let mut results = Vec::new();
    let ns = lab.service_ns_name();
    let mut servers = None;
    let mut created = false;
    let setup = run_case("smoke-setup", || {
        let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
        lab.viscum_checked(&["ns", "add", &ns])?;
        created = true;
        let edge = IdentityServer::start(&ns, cloud.port(), "edge");
        let detail = format!("namespace {ns}, identity servers on port {}", cloud.port());
        servers = Some((cloud, edge));
        Ok(detail)
    });
    report(&setup);
    results.push(setup);
    let created = created.then(|| ns.clone());
    let Some((cloud, edge)) = &servers else {
        return (results, created);
    };
    let [v4, v6] = lab.cloud_addrs(cloud.port());
    for (name, proto, addr) in [
        ("smoke-tcp-v4", Proto::Tcp, v4),
        ("smoke-tcp-v6", Proto::Tcp, v6),
        ("smoke-udp-v4", Proto::Udp, v4),
        ("smoke-udp-v6", Proto::Udp, v6),
    ] {
        let r = run_case(name, || cutover(lab, &ns, proto, addr, edge));
        report(&r);
        results.push(r);
    }
    for (name, proto, addr) in [
        ("smoke-otherhost-tcp-v4", Proto::Tcp, v4),
        ("smoke-otherhost-udp-v6", Proto::Udp, v6),
    ] {
        let r = run_case(name, || otherhost(lab, &ns, proto, addr));
        report(&r);
        results.push(r);
    }
    (results, created)
}

/// How long the client waits for the answer that must not come (frames not addressed to the
/// edge, no entry): an answer, from the cloud, would come within a fraction of this even
/// under TCG.
const OTHERHOST_SILENCE: Duration = Duration::from_secs(3);

/// A MAC no interface of the lab has: the client's frames to its gateway carry it.
const NOT_THE_EDGES_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x00, 0xbe, 0xef];

/// A client whose frames reach the edge addressed to another MAC than `lan0`'s, as frames to
/// the gateway reach a bridge port whose own MAC is not the bridge's (a Wi-Fi interface under
/// `br-lan`): the kernel classifies them `PACKET_OTHERHOST`, which the service namespace's IP
/// layer drops unless the redirect makes them its own (kernels < 6.15 do not for a peer
/// redirect; the classifier marks them `PACKET_HOST`). Only the edge can answer: the edge
/// box's own stack drops such frames rather than route them to the cloud.
fn otherhost(lab: &Lab, ns: &str, proto: Proto, addr: SocketAddr) -> Result<String, String> {
    let scheme = match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    };
    let entry = format!("{scheme}://{addr}");
    let answer = lab
        .set_client_gateway_mac(Some(NOT_THE_EDGES_MAC))
        .map_err(|e| format!("cannot point the client's gateway at another MAC: {e}"))
        .and_then(|()| {
            // The frames really are someone else's: without the entry nobody answers (the
            // edge's own stack drops PACKET_OTHERHOST rather than route it to the cloud).
            if let Ok(who) = ask(lab.client.name(), proto, addr, OTHERHOST_SILENCE) {
                return Err(format!(
                    "without an entry, {who} answered {entry} through frames not addressed to \
                     lan0: they are not PACKET_OTHERHOST, the check proves nothing"
                ));
            }
            lab.viscum_checked(&["redirect", "add", &entry, "--ns", ns, "--learn-ms", "0"])?;
            ask(lab.client.name(), proto, addr, ASK_TIMEOUT).map_err(|e| {
                format!("the client asking {entry} through frames not addressed to lan0 got no answer: {e}")
            })
        });
    // Undone whatever happened, so the cases after this one see the usual LAN.
    let restored = lab
        .set_client_gateway_mac(None)
        .map_err(|e| format!("cannot restore the client's gateway neighbours: {e}"));
    let deleted = match lab.viscum_checked(&["redirect", "list"]) {
        Ok(list) if list.contains(&entry) => lab
            .viscum_checked(&["redirect", "del", &entry, "--now"])
            .map(drop),
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    let answer = answer?;
    restored?;
    deleted?;
    if answer != "edge" {
        return Err(format!(
            "{answer} answered {entry} through frames not addressed to lan0"
        ));
    }
    Ok(format!(
        "{entry}: frames to {NOT_THE_EDGES_MAC:02x?} (not lan0's MAC) served by the edge"
    ))
}

fn cutover(
    lab: &Lab,
    ns: &str,
    proto: Proto,
    addr: SocketAddr,
    edge: &IdentityServer,
) -> Result<String, String> {
    let scheme = match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    };
    let entry = format!("{scheme}://{addr}");
    let who = |when: &str| {
        ask(lab.client.name(), proto, addr, ASK_TIMEOUT)
            .map_err(|e| format!("{when}: the client asking {entry} got no answer: {e}"))
    };
    let before = who("before the entry")?;
    if before != "cloud" {
        return Err(format!("before the entry, {before} answered {entry}"));
    }
    let hits_before = match proto {
        Proto::Tcp => edge.tcp_hits(),
        Proto::Udp => edge.udp_hits(),
    };
    lab.viscum_checked(&["redirect", "add", &entry, "--ns", ns, "--learn-ms", "0"])?;
    let during = who("with the entry");
    let hits = match proto {
        Proto::Tcp => edge.tcp_hits(),
        Proto::Udp => edge.udp_hits(),
    } - hits_before;
    let deleted = lab.viscum_checked(&["redirect", "del", &entry, "--now"]);
    let during = during?;
    if during != "edge" {
        return Err(format!("with the entry, {during} answered {entry}"));
    }
    deleted?;
    let after = who("after redirect del")?;
    if after != "cloud" {
        return Err(format!("after redirect del, {after} answered {entry}"));
    }
    Ok(format!(
        "{entry}: cloud, then edge ({hits} request(s) served there), then cloud again"
    ))
}

/// Qdiscs of the kinds clsact attachments use, in namespace `ns`: `(interface, kind)`.
fn clsact_qdiscs(ns: &str) -> Result<Vec<(String, String)>, String> {
    let ns = ns.to_string();
    crate::guard::block_on(async move {
        let handle = netns::handle_in(&ns)
            .await
            .map_err(|e| format!("netlink in {ns}: {e}"))?;
        let links = netns::list_links(&handle)
            .await
            .map_err(|e| format!("list links in {ns}: {e}"))?;
        let qdiscs: Vec<_> = handle
            .qdisc()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| format!("dump qdiscs in {ns}: {e}"))?;
        let mut found = Vec::new();
        for q in qdiscs {
            let kind = q.attributes.iter().find_map(|a| match a {
                TcAttribute::Kind(k) => Some(k.clone()),
                _ => None,
            });
            if let Some(kind) = kind.filter(|k| CLSACT_KINDS.contains(&k.as_str())) {
                let ifname = links
                    .iter()
                    .find(|l| i64::from(l.index) == i64::from(q.header.index))
                    .map_or_else(|| format!("ifindex {}", q.header.index), |l| l.name.clone());
                found.push((ifname, kind));
            }
        }
        Ok(found)
    })
}

/// Every path under `dir` (recursively), relative to it, except the iterators the kernel's
/// `bpf_preload` puts in a fresh bpffs (`maps.debug`, `progs.debug`), which are not ours.
fn bpffs_leftovers(dir: &Path) -> Result<Vec<String>, String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), String> {
        let rd = fs::read_dir(dir).map_err(|e| format!("list {}: {e}", dir.display()))?;
        for entry in rd {
            let entry = entry.map_err(|e| format!("list {}: {e}", dir.display()))?;
            let path = entry.path();
            let rel = path
                .strip_prefix(base)
                .unwrap_or(&path)
                .display()
                .to_string();
            if dir == base && (rel == "maps.debug" || rel == "progs.debug") {
                continue;
            }
            out.push(rel);
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(base, &path, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    if dir.exists() {
        walk(dir, dir, &mut out)?;
    }
    out.sort();
    Ok(out)
}

/// Programs attached with TCX at ingress of `ifname` in namespace `ns`; `Ok(None)` on kernels
/// without TCX (< 6.6), where the query does not exist.
fn tcx_programs(ns: &str, ifname: &str) -> Result<Option<Vec<String>>, String> {
    if !kernel_at_least(6, 6) {
        return Ok(None);
    }
    let ifname = ifname.to_string();
    netns::in_netns(ns, move || {
        SchedClassifier::query_tcx(&ifname, TcAttachType::Ingress)
            .map(|(_, progs)| {
                Some(
                    progs
                        .iter()
                        .map(|p| format!("{} (id {})", p.name_as_str().unwrap_or("?"), p.id()))
                        .collect(),
                )
            })
            .map_err(|e| format!("query TCX programs on {ifname}: {e}"))
    })
    .map_err(|e| format!("enter {ns}: {e}"))?
}

/// Is the running kernel at least `major.minor`? (From `uname -r`; unparsable counts as new.)
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = super::uname().0;
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => true,
    }
}

/// Check (d), first half: `viscum detach lan0` leaves no link pin for `lan0`, no clsact
/// qdisc on it and (TCX kernels) no program attached to it.
pub fn detach(lab: &Lab) -> CaseResult {
    run_case("detach-leaves-nothing", || {
        let lan = lab.lan_if();
        let pins = Pins::new(lab.bpffs.path());
        let stdout = lab.viscum_checked(&["detach", lan])?;
        let mut problems = Vec::new();
        let link_pin = pins.link(lan);
        if link_pin.exists() {
            problems.push(format!(
                "the link pin {} is still there",
                link_pin.display()
            ));
        }
        let qdiscs: Vec<_> = clsact_qdiscs(lab.edge.name())?
            .into_iter()
            .filter(|(ifname, _)| ifname == lan)
            .collect();
        if !qdiscs.is_empty() {
            problems.push(format!("qdisc(s) left on {lan}: {qdiscs:?}"));
        }
        let tcx = tcx_programs(lab.edge.name(), lan)?;
        if let Some(progs) = &tcx
            && !progs.is_empty()
        {
            problems.push(format!("TCX program(s) still on {lan}: {progs:?}"));
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(format!(
            "{}; no link pin, no clsact qdisc{} on {lan}",
            stdout.trim(),
            if tcx.is_some() {
                ", no TCX program"
            } else {
                ""
            }
        ))
    })
}

/// Check (d), second half: after `viscum detach --all --purge` nothing of viscum is left in
/// its bpffs and no clsact qdisc on any interface of the edge namespace, service veths
/// included (the reply classifier is attached to them the same way); then `viscum ns del` of
/// the namespaces still there (`service_ns`) and the qdisc check once more.
pub fn teardown(lab: &Lab, service_ns: &[String]) -> CaseResult {
    run_case("teardown-leaves-nothing", || {
        let stdout = lab.viscum_checked(&["detach", "--all", "--purge"])?;
        leftovers(lab).map_err(|e| format!("after detach --all --purge: {e}"))?;
        for ns in service_ns {
            let veth = netns::host_veth_name(ns);
            if let Some(progs) = tcx_programs(lab.edge.name(), &veth)?
                && !progs.is_empty()
            {
                return Err(format!(
                    "after detach --all --purge, TCX program(s) still on {veth}: {progs:?}"
                ));
            }
        }
        for ns in service_ns {
            lab.viscum_checked(&["ns", "del", ns])?;
        }
        leftovers(lab).map_err(|e| format!("after ns del {service_ns:?}: {e}"))?;
        Ok(format!(
            "{}; bpffs empty and no clsact qdisc, before and after ns del {service_ns:?}",
            stdout.trim()
        ))
    })
}

/// After a *failed* attach: nothing may be left pinned (the issue's "a failed load leaves
/// nothing pinned") nor attached.
pub fn failed_attach_leftovers(lab: &Lab) -> CaseResult {
    run_case("failed-attach-leaves-nothing", || {
        leftovers(lab).map(|()| "bpffs empty, no clsact qdisc".to_string())
    })
}

fn leftovers(lab: &Lab) -> Result<(), String> {
    let dir: PathBuf = lab.bpffs.path().to_path_buf();
    let pins = bpffs_leftovers(&dir)?;
    let qdiscs = clsact_qdiscs(lab.edge.name())?;
    let mut problems = Vec::new();
    if !pins.is_empty() {
        problems.push(format!("left in the bpffs {}: {pins:?}", dir.display()));
    }
    if !qdiscs.is_empty() {
        problems.push(format!("qdiscs left in the edge namespace: {qdiscs:?}"));
    }
    let names: BTreeSet<&str> = pins
        .iter()
        .filter(|p| p.starts_with("VISCUM_"))
        .map(String::as_str)
        .collect();
    if !names.is_empty() {
        problems.push(format!("{} VISCUM_* map pin(s) among them", names.len()));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_listed_recursively() {
        let dir = std::env::temp_dir().join(crate::guard::unique_name("vmchk"));
        fs::create_dir_all(dir.join("links")).unwrap();
        fs::write(dir.join("links/lan0"), b"").unwrap();
        fs::write(dir.join("VISCUM_FLOWS"), b"").unwrap();
        fs::write(dir.join("maps.debug"), b"").unwrap();
        let left = bpffs_leftovers(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(left, ["VISCUM_FLOWS", "links", "links/lan0"]);
        assert!(
            bpffs_leftovers(&dir).unwrap().is_empty(),
            "a missing directory is empty"
        );
    }
}
