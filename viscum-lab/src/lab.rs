//! The lab topology: a client, an edge box and a cloud, each in its own namespace, and the
//! real `viscum` binary run inside the edge.
//!
//! ```text
//!  client                      edge                         cloud
//!  eth0 ──────── veth ──────── lan0   (classifier here)
//!  192.0.2.2/24                192.0.2.1/24
//!  2001:db8:c::2/64            2001:db8:c::1/64
//!                              wan0 ──────── veth ──────── eth0
//!                              198.51.100.1/24             198.51.100.7/24
//!                              2001:db8:f::1/64            2001:db8:f::7/64
//! ```
//!
//! One builder for everything that needs this topology: the integration tests ([`Lab::new`],
//! unique names, panics on failure), `cargo xtask run` (the `viscum-lab` binary: fixed names
//! from [`LabNames::with_prefix`], errors returned by [`Lab::build`]) and the benchmarks.
//!
//! With [`LabOptions::vlan`] the client and the edge talk through 802.1Q: the LAN addresses
//! move to VLAN interfaces and the veth `lan0` becomes the tagged trunk, which stays the
//! classifier's attach point ([`Lab::lan_if`]). Kernels without 802.1Q support get the same
//! tagged trunk from BPF taggers instead of VLAN devices ([`VlanMode`]).

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use netlink_packet_route::neighbour::NeighbourState;
use viscum::netns::{self, NETNS_RUN_DIR, NetnsError};

use crate::{
    guard::{Bpffs, Netns, block_on, delete_quietly, unique_name},
    vlan::{self, Tag},
};

/// The edge's client-facing interface (the trunk, with a VLAN): where tests attach viscum.
pub const LAN_IF: &str = "lan0";
/// The edge's cloud-facing interface.
pub const WAN_IF: &str = "wan0";
/// The client's interface (the trunk, with a VLAN).
pub const CLIENT_IF: &str = "eth0";
/// The cloud's interface.
pub const CLOUD_IF: &str = "eth0";

/// The client's IPv4 address (/24).
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The edge's LAN IPv4 address, the client's gateway (/24).
pub const EDGE_LAN_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The client's IPv6 address (/64).
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 2);
/// The edge's LAN IPv6 address, the client's gateway (/64).
pub const EDGE_LAN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1);
/// The edge's WAN IPv4 address, the cloud's gateway (/24).
pub const EDGE_WAN_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The cloud service's IPv4 address (/24).
pub const CLOUD_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// The edge's WAN IPv6 address, the cloud's gateway (/64).
pub const EDGE_WAN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 1);
/// The cloud service's IPv6 address (/64).
pub const CLOUD_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 7);

/// How long building the lab may wait for its links to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one `viscum` command may run before it is killed.
const VISCUM_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the lab could not be built; what was left of it has been removed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A namespace, link, address, route or sysctl could not be made.
    #[error("{what}: {source}")]
    Netns {
        /// The step, e.g. "create namespace vlab-edge".
        what: String,
        /// The error from Viscum's namespace and netlink layer.
        #[source]
        source: NetnsError,
    },
    /// A system call outside netlink failed (a VLAN tagger, the bpffs).
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: String,
        /// The OS error of the failed call.
        #[source]
        source: io::Error,
    },
    /// Links did not come up with carrier and a real qdisc in time.
    #[error("{0}")]
    NotReady(String),
}

impl LabError {
    fn netns(what: impl Into<String>) -> impl FnOnce(NetnsError) -> LabError {
        let what = what.into();
        move |source| LabError::Netns { what, source }
    }
}

/// The names of the lab's three namespaces (`/run/netns/NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabNames {
    /// The client.
    pub client: String,
    /// The edge box, where viscum runs.
    pub edge: String,
    /// The cloud.
    pub cloud: String,
}

impl LabNames {
    /// Names no other lab uses ([`unique_name`] with prefix `vt`): for tests.
    pub fn unique() -> LabNames {
        LabNames {
            client: unique_name("vt"),
            edge: unique_name("vt"),
            cloud: unique_name("vt"),
        }
    }

