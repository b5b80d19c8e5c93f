//! End to end with real agents: deploy, converge, change the spec (only affected devices get a new generation),
//! telemetry on the feed topic, `why`, bad specs and wrong roles. Against the embedded broker and Mosquitto.

use flotilla_fleet_tests::{AgentSpec, BrokerKind, FleetBuilder, PATIENCE, firmware, wait_for};
use flotilla_shared::codec::{self, Message};
use flotilla_shared::topics;
use std::time::Duration;

fn spec(regions: &str, config: &str) -> String {
    format!(
        "name = \"sensors\"\n[target]\nselector = {{ role = \"gateway\" }}\nregions = [{regions}]\n\
         [placement]\npolicy = \"every\"\n[[workloads]]\nname = \"sensor\"\nrelease = \"sensor@1.0.0\"\n\
         tick_ms = 100\nmemory_mib = 4\ncpu_ms = 20\nconfig = {{ site = \"{config}\" }}\n"
    )
}

fn generation(f: &flotilla_fleet_tests::Fleet, id: &str) -> u64 {
    f.hub
        .device(id)
        .and_then(|d| d["desired_generation"].as_u64())
        .unwrap_or(0)
}

fn scenario(broker: BrokerKind) {
    let fleet = FleetBuilder::new()
        .broker(broker)
        .agent(AgentSpec::new("eu-1", "eu-west", 52.52, 13.40))
        .agent(AgentSpec::new("us-1", "us-east", 40.71, -74.00))
        .agent(AgentSpec::new("ap-1", "ap-south", 1.35, 103.81))
        .start()
        .expect("fleet starts");
    let hub = &fleet.hub;
    let mut feed = hub
        .feed_client("e2e", &["eu-west"], &["flotilla/v1/telemetry/eu-west/#"])
        .expect("feed");
    hub.push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release pushed");

    // Apply to two regions: both placed devices run the workload; the third gets nothing.
    hub.apply(&spec("\"eu-west\", \"us-east\"", "a"))
        .expect("applied");
    hub.wait_workload("eu-1", "sensor", "running")
        .expect("eu-1 runs");
    hub.wait_workload("us-1", "sensor", "running")
        .expect("us-1 runs");
    assert_eq!(generation(&fleet, "ap-1"), 0);
    let (g_eu, g_us) = (generation(&fleet, "eu-1"), generation(&fleet, "us-1"));

    // Telemetry from the guest arrives on the region's feed topic, from the right device.
    let (topic, payload) = wait_for("telemetry on the feed", PATIENCE, || {
        feed.next_message(Duration::from_secs(1))
    })
    .expect("feed");
    assert!(
        topic.starts_with("flotilla/v1/telemetry/eu-west/eu-1/"),
        "{topic}"
    );
    let Ok(Message::Telemetry(records)) = codec::decode(&payload) else {
        panic!("telemetry payload")
    };
    assert_eq!(records[0].device.as_str(), "eu-1");
    assert_eq!(
        topics::parse_telemetry(&topic).map(|t| t.0),
        Some("eu-west".to_owned())
    );
    // The hub ingests the same feed: per-stream counts with no sequence gaps.
    let t = wait_for("hub telemetry ingestion", PATIENCE, || {
        let v = hub.client.get("/api/v1/devices/eu-1/telemetry").ok()?;
        (v["streams"][0]["records"].as_u64()? >= 3).then_some(v)
    })
    .expect("ingested");
    assert_eq!(t["streams"][0]["stream"], "count");
    assert_eq!(t["streams"][0]["gaps"], 0, "{t}");

    // The device list in pages: each device once, in id order.
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let page = hub
            .client
            .get(&format!("/api/v1/devices?limit=2&after={after}"))
            .expect("page");
        let ids: Vec<String> = page
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|d| d["id"].as_str().map(str::to_owned))
            .collect();
        assert!(ids.len() <= 2, "{ids:?}");
        match ids.last() {
            Some(last) => after.clone_from(last),
            None => break,
        }
        paged.extend(ids);
    }
    assert_eq!(paged, ["ap-1", "eu-1", "us-1"]);
    for bad in ["limit=0", "limit=10001", "limit=x"] {
        let err = hub
            .client
            .get(&format!("/api/v1/devices?{bad}"))
            .expect_err(bad);
        assert!(err.to_string().contains("400"), "{bad}: {err}");
    }

    // Widen to ap-south: only ap-1 gets a new generation; the others are untouched.
    hub.apply(&spec("\"eu-west\", \"us-east\", \"ap-south\"", "a"))
        .expect("applied");
    hub.wait_workload("ap-1", "sensor", "running")
        .expect("ap-1 runs");
    assert_eq!(
        (generation(&fleet, "eu-1"), generation(&fleet, "us-1")),
        (g_eu, g_us)
    );

    // A config change reaches every placed device as a new generation, applied without re-downloading.
    hub.apply(&spec("\"eu-west\", \"us-east\", \"ap-south\"", "b"))
        .expect("applied");
    for id in ["eu-1", "us-1", "ap-1"] {
        wait_for(
            &format!("{id} applies the new generation"),
            PATIENCE,
            || {
                let d = hub.device(id)?;
                (d["applied_generation"] == d["desired_generation"]
                    && d["workloads"][0]["state"] == "running")
                    .then_some(())
            },
        )
        .expect("converged");
        assert_eq!(
            fleet
                .agent(id)
                .log()
                .matches("artifact verified and cached")
                .count(),
            1,
            "{id} downloaded once"
        );
    }
    let why = hub.client.get("/api/v1/why/eu-1/sensor").expect("why");
    assert!(
        why["explanation"]
            .as_str()
            .unwrap_or("")
            .starts_with("running version 1.0.0"),
        "{why}"
    );

    // A malformed spec is refused with the field, and nothing changes.
    let before = hub
        .client
        .get("/api/v1/deployments/sensors")
        .expect("status");
    let err = hub
        .apply(&spec("\"eu-west\"", "c").replace("policy = \"every\"", "policy = \"all\""))
        .expect_err("invalid");
    assert!(err.to_string().contains("placement.policy"), "{err}");
    let err = hub
        .apply(&spec("\"eu-west\"", "c").replace("sensor@1.0.0", "sensor@9.9.9"))
        .expect_err("unknown release");
    assert!(err.to_string().contains("workloads[0].release"), "{err}");
    assert_eq!(
        hub.client
            .get("/api/v1/deployments/sensors")
            .expect("status")["placed"],
        before["placed"]
    );
}

