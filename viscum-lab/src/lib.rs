//! The one client/edge/cloud lab of Viscum, shared by `cargo xtask run` (the `viscum-lab`
//! binary), the integration tests (`tests/`, through `viscum_tests`), viscum's own netns tests
//! and the benchmarks (`viscum-bench`).
//!
//! # Layout
//!
//! * [`guard`]: [`Netns`] and [`Bpffs`], resources removed on drop (panics included, and
//!   with every process still in a namespace), plus [`skip_unless_root`], [`wait_until`],
//!   [`block_on`] and small process helpers.
//! * [`lab`]: the [`Lab`] topology `client -- edge -- cloud` ([`LabNames`] unique for tests or
//!   fixed for the interactive lab) and running `viscum` inside its edge namespace.
//! * [`daemon`]: a typed `viscum run` fixture: [`DaemonConfig`] written as the daemon's TOML,
//!   [`DaemonFiles`] (configuration, the edge-copy service script, run directory) and
//!   [`Daemon`], the running daemon and its control socket.
//! * [`census`]: a leak census of a daemon test (namespaces, edge interfaces, pins, service
//!   processes, cgroups), to compare before and after a fault.
//! * [`nats`]: real `nats-server` processes with JetStream (one, or a three-node cluster) in
//!   namespaces, for the fleet tests and benchmark B10.
//! * [`say`](mod@say): output that survives a closed stdout (the lab under `| tee`, then Ctrl-C).
//!
//! Namespaces are entered per thread with `setns` (through `viscum::netns::in_netns`), never
//! with `ip netns exec`, which hides the bpffs mounts viscum depends on (see
//! `docs/toolchain.md`). Every wait is bounded and polls for the condition it needs.

pub mod census;
pub mod daemon;
pub mod demo;
pub mod guard;
pub mod lab;
pub mod nats;
pub mod say;
mod vlan;

pub use self::{
    census::Census,
    daemon::{Check, Daemon, DaemonConfig, DaemonFiles, Service},
    guard::{BPFFS_TEST_ROOT, Bpffs, Netns, block_on, skip_unless_root, unique_name, wait_until},
    lab::{Lab, LabError, LabNames, LabOptions, VlanMode},
};
