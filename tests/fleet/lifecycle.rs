//! Agent lifecycle: the optional Prometheus endpoint on loopback, and a graceful SIGTERM that stops workloads,
//! marks the device offline and exits 0.

use flotilla_fleet_tests::{AgentSpec, FleetBuilder, PATIENCE, firmware, free_port, wait_for};
use std::io::{Read, Write};

fn scrape(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Metrics are served on loopback; SIGTERM stops the workload, publishes offline presence and exits 0.
#[test]
fn metrics_endpoint_and_graceful_sigterm() {
    let port = free_port();
    let mut spec = AgentSpec::new("gw-1", "eu-west", 52.5, 13.4);
    spec.extra_config = format!("metrics_listen = \"127.0.0.1:{port}\"\n");
    let mut fleet = FleetBuilder::new().agent(spec).start().expect("fleet");
    fleet
        .hub
        .push_release("sensor", "1.0.0", 1, &firmware("sensor"))
        .expect("release");
    fleet
        .hub
        .apply("name = \"s\"\n[[workloads]]\nname = \"sensor\"\nrelease = \"sensor@1.0.0\"\ntick_ms = 100\n")
        .expect("apply");
    fleet
        .hub
        .wait_workload("gw-1", "sensor", "running")
        .expect("running");
    let text = wait_for("metrics show the running workload", PATIENCE, || {
        scrape(port).filter(|t| t.contains("flotilla_agent_workloads_running 1"))
    })
    .unwrap_or_else(|e| panic!("{e}: last scrape {:?}", scrape(port)));
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("flotilla_agent_rss_bytes"), "{text}");

    let agent = fleet.agent_mut("gw-1");
    let code = agent.proc.as_mut().expect("running").terminate();
    assert_eq!(code, Some(0), "graceful exit");
    let log = agent.log();
    assert!(
        log.contains("\"message\":\"stopped\""),
        "workload stopped on SIGTERM:\n{log}"
    );
    wait_for("hub sees the device offline", PATIENCE, || {
        (fleet.hub.device("gw-1")?["online"] == false).then_some(())
    })
    .expect("offline presence");
}
