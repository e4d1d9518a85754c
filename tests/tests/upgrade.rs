//! Upgrades (issue #13 item 4): pinned maps carry a layout version (`<bpffs>/layout/<N>`,
//! `viscum_common::MAP_LAYOUT_VERSION`); pins of another layout are migrated or refused with
//! the command to run, never misread. The "older binary" is a fixture: maps created with raw
//! `bpf(2)` calls at the old key/value sizes and pinned where `attach` looks, with the marker
//! removed as a binary from before the marker would have left it.

use std::{
    ffi::CString,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

use aya::maps::MapInfo;
use viscum_common::{
    FLOWS_MAP, FlowKey, FlowState, MAP_LAYOUT_VERSION, SERVICES_MAP, ServiceEntry, ServiceKey,
};
use viscum_tests::{IdentityServer, Lab, Proto, ask, skip_unless_root};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// Creates a map with raw `bpf(BPF_MAP_CREATE)` and pins it at `path` (replacing what is
/// there): what an older viscum with other record sizes would have left.
fn pin_fixture_map(path: &Path, map_type: u32, key: u32, value: u32, max_entries: u32) {
    let mut attr = [0u8; 128];
    for (i, v) in [map_type, key, value, max_entries].into_iter().enumerate() {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    // SAFETY: bpf(2) with a zeroed attribute buffer of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            attr.len() as u32,
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor the kernel just returned to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let _ = std::fs::remove_file(path);
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    let mut pin = [0u8; 128];
    pin[..8].copy_from_slice(&(cpath.as_ptr() as u64).to_ne_bytes());
    pin[8..12].copy_from_slice(&(std::os::fd::AsRawFd::as_raw_fd(&fd) as u32).to_ne_bytes());
    // SAFETY: as above; the path outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin.as_ptr(), pin.len() as u32) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
}

/// Removes the layout marker, as pins of a binary from before it look.
fn unmark(bpffs: &Path) {
    let dir = bpffs.join("layout");
    for e in std::fs::read_dir(&dir).unwrap() {
        std::fs::remove_dir(e.unwrap().path()).unwrap();
    }
    std::fs::remove_dir(&dir).unwrap();
}

fn marker(bpffs: &Path) -> Vec<String> {
    std::fs::read_dir(bpffs.join("layout"))
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// The oldest layout from which every change up to this binary's is to a soft-state map
/// (`layout::SOFT_MAPS`): pins of it are migrated by `attach`, keeping the entries.
fn soft_migration_from() -> Option<u32> {
    use viscum::engine::layout::{CHANGES, SOFT_MAPS};
    (viscum::engine::layout::UNMARKED_LAYOUT..MAP_LAYOUT_VERSION).find(|&from| {
        CHANGES
            .iter()
            .filter(|(v, _)| *v > from)
            .all(|(_, maps)| maps.iter().all(|m| SOFT_MAPS.contains(m)))
    })
}

fn size<T>() -> u32 {
    u32::try_from(size_of::<T>()).unwrap()
}

const ASK: Duration = Duration::from_secs(3);

/// Attached, one namespace with an identity server answering "edge" for the cloud's port,
/// one exact entry and one prefix rule into it.
struct Setup {
    lab: Lab,
    ns: String,
    port: u16,
    _cloud: IdentityServer,
    _edge: IdentityServer,
}

fn setup() -> Setup {
    let lab = Lab::new();
    let cloud = IdentityServer::start(lab.cloud.name(), 0, "cloud");
    let port = cloud.port();
    lab.viscum_ok(&["attach", lab.lan_if()]);
    let ns = lab.service_ns_name();
    lab.viscum_ok(&["ns", "add", &ns]);
    let edge = IdentityServer::start(&ns, port, "edge");
    let [v4, _] = lab.cloud_addrs(port);
    lab.viscum_ok(&["redirect", "add", &format!("tcp://{v4}"), "--ns", &ns]);
    lab.viscum_ok(&["redirect", "add", "tcp://203.0.113.0/24:9000", "--ns", &ns]);
    assert_eq!(marker(lab.bpffs.path()), [MAP_LAYOUT_VERSION.to_string()]);
    Setup {
        lab,
        ns,
        port,
        _cloud: cloud,
        _edge: edge,
    }
}

fn answer(s: &Setup) -> String {
    let [v4, _] = s.lab.cloud_addrs(s.port);
    ask(s.lab.client.name(), Proto::Tcp, v4, ASK).unwrap_or_else(|e| format!("error: {e}"))
}

fn listed(s: &Setup) -> Vec<String> {
    let out = s.lab.viscum_ok(&["redirect", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["match"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn unmarked_pins_are_adopted_or_migrated_as_the_layout_table_says() {
    if skip_unless_root() {
        return;
    }
    let s = setup();
    let before = listed(&s);
    unmark(s.lab.bpffs.path());
    // What changed since layout 1 by the table (the sizes are this binary's own here).
    let changed: Vec<&str> = viscum::engine::layout::CHANGES
        .iter()
        .filter(|(v, _)| *v > viscum::engine::layout::UNMARKED_LAYOUT)
        .flat_map(|(_, maps)| maps.iter().copied())
        .collect();
    let hard = changed
        .iter()
        .any(|m| !viscum::engine::layout::SOFT_MAPS.contains(m));
    if hard {
        // An entry map changed since layout 1: every command refuses the pins, names the
        // command that starts over, and changes nothing.
        for cmd in [vec!["attach", s.lab.lan_if()], vec!["redirect", "list"]] {
            let err = s.lab.viscum_err(&cmd);
            assert!(
                err.contains("an older viscum") && err.contains("viscum detach --all --purge"),
                "{changed:?}: viscum {cmd:?}: {err}"
            );
        }
        assert!(marker(s.lab.bpffs.path()).is_empty());
        assert_eq!(answer(&s), "edge", "the running datapath is left alone");
        return;
    }
    if changed.is_empty() {
        // A command that opens the maps finds them readable as they are and records the
        // layout.
        assert_eq!(listed(&s), before);
    } else {
        // Flow maps changed since layout 1: only `attach` may use (and migrate) the pins.
        let err = s.lab.viscum_err(&["redirect", "list"]);
        assert!(err.contains("viscum attach"), "{changed:?}: {err}");
        s.lab.viscum_ok(&["attach", s.lab.lan_if()]);
        assert_eq!(listed(&s), before);
    }
    assert_eq!(marker(s.lab.bpffs.path()), [MAP_LAYOUT_VERSION.to_string()]);
    assert_eq!(answer(&s), "edge");
}

#[test]
fn an_older_flow_table_is_migrated_by_attach_keeping_the_entries_or_refused_with_older_entries() {
    if skip_unless_root() {
        return;
    }
    let s = setup();
    assert_eq!(answer(&s), "edge");
    let before = listed(&s);
    let bpffs = s.lab.bpffs.path();
    // An older binary's flow records were 8 bytes shorter.
    let old = size::<FlowState>() - 8;
    pin_fixture_map(
        &bpffs.join(FLOWS_MAP),
        BPF_MAP_TYPE_LRU_HASH,
        size::<FlowKey>(),
        old,
        1024,
    );
    unmark(bpffs);
    // The pins' layout: the oldest from which only soft-state maps changed (the flow table
    // among them), so the migration is possible.
    let Some(from) = soft_migration_from() else {
        // Every older layout differs in an entry map too (layout 5 changed the services
        // map): such pins are refused whatever else they hold, and nothing is touched.
        let err = s.lab.viscum_err(&["attach", s.lab.lan_if()]);
        assert!(
            err.contains("an older viscum") && err.contains("viscum detach --all --purge"),
            "{err}"
        );
        let info = MapInfo::from_pin(bpffs.join(FLOWS_MAP)).unwrap();
        assert_eq!(
            info.value_size(),
            old,
            "the refused pins were left as they were"
        );
        assert!(marker(bpffs).is_empty());
        return;
    };
    std::fs::create_dir_all(bpffs.join("layout").join(from.to_string())).unwrap();

    // Until migrated, nothing uses the pins, and the error says what to run.
    let err = s.lab.viscum_err(&["redirect", "list"]);
    assert!(
        err.contains("older map layout") && err.contains("viscum attach"),
        "{err}"
    );
    let err = s
        .lab
        .viscum_err(&["redirect", "add", "tcp://203.0.113.9:1", "--ns", &s.ns]);
    assert!(err.contains("viscum attach"), "{err}");

    let out = s.lab.viscum_ok(&["attach", s.lab.lan_if()]);
    assert!(out.contains("lan0"), "{out}");
    let info = MapInfo::from_pin(bpffs.join(FLOWS_MAP)).unwrap();
    assert_eq!(
        info.value_size(),
        size::<FlowState>(),
        "the flow table was re-created"
    );
    assert_eq!(marker(bpffs), [MAP_LAYOUT_VERSION.to_string()]);
    assert_eq!(listed(&s), before, "the entries survived the migration");
    // The new classifier and reply path serve them (NAT there and back).
    assert_eq!(answer(&s), "edge");
}

#[test]
fn an_older_services_map_is_refused_with_the_command_to_run() {
    if skip_unless_root() {
        return;
    }
    let s = setup();
    let bpffs = s.lab.bpffs.path();
    pin_fixture_map(
        &bpffs.join(SERVICES_MAP),
        BPF_MAP_TYPE_HASH,
        size::<ServiceKey>(),
        size::<ServiceEntry>() - 8,
        16,
    );
    unmark(bpffs);
    for cmd in [
        vec!["attach", s.lab.lan_if()],
        vec!["redirect", "list"],
        vec!["redirect", "del", "tcp://203.0.113.0/24:9000", "--now"],
    ] {
        let err = s.lab.viscum_err(&cmd);
        assert!(
            err.contains("VISCUM_SERVICES value")
                && err.contains("viscum detach --all --purge")
                && err.contains("viscum attach"),
            "viscum {cmd:?}: {err}"
        );
    }
    // Nothing was changed by the refusals; the way out works.
    assert!(marker(bpffs).is_empty());
    s.lab.viscum_ok(&["detach", "--all", "--purge"]);
    s.lab.viscum_ok(&["attach", s.lab.lan_if()]);
    assert_eq!(marker(bpffs), [MAP_LAYOUT_VERSION.to_string()]);
    assert!(listed(&s).is_empty());
    assert_eq!(answer(&s), "cloud");
}

#[test]
fn pins_of_a_newer_layout_are_refused() {
    if skip_unless_root() {
        return;
    }
    let s = setup();
    let bpffs = s.lab.bpffs.path();
    unmark(bpffs);
    std::fs::create_dir_all(
        bpffs
            .join("layout")
            .join((MAP_LAYOUT_VERSION + 1).to_string()),
    )
    .unwrap();
    for cmd in [vec!["attach", s.lab.lan_if()], vec!["redirect", "list"]] {
        let err = s.lab.viscum_err(&cmd);
        assert!(
            err.contains("a newer viscum") && err.contains("viscum detach --all --purge"),
            "viscum {cmd:?}: {err}"
        );
    }
    // Still serving as the newer binary left it.
    assert_eq!(answer(&s), "edge");
}
