//! HTB qdiscs and classes through rtnetlink (`RTM_NEWQDISC`, `RTM_NEWTCLASS` and their
//! deletions), built from the kernel's own structures since netlink-packet-route has no HTB
//! options: `tc_htb_glob` in `TCA_HTB_INIT` for the qdisc, `tc_htb_opt` in `TCA_HTB_PARMS`
//! (with `TCA_HTB_RATE64`/`TCA_HTB_CEIL64` above 2^32 bytes per second) for a class
//! (include/uapi/linux/pkt_sched.h, net/sched/sch_htb.c). Rate tables (`TCA_HTB_RTAB`,
//! `TCA_HTB_CTAB`) are not sent: the kernel computes rates itself and reads the tables only
//! for a rate spec whose link layer is `TC_LINKLAYER_UNAWARE` (iproute2's old `tc`); ours say
//! Ethernet.

use futures::StreamExt as _;
use rtnetlink::{
    Handle,
    packet_core::{
        DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage,
        NetlinkPayload,
    },
    packet_route::{
        RouteNetlinkMessage,
        tc::{TcAttribute, TcHandle, TcMessage, TcOption},
    },
};

use super::{Rate, ShareError};

/// `TCA_HTB_PARMS`: a class's `tc_htb_opt`.
const TCA_HTB_PARMS: u16 = 1;
/// `TCA_HTB_INIT`: the qdisc's `tc_htb_glob`.
const TCA_HTB_INIT: u16 = 2;
/// `TCA_HTB_RATE64`: the class rate in bytes per second when it does not fit 32 bits.
const TCA_HTB_RATE64: u16 = 6;
/// `TCA_HTB_CEIL64`: the same for the ceiling.
const TCA_HTB_CEIL64: u16 = 7;
/// `TC_HTB_PROTOVER`, the `tc_htb_glob.version` the kernel insists on.
const HTB_PROTOVER: u32 = 3;
/// `TC_LINKLAYER_ETHERNET`: rates count the bytes of the packet as it is.
const LINKLAYER_ETHERNET: u8 = 1;
/// Nanoseconds per `psched` tick (`PSCHED_SHIFT` = 6): the unit of `buffer` and `cbuffer`.
const NS_PER_TICK: u64 = 1 << 6;

/// One HTB class: its rate and ceiling, burst, and DRR quantum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassParams {
    /// Guaranteed rate.
    pub rate: Rate,
    /// Most it may take by borrowing from its parent.
    pub ceil: Rate,
    /// Bytes a leaf sends per round when classes share what their parent lends
    /// (`tc_htb_opt.quantum`).
    pub quantum: u32,
    /// Bytes the class may send at once after being idle (both buckets).
    pub burst: u32,
}

/// What `tc qdisc show` would print for an interface's root qdisc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootQdisc {
    /// `TCA_KIND`: "noqueue", "pfifo_fast", "htb", ...
    pub kind: String,
    /// The qdisc's handle major (`1:` is 1).
    pub major: u16,
}

/// Sends `msg` with `NLM_F_REQUEST | flags`; the answers arrive on the stream.
fn request<W: Fn() -> String>(
    handle: &Handle,
    msg: RouteNetlinkMessage,
    flags: u16,
    what: &W,
) -> Result<impl futures::Stream<Item = NetlinkMessage<RouteNetlinkMessage>> + use<W>, ShareError> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | flags;
    handle
        .clone()
        .request(req)
        .map_err(|e| ShareError::Netlink {
            what: what(),
            source: std::io::Error::other(e),
        })
}

/// A netlink request that answers only with an acknowledgement (or an error).
async fn ack(
    handle: &Handle,
    msg: RouteNetlinkMessage,
    flags: u16,
    what: impl Fn() -> String,
) -> Result<(), ShareError> {
    let mut answers = request(handle, msg, NLM_F_ACK | flags, &what)?;
    while let Some(answer) = answers.next().await {
        if let NetlinkPayload::Error(err) = answer.payload
            && err.code.is_some()
        {
            return Err(ShareError::Netlink {
                what: what(),
                source: err.to_io(),
            });
        }
    }
    Ok(())
}

fn message(ifindex: u32, handle: TcHandle, parent: TcHandle) -> TcMessage {
    let mut m = TcMessage::default();
    m.header.index = ifindex as i32;
    m.header.handle = handle;
    m.header.parent = parent;
    m
}

