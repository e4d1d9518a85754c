//! The daemon's side of the fleet ([`crate::fleet`]): the agent runs as a task of its own
//! and asks the supervisor, over a channel, to apply desired sets and for status; the
//! supervisor applies a set with the same diff as a reload ([`Daemon::apply`]), the file's
//! services and the fleet's side by side.
//!
//! `config.services` is what runs: the file's services followed by the fleet's. The fleet's
//! part is also kept apart (`Daemon::fleet`), so a reload of the file keeps the fleet's
//! services, and a fleet apply keeps the file's. A name or match clash between the two is
//! refused with both sources named ([`crate::config::fleet::merge`]), changing nothing.
//!
//! Without the `fleet` feature this module only has the empty shapes the supervisor's loop
//! names.

use tokio::sync::mpsc;

use super::{Daemon, Response, state::RunPaths};
use crate::config::Config;

/// A request from the agent to the supervisor.
pub(super) enum FleetRequest {
    /// Apply a desired set; the answer is the apply's outcome.
    #[cfg(feature = "fleet")]
    Apply(
        crate::fleet::agent::DesiredSet,
        tokio::sync::oneshot::Sender<Result<(), Vec<String>>>,
    ),
    /// Report every service.
    #[cfg(feature = "fleet")]
    Status(tokio::sync::oneshot::Sender<Vec<crate::fleet::schema::ServiceStatus>>),
}

/// Starts the agent if the configuration has a `[fleet]` section.
#[cfg_attr(not(feature = "fleet"), expect(unused_variables))]
pub(super) fn start(
    config: &Config,
    paths: &RunPaths,
    tx: mpsc::Sender<FleetRequest>,
) -> Option<tokio::task::JoinHandle<()>> {
    #[cfg(feature = "fleet")]
    {
        let fleet = config.fleet.as_ref()?;
        let settings = crate::fleet::agent::AgentSettings::from_config(fleet, &paths.run_dir);
        Some(tokio::spawn(crate::fleet::agent::run(
            settings,
            DaemonApplier { tx },
            std::future::pending(),
        )))
    }
    #[cfg(not(feature = "fleet"))]
    None
}

/// The configuration a starting daemon runs: the file's with the services of the fleet's
/// checkpoint (if `[fleet]` has one that is still valid), so they are there from the start
/// and their processes adopted like the file's; and those services. On any problem, the
/// file's alone (the agent then applies what it can).
pub(super) fn boot(config: Config, paths: &RunPaths) -> (Config, Vec<crate::config::FleetService>) {
    #[cfg(feature = "fleet")]
    if let Some(fleet) = &config.fleet {
        let settings = crate::fleet::agent::AgentSettings::from_config(fleet, &paths.run_dir);
        let merged = crate::fleet::agent::checkpointed(&settings).map(|r| {
            r.and_then(|services| {
                crate::config::fleet::merge(&config, &services).map(|c| (c, services))
            })
        });
        match merged {
            Some(Ok(boot)) => return boot,
            Some(Err(problems)) => log::warn!(
                "fleet: starting without the checkpoint's services: {}",
                problems.join("; ")
            ),
            None => {}
        }
    }
    #[cfg(not(feature = "fleet"))]
    let _ = paths;
    (config, Vec::new())
}

/// The daemon as the agent's [`crate::fleet::agent::Apply`]: each call is a request to the
/// supervisor's loop.
#[cfg(feature = "fleet")]
struct DaemonApplier {
    tx: mpsc::Sender<FleetRequest>,
}

#[cfg(feature = "fleet")]
impl crate::fleet::agent::Apply for DaemonApplier {
    async fn apply(
        &mut self,
        desired: &crate::fleet::agent::DesiredSet,
    ) -> Result<(), Vec<String>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let gone = || vec!["the daemon is shutting down".to_string()];
        self.tx
            .send(FleetRequest::Apply(desired.clone(), reply))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    async fn status(&mut self) -> Vec<crate::fleet::schema::ServiceStatus> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(FleetRequest::Status(reply)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

impl Daemon {
    /// The file's configuration as `new_local` says, with the fleet's services as last
    /// applied: what a reload applies. `[fleet]` itself cannot change while running.
    pub(super) fn with_fleet(&self, new_local: Config) -> Result<Config, Box<Response>> {
        let refuse = |problems: Vec<String>| {
            log::error!(
                "reload: keeping the running configuration: {}",
                problems.join("; ")
            );
            Box::new(Response {
                ok: false,
                error: Some("cannot apply, nothing changed".into()),
                problems,
                ..Default::default()
            })
        };
        if new_local.fleet != self.config.fleet {
            return Err(refuse(vec![
                "fleet: cannot change while running (restart the daemon)".into(),
            ]));
        }
        crate::config::fleet::merge(&new_local, &self.fleet).map_err(refuse)
    }

    /// The running configuration without the fleet's services.
    #[cfg(feature = "fleet")]
    fn local_config(&self) -> Config {
        let mut local = self.config.clone();
        local
            .services
            .retain(|s| !self.fleet.iter().any(|f| f.config.name == s.name));
        local
    }

    /// Handles one agent request (the supervisor runs it through
    /// `super::answering_status`, so `status` requests are answered meanwhile).
    pub(super) async fn on_fleet(&mut self, request: FleetRequest) {
        match request {
            #[cfg(feature = "fleet")]
            FleetRequest::Apply(set, reply) => {
                // The agent installs artifacts first; never run one from `/` instead.
                let missing: Vec<String> = set
                    .services
                    .iter()
                    .filter(|f| f.config.artifact.is_some() && f.config.workdir.is_none())
                    .map(|f| {
                        format!(
                            "service {} ({}): its artifact is not installed",
                            f.config.name, f.key
                        )
                    })
                    .collect();
                let merged = if missing.is_empty() {
                    crate::config::fleet::merge(&self.local_config(), &set.services)
                } else {
                    Err(missing)
                };
                let result = match merged {
                    Err(problems) => Err(problems),
                    Ok(config) => {
                        let path = self
                            .config
                            .source
                            .clone()
                            .unwrap_or_else(|| "configuration".into());
                        let response = self.apply(config, &path).await;
                        if response.ok {
                            self.fleet = set.services;
                            Ok(())
                        } else if response.problems.is_empty() {
                            Err(response.error.into_iter().collect())
                        } else {
                            Err(response.problems)
                        }
                    }
                };
                let _ = reply.send(result);
            }
            #[cfg(feature = "fleet")]
            FleetRequest::Status(reply) => {
                let status = self.status().await;
                let services = status
                    .services
                    .iter()
                    .map(|s| {
                        let fleet = self.fleet.iter().find(|f| f.config.name == s.name);
                        crate::fleet::schema::ServiceStatus {
                            name: s.name.clone(),
                            source: fleet.map_or_else(|| "local".into(), |f| f.source.clone()),
                            state: serde_json::to_value(s.state)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_owned))
                                .unwrap_or_default(),
                            health: s.health.as_str().into(),
                            edge_flows: s.edge_flows,
                            cloud_flows: Some(s.cloud_flows),
                            bytes_kept_off_uplink: s.bytes,
                            artifact: self
                                .config
                                .service(&s.name)
                                .and_then(crate::fleet::agent::artifact_status),
                        }
                    })
                    .collect();
                let _ = reply.send(services);
            }
        }
    }
}
