//! A minimal Prometheus text endpoint (`[engine] metrics = "ADDR:PORT"`).
//!
//! Hand-written HTTP/1.0 on a tokio listener: a scraper sends one GET, gets one body and the
//! connection closes. Nothing else is served; an HTTP library would cost more flash on a
//! router than the whole daemon.

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use viscum_common::MetricFamily;

use super::control::{DaemonStatus, Health};

/// A scrape waiting for the supervisor to render the current numbers.
pub type Scrape = oneshot::Sender<String>;

/// Accepts scrapes until `tx`'s receiver goes.
pub async fn serve(listener: TcpListener, tx: mpsc::Sender<Scrape>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, tx).await {
                log::debug!("metrics: connection from {peer}: {e}");
            }
        });
    }
}

async fn connection(mut stream: TcpStream, tx: mpsc::Sender<Scrape>) -> std::io::Result<()> {
    // Read the request head (bounded in size and time: a scraper sends it at once).
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n")
            && !head.windows(2).any(|w| w == b"\n\n")
            && head.len() < 8192
        {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, body) = if method != "GET" {
        ("405 Method Not Allowed", "only GET\n".to_string())
    } else if path != "/metrics" && path != "/" {
        ("404 Not Found", "try /metrics\n".to_string())
    } else {
        let (reply, rx) = oneshot::channel();
        if tx.send(reply).await.is_err() {
            ("503 Service Unavailable", "shutting down\n".to_string())
        } else {
            match rx.await {
                Ok(text) => ("200 OK", text),
                Err(_) => ("503 Service Unavailable", "shutting down\n".to_string()),
            }
        }
    };
    let response = format!(
        "HTTP/1.0 {code}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds the endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Escapes a label value (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text for a status snapshot.
pub fn render(status: &DaemonStatus) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
    };
    let per = |f: &dyn Fn(&super::control::ServiceStatus) -> String| -> Vec<(String, String)> {
        status
            .services
            .iter()
            .map(|s| (format!("service=\"{}\"", label(&s.name)), f(s)))
            .collect()
    };
    family(
        "viscum_interface_attached",
        "gauge",
        "1 if the classifier is on the client-facing interface in the kernel (0: the interface is gone, or was re-created and not yet re-attached).",
        status
            .attachments
            .iter()
            .map(|a| {
                (
                    format!("interface=\"{}\"", label(&a.interface)),
                    u8::from(a.state == crate::engine::attach::AttachState::Attached).to_string(),
                )
            })
            .collect(),
    );
    family(
        "viscum_service_redirected_packets_total",
        "counter",
        "Packets the classifier redirected to the service.",
        per(&|s| s.packets.to_string()),
    );
    family(
        "viscum_service_redirected_bytes_total",
        "counter",
        "Bytes the classifier redirected to the service.",
        per(&|s| s.bytes.to_string()),
    );
    family(
        "viscum_service_flows_total",
        "counter",
        "Flows matching the service, by where they went (edge: kept off the uplink; cloud: fell back).",
        status
            .services
            .iter()
            .flat_map(|s| {
                let n = label(&s.name);
                [
                    (
                        format!("service=\"{n}\",where=\"edge\""),
                        s.edge_flows.to_string(),
                    ),
                    (
                        format!("service=\"{n}\",where=\"cloud\""),
                        s.cloud_flows.to_string(),
                    ),
                ]
            })
            .collect(),
    );
    family(
        "viscum_service_live_flows",
        "gauge",
        "Edge flows of the service open right now.",
        per(&|s| s.live_flows.to_string()),
    );
    family(
        "viscum_service_healthy",
        "gauge",
        "1 if the service's health checks pass.",
        per(&|s| u8::from(s.health == Health::Healthy).to_string()),
    );
    family(
        "viscum_service_redirect_active",
        "gauge",
        "1 if the service's entries are in the datapath.",
        per(&|s| u8::from(s.redirected).to_string()),
    );
    family(
        "viscum_service_up",
        "gauge",
        "1 if the service's process runs.",
        per(&|s| u8::from(s.pid.is_some()).to_string()),
    );
    family(
        "viscum_service_restarts_total",
        "counter",
        "Automatic restarts of the service since the daemon started.",
        per(&|s| s.restarts.to_string()),
    );
    let by_service = |f: &dyn Fn(&super::control::ServiceStatus) -> Option<u64>| {
        status
            .services
            .iter()
            .filter_map(|s| Some((format!("service=\"{}\"", label(&s.name)), f(s)?.to_string())))
            .collect::<Vec<_>>()
    };
    family(
        "viscum_service_oom_kills_total",
        "counter",
        "Processes of the service the OOM killer ended for exceeding its memory limit (services with one).",
        by_service(&|s| s.oom_kills),
    );
    family(
        "viscum_service_storage_size_bytes",
        "gauge",
        "Size of the service's storage file system (services with [service.storage]).",
        by_service(&|s| {
            s.storage
                .as_ref()
                .map(|st| st.total_bytes.unwrap_or(st.size_bytes))
        }),
    );
    family(
        "viscum_service_storage_used_bytes",
        "gauge",
        "Bytes in use in the service's storage while it runs.",
        by_service(&|s| s.storage.as_ref()?.used_bytes),
    );
    family(
        "viscum_service_health_checks_total",
        "counter",
        "Health checks run, by result.",
        status
            .services
            .iter()
            .flat_map(|s| {
                let n = label(&s.name);
                [
                    (
                        format!("service=\"{n}\",result=\"pass\""),
                        s.checks_passed.to_string(),
                    ),
                    (
                        format!("service=\"{n}\",result=\"fail\""),
                        s.checks_failed.to_string(),
                    ),
                ]
            })
            .collect(),
    );
    if let Some(d) = status.datapath {
        // Every global counter, from the registry: a family's samples together, families in
        // the order their first counter has in the registry.
        let mut families: Vec<&MetricFamily> = Vec::new();
        for (info, _) in d.iter() {
            if !families.iter().any(|f| f.name == info.family.name) {
                families.push(info.family);
            }
        }
        for f in families {
            let samples = d
                .iter()
                .filter(|(info, _)| info.family.name == f.name)
                .map(|(info, v)| {
                    let labels = if f.label.is_empty() {
                        String::new()
                    } else {
                        format!("{}=\"{}\"", f.label, info.label)
                    };
                    (labels, v.to_string())
                })
                .collect();
            family(f.name, "counter", f.help, samples);
        }
    }
    if let Some(load) = status.load {
        family(
            "viscum_load",
            "gauge",
            "Load figure compared with max_load (fraction).",
            vec![(String::new(), load.to_string())],
        );
    }
    if let Some(max) = status.max_load {
        family(
            "viscum_max_load",
            "gauge",
            "The max_load threshold (fraction); shedding ends below 0.85 of it.",
            vec![(String::new(), max.to_string())],
        );
    }
    family(
        "viscum_shedding",
        "gauge",
        "1 while the box sheds load: new flows go to the cloud, open edge flows continue.",
        vec![(String::new(), u8::from(status.shedding).to_string())],
    );
    family(
        "viscum_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        vec![(String::new(), status.uptime_s.to_string())],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::control::{DatapathCounters, ServiceStatus};

    #[test]
    fn renders_per_service_and_global_families() {
        let status = DaemonStatus {
            datapath: Some(DatapathCounters {
                seen: 10,
                redirected: 4,
                ..Default::default()
            }),
            services: vec![ServiceStatus {
                name: "web".into(),
                health: Health::Healthy,
                redirected: true,
                packets: 4,
                bytes: 400,
                restarts: 1,
                pid: Some(5),
                ..Default::default()
            }],
            attachments: vec![crate::engine::attach::Attachment {
                interface: "br-lan".into(),
                state: crate::engine::attach::AttachState::InterfaceGone,
                mode: Some("tcx".into()),
                error: None,
            }],
            ..Default::default()
        };
        let text = render(&status);
        assert!(text.contains("viscum_interface_attached{interface=\"br-lan\"} 0\n"));
        assert!(
            text.contains("viscum_service_redirected_packets_total{service=\"web\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("viscum_service_redirected_bytes_total{service=\"web\"} 400\n"));
        assert!(text.contains("viscum_service_healthy{service=\"web\"} 1\n"));
        assert!(text.contains("viscum_service_restarts_total{service=\"web\"} 1\n"));
        assert!(text.contains("viscum_datapath_packets_total{result=\"seen\"} 10\n"));
        assert!(text.contains("viscum_datapath_packets_total{result=\"redirected\"} 4\n"));
        assert!(text.contains("viscum_datapath_flows_total{where=\"edge\"} 0\n"));
        assert!(text.contains(
            "# TYPE viscum_datapath_flow_orphans_total counter\nviscum_datapath_flow_orphans_total 0\n"
        ));
        assert!(text.contains("viscum_datapath_icmp_errors_total{action=\"to_client\"} 0\n"));
        assert!(text.contains("viscum_datapath_replies_total{result=\"to_stack\"} 0\n"));
        // Every registry counter is exported, each family's samples under one HELP/TYPE.
        for info in viscum_common::GLOBAL_COUNTER_INFO {
            let f = info.family;
            assert_eq!(
                text.matches(&format!("# TYPE {} counter\n", f.name))
                    .count(),
                1,
                "{}",
                f.name
            );
            let sample = if f.label.is_empty() {
                format!("\n{} ", f.name)
            } else {
                format!("\n{}{{{}=\"{}\"}} ", f.name, f.label, info.label)
            };
            assert_eq!(text.matches(&sample).count(), 1, "{sample}:\n{text}");
        }
        assert!(text.contains("# TYPE viscum_shedding gauge\nviscum_shedding 0\n"));
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
