//! When a TCP connection's edge record may go: at the ACK of its second FIN.
//!
//! A record that saw a FIN or RST lingers [`DatapathConfig::linger_ns`](crate::DatapathConfig)
//! (10 s) and then expires, but nothing frees an expired record: the LRU table keeps it until
//! an insert evicts it. Under a connection per request (HTTP/1.0, health checks, a CRR load)
//! the table is then full of finished connections, and every new flow's insert pays an
//! eviction: the LRU lists rotated and shrunk, a cold record unlinked from its cold bucket
//! (`htab_lru_map_update_elem`, a quarter of `viscum_ingress`'s samples under B3's CRR load,
//! 2026-12-03). Finished records also push idle live ones out of the table, which then have to
//! be recovered from the service's stack.
//!
//! So a record is removed as soon as its connection has closed on both sides, which the
//! classifier sees in the sequence numbers of the orderly close (RFC 9293, section 3.6):
//!
//! 1. the first FIN, from either side: [`REPLY_F_FIN_CLIENT`] or [`REPLY_F_FIN_SERVICE`]
//!    names the side, and [`ReplyState::fin_seq`](crate::ReplyState) keeps the sequence
//!    number just past it (its sequence number + payload + 1 for the FIN);
//! 2. the other side's FIN, when it acknowledges the first (its ACK number is `fin_seq`):
//!    [`REPLY_F_LAST_ACK`], and `fin_seq` becomes the sequence number past this second FIN;
//! 3. the first side's ACK of exactly that (a segment without SYN, FIN or RST, whose ACK
//!    number is `fin_seq`) is the connection's last segment: the record is removed once the
//!    program no longer reads it (the classifier delivers the segment by its entry alone;
//!    the reply program removes it after the send).
//!
//! Anything else changes nothing, and the record lingers as before: a RST; a simultaneous
//! close (a second FIN sent before the first arrived does not acknowledge it, so the last
//! ACK could come from either side); a close seen only in part (a cache served one of the
//! segments without reading the record). A segment of the connection that comes after the
//! removal finds no record:
//! * a client's (the last ACK lost on its way, so the service sends its FIN again and the
//!   client answers): the classifier recovers it from the service's stack, which holds the
//!   connection in `TIME_WAIT`, `LAST_ACK` or `CLOSING`, and the restored record is closing
//!   and lingers; once the service's socket is gone, a late duplicate goes to the cloud,
//!   which resets a client that is itself done with the connection;
//! * a service's: the reply path restores the record from the entry (exact entries whose
//!   namespace port answers for one cloud endpoint), closing when the segment is a FIN or
//!   RST, open otherwise (a bare ACK of a late duplicate: counted as an open flow until the
//!   idle timeout, a rare case left as it is); where it cannot (prefix rules, all-ports
//!   entries), the segment leaves untranslated and the client's stack answers it with a
//!   RST, as for any lost record.

use crate::{REPLY_F_FIN_CLIENT, REPLY_F_FIN_SERVICE, REPLY_F_LAST_ACK};

/// TCP flag bits of the header's flags byte (RFC 9293, section 3.1).
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// What the classifier read of a TCP segment of an edge flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// From the client (`viscum_ingress`), or from the service (`viscum_reply`).
    pub from_client: bool,
    /// The header's flags byte.
    pub flags: u8,
    /// Sequence number (host order).
    pub seq: u32,
    /// Acknowledgment number (host order; meaningful with ACK set).
    pub ack: u32,
    /// Payload bytes: the IP datagram's length less the IP and TCP headers.
    pub payload: u32,
}

/// The close tracking's answer for one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseStep {
    /// The record's close state stays as it is.
    Keep,
    /// Store these `REPLY_F_*` flags and `fin_seq` in the record.
    Update {
        /// The record's flags, with the close bits moved.
        flags: u32,
        /// The new [`ReplyState::fin_seq`](crate::ReplyState).
        fin_seq: u32,
    },
    /// The segment is the connection's last: remove the record once it has been delivered.
    Remove,
}

