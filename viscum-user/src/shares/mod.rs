//! Network shares: the client-facing link divided among edge services by weight, by the
//! kernel (`[engine.network]` and `[service.network]` of the daemon's configuration).
//!
//! # Design
//!
//! Each interface of `engine.interfaces` (where the classifier runs, and where the reply
//! classifier sends replies out to clients: its FIB lookup picks the interface that leads to
//! the client) gets an HTB qdisc `7663:` as the root of its egress:
//!
//! ```text
//! 7663:   htb, default 7663:2
//! └─ 7663:1      rate = ceil = link rate ([engine.network] rate)
//!    ├─ 7663:2   everything that is not an edge service's reply (other_share)
//!    ├─ 7663:10  service a: rate = link * share_a / total, ceil = link (or its max)
//!    └─ 7663:11  service b: ...
//! ```
//!
//! where `total` is `other_share` plus every service's `share`. Under contention each class
//! gets its rate; what an idle class leaves is lent to the busy ones in proportion to their
//! quanta, which are proportional to their shares too ([`QUANTUM_PER_SHARE`] bytes per unit
//! of share: a quantum below the largest packet, a 64 KiB GSO packet from the service's
//! stack, would make the division per packet instead of per byte). So two busy services of
//! shares 1 and 3 get a quarter and three quarters of the link, and either alone gets all of
//! it. `max` caps a service's ceiling.
//!
//! Packets reach their class without any user-space work per packet: the reply classifier
//! (`viscum_reply`) looks the service veth a reply arrived on up in `VISCUM_SHARES` (written
//! here: host-veth ifindex -> class handle) and sets `skb->priority` to the class handle as
//! it redirects the reply out of the client-facing interface. `bpf_redirect` keeps the
//! priority (net/core/filter.c, `__bpf_redirect` -> `dev_queue_xmit`), and HTB takes a
//! priority that names one of its leaf classes as the class (`htb_classify`). Replies the
//! reply classifier leaves to the kernel's forwarding (no route, fragmentation needed) have
//! their priority rewritten from the TOS byte by `ip_forward` and land in the default
//! class, with all other traffic.
//!
//! # Coexistence
//!
//! The HTB qdisc takes the root of the interface's egress. An interface whose root qdisc is
//! the kernel's default (`noqueue`, `pfifo_fast`, `mq`, or `noop` while it is down) gets it;
//! one with any other root qdisc (the router's own shaping, SQM) is refused with an error
//! naming that qdisc, before anything is changed, so Viscum never replaces shaping it did
//! not make. A root `7663:` HTB is Viscum's own (a daemon that was killed) and is rebuilt.
//! The daemon deletes its qdiscs when it stops or `[engine.network]` is removed, and the
//! kernel puts its default back.

mod htb;
mod rate;

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
};

use aya::maps::{HashMap, Map, MapData};
pub use htb::{
    ClassParams, RootQdisc, add_qdisc, classes, del_class, del_qdisc, root_qdisc, set_class,
};
pub use rate::Rate;
use rtnetlink::packet_route::tc::TcHandle;
use viscum_common::SHARES_MAP;

use crate::{engine::Pins, netns};

/// Handle major of Viscum's HTB qdisc (`7663:`, "vc" in ASCII): how a daemon recognises the
/// qdisc a predecessor left.
pub const HTB_MAJOR: u16 = 0x7663;
/// The class under the qdisc holding the whole link (`7663:1`).
pub const ROOT_MINOR: u16 = 1;
/// The class of everything that is not a service's reply (`7663:2`, the qdisc's default).
pub const DEFAULT_MINOR: u16 = 2;
/// The first service class (`7663:10`).
pub const FIRST_SERVICE_MINOR: u16 = 0x10;
/// The largest `share`: with quanta of [`QUANTUM_PER_SHARE`] bytes per unit, a share of 100
/// may send 6.4 MiB of borrowed bandwidth per round.
pub const MAX_SHARE: u32 = 100;
/// Bytes of DRR quantum per unit of share: one 64 KiB GSO packet.
pub const QUANTUM_PER_SHARE: u32 = 65_536;
/// Root qdiscs the kernel attaches by itself, which Viscum may replace.
pub const DEFAULT_QDISCS: &[&str] = &["noqueue", "pfifo_fast", "mq", "noop"];
/// The smallest bucket of a class: two 64 KiB GSO packets and a frame.
const MIN_BURST: u32 = 2 * 65_536 + 1_514;