/// Deploy, converge, widen, reconfigure and refuse bad specs against the embedded broker.
#[test]
fn end_to_end_embedded_broker() {
    scenario(BrokerKind::Embedded);
}

/// The same story against a real Mosquitto started by the harness.
#[test]
fn end_to_end_mosquitto() {
    scenario(BrokerKind::Mosquitto);
}

/// Roles are enforced and mutating calls are audited; bad tokens and unknown devices give clear errors.
#[test]
fn api_roles_and_errors() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("eu-1", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    let hub = &fleet.hub;
    let bad = flotilla_hub::client::Client::new(&hub.api, "not-a-token");
    assert!(
        bad.get("/api/v1/devices")
            .expect_err("401")
            .to_string()
            .starts_with("401")
    );
    let err = hub
        .client
        .get("/api/v1/devices/nope")
        .expect_err("404")
        .to_string();
    assert!(
        err.starts_with("404") && err.contains("no device nope"),
        "{err}"
    );
    let err = hub
        .client
        .get("/api/v1/devices/BAD$")
        .expect_err("400")
        .to_string();
    assert!(err.starts_with("400"), "{err}");
    let audit = hub.client.get("/api/v1/audit").expect("audit");
    assert!(
        audit
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["action"] == "enroll-token")),
        "{audit}"
    );
    // A viewer may read but not apply; an operator may not mint tokens.
    let mint = |role: &str| {
        let body = format!("{{\"name\": \"{role}-bot\", \"role\": \"{role}\"}}");
        let v = hub
            .client
            .post("/api/v1/tokens", "application/json", body.as_bytes(), &[])
            .expect("token");
        flotilla_hub::client::Client::new(&hub.api, v["token"].as_str().expect("token"))
    };
    let viewer = mint("viewer");
    assert!(viewer.get("/api/v1/devices").is_ok());
    let err = viewer
        .post(
            "/api/v1/deployments",
            "application/toml",
            b"name = \"x\"",
            &[],
        )
        .expect_err("403")
        .to_string();
    assert!(
        err.starts_with("403") && err.contains("needs Operator"),
        "{err}"
    );
    let operator = mint("operator");
    let err = operator
        .post("/api/v1/tokens", "application/json", b"{}", &[])
        .expect_err("403")
        .to_string();
    assert!(err.starts_with("403"), "{err}");
    let err = hub
        .client
        .post(
            "/api/v1/tokens",
            "application/json",
            b"{\"name\":\"x\",\"role\":\"root\"}",
            &[],
        )
        .expect_err("400");
    assert!(err.to_string().contains("is not viewer"), "{err}");
    let openapi = hub.client.get("/api/v1/openapi.json").expect("openapi");
    assert!(openapi["paths"]["/api/v1/deployments"].is_object());
}

