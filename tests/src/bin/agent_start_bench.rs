//! Agent start benchmark: process start -> all workloads running again, offline (the broker unreachable behind a
//! partitioned fault proxy), after `kill -9`, for any agent build: the release agent with or without its compiler,
//! or a cross-built one under qemu-user. The workloads are the sample sensor, pushed with a variant precompiled for
//! the agent's target, so both builds run the same code; the times come from the agent's own log timestamps (the
//! 10th "running" line) against the wall clock just before the process was spawned.
//!
//! Usage: `agent-start-bench [--agent PATH] [--launcher "CMD ARGS"] [--target x86_64|aarch64|..] [--workloads N]
//! [--rounds N]`. Build first: `cargo build --release -p flotilla-hub -p flotilla-agent -p flotilla-fleet-tests
//! --bins`, run `target/release/agent-start-bench` (default agent: the one beside it).

use anyhow::{Context, Result, bail};
use flotilla_fleet_tests::{AgentSpec, FleetBuilder, firmware};
use std::time::{Duration, SystemTime};

const USAGE: &str = "agent-start-bench [--agent PATH] [--launcher \"CMD ARGS\"] [--target NAME] \
                     [--workloads N] [--rounds N]";

/// Microseconds since the epoch of an RFC 3339 UTC timestamp as tracing writes it (`2026-12-06T14:37:06.134673Z`).
fn parse_ts(ts: &str) -> Option<i128> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let micros: i64 = format!("{frac:0<6}")[..6].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(
        (i128::from(days) * 86_400 + i128::from(hh * 3600 + mm * 60 + ss)) * 1_000_000
            + i128::from(micros),
    )
}

fn main() -> Result<()> {
    flotilla_fleet_tests::answer_help(USAGE);
    let mut args = std::env::args().skip(1);
    let (mut agent, mut launcher, mut target) = (None, vec![], "x86_64".to_owned());
    let (mut workloads, mut rounds) = (10usize, 5usize);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--agent" => agent = Some(std::path::PathBuf::from(val()?)),
            "--launcher" => launcher = val()?.split_whitespace().map(str::to_owned).collect(),
            "--target" => target = val()?,
            "--workloads" => workloads = val()?.parse()?,
            "--rounds" => rounds = val()?.parse()?,
            _ => bail!("unknown argument {a}\nusage: {USAGE}"),
        }
    }
    let mut spec = AgentSpec::new("bench-1", "eu-west", 52.5, 13.4);
    spec.binary = agent.clone();
    spec.launcher = launcher.clone();
    let mut fleet = FleetBuilder::new().with_proxies().agent(spec).start()?;
    let wasm = fleet.hub.dir.join("sensor.wasm");
    std::fs::write(&wasm, firmware("sensor"))?;
    let mut toml = "name = \"bench\"\n[target]\nselector = { role = \"gateway\" }\n".to_owned();
    for i in 0..workloads {
        fleet
            .hub
            .push_wasm_precompiled(&format!("w{i}"), "1.0.0", 1, &wasm, &[&target])?;
        toml.push_str(&format!(
            "[[workloads]]\nname = \"w{i}\"\nrelease = \"w{i}@1.0.0\"\ntick_ms = 1000\nmemory_mib = 2\ncpu_ms = 20\n"
        ));
    }
    fleet.hub.apply(&toml)?;
    for i in 0..workloads {
        fleet
            .hub
            .wait_workload("bench-1", &format!("w{i}"), "running")?;
    }
    println!(
        "agent {} {}, {workloads} WASM workloads precompiled for {target}, broker unreachable",
        launcher.join(" "),
        agent.map_or("(beside this binary)".to_owned(), |p| p
            .display()
            .to_string()),
    );
    let a = fleet.agent_mut("bench-1");
    a.proxy.as_ref().context("proxy")?.partition();
    let mut times = vec![];
    for round in 0..rounds {
        a.kill9();
        let t0 = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_micros() as i128;
        a.start()?;
        a.wait_log(&["\"message\":\"running\""], workloads)?;
        let log = a.log();
        let last = log
            .lines()
            .filter(|l| l.contains("\"message\":\"running\""))
            .nth(workloads - 1)
            .and_then(|l| l.split("\"timestamp\":\"").nth(1))
            .and_then(|r| r.split('"').next())
            .and_then(parse_ts)
            .context("the last running line's timestamp")?;
        if log.contains("\"message\":\"fetching\"") || log.contains("\"message\":\"connected\"") {
            bail!("round {round}: the agent fetched or connected; the run is not offline");
        }
        let ms = (last - t0) as f64 / 1000.0;
        println!("round {round}: start -> {workloads} running in {ms:.1} ms");
        times.push(ms);
        std::thread::sleep(Duration::from_millis(200));
    }
    times.sort_by(f64::total_cmp);
    println!(
        "start -> {workloads} workloads running offline: median {:.1} ms, min {:.1} ms, max {:.1} ms (n={rounds})",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_tracing_timestamps() {
        assert_eq!(super::parse_ts("1970-01-01T00:00:01.5Z"), Some(1_500_000));
        assert_eq!(
            super::parse_ts("2026-12-06T14:37:06.134673Z"),
            Some(1_796_567_826_134_673)
        );
        assert_eq!(super::parse_ts("garbage"), None);
    }
}
