//! `redirect-add` / `redirect-del` from the control socket: `viscum redirect add/del` handing
//! its change to the running daemon, which applies it with the engine it holds open (see
//! [`crate::redirect::request`] for why).
//!
//! Each request is served in its connection's task as soon as it is read ([`Redirects::direct`];
//! a request that reaches the main loop anyway gets a task of its own, [`Redirects::take`]),
//! not queued behind a `reload` or `service stop` that may wait seconds for a drain, nor
//! behind the main loop's periodic work: a CLI that applied the change itself would not wait
//! for those either. It is serialised with the daemon's own
//! changes the way a CLI's is: by the engine mutex, and the instance's write lock taken by
//! every step ([`crate::engine::lock`]). The entries it adds belong to no service, exactly as
//! if the CLI had added them, so no service's reconciliation removes them.
//!
//! The daemon acts only for a client in its own network namespace (interface names and
//! namespaces are resolved in the daemon's) on its own instance (the client's `--bpffs` as the
//! client sees it, compared with the daemon's pin directory by device and inode); otherwise it
//! declines and the client applies the request itself. Host-name matches are declined too:
//! their DNS lookup would hold the engine for as long as the resolver takes.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{Mutex, oneshot};

use super::control::{Direct, Envelope, Request, Response};
use crate::{
    config::Config,
    endpoint::Endpoint,
    engine::{Engine, Pins},
    redirect::request::{self, AddRequest, DelRequest, Peer},
    spec::Match,
};

/// What serving a redirect request needs from the daemon.
#[derive(Clone)]
pub(super) struct Redirects {
    /// The daemon's engine, shared with its service tasks.
    pub engine: Arc<Mutex<Engine>>,
    /// The daemon's instance.
    pub pins: Pins,
    /// The running configuration's matches, by service.
    pub owned: Owned,
}

/// The exact matches of the running configuration's services: (service, match). A
/// `redirect-del` of one is refused, since the service's task would restore the entry
/// within a second (with its counters reset) after reporting the delete done.
pub(super) type Owned = Arc<std::sync::RwLock<Vec<(String, Endpoint)>>>;

/// Records `config`'s matches in `owned` (at start and at each applied reload).
pub(super) fn set_owned(owned: &Owned, config: &Config) {
    let now = config
        .services
        .iter()
        .flat_map(|s| s.matches.iter().map(|m| (s.name.clone(), *m)))
        .collect();
    // A poisoned lock only means a writer panicked mid-replace: the value is replaced whole.
    *owned
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = now;
}

impl Redirects {
    /// Serves a redirect request in a task of its own and returns `None`; any other request
    /// is handed back for the daemon's main loop.
    pub fn take(&self, (request, reply): Envelope) -> Option<Envelope> {
        if !matches!(request, Request::RedirectAdd(_) | Request::RedirectDel(_)) {
            return Some((request, reply));
        }
        let this = self.clone();
        tokio::spawn(async move { this.answer(request, reply).await });
        None
    }

    /// The control socket's [`Direct`] answer: redirect requests are served in their
    /// connection's task, so not even the daemon's main loop (busy for tens of ms every
    /// `LINK_RECHECK` scanning the entries among thousands) stands between a request and the
    /// engine.
    pub fn direct(&self) -> Direct {
        let this = self.clone();
        Arc::new(move |request| match request {
            r @ (Request::RedirectAdd(_) | Request::RedirectDel(_)) => {
                let this = this.clone();
                Ok(Box::pin(async move { this.timed(r).await }))
            }
            other => Err(Box::new(other)),
        })
    }

    async fn answer(&self, request: Request, reply: oneshot::Sender<Response>) {
        let response = self.timed(request).await;
        let _ = reply.send(response);
    }

