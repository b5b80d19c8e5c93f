//! A TCP fault proxy between agents and the broker: partition (cut every connection and refuse new ones), reset,
//! blackhole (forward nothing and refuse nothing: a link that silently drops packets, noticed only by keepalives;
//! or only the uplink, device to broker),
//! a delay per forwarded chunk, a bandwidth cap (slow link), and heal. Runs on its own small tokio runtime.

use anyhow::Result;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    partitioned: Arc<AtomicBool>,
    faults: Arc<Faults>,
    cut: watch::Sender<u64>,
    _rt: Arc<tokio::runtime::Runtime>,
}

impl Proxy {
    pub fn start(upstream: (&str, u16)) -> Result<Self> {
        Self::start_from(upstream, None)
    }

    /// Like [`Proxy::start`], with the upstream connections made from `source` (e.g. 127.0.0.5), so that the
    /// broker sees sessions from several loopback addresses and each address has its own ephemeral port range.
    pub fn start_from(upstream: (&str, u16), source: Option<std::net::Ipv4Addr>) -> Result<Self> {
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?,
        );
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        let partitioned = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(Faults {
            delay_ms: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            blackhole: watch::channel(false).0,
            uplink_blackhole: watch::channel(false).0,
        });
        let (cut, cut_rx) = watch::channel(0u64);
        let up = format!("{}:{}", upstream.0, upstream.1);
        let (p, d) = (partitioned.clone(), faults.clone());
        rt.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // Out of descriptors, typically: back off instead of spinning on the error.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                if p.load(Ordering::Acquire) {
                    drop(client);
                    continue;
                }
                let (up, d, mut cut_rx) = (up.clone(), d.clone(), cut_rx.clone());
                // Only cuts that happen from now on apply to this connection.
                cut_rx.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(server) = connect_from(&up, source).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pipe(cr, sw, d.clone(), true) => {}
                        _ = pipe(sr, cw, d, false) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Ok(Self {
            port,
            partitioned,
            faults,
            cut,
            _rt: rt,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cuts every open connection and refuses new ones until [`Proxy::heal`].
    pub fn partition(&self) {
        self.partitioned.store(true, Ordering::Release);
        self.cut.send_modify(|v| *v += 1);
    }

    /// Ends a partition or a blackhole.
    pub fn heal(&self) {
        self.partitioned.store(false, Ordering::Release);
        self.faults.blackhole.send_replace(false);
        self.faults.uplink_blackhole.send_replace(false);
    }

    /// Like [`Proxy::blackhole`], for the client-to-broker direction only: what the broker sends still arrives
    /// (a desired state), what the device sends (artifact requests, reports, keepalives) does not.
    pub fn blackhole_uplink(&self) {
        self.faults.uplink_blackhole.send_replace(true);
    }

    /// Forwards nothing until [`Proxy::heal`], without closing or refusing anything: bytes wait in the proxy as in
    /// a link that drops every packet (TCP retransmits, nobody gets an error). Only keepalives notice.
    pub fn blackhole(&self) {
        self.faults.blackhole.send_replace(true);
    }

    /// Caps each direction of each connection at `bytes_per_sec` (0 = no cap): a slow link.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.faults.rate.store(bytes_per_sec, Ordering::Release);
    }

    /// Resets open connections once (a TCP reset storm of size one); new connections are allowed.
    pub fn reset(&self) {
        self.cut.send_modify(|v| *v += 1);
    }

    /// Adds a delay before each forwarded chunk (a long, high-latency link).
    pub fn set_delay(&self, d: Duration) {
        self.faults.delay_ms.store(
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            Ordering::Release,
        );
    }
}

async fn connect_from(up: &str, source: Option<std::net::Ipv4Addr>) -> std::io::Result<TcpStream> {
    let Some(ip) = source else {
        return TcpStream::connect(up).await;
    };
    let addr: std::net::SocketAddr = up
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{up}: {e}")))?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((ip, 0).into())?;
    socket.connect(addr).await
}

/// The faults that apply to every forwarded chunk.
#[derive(Debug)]
struct Faults {
    delay_ms: AtomicU64,
    /// Bytes per second per direction; 0 = unlimited.
    rate: AtomicU64,
    blackhole: watch::Sender<bool>,
    /// Only the client -> upstream direction is held.
    uplink_blackhole: watch::Sender<bool>,
}

async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    faults: Arc<Faults>,
    uplink: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut blackhole = faults.blackhole.subscribe();
    let mut uplink_blackhole = faults.uplink_blackhole.subscribe();
    loop {
        // A small read size under a rate cap keeps the pacing smooth.
        let rate = faults.rate.load(Ordering::Acquire);
        let max = if rate > 0 {
            usize::try_from(rate / 10)
                .unwrap_or(buf.len())
                .clamp(1, buf.len())
        } else {
            buf.len()
        };
        let n = match r.read(&mut buf[..max]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Held, not dropped: the stream stays intact, as TCP retransmission would keep it.
        if blackhole.wait_for(|on| !*on).await.is_err() {
            return;
        }
        if uplink && uplink_blackhole.wait_for(|on| !*on).await.is_err() {
            return;
        }
        let d = faults.delay_ms.load(Ordering::Acquire);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if rate > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
