//! `viscum status [--json]`: the daemon's services, from its control socket.

use std::path::PathBuf;

use clap::Args;

use super::{Result, print_json, print_table};
use crate::{
    daemon::{
        control::{self, DaemonStatus, Request, Response},
        state,
    },
    engine::{Pins, attach::AttachState},
};

/// Where the daemon's control socket is.
#[derive(Debug, Args)]
pub struct ControlArg {
    /// The daemon's control socket. Default: derived from --bpffs, /run/viscum.sock for the
    /// default instance (a daemon whose configuration sets another `control` path links it
    /// there).
    #[arg(long, env = "VISCUM_CONTROL")]
    pub control: Option<PathBuf>,
}

impl ControlArg {
    pub fn path(&self, pins: &Pins) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| state::default_control(&pins.dir))
    }

    /// Sends a request; a refusal becomes an error listing the daemon's problems.
    pub async fn send(&self, pins: &Pins, request: &Request) -> Result<Response> {
        let response = control::request(&self.path(pins), request).await?;
        if !response.ok {
            let mut msg = response
                .error
                .clone()
                .unwrap_or_else(|| "the daemon refused".into());
            for p in &response.problems {
                msg.push_str("\n  ");
                msg.push_str(p);
            }
            anyhow::bail!(msg);
        }
        Ok(response)
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub control: ControlArg,
    /// Print JSON (the control protocol's status object) instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(pins: &Pins, args: StatusArgs) -> Result<()> {
    let response = args.control.send(pins, &Request::Status).await?;
    let status = response
        .status
        .ok_or_else(|| anyhow::anyhow!("the daemon sent no status"))?;
    if args.json {
        return print_json(&status);
    }
    print_human(&status);
    Ok(())
}

/// `1h02m`, `3m05s`, `42s`.
pub fn duration(secs: u64) -> String {
    match secs {
        s if s >= 86400 => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// `812`, `12.3K`, `4.1M`, `2.0G`.
pub fn amount(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1}G", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1}M", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1}K", n as f64 / (1u64 << 10) as f64),
        n => n.to_string(),
    }
}

fn print_human(s: &DaemonStatus) {
    let load = match (s.load, s.max_load) {
        (Some(l), Some(m)) => format!(
            ", load {l:.2}/{m:.2}{}",
            if s.shedding { " SHEDDING" } else { "" }
        ),
        _ => String::new(),
    };
    println!(
        "daemon pid {}, up {}, attached to {}{load}",
        s.pid,
        duration(s.uptime_s),
        if s.interfaces.is_empty() {
            "-".into()
        } else {
            s.interfaces.join(", ")
        },
    );
    let rows: Vec<Vec<String>> = s
        .services
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.state.as_str().into(),
                v.health.as_str().into(),
                if v.redirected {
                    "yes".into()
                } else {
                    "no".into()
                },
                v.pid.map_or("-".into(), |p| {
                    format!("{p}{}", if v.adopted { "*" } else { "" })
                }),
                v.uptime_s.map_or("-".into(), duration),
                v.restarts.to_string(),
                amount(v.packets),
                amount(v.bytes),
            ]
        })
        .collect();
    // An interface without the classifier (deleted, or re-created and not yet re-attached)
    // is the first thing to know: none of its clients' traffic is redirected.
    for a in &s.attachments {
        if a.state != AttachState::Attached {
            println!("interface {}: {}", a.interface, a.describe());
        }
    }
    print_table(
        &[
            "SERVICE", "STATE", "HEALTH", "REDIRECT", "PID", "UPTIME", "RESTARTS", "PACKETS",
            "BYTES",
        ],
        &rows,
    );
    // What a person needs to act on, below the table.
    for v in &s.services {
        if let Some(e) = &v.error {
            println!("{}: {e}", v.name);
        } else if !v.redirected
            && v.pid.is_some()
            && let Some(c) = &v.last_check_error
        {
            println!("{}: last check failed: {c}", v.name);
        }
        if let Some(ms) = v.next_start_in_ms {
            println!(
                "{}: {} (restart in {} ms)",
                v.name,
                v.last_exit.as_deref().unwrap_or("not running"),
                ms
            );
        }
        if let Some(n) = v.oom_kills.filter(|n| *n > 0) {
            println!(
                "{}: {n} process(es) killed for exceeding its memory limit",
                v.name
            );
        }
        if let Some(st) = &v.storage {
            match (st.used_bytes, st.total_bytes) {
                (Some(used), Some(total)) => println!(
                    "{}: storage {} used of {} in {}",
                    v.name,
                    amount(used),
                    amount(total),
                    st.path.display()
                ),
                _ => println!(
                    "{}: storage {} bytes in {}",
                    v.name,
                    st.size_bytes,
                    st.path.display()
                ),
            }
            if let Some(e) = &st.error {
                println!("{}: storage: {e}", v.name);
            }
        }
        for (limit, st) in &v.limits {
            if !st.enforced {
                println!(
                    "{}: {limit} limit {} not enforced: {}",
                    v.name, st.value, st.detail
                );
            }
        }
    }
    if s.services.iter().any(|v| v.adopted) {
        println!("(* = process adopted from a previous daemon)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_numbers() {
        assert_eq!(duration(42), "42s");
        assert_eq!(duration(185), "3m05s");
        assert_eq!(duration(3720), "1h02m");
        assert_eq!(amount(812), "812");
        assert_eq!(amount(12_600), "12.3K");
    }
}