    /// `PREFIX-client`, `PREFIX-edge`, `PREFIX-cloud`: fixed names, so a new lab finds and
    /// removes what a crashed one left behind (`cargo xtask run` uses `vlab`).
    pub fn with_prefix(prefix: &str) -> LabNames {
        LabNames {
            client: format!("{prefix}-client"),
            edge: format!("{prefix}-edge"),
            cloud: format!("{prefix}-cloud"),
        }
    }

    /// The three names, client first.
    pub fn all(&self) -> [&str; 3] {
        [&self.client, &self.edge, &self.cloud]
    }
}

/// Variations of the lab.
#[derive(Debug, Clone, Copy, Default)]
pub struct LabOptions {
    /// Put the client-edge LAN on this 802.1Q VLAN: frames on the `lan0` trunk carry the
    /// tag, and the LAN addresses move to VLAN interfaces (which ones: [`VlanMode`],
    /// [`Lab::lan_l3_if`]).
    pub vlan: Option<u16>,
}

/// The client/edge/cloud topology, a private bpffs for viscum's pins, and the service
/// namespaces a test tells it about. Everything is removed on drop, panics included.
pub struct Lab {
    // Field order is drop order: the bpffs goes first, detaching what is pinned in it while
    // the interfaces still exist.
    /// viscum's pins for this lab (passed as `--bpffs`).
    pub bpffs: Bpffs,
    /// The client namespace.
    pub client: Netns,
    /// The edge box namespace, where viscum runs.
    pub edge: Netns,
    /// The cloud namespace.
    pub cloud: Netns,
    options: LabOptions,
    /// The edge interface carrying the LAN addresses.
    lan_l3: String,
    /// How the VLAN is made, if there is one.
    vlan_mode: Option<VlanMode>,
    /// TCX links of the BPF taggers ([`VlanMode::Bpf`]); dropping them detaches them.
    taggers: Vec<OwnedFd>,
    /// Service namespaces to delete on drop (created by viscum during the test).
    service_ns: Mutex<Vec<String>>,
}

/// How [`LabOptions::vlan`] is realised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VlanMode {
    /// Kernel 802.1Q devices: `eth0.VID` in the client, `lan0.VID` on the edge.
    Kernel,
    /// The kernel has no 802.1Q support (`CONFIG_VLAN_8021Q` unset): TC programs push the
    /// tag on egress and pop it on ingress of the client's `eth0` and of a passthru macvlan
    /// `lan0vVID` on the edge, which takes over `lan0`'s MAC and all its traffic after
    /// `lan0`'s TC ingress hook, as a VLAN subinterface would. The trunk `lan0` carries
    /// tagged frames either way.
    Bpf,
}

impl Lab {
    /// Builds the plain lab (no VLAN). Panics on failure, after cleaning up.
    pub fn new() -> Lab {
        Lab::with_options(LabOptions::default())
    }

    /// Builds the lab with `options` (unique names, a bpffs under [`crate::BPFFS_TEST_ROOT`]).
    /// Returns once every link is ready to carry traffic; panics on failure, after cleaning
    /// up.
    pub fn with_options(options: LabOptions) -> Lab {
        Lab::build(&LabNames::unique(), Bpffs::new(), options)
            .unwrap_or_else(|e| panic!("build lab: {e}"))
    }

    /// Builds the lab in namespaces `names` (which must not exist yet), with `bpffs` for
    /// viscum's pins. Returns once every link is ready to carry traffic, or the first step
    /// that failed, with everything made until then removed.
    pub fn build(names: &LabNames, bpffs: Bpffs, options: LabOptions) -> Result<Lab, LabError> {
        let create = |name: &str| {
            Netns::create(name).map_err(LabError::netns(format!("create namespace {name}")))
        };
        // Built in place, so a failure half-way is cleaned up by Drop like any other.
        let mut lab = Lab {
            bpffs,
            client: create(&names.client)?,
            edge: create(&names.edge)?,
            cloud: create(&names.cloud)?,
            options,
            lan_l3: LAN_IF.to_string(),
            vlan_mode: None,
            taggers: Vec::new(),
            service_ns: Mutex::new(Vec::new()),
        };
        lab.build_links()?;
        Ok(lab)
    }

