//! `broker-fanout`: the hub's embedded broker (configured exactly as `flotilla serve` runs it) against
//! Mosquitto, side by side in one run, QoS 1 throughout. Two patterns:
//! - broadcast: S subscribers on one topic, M messages published to it (S x M deliveries);
//! - unicast: S subscribers on their own topic each, one message per subscriber per round, R rounds (the hub's
//!   desired-state push).
//!
//! Each broker runs in its own process (the embedded one in a re-executed copy of this binary), the clients in this
//! one; rounds alternate between the brokers so both see the same machine load. Prints deliveries/s per round, the
//! medians and the ratio embedded / Mosquitto.
//!
//! `cargo build --release -p flotilla-fleet-tests --bin broker-fanout && target/release/broker-fanout [S] [M] [ROUNDS]`

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const PAYLOAD: usize = 128;

/// A broker child process, killed when dropped.
struct BrokerProc {
    child: Child,
    port: u16,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Embedded,
    Mosquitto,
}

fn start_broker(kind: Kind) -> Result<BrokerProc> {
    let port = flotilla_fleet_tests::free_port();
    let (child, dir) = match kind {
        Kind::Embedded => (
            Command::new(std::env::current_exe()?)
                .args(["--serve-embedded", &port.to_string()])
                .stdout(Stdio::null())
                .spawn()?,
            None,
        ),
        Kind::Mosquitto => {
            let dir = tempfile::tempdir()?;
            let conf = dir.path().join("mosquitto.conf");
            // Defaults otherwise; the queue limit is raised so that a slow subscriber is queued for, not dropped
            // (the embedded broker queues too), and the comparison counts only delivered messages.
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"
                ),
            )?;
            let child = Command::new("mosquitto")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("mosquitto (apt-get install mosquitto)")?;
            (child, Some(dir))
        }
    };
    let broker = BrokerProc {
        child,
        port,
        _dir: dir,
    };
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("{kind:?} broker did not listen");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(broker)
}

fn options(id: String, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_max_packet_size(64 * 1024, 64 * 1024);
    o
}

