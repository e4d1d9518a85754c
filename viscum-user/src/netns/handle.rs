//! rtnetlink handles for the current namespace or for a named one.
//!
//! A netlink socket belongs to the network namespace it was created in, for its whole life.
//! So a handle for another namespace needs only its socket to be opened inside it (on an
//! [`in_netns`] thread); the socket is then driven from the caller's tokio runtime like any
//! other.

use std::os::fd::{FromRawFd, IntoRawFd};

use rtnetlink::{
    Handle,
    sys::{Socket, TokioSocket, protocols::NETLINK_ROUTE},
};

use super::{NetnsError, in_netns};

/// rtnetlink handle for the current thread's namespace. The connection future is spawned on
/// the current tokio runtime and ends when the last clone of the handle is dropped.
///
/// # Errors
/// [`NetnsError::Socket`] if the socket cannot be opened or there is no tokio runtime.
pub async fn handle_here() -> Result<Handle, NetnsError> {
    let socket =
        Socket::new(NETLINK_ROUTE).map_err(|source| NetnsError::Socket { ns: None, source })?;
    connect(socket, None)
}

/// [`handle_here`] with `NETLINK_GET_STRICT_CHK` on: the kernel checks each request's header
/// and attributes instead of ignoring what it does not use, which is what makes it read a
/// dump request's target namespace (`IFA_TARGET_NETNSID`): a namespace viscum's own knows
/// by id can then be read without a socket opened inside it (a thread entering it).
///
/// # Errors
/// As [`handle_here`], or if the option cannot be set.
pub async fn handle_here_strict() -> Result<Handle, NetnsError> {
    let socket_err = |source| NetnsError::Socket { ns: None, source };
    let socket = Socket::new(NETLINK_ROUTE).map_err(socket_err)?;
    socket
        .set_netlink_get_strict_chk(true)
        .map_err(socket_err)?;
    connect(socket, None)
}

/// rtnetlink handle for the named namespace: its socket is opened inside it (via
/// [`in_netns`]); the connection future is spawned on the current tokio runtime.
///
/// # Errors
/// As [`in_netns`] for entering `name`; [`NetnsError::Socket`] as [`handle_here`].
pub async fn handle_in(name: &str) -> Result<Handle, NetnsError> {
    let socket =
        in_netns(name, || Socket::new(NETLINK_ROUTE))?.map_err(|source| NetnsError::Socket {
            ns: Some(name.to_string()),
            source,
        })?;
    connect(socket, Some(name))
}

/// Wraps a plain netlink socket for tokio and spawns its connection.
fn connect(socket: Socket, ns: Option<&str>) -> Result<Handle, NetnsError> {
    let socket_err = |source| NetnsError::Socket {
        ns: ns.map(str::to_string),
        source,
    };
    // TokioSocket::from_raw_fd registers with the reactor and panics without one; say so as
    // an error instead.
    tokio::runtime::Handle::try_current().map_err(|e| socket_err(std::io::Error::other(e)))?;
    socket.set_non_blocking(true).map_err(socket_err)?;
    // SAFETY: the descriptor comes from `into_raw_fd`, so the TokioSocket becomes its only
    // owner.
    let socket = unsafe { TokioSocket::from_raw_fd(socket.into_raw_fd()) };
    let (connection, handle, _) = rtnetlink::from_socket(socket);
    tokio::spawn(connection);
    Ok(handle)
}
