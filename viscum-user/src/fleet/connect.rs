//! Connecting to the fleet's NATS servers, for the box (from `[fleet]`) and for the
//! operator's `viscum fleet` commands (from their flags): one [`ConnectSettings`], one
//! [`connect`].

use std::{path::PathBuf, time::Duration};

use async_nats::jetstream;

use super::schema;
use crate::config::fleet::{Credentials, FleetConfig, TlsFiles};

/// Everything [`connect`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectSettings {
    /// Server URLs (`nats://host:port`, `tls://host:port`, `host[:port]`), at least one.
    pub servers: Vec<String>,
    /// The connection's name as the server shows it (`nats server report connections`): the
    /// box id for a box, e.g. `viscum-fleet-cli` for the operator.
    pub name: String,
    /// How to authenticate.
    pub credentials: Credentials,
    /// TLS files; `Some` makes TLS required.
    pub tls: Option<TlsFiles>,
    /// Bound on one connection attempt (TCP, TLS and the NATS handshake).
    pub connect_timeout: Duration,
    /// Longest wait between two reconnection attempts once connected (the waits grow from
    /// 100 ms, doubling, up to this).
    pub max_reconnect_delay: Duration,
    /// Prefix of the connection's reply inboxes (`None`: NATS's `_INBOX`); a box uses
    /// [`schema::box_inbox_prefix`], so its permissions can be limited to its own inboxes.
    pub inbox_prefix: Option<String>,
}

impl ConnectSettings {
    /// The settings of a box's `[fleet]` section (connection name = box id).
    pub fn from_fleet(fleet: &FleetConfig) -> ConnectSettings {
        ConnectSettings {
            servers: fleet.servers.clone(),
            name: fleet.box_id.clone(),
            credentials: fleet.credentials.clone(),
            tls: fleet.tls.clone(),
            connect_timeout: Duration::from_secs(5),
            max_reconnect_delay: Duration::from_secs(5),
            inbox_prefix: Some(schema::box_inbox_prefix(&fleet.box_id)),
        }
    }
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The nkey seed file or credentials file could not be read or parsed.
    #[error("cannot read the NATS credentials in {path}")]
    Credentials {
        /// The `nkey` or `creds` file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// No server answered (or one refused the credentials or TLS).
    #[error("cannot connect to the NATS servers {servers}")]
    Connect {
        /// The URLs tried, comma-separated.
        servers: String,
        /// async-nats' error (its kind says: timed out, authorization, TLS, I/O ...).
        #[source]
        source: async_nats::ConnectError,
    },
}

/// A connection to the fleet: the NATS client and its JetStream context.
#[derive(Clone)]
pub struct Fleet {
    /// The NATS client (cheap to clone; reconnects by itself once connected).
    pub client: async_nats::Client,
    /// JetStream on that client (default API prefix `$JS.API`).
    pub jetstream: jetstream::Context,
}

impl Fleet {
    /// The desired-state bucket ([`schema::DESIRED_BUCKET`]); it must exist.
    ///
    /// # Errors
    /// The bucket does not exist, or the server did not answer (JetStream off, no permission
    /// for `$JS.API.STREAM.INFO.KV_viscum_desired`).
    pub async fn desired(&self) -> Result<jetstream::kv::Store, jetstream::context::KeyValueError> {
        self.jetstream.get_key_value(schema::DESIRED_BUCKET).await
    }

    /// The status bucket ([`schema::STATUS_BUCKET`]); it must exist.
    ///
    /// # Errors
    /// As [`Fleet::desired`].
    pub async fn status(&self) -> Result<jetstream::kv::Store, jetstream::context::KeyValueError> {
        self.jetstream.get_key_value(schema::STATUS_BUCKET).await
    }

    /// The artifact store ([`schema::ARTIFACT_BUCKET`]); it must exist.
    ///
    /// # Errors
    /// As [`Fleet::desired`].
    pub async fn artifacts(
        &self,
    ) -> Result<jetstream::object_store::ObjectStore, jetstream::context::ObjectStoreError> {
        self.jetstream
            .get_object_store(schema::ARTIFACT_BUCKET)
            .await
    }
}

/// Connects to the first server of `settings.servers` that answers (trying each once) and
/// returns the client with its JetStream context. Once connected, the client reconnects by
/// itself for ever, waiting at most `max_reconnect_delay` between attempts; its state is
/// `client.connection_state()`.
///
/// `events`, if given, receives the client's connection events (connected, disconnected,
/// server errors such as permission violations).
///
/// # Errors
/// [`ConnectError::Credentials`] if a credentials file cannot be used,
/// [`ConnectError::Connect`] if no server could be reached or one refused the client.
pub async fn connect(
    settings: &ConnectSettings,
    events: Option<tokio::sync::mpsc::UnboundedSender<async_nats::Event>>,
) -> Result<Fleet, ConnectError> {
    let max_delay = settings.max_reconnect_delay;
    let mut options = async_nats::ConnectOptions::new()
        .name(&settings.name)
        .connection_timeout(settings.connect_timeout)
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempts| {
            let shift = attempts.min(16) as u32;
            Duration::from_millis(100u64 << shift).min(max_delay)
        });
    if let Some(prefix) = &settings.inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    if let Some(tx) = events {
        options = options.event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event);
            }
        });
    }
    options =
        match &settings.credentials {
            Credentials::None => options,
            Credentials::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.clone())
            }
            Credentials::Nkey(path) => {
                let seed =
                    std::fs::read_to_string(path).map_err(|source| ConnectError::Credentials {
                        path: path.clone(),
                        source,
                    })?;
                options.nkey(seed.trim().to_owned())
            }
            Credentials::Creds(path) => options.credentials_file(path).await.map_err(|source| {
                ConnectError::Credentials {
                    path: path.clone(),
                    source,
                }
            })?,
        };
    if let Some(tls) = &settings.tls {
        options = options.require_tls(true);
        if let Some(ca) = &tls.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    let client = options
        .connect(settings.servers.as_slice())
        .await
        .map_err(|source| ConnectError::Connect {
            servers: settings.servers.join(", "),
            source,
        })?;
    let jetstream = jetstream::new(client.clone());
    Ok(Fleet { client, jetstream })
}
