//! Network namespaces for the benchmarks: uniquely named (`<run-id>-...`), removed on drop
//! together with any process still inside them (all of which this run started): the guards
//! of `viscum_lab`, shared with the tests and the lab.
//!
//! Client/edge/cloud topologies are the lab's own ([`lab`]); the lanes that differ from it
//! are built with `ip` and `tc`: this is a benchmark harness, and the commands read the same
//! as the ones a person would type to reproduce a number.

use std::{process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use viscum_lab::{Bpffs, Lab, LabNames, LabOptions, Netns};

use super::{bpffs::PrivateBpffs, sys};

const CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `ip ARGS` (no namespace switching: use `-n NS`).
pub fn ip(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    sys::run(&mut cmd, None, CMD_TIMEOUT)?.ok(&format!("ip {}", args.join(" ")))?;
    Ok(())
}

/// Runs `program ARGS` inside `ns` and returns its stdout; fails with its stderr.
pub fn exec_in(
    ns: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<String> {
    let mut cmd = sys::command_in(Some(ns), None, program)?;
    cmd.args(args);
    let done =
        sys::run(&mut cmd, stdin, timeout)?.ok(&format!("[{ns}] {program} {}", args.join(" ")))?;
    Ok(done.stdout)
}

/// Writes a sysctl of namespace `ns` (`net/ipv4/ip_forward`), from a thread inside it
/// (`/proc/sys/net` is per network namespace).
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    let v = value.to_owned();
    let p = path.clone();
    viscum::netns::in_netns(ns, move || std::fs::write(&p, v))
        .with_context(|| format!("cannot enter {ns}"))?
        .with_context(|| format!("[{ns}] cannot write {path}"))
}

/// A network namespace `name` with its loopback up, deleted on drop together with every
/// process still in it (the guard the tests and the lab use).
pub fn create(name: &str) -> Result<Netns> {
    if name.len() > 15 {
        bail!("namespace name {name} is too long");
    }
    let ns = Netns::create(name)?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(ns)
}

/// [`create`], plus an interface `lan0` (up) for `viscum attach` or a daemon to sit on: a
/// veth with its peer alongside (some kernels here lack the dummy driver).
pub fn with_lan0(name: &str) -> Result<Netns> {
    let ns = create(name)?;
    ip(&[
        "-n", name, "link", "add", "lan0", "type", "veth", "peer", "name", "lan1",
    ])?;
    ip(&["-n", name, "link", "set", "lan0", "up"])?;
    Ok(ns)
}

/// Kills what still runs in `name` (processes this run started there) and deletes it.
pub fn remove_namespace(name: &str) {
    viscum_lab::guard::delete_quietly(name);
}

/// The lab topology of the tests and `cargo xtask run` ([`Lab`]: client `192.0.2.2` ── `lan0`
/// [edge] `wan0` ── cloud `198.51.100.7`, IPv6 too) in namespaces `{base}c`, `{base}e`,
/// `{base}k`, with its pins in directory `pins` of the run's bpffs; plus what a measurement
/// wants: permanent neighbours (no ARP during runs) and the client's full port range.
pub fn lab(bpffs: &PrivateBpffs, base: &str, pins: &str) -> Result<Lab> {
    let names = LabNames {
        client: format!("{base}c"),
        edge: format!("{base}e"),
        cloud: format!("{base}k"),
    };
    let pins = Bpffs::subdir_of(&bpffs.dir, pins)
        .with_context(|| format!("cannot create {pins} in {}", bpffs.dir.display()))?;
    let lab = Lab::build(&names, pins, LabOptions::default())?;
    lab.pin_neighbours()?;
    sysctl(
        lab.client.name(),
        "net/ipv4/ip_local_port_range",
        "1024 65535",
    )?;
    Ok(lab)
}

/// The MAC of `dev` in namespace `ns`, as `ip` writes it (`02:bb:00:00:00:01`).
pub fn mac_of(ns: &str, dev: &str) -> Result<String> {
    let (n, d) = (ns.to_owned(), dev.to_owned());
    let link = viscum::netns::in_netns(ns, move || {
        viscum_lab::block_on(async move {
            let handle = viscum::netns::handle_here().await?;
            viscum::netns::link_by_name(&handle, &d).await
        })
    })
    .with_context(|| format!("cannot enter {n}"))??;
    let mac = link
        .mac
        .with_context(|| format!("{dev} in {ns} has no MAC"))?;
    Ok(viscum::netns::format_mac(&mac))
}

/// A veth pair `a` in `ns_a` and `b` in `ns_b` with fixed MACs, both up.
pub fn veth(ns_a: &str, a: &str, mac_a: &str, ns_b: &str, b: &str, mac_b: &str) -> Result<()> {
    ip(&[
        "-n", ns_a, "link", "add", a, "address", mac_a, "type", "veth", "peer", "name", b,
        "address", mac_b, "netns", ns_b,
    ])?;
    ip(&["-n", ns_a, "link", "set", a, "up"])?;
    ip(&["-n", ns_b, "link", "set", b, "up"])?;
    Ok(())
}

/// A permanent neighbour entry, so no ARP runs during measurements (and none is needed where a
/// classifier redirects every frame, ARP included).
pub fn neigh(ns: &str, dev: &str, addr: &str, mac: &str) -> Result<()> {
    ip(&[
        "-n",
        ns,
        "neigh",
        "replace",
        addr,
        "lladdr",
        mac,
        "dev",
        dev,
        "nud",
        "permanent",
    ])
}
