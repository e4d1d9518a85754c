//! The clsact qdisc of the pre-TCX attach path (kernels < 6.6).
//!
//! A `cls_bpf` filter needs a clsact qdisc on the interface. Viscum adds one
//! only when none is there, remembers that it did (a marker directory next to
//! the attachment record, bpffs holding no plain files), and on detach
//! removes it again only if it is its own and no other filter (a router's
//! QoS, another tool) hangs under it: `detach` leaves the interface as
//! `attach` found it. See tc-bpf(8) and the kernel's net/sched/sch_ingress.c.

use futures::TryStreamExt as _;
use netlink_packet_route::tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption};

use super::EngineError;

/// Runs `f` on a private single-thread runtime on its own thread: the
/// engine's API is synchronous and may be called from inside another tokio
/// runtime (the CLI, the daemon), where blocking on a future would panic.
fn netlink<T: Send + 'static>(
    what: &str,
    f: impl AsyncFnOnce(rtnetlink::Handle) -> Result<T, rtnetlink::Error> + Send,
) -> Result<T, EngineError> {
    let err = |e: std::io::Error| EngineError::io(what.to_owned(), e);
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(err)?;
            rt.block_on(async {
                let handle = crate::netns::handle_here()
                    .await
                    .map_err(|e| err(std::io::Error::other(e)))?;
                f(handle).await.map_err(|e| err(std::io::Error::other(e)))
            })
        })
        .join()
        .unwrap_or_else(|_| Err(err(std::io::Error::other("netlink thread panicked"))))
    })
}

/// Is there a clsact qdisc on `ifindex`?
pub fn present(ifindex: u32) -> Result<bool, EngineError> {
    netlink("cannot list qdiscs", async move |h| {
        // RTM_GETQDISC dumps every interface's qdiscs: filter by index.
        let all: Vec<TcMessage> = h.qdisc().get().execute().try_collect().await?;
        Ok(all.iter().any(|m| {
            m.header.index == ifindex as i32
                && m.header.parent == TcHandle::CLSACT
                && m.attributes
                    .iter()
                    .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact"))
        }))
    })
}

/// Number of filters under the clsact qdisc's ingress and egress hooks.
pub fn filter_count(ifindex: u32) -> Result<usize, EngineError> {
    netlink("cannot list tc filters", async move |h| {
        let mut n = 0;
        for ingress in [true, false] {
            let mut tf = h.traffic_filter(ifindex as i32);
            let req = tf.get();
            let req = if ingress { req.ingress() } else { req.egress() };
            let msgs: Vec<TcMessage> = req.execute().try_collect().await?;
            // A filter shows up once per chain/priority header plus once per
            // handle; count only the entries that carry a handle.
            n += msgs
                .iter()
                .filter(|m| m.header.handle != TcHandle::UNSPEC)
                .count();
        }
        Ok(n)
    })
}

/// Deletes the clsact qdisc of `ifindex` (and with it any filter left).
pub fn delete(ifindex: u32) -> Result<(), EngineError> {
    netlink("cannot delete the clsact qdisc", async move |h| {
        let mut req = h.qdisc().del(ifindex as i32);
        req.message_mut().header.parent = TcHandle::CLSACT;
        req.execute().await
    })
}

/// Is a `bpf` filter running program `prog_id` on the ingress hook of the
/// clsact qdisc of `ifindex`? (The kernel's own record of a clsact
/// attachment: a record of ours may outlive the interface it was made for.)
pub fn has_prog(ifindex: u32, prog_id: u32) -> Result<bool, EngineError> {
    if !present(ifindex)? {
        return Ok(false);
    }
    netlink(
        &format!("cannot list the tc filters of interface {ifindex}"),
        async move |h| {
            let msgs: Vec<TcMessage> = h
                .traffic_filter(ifindex as i32)
                .get()
                .ingress()
                .execute()
                .try_collect()
                .await?;
            Ok(msgs.iter().any(|m| {
                m.attributes.iter().any(|a| {
                    matches!(a, TcAttribute::Options(opts) if opts.iter().any(|o| {
                        matches!(o, TcOption::Bpf(TcFilterBpfOption::ProgId(id)) if *id == prog_id)
                    }))
                })
            }))
        },
    )
}