/// The root qdisc of `ifindex` (every interface that is up has one: `noqueue` at least).
///
/// # Errors
/// [`ShareError::Netlink`] if the dump fails.
pub async fn root_qdisc(handle: &Handle, ifindex: u32) -> Result<Option<RootQdisc>, ShareError> {
    let what = || format!("cannot list the qdiscs of interface {ifindex}");
    let m = message(ifindex, TcHandle::default(), TcHandle::default());
    let msg = RouteNetlinkMessage::GetQueueDiscipline(m);
    let mut answers = request(handle, msg, NLM_F_DUMP, &what)?;
    let mut root = None;
    while let Some(answer) = answers.next().await {
        match answer.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewQueueDiscipline(q))
                if q.header.index == ifindex as i32 && q.header.parent == TcHandle::ROOT =>
            {
                let kind = q.attributes.iter().find_map(|a| match a {
                    TcAttribute::Kind(k) => Some(k.clone()),
                    _ => None,
                });
                root = Some(RootQdisc {
                    kind: kind.unwrap_or_default(),
                    major: q.header.handle.major,
                });
            }
            NetlinkPayload::Error(err) if err.code.is_some() => {
                return Err(ShareError::Netlink {
                    what: what(),
                    source: err.to_io(),
                });
            }
            _ => {}
        }
    }
    Ok(root)
}

/// Adds an HTB qdisc `major:` as the root of `ifindex`'s egress, sending unclassified
/// packets to class `major:default_minor`. Fails if the interface has a root qdisc other
/// than the kernel's default (the caller checks first and names it).
///
/// # Errors
/// [`ShareError::Netlink`] with the kernel's error.
pub async fn add_qdisc(
    handle: &Handle,
    ifindex: u32,
    major: u16,
    default_minor: u16,
) -> Result<(), ShareError> {
    let mut glob = Vec::with_capacity(20);
    for v in [HTB_PROTOVER, 10, u32::from(default_minor), 0, 0] {
        glob.extend_from_slice(&v.to_ne_bytes());
    }
    let mut m = message(ifindex, TcHandle { major, minor: 0 }, TcHandle::ROOT);
    m.attributes.push(TcAttribute::Kind("htb".into()));
    m.attributes.push(TcAttribute::Options(vec![TcOption::Other(
        DefaultNla::new(TCA_HTB_INIT, glob),
    )]));
    // NLM_F_CREATE without NLM_F_REPLACE: the kernel grafts a new root over its own default
    // one, and refuses (EEXIST) to replace a qdisc someone configured.
    ack(
        handle,
        RouteNetlinkMessage::NewQueueDiscipline(m),
        NLM_F_CREATE | NLM_F_EXCL,
        || format!("cannot add an HTB qdisc to interface {ifindex}"),
    )
    .await
}

/// Deletes the root qdisc `major:` of `ifindex`; the kernel puts its default back.
///
/// # Errors
/// [`ShareError::Netlink`] with the kernel's error (`ENOENT`: no such qdisc).
pub async fn del_qdisc(handle: &Handle, ifindex: u32, major: u16) -> Result<(), ShareError> {
    let m = message(ifindex, TcHandle { major, minor: 0 }, TcHandle::ROOT);
    ack(
        handle,
        RouteNetlinkMessage::DelQueueDiscipline(m),
        0,
        || format!("cannot delete the HTB qdisc of interface {ifindex}"),
    )
    .await
}

/// `tc_ratespec` for `rate` (its 32-bit field saturates; the 64-bit attribute then carries
/// the rate).
fn ratespec(rate: Rate) -> [u8; 12] {
    let mut r = [0u8; 12];
    r[1] = LINKLAYER_ETHERNET;
    let bytes = u32::try_from(rate.bytes()).unwrap_or(u32::MAX);
    r[8..12].copy_from_slice(&bytes.to_ne_bytes());
    r
}

/// The time to send `burst` bytes at `rate`, in psched ticks: how HTB sizes a bucket.
fn ticks(rate: Rate, burst: u32) -> u32 {
    // A u32 burst times 10^9 fits in 64 bits.
    let ns = u64::from(burst) * 1_000_000_000 / rate.bytes().max(1);
    u32::try_from(ns / NS_PER_TICK).unwrap_or(u32::MAX)
}

/// Creates class `major:minor` under `parent` (or changes it when it exists).
///
/// # Errors
/// [`ShareError::Netlink`] with the kernel's error.
pub async fn set_class(
    handle: &Handle,
    ifindex: u32,
    major: u16,
    minor: u16,
    parent: TcHandle,
    p: ClassParams,
) -> Result<(), ShareError> {
    let mut opt = Vec::with_capacity(44);
    opt.extend_from_slice(&ratespec(p.rate));
    opt.extend_from_slice(&ratespec(p.ceil));
    for v in [
        ticks(p.rate, p.burst),
        ticks(p.ceil, p.burst),
        p.quantum,
        0, // level: the kernel works it out
        0, // prio: every class the same, so only rates and quanta decide
    ] {
        opt.extend_from_slice(&v.to_ne_bytes());
    }
    let mut options = Vec::new();
    if p.rate.bytes() > u64::from(u32::MAX) {
        options.push(TcOption::Other(DefaultNla::new(
            TCA_HTB_RATE64,
            p.rate.bytes().to_ne_bytes().to_vec(),
        )));
    }
    if p.ceil.bytes() > u64::from(u32::MAX) {
        options.push(TcOption::Other(DefaultNla::new(
            TCA_HTB_CEIL64,
            p.ceil.bytes().to_ne_bytes().to_vec(),
        )));
    }
    options.push(TcOption::Other(DefaultNla::new(TCA_HTB_PARMS, opt)));
    let mut m = message(ifindex, TcHandle { major, minor }, parent);
    m.attributes.push(TcAttribute::Kind("htb".into()));
    m.attributes.push(TcAttribute::Options(options));
    ack(
        handle,
        RouteNetlinkMessage::NewTrafficClass(m),
        NLM_F_CREATE,
        || format!("cannot set HTB class {major:x}:{minor:x} on interface {ifindex}"),
    )
    .await
}

