//! Viscum inside another program, through `viscum::embed`: attach the classifier, make a
//! service namespace, redirect a cloud address into it, and undo it all on Ctrl-C.
//!
//! ```text
//! cargo run --example embed -- --bpffs /sys/fs/bpf/viscum-demo --iface br-lan \
//!     --ns demo --match tcp://198.51.100.7:5201
//! ```
//!
//! Then run the edge copy of the service inside the namespace (`ip netns exec demo
//! iperf3 -s`): clients behind `br-lan` asking 198.51.100.7:5201 are served by it, until
//! Ctrl-C, when the entry drains (up to 5 s) and is removed, and the cloud serves again.
//! Needs root. `tests/tests/embed.rs` runs [`up`] and [`down`] in a test topology with real
//! clients.

use std::time::Duration;

use viscum::embed::{EmbedError, Endpoint, RedirectSpec, SpecFields, Target, Viscum};

/// What the example sets up.
#[derive(Debug, Clone)]
pub struct Options {
    /// bpffs directory of the instance (`--bpffs`).
    pub bpffs: String,
    /// Client-facing interface to attach to (`--iface`).
    pub iface: String,
    /// Service namespace to create and redirect into (`--ns`).
    pub ns: String,
    /// What to redirect, as `viscum redirect add` takes it (`--match`).
    pub matched: String,
    /// `--learn-ms` (optional).
    pub learn_ms: Option<i64>,
}

/// Attaches, creates the namespace and adds the redirect; returns the entries added.
pub async fn up(opts: &Options) -> Result<Vec<Endpoint>, EmbedError> {
    let viscum = Viscum::new(&opts.bpffs)?;
    for (iface, outcome) in viscum.attach(&[&opts.iface])? {
        println!("{iface}: {outcome:?}");
    }
    let ns = viscum.ns_add(&opts.ns).await?;
    println!("namespace {} (its address {})", ns.name, ns.ns_addr);
    let fields = SpecFields {
        matches: vec![opts.matched.clone()],
        learn_ms: opts.learn_ms,
        ..SpecFields::default()
    };
    let spec = RedirectSpec::new(&fields, Target::Namespace(opts.ns.clone()))?;
    let added = viscum.add(&spec).await?;
    for row in viscum.list().await? {
        println!("{} -> {} ({})", row.endpoint, row.target, row.mode);
    }
    Ok(added)
}

/// Removes the entries (draining up to `drain`), the namespace, and the classifier.
pub async fn down(opts: &Options, added: &[Endpoint], drain: Duration) -> Result<(), EmbedError> {
    let viscum = Viscum::new(&opts.bpffs)?;
    for r in viscum.remove(added, drain).await? {
        println!(
            "removed {} ({} packets, {} edge flows, {} cut)",
            r.endpoint, r.counters.packets, r.counters.edge_flows, r.cut_flows
        );
    }
    viscum.ns_del(&opts.ns).await?;
    viscum.purge()
}

/// `--bpffs DIR --iface IFACE --ns NAME --match MATCH [--learn-ms MS]`.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
    let mut args = args.into_iter();
    let (mut bpffs, mut iface, mut ns, mut matched, mut learn_ms) = (None, None, None, None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--bpffs" => bpffs = Some(value),
            "--iface" => iface = Some(value),
            "--ns" => ns = Some(value),
            "--match" => matched = Some(value),
            "--learn-ms" => learn_ms = Some(value.parse().map_err(|_| "--learn-ms: not a number")?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let need = |v: Option<String>, name: &str| v.ok_or(format!("{name} is required"));
    Ok(Options {
        bpffs: need(bpffs, "--bpffs")?,
        iface: need(iface, "--iface")?,
        ns: need(ns, "--ns")?,
        matched: need(matched, "--match")?,
        learn_ms,
    })
}

#[allow(
    dead_code,
    reason = "the test that includes this file drives up/down itself"
)]
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let opts = parse_args(std::env::args().skip(1))?;
    let added = up(&opts).await?;
    println!("serving; Ctrl-C to undo");
    tokio::signal::ctrl_c().await?;
    down(&opts, &added, Duration::from_secs(5)).await?;
    Ok(())
}