/// `[engine.network]`: turns shares on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// The rate of each client-facing interface's egress (`rate = "100mbit"`): the most the
    /// HTB sends, so set it at or just below the link's real rate, where the queue is.
    pub rate: Rate,
    /// Weight of everything that is not an edge service's reply (`other_share`, default 1).
    pub other_share: u32,
}

/// `[service.network]`: the service's weight, and an optional cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceNetwork {
    /// Weight, 1 to [`MAX_SHARE`] (`share`, default 1).
    pub share: u32,
    /// Ceiling (`max = "20mbit"`); `None`: the whole link when the others are idle.
    pub max: Option<Rate>,
}

impl Default for ServiceNetwork {
    fn default() -> Self {
        ServiceNetwork {
            share: 1,
            max: None,
        }
    }
}

/// Why shares could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The interface's egress has a root qdisc Viscum did not make.
    #[error(
        "{iface} already has a root qdisc '{kind}' (handle {major:x}:), not the kernel's default: \
         network shares ([engine.network]) need the root of its egress for their HTB qdisc and \
         never replace shaping they did not make; remove it (tc qdisc del dev {iface} root) or \
         leave out [engine.network]"
    )]
    ForeignQdisc {
        /// The interface.
        iface: String,
        /// Its root qdisc's kind (`TCA_KIND`).
        kind: String,
        /// Its handle major.
        major: u16,
    },
    /// An rtnetlink request failed.
    #[error("{what}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// `VISCUM_SHARES` could not be opened or written.
    #[error("{what}")]
    Map {
        /// What was being done.
        what: String,
        /// aya's error.
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

impl From<netns::NetnsError> for ShareError {
    fn from(e: netns::NetnsError) -> Self {
        ShareError::Netlink {
            what: e.to_string(),
            source: io::Error::other(e),
        }
    }
}

/// One class of a [`plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedClass {
    /// Its minor under [`HTB_MAJOR`].
    pub minor: u16,
    /// Rate, ceiling, quantum, burst.
    pub params: ClassParams,
}

/// `skb->priority` that selects class `HTB_MAJOR:minor`.
pub const fn priority(minor: u16) -> u32 {
    ((HTB_MAJOR as u32) << 16) | minor as u32
}

/// `part / total` of `rate`, never below 8 bit/s (HTB refuses a zero rate).
fn portion(rate: Rate, part: u32, total: u32) -> Rate {
    // Rates are below 2^50 bit/s and shares at most 100 each: no overflow.
    let bits = rate.bits().saturating_mul(u64::from(part)) / u64::from(total.max(1));
    Rate::from_bits(bits.max(8))
}

fn burst(ceil: Rate) -> u32 {
    // 5 ms at the ceiling, and never less than two GSO packets.
    u32::try_from(ceil.bytes() / 200)
        .unwrap_or(u32::MAX)
        .max(MIN_BURST)
}

/// The leaf classes for `link` and services `(minor, network)`: the default class first,
/// then the services in the order given. Every rate is `link * share / total` (total: the
/// other share plus every service's), every ceiling the link (or the service's `max`), every
/// quantum `share * QUANTUM_PER_SHARE`.
pub fn plan(link: &LinkConfig, services: &[(u16, ServiceNetwork)]) -> Vec<PlannedClass> {
    let total = link.other_share + services.iter().map(|(_, s)| s.share).sum::<u32>();
    let leaf = |minor, share: u32, max: Option<Rate>| {
        let ceil = max.map_or(link.rate, |m| m.min(link.rate));
        PlannedClass {
            minor,
            params: ClassParams {
                rate: portion(link.rate, share, total).min(ceil),
                ceil,
                quantum: share.saturating_mul(QUANTUM_PER_SHARE),
                burst: burst(ceil),
            },
        }
    };
    let mut out = vec![leaf(DEFAULT_MINOR, link.other_share, None)];
    out.extend(services.iter().map(|(m, s)| leaf(*m, s.share, s.max)));
    out
}

/// The `[engine.network]` and `[service.network]` tables of the daemon's configuration
/// (see [`crate::config`]), read from the TOML table as it is: no serde types of their own,
/// which would each cost the router binary a monomorphised deserializer.
pub mod config {
    use super::{LinkConfig, MAX_SHARE, Rate, ServiceNetwork};

    /// A problem: (field under the table, message).
    pub type Problem = (String, String);

