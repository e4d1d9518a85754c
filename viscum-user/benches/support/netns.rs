//! Network namespaces for the benchmarks: uniquely named (`<run-id>-...`), removed on drop
//! together with any process still inside them (all of which this run started).
//!
//! Topology is built with `ip` and `tc`: this is a benchmark harness, and the commands read the
//! same as the ones a person would type to reproduce a number.

use std::{process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};

use super::sys;

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

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Ns {
    pub name: String,
}

impl Ns {
    /// `ip netns add NAME`, loopback up.
    pub fn create(name: &str) -> Result<Ns> {
        if name.len() > 15 {
            bail!("namespace name {name} is too long");
        }
        ip(&["netns", "add", name])?;
        let ns = Ns {
            name: name.to_owned(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Takes ownership of a namespace someone else created (`viscum ns add`).
    pub fn adopt(name: &str) -> Ns {
        Ns {
            name: name.to_owned(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        remove_namespace(&self.name);
    }
}

/// Kills what still runs in `name` (processes this run started there) and deletes it.
pub fn remove_namespace(name: &str) {
    if !std::path::Path::new("/run/netns").join(name).exists() {
        return;
    }
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    // Not through `ip()`: cleanup must also work after a stop request, which makes bounded
    // waits give up.
    match Command::new("ip").args(["netns", "del", name]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "bench: cannot delete namespace {name}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("bench: cannot run ip netns del {name}: {e}"),
    }
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