/// Does the classifier need to look at `tcp_flags`' segment for the close of a record with
/// `record_flags`? (A FIN, or any segment once the last ACK is due.) Lets the caller load
/// the sequence numbers only then.
#[inline(always)]
pub fn concerns(record_flags: u32, tcp_flags: u8) -> bool {
    tcp_flags & FIN != 0 || record_flags & REPLY_F_LAST_ACK != 0
}

/// One step of the orderly close (see the module documentation) for segment `seg` of a flow
/// whose record holds `flags` (`REPLY_F_*`) and `fin_seq`.
#[inline(always)]
pub fn step(flags: u32, fin_seq: u32, seg: &Segment) -> CloseStep {
    if seg.flags & (SYN | RST) != 0 {
        return CloseStep::Keep;
    }
    let (mine, theirs) = if seg.from_client {
        (REPLY_F_FIN_CLIENT, REPLY_F_FIN_SERVICE)
    } else {
        (REPLY_F_FIN_SERVICE, REPLY_F_FIN_CLIENT)
    };
    let acks = |n: u32| seg.flags & ACK != 0 && seg.ack == n;
    if flags & REPLY_F_LAST_ACK != 0 {
        // The second FIN was the other side's: this side's bare ACK of it ends the connection.
        return if flags & mine != 0 && seg.flags & FIN == 0 && acks(fin_seq) {
            CloseStep::Remove
        } else {
            CloseStep::Keep
        };
    }
    if seg.flags & FIN == 0 {
        return CloseStep::Keep;
    }
    // Just past the FIN, which takes one sequence number of its own.
    let end = seg.seq.wrapping_add(seg.payload).wrapping_add(1);
    if flags & (mine | theirs) == 0 {
        return CloseStep::Update {
            flags: flags | mine,
            fin_seq: end,
        };
    }
    if flags & theirs != 0 && acks(fin_seq) {
        return CloseStep::Update {
            flags: flags | REPLY_F_LAST_ACK,
            fin_seq: end,
        };
    }
    // This side's FIN again (a retransmission), or a second FIN that does not acknowledge
    // the first (a simultaneous close): nothing to conclude.
    CloseStep::Keep
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::REPLY_F_ESTABLISHED;

    fn seg(from_client: bool, flags: u8, seq: u32, ack: u32, payload: u32) -> Segment {
        Segment {
            from_client,
            flags,
            seq,
            ack,
            payload,
        }
    }

    /// Runs `segs` through [`step`] from an established record; the step of each.
    fn run(segs: &[Segment]) -> Vec<CloseStep> {
        let (mut flags, mut fin_seq) = (REPLY_F_ESTABLISHED, 0);
        segs.iter()
            .map(|s| {
                let r = step(flags, fin_seq, s);
                if let CloseStep::Update {
                    flags: f,
                    fin_seq: n,
                } = r
                {
                    (flags, fin_seq) = (f, n);
                }
                r
            })
            .collect()
    }

    const C: bool = true;
    const S: bool = false;

    #[test]
    fn the_service_closing_first_ends_at_its_ack_of_the_client_fin() {
        // Client seq 1000.., service seq 5000..: 1-byte response with the FIN, the
        // client's ACK, its FIN, the service's last ACK.
        let steps = run(&[
            seg(S, FIN | ACK, 5000, 1001, 1),
            seg(C, ACK, 1001, 5002, 0),
            seg(C, FIN | ACK, 1001, 5002, 0),
            seg(S, ACK, 5002, 1002, 0),
        ]);
        assert_eq!(
            steps,
            [
                CloseStep::Update {
                    flags: REPLY_F_ESTABLISHED | REPLY_F_FIN_SERVICE,
                    fin_seq: 5002
                },
                CloseStep::Keep,
                CloseStep::Update {
                    flags: REPLY_F_ESTABLISHED | REPLY_F_FIN_SERVICE | REPLY_F_LAST_ACK,
                    fin_seq: 1002
                },
                CloseStep::Remove,
            ]
        );
    }

    #[test]
    fn the_client_closing_first_ends_at_its_ack_of_the_service_fin() {
        let steps = run(&[
            seg(C, FIN | ACK, 1000, 5000, 10),
            // The service's ACK, data of a half-closed connection, then its FIN.
            seg(S, ACK, 5000, 1011, 0),
            seg(S, ACK, 5000, 1011, 100),
            seg(C, ACK, 1011, 5100, 0),
            seg(S, FIN | ACK, 5100, 1011, 0),
            // An ACK of data from before the FIN is not the last one.
            seg(C, ACK, 1011, 5100, 0),
            seg(C, ACK, 1011, 5101, 0),
        ]);
        assert_eq!(
            steps[0],
            CloseStep::Update {
                flags: REPLY_F_ESTABLISHED | REPLY_F_FIN_CLIENT,
                fin_seq: 1011
            }
        );
        assert_eq!(steps[1..4], [CloseStep::Keep; 3]);
        assert_eq!(
            steps[4],
            CloseStep::Update {
                flags: REPLY_F_ESTABLISHED | REPLY_F_FIN_CLIENT | REPLY_F_LAST_ACK,
                fin_seq: 5101
            }
        );
        assert_eq!(steps[5..], [CloseStep::Keep, CloseStep::Remove]);
    }

    #[test]
    fn a_close_that_may_not_be_over_keeps_the_record() {
        // Simultaneous close: the service's FIN does not acknowledge the client's.
        let steps = run(&[
            seg(C, FIN | ACK, 1000, 5000, 0),
            seg(S, FIN | ACK, 5000, 1000, 0),
            seg(C, ACK, 1001, 5001, 0),
            seg(S, ACK, 5001, 1001, 0),
        ]);
        assert!(!steps.contains(&CloseStep::Remove), "{steps:?}");
        // A RST, at any point.
        let steps = run(&[
            seg(S, FIN | ACK, 5000, 1000, 0),
            seg(C, RST | ACK, 1000, 5001, 0),
            seg(S, ACK, 5001, 1000, 0),
        ]);
        assert!(!steps.contains(&CloseStep::Remove), "{steps:?}");
        // The wrong side's ACK, a retransmitted FIN, the last ACK with a FIN or a wrong
        // number: the first side is the only one whose ACK can be the last.
        let steps = run(&[
            seg(S, FIN | ACK, 5000, 1000, 0),
            seg(S, FIN | ACK, 5000, 1000, 0),
            seg(C, FIN | ACK, 1000, 5001, 0),
            seg(C, ACK, 1001, 5001, 0),
            seg(S, FIN | ACK, 5001, 1001, 0),
            seg(S, ACK, 5001, 1000, 0),
            seg(S, ACK, 5001, 1001, 0),
        ]);
        assert_eq!(steps[1], CloseStep::Keep);
        assert_eq!(steps[3..6], [CloseStep::Keep; 3]);
        assert_eq!(steps[6], CloseStep::Remove);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let steps = run(&[
            seg(S, FIN | ACK, u32::MAX - 1, 7, 1),
            seg(C, FIN | ACK, 7, 0, 0),
            seg(S, ACK, 0, 8, 0),
        ]);
        assert_eq!(steps[2], CloseStep::Remove);
    }

    #[test]
    fn only_fins_and_a_due_last_ack_concern_the_close() {
        assert!(concerns(REPLY_F_ESTABLISHED, FIN | ACK));
        assert!(!concerns(REPLY_F_ESTABLISHED | REPLY_F_FIN_SERVICE, ACK));
        assert!(concerns(REPLY_F_ESTABLISHED | REPLY_F_LAST_ACK, ACK));
    }
}
