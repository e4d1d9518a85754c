//! `viscum run` in the lab: a typed configuration, the files a daemon needs, and the running
//! daemon with its control socket.
//!
//! ```no_run
//! use viscum_lab::{Check, Daemon, DaemonFiles, Lab};
//! let lab = Lab::new();
//! let files = DaemonFiles::new();
//! let web = lab.service_ns_name();
//! let mut config = files.config();
//! config.services.push(files.service(&web, 8080, "edge").check(Check::Http("/healthz".into())));
//! files.write(&config);
//! let daemon = Daemon::start(&lab, &files);
//! daemon.wait_redirected(&web, std::time::Duration::from_secs(20));
//! ```
//!
//! The configuration is serialised with serde into the TOML that `viscum run --config` reads
//! (`docs/` and `viscum-user/src/config.rs` describe the fields); tests of invalid files write
//! their text with [`DaemonFiles::write_raw`].

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    thread,
    time::Duration,
};

use nix::sys::signal::Signal;
use serde::Serialize;
use serde_json::Value;

use crate::{
    guard::{send_signal, unique_name, wait_child, wait_until},
    lab::{CLOUD_V4, LAN_IF, Lab},
};

/// How long a daemon may take to answer on its control socket after it was started.
const START: Duration = Duration::from_secs(20);

/// The edge copy of a service, `python3 SCRIPT PORT IDENT`, on `[::]:PORT` (IPv4 and IPv6):
/// answers a line with IDENT, `stream N` with N KiB spread over N x 10 ms (a long transfer),
/// and an HTTP GET with 200. Prints "listening on PORT" once it listens.
pub const SERVICE_PY: &str = r#"
import socket, sys, threading, time
port, ident = int(sys.argv[1]), sys.argv[2].encode()
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", port))
srv.listen(128)
print("listening on", port, flush=True)
def handle(c):
    try:
        c.settimeout(5)
        data = b""
        while b"\n" not in data:
            d = c.recv(128)
            if not d:
                return
            data += d
        if data.startswith(b"GET "):
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        elif data.startswith(b"stream "):
            for _ in range(int(data.split()[1])):
                c.sendall(b"x" * 1024)
                time.sleep(0.01)
        else:
            c.sendall(ident + b"\n")
    except OSError:
        pass
    finally:
        c.close()
while True:
    conn, _ = srv.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"#;

/// A daemon configuration file: `[engine]` and the `[[service]]` tables.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonConfig {
    /// `[engine]`.
    pub engine: Engine,
    /// `[[service]]`, in order.
    #[serde(rename = "service", skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
}

/// `[engine]`.
#[derive(Debug, Clone, Serialize)]
pub struct Engine {
    /// Interfaces the classifier attaches to (interface names in the edge namespace).
    pub interfaces: Vec<String>,
    /// Where the pins go, if not the default (a daemon run outside the lab).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bpffs: Option<PathBuf>,
    /// The control socket's path.
    pub control: PathBuf,
    /// The daemon's state directory.
    pub run_dir: PathBuf,
    /// Where the Prometheus endpoint listens (in the edge namespace), if anywhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// DNS servers for host-name matches (`"198.51.100.7"` or `"198.51.100.7:53"`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
}

/// One `[[service]]`.
#[derive(Debug, Clone, Serialize)]
pub struct Service {
    /// The service's name, also its namespace's (at most 12 characters).
    pub name: String,
    /// `match`: endpoints such as `tcp://198.51.100.7:8080` (host names allowed).
    #[serde(rename = "match")]
    pub matches: Vec<String>,
    /// The command line of the edge copy.
    pub command: Vec<String>,
    /// Environment of the edge copy.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The user the copy runs as (the daemon's default: `nobody`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `always`, `on-failure` or `never`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
    /// Milliseconds between SIGTERM and SIGKILL when stopping the copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_grace_ms: Option<u64>,
    /// Milliseconds a deliberate stop waits for the edge flows to end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout_ms: Option<u64>,
    /// Redirect only clients in this prefix (`--from`), e.g. `"192.0.2.0/25"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// NAT to the namespace's own address (`--nat`; the daemon's default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat: Option<bool>,
    /// NAT to this address and port instead (`--nat-to`), e.g. `"203.0.113.9:8080"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat_to: Option<String>,
    /// Keep the cloud address; the namespace answers as it (`--anyip`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anyip: Option<bool>,
    /// Copy the traffic to the edge while the cloud keeps serving it (`--mirror`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<bool>,
    /// Milliseconds during which new flows still go to the cloud (`--learn`); signed so a
    /// test can write an invalid one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learn_ms: Option<i64>,
    /// `[service.health]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// `[service.limits]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
}

