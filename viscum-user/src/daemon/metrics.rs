//! The Prometheus exposition of a status snapshot (`[engine] metrics = "ADDR:PORT"`, path
//! `/metrics`; the listener is [`super::web`]).
//!
//! Rendered with the `prometheus-client` crate's Prometheus text encoder (format 0.0.4, the
//! one every scraper reads): a [`Collector`] turns one [`DaemonStatus`] into constant
//! counters and gauges at each scrape, so the numbers come from the same snapshot as
//! `viscum status` and no second copy of them is kept in the daemon. Counters are named
//! without their `_total` suffix here; the encoder adds it to the family and its samples.
//!
//! Families (label in braces):
//! * `viscum_interface_attached{interface}` gauge;
//! * per service (`{service}`): `viscum_service_redirected_packets_total`,
//!   `viscum_service_redirected_bytes_total`, `viscum_service_flows_total{service,where}`
//!   (`edge`/`cloud`), `viscum_service_live_flows`, `viscum_service_healthy`,
//!   `viscum_service_redirect_active`, `viscum_service_up`, `viscum_service_restarts_total`,
//!   `viscum_service_health_checks_total{service,result}` (`pass`/`fail`);
//! * every global datapath counter of the registry ([`viscum_common::GLOBAL_COUNTER_INFO`]),
//!   e.g. `viscum_datapath_packets_total{result}`;
//! * `viscum_load` (only with `max_load`), `viscum_shedding`, `viscum_uptime_seconds`.
//!
//! [`FAMILIES`] lists every family name; `dist/grafana/viscum-dashboard.json` is checked
//! against it.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, prometheus_text},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use viscum_common::MetricFamily;

use super::control::{DaemonStatus, Health, ServiceStatus};

/// The `Content-Type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Names of the families [`render`] writes besides the datapath registry's (as they appear in
/// the exposition, counters with `_total`). With [`family_names`] this is the whole list.
pub const FAMILIES: &[&str] = &[
    "viscum_interface_attached",
    "viscum_service_redirected_packets_total",
    "viscum_service_redirected_bytes_total",
    "viscum_service_flows_total",
    "viscum_service_live_flows",
    "viscum_service_healthy",
    "viscum_service_redirect_active",
    "viscum_service_up",
    "viscum_service_restarts_total",
    "viscum_service_health_checks_total",
    "viscum_service_oom_kills_total",
    "viscum_service_storage_size_bytes",
    "viscum_service_storage_used_bytes",
    "viscum_load",
    "viscum_max_load",
    "viscum_shedding",
    "viscum_uptime_seconds",
];

/// Every family name the endpoint can expose: [`FAMILIES`] and the datapath registry's.
pub fn family_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = FAMILIES.to_vec();
    for info in viscum_common::GLOBAL_COUNTER_INFO {
        if !names.contains(&info.family.name) {
            names.push(info.family.name);
        }
    }
    names
}

/// The exposition text (Prometheus text format 0.0.4) for a status snapshot.
pub fn render(status: &DaemonStatus) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(status.clone())));
    let mut out = String::new();
    // Writing into a String cannot fail, and the collector only fails when the writer does.
    let _ = prometheus_text::encode(&mut out, &registry);
    out
}

/// One status snapshot, encoded at a scrape.
#[derive(Debug)]
struct Snapshot(DaemonStatus);

/// A family's kind and value of one sample.
#[derive(Clone, Copy)]
enum Value {
    Counter(u64),
    Gauge(i64),
    Float(f64),
}

/// Writes one family: its HELP and TYPE lines, then one sample per label set. `name` is the
/// family's name as exposed (a counter's with `_total`).
fn family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Vec<(&'a str, String)>, Value)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let (name, kind) = match first {
        Value::Counter(_) => (
            name.strip_suffix("_total").unwrap_or(name),
            ConstCounter::new(0u64).metric_type(),
        ),
        Value::Gauge(_) | Value::Float(_) => (name, ConstGauge::new(0i64).metric_type()),
    };
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let sample = metric.encode_family(&labels)?;
        match value {
            Value::Counter(v) => ConstCounter::new(v).encode(sample)?,
            Value::Gauge(v) => ConstGauge::new(v).encode(sample)?,
            Value::Float(v) => ConstGauge::new(v).encode(sample)?,
        }
    }
    Ok(())
}

