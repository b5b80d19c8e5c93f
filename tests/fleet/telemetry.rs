//! Telemetry people can consume: the hub's JSON feed read by a generic MQTT client (`mosquitto_sub`) and checked
//! against the JSON Schema in the repo (Python `jsonschema`), typed decoding by the spec's declarations, bad
//! records dropped with a reason while other devices' records keep flowing, the history API's pages, and the CLI's
//! `telemetry query` and `telemetry tail` against a live fleet.

use flotilla_fleet_tests::{
    AgentSpec, ChildLines, Fleet, FleetBuilder, PATIENCE, bin_dir, firmware, wait_for,
};
use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One deployment per region of the sensor firmware (a u64 counter on stream `count`) as workload `workload`,
/// with `count` declared as `ty`.
fn spec(name: &str, workload: &str, region: &str, ty: &str) -> String {
    format!(
        "name = \"{name}\"\n[target]\nregions = [\"{region}\"]\n[placement]\npolicy = \"every\"\n\
         [[workloads]]\nname = \"{workload}\"\nrelease = \"{workload}@1.0.0\"\ntick_ms = 100\nmemory_mib = 4\n\
         cpu_ms = 20\ntelemetry = {{ count = \"{ty}\" }}\n"
    )
}

fn schema() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/schemas/telemetry-feed.schema.json")
}