    /// How a value reads in a message, in TOML's terms (as serde's are rewritten for the
    /// rest of the file, `crate::config`).
    fn found(v: &toml::Value) -> String {
        match v {
            toml::Value::String(s) => format!("the string {s:?}"),
            toml::Value::Integer(n) => format!("the whole number {n}"),
            toml::Value::Float(f) => format!("the number {f}"),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Datetime(d) => format!("the date {d}"),
            toml::Value::Array(_) => "an array".into(),
            toml::Value::Table(_) => "a table".into(),
        }
    }

    /// Checks the keys of `table` against `valid`, reporting the others as serde words it
    /// elsewhere ("unknown key (valid keys: a or b)").
    fn unknown(table: &toml::Table, valid: [&str; 2], out: &mut Vec<Problem>) {
        for key in table.keys().filter(|k| !valid.contains(&k.as_str())) {
            out.push((
                format!("network.{key}"),
                format!("unknown key (valid keys: {} or {})", valid[0], valid[1]),
            ));
        }
    }

    fn share(table: &toml::Table, key: &str, out: &mut Vec<Problem>) -> u32 {
        let field = format!("network.{key}");
        match table.get(key) {
            None => 1,
            Some(toml::Value::Integer(n)) if (1..=i64::from(MAX_SHARE)).contains(n) => *n as u32,
            Some(toml::Value::Integer(n)) => {
                out.push((
                    field,
                    format!("{n} is not a share: a whole number from 1 to {MAX_SHARE} (a weight)"),
                ));
                1
            }
            Some(v) => {
                out.push((
                    field,
                    format!("expected a whole number, found {}", found(v)),
                ));
                1
            }
        }
    }

    fn rate(table: &toml::Table, key: &str, out: &mut Vec<Problem>) -> Option<Rate> {
        let field = format!("network.{key}");
        match table.get(key)? {
            toml::Value::String(t) => t.parse::<Rate>().map_err(|e| out.push((field, e))).ok(),
            v => {
                out.push((
                    field,
                    format!(
                        "expected a rate such as \"20mbit\" (a string in quotes), found {}",
                        found(v)
                    ),
                ));
                None
            }
        }
    }

    /// Validates `[engine.network]`; problems name `network.rate`, `network.other_share`.
    pub fn link(table: &toml::Table, out: &mut Vec<Problem>) -> Option<LinkConfig> {
        let before = out.len();
        unknown(table, ["rate", "other_share"], out);
        let other_share = share(table, "other_share", out);
        let rate = rate(table, "rate", out);
        if rate.is_none() && !table.contains_key("rate") {
            out.push((
                "network.rate".into(),
                "missing: the client-facing link's rate, such as \"100mbit\" (HTB needs it to \
                 divide the link)"
                    .into(),
            ));
        }
        (out.len() == before).then_some(LinkConfig {
            rate: rate?,
            other_share,
        })
    }

    /// Adds a problem for each service with a `[service.network]` table when the engine has
    /// no `[engine.network]`: shares divide a link whose rate Viscum must know.
    pub fn need_link(
        engine: Option<&crate::config::EngineConfig>,
        services: &[crate::config::ServiceConfig],
        out: &mut Vec<crate::config::Problem>,
    ) {
        let Some(engine) = engine else {
            return;
        };
        if engine.network.is_some() {
            return;
        }
        for s in services.iter().filter(|s| s.network.is_some()) {
            out.push(crate::config::Problem {
                scope: format!("service {}", s.name),
                field: "network".into(),
                message: "needs [engine.network] with the client-facing link's rate (rate = \
                          \"100mbit\"): shares divide that link"
                    .into(),
            });
        }
    }

    /// Validates `[service.network]`; problems name `network.share`, `network.max`.
    pub fn service(table: &toml::Table, out: &mut Vec<Problem>) -> ServiceNetwork {
        unknown(table, ["share", "max"], out);
        ServiceNetwork {
            share: share(table, "share", out),
            max: rate(table, "max", out),
        }
    }
}

/// The shares of one daemon: its HTB qdiscs and the `VISCUM_SHARES` entries it wrote.
#[derive(Debug)]
pub struct Shaper {
    link: LinkConfig,
    interfaces: Vec<String>,
    /// Class minor of each service, kept while the service is configured.
    minors: BTreeMap<String, u16>,
    /// What each interface (by ifindex) has, as last set.
    applied: BTreeMap<u32, Vec<PlannedClass>>,
}

