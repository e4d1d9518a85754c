//! Facts about the machine and tools, recorded beside every result (benchmarks.md: kernel,
//! TCX or clsact, JIT, tool versions).

use std::{fs, process::Command};

use serde_json::{Value, json};

use crate::process;

fn read(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// First non-empty line of `program ARGS` (stdout, else stderr).
fn version(program: &str, args: &[&str]) -> Value {
    if !process::have(program) {
        return Value::Null;
    }
    let Ok(out) = Command::new(program).args(args).output() else {
        return Value::Null;
    };
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let text = String::from_utf8_lossy(&text);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or("")
        .to_owned();
    json!(line)
}

fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|x| x.parse::<u32>().ok());
    let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

pub fn loadavg() -> Value {
    json!(read("/proc/loadavg"))
}

pub fn facts() -> Value {
    let kernel = read("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into());
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name")
            .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
    });
    let hypervisor = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    let mem_kib = read("/proc/meminfo").and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    });
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(process::workspace_root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let dirty = git(&["status", "--porcelain"]).map(|s| s.lines().count());
    json!({
        "kernel": kernel,
        "kernel_version": read("/proc/sys/kernel/version"),
        "arch": std::env::consts::ARCH,
        "cpu": model,
        "cpus": std::thread::available_parallelism().map(std::num::NonZero::get).unwrap_or(1),
        "virtualized": hypervisor,
        "memory_mib": mem_kib.map(|k| k / 1024),
        "tc_attach": if kernel_at_least(&kernel, 6, 6) { "tcx (kernel >= 6.6; aya attaches with TCX links)" } else { "clsact (netlink)" },
        "bpf_jit_enable": read("/proc/sys/net/core/bpf_jit_enable"),
        "bpf_jit_harden": read("/proc/sys/net/core/bpf_jit_harden"),
        "bpf_stats_enabled_at_end": read("/proc/sys/kernel/bpf_stats_enabled"),
        "clocksource": read("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
        "nf_conntrack_max": read("/proc/sys/net/netfilter/nf_conntrack_max"),
        "git_commit": git(&["rev-parse", "HEAD"]),
        "git_dirty_files": dirty,
        "tools": {
            "iperf3": version("iperf3", &["--version"]),
            "haproxy": version("haproxy", &["-v"]),
            "socat": version("socat", &["-V"]).as_str().map(|_| {
                Command::new("socat").arg("-V").output().ok().and_then(|o| {
                    String::from_utf8_lossy(&o.stdout).lines().find(|l| l.contains("socat version")).map(|l| l.trim().to_owned())
                })
            }),
            "iptables": version("iptables", &["-V"]),
            "iptables_legacy": version("iptables-legacy", &["-V"]),
            "nft": version("nft", &["-v"]),
            "tc": version("tc", &["-V"]),
            "ip": version("ip", &["-V"]),
            "bpftool": version("bpftool", &["version"]),
            "rustc": version("rustc", &["-V"]),
            "rustc_nightly": version("rustc", &["+nightly", "-V"]),
        },
    })
}