/// `[service.health]`.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// The check (one of `tcp`, `http`, `exec`).
    #[serde(flatten)]
    pub check: Check,
    /// Milliseconds between checks.
    pub interval_ms: u64,
    /// Milliseconds one check may take.
    pub timeout_ms: u64,
    /// Passed checks in a row that make the copy healthy.
    pub rise: u32,
    /// Failed checks in a row that make it unhealthy.
    pub fall: u32,
}

/// A health check of `[service.health]`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    /// `tcp = PORT`: a TCP connect inside the service namespace. Wider than `u16` so a
    /// test can write an out-of-range port and see the daemon refuse it.
    Tcp(u32),
    /// `http = "PATH"`: a GET that must answer 2xx.
    Http(String),
    /// `exec = [...]`: a command run inside the namespace that must exit 0.
    Exec(Vec<String>),
}

/// `[service.limits]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Limits {
    /// Memory, e.g. `"64M"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPUs, e.g. `0.5`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Processes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

impl DaemonConfig {
    /// The file's text, as `viscum run --config` reads it.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a daemon configuration serialises")
    }
}

impl Service {
    /// Service `name` running `command`, matching nothing yet, without a health check, every
    /// other key left to the daemon's defaults.
    pub fn new(name: &str, command: Vec<String>) -> Service {
        Service {
            name: name.into(),
            matches: Vec::new(),
            command,
            env: BTreeMap::new(),
            user: None,
            restart: None,
            stop_grace_ms: None,
            drain_timeout_ms: None,
            from: None,
            nat: None,
            nat_to: None,
            anyip: None,
            mirror: None,
            learn_ms: None,
            health: None,
            limits: None,
        }
    }

    /// This service with health check `check` (interval, timeout, rise and fall kept).
    pub fn check(mut self, check: Check) -> Service {
        if let Some(h) = &mut self.health {
            h.check = check;
        }
        self
    }

    /// This service with environment variable `key=value` for its copy.
    pub fn env(mut self, key: &str, value: &str) -> Service {
        self.env.insert(key.into(), value.into());
        self
    }

    /// This service matching `matches` instead.
    pub fn matches(mut self, matches: &[String]) -> Service {
        self.matches = matches.to_vec();
        self
    }
}

/// The files of one daemon test: configuration, the service script ([`SERVICE_PY`]), the
/// daemon's run directory and its output, in a fresh world-readable directory under
/// `/var/tmp` (services run as `nobody` and must read the script; they get a private `/tmp`,
/// so nothing they read may live there). Dropping it also ends service
/// processes a killed daemon left behind (found through the daemon's records) and their
/// cgroups; so keep it alive longer than every daemon of the test.
pub struct DaemonFiles {
    dir: PathBuf,
}

impl DaemonFiles {
    /// Creates the directory and the script. Panics on failure.
    pub fn new() -> DaemonFiles {
        let dir = PathBuf::from("/var/tmp").join(format!("viscum-daemon-{}", unique_name("t")));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let files = DaemonFiles { dir };
        fs::write(files.script(), SERVICE_PY).unwrap();
        fs::set_permissions(files.script(), fs::Permissions::from_mode(0o644)).unwrap();
        files
    }