/// Deletes class `major:minor` (its queued packets go with it).
///
/// # Errors
/// [`ShareError::Netlink`] with the kernel's error.
pub async fn del_class(
    handle: &Handle,
    ifindex: u32,
    major: u16,
    minor: u16,
) -> Result<(), ShareError> {
    let m = message(ifindex, TcHandle { major, minor }, TcHandle::UNSPEC);
    ack(handle, RouteNetlinkMessage::DelTrafficClass(m), 0, || {
        format!("cannot delete HTB class {major:x}:{minor:x} on interface {ifindex}")
    })
    .await
}

/// The HTB classes of `ifindex` with their rates (`tc class show`): (class handle, rate,
/// ceiling), read back from each class's `TCA_HTB_PARMS` (and the 64-bit attributes).
///
/// # Errors
/// [`ShareError::Netlink`] if the dump fails.
pub async fn classes(
    handle: &Handle,
    ifindex: u32,
) -> Result<Vec<(TcHandle, Rate, Rate)>, ShareError> {
    let what = || format!("cannot list the classes of interface {ifindex}");
    let m = message(ifindex, TcHandle::default(), TcHandle::default());
    let msg = RouteNetlinkMessage::GetTrafficClass(m);
    let mut answers = request(handle, msg, NLM_F_DUMP, &what)?;
    let mut out = Vec::new();
    while let Some(answer) = answers.next().await {
        match answer.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficClass(c))
                if c.header.index == ifindex as i32 =>
            {
                // netlink-packet-route keeps an unknown kind's TCA_OPTIONS as raw bytes: the
                // nested attributes, walked here.
                let raw = c.attributes.iter().find_map(|a| match a {
                    TcAttribute::Options(o) => o.iter().find_map(|o| match o {
                        TcOption::Other(nla) => {
                            let mut v = vec![0u8; rtnetlink::packet_core::Nla::value_len(nla)];
                            rtnetlink::packet_core::Nla::emit_value(nla, &mut v);
                            Some(v)
                        }
                        _ => None,
                    }),
                    _ => None,
                });
                if let Some(raw) = raw
                    && let Some((rate, ceil)) = parse_rates(&raw)
                {
                    out.push((c.header.handle, rate, ceil));
                }
            }
            NetlinkPayload::Error(err) if err.code.is_some() => {
                return Err(ShareError::Netlink {
                    what: what(),
                    source: err.to_io(),
                });
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Rate and ceiling from a class's nested HTB attributes.
fn parse_rates(mut raw: &[u8]) -> Option<(Rate, Rate)> {
    let (mut rate, mut ceil, mut rate64, mut ceil64) = (None, None, None, None);
    let u32_at =
        |b: &[u8], at: usize| Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |b: &[u8]| Some(u64::from_ne_bytes(b.get(..8)?.try_into().ok()?));
    while raw.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([raw[0], raw[1]]));
        let kind = u16::from_ne_bytes([raw[2], raw[3]]) & 0x3fff;
        if len < 4 || len > raw.len() {
            break;
        }
        let value = &raw[4..len];
        match kind {
            TCA_HTB_PARMS => {
                rate = u32_at(value, 8);
                ceil = u32_at(value, 20);
            }
            TCA_HTB_RATE64 => rate64 = u64_at(value),
            TCA_HTB_CEIL64 => ceil64 = u64_at(value),
            _ => {}
        }
        raw = &raw[len.next_multiple_of(4).min(raw.len())..];
    }
    let bytes = |small: Option<u32>, big: Option<u64>| big.or(small.map(u64::from));
    Some((
        Rate::from_bits(bytes(rate, rate64)? * 8),
        Rate::from_bits(bytes(ceil, ceil64)? * 8),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_in_ticks() {
        // 125,000 bytes at 1 Mbit/s (125,000 B/s) take one second: 10^9 / 64 ticks.
        assert_eq!(
            ticks(Rate::from_bits(1_000_000), 125_000),
            1_000_000_000 / 64
        );
        let r = ratespec(Rate::from_bits(80_000_000_000));
        assert_eq!(r[1], LINKLAYER_ETHERNET);
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), u32::MAX);
    }
}