/// Validates JSON documents (one per line) against the feed schema with Python's `jsonschema`, an implementation
/// that shares nothing with the hub's code. Returns the validator's complaint, if any.
fn schema_errors(lines: &[String]) -> Option<String> {
    let script = "import json, sys, jsonschema\n\
        schema = json.load(open(sys.argv[1]))\n\
        v = jsonschema.Draft202012Validator(schema)\n\
        bad = [f'{e.message} in {line}' for line in sys.stdin if line.strip() for e in v.iter_errors(json.loads(line))]\n\
        print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .arg(schema())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(lines.join("\n").as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("validator exits");
    (!out.status.success()).then(|| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn cli(fleet: &Fleet) -> Command {
    let mut c = Command::new(bin_dir().join("flotilla"));
    c.env("FLOTILLA_SERVER", &fleet.hub.api)
        .env("FLOTILLA_TOKEN_FILE", fleet.hub.dir.join("admin.token"));
    c
}

fn dropped(fleet: &Fleet, reason: &str) -> u64 {
    let text = fleet.hub.client.get_text("/metrics").unwrap_or_default();
    let key = format!("flotilla_telemetry_dropped_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The records of `device`'s `stream` in the hub's history (every page, `limit` per page).
fn history(fleet: &Fleet, device: &str, stream: &str, limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let v = fleet
            .hub
            .client
            .get(&format!(
                "/api/v1/devices/{device}/telemetry?stream={stream}&limit={limit}&after={after}"
            ))
            .expect("history page");
        let page = v["records"].as_array().cloned().unwrap_or_default();
        assert!(page.len() <= limit, "page of {} > {limit}", page.len());
        out.extend(page);
        match v["next_after"].as_u64() {
            Some(a) => after = a,
            None => return out,
        }
    }
}

#[test]
fn json_feed_history_and_tail() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("eu-1", "eu-west", 52.52, 13.40))
        .agent(AgentSpec::new("us-1", "us-east", 40.71, -74.00))
        .start()
        .expect("fleet starts");
    let hub = &fleet.hub;
    for name in ["sensor", "meter"] {
        hub.push_release(name, "1.0.0", 1, &firmware("sensor"))
            .expect("release");
    }

    // A generic MQTT client with an eu-west feed credential subscribes to the JSON feed of its region, and of a
    // region it may not read (refused by the broker: only eu-west records may arrive).
    let (user, password, client_id) = hub
        .feed_credential("jq", &["eu-west"])
        .expect("feed credential");
    let sub = ChildLines::spawn(
        Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &hub.mqtt_port.to_string(),
                "-V",
                "mqttv311",
            ])
            .args(["-u", &user, "-P", &password, "-i", &client_id])
            .args(["-q", "1", "-t", "flotilla/v1/feed/json/eu-west/#"])
            .args(["-t", "flotilla/v1/feed/json/us-east/#"]),
    );
    let tail = ChildLines::spawn(cli(&fleet).args([
        "telemetry",
        "tail",
        "--region",
        "us-east",
        "-o",
        "json",
    ]));

    hub.apply(&spec("sensors-eu", "sensor", "eu-west", "u64le"))
        .expect("apply eu");
    hub.apply(&spec("sensors-us", "meter", "us-east", "u64le"))
        .expect("apply us");

    // The feed: schema-valid records of eu-1 only, decoded as numbers, in sequence.
    let lines = sub.take(5);
    if let Some(e) = schema_errors(&lines) {
        panic!("feed records do not match the schema: {e}");
    }
    let recs: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    for r in &recs {
        assert_eq!(
            (
                r["device"].as_str(),
                r["region"].as_str(),
                r["workload"].as_str()
            ),
            (Some("eu-1"), Some("eu-west"), Some("sensor")),
            "{r}"
        );
        assert_eq!(
            (r["stream"].as_str(), r["type"].as_str()),
            (Some("count"), Some("u64le"))
        );
        assert!(r["value"].as_u64().is_some_and(|v| v >= 1), "{r}");
    }
    let seqs: Vec<u64> = recs.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");

    // The CLI tail (server-sent events) shows us-east only, as JSON lines matching the same schema.
    let tailed = tail.take(3);
    if let Some(e) = schema_errors(&tailed) {
        panic!("tail records do not match the schema: {e}");
    }
    for l in &tailed {
        let r: Value = serde_json::from_str(l).expect("JSON");
        assert_eq!(r["device"], "us-1", "{r}");
    }

    // History: paged, each record once, in order, with the values the feed showed.
    wait_for("20 records in eu-1's history", PATIENCE, || {
        (history(&fleet, "eu-1", "count", 1000).len() >= 20).then_some(())
    })
    .expect("history fills");
    let paged = history(&fleet, "eu-1", "count", 7);
    let all = history(&fleet, "eu-1", "count", 1000);
    assert!(paged.len() >= 20);
    assert_eq!(paged[..], all[..paged.len()], "pages equal one long read");
    assert!(
        paged
            .windows(2)
            .all(|w| w[1]["seq"].as_u64() > w[0]["seq"].as_u64())
    );
    let first = &recs[0];
    let same = all
        .iter()
        .find(|r| r["seq"] == first["seq"])
        .expect("the feed's first record is in the history");
    assert_eq!(
        (&same["value"], &same["region"]),
        (&first["value"], &first["region"])
    );
    let out = cli(&fleet)
        .args([
            "telemetry",
            "query",
            "eu-1",
            "count",
            "--since",
            "1h",
            "--limit",
            "5",
            "-o",
            "json",
        ])
        .output()
        .expect("query runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    // Bad queries are refused with the reason, and the history is still there afterwards.
    for (query, reason) in [
        ("limit=0", "limit must be"),
        ("limit=10001", "limit must be"),
        ("since=20&until=10", "since must be before until"),
        ("step=60", "give stream too"),
        ("stream=count&step=0", "at least 1 second"),
        ("colour=red", "unknown field"),
    ] {
        let err = hub
            .client
            .get(&format!("/api/v1/devices/eu-1/telemetry?{query}"))
            .expect_err(query);
        assert!(
            err.to_string().contains("400") && err.to_string().contains(reason),
            "{query}: {err}"
        );
    }
    assert!(
        hub.client
            .get("/api/v1/devices/nobody/telemetry")
            .is_err_and(|e| e.to_string().contains("404"))
    );
    assert_eq!(q.as_array().map(Vec::len), Some(5), "{q}");
    assert_eq!(q[0], all[0]);

    // A wrong declaration (eight binary bytes are not JSON): eu-1's records are dropped with a reason, counted,
    // and nothing restarts (declarations are not part of the signed spec); us-1's records keep flowing.
    let generation = hub.device("eu-1").expect("eu-1")["desired_generation"].clone();
    let invalid_before = dropped(&fleet, "invalid_json");
    hub.apply(&spec("sensors-eu", "sensor", "eu-west", "json"))
        .expect("apply json");
    wait_for("eu-1's records dropped as invalid JSON", PATIENCE, || {
        (dropped(&fleet, "invalid_json") >= invalid_before + 3).then_some(())
    })
    .expect("drops counted");
    let t = hub
        .client
        .get("/api/v1/devices/eu-1/telemetry")
        .expect("streams");
    assert_eq!(t["streams"][0]["last_drop"], "invalid_json", "{t}");
    let us_before = history(&fleet, "us-1", "count", 1000).len();
    wait_for("us-1's records still flow", PATIENCE, || {
        (history(&fleet, "us-1", "count", 1000).len() >= us_before + 5).then_some(())
    })
    .expect("other devices unaffected");
    assert_eq!(
        hub.device("eu-1").expect("eu-1")["desired_generation"],
        generation
    );
    tail.take(1);

    // Fixed again: eu-1's records reach the feed again.
    hub.apply(&spec("sensors-eu", "sensor", "eu-west", "u64le"))
        .expect("apply fixed");
    let fixed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    wait_for("eu-1 on the feed again", PATIENCE, || {
        let l = sub.rx.recv_timeout(Duration::from_secs(1)).ok()?;
        let r: Value = serde_json::from_str(&l).ok()?;
        (r["hub_time"].as_f64()? >= fixed_at).then_some(())
    })
    .expect("records flow again");
}
