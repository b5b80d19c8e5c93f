//! The shipped operations assets against real software: Debian's Prometheus scrapes a real hub with the scrape
//! settings and the rule file in `deploy/prometheus/`, SLI queries return data, every rule loads healthy, and
//! every query of the Grafana dashboard in `deploy/grafana/` evaluates without error.

use flotilla_fleet_tests::{AgentSpec, FleetBuilder, PATIENCE, firmware, free_port, wait_for};
use flotilla_hub::client::Client;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// A Prometheus server on a free loopback port; killed when dropped.
struct Prometheus {
    child: Child,
    api: Client,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes `target` (host:port) every second with the shipped rules, evaluated every second.
    fn start(target: &str) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::copy(
            deploy_dir().join("prometheus/flotilla-alerts.yml"),
            dir.path().join("flotilla-alerts.yml"),
        )
        .expect("rules");
        // The shipped scrape config, with the target and the intervals a test can wait for.
        let shipped = std::fs::read_to_string(deploy_dir().join("prometheus/prometheus.yml"))
            .expect("prometheus.yml");
        let config = shipped
            .replace("127.0.0.1:8080", target)
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
        assert_ne!(config, shipped, "the shipped config has the expected shape");
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("config");
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log_file(dir.path()))
            .spawn()
            .expect("prometheus starts (apt-get install prometheus)");
        let api = Client::new(&format!("http://127.0.0.1:{port}"), "");
        wait_for("prometheus ready", PATIENCE, || {
            api.get_text("/-/ready").ok()
        })
        .expect("ready");
        Self {
            child,
            api,
            _dir: dir,
        }
    }

    /// An instant query's result vector (an error answer fails the test, naming the query).
    fn query(&self, q: &str) -> Vec<Value> {
        let v = self
            .api
            .get(&format!("/api/v1/query?query={}", encode(q)))
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        assert_eq!(v["status"], "success", "{q}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The first sample's value of a query, if it has one.
    fn value(&self, q: &str) -> Option<f64> {
        self.query(q)
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse().ok())
    }
}

fn log_file(dir: &Path) -> Stdio {
    std::fs::File::create(dir.join("prometheus.log")).map_or(Stdio::null(), Stdio::from)
}

/// Percent-encodes a query for a URL.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `expr` in the dashboard's panels.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(deploy_dir().join("grafana/flotilla-dashboard.json"))
        .expect("dashboard");
    let d: Value = serde_json::from_str(&text).expect("dashboard JSON");
    d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn prometheus_scrapes_the_hub_and_the_shipped_rules_and_dashboard_work() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("eu-1", "eu-west", 52.52, 13.40))
        .agent(AgentSpec::new("us-1", "us-east", 40.71, -74.00))
        .start()
        .expect("fleet starts");
    let hub = &fleet.hub;
    hub.push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    hub.apply(
        "name = \"sensors\"\n[placement]\npolicy = \"every\"\n[[workloads]]\nname = \"sensor\"\n\
         release = \"sensor@1.0.0\"\ntick_ms = 100\nmemory_mib = 4\ncpu_ms = 20\n",
    )
    .expect("apply");
    for d in ["eu-1", "us-1"] {
        hub.wait_workload(d, "sensor", "running").expect("running");
    }
    let target = hub
        .api
        .strip_prefix("http://")
        .expect("http API")
        .to_owned();
    let prom = Prometheus::start(&target);

    wait_for("the hub scraped", PATIENCE, || {
        (prom.value("up{job=\"flotilla-hub\"}")? == 1.0).then_some(())
    })
    .expect("scraped");
    // The SLIs have data: both devices acknowledged their desired state and started the workload; API latency
    // has a p95 for the routes the harness called.
    wait_for("SLI samples in Prometheus", PATIENCE, || {
        let acked = prom.value("sum(flotilla_reconcile_lag_seconds_count)")?;
        let started = prom.value("sum(flotilla_workload_start_seconds_count)")?;
        let scheduled = prom.value("sum(flotilla_scheduling_latency_seconds_count)")?;
        (acked >= 2.0 && started >= 2.0 && scheduled >= 2.0).then_some(())
    })
    .expect("SLIs");
    let p95 = prom.query(
        "histogram_quantile(0.95, sum by (le) (flotilla_api_request_duration_seconds_bucket{route=\"/api/v1/devices/{id}\"}))",
    );
    let p95: f64 = p95
        .first()
        .and_then(|s| s["value"][1].as_str()?.parse().ok())
        .expect("an API latency quantile");
    assert!(p95 > 0.0 && p95 < 60.0, "p95 {p95}");
    let online = prom.query("flotilla_region_devices{state=\"online\"}");
    let mut regions: Vec<&str> = online
        .iter()
        .filter_map(|s| s["metric"]["region"].as_str())
        .collect();
    regions.sort_unstable();
    assert_eq!(regions, ["eu-west", "us-east"]);

    // Every rule of the shipped file loaded and evaluates healthy; no alert fires on this healthy fleet.
    wait_for("rules evaluated", PATIENCE, || {
        let v = prom.api.get("/api/v1/rules").ok()?;
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules
            .iter()
            .all(|r| r["lastEvaluation"] != "0001-01-01T00:00:00Z");
        (rules.len() >= 19 && evaluated).then_some(rules)
    })
    .expect("rules")
    .iter()
    .for_each(|r| assert_eq!(r["health"], "ok", "{r}"));
    let firing = prom.query("ALERTS{alertstate=\"firing\"}");
    assert!(firing.is_empty(), "{firing:?}");
    // The recording rules produce series.
    wait_for("recorded SLO series", PATIENCE, || {
        let offline = prom.query("flotilla:region_offline:ratio");
        (offline.len() == 2).then_some(())
    })
    .expect("recording rules");

    // The dashboard's queries all evaluate (a typo in a metric name would still evaluate, so each must also
    // name at least one metric the hub exports or a recording rule of the shipped file).
    let exported = hub.client.get_text("/metrics").expect("metrics");
    let rules = std::fs::read_to_string(deploy_dir().join("prometheus/flotilla-alerts.yml"))
        .expect("rules");
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{} queries", queries.len());
    for q in &queries {
        prom.query(q);
        let names: Vec<&str> = q
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .filter(|w| w.starts_with("flotilla"))
            .collect();
        assert!(!names.is_empty(), "{q} reads no Flotilla series");
        for name in names {
            // A histogram's series are NAME_bucket/_count/_sum, a counter's NAME_total: any form counts.
            let forms = [
                name,
                name.trim_end_matches("_bucket"),
                name.trim_end_matches("_count"),
                name.trim_end_matches("_sum"),
                name.trim_end_matches("_total"),
            ];
            let known = forms.iter().any(|f| {
                exported.contains(&format!("# TYPE {f} ")) || exported.contains(&format!("\n{f}{{"))
            }) || rules.contains(&format!("record: {name}"));
            assert!(
                known,
                "{q}: {name} is neither exported by the hub nor recorded by the rules"
            );
        }
    }
}
