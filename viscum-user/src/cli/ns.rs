//! `viscum ns add|del|list`.

use clap::{Args, Subcommand};

use super::{Result, print_json, print_table};
use crate::{
    engine::{self, Engine, EngineError, Pins},
    lifecycle,
    netns::{self, NetnsError},
    redirect,
};

#[derive(Debug, Subcommand)]
pub enum NsCommand {
    /// Create a service namespace NAME (visible to `ip netns exec NAME ...`).
    Add(NameArg),
    /// Delete a service namespace, its veth and every entry into it.
    Del(NameArg),
    /// List service namespaces.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct NameArg {
    /// 1-12 characters: a-z, 0-9, '-', '_'.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(pins: &Pins, cmd: NsCommand) -> Result<()> {
    match cmd {
        NsCommand::Add(NameArg { name }) => {
            let ns = netns::service_ns_add(&name).await?;
            println!(
                "created namespace {} ({} <-> {}, {} <-> {})",
                ns.name, ns.host_veth, ns.ns_veth, ns.host_addr, ns.ns_addr
            );
            // The namespace exists whatever this says: a failure is only reported.
            if let Err(e) = restore_entries(pins, &ns).await {
                log::warn!(
                    "cannot attach the reply path to {} or check for entries waiting for it: {e:#}",
                    ns.host_veth
                );
            }
        }
        NsCommand::Del(NameArg { name }) => {
            netns::validate_name(&name)?;
            let host_veth = netns::host_veth_name(&name);
            let ns = match netns::service_ns_get(&name).await {
                Ok(ns) => Some(ns),
                // Remnants: a lone host veth, a namespace without its veth, a stale file.
                Err(NetnsError::UnknownNamespace { .. } | NetnsError::Incomplete { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            // Entries first, so traffic falls back to the cloud before the namespace
            // disappears rather than being redirected into nothing; entries whose target
            // (this namespace's veth) is already gone go too: the namespace is gone for good.
            match Engine::open(pins) {
                Ok(mut engine) => {
                    let ifindex = ns
                        .as_ref()
                        .map(|n| n.host_ifindex)
                        .or_else(|| nix::net::if_::if_nametoindex(host_veth.as_str()).ok());
                    if let Some(ifindex) = ifindex {
                        for ep in redirect::del_all_to(&mut engine, ifindex).await? {
                            println!("deleted {ep}");
                        }
                    }
                    for gone in lifecycle::gone_targets(&engine)? {
                        if gone.name.as_deref() == Some(host_veth.as_str()) {
                            engine.remove(&gone.endpoint)?;
                            println!("deleted {} (its target was already gone)", gone.endpoint);
                        }
                    }
                    engine::detach_reply(pins, &host_veth)?;
                }
                Err(EngineError::NotAttached(_)) => {}
                Err(e) => return Err(e.into()),
            }
            let stale = std::path::Path::new(netns::NETNS_RUN_DIR).join(&name);
            let stale = stale.symlink_metadata().is_ok() && !netns::named_exists(&name);
            // What `ip netns exec NAME server` started there outlives the name and the veth,
            // unreachable: said, not killed (they are the user's processes).
            let inside = netns::pids_in(&name);
            match netns::service_ns_del(&name).await {
                Ok(()) => {
                    println!("deleted namespace {name}");
                    if !inside.is_empty() {
                        let pids: Vec<String> = inside.iter().map(ToString::to_string).collect();
                        log::warn!(
                            "{} process(es) still run in the deleted namespace {name}, unreachable: pid {} (stop them with `kill {}`)",
                            inside.len(),
                            pids.join(", "),
                            pids.join(" ")
                        );
                    }
                }
                Err(NetnsError::UnknownNamespace { .. }) if stale => {}
                Err(e) => return Err(e.into()),
            }
            // A file without a namespace mounted on it (left by `ip netns exec viscum ns add`
            // of older versions, or a crash half-way) blocks the name; it goes too.
            if stale
                && std::path::Path::new(netns::NETNS_RUN_DIR)
                    .join(&name)
                    .exists()
            {
                netns::delete_named(&name)?;
                println!(
                    "removed the stale {}/{name} (no namespace was mounted on it)",
                    netns::NETNS_RUN_DIR
                );
            }
        }
        NsCommand::List(ListArgs { json }) => {
            let list = netns::service_ns_list().await?;
            if json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|n| {
                    vec![
                        n.name.clone(),
                        n.host_veth.clone(),
                        n.host_addr.clone(),
                        n.ns_addr.clone(),
                        if n.local_routes.is_empty() {
                            "-".into()
                        } else {
                            n.local_routes.join(",")
                        },
                    ]
                })
                .collect();
            print_table(
                &["NAME", "HOST_VETH", "HOST_ADDR", "NS_ADDR", "LOCAL_ROUTES"],
                &rows,
            );
        }
    }
    Ok(())
}

/// With an attached instance: the reply classifier on the new host veth, and entries into
/// this namespace from before it was deleted and re-created (`ip netns del`, a restarted
/// container) follow it again: the same `vh-NAME` target, as `viscum run` does on its own
/// when it sees the veth come back (see [`crate::lifecycle`]).
async fn restore_entries(pins: &Pins, ns: &netns::ServiceNs) -> Result<()> {
    let mut engine = match Engine::open(pins) {
        Ok(engine) => engine,
        Err(EngineError::NotAttached(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    // The reply path is part of the namespace's plumbing from now on (kept until `ns del`,
    // see `redirect::release_reply_path`), so the first `redirect add` into it does not
    // wait for the TCX link's RCU grace period.
    engine::attach_reply(pins, &ns.host_veth)?;
    let veth = ns.host_veth.clone();
    let report = lifecycle::recover_targets(&mut engine, &|name| name != veth).await?;
    for r in &report.recovered {
        println!(
            "redirecting {} into namespace {} again (start its service there)",
            r.endpoint, ns.name
        );
    }
    for (ep, why) in &report.failed {
        eprintln!("viscum: cannot redirect {ep} into the new namespace: {why}");
    }
    Ok(())
}
