//! Helpers of the multi-tenant tests (storage, limits, load shedding): configuration keys the
//! typed lab configuration does not carry, and the small programs the services run.

use std::{fs, os::unix::fs::PermissionsExt as _, path::PathBuf};

use viscum_lab::daemon::{DaemonConfig, DaemonFiles};

/// `config` as TOML with `engine_keys` (lines such as `max_load = 0.3`) added to `[engine]`
/// and, for each `(service, table)` in `service_tables`, the TOML `table` (e.g.
/// `"[service.storage]\nsize = \"16M\"\n"`) added to that service's `[[service]]`.
pub fn config_with(
    config: &DaemonConfig,
    engine_keys: &[&str],
    service_tables: &[(&str, &str)],
) -> String {
    let text = config.to_toml();
    let mut parts: Vec<String> = text.split("\n[[service]]\n").map(str::to_owned).collect();
    let engine = parts.first_mut().expect("the [engine] part");
    let at = engine.find("[engine]\n").expect("an [engine] table") + "[engine]\n".len();
    engine.insert_str(
        at,
        &engine_keys
            .iter()
            .map(|k| format!("{k}\n"))
            .collect::<String>(),
    );
    for (i, svc) in config.services.iter().enumerate() {
        for (name, table) in service_tables {
            if *name == svc.name {
                let part = &mut parts[i + 1];
                if !part.ends_with('\n') {
                    part.push('\n');
                }
                part.push_str(table);
            }
        }
    }
    parts.join("\n[[service]]\n")
}

/// Writes `text` as an executable-by-all script `name` in `files`' directory (services run
/// as `nobody` and get a private `/tmp`); returns its path.
pub fn script(files: &DaemonFiles, name: &str, text: &str) -> PathBuf {
    let path = files.dir().join(name);
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The lines of service `name`'s log (its output and the daemon's notes about it).
pub fn service_log(files: &DaemonFiles, name: &str) -> String {
    fs::read_to_string(files.run_dir().join("logs").join(format!("{name}.log"))).unwrap_or_default()
}

/// A service that works in its storage directory (Python, run as `nobody`): it appends a
/// line to `runs` and prints `runs N` (N: starts so far, counted on the storage), then with
/// `fill` writes 1 MiB blocks until a write fails and prints `ENOSPC after N MiB` (or the
/// error), and deletes what it wrote; with `write N` writes and syncs N MiB and prints
/// `wrote N MiB` (or `write failed: ERROR`). Then it sleeps until stopped.
pub const STORAGE_PY: &str = r#"
import errno, os, signal, sys
print("cwd", os.getcwd(), "STATE_DIRECTORY", os.environ.get("STATE_DIRECTORY"), flush=True)
with open("runs", "a") as f:
    f.write("run\n")
with open("runs") as f:
    print("runs", len(f.readlines()), flush=True)
mode = sys.argv[1]
if mode == "fill":
    fd = os.open("big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block, written = b"x" * (1 << 20), 0
    try:
        while True:
            n = os.write(fd, block)
            written += n
            if n < len(block):
                continue
    except OSError as e:
        name = "ENOSPC" if e.errno == errno.ENOSPC else "error %s" % e
        print("%s after %d MiB" % (name, written >> 20), flush=True)
    os.close(fd)
    os.unlink("big")
elif mode == "write":
    mib = int(sys.argv[2])
    try:
        with open("ok.bin", "wb") as f:
            for _ in range(mib):
                f.write(b"y" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
        print("wrote %d MiB" % mib, flush=True)
    except OSError as e:
        print("write failed: %s" % e, flush=True)
signal.pause()
"#;