/// `Err` naming the qdisc when `iface`'s root is neither the kernel's default nor ours.
async fn check_root(
    handle: &rtnetlink::Handle,
    iface: &str,
) -> Result<(u32, Option<RootQdisc>), ShareError> {
    let ifindex = netns::link_by_name(handle, iface).await?.index;
    let root = root_qdisc(handle, ifindex).await?;
    if let Some(q) = &root
        && !DEFAULT_QDISCS.contains(&q.kind.as_str())
        && !(q.kind == "htb" && q.major == HTB_MAJOR)
    {
        return Err(ShareError::ForeignQdisc {
            iface: iface.into(),
            kind: q.kind.clone(),
            major: q.major,
        });
    }
    Ok((ifindex, root))
}

impl Shaper {
    /// Checks that every interface of `interfaces` exists with the kernel's default root
    /// qdisc (or Viscum's own), without changing anything.
    ///
    /// # Errors
    /// [`ShareError::ForeignQdisc`] naming the first interface with another root qdisc;
    /// [`ShareError::Netlink`] if an interface does not exist or cannot be read.
    pub async fn check(interfaces: &[String]) -> Result<(), ShareError> {
        let handle = netns::handle_here().await?;
        for iface in interfaces {
            check_root(&handle, iface).await?;
        }
        Ok(())
    }

    /// Checks every interface first ([`Shaper::check`]), then puts an HTB qdisc with its
    /// root and default classes on each. Service classes come with [`Shaper::sync`].
    ///
    /// # Errors
    /// As [`Shaper::check`]; [`ShareError::Netlink`] if the kernel refuses the qdisc (what
    /// was added before is removed again).
    pub async fn install(link: LinkConfig, interfaces: &[String]) -> Result<Shaper, ShareError> {
        Shaper::check(interfaces).await?;
        let mut shaper = Shaper {
            link,
            interfaces: interfaces.to_vec(),
            minors: BTreeMap::new(),
            applied: BTreeMap::new(),
        };
        let handle = netns::handle_here().await?;
        for iface in interfaces {
            if let Err(e) = shaper.build(&handle, iface).await {
                shaper.remove_qdiscs().await;
                return Err(e);
            }
        }
        Ok(shaper)
    }

    /// The link settings in force.
    pub fn link(&self) -> LinkConfig {
        self.link
    }

    /// The interfaces shaped.
    pub fn interfaces(&self) -> &[String] {
        &self.interfaces
    }

    /// (Re)builds `iface`'s qdisc with its root and default classes.
    async fn build(&mut self, handle: &rtnetlink::Handle, iface: &str) -> Result<(), ShareError> {
        let (ifindex, root) = check_root(handle, iface).await?;
        if root.is_some_and(|q| q.kind == "htb" && q.major == HTB_MAJOR) {
            // A predecessor's: start from a clean qdisc.
            del_qdisc(handle, ifindex, HTB_MAJOR).await?;
        }
        add_qdisc(handle, ifindex, HTB_MAJOR, DEFAULT_MINOR).await?;
        let link = self.link.rate;
        set_class(
            handle,
            ifindex,
            HTB_MAJOR,
            ROOT_MINOR,
            TcHandle {
                major: HTB_MAJOR,
                minor: 0,
            },
            ClassParams {
                rate: link,
                ceil: link,
                quantum: 0,
                burst: burst(link),
            },
        )
        .await?;
        let classes = plan(&self.link, &[]);
        self.apply(handle, ifindex, &classes, &[]).await?;
        self.applied.insert(ifindex, classes);
        log::info!(
            "network shares: HTB {HTB_MAJOR:x}: on {iface} at {link}, other traffic in {HTB_MAJOR:x}:{DEFAULT_MINOR:x}"
        );
        Ok(())
    }

    /// Sets `classes` on `ifindex` and deletes the service classes `stale`.
    async fn apply(
        &self,
        handle: &rtnetlink::Handle,
        ifindex: u32,
        classes: &[PlannedClass],
        stale: &[u16],
    ) -> Result<(), ShareError> {
        let parent = TcHandle {
            major: HTB_MAJOR,
            minor: ROOT_MINOR,
        };
        for c in classes {
            set_class(handle, ifindex, HTB_MAJOR, c.minor, parent, c.params).await?;
        }
        for minor in stale {
            del_class(handle, ifindex, HTB_MAJOR, *minor).await?;
        }
        Ok(())
    }