/// API tokens carry an optional expiry, are listed without secrets and revoked by name, through the CLI and the
/// API; only admins manage them, names are unique, and the last admin token cannot be revoked.
#[test]
fn api_tokens_expire_are_listed_and_revoked() {
    let fleet = FleetBuilder::new().start().expect("hub");
    let hub = &fleet.hub;
    let token = hub
        .cli(&[
            "token",
            "--name",
            "ci-job",
            "--role",
            "operator",
            "--ttl-secs",
            "3600",
        ])
        .expect("token")
        .trim()
        .to_owned();
    assert!(token.starts_with("fat_"), "{token}");
    let ci = flotilla_hub::client::Client::new(&hub.api, &token);
    assert!(ci.get("/api/v1/devices").is_ok());
    // Names are unique while the token lives.
    let dup = hub
        .cli(&["token", "--name", "ci-job", "--role", "viewer"])
        .expect_err("duplicate name");
    assert!(dup.to_string().contains("exists"), "{dup}");
    let bad = hub
        .cli(&["token", "--name", "a/b", "--role", "viewer"])
        .expect_err("bad name");
    assert!(bad.to_string().contains("400"), "{bad}");
    let bad = hub
        .cli(&[
            "token",
            "--name",
            "x",
            "--role",
            "viewer",
            "--ttl-secs",
            "0",
        ])
        .expect_err("zero ttl");
    assert!(bad.to_string().contains("ttl_secs"), "{bad}");
    assert!(hub.cli(&["token", "--role", "viewer"]).is_err());

    // A short-lived token stops working by itself.
    let brief = hub
        .cli(&[
            "token",
            "--name",
            "brief",
            "--role",
            "viewer",
            "--ttl-secs",
            "1",
        ])
        .expect("token")
        .trim()
        .to_owned();
    let brief = flotilla_hub::client::Client::new(&hub.api, &brief);
    let err = wait_for("the short token to expire", PATIENCE, || {
        brief.get("/api/v1/devices").err()
    })
    .expect("expires");
    assert!(
        err.to_string().starts_with("401") && err.to_string().contains("brief has expired"),
        "{err}"
    );

    // Listing: names, roles and expiry, never a secret.
    let ls = hub.cli(&["token", "ls"]).expect("ls");
    assert!(ls.contains("ci-job") && ls.contains("operator"), "{ls}");
    assert!(
        ls.lines()
            .any(|l| l.starts_with("brief") && l.contains("(expired)")),
        "{ls}"
    );
    assert!(
        ls.lines()
            .any(|l| l.starts_with("admin") && l.ends_with("never")),
        "{ls}"
    );
    assert!(!ls.contains("fat_"), "{ls}");
    let json = hub.client.get("/api/v1/tokens").expect("list");
    assert!(!json.to_string().contains("fat_"), "{json}");
    // Only admins manage tokens.
    let err = ci.get("/api/v1/tokens").expect_err("operator");
    assert!(err.to_string().starts_with("403"), "{err}");
    let err = ci.delete("/api/v1/tokens/admin").expect_err("operator");
    assert!(err.to_string().starts_with("403"), "{err}");

    // Revocation ends the token at once; unknown names are 404; the last admin token stays.
    assert!(
        hub.cli(&["token", "revoke", "ci-job"])
            .expect("revoke")
            .contains("revoked ci-job")
    );
    let err = ci.get("/api/v1/devices").expect_err("revoked");
    assert!(err.to_string().starts_with("401"), "{err}");
    let err = hub
        .client
        .delete("/api/v1/tokens/nosuch")
        .expect_err("unknown");
    assert!(err.to_string().starts_with("404"), "{err}");
    let err = hub
        .client
        .delete("/api/v1/tokens/admin")
        .expect_err("last admin");
    assert!(
        err.to_string().starts_with("409") && err.to_string().contains("last admin"),
        "{err}"
    );
    assert!(hub.client.get("/api/v1/devices").is_ok());
    let audit = hub.client.get("/api/v1/audit").expect("audit");
    assert!(
        audit.as_array().is_some_and(|a| a
            .iter()
            .any(|e| e["action"] == "api-token-revoke" && e["detail"] == "ci-job")),
        "{audit}"
    );
}

