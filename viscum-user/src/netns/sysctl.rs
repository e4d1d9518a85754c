//! Sysctls as seen from a network namespace.
//!
//! `/proc/sys/net` resolves against the network namespace of the thread that looks it up, so
//! reading or writing it from an [`in_netns`] thread reaches that namespace's settings with
//! no remount of `/proc` or `/sys` (what `ip netns exec` would need).

use std::{fs, io, path::PathBuf};

use super::{NetnsError, in_netns};

/// Turns `net/ipv4/ip_forward` (or the dotted `net.ipv4.ip_forward`) into a path under
/// `/proc/sys`, refusing anything that could leave it.
///
/// The dotted form is only accepted without any `/`, because interface names may contain
/// dots (`net/ipv4/conf/eth0.100/rp_filter`).
fn sysctl_path(key: &str) -> Result<PathBuf, NetnsError> {
    let invalid = || NetnsError::InvalidSysctlKey {
        key: key.to_string(),
    };
    let separator = if key.contains('/') { '/' } else { '.' };
    let parts: Vec<&str> = key.split(separator).collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\0'))
    {
        return Err(invalid());
    }
    let mut path = PathBuf::from("/proc/sys");
    path.extend(parts);
    Ok(path)
}

/// Runs a file operation on the sysctl, in namespace `ns` or (`None`) right here.
fn with_sysctl<T: Send + 'static>(
    ns: Option<&str>,
    key: &str,
    op: &'static str,
    f: impl FnOnce(PathBuf) -> io::Result<T> + Send + 'static,
) -> Result<T, NetnsError> {
    let path = sysctl_path(key)?;
    let result = match ns {
        Some(name) => in_netns(name, move || f(path))?,
        None => f(path),
    };
    result.map_err(|source| NetnsError::Sysctl {
        op,
        key: key.to_string(),
        ns: ns.map(str::to_string),
        source,
    })
}

/// Writes a sysctl under /proc/sys as seen from namespace `ns` (`None` = current), e.g.
/// `("net/ipv6/ip_nonlocal_bind", "1")`.
///
/// # Errors
/// [`NetnsError::InvalidSysctlKey`] for a key that could leave `/proc/sys`; as
/// [`in_netns`] when entering `ns`; [`NetnsError::Sysctl`] if the write fails (`ENOENT`
/// for an unknown key, `EINVAL` for a value the kernel refuses).
pub fn sysctl_set(ns: Option<&str>, key: &str, value: &str) -> Result<(), NetnsError> {
    let value = value.to_string();
    with_sysctl(ns, key, "write", move |path| fs::write(path, value))
}

/// Reads a sysctl under /proc/sys as seen from namespace `ns` (`None` = current), without the
/// trailing newline.
///
/// # Errors
/// [`NetnsError::InvalidSysctlKey`]; as [`in_netns`] when entering `ns`;
/// [`NetnsError::Sysctl`] if the read fails.
pub fn sysctl_get(ns: Option<&str>, key: &str) -> Result<String, NetnsError> {
    with_sysctl(ns, key, "read", |path| {
        fs::read_to_string(path).map(|s| s.trim_end_matches('\n').to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_under_proc_sys() {
        assert_eq!(
            sysctl_path("net/ipv4/ip_forward").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net.ipv6.ip_nonlocal_bind").unwrap(),
            PathBuf::from("/proc/sys/net/ipv6/ip_nonlocal_bind")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/rp_filter").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/rp_filter")
        );
        for bad in ["", "/etc/passwd", "net/../../etc", "net//x", "net/ipv4/"] {
            assert!(sysctl_path(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn reads_here() {
        // Present on every Linux box with /proc; no privileges needed.
        let v = sysctl_get(None, "kernel/ostype").unwrap();
        assert_eq!(v, "Linux");
    }
}
