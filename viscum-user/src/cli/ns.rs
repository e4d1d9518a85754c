//! `viscum ns add|del|list`.

use clap::{Args, Subcommand};

use super::{Result, print_json, print_table};
use crate::{
    engine::{Engine, EngineError, Pins},
    netns, redirect,
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
        }
        NsCommand::Del(NameArg { name }) => {
            netns::validate_name(&name)?;
            let ns = netns::service_ns_get(&name).await?;
            // Entries first, so traffic falls back to the cloud before the
            // namespace disappears rather than being redirected into nothing.
            match Engine::open(pins) {
                Ok(mut engine) => {
                    for ep in redirect::del_all_to(&mut engine, ns.host_ifindex).await? {
                        println!("deleted {ep}");
                    }
                    crate::engine::detach_reply(pins, &ns.host_veth)?;
                }
                Err(EngineError::NotAttached(_)) => {}
                Err(e) => return Err(e.into()),
            }
            netns::service_ns_del(&name).await?;
            println!("deleted namespace {name}");
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