    /// [`Redirects::serve`], logging what each change cost the daemon, from the request to
    /// its answer (B7 reads it).
    async fn timed(&self, request: Request) -> Response {
        let started = Instant::now();
        let response = self.serve(request).await;
        if let Some(report) = &response.redirect {
            log::info!(
                "control: {} ({:.2} ms)",
                report.out.join("; "),
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        response
    }

    /// The answer to a redirect request (others get an error).
    pub async fn serve(&self, request: Request) -> Response {
        match request {
            Request::RedirectAdd(r) => self.add(r).await,
            Request::RedirectDel(r) => self.del(r).await,
            _ => Response::error("not a redirect request"),
        }
    }

    async fn add(&self, r: AddRequest) -> Response {
        if let Err(why) = same_instance(r.peer, &r.bpffs, &self.pins) {
            return Response::declined(why);
        }
        let spec = match r.spec() {
            Ok(s) => s,
            Err(e) => return Response::error(format!("{e:#}")),
        };
        if matches!(spec.matches.first(), Some(Match::Host(_))) {
            return Response::declined(HOST_NAMES);
        }
        let mut engine = self.engine.lock().await;
        match request::apply_add(&mut engine, &spec, &r.dns).await {
            Ok(report) => Response {
                ok: true,
                redirect: Some(report),
                ..Response::default()
            },
            Err(e) => Response::error(format!("{e:#}")),
        }
    }

    async fn del(&self, r: DelRequest) -> Response {
        if let Err(why) = same_instance(r.peer, &r.bpffs, &self.pins) {
            return Response::declined(why);
        }
        let matched = match r.target_match() {
            Ok(Match::Host(_)) => return Response::declined(HOST_NAMES),
            Ok(m) => m,
            Err(e) => return Response::error(format!("{e:#}")),
        };
        if let Match::Addr(endpoint) = &matched {
            let owned = self
                .owned
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((service, _)) = owned.iter().find(|(_, m)| m == endpoint) {
                return Response::error(format!(
                    "{endpoint} is an entry of service {service} in the daemon's configuration, \
                     which would restore it: remove the match from the configuration and \
                     reload, or stop the service (viscum service stop {service})"
                ));
            }
        }
        // No interrupt of our own: a client that wants the drain cut short (Ctrl-C) sends
        // the same delete again with `now`.
        let mut said = Vec::new();
        let done = request::apply_del(
            &self.engine,
            matched,
            &r.dns,
            r.now,
            Duration::from_secs(r.drain_timeout_s),
            std::future::pending(),
            |line| said.push(line.to_owned()),
        )
        .await;
        match done {
            Ok(mut report) => {
                said.append(&mut report.out);
                report.out = said;
                Response {
                    ok: true,
                    redirect: Some(report),
                    ..Response::default()
                }
            }
            Err(e) => Response::error(format!("{e:#}")),
        }
    }
}

const HOST_NAMES: &str =
    "host-name matches are resolved and applied by the client (a lookup would hold the engine)";

/// Device and inode of a path.
fn identity(path: &Path) -> std::io::Result<(u64, u64)> {
    std::fs::metadata(path).map(|m| (m.dev(), m.ino()))
}

/// The cookie of the daemon's own network namespace (its tasks never leave it: code that
/// enters another namespace does so on a thread of its own).
fn own_netns_cookie() -> Option<u64> {
    static COOKIE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *COOKIE.get_or_init(|| {
        use std::os::fd::AsFd as _;
        let socket = std::os::unix::net::UnixDatagram::unbound().ok()?;
        request::netns_cookie(socket.as_fd()).ok()
    })
}

/// Whether the client `peer` is in the daemon's network namespace (by the namespace cookie
/// of its socket; before Linux 5.14, by its process's `/proc/PID/ns/net`) and names the
/// daemon's instance with `bpffs` (as it sees the path: through `/proc/PID/root`, so a
/// client in another mount namespace is compared by what it would open). `Err` says why not.
fn same_instance(peer: Option<Peer>, bpffs: &Path, pins: &Pins) -> Result<(), String> {
    let peer = peer.unwrap_or_default();
    let pid = peer
        .pid
        .ok_or("the client's process is unknown (no SO_PEERCRED)")?;
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let same_netns = match (peer.netns_cookie, own_netns_cookie()) {
        (Some(theirs), Some(ours)) => theirs == ours,
        _ => {
            let theirs = identity(&proc.join("ns/net"))
                .map_err(|e| format!("cannot read the client's network namespace: {e}"))?;
            let ours = identity(Path::new("/proc/self/ns/net"))
                .map_err(|e| format!("cannot read the daemon's network namespace: {e}"))?;
            theirs == ours
        }
    };
    if !same_netns {
        return Err("the client is in another network namespace than the daemon".into());
    }
    let Ok(relative) = bpffs.strip_prefix("/") else {
        return Err(format!("bpffs {} is not an absolute path", bpffs.display()));
    };
    let theirs = identity(&proc.join("root").join(relative))
        .map_err(|e| format!("cannot find the client's bpffs {}: {e}", bpffs.display()))?;
    let ours = identity(&pins.dir)
        .map_err(|e| format!("cannot read the daemon's bpffs {}: {e}", pins.dir.display()))?;
    if theirs != ours {
        return Err(format!(
            "the client's bpffs {} is not the daemon's instance ({})",
            bpffs.display(),
            pins.dir.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_instance_compares_namespace_and_directory() {
        let peer = Peer {
            pid: Some(i32::try_from(std::process::id()).unwrap()),
            netns_cookie: own_netns_cookie(),
        };
        let me = Some(peer);
        let dir = std::env::temp_dir();
        let pins = Pins::new(&dir);
        assert_eq!(same_instance(me, &dir, &pins), Ok(()));
        let other = Pins::new("/");
        let e = same_instance(me, &dir, &other).unwrap_err();
        assert!(e.contains("not the daemon's instance"), "{e}");
        assert!(
            same_instance(None, &dir, &pins)
                .unwrap_err()
                .contains("SO_PEERCRED")
        );
        let e = same_instance(me, Path::new("relative"), &pins).unwrap_err();
        assert!(e.contains("not an absolute path"), "{e}");
        // Another namespace's cookie (where the kernel has cookies): declined.
        if let Some(cookie) = own_netns_cookie() {
            let elsewhere = Some(Peer {
                netns_cookie: Some(cookie + 1),
                ..peer
            });
            let e = same_instance(elsewhere, &dir, &pins).unwrap_err();
            assert!(e.contains("another network namespace"), "{e}");
        }
    }
}
