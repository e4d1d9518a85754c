//! What a process may do, tried for real: the service side of tests/tests/privilege.rs.
//!
//! `viscum-probe service CONTROL_SOCKET HOST_MARKER -- PROGRAM ARGS...` tries what a
//! sandboxed service must not be able to do (load a BPF program, mount, ptrace, create a
//! user namespace, use the kernel keyring, load a module, read the host's `/tmp`, reach the
//! daemon's control socket, become root again) and prints one line per attempt,
//! `probe NAME: ok` or `probe NAME: errno N`, then its identity, capability, no_new_privs
//! and seccomp lines from `/proc/self/status`, then `probe done`, and finally execs
//! PROGRAM (the real service), so the same process goes on to serve traffic.
//!
//! `viscum-probe connect PATH` connects to a Unix socket and prints `probe connect: ok` or
//! `probe connect: errno N` (the unprivileged-user side).

use std::{io, os::unix::process::CommandExt as _, process::Command};

fn report(name: &str, rc: libc::c_long) {
    if rc < 0 {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        println!("probe {name}: errno {errno}");
    } else {
        println!("probe {name}: ok");
    }
}

fn report_io(name: &str, r: io::Result<()>) {
    match r {
        Ok(()) => println!("probe {name}: ok"),
        Err(e) => println!("probe {name}: errno {}", e.raw_os_error().unwrap_or(0)),
    }
}

fn service(control: &str, marker: &str) {
    report(
        "bpf_prog_load",
        viscum_tests::vmcheck::seccomp::bpf_prog_load(),
    );
    // SAFETY: plain system calls with static or null arguments.
    unsafe {
        // Before unshare_user: in a user namespace of its own (no filter) uid 0 is unmapped.
        report("setuid_root", libc::setuid(0).into());
        report(
            "mount_remount_root",
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            )
            .into(),
        );
        report(
            "mount_tmpfs",
            libc::mount(
                c"tmpfs".as_ptr(),
                c"/tmp".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
            .into(),
        );
        // Attaching to a child of the same user is allowed without a filter (Yama's
        // ptrace_scope 1 included): only seccomp refuses it.
        let child = libc::fork();
        if child == 0 {
            loop {
                libc::pause();
            }
        }
        report(
            "ptrace_attach_child",
            libc::ptrace(libc::PTRACE_ATTACH, child, 0, 0),
        );
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
        report("unshare_user", libc::unshare(libc::CLONE_NEWUSER).into());
        // KEYCTL_GET_KEYRING_ID of the session keyring: works for anyone without a filter.
        report(
            "keyctl",
            libc::syscall(libc::SYS_keyctl, 0, libc::KEY_SPEC_SESSION_KEYRING, 0),
        );
        report(
            "init_module",
            libc::syscall(
                libc::SYS_init_module,
                std::ptr::null::<u8>(),
                0,
                c"".as_ptr(),
            ),
        );
        report(
            "clone3",
            libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0),
        );
    }
    report_io("read_host_tmp_marker", std::fs::read(marker).map(drop));
    report_io(
        "write_own_tmp",
        std::fs::write(
            format!("/tmp/viscum-probe-{}", std::process::id()),
            b"mine\n",
        ),
    );
    report_io(
        "connect_control",
        std::os::unix::net::UnixStream::connect(control).map(drop),
    );
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } == 0 {
        println!("probe nofile: {}", lim.rlim_cur);
    }
    match std::env::current_dir() {
        Ok(dir) => println!("probe cwd: {}", dir.display()),
        Err(e) => println!("probe cwd: errno {}", e.raw_os_error().unwrap_or(0)),
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for line in status.lines() {
        let key = line.split(':').next().unwrap_or("");
        if [
            "Uid",
            "Gid",
            "Groups",
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs",
            "Seccomp",
        ]
        .contains(&key)
        {
            println!("status {line}");
        }
    }
    println!("probe done");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("connect") if args.len() == 3 => {
            report_io(
                "connect",
                std::os::unix::net::UnixStream::connect(&args[2]).map(drop),
            );
        }
        Some("service") if args.len() > 5 && args[4] == "--" => {
            service(&args[2], &args[3]);
            let err = Command::new(&args[5]).args(&args[6..]).exec();
            println!("probe exec: {err}");
            std::process::exit(1);
        }
        _ => {
            eprintln!(
                "usage: viscum-probe service CONTROL_SOCKET HOST_MARKER -- PROGRAM ARGS... | viscum-probe connect PATH"
            );
            std::process::exit(2);
        }
    }
}
