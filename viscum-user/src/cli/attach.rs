//! `viscum attach` and `viscum detach`.

use anyhow::Context as _;
use clap::Args;
use viscum_common::{DEFAULT_FLOW_ENTRIES, DEFAULT_MAX_ENTRIES};

use super::Result;
use crate::engine::{self, AttachOutcome, Pins};

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Client-facing interfaces (e.g. br-lan, eth0.100); not the loopback, a service
    /// namespace's veth or another redirect target.
    #[arg(required = true, value_name = "IFACE", value_parser = super::parse_iface)]
    pub ifaces: Vec<String>,
    /// Capacity of the services map; only used when the datapath is first loaded.
    #[arg(long, default_value_t = DEFAULT_MAX_ENTRIES, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub max_entries: u32,
    /// Capacity of the flow table (LRU: the oldest flows are evicted when
    /// full); only used when the datapath is first loaded.
    #[arg(long, default_value_t = DEFAULT_FLOW_ENTRIES, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub flow_table_size: u32,
    /// Forget an idle TCP flow after this many seconds.
    #[arg(long, default_value_t = viscum_common::DEFAULT_TCP_IDLE_SECS, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub tcp_idle: u64,
    /// Forget an idle UDP flow after this many seconds.
    #[arg(long, default_value_t = viscum_common::DEFAULT_UDP_IDLE_SECS, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub udp_idle: u64,
    /// Keep a TCP flow's decision this many seconds after its FIN/RST.
    #[arg(long, default_value_t = viscum_common::DEFAULT_LINGER_SECS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub linger: u64,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    /// Interfaces to detach from.
    #[arg(
        value_name = "IFACE",
        value_parser = super::parse_iface,
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub ifaces: Vec<String>,
    /// Detach from every interface this instance is attached to.
    #[arg(long)]
    pub all: bool,
    /// With --all: also remove the pinned program and maps (every entry is lost).
    #[arg(long, requires = "all")]
    pub purge: bool,
}

pub fn attach(pins: &Pins, args: AttachArgs) -> Result<()> {
    // Every name is checked before anything is loaded or attached.
    on_own_runtime(refuse_non_client(pins, &args.ifaces))?;
    let sizes = engine::MapSizes {
        services: args.max_entries,
        flows: args.flow_table_size,
    };
    let done = engine::attach(pins, &args.ifaces, sizes)?;
    const S: u64 = 1_000_000_000;
    engine::Engine::open(pins)?.set_timeouts(
        args.tcp_idle * S,
        args.udp_idle * S,
        args.linger * S,
    )?;
    // Say which mechanisms this kernel got, so a degraded box is visible
    // at the prompt (`viscum doctor` has the whole report).
    let redirect = crate::features::redirect_mode(crate::features::has_redirect_peer());
    let kernel = crate::features::kernel_release();
    for (iface, outcome) in done {
        match outcome {
            AttachOutcome::Tcx => {
                println!("attached to {iface} (tcx; kernel {kernel}; redirect: {redirect})");
            }
            AttachOutcome::Clsact => {
                println!("attached to {iface} (clsact; kernel {kernel}; redirect: {redirect})");
            }
            AttachOutcome::Reattached { tcx } => println!(
                "re-attached to {iface} ({}; kernel {kernel}; redirect: {redirect}): the \
                 interface had been re-created or the classifier removed",
                if tcx { "tcx" } else { "clsact" }
            ),
            AttachOutcome::AlreadyAttached => println!("already attached to {iface}"),
        }
    }
    // Without a daemon nothing else watches links: `attach` is the command that brings the
    // datapath back in line after interfaces were re-created, redirect targets included. A
    // failure here is only reported: the attachment itself succeeded.
    if let Err(e) = on_own_runtime(recover_targets(pins)) {
        log::warn!("{e:#}");
    }
    for problem in crate::features::forwarding_problems() {
        log::warn!("{problem}");
    }
    Ok(())
}

/// Refuses interfaces that cannot be client-facing: the loopback, the host side of a service
/// namespace's veth (found by what it is, whatever its name), and any interface entries
/// redirect into (the reply classifier runs there). Attaching the ingress classifier to one
/// of these would redirect the services' own replies.
async fn refuse_non_client(pins: &Pins, ifaces: &[String]) -> Result<()> {
    for iface in ifaces {
        crate::config::client_interface(iface).map_err(anyhow::Error::msg)?;
        let Ok(index) = engine::ifindex(iface) else {
            continue; // engine::attach names it (it does not exist)
        };
        let loopback = nix::ifaddrs::getifaddrs().is_ok_and(|mut all| {
            all.any(|a| {
                a.interface_name == *iface
                    && a.flags
                        .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
            })
        });
        if loopback {
            anyhow::bail!(
                "'{iface}' is a loopback interface: attach to the client-facing interface (e.g. br-lan)"
            );
        }
        if let Some(ns) = crate::netns::service_ns_by_host_ifindex(index)
            .await
            .context("cannot check the interface")?
        {
            anyhow::bail!(
                "'{iface}' is the host side of service namespace {ns}'s veth: attach to the \
                 client-facing interface (e.g. br-lan)"
            );
        }
        if engine::attach::reply_attached(pins, iface) {
            anyhow::bail!(
                "'{iface}' is a redirect target (entries send traffic into it): attach to the \
                 client-facing interface (e.g. br-lan)"
            );
        }
    }
    Ok(())
}

/// Runs `f` to completion on a private current-thread runtime on a thread of its own:
/// `attach` is synchronous but called from inside the CLI's runtime, where blocking on a
/// future would panic. (The thread shares the process's network namespace.)
fn on_own_runtime<T: Send>(f: impl std::future::Future<Output = Result<T>> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start an async runtime")?
                .block_on(f)
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the target check panicked")))
    })
}

/// Re-points entries whose target veth was re-created (see [`crate::lifecycle`]) and says
/// which ones still wait for their target.
pub(super) async fn recover_targets(pins: &Pins) -> Result<()> {
    let mut engine = engine::Engine::open(pins)?;
    let report = crate::lifecycle::recover_targets(&mut engine, &|_| false)
        .await
        .context("cannot check the redirect targets")?;
    for r in &report.recovered {
        println!(
            "redirect {} follows {} again (re-created: ifindex {} -> {})",
            r.endpoint, r.target, r.old_ifindex, r.new_ifindex
        );
    }
    for (ep, why) in &report.failed {
        eprintln!("viscum: cannot re-point {ep} at its re-created target: {why}");
    }
    for w in &report.waiting {
        eprintln!(
            "note: the target of {} is gone ({}); its traffic goes to the cloud until it is back",
            w.endpoint,
            w.name.as_deref().map_or_else(
                || format!("ifindex {}", w.ifindex),
                std::borrow::ToOwned::to_owned
            )
        );
    }
    Ok(())
}

pub fn detach(pins: &Pins, args: DetachArgs) -> Result<()> {
    if args.all {
        let ifaces = engine::attach::recorded_interfaces(pins);
        if args.purge {
            engine::purge(pins).with_context(|| format!("cannot purge {}", pins.dir.display()))?;
            println!(
                "detached from {} interface(s) and removed all pins under {}",
                ifaces.len(),
                pins.dir.display()
            );
        } else {
            engine::detach(pins, &ifaces)?;
            println!("detached from {} interface(s)", ifaces.len());
        }
        return Ok(());
    }
    engine::detach(pins, &args.ifaces)?;
    for iface in &args.ifaces {
        println!("detached from {iface}");
    }
    Ok(())
}
