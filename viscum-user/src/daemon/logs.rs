//! Service logs: `<run_dir>/logs/NAME.log`, capped by copy-and-truncate.
//!
//! Services write their stdout and stderr straight into the file (opened `O_APPEND`, see
//! [`super::process`]), not through the daemon, so a restarting daemon never blocks or kills
//! a chatty service with a full or broken pipe. The daemon checks the size every second and,
//! past [`MAX_LOG_BYTES`], copies the file to `NAME.log.1` (replacing the older one) and
//! truncates it; `O_APPEND` writers then continue at the new end. The price of not owning
//! the pipe: the cap can be overshot by what a service writes within a second, and lines
//! written between the copy and the truncation are lost.

use std::{
    fs, io,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    time::Duration,
};

/// Size at which a log is rotated.
pub const MAX_LOG_BYTES: u64 = 1 << 20;

/// The previous generation of a log.
pub fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Rotates `path` if it has grown past `max` bytes. Returns whether it did.
pub fn rotate_if_needed(path: &Path, max: u64) -> io::Result<bool> {
    let size = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if size <= max {
        return Ok(false);
    }
    fs::copy(path, rotated(path))?;
    fs::OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

/// Appends a line written by the daemon itself (process started, exited), marked as such
/// and stamped with the time in UTC, as an HTTP date (`Thu, 03 Dec 2026 17:58:02 GMT`, RFC
/// 9110 section 5.6.7): readable beside the service's own lines, whatever their format.
pub fn note(path: &Path, line: &str) {
    use std::io::Write;
    let stamp = httpdate::fmt_http_date(std::time::SystemTime::now());
    // One write(2) of the whole line: the service appends to the same file, and a line
    // written in pieces (as `writeln!` formats it) can have the service's output land
    // between them.
    let text = format!("[viscum {stamp}] {line}\n");
    let result = super::process::open_log(path).and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = result {
        log::debug!("cannot write to {}: {e}", path.display());
    }
}

/// The last `lines` lines of the log, reaching into the rotated generation if the current
/// one is shorter.
pub fn tail(path: &Path, lines: usize) -> io::Result<String> {
    let current = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut text = String::from_utf8_lossy(&current).into_owned();
    if text.lines().count() < lines
        && let Ok(old) = fs::read(rotated(path))
    {
        text = String::from_utf8_lossy(&old).into_owned() + &text;
    }
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = all[start..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    Ok(out)
}

/// Copies what is appended to `path` to `out`, forever (`viscum logs --follow`). Starts at
/// offset `from`; notices truncation (rotation) and starts over at the beginning.
pub async fn follow(
    path: &Path,
    mut from: u64,
    out: &mut (dyn io::Write + Send),
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match fs::File::open(path) {
            Ok(mut f) => {
                let len = f.metadata()?.len();
                if len < from {
                    from = 0; // rotated underneath us
                }
                f.seek(SeekFrom::Start(from))?;
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    out.write_all(&buf[..n])?;
                    from += n as u64;
                }
                out.flush()?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => from = 0,
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_past_the_cap_and_tails_across() {
        let dir = std::env::temp_dir().join(format!("viscum-logs-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("svc.log");
        fs::write(&log, "a\nb\nc\n").unwrap();
        assert!(!rotate_if_needed(&log, 100).unwrap());
        assert!(rotate_if_needed(&log, 3).unwrap());
        assert_eq!(fs::read_to_string(rotated(&log)).unwrap(), "a\nb\nc\n");
        assert_eq!(fs::metadata(&log).unwrap().len(), 0);
        note(&log, "hello");
        let t = tail(&log, 2).unwrap();
        assert!(t.starts_with("c\n[viscum "), "{t:?}");
        assert!(t.ends_with(" GMT] hello\n"), "{t:?}");
        // The stamp is a date a person reads, and parses back to now.
        let stamp = &t[t.find("[viscum ").unwrap() + 8..t.find("] hello").unwrap()];
        let at = httpdate::parse_http_date(stamp).unwrap();
        let age = std::time::SystemTime::now()
            .duration_since(at)
            .unwrap_or_default();
        assert!(age.as_secs() < 60, "{stamp}");
        assert_eq!(tail(&dir.join("missing.log"), 5).unwrap(), "");
        fs::remove_dir_all(&dir).unwrap();
    }
}