/// Enrollment tokens are single-use: a second agent presenting a used token is refused and exits with the
/// "bad configuration" code (78) instead of crash-looping.
#[test]
fn reused_enrollment_token_is_refused() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("eu-1", "eu-west", 52.5, 13.4))
        .start()
        .expect("fleet");
    let used = std::fs::read_to_string(&fleet.agent("eu-1").config).expect("config");
    let dir = fleet.root.path().join("intruder");
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = used
        .replace("device_id = \"eu-1\"", "device_id = \"intruder\"")
        .replace(
            &fleet.agent("eu-1").state_dir().display().to_string(),
            &dir.join("state").display().to_string(),
        );
    std::fs::write(dir.join("agent.toml"), cfg).expect("write");
    let out = std::process::Command::new(flotilla_fleet_tests::bin_dir().join("flotilla-agent"))
        .arg("--config")
        .arg(dir.join("agent.toml"))
        .output()
        .expect("runs");
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already used"));
    assert!(fleet.hub.device("intruder").is_none());
}

/// The same story over `mqtts://` for the hub and the agents (Mosquitto TLS listener, a test CA given to both).
#[test]
fn end_to_end_mosquitto_tls() {
    scenario(BrokerKind::MosquittoTls);
}

/// The same story with the embedded broker's TLS listener and device certificates (mutual TLS).
#[test]
fn end_to_end_embedded_broker_mutual_tls() {
    scenario(BrokerKind::EmbeddedTls);
}

/// Mutual TLS on the embedded broker refuses a client without a device certificate and one whose certificate
/// comes from another CA, and admits one with a certificate from the configured CA. The hub and broker keep
/// running through the refusals.
#[test]
fn embedded_broker_mutual_tls_refuses_unknown_clients() {
    let fleet = FleetBuilder::new()
        .broker(BrokerKind::EmbeddedTls)
        .start()
        .expect("fleet");
    let (port, pki) = fleet.hub.embedded_tls.clone().expect("tls listener");
    let other = tempfile::tempdir().expect("tempdir");
    let stranger = flotilla_fleet_tests::test_pki(other.path()).expect("other pki");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // The first thing the link reports: connected, or the error that ended the attempt.
    let first_event = |cert: Option<(&std::path::Path, &std::path::Path)>| -> String {
        rt.block_on(async {
            let (_link, mut rx) = flotilla_mqtt::connect(flotilla_mqtt::LinkSettings {
                client_id: "probe".into(),
                host: "localhost".into(),
                port,
                keepalive: Duration::from_secs(5),
                tls: Some(flotilla_mqtt::TlsSettings {
                    ca_file: Some(pki.ca.clone()),
                    ca_sha256: None,
                    client_cert: cert.map(|c| c.0.to_owned()),
                    client_key: cert.map(|c| c.1.to_owned()),
                }),
                credentials: None,
                last_will: None,
                subscriptions: vec![],
                clean_session: true,
                queue: 16,
            })
            .expect("link settings");
            match tokio::time::timeout(PATIENCE, rx.recv()).await {
                Ok(Some(flotilla_mqtt::LinkEvent::Connected)) => "connected".to_owned(),
                Ok(Some(flotilla_mqtt::LinkEvent::Disconnected(e))) => format!("refused: {e}"),
                other => format!("unexpected: {other:?}"),
            }
        })
    };
    let none = first_event(None);
    assert!(none.starts_with("refused"), "no client certificate: {none}");
    let foreign = first_event(Some((&stranger.client_cert, &stranger.client_key)));
    assert!(
        foreign.starts_with("refused"),
        "certificate from another CA: {foreign}"
    );
    println!("without a certificate: {none}\nwith another CA's certificate: {foreign}");
    // A certificate from the configured CA gets through TLS; the broker then wants to know who it is (a device
    // authenticates with its credentials, which this probe has none of): refused by MQTT, not by TLS.
    let good = first_event(Some((&pki.client_cert, &pki.client_key)));
    assert!(
        good.contains("BadUserNamePassword"),
        "a device certificate from the configured CA passes TLS: {good}"
    );
    assert!(
        fleet.hub.client.get("/api/v1/devices").is_ok(),
        "hub still up"
    );
}