    /// Brings classes and `VISCUM_SHARES` in line with `services`: (name, network, its host
    /// veth's ifindex once its namespace exists). Rebuilds the qdisc of an interface that
    /// lost it (re-created). Cheap when nothing changed: one qdisc dump per interface and one
    /// read of the map.
    ///
    /// # Errors
    /// The first failure; what could be done is done.
    pub async fn sync(
        &mut self,
        pins: &Pins,
        services: &[(String, ServiceNetwork, Option<u32>)],
    ) -> Result<(), ShareError> {
        // Minors: kept per name; a new service takes the lowest free one.
        let names: BTreeSet<&str> = services.iter().map(|s| s.0.as_str()).collect();
        self.minors.retain(|n, _| names.contains(n.as_str()));
        for (name, _, _) in services {
            if !self.minors.contains_key(name) {
                let used: BTreeSet<u16> = self.minors.values().copied().collect();
                let minor = (FIRST_SERVICE_MINOR..=u16::MAX)
                    .find(|m| !used.contains(m))
                    .expect("fewer services than minors");
                self.minors.insert(name.clone(), minor);
            }
        }
        let wanted: Vec<(u16, ServiceNetwork)> = services
            .iter()
            .map(|(n, s, _)| (self.minors[n], *s))
            .collect();
        let classes = plan(&self.link, &wanted);

        let handle = netns::handle_here().await?;
        let mut first_err = None;
        // Class deletions wait until the map no longer names them.
        let mut pending = Vec::new();
        for iface in self.interfaces.clone() {
            let result = async {
                let (ifindex, root) = check_root(&handle, &iface).await?;
                let ours = root.is_some_and(|q| q.kind == "htb" && q.major == HTB_MAJOR);
                if !ours || !self.applied.contains_key(&ifindex) {
                    self.applied.retain(|i, _| *i != ifindex);
                    self.build(&handle, &iface).await?;
                }
                let before = self.applied.get(&ifindex).cloned().unwrap_or_default();
                if before != classes {
                    let keep: BTreeSet<u16> = classes.iter().map(|c| c.minor).collect();
                    let stale: Vec<u16> = before
                        .iter()
                        .map(|c| c.minor)
                        .filter(|m| !keep.contains(m))
                        .collect();
                    let changed: Vec<PlannedClass> = classes
                        .iter()
                        .filter(|c| !before.contains(c))
                        .copied()
                        .collect();
                    // The map first drops veths whose class is going (below), so classes
                    // are deleted only after; here only new and changed ones are set.
                    self.apply(&handle, ifindex, &changed, &[]).await?;
                    self.applied.insert(ifindex, classes.clone());
                    Ok::<_, ShareError>(Some((ifindex, stale)))
                } else {
                    Ok(None)
                }
            }
            .await;
            match result {
                Ok(Some((ifindex, stale))) => pending.push((ifindex, stale)),
                Ok(_) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }

        let want: BTreeMap<u32, u32> = services
            .iter()
            .filter_map(|(n, _, ifindex)| {
                Some((ifindex.filter(|i| *i != 0)?, priority(self.minors[n])))
            })
            .collect();
        if let Err(e) = write_map(pins, &want) {
            first_err.get_or_insert(e);
        }
        for (ifindex, stale) in pending {
            for minor in stale {
                if let Err(e) = del_class(&handle, ifindex, HTB_MAJOR, minor).await {
                    log::debug!("network shares: {e}");
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn remove_qdiscs(&mut self) {
        let Ok(handle) = netns::handle_here().await else {
            return;
        };
        for iface in &self.interfaces {
            let Ok(link) = netns::link_by_name(&handle, iface).await else {
                continue;
            };
            if let Ok(Some(q)) = root_qdisc(&handle, link.index).await
                && q.kind == "htb"
                && q.major == HTB_MAJOR
            {
                match del_qdisc(&handle, link.index, HTB_MAJOR).await {
                    Ok(()) => log::info!("network shares: removed HTB {HTB_MAJOR:x}: from {iface}"),
                    Err(e) => log::warn!("network shares: {e}"),
                }
            }
        }
        self.applied.clear();
    }

    /// Removes everything: the map's entries (replies keep their priority no more), then the
    /// qdiscs (the kernel puts its default back). Failures are logged.
    pub async fn remove(mut self, pins: &Pins) {
        if let Err(e) = write_map(pins, &BTreeMap::new()) {
            log::warn!("network shares: {e}");
        }
        self.remove_qdiscs().await;
    }
}

fn open_map(pins: &Pins) -> Result<HashMap<MapData, u32, u32>, ShareError> {
    let path = pins.map(SHARES_MAP);
    let err = |what: String| {
        move |source| ShareError::Map {
            what,
            source: Box::new(source),
        }
    };
    let data = MapData::from_pin(&path).map_err(err(format!(
        "cannot open {} (a datapath attached by an older viscum has none: attach again)",
        path.display()
    )))?;
    let map = Map::from_map_data(data).map_err(err(format!("cannot open {}", path.display())))?;
    HashMap::try_from(map).map_err(err(format!("{} has an unexpected layout", path.display())))
}

/// Makes `VISCUM_SHARES` hold exactly `want` (ifindex -> priority).
fn write_map(pins: &Pins, want: &BTreeMap<u32, u32>) -> Result<(), ShareError> {
    let mut map = open_map(pins)?;
    let err = |what: &str| {
        let what = what.to_owned();
        move |source| ShareError::Map {
            what,
            source: Box::new(source),
        }
    };
    let have: Vec<u32> = map.keys().filter_map(Result::ok).collect();
    for k in have {
        if !want.contains_key(&k) {
            map.remove(&k)
                .map_err(err(&format!("cannot remove veth {k} from {SHARES_MAP}")))?;
        }
    }
    for (k, v) in want {
        if map.get(k, 0).ok() != Some(*v) {
            map.insert(*k, *v, 0)
                .map_err(err(&format!("cannot write veth {k} into {SHARES_MAP}")))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(mbit: u64) -> LinkConfig {
        LinkConfig {
            rate: Rate::from_bits(mbit * 1_000_000),
            other_share: 1,
        }
    }

    #[test]
    fn rates_and_quanta_follow_shares() {
        let s = |share| ServiceNetwork { share, max: None };
        let classes = plan(&link(50), &[(0x10, s(1)), (0x11, s(3))]);
        assert_eq!(classes.len(), 3);
        assert_eq!(classes[0].minor, DEFAULT_MINOR);
        assert_eq!(classes[0].params.rate.bits(), 10_000_000);
        assert_eq!(classes[1].params.rate.bits(), 10_000_000);
        assert_eq!(classes[2].params.rate.bits(), 30_000_000);
        for c in &classes {
            assert_eq!(c.params.ceil.bits(), 50_000_000);
            assert!(c.params.burst >= MIN_BURST);
        }
        assert_eq!(classes[1].params.quantum * 3, classes[2].params.quantum);
        assert_eq!(priority(0x10), 0x7663_0010);
    }

    #[test]
    fn max_caps_ceiling_and_rate() {
        let classes = plan(
            &link(100),
            &[(
                0x10,
                ServiceNetwork {
                    share: 9,
                    max: Some(Rate::from_bits(20_000_000)),
                },
            )],
        );
        assert_eq!(classes[1].params.ceil.bits(), 20_000_000);
        assert_eq!(classes[1].params.rate.bits(), 20_000_000);
        // Above the link: the link.
        let classes = plan(
            &link(10),
            &[(
                0x10,
                ServiceNetwork {
                    share: 1,
                    max: Some(Rate::from_bits(20_000_000)),
                },
            )],
        );
        assert_eq!(classes[1].params.ceil.bits(), 10_000_000);
    }

    #[test]
    fn config_tables() {
        let t = |text: &str| text.parse::<toml::Table>().unwrap();
        let mut out = Vec::new();
        let l = config::link(&t("rate = \"50mbit\""), &mut out).unwrap();
        assert_eq!(l.rate.bits(), 50_000_000);
        assert_eq!(l.other_share, 1);
        assert!(out.is_empty());
        assert!(config::link(&t(""), &mut out).is_none());
        assert!(out[0].0 == "network.rate" && out[0].1.contains("missing"));
        out.clear();
        let s = config::service(&t("share = 0\nmax = \"20 furlongs\"\nburst = 1"), &mut out);
        assert_eq!(s.share, 1);
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out[0].1, "unknown key (valid keys: share or max)");
        assert!(out[1].1.contains("from 1 to 100"));
        assert!(out[2].1.contains("unknown unit"));
        out.clear();
        config::service(&t("share = \"big\"\nmax = 5"), &mut out);
        assert_eq!(
            out[0].1,
            "expected a whole number, found the string \"big\""
        );
        assert!(out[1].1.ends_with("found the whole number 5"), "{out:?}");
    }
}
