//! A TCP fault proxy between one agent and the broker: partition (cut every connection and refuse new ones),
//! heal, and an optional added delay per forwarded chunk. Runs on its own small tokio runtime.

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
    delay_ms: Arc<AtomicU64>,
    cut: watch::Sender<u64>,
    _rt: Arc<tokio::runtime::Runtime>,
}

impl Proxy {
    pub fn start(upstream: (&str, u16)) -> Result<Self> {
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?,
        );
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        let partitioned = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (cut, cut_rx) = watch::channel(0u64);
        let up = format!("{}:{}", upstream.0, upstream.1);
        let (p, d) = (partitioned.clone(), delay_ms.clone());
        rt.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
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
                    let Ok(server) = TcpStream::connect(&up).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pipe(cr, sw, d.clone()) => {}
                        _ = pipe(sr, cw, d) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Ok(Self {
            port,
            partitioned,
            delay_ms,
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

    pub fn heal(&self) {
        self.partitioned.store(false, Ordering::Release);
    }

    /// Resets open connections once (a TCP reset storm of size one); new connections are allowed.
    pub fn reset(&self) {
        self.cut.send_modify(|v| *v += 1);
    }

    /// Adds a delay before each forwarded chunk (a slow link).
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            Ordering::Release,
        );
    }
}

async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let d = delay.load(Ordering::Acquire);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