    fn build_links(&mut self) -> Result<(), LabError> {
        let sysctl = |ns: &Netns, key: &str, value: &str| {
            netns::sysctl_set(Some(ns.name()), key, value).map_err(LabError::netns(format!(
                "set {key}={value} in {}",
                ns.name()
            )))
        };
        for ns in [&self.client, &self.edge, &self.cloud] {
            // Before any interface exists, so all of them inherit it: addresses (link-local
            // ones included) are usable at once instead of after a second of DAD.
            sysctl(ns, "net/ipv6/conf/all/accept_dad", "0")?;
            sysctl(ns, "net/ipv6/conf/default/accept_dad", "0")?;
        }
        // A new namespace copies these from the machine's (devconf_inherit_init_net=0), and
        // distributions often set rp_filter there; the edge routes between its links.
        let edge = &self.edge;
        sysctl(edge, "net/ipv4/ip_forward", "1")?;
        sysctl(edge, "net/ipv6/conf/all/forwarding", "1")?;
        sysctl(edge, "net/ipv4/conf/all/rp_filter", "0")?;
        sysctl(edge, "net/ipv4/conf/default/rp_filter", "0")?;

        let (client, edge, cloud) = (
            self.client.name().to_string(),
            self.edge.name().to_string(),
            self.cloud.name().to_string(),
        );
        let vlan = self.options.vlan;
        let built = block_on(async move { build_links(&client, &edge, &cloud, vlan).await })?;
        for ifname in &built.edge_ifs {
            sysctl(
                &self.edge,
                &format!("net/ipv4/conf/{ifname}/rp_filter"),
                "0",
            )?;
        }
        for (ns, ifindex, ingress, tag) in built.taggers {
            let link = vlan::attach(&ns, ifindex, ingress, tag).map_err(|source| LabError::Io {
                what: format!("attach a VLAN tagger in {ns}"),
                source,
            })?;
            self.taggers.push(link);
        }
        self.lan_l3 = built.lan_l3;
        self.vlan_mode = built.vlan_mode;
        Ok(())
    }