/// Layered config: one deployment, a region override and a device override. Each device's desired state carries
/// its own config (shown by `device show` as `effective_config`, and read by the guest, which logs it); changing
/// the device override gives only that device a new generation.
#[test]
fn config_overrides_by_region_and_device() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("eu-1", "eu-west", 52.52, 13.40))
        .agent(AgentSpec::new("eu-2", "eu-west", 48.85, 2.35))
        .agent(AgentSpec::new("us-1", "us-east", 40.71, -74.00))
        .start()
        .expect("fleet starts");
    let hub = &fleet.hub;
    hub.push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release pushed");
    let spec = |device_site: &str| {
        format!(
            "name = \"sensors\"\n[placement]\npolicy = \"every\"\n[[workloads]]\nname = \"sensor\"\n\
             release = \"sensor@1.0.0\"\ntick_ms = 100\nmemory_mib = 4\ncpu_ms = 20\nconfig = {{ site = \"a\", unit = \"c\" }}\n\
             [[workloads.overrides]]\nmatch = {{ region = \"us-east\" }}\nconfig = {{ site = \"b\" }}\n\
             [[workloads.overrides]]\nmatch = {{ device = \"eu-2\" }}\nconfig = {{ site = \"{device_site}\" }}\n"
        )
    };
    hub.apply(&spec("c")).expect("applied");
    for id in ["eu-1", "eu-2", "us-1"] {
        hub.wait_workload(id, "sensor", "running").expect("running");
    }
    let effective = |id: &str| {
        hub.device(id)
            .and_then(|d| d["effective_config"]["sensor"].as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    assert_eq!(
        ["eu-1", "eu-2", "us-1"].map(effective),
        ["site=a\nunit=c\n", "site=c\nunit=c\n", "site=b\nunit=c\n"]
    );
    // The guest reads its own config (it logs it once at start).
    let logs = wait_for("eu-2's guest logs its config", PATIENCE, || {
        let v = hub
            .client
            .get("/api/v1/devices/eu-2/logs/sensor?lines=20")
            .ok()?;
        let text = v["text"].as_str()?.to_owned();
        text.contains("site=c").then_some(text)
    })
    .expect("guest output");
    assert!(!logs.contains("site=a"), "{logs}");
    let before = ["eu-1", "eu-2", "us-1"].map(|id| generation(&fleet, id));
    hub.apply(&spec("d")).expect("applied");
    wait_for("eu-2 takes its new config", PATIENCE, || {
        (effective("eu-2") == "site=d\nunit=c\n").then_some(())
    })
    .expect("new config");
    let after = ["eu-1", "eu-2", "us-1"].map(|id| generation(&fleet, id));
    assert_eq!(
        (after[0], after[2]),
        (before[0], before[2]),
        "only eu-2 changes"
    );
    assert!(after[1] > before[1]);
}

/// `apply --dry-run` reports, device by device, exactly what the apply then does, and changes nothing itself.
#[test]
fn dry_run_matches_the_apply_device_for_device() {
    let fleet = FleetBuilder::new()
        .agent(AgentSpec::new("eu-1", "eu-west", 52.52, 13.40))
        .agent(AgentSpec::new("eu-2", "eu-west", 48.85, 2.35))
        .agent(AgentSpec::new("us-1", "us-east", 40.71, -74.00))
        .start()
        .expect("fleet starts");
    let hub = &fleet.hub;
    hub.push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release pushed");
    hub.apply(&spec("\"eu-west\"", "a")).expect("applied");
    for id in ["eu-1", "eu-2"] {
        hub.wait_workload(id, "sensor", "running").expect("running");
    }
    // Widen to us-east, and give eu-2 its own config.
    let next = format!(
        "{}[[workloads.overrides]]\nmatch = {{ device = \"eu-2\" }}\nconfig = {{ site = \"z\" }}\n",
        spec("\"eu-west\", \"us-east\"", "a")
    );
    let before = ["eu-1", "eu-2", "us-1"].map(|id| generation(&fleet, id));
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("sensors.toml");
    std::fs::write(&file, &next).expect("spec file");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(flotilla_fleet_tests::bin_dir().join("flotilla"))
            .args(args)
            .env("FLOTILLA_SERVER", &hub.api)
            .env("FLOTILLA_TOKEN_FILE", hub.dir.join("admin.token"))
            .output()
            .expect("cli runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = run(&["apply", "--dry-run", "-f", &file.display().to_string()]);
    assert!(
        table.contains("placed on 3 devices, 2 would change, 1 unchanged"),
        "{table}"
    );
    assert!(
        table.contains("us-1") && table.contains("+ sensor 1.0.0"),
        "{table}"
    );
    assert!(table.contains("(config changes)"), "{table}");
    let plan: serde_json::Value = serde_json::from_str(&run(&[
        "apply",
        "--dry-run",
        "-f",
        &file.display().to_string(),
        "-o",
        "json",
    ]))
    .expect("JSON");
    let predicted: Vec<(String, String)> = plan["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .flat_map(|c| {
            c["workloads"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |w| {
                    (
                        c["device"].as_str().unwrap_or("").to_owned(),
                        w["change"].as_str().unwrap_or("").to_owned(),
                    )
                })
        })
        .collect();
    assert_eq!(
        predicted,
        [
            ("eu-2".to_owned(), "update".to_owned()),
            ("us-1".to_owned(), "add".to_owned())
        ]
    );
    // The dry run changed nothing.
    assert_eq!(
        ["eu-1", "eu-2", "us-1"].map(|id| generation(&fleet, id)),
        before
    );
    let status = hub
        .client
        .get("/api/v1/deployments/sensors")
        .expect("status");
    assert_eq!(
        status["placed"], 2,
        "still placed on eu-west only: {status}"
    );
    // A spec the apply would refuse is refused by the dry run too, with the same reason.
    let bad = hub.client.post(
        "/api/v1/deployments?dry_run=true",
        "application/toml",
        spec("\"eu-west\"", "a")
            .replace("sensor@1.0.0", "sensor@9.9.9")
            .as_bytes(),
        &[],
    );
    assert!(
        bad.as_ref()
            .is_err_and(|e| e.to_string().contains("no release sensor@9.9.9")),
        "{bad:?}"
    );

    // The real apply: exactly the predicted devices get a new generation.
    hub.apply(&next).expect("applied");
    hub.wait_workload("us-1", "sensor", "running")
        .expect("us-1 runs");
    wait_for("eu-2 takes its config", PATIENCE, || {
        (generation(&fleet, "eu-2") > before[1]).then_some(())
    })
    .expect("eu-2 updated");
    let after = ["eu-1", "eu-2", "us-1"].map(|id| generation(&fleet, id));
    let changed: Vec<&str> = ["eu-1", "eu-2", "us-1"]
        .into_iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| a > *b)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(changed, ["eu-2", "us-1"]);
    // Applied, a dry run of the same spec has nothing left to change.
    let again = hub
        .client
        .post(
            "/api/v1/deployments?dry_run=true",
            "application/toml",
            next.as_bytes(),
            &[],
        )
        .expect("dry run");
    assert_eq!(
        again["dry_run"]["changes"],
        serde_json::json!([]),
        "{again}"
    );
}

