//! The daemon's side of network shares ([`crate::shares`]): the HTB qdiscs on
//! `engine.interfaces` while `[engine.network]` is set, and the service veths' classes in
//! `VISCUM_SHARES`, kept in step with the configuration and the services' veths.

use super::{Daemon, service};
use crate::{
    config::{Config, ServiceConfig},
    shares::{Shaper, ShareError},
};

/// The shaper, if shares are on, and the last problem logged (each is logged once).
#[derive(Debug, Default)]
pub struct DaemonShares {
    shaper: Option<Shaper>,
    last_error: Option<String>,
}

impl DaemonShares {
    /// Puts the qdiscs in place for `config` (nothing without `[engine.network]`).
    ///
    /// # Errors
    /// [`ShareError::ForeignQdisc`] when an interface has a root qdisc Viscum did not make;
    /// nothing is changed then.
    pub async fn start(config: &Config) -> Result<DaemonShares, ShareError> {
        let shaper = match config.engine.network {
            Some(link) => Some(Shaper::install(link, &config.engine.interfaces).await?),
            None => None,
        };
        Ok(DaemonShares {
            shaper,
            last_error: None,
        })
    }

    /// For a reload's checks, before anything changes: `Err` with the problem when the
    /// new configuration's shares cannot be put on its interfaces.
    pub async fn check(&self, new: &Config) -> Result<(), String> {
        if new.engine.network.is_none() {
            return Ok(());
        }
        Shaper::check(&new.engine.interfaces)
            .await
            .map_err(|e| format!("engine: network: {}", service::error_chain(&e)))
    }

    /// Applies a reload's `[engine.network]` and interfaces: the qdiscs are removed, or made,
    /// or made again when the link's rate or the interfaces changed. Classes follow with the
    /// daemon's next sync (at every link check).
    pub async fn reload(&mut self, pins: &crate::engine::Pins, new: &Config) {
        let same = match (&self.shaper, new.engine.network) {
            (None, None) => true,
            (Some(s), Some(link)) => s.link() == link && s.interfaces() == new.engine.interfaces,
            _ => false,
        };
        if same {
            return;
        }
        if let Some(old) = self.shaper.take() {
            old.remove(pins).await;
        }
        if let Some(link) = new.engine.network {
            match Shaper::install(link, &new.engine.interfaces).await {
                Ok(s) => self.shaper = Some(s),
                Err(e) => log::error!(
                    "reload: network shares are off: {}",
                    service::error_chain(&e)
                ),
            }
        }
    }

    /// Removes the qdiscs and the map's entries (clean shutdown).
    pub async fn stop(&mut self, pins: &crate::engine::Pins) {
        if let Some(s) = self.shaper.take() {
            s.remove(pins).await;
        }
    }
}

/// Whether `a` and `b` differ in their network share at most: such a change is applied to
/// the classes, without restarting the service.
pub fn same_but_network(a: &ServiceConfig, b: &ServiceConfig) -> bool {
    let mut a = a.clone();
    a.network = b.network;
    a == *b
}

impl Daemon {
    /// Brings the classes and `VISCUM_SHARES` in line with the configured services and their
    /// veths as they are now. Problems are logged, each once.
    pub(super) async fn sync_shares(&mut self) {
        let Some(shaper) = &mut self.shares.shaper else {
            return;
        };
        let list: Vec<_> = self
            .config
            .services
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.network.unwrap_or_default(),
                    self.services
                        .get(&s.name)
                        .and_then(|h| h.lock().host_ifindex),
                )
            })
            .collect();
        match shaper.sync(&self.pins, &list).await {
            Ok(()) => {
                if self.shares.last_error.take().is_some() {
                    log::info!("network shares: in place again");
                }
            }
            Err(e) => {
                let msg = service::error_chain(&e);
                if self.shares.last_error.as_ref() != Some(&msg) {
                    log::warn!("network shares: {msg}");
                    self.shares.last_error = Some(msg);
                }
            }
        }
    }
}
