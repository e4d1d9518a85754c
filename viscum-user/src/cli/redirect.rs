//! `viscum redirect add|del|list`.

use clap::{Args, Subcommand};

use super::{Result, print_json, print_table};
use crate::{
    endpoint::Endpoint,
    engine::{Engine, Pins},
    redirect::{self, Target},
};

#[derive(Debug, Subcommand)]
pub enum RedirectCommand {
    /// Redirect PROTO://ADDR[:PORT] into a service namespace.
    Add(AddArgs),
    /// Delete the entry for PROTO://ADDR[:PORT]; its traffic goes to the cloud again.
    Del(DelArgs),
    /// List entries with their targets and counters.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// What to match: tcp://198.51.100.7:80, udp://[2001:db8::7]:53, or
    /// tcp://198.51.100.7 for every port of the address.
    #[arg(value_name = "PROTO://ADDR[:PORT]")]
    pub endpoint: Endpoint,
    /// Service namespace made with `viscum ns add`.
    #[arg(long, value_name = "NAME", required_unless_present = "to", conflicts_with = "to")]
    pub ns: Option<String>,
    /// Host side of a veth into a namespace Viscum did not create (its routes are yours).
    #[arg(long, value_name = "HOST_VETH")]
    pub to: Option<String>,
}

#[derive(Debug, Args)]
pub struct DelArgs {
    /// The entry's match, as given to `redirect add`.
    #[arg(value_name = "PROTO://ADDR[:PORT]")]
    pub endpoint: Endpoint,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(pins: &Pins, cmd: RedirectCommand) -> Result<()> {
    let mut engine = Engine::open(pins)?;
    match cmd {
        RedirectCommand::Add(args) => {
            let target = match (args.ns, args.to) {
                (Some(ns), _) => Target::Namespace(ns),
                (None, Some(to)) => Target::Veth(to),
                (None, None) => unreachable!("clap requires --ns or --to"),
            };
            redirect::add(&mut engine, &args.endpoint, &target).await?;
            let to = match &target {
                Target::Namespace(n) => format!("namespace {n}"),
                Target::Veth(v) => v.clone(),
            };
            println!("redirecting {} to {to}", args.endpoint);
        }
        RedirectCommand::Del(args) => {
            redirect::del(&mut engine, &args.endpoint).await?;
            println!("deleted {}", args.endpoint);
        }
        RedirectCommand::List(args) => {
            let rows = redirect::list(&engine).await?;
            if args.json {
                print_json(&rows)?;
            } else {
                print_entries(&rows);
            }
        }
    }
    Ok(())
}

pub(super) fn print_entries(rows: &[redirect::EntryRow]) {
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.endpoint.clone(),
                r.target.clone(),
                r.ns.clone().unwrap_or_else(|| "-".into()),
                r.packets.to_string(),
                r.bytes.to_string(),
            ]
        })
        .collect();
    print_table(&["MATCH", "TARGET", "NAMESPACE", "PACKETS", "BYTES"], &table);
}