    /// The directory everything is in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration file's path.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("viscum.toml")
    }

    /// The control socket's path.
    pub fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// The daemon's run directory.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// The service script's path.
    pub fn script(&self) -> PathBuf {
        self.dir.join("service.py")
    }

    /// A configuration for the lab without services: attached to `lan0`, control socket and
    /// run directory in this directory.
    pub fn config(&self) -> DaemonConfig {
        DaemonConfig {
            engine: Engine {
                interfaces: vec![LAN_IF.into()],
                bpffs: None,
                control: self.control(),
                run_dir: self.run_dir(),
                metrics: None,
                dns: Vec::new(),
            },
            services: Vec::new(),
        }
    }

    /// Service `name` running [`SERVICE_PY`] on `port`, answering `ident`, matching
    /// `tcp://198.51.100.7:PORT`, checked by TCP connect every 200 ms (timeout 150 ms, rise
    /// and fall 2). `port` is wider than `u16` so that a test can write an invalid one.
    pub fn service(&self, name: &str, port: u32, ident: &str) -> Service {
        let command = vec![
            "/usr/bin/python3".into(),
            self.script().display().to_string(),
            port.to_string(),
            ident.into(),
        ];
        Service {
            matches: vec![format!("tcp://{CLOUD_V4}:{port}")],
            health: Some(Health {
                check: Check::Tcp(port),
                interval_ms: 200,
                timeout_ms: 150,
                rise: 2,
                fall: 2,
            }),
            ..Service::new(name, command)
        }
    }

    /// Writes `config` as the configuration file.
    pub fn write(&self, config: &DaemonConfig) {
        self.write_raw(&config.to_toml());
    }

    /// Writes `text` as the configuration file: for files the typed configuration cannot
    /// express (the invalid ones a test wants refused).
    pub fn write_raw(&self, text: &str) {
        fs::write(self.config_path(), text).unwrap();
    }
}

impl Default for DaemonFiles {
    fn default() -> Self {
        DaemonFiles::new()
    }
}

