//! The fleet: many boxes converging to one desired state kept in NATS JetStream.
//!
//! An operator puts services into a Key-Value bucket, per group of boxes and per box; every
//! box running `viscum run` with a `[fleet]` section ([`crate::config::fleet`]) watches the
//! keys meant for it, applies them through the daemon's reload diff next to its local
//! services, keeps a checkpoint on disk so it serves its last known state while the servers
//! are unreachable, fetches service artifacts from an Object Store, and reports its status
//! under a key that expires when it stops heartbeating.
//!
//! * [`schema`]: the contract between boxes and operators: buckets, keys, values, status.
//! * [`connect`]: connecting to the servers (boxes and the operator's CLI alike).
//! * [`agent`]: the box side: watch, resynchronise, apply, checkpoint, report; over the
//!   [`agent::Apply`] trait, implemented by the daemon and by [`agent::DryRun`].
//! * [`artifact`]: fetching, verifying and installing artifacts.
//! * [`buckets`]: opening the buckets, creating missing ones (the operator's side).
//!
//! Only built with the `fleet` feature of viscum-user (on by default).

pub mod agent;
pub mod artifact;
pub mod buckets;
pub mod connect;
pub mod schema;