/// Connects S subscribers (topic per subscriber `i` from `topic`), waits for every SUBACK, then runs `publish`
/// and waits until every subscriber received `expect` messages. Returns the deliveries per second.
async fn run_pattern(
    port: u16,
    subscribers: usize,
    expect: usize,
    topic: impl Fn(usize) -> String,
    publish: impl AsyncFnOnce(AsyncClient) -> Result<()>,
) -> Result<f64> {
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    let delivered = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..subscribers {
        let (client, mut ev) = AsyncClient::new(options(format!("sub-{i}"), port), 16);
        let (ready_tx, done_tx, delivered) = (ready_tx.clone(), done_tx.clone(), delivered.clone());
        let topic = topic(i);
        tasks.push(tokio::spawn(async move {
            let mut got = 0;
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(&topic, QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        got += 1;
                        delivered.fetch_add(1, Ordering::Relaxed);
                        if got == expect {
                            let _ = done_tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("subscriber {i}: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    for _ in 0..subscribers {
        tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
            .await
            .context("subscribers did not all subscribe")?;
    }
    let (publisher, mut pev) = AsyncClient::new(options("publisher".into(), port), 64);
    let pub_task = tokio::spawn(async move { while pev.poll().await.is_ok() {} });
    let start = Instant::now();
    publish(publisher).await?;
    for done in 0..subscribers {
        if tokio::time::timeout(Duration::from_secs(120), done_rx.recv())
            .await
            .is_err()
        {
            bail!(
                "{done} of {subscribers} subscribers complete, {} of {} deliveries after 120 s",
                delivered.load(Ordering::Relaxed),
                subscribers * expect
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    pub_task.abort();
    for t in tasks {
        t.abort();
    }
    Ok((subscribers * expect) as f64 / secs)
}

async fn broadcast(port: u16, subscribers: usize, messages: usize) -> Result<f64> {
    run_pattern(
        port,
        subscribers,
        messages,
        |_| "bench/broadcast".into(),
        async move |p: AsyncClient| {
            for _ in 0..messages {
                p.publish(
                    "bench/broadcast",
                    QoS::AtLeastOnce,
                    false,
                    vec![0u8; PAYLOAD],
                )
                .await?;
            }
            Ok(())
        },
    )
    .await
}

async fn unicast(port: u16, subscribers: usize, rounds: usize) -> Result<f64> {
    run_pattern(
        port,
        subscribers,
        rounds,
        |i| format!("bench/dev/{i}"),
        async move |p: AsyncClient| {
            for _ in 0..rounds {
                for i in 0..subscribers {
                    p.publish(
                        format!("bench/dev/{i}"),
                        QoS::AtLeastOnce,
                        false,
                        vec![0u8; PAYLOAD],
                    )
                    .await?;
                }
            }
            Ok(())
        },
    )
    .await
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `--help` text.
const USAGE: &str = "
broker-fanout: the hub's embedded broker against Mosquitto, side by side, QoS 1 (broadcast and unicast).

Usage: broker-fanout [SUBSCRIBERS] [MESSAGES] [ROUNDS]
";

fn main() -> Result<()> {
    flotilla_fleet_tests::answer_help(USAGE);
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve-embedded") {
        let port: u16 = args.get(2).context("port")?.parse()?;
        // Sized as `flotilla serve` sizes it; the benchmark's anonymous clients and topics are let through (the
        // fleet's access policy is a few string comparisons per message, not what this compares).
        flotilla_broker::start(
            format!("127.0.0.1:{port}").parse()?,
            flotilla_hub::embedded::config(flotilla_hub::embedded::MAX_CONNECTIONS),
            std::sync::Arc::new(flotilla_broker::auth::AllowAll),
        )?;
        loop {
            std::thread::park();
        }
    }
    let num = |i: usize, default: usize| -> Result<usize> {
        Ok(args
            .get(i)
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let (subscribers, messages, rounds) = (num(1, 500)?, num(2, 200)?, num(3, 5)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "broker fan-out, QoS 1, {PAYLOAD}-byte payloads: broadcast = {subscribers} subscribers x {messages} messages; \
         unicast = {subscribers} topics x {messages} rounds; {rounds} alternating rounds per broker"
    );
    let mut results: Vec<(Kind, &str, Vec<f64>)> = vec![];
    for pattern in ["broadcast", "unicast"] {
        for kind in [Kind::Mosquitto, Kind::Embedded] {
            results.push((kind, pattern, vec![]));
        }
    }
    for round in 0..rounds {
        for (kind, pattern, rates) in results.iter_mut() {
            let broker = start_broker(*kind)?;
            let rate = rt.block_on(async {
                match *pattern {
                    "broadcast" => broadcast(broker.port, subscribers, messages).await,
                    _ => unicast(broker.port, subscribers, messages).await,
                }
            });
            drop(broker);
            match rate {
                Ok(r) => {
                    println!("round {round}: {kind:?} {pattern}: {r:.0} deliveries/s");
                    rates.push(r);
                }
                Err(e) => println!("round {round}: {kind:?} {pattern}: FAILED: {e:#}"),
            }
        }
    }
    for pattern in ["broadcast", "unicast"] {
        let mut med = |k: Kind| {
            results
                .iter_mut()
                .find(|(kind, p, _)| *kind == k && *p == pattern)
                .filter(|(_, _, r)| !r.is_empty())
                .map(|(_, _, r)| median(r))
        };
        match (med(Kind::Embedded), med(Kind::Mosquitto)) {
            (Some(e), Some(m)) => println!(
                "{pattern}: embedded median {e:.0}/s, Mosquitto median {m:.0}/s, ratio {:.2}x",
                e / m
            ),
            (e, m) => {
                println!("{pattern}: embedded {e:?}, Mosquitto {m:?} (a broker failed every round)")
            }
        }
    }
    Ok(())
}
