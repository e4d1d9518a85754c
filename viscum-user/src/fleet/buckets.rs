//! Opening the fleet's buckets, creating them when they are missing (the operator's
//! `viscum fleet` commands, and the tests and benchmarks that play the operator).
//!
//! A Key-Value bucket is created as its stream (`KV_<bucket>`, subjects `$KV.<bucket>.>`) with
//! the settings async-nats's `create_key_value` would use, but without its account-info
//! request first: async-nats 0.51 cannot decode nats-server 2.9's answer to `$JS.API.INFO`
//! (it requires `reserved_memory`, which 2.9 does not send), so `create_key_value` fails
//! against Debian's server with "data did not match any variant of untagged enum Response".

use async_nats::jetstream::{
    self,
    context::{KeyValueErrorKind, ObjectStoreErrorKind},
    kv, object_store,
    stream::{self, DiscardPolicy},
};

/// Why a bucket could not be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    /// The bucket exists but could not be opened (no JetStream, no permission, timeout).
    #[error("cannot open bucket {bucket}")]
    Open {
        /// The bucket's name.
        bucket: String,
        /// async-nats's error.
        #[source]
        source: async_nats::Error,
    },
    /// The bucket is missing and could not be created.
    #[error("cannot create bucket {bucket}")]
    Create {
        /// The bucket's name.
        bucket: String,
        /// async-nats's error (the server's JetStream error: limits, permissions...).
        #[source]
        source: async_nats::Error,
    },
}

/// The stream of Key-Value bucket `config` (`KV_<bucket>`), as async-nats 0.51 builds it:
/// `history` messages per key (at least 1), rollups allowed, deletes only by marker, direct
/// gets on (so that a client's `get` names the key in its subject, which permissions can
/// filter), new messages refused when full.
pub fn kv_stream_config(config: &kv::Config) -> stream::Config {
    stream::Config {
        name: format!("KV_{}", config.bucket),
        description: Some(config.description.clone()).filter(|d| !d.is_empty()),
        subjects: vec![format!("$KV.{}.>", config.bucket)],
        max_messages_per_subject: config.history.max(1),
        max_bytes: config.max_bytes,
        max_age: config.max_age,
        max_message_size: config.max_value_size,
        storage: config.storage,
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        num_replicas: config.num_replicas.max(1),
        discard: DiscardPolicy::New,
        placement: config.placement.clone(),
        ..Default::default()
    }
}

/// Opens Key-Value bucket `config.bucket`, creating it with `config` if it does not exist.
///
/// # Errors
/// [`BucketError::Open`] if the server fails otherwise than "not found";
/// [`BucketError::Create`] if creating it fails.
pub async fn ensure_kv(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, BucketError> {
    let bucket = config.bucket.clone();
    match js.get_key_value(&bucket).await {
        Ok(store) => return Ok(store),
        Err(e) if e.kind() == KeyValueErrorKind::GetBucket => {}
        Err(e) => {
            return Err(BucketError::Open {
                bucket,
                source: e.into(),
            });
        }
    }
    js.get_or_create_stream(kv_stream_config(&config))
        .await
        .map_err(|e| BucketError::Create {
            bucket: bucket.clone(),
            source: e.into(),
        })?;
    js.get_key_value(&bucket)
        .await
        .map_err(|e| BucketError::Open {
            bucket,
            source: e.into(),
        })
}

/// Opens Object Store `config.bucket`, creating it with `config` if it does not exist.
///
/// # Errors
/// As [`ensure_kv`].
pub async fn ensure_object_store(
    js: &jetstream::Context,
    config: object_store::Config,
) -> Result<object_store::ObjectStore, BucketError> {
    let bucket = config.bucket.clone();
    match js.get_object_store(&bucket).await {
        Ok(store) => Ok(store),
        Err(e) if e.kind() == ObjectStoreErrorKind::GetStore => js
            .create_object_store(config)
            .await
            .map_err(|e| BucketError::Create {
                bucket,
                source: e.into(),
            }),
        Err(e) => Err(BucketError::Open {
            bucket,
            source: e.into(),
        }),
    }
}
