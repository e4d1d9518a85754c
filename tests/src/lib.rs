//! Harness for viscum's privileged integration tests: real network namespaces, veths, VLANs,
//! a private bpffs, the real `viscum` binary, and real TCP/UDP traffic.
//!
//! # Layout
//!
//! * [`guard`], [`lab`], [`daemon`] (from the `viscum-lab` crate): [`Netns`] and [`Bpffs`],
//!   removed on drop (panics included), [`skip_unless_root`], [`wait_until`], [`block_on`];
//!   the [`Lab`] topology `client -- edge -- cloud` and running `viscum` inside its edge
//!   namespace; the typed `viscum run` fixture ([`daemon::Daemon`]).
//! * [`identity`]: [`IdentityServer`], which answers TCP and UDP with a fixed identity string
//!   so a test knows which copy of a service answered, and the clients [`tcp_ask`],
//!   [`udp_ask`] and [`ask`].
//! * [`packet`]: Ethernet/VLAN/IPv4/IPv6/TCP/UDP frames built byte by byte with checksums.
//! * [`verdicts`]: fixtures that run such frames through the loaded classifiers with
//!   `BPF_PROG_TEST_RUN` and check the TC action and the counters.
//! * [`fuzz`]: the packet fuzzer, generated frames through the loaded classifiers against a
//!   reference model of the decision (`docs/fuzzing.md`).
//! * [`cases`]: [`CaseResult`], the named pass/fail unit fixtures and the guest runner report.
//! * [`vmcheck`]: the `viscum-vmcheck` guest runner of the VM kernel matrix (PID 1 of a VM,
//!   or a quick self-check anywhere).
//!
//! Namespaces are entered per thread with `setns` (through `viscum::netns::in_netns`), never
//! with `ip netns exec`, which hides the bpffs mounts viscum depends on (see
//! `docs/toolchain.md`). Every wait is bounded and polls for the condition it needs; no test
//! sleeps to "let things settle".
//!
//! Run the tests one at a time (`--test-threads=1`); tests that need root call
//! [`skip_unless_root`] first.

pub mod cases;
pub mod clients;
pub mod dns;
pub mod fuzz;
pub mod hog;
pub mod identity;
pub mod packet;
pub mod soak;
pub mod tenant;
pub mod verdicts;
pub mod vmcheck;

// The lab lives in its own crate, shared with `cargo xtask run` and the benchmarks; these
// paths stay for the tests.
pub use viscum_lab::{daemon, guard, lab};

pub use self::{
    cases::CaseResult,
    dns::{Dns, Zone},
    guard::{Bpffs, Netns, block_on, skip_unless_root, unique_name, wait_until},
    identity::{IdentityServer, Proto, ask, tcp_ask, udp_ask, udp_ask_distinct},
    lab::{Lab, LabOptions, VlanMode},
};