impl Drop for DaemonFiles {
    fn drop(&mut self) {
        for entry in fs::read_dir(self.run_dir().join("state"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(text) = fs::read_to_string(entry.path()) else {
                continue;
            };
            let Ok(rec) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if let Some(pid) = rec["pid"].as_i64().filter(|p| *p > 1) {
                // The copy leads its own process group.
                send_signal(-(pid as i32), Signal::SIGKILL);
            }
            if let Some(name) = rec["name"].as_str() {
                viscum::daemon::cgroup::remove_named(name);
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A running `viscum run` in the lab's edge namespace. Dropping it shuts it down cleanly
/// (SIGTERM), or kills it if it does not stop within 30 s; a panicking test gets the
/// daemon's output printed.
pub struct Daemon {
    child: Option<Child>,
    control: PathBuf,
    output: PathBuf,
}

impl Daemon {
    /// Starts `viscum --log-level info run --config FILES/viscum.toml` and waits until it
    /// answers on its control socket. Panics (with its output) if it does not within 20 s.
    pub fn start(lab: &Lab, files: &DaemonFiles) -> Daemon {
        Daemon::start_with(lab, files, "info", &[])
    }

    /// [`Daemon::start`] with another log level and extra environment variables.
    pub fn start_with(
        lab: &Lab,
        files: &DaemonFiles,
        log_level: &str,
        env: &[(&str, &str)],
    ) -> Daemon {
        let output = files.dir.join(format!("daemon-{}.log", unique_name("d")));
        let log = fs::File::create(&output).unwrap();
        let config = files.config_path();
        let mut cmd = lab.viscum_command(&[
            "--log-level",
            log_level,
            "run",
            "--config",
            config.to_str().unwrap(),
        ]);
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let daemon = Daemon {
            child: Some(cmd.spawn().expect("start viscum run")),
            control: files.control(),
            output,
        };
        assert!(
            wait_until(START, || daemon.try_status().is_some()),
            "the daemon did not answer on its control socket:\n{}",
            daemon.log()
        );
        daemon
    }

    /// The daemon's process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// The daemon's own output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// One request line on the control socket (e.g. `{"cmd":"status"}`) and its JSON answer;
    /// `None` if the daemon does not answer.
    pub fn request(&self, line: &str) -> Option<Value> {
        let mut s = UnixStream::connect(&self.control).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        writeln!(s, "{line}").ok()?;
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).ok()?;
        serde_json::from_str(&answer).ok()
    }

    /// The `status` object, or `None` if the daemon does not answer.
    pub fn try_status(&self) -> Option<Value> {
        Some(self.request(r#"{"cmd":"status"}"#)?["status"].clone())
    }

    /// The `status` object; panics (with the daemon's output) if it does not answer.
    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|| panic!("no status from the daemon:\n{}", self.log()))
    }

    /// Service `name` in `status`; panics if it is not listed.
    pub fn service(&self, name: &str) -> Value {
        let status = self.status();
        status["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no service {name} in {status:#}"))
    }

    /// The state of `iface`'s attachment in `status` (or why there is none).
    pub fn attachment(&self, iface: &str) -> String {
        let status = self.status();
        status["attachments"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["interface"] == iface))
            .map(|a| a["state"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|| format!("not listed in {status}"))
    }

    /// Waits until `name` is healthy and redirected; returns its copy's pid. Panics past
    /// `timeout`.
    pub fn wait_redirected(&self, name: &str, timeout: Duration) -> i32 {
        let ok = wait_until(timeout, || {
            let s = self.service(name);
            s["health"] == "healthy" && s["redirected"] == true
        });
        assert!(
            ok,
            "service {name} not redirected within {timeout:?}: {:#}\n{}",
            self.service(name),
            self.log()
        );
        self.service(name)["pid"].as_i64().unwrap() as i32
    }

    /// SIGTERM, and waits (30 s at most) for the clean shutdown to finish.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        send_signal(child.id() as i32, Signal::SIGTERM);
        wait_child(&mut child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("the daemon did not shut down within 30 s:\n{}", self.log()))
    }

    /// SIGKILL: the daemon vanishes without cleaning anything up, like a crash.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        send_signal(child.id() as i32, Signal::SIGKILL);
        wait_child(&mut child, Duration::from_secs(10)).expect("a killed daemon exits");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(child.id() as i32, Signal::SIGTERM);
            if wait_child(&mut child, Duration::from_secs(30)).is_none() {
                send_signal(child.id() as i32, Signal::SIGKILL);
                let _ = child.wait();
            }
        }
        if thread::panicking() {
            eprintln!("--- daemon output ---\n{}", self.log());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_reads_back_as_the_daemon_expects() {
        let files = DaemonFiles {
            dir: PathBuf::from("/nonexistent"),
        };
        let mut config = files.config();
        config.engine.metrics = Some("127.0.0.1:9310".parse().unwrap());
        config.services.push(
            files
                .service("web", 8080, "edge")
                .check(Check::Http("/healthz".into()))
                .env("V", "2"),
        );
        config.services.push(Service {
            limits: Some(Limits {
                memory: Some("64M".into()),
                cpu: Some(0.5),
                pids: Some(32),
            }),
            ..files.service("db", 5432, "edge")
        });
        let text = config.to_toml();
        let back: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(back["engine"]["interfaces"][0].as_str(), Some("lan0"));
        assert_eq!(back["engine"]["metrics"].as_str(), Some("127.0.0.1:9310"));
        let web = &back["service"][0];
        assert_eq!(web["match"][0].as_str(), Some("tcp://198.51.100.7:8080"));
        assert_eq!(web["health"]["http"].as_str(), Some("/healthz"));
        assert_eq!(web["health"]["rise"].as_integer(), Some(2));
        assert_eq!(web["env"]["V"].as_str(), Some("2"));
        let db = &back["service"][1];
        assert_eq!(db["health"]["tcp"].as_integer(), Some(5432));
        assert_eq!(db["limits"]["memory"].as_str(), Some("64M"));
        assert_eq!(db["limits"]["pids"].as_integer(), Some(32));
        // Dropping files with a nonexistent directory is harmless.
        drop(files);
        // And viscum's own parser takes it, service by service.
        let path = std::env::temp_dir().join(format!("viscum-lab-{}.toml", unique_name("c")));
        fs::write(&path, &text).unwrap();
        let parsed = viscum::config::Config::load(&path);
        let _ = fs::remove_file(&path);
        let parsed = parsed.unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(parsed.services.len(), 2);
        assert_eq!(parsed.services[0].env["V"], "2");
        assert_eq!(parsed.services[1].limits.pids, Some(32));
    }
}
