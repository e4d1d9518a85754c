//! Fragments follow their datagram.
//!
//! Only the first fragment of a datagram carries the TCP/UDP header, so
//! only it can be matched and decided. Its ports are recorded under the
//! datagram's identity (source, destination, protocol, identification);
//! the later fragments take them from here and then go through exactly the
//! same lookup and flow decision, so every fragment of a datagram lands
//! where its first one did (the same scheme as Cilium's `ipv4_frag` /
//! `ipv6_frag` maps). A later fragment that arrives before its first one
//! (reordering) cannot be placed and is passed untouched.

#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values go by reference, as in the rest of the classifier (no copies of map values on the 512-byte stack)"
)]

use aya_ebpf::{macros::map, maps::LruHashMap};
use viscum_common::{FRAG_ENTRIES, FragKey, FragPorts, GlobalCounter};

use crate::{
    counters,
    parse::{Frag, Parsed},
};

#[map(name = "VISCUM_FRAGS")]
static FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::pinned(FRAG_ENTRIES, 0);

#[inline(always)]
fn key(p: &Parsed) -> FragKey {
    FragKey {
        src: p.saddr,
        dst: p.key.addr,
        id: p.frag_id,
        proto: p.key.proto,
        family: p.key.family,
        _pad: [0; 2],
    }
}

/// Records a first fragment's ports, once it is known to be ours (matched
/// an entry, or is a reply of an edge flow): unmanaged fragmented traffic
/// never writes to the table.
#[inline(always)]
pub fn remember(p: &Parsed) {
    if p.frag == Frag::First {
        let ports = FragPorts {
            sport: p.sport,
            dport: p.key.port,
        };
        let _ = FRAGS.insert(&key(p), &ports, 0);
    }
}

/// Fills in a later fragment's ports; false for a later fragment whose
/// datagram is not ours or whose first fragment was not seen.
#[inline(always)]
pub fn resolve(p: &mut Parsed) -> bool {
    match p.frag {
        Frag::None => true,
        Frag::First => {
            counters::bump(GlobalCounter::Fragments);
            true
        }
        Frag::Later => {
            counters::bump(GlobalCounter::Fragments);
            // SAFETY: copied out of the map value at once.
            let Some(ports) = (unsafe { FRAGS.get(&key(p)).copied() }) else {
                counters::bump(GlobalCounter::FragmentsUnknown);
                return false;
            };
            p.sport = ports.sport;
            p.key.port = ports.dport;
            true
        }
    }
}
