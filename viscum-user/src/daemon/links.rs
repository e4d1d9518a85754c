//! Link events: the daemon's view of interfaces coming and going.
//!
//! The kernel multicasts every link change (`RTM_NEWLINK`/`RTM_DELLINK`) to the rtnetlink
//! group `RTNLGRP_LINK`; [`LinkWatcher`] subscribes in the daemon's network namespace and
//! hands the supervisor batches of events. What the supervisor does with them (re-attach the
//! classifier to a re-created client-facing interface, re-point entries at a re-created
//! target, rebuild a service whose veth vanished) only depends on the kernel's state at that
//! moment, never on the events' details, so a lost event costs nothing but time: multicast
//! overruns (ENOBUFS) close the subscription, which is then made again, and the supervisor
//! also re-checks on a slow timer.

use std::time::Duration;

use futures::StreamExt as _;
use rtnetlink::{
    MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkMessage},
    },
};
use tokio::sync::mpsc;

/// One link change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link appeared or changed (flags, carrier, name...).
    New {
        /// Interface index (`ifi_index` of the `RTM_NEWLINK` message, rtnetlink(7)).
        index: u32,
        /// Interface name (`IFLA_IFNAME`).
        name: String,
    },
    /// A link was deleted.
    Del {
        /// Interface index of the deleted link (`RTM_DELLINK`).
        index: u32,
        /// Its name (`IFLA_IFNAME`).
        name: String,
    },
}

impl LinkEvent {
    /// The link's name as the event carries it.
    pub fn name(&self) -> &str {
        match self {
            LinkEvent::New { name, .. } | LinkEvent::Del { name, .. } => name,
        }
    }
}

/// How long to wait before subscribing again after the subscription failed or closed.
const RESUBSCRIBE: Duration = Duration::from_secs(1);

/// Most events handed over in one batch.
const BATCH: usize = 256;

/// A subscription to link events in the calling thread's network namespace.
pub struct LinkWatcher {
    rx: Option<mpsc::UnboundedReceiver<LinkEvent>>,
    /// When to subscribe again while there is no subscription. A deadline rather than a
    /// sleep, so [`LinkWatcher::next`] can be cancelled (a `select!` branch) and resumed.
    retry_at: Option<tokio::time::Instant>,
}

impl LinkWatcher {
    /// Subscribes. A failure is logged and retried by [`LinkWatcher::next`]; the daemon works
    /// without events too, only slower to notice changes.
    pub fn start() -> LinkWatcher {
        LinkWatcher {
            rx: subscribe()
                .map_err(|e| log::warn!("cannot watch link changes: {e}; retrying"))
                .ok(),
            retry_at: None,
        }
    }

    /// The next batch of events: waits for one, then takes whatever else is already queued,
    /// so a burst (an interface re-created, brought up, addressed) is handled once. When
    /// the subscription closed (an overrun), subscribes again and returns an empty batch:
    /// events may have been lost, so the caller should re-check everything. Cancel-safe.
    pub async fn next(&mut self) -> Vec<LinkEvent> {
        let Some(rx) = &mut self.rx else {
            let at = *self
                .retry_at
                .get_or_insert_with(|| tokio::time::Instant::now() + RESUBSCRIBE);
            tokio::time::sleep_until(at).await;
            self.retry_at = None;
            self.rx = subscribe()
                .map_err(|e| log::debug!("cannot watch link changes: {e}"))
                .ok();
            return Vec::new();
        };
        let Some(first) = rx.recv().await else {
            log::warn!("the link-change subscription closed (events lost?); subscribing again");
            self.rx = None;
            return Vec::new();
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }
        batch
    }
}

/// Opens an rtnetlink socket bound to `RTNLGRP_LINK` and spawns the tasks that drive it and
/// translate its messages.
fn subscribe() -> std::io::Result<mpsc::UnboundedReceiver<LinkEvent>> {
    let (connection, handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
    tokio::spawn(connection);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // The connection stops once its handles and this receiver are gone.
        let _handle = handle;
        while let Some((msg, _)) = messages.next().await {
            let event = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    let (index, name) = describe(&link);
                    LinkEvent::New { index, name }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                    let (index, name) = describe(&link);
                    LinkEvent::Del { index, name }
                }
                _ => continue,
            };
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

fn describe(link: &LinkMessage) -> (u32, String) {
    let name = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default();
    (link.header.index, name)
}
