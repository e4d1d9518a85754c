//! Viscum user space: the loader, the CLI and the daemon.
//!
//! # Layout
//!
//! * [`bpffs`]: finding or mounting the bpffs directory that holds the pins.
//! * [`endpoint`]: `PROTO://ADDR[:PORT]` parsing and its map key encoding.
//! * [`engine`]: loading, attaching and pinning the classifier; editing its maps.
//! * [`features`]: what this kernel offers (TCX or clsact, BTF, JIT, helpers), `viscum doctor`.
//! * [`hostnames`]: cloud host names resolved and kept in step with DNS TTLs.
//! * [`netns`]: named network namespaces, veths, addresses and routes over netlink.
//! * [`redirect`]: redirect entries plus the local routes they need in service namespaces.
//! * [`spec`]: the one redirect spec (match, from, target, mode, learning) of the CLI, the
//!   config and [`embed`], with its validation.
//! * [`entries`]: one owner's entries: install, drain and wait, remove with counters kept.
//! * [`lifecycle`]: entries whose target veth was deleted and re-created, re-pointed by name.
//! * [`embed`]: the small API for firmware that runs the engine inside its own daemon.
//! * [`config`]: the daemon's TOML configuration: parsing and validation that reports every problem.
//! * [`daemon`]: `viscum run`: supervised services, health-gated redirects, reload, control socket.
//! * [`uci`]: OpenWrt's UCI configuration mapped onto the TOML one (`viscum config from-uci`).
//! * [`cli`]: the `viscum` command line, one module per command.

pub mod bpffs;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod embed;
pub mod endpoint;
pub mod engine;
pub mod entries;
pub mod features;
#[cfg(feature = "fleet")]
pub mod fleet;
pub mod hostnames;
pub mod lifecycle;
pub mod netns;
pub mod redirect;
pub mod shares;
pub mod spec;
pub mod uci;

/// The compiled classifier: the ELF object aya-build made from `viscum-ebpf` (bpfel or
/// bpfeb, after the target's byte order; [`features::check_object`] refuses a mismatch),
/// embedded at build time and aligned for aya's loader.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/viscum"));