impl Snapshot {
    /// One sample per service, labelled `service`.
    fn per<'a>(
        &'a self,
        f: impl Fn(&ServiceStatus) -> Value + 'a,
    ) -> impl Iterator<Item = (Vec<(&'static str, String)>, Value)> + 'a {
        self.0
            .services
            .iter()
            .map(move |s| (vec![("service", s.name.clone())], f(s)))
    }

    /// Two samples per service, labelled `service` and `key` (`a` and `b`).
    fn per_pair<'a>(
        &'a self,
        key: &'static str,
        a: (&'static str, fn(&ServiceStatus) -> u64),
        b: (&'static str, fn(&ServiceStatus) -> u64),
    ) -> impl Iterator<Item = (Vec<(&'static str, String)>, Value)> + 'a {
        self.0.services.iter().flat_map(move |s| {
            [a, b].map(|(label, f)| {
                (
                    vec![("service", s.name.clone()), (key, label.to_string())],
                    Value::Counter(f(s)),
                )
            })
        })
    }
}

fn flag(b: bool) -> Value {
    Value::Gauge(i64::from(b))
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = &self.0;
        family(
            &mut enc,
            "viscum_interface_attached",
            "1 if the classifier is on the client-facing interface in the kernel (0: the interface is gone, or was re-created and not yet re-attached).",
            status.attachments.iter().map(|a| {
                (
                    vec![("interface", a.interface.clone())],
                    flag(a.state == crate::engine::attach::AttachState::Attached),
                )
            }),
        )?;
        family(
            &mut enc,
            "viscum_service_redirected_packets_total",
            "Packets the classifier redirected to the service.",
            self.per(|s| Value::Counter(s.packets)),
        )?;
        family(
            &mut enc,
            "viscum_service_redirected_bytes_total",
            "Bytes the classifier redirected to the service.",
            self.per(|s| Value::Counter(s.bytes)),
        )?;
        family(
            &mut enc,
            "viscum_service_flows_total",
            "Flows that matched the service's entries, by where the classifier sent them (edge: served here; cloud: matched while an entry was learning or draining). While the service is down it has no entries: its flows go to the cloud uncounted.",
            self.per_pair(
                "where",
                ("edge", |s| s.edge_flows),
                ("cloud", |s| s.cloud_flows),
            ),
        )?;
        family(
            &mut enc,
            "viscum_service_live_flows",
            "Edge flows of the service open right now.",
            self.per(|s| Value::Gauge(i64::try_from(s.live_flows).unwrap_or(i64::MAX))),
        )?;
        family(
            &mut enc,
            "viscum_service_healthy",
            "1 if the service's health checks pass.",
            self.per(|s| flag(s.health == Health::Healthy)),
        )?;
        family(
            &mut enc,
            "viscum_service_redirect_active",
            "1 if the service's entries are in the datapath.",
            self.per(|s| flag(s.redirected)),
        )?;
        family(
            &mut enc,
            "viscum_service_up",
            "1 if the service's process runs.",
            self.per(|s| flag(s.pid.is_some())),
        )?;
        family(
            &mut enc,
            "viscum_service_restarts_total",
            "Automatic restarts of the service since the daemon started, attempted (a start that fails counts).",
            self.per(|s| Value::Counter(u64::from(s.restarts))),
        )?;
        family(
            &mut enc,
            "viscum_service_health_checks_total",
            "Health checks run, by result.",
            self.per_pair(
                "result",
                ("pass", |s| s.checks_passed),
                ("fail", |s| s.checks_failed),
            ),
        )?;
        // Only services that have the figure: a limit-less or storage-less service has no
        // sample rather than a misleading 0.
        let some = |f: fn(&ServiceStatus) -> Option<u64>| {
            self.0
                .services
                .iter()
                .filter_map(move |s| Some((vec![("service", s.name.clone())], f(s)?)))
        };
        family(
            &mut enc,
            "viscum_service_oom_kills_total",
            "Processes of the service the OOM killer ended for exceeding its memory limit (services with one).",
            some(|s| s.oom_kills).map(|(l, v)| (l, Value::Counter(v))),
        )?;
        family(
            &mut enc,
            "viscum_service_storage_size_bytes",
            "Size of the service's storage file system (services with [service.storage]).",
            some(|s| {
                s.storage
                    .as_ref()
                    .map(|st| st.total_bytes.unwrap_or(st.size_bytes))
            })
            .map(|(l, v)| (l, Value::Gauge(i64::try_from(v).unwrap_or(i64::MAX)))),
        )?;
        family(
            &mut enc,
            "viscum_service_storage_used_bytes",
            "Bytes in use in the service's storage while it runs.",
            some(|s| s.storage.as_ref()?.used_bytes)
                .map(|(l, v)| (l, Value::Gauge(i64::try_from(v).unwrap_or(i64::MAX)))),
        )?;
        if let Some(d) = status.datapath {
            // Every global counter, from the registry: a family's samples together, families
            // in the order their first counter has in the registry.
            let mut families: Vec<&MetricFamily> = Vec::new();
            for (info, _) in d.iter() {
                if !families.iter().any(|f| f.name == info.family.name) {
                    families.push(info.family);
                }
            }
            for f in families {
                let samples =
                    d.iter()
                        .filter(|(info, _)| info.family.name == f.name)
                        .map(|(info, v)| {
                            let labels = if f.label.is_empty() {
                                Vec::new()
                            } else {
                                vec![(f.label, info.label.to_string())]
                            };
                            (labels, Value::Counter(v))
                        });
                family(&mut enc, f.name, f.help, samples)?;
            }
        }
        if let Some(load) = status.load {
            family(
                &mut enc,
                "viscum_load",
                "Load figure compared with max_load (fraction).",
                [(Vec::new(), Value::Float(load))],
            )?;
        }
        if let Some(max) = status.max_load {
            family(
                &mut enc,
                "viscum_max_load",
                "The max_load threshold (fraction); shedding ends below 0.85 of it.",
                [(Vec::new(), Value::Float(max))],
            )?;
        }
        family(
            &mut enc,
            "viscum_shedding",
            "1 while the box sheds load: new flows go to the cloud, open edge flows continue.",
            [(Vec::new(), flag(status.shedding))],
        )?;
        family(
            &mut enc,
            "viscum_uptime_seconds",
            "Seconds since the daemon started.",
            [(
                Vec::new(),
                Value::Gauge(i64::try_from(status.uptime_s).unwrap_or(i64::MAX)),
            )],
        )
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::control::DatapathCounters;

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
        assert!(text.contains(
            "# HELP viscum_service_flows_total Flows that matched the service's entries, by where"
        ));
        assert!(text.contains("viscum_service_flows_total{service=\"web\",where=\"edge\"} 0\n"));
        assert!(
            text.contains(
                "viscum_service_health_checks_total{service=\"web\",result=\"fail\"} 0\n"
            )
        );
        assert!(text.contains("viscum_uptime_seconds 0\n"));
        // Every family written is in the published list, and no HELP line is doubled.
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(
                family_names().contains(&name),
                "{name} not in family_names()"
            );
        }
    }

    #[test]
    fn label_values_are_escaped_and_load_is_a_float() {
        let status = DaemonStatus {
            load: Some(0.25),
            services: vec![ServiceStatus {
                name: "a\"b\\c".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render(&status);
        assert!(
            text.contains("viscum_service_up{service=\"a\\\"b\\\\c\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE viscum_load gauge\nviscum_load 0.25\n"),
            "{text}"
        );
    }

    /// `dist/grafana/viscum-dashboard.json`: valid JSON, every query names metrics this module
    /// exports (and nothing else), every family has a panel, every panel and query uses the
    /// `${DS_PROMETHEUS}` input.
    #[test]
    fn grafana_dashboard_uses_only_exported_metrics() {
        let text = include_str!("../../../dist/grafana/viscum-dashboard.json");
        let dash: serde_json::Value = serde_json::from_str(text).expect("valid JSON");
        assert_eq!(dash["__inputs"][0]["name"], "DS_PROMETHEUS");
        assert_eq!(dash["__inputs"][0]["pluginId"], "prometheus");
        let known = family_names();
        let mut used = std::collections::BTreeSet::<String>::new();
        let mut exprs = 0;
        let check_ds = |what: &str, v: &serde_json::Value| {
            assert_eq!(v["datasource"]["uid"], "${DS_PROMETHEUS}", "{what}");
        };
        let vars = dash["templating"]["list"].as_array().unwrap();
        let panels = dash["panels"].as_array().unwrap();
        let queries = vars
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().to_string(),
                    v["definition"].clone(),
                    v,
                )
            })
            .chain(panels.iter().flat_map(|p| {
                let title = p["title"].as_str().unwrap_or("").to_string();
                p["targets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(move |t| (title.clone(), t["expr"].clone(), t))
            }));
        for (what, expr, holder) in queries {
            check_ds(&what, holder);
            let expr = expr
                .as_str()
                .unwrap_or_else(|| panic!("{what}: no expression"));
            exprs += 1;
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("viscum_"))
                .collect();
            assert!(!names.is_empty(), "{what}: {expr} names no viscum metric");
            for n in names {
                assert!(known.contains(&n), "{what}: {expr}: {n} is not exported");
                used.insert(n.to_string());
            }
        }
        for p in panels.iter().filter(|p| p["type"] != "row") {
            check_ds(p["title"].as_str().unwrap_or(""), p);
            assert!(p["targets"].as_array().is_some_and(|t| !t.is_empty()));
        }
        assert!(exprs > 20, "{exprs}");
        for n in &known {
            assert!(used.contains(*n), "no panel shows {n}");
        }
    }
}
