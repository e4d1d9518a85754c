//! The `viscum-lab` binary (`cargo xtask run`), run for real: it builds the lab, serves the
//! edge copy through viscum's classifier, and removes everything on Ctrl-C even when its
//! output pipe has closed (`cargo xtask run | tee log`, then Ctrl-C, ends `tee` as well).
//!
//! Needs root and the `viscum` binary (`cargo build -p viscum-user`, or `VISCUM_BIN`).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use viscum::netns;
use viscum_lab::{
    LabNames,
    guard::{BPFFS_TEST_ROOT, delete_quietly, is_mount_point, send_signal, wait_child},
    lab::{CLOUD_V4, CLOUD_V6, viscum_bin},
    skip_unless_root, unique_name,
};

/// How long the lab may take to come up (loading the datapath included).
const UP: Duration = Duration::from_secs(120);
/// How long its teardown may take after SIGINT.
const DOWN: Duration = Duration::from_secs(60);

/// What a test run of the lab may leave behind, removed on drop if the lab did not: the
/// running process, the namespaces, the bpffs.
struct Leftovers {
    child: Option<Child>,
    names: Vec<String>,
    dir: PathBuf,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in &self.names {
            delete_quietly(name);
        }
        let bpf = self.dir.join("bpf");
        while is_mount_point(&bpf) {
            if nix::mount::umount2(&bpf, nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
        let _ = std::fs::remove_dir(&bpf);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The body of `GET /` at `addr`, from namespace `ns`.
fn get(ns: &str, addr: SocketAddr) -> String {
    netns::in_netns(ns, move || -> std::io::Result<String> {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(conn, "GET / HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        Ok(text)
    })
    .unwrap()
    .unwrap_or_else(|e| format!("error: {e}"))
}

#[test]
fn the_lab_serves_the_edge_copy_and_ctrl_c_removes_it_with_its_output_pipe_closed() {
    if skip_unless_root() {
        return;
    }
    let prefix = unique_name("vl");
    let names = LabNames::with_prefix(&prefix);
    let service = format!("{prefix}svc");
    let dir = Path::new(BPFFS_TEST_ROOT).join(unique_name("lab"));
    let mut leftovers = Leftovers {
        child: None,
        names: names
            .all()
            .iter()
            .map(std::string::ToString::to_string)
            .chain([service.clone()])
            .collect(),
        dir: dir.clone(),
    };

    let mut child = Command::new(env!("CARGO_BIN_EXE_viscum-lab"))
        .arg("--viscum")
        .arg(viscum_bin())
        .args(["--prefix", &prefix, "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start viscum-lab");
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let pid = child.id() as i32;
    leftovers.child = Some(child);
    let errors = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    // Read its output until it is ready, then hand the pipe back to be closed.
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut out = BufReader::new(stdout);
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            match out.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            seen.push_str(&line);
            if line.trim() == "lab: ready" {
                let _ = tx.send(seen.clone());
                return Some(out);
            }
        }
        let _ = tx.send(seen);
        None
    });
    let started = Instant::now();
    let seen = rx.recv_timeout(UP).unwrap_or_default();
    let stdout = reader.join().unwrap();
    assert!(
        stdout.is_some(),
        "the lab did not become ready in {:?}:\n{seen}",
        started.elapsed()
    );
    eprintln!("lab ready after {:?}", started.elapsed());

    // It is up, and the cloud address is served by the edge copy through the classifier.
    for name in names.all().into_iter().chain([service.as_str()]) {
        assert!(netns::named_exists(name), "no namespace {name}:\n{seen}");
    }
    assert!(is_mount_point(&dir.join("bpf")), "no bpffs:\n{seen}");
    for addr in [
        SocketAddr::new(CLOUD_V4.into(), 80),
        SocketAddr::new(CLOUD_V6.into(), 80),
    ] {
        let page = get(&names.client, addr);
        assert!(page.contains("EDGE copy"), "{addr}: {page}\n{seen}");
    }

    // Nobody reads its output any more (`tee` died of the same Ctrl-C), then Ctrl-C.
    drop(stdout);
    send_signal(pid, Signal::SIGINT);
    let mut child = leftovers.child.take().unwrap();
    let status = wait_child(&mut child, DOWN);
    leftovers.child = Some(child);
    let status = status.unwrap_or_else(|| panic!("the lab still runs {DOWN:?} after SIGINT"));
    let errors = errors.join().unwrap();
    assert!(status.success(), "the lab exited {status}:\n{errors}");
    leftovers.child = None;

    for name in names.all().into_iter().chain([service.as_str()]) {
        assert!(
            !netns::named_exists(name),
            "namespace {name} left behind:\n{errors}"
        );
    }
    assert!(
        !is_mount_point(&dir.join("bpf")),
        "bpffs left mounted:\n{errors}"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}