/// With `--policy`, an apply that breaks a rule is refused naming the rule and the field, with an audit entry,
/// and leaves everything as it was (deployment, revision, every device's desired state); `--dry-run` lists the
/// verdicts; an edit of the policy file takes effect on the next apply, and a bad edit keeps the old policy.
#[test]
fn admission_policy_refusal_leaves_everything_as_it_was() {
    let dir = tempfile::tempdir().expect("dir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[resources]\nmemory_mib = { required = true, max = 8 }\n\
         [rollout]\nrequired_above_devices = 2\n",
    )
    .expect("policy");
    let fleet = FleetBuilder::new()
        .hub_args(&["--policy", &policy.display().to_string()])
        .agent(AgentSpec::new("eu-1", "eu-west", 52.52, 13.40))
        .agent(AgentSpec::new("eu-2", "eu-west", 48.85, 2.35))
        .agent(AgentSpec::new("us-1", "us-east", 40.71, -74.00))
        .start()
        .expect("fleet starts");
    let hub = &fleet.hub;
    hub.push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release pushed");
    hub.apply(&spec("\"eu-west\"", "a"))
        .expect("within the policy");
    for id in ["eu-1", "eu-2"] {
        hub.wait_workload(id, "sensor", "running").expect("running");
    }
    let snapshot = || {
        let d = hub
            .client
            .get("/api/v1/deployments/sensors")
            .expect("deployment");
        (
            d["revision"].clone(),
            d["placed"].clone(),
            ["eu-1", "eu-2", "us-1"].map(|id| generation(&fleet, id)),
        )
    };
    let before = snapshot();
    let refusals = [
        (
            spec("\"eu-west\"", "a").replace("memory_mib = 4", "memory_mib = 64"),
            "field `workloads[0].memory_mib`: policy rule resources.memory_mib: sensor: memory_mib = 64 is above the maximum 8",
        ),
        (
            spec("\"eu-west\"", "a").replace("memory_mib = 4\n", ""),
            "field `workloads[0].memory_mib`: policy rule resources.memory_mib: sensor: memory_mib must be set",
        ),
        (
            spec("\"eu-west\", \"us-east\"", "a"),
            "field `rollout`: policy rule rollout.required_above_devices: 3 devices placed",
        ),
    ];
    for (text, want) in &refusals {
        let err = hub.apply(text).expect_err("refused").to_string();
        assert!(err.starts_with("403") && err.contains(want), "{err}");
        assert_eq!(snapshot(), before, "a refusal changes nothing");
    }
    let audit = hub.client.get("/api/v1/audit").expect("audit");
    let refused = audit["entries"]
        .as_array()
        .or(audit.as_array())
        .into_iter()
        .flatten()
        .filter(|e| e["action"] == "apply-refused")
        .count();
    assert_eq!(refused, 3, "{audit}");
    // The dry run shows every verdict and says the apply would be refused, without failing itself.
    let file = dir.path().join("big.toml");
    std::fs::write(&file, &refusals[0].0).expect("spec");
    let table = hub
        .cli(&["apply", "--dry-run", "-f", &file.display().to_string()])
        .expect("dry run");
    assert!(
        table.contains("REFUSE resources.memory_mib (workloads[0].memory_mib)")
            && table.contains("ok     rollout.required_above_devices (rollout)")
            && table.contains("would be refused by the admission policy"),
        "{table}"
    );
    // A bad edit keeps the policy in force; a good one takes effect at the next apply.
    std::fs::write(&policy, "[resources]\nmemory_mib = { max = \"lots\" }\n").expect("bad edit");
    assert!(hub.apply(&refusals[0].0).is_err(), "the old policy holds");
    std::fs::write(
        &policy,
        "[resources]\nmemory_mib = { max = 128 }\n# raised\n",
    )
    .expect("edit");
    hub.apply(&refusals[0].0)
        .expect("allowed by the edited policy");
    assert_eq!(snapshot().0, 2, "applied: the second revision");
    // And `deploy diff` says what that revision changed.
    let diff = hub.cli(&["deploy", "diff", "sensors"]).expect("diff");
    assert!(
        diff.contains("revision 1 -> 2: 1 change(s)")
            && diff.contains("workload sensor: resources changed")
            && diff.contains("-memory_mib = 4")
            && diff.contains("+memory_mib = 64"),
        "{diff}"
    );
    let err = hub
        .client
        .get("/api/v1/deployments/sensors/diff?from=1&to=7")
        .expect_err("no revision 7")
        .to_string();
    assert!(
        err.starts_with("404") && err.contains("kept: 1, 2"),
        "{err}"
    );
    // Bad input to the new endpoints is refused with the reason.
    let bad = [
        hub.client
            .get("/api/v1/deployments/sensors/diff?from=one&to=2"),
        hub.client.get("/api/v1/rollouts/nope/report"),
        hub.client.post(
            "/api/v1/rollouts/sensors/retry",
            "application/json",
            br#"{"device": 5}"#,
            &[],
        ),
    ];
    let codes: Vec<String> = bad
        .iter()
        .map(|r| match r {
            Ok(v) => format!("ok {v}"),
            Err(e) => e.to_string().chars().take(3).collect(),
        })
        .collect();
    assert_eq!(codes, ["400", "404", "400"], "{bad:?}");
}