    /// The edge interface the classifier attaches to: `lan0` (the trunk, with a VLAN).
    pub fn lan_if(&self) -> &'static str {
        LAN_IF
    }

    /// The edge interface holding the LAN addresses: `lan0`; with a VLAN `lan0.VID`
    /// ([`VlanMode::Kernel`]) or `lan0vVID` ([`VlanMode::Bpf`]).
    pub fn lan_l3_if(&self) -> &str {
        &self.lan_l3
    }

    /// How the VLAN was made, `None` without one.
    pub fn vlan_mode(&self) -> Option<VlanMode> {
        self.vlan_mode
    }

    /// The edge's cloud-facing interface, `wan0`.
    pub fn wan_if(&self) -> &'static str {
        WAN_IF
    }

    /// The options the lab was built with.
    pub fn options(&self) -> LabOptions {
        self.options
    }

    /// The cloud service's addresses on `port`: IPv4 first, then IPv6.
    pub fn cloud_addrs(&self, port: u16) -> [SocketAddr; 2] {
        [
            SocketAddr::new(IpAddr::V4(CLOUD_V4), port),
            SocketAddr::new(IpAddr::V6(CLOUD_V6), port),
        ]
    }

    /// The index of interface `name` in the edge namespace.
    pub fn edge_ifindex(&self, name: &str) -> u32 {
        let name = name.to_string();
        self.edge.block_on(move || async move {
            let handle = netns::handle_here().await.expect("netlink in edge");
            netns::link_by_name(&handle, &name)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .index
        })
    }

    /// Tracks service namespace `name` (created by viscum during the test) so it is deleted
    /// with the lab.
    pub fn own_service_ns(&self, name: &str) {
        self.service_ns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(name.to_string());
    }

    /// A fresh, unique, valid service namespace name, already tracked by
    /// [`Lab::own_service_ns`]. Namespace names are global to the machine, so tests should
    /// use these rather than fixed names.
    pub fn service_ns_name(&self) -> String {
        let name = unique_name("sv");
        self.own_service_ns(&name);
        name
    }

    /// A `Command` for the `viscum` binary that runs in the edge namespace (setns before
    /// exec; the mount namespace stays the caller's, so the lab's bpffs is visible), with
    /// `--bpffs <the lab's bpffs>` before `args`. For commands that keep running (a daemon),
    /// spawn it and stop it yourself; for the others use [`Lab::viscum`].
    pub fn viscum_command(&self, args: &[&str]) -> Command {
        self.viscum_command_with(&viscum_bin(), args)
    }

    /// [`Lab::viscum_command`] with another copy of the binary (e.g. one an unprivileged user
    /// can execute wherever the checkout lives).
    pub fn viscum_command_with(&self, bin: &Path, args: &[&str]) -> Command {
        self.try_viscum_command(bin, args)
            .unwrap_or_else(|e| panic!("open the edge namespace: {e}"))
    }

    /// [`Lab::viscum_command_with`], failing if the edge namespace cannot be opened.
    pub fn try_viscum_command(&self, bin: &Path, args: &[&str]) -> io::Result<Command> {
        let ns_path = PathBuf::from(NETNS_RUN_DIR).join(self.edge.name());
        let ns_file = File::open(&ns_path)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--bpffs").arg(self.bpffs.path()).args(args);
        // SAFETY: only setns(2), async-signal-safe, runs between fork and exec. The file is
        // moved into the closure, so its descriptor stays open as long as the Command (it is
        // O_CLOEXEC, so viscum does not inherit it).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Runs `viscum --bpffs <lab bpffs> ARGS` in the edge namespace and returns its output.
    /// Killed (and the test panics) if it runs longer than a minute.
    pub fn viscum(&self, args: &[&str]) -> Output {
        self.viscum_within(VISCUM_TIMEOUT, args)
    }

    /// [`Lab::viscum`] with another time limit: loading the datapath under an emulated CPU
    /// (the VM kernel matrix) keeps the verifier busy for minutes.
    pub fn viscum_within(&self, timeout: Duration, args: &[&str]) -> Output {
        self.run_viscum(&viscum_bin(), timeout, args)
            .unwrap_or_else(|e| panic!("viscum {args:?}: {e}"))
    }

    /// Runs `BIN --bpffs <lab bpffs> ARGS` in the edge namespace and returns its output
    /// (whatever its exit status); an error if it cannot be started, or if it runs longer
    /// than `timeout` (it is killed then).
    pub fn run_viscum(&self, bin: &Path, timeout: Duration, args: &[&str]) -> io::Result<Output> {
        let mut cmd = self.try_viscum_command(bin, args)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn()?;
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        let waiter = thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(timeout) {
            Ok(output) => {
                let _ = waiter.join();
                output
            }
            Err(_) => {
                // Our own child, by its pid; the waiter reaps it.
                // SAFETY: plain kill(2) on the pid of a child not yet reaped.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                let _ = waiter.join();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("ran longer than {timeout:?} and was killed"),
                ))
            }
        }
    }

    /// Runs viscum (see [`Lab::viscum`]): its stdout if it succeeded, otherwise an error naming
    /// the command, its exit status and its stderr. For checks that report rather than panic.
    pub fn viscum_checked(&self, args: &[&str]) -> Result<String, String> {
        let out = self.viscum(args);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "viscum {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Runs viscum (see [`Lab::viscum`]), asserts it succeeded and returns its stdout.
    pub fn viscum_ok(&self, args: &[&str]) -> String {
        let out = self.viscum(args);
        assert!(
            out.status.success(),
            "viscum {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs viscum (see [`Lab::viscum`]), asserts it failed and returns its stderr.
    pub fn viscum_err(&self, args: &[&str]) -> String {
        let out = self.viscum(args);
        assert!(
            !out.status.success(),
            "viscum {args:?} succeeded but should have failed:\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Permanent IPv4 neighbour entries, from the links' own MACs, for every peer on the two
    /// links (client and edge on the LAN, edge and cloud on the WAN), so that no ARP runs
    /// while a benchmark measures. Without a VLAN only.
    pub fn pin_neighbours(&self) -> Result<(), LabError> {
        let (client, edge, cloud) = (
            self.client.name().to_owned(),
            self.edge.name().to_owned(),
            self.cloud.name().to_owned(),
        );
        block_on(async move {
            let c = netns::handle_in(&client).await;
            let e = netns::handle_in(&edge).await;
            let k = netns::handle_in(&cloud).await;
            let (c, e, k) = (
                c.map_err(LabError::netns(format!("netlink in {client}")))?,
                e.map_err(LabError::netns(format!("netlink in {edge}")))?,
                k.map_err(LabError::netns(format!("netlink in {cloud}")))?,
            );
            // (where, on which interface, the peer's address, where the peer's MAC is)
            let pairs = [
                (&c, CLIENT_IF, EDGE_LAN_V4, &e, LAN_IF),
                (&e, LAN_IF, CLIENT_V4, &c, CLIENT_IF),
                (&e, WAN_IF, CLOUD_V4, &k, CLOUD_IF),
                (&k, CLOUD_IF, EDGE_WAN_V4, &e, WAN_IF),
            ];
            for (here, dev, addr, there, peer_dev) in pairs {
                let what = format!("neighbour {addr} on {dev}");
                let link = netns::link_by_name(here, dev)
                    .await
                    .map_err(LabError::netns(what.clone()))?;
                let mac = netns::link_by_name(there, peer_dev)
                    .await
                    .map_err(LabError::netns(what.clone()))?
                    .mac
                    .ok_or_else(|| LabError::NotReady(format!("{what}: {peer_dev} has no MAC")))?;
                here.neighbours()
                    .add(link.index, IpAddr::V4(addr))
                    .link_layer_address(&mac)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
                    .map_err(|e| LabError::Io {
                        what,
                        source: io::Error::other(e),
                    })?;
            }
            Ok(())
        })
    }

    /// Points the client's neighbour entries for its gateway (the edge's LAN addresses, IPv4
    /// and IPv6) at `mac` (permanent), or, with `None`, removes them so that ARP and neighbour
    /// discovery find the edge again. With a MAC that is not `lan0`'s the edge receives the
    /// client's frames as `PACKET_OTHERHOST`, as a bridge port whose own MAC is not the
    /// bridge's receives those addressed to the bridge (a Wi-Fi interface under `br-lan`).
    /// Without a VLAN only.
    pub fn set_client_gateway_mac(&self, mac: Option<[u8; 6]>) -> Result<(), LabError> {
        let client = self.client.name().to_owned();
        block_on(async move {
            let c = netns::handle_in(&client)
                .await
                .map_err(LabError::netns(format!("netlink in {client}")))?;
            let link = netns::link_by_name(&c, CLIENT_IF)
                .await
                .map_err(LabError::netns(format!("{CLIENT_IF} in {client}")))?;
            for addr in [IpAddr::V4(EDGE_LAN_V4), IpAddr::V6(EDGE_LAN_V6)] {
                let what = format!("neighbour {addr} on {CLIENT_IF} in {client}");
                let io = |e: rtnetlink::Error| LabError::Io {
                    what: what.clone(),
                    source: io::Error::other(e),
                };
                match mac {
                    Some(mac) => c
                        .neighbours()
                        .add(link.index, addr)
                        .link_layer_address(&mac)
                        .state(NeighbourState::Permanent)
                        .replace()
                        .execute()
                        .await
                        .map_err(io)?,
                    None => {
                        let mut found = c.neighbours().get().execute();
                        while let Some(n) = futures::TryStreamExt::try_next(&mut found)
                            .await
                            .map_err(io)?
                        {
                            let ours = n.header.ifindex == link.index
                                && n.attributes.iter().any(|a| {
                                    matches!(a, netlink_packet_route::neighbour::NeighbourAttribute::Destination(d)
                                        if neighbour_addr(d) == Some(addr))
                                });
                            if ours {
                                c.neighbours().del(n).execute().await.map_err(io)?;
                            }
                        }
                    }
                }
            }
            Ok(())
        })
    }

    /// Service namespace `name` as `viscum ns list --json` shows it; panics if it is not listed.
    pub fn service_ns_info(&self, name: &str) -> serde_json::Value {
        let out = self.viscum_ok(&["ns", "list", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("viscum ns list printed invalid JSON ({e}):\n{out}"));
        list.as_array()
            .and_then(|l| l.iter().find(|n| n["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no namespace {name} in {list}"))
    }
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Their host veths live in the edge namespace and go with it; the namespaces
        // themselves are named globally and must be deleted here.
        let names = std::mem::take(
            &mut *self
                .service_ns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for name in names {
            delete_quietly(&name);
        }
    }
}

/// The `viscum` binary: `$VISCUM_BIN`, or `viscum` next to the test's own `deps` directory
/// (`target/<profile>/viscum`). Panics with directions when it is missing, since
/// `cargo test -p viscum-tests` does not build other packages' binaries.
pub fn viscum_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("VISCUM_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "VISCUM_BIN={} is not a file", bin.display());
        return bin;
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("viscum"))
        .expect("test binary under target/<profile>/deps");
    assert!(
        bin.is_file(),
        "viscum binary not found at {}: build it first (cargo build -p viscum-user) or set \
         VISCUM_BIN",
        bin.display()
    );
    bin
}

/// What [`build_links`] made.
struct Built {
    /// The edge's interface names (for per-interface sysctls).
    edge_ifs: Vec<String>,
    /// The edge interface with the LAN addresses.
    lan_l3: String,
    vlan_mode: Option<VlanMode>,
    /// BPF taggers to attach: (namespace, ifindex, ingress, what).
    taggers: Vec<(String, u32, bool, Tag)>,
}

/// Creates the veths (and VLANs), addresses and routes, then waits for every link to be
/// ready.
async fn build_links(
    client: &str,
    edge: &str,
    cloud: &str,
    vlan: Option<u16>,
) -> Result<Built, LabError> {
    let built = build_links_netlink(client, edge, cloud, vlan)
        .await
        .map_err(LabError::netns("build the lab's links"))?;
    // A link that came up before its peer had carrier keeps the "noop" qdisc, which drops
    // every packet, until the kernel's link-watch work runs; VLANs take their carrier from
    // the trunk the same way. Wait for all of them rather than lose the first packets.
    let deadline = Instant::now() + READY_TIMEOUT;
    for ns in [client, edge, cloud] {
        let handle = netns::handle_in(ns)
            .await
            .map_err(LabError::netns(format!("netlink in {ns}")))?;
        links_ready(&handle, &format!("namespace {ns}"), deadline).await?;
    }
    Ok(built)
}

async fn build_links_netlink(
    client: &str,
    edge: &str,
    cloud: &str,
    vlan: Option<u16>,
) -> Result<Built, NetnsError> {
    let c = netns::handle_in(client).await?;
    let e = netns::handle_in(edge).await?;
    let k = netns::handle_in(cloud).await?;

    // Fixed indexes, so that no veth shares its index with its peer, as the first links of
    // fresh namespaces would; that would delay their carrier by up to a second (see
    // create_veth_indexed). The edge keeps 2 and 3, so the links viscum creates there later
    // (host veths of service namespaces, numbered from 4) do not meet their peers' 2 either.
    netns::create_veth_indexed(&e, LAN_IF, 2, CLIENT_IF, client, 20, None).await?;
    netns::create_veth_indexed(&e, WAN_IF, 3, CLOUD_IF, cloud, 21, None).await?;

    let mut edge_ifs = vec![LAN_IF.to_string(), WAN_IF.to_string()];
    for (handle, ifname) in [
        (&c, "lo"),
        (&e, "lo"),
        (&k, "lo"),
        (&e, LAN_IF),
        (&e, WAN_IF),
    ] {
        let link = netns::link_by_name(handle, ifname).await?;
        netns::set_up(handle, link.index).await?;
    }
    let client_if = netns::link_by_name(&c, CLIENT_IF).await?.index;
    netns::set_up(&c, client_if).await?;
    let cloud_if = netns::link_by_name(&k, CLOUD_IF).await?.index;
    netns::set_up(&k, cloud_if).await?;
    let wan = netns::link_by_name(&e, WAN_IF).await?.index;

    let lan = netns::link_by_name(&e, LAN_IF).await?.index;
    let mut lan_l3 = LAN_IF.to_string();
    let mut vlan_mode = None;
    let mut taggers = Vec::new();
    let (edge_l3, client_l3) = match vlan {
        None => (lan, client_if),
        Some(vid) => match netns::create_vlan(&e, &format!("{LAN_IF}.{vid}"), lan, vid).await {
            Ok(edge_l3) => {
                vlan_mode = Some(VlanMode::Kernel);
                lan_l3 = format!("{LAN_IF}.{vid}");
                netns::set_up(&e, edge_l3).await?;
                let client_l3 =
                    netns::create_vlan(&c, &format!("{CLIENT_IF}.{vid}"), client_if, vid).await?;
                netns::set_up(&c, client_l3).await?;
                (edge_l3, client_l3)
            }
            Err(NetnsError::Netlink { source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                vlan_mode = Some(VlanMode::Bpf);
                lan_l3 = format!("{LAN_IF}v{vid}");
                let edge_l3 = netns::create_macvlan_passthru(&e, &lan_l3, lan).await?;
                netns::set_up(&e, edge_l3).await?;
                taggers = vec![
                    (client.to_string(), client_if, false, Tag::Push(vid)),
                    (client.to_string(), client_if, true, Tag::Pop),
                    (edge.to_string(), edge_l3, false, Tag::Push(vid)),
                    (edge.to_string(), edge_l3, true, Tag::Pop),
                ];
                (edge_l3, client_if)
            }
            Err(e) => return Err(e),
        },
    };
    if lan_l3 != LAN_IF {
        edge_ifs.push(lan_l3.clone());
    }

    netns::add_address(&c, client_l3, CLIENT_V4.into(), 24).await?;
    netns::add_address(&c, client_l3, CLIENT_V6.into(), 64).await?;
    netns::add_address(&e, edge_l3, EDGE_LAN_V4.into(), 24).await?;
    netns::add_address(&e, edge_l3, EDGE_LAN_V6.into(), 64).await?;
    netns::add_address(&e, wan, EDGE_WAN_V4.into(), 24).await?;
    netns::add_address(&e, wan, EDGE_WAN_V6.into(), 64).await?;
    netns::add_address(&k, cloud_if, CLOUD_V4.into(), 24).await?;
    netns::add_address(&k, cloud_if, CLOUD_V6.into(), 64).await?;

    let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    netns::add_route(&c, any4, 0, Some(EDGE_LAN_V4.into()), Some(client_l3)).await?;
    netns::add_route(&c, any6, 0, Some(EDGE_LAN_V6.into()), Some(client_l3)).await?;
    netns::add_route(&k, any4, 0, Some(EDGE_WAN_V4.into()), Some(cloud_if)).await?;
    netns::add_route(&k, any6, 0, Some(EDGE_WAN_V6.into()), Some(cloud_if)).await?;

    Ok(Built {
        edge_ifs,
        lan_l3,
        vlan_mode,
        taggers,
    })
}

/// Waits until every link of the namespace behind `handle` is up with carrier and a real
/// qdisc: a link that came up before its peer had carrier keeps the "noop" qdisc, which
/// drops every packet, until the kernel's link-watch work runs (VLANs take their carrier
/// from the trunk the same way). Panics, naming `what` and the links, past `deadline`.
pub async fn wait_links_ready(handle: &rtnetlink::Handle, what: &str, deadline: Instant) {
    if let Err(e) = links_ready(handle, what, deadline).await {
        panic!("{e}");
    }
}

/// [`wait_links_ready`], returning the failure (`what` and the links still waiting) instead
/// of panicking.
pub async fn links_ready(
    handle: &rtnetlink::Handle,
    what: &str,
    deadline: Instant,
) -> Result<(), LabError> {
    loop {
        let links = netns::list_links(handle)
            .await
            .map_err(LabError::netns(format!("{what}: list links")))?;
        let waiting: Vec<&str> = links
            .iter()
            .filter(|l| !(l.running && l.qdisc.as_deref().is_some_and(|q| q != "noop")))
            .map(|l| l.name.as_str())
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LabError::NotReady(format!(
                "{what}: links {waiting:?} not ready in time"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The address of a neighbour entry's destination attribute.
fn neighbour_addr(d: &netlink_packet_route::neighbour::NeighbourAddress) -> Option<IpAddr> {
    match d {
        netlink_packet_route::neighbour::NeighbourAddress::Inet(a) => Some(IpAddr::V4(*a)),
        netlink_packet_route::neighbour::NeighbourAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}
