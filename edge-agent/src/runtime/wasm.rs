//! The WASM runtime: wasmtime 48 with WASI preview 1, per-workload memory limits, a CPU budget enforced by epoch
//! interruption, bounded log capture, a small host API, and compiled modules cached on disk.
//!
//! Each workload runs on its own OS thread: guests are synchronous code, and a thread per workload keeps a guest
//! that spins from starving the agent's async loop. The epoch ticker interrupts calls that exceed their budget or
//! whose workload was asked to stop.

use super::{RunningWorkload, RuntimeEvent, StartRequest};
use flotilla_agent_core::{Exit, OpId};
use flotilla_shared::WorkloadName;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::Sender;
use wasmtime::{
    Caller, Engine, Linker, Module, Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;

/// How often the epoch advances; the granularity of CPU budgets and of stop requests.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Bytes of stdout+stderr kept per workload (oldest dropped first).
const LOG_CAPACITY: usize = 16 * 1024;
/// Largest telemetry payload a guest may publish in one call.
const MAX_TELEMETRY: usize = 16 * 1024;

/// The shared engine, the epoch ticker and the compiled-module cache. The engine is built on first use: an agent
/// with no WASM workloads never maps in the compiler, which is most of its idle memory (code pages included).
pub struct WasmRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    ready: std::sync::OnceLock<Ready>,
    /// Serialises the first build, so exactly one engine and one ticker thread exist.
    init: Mutex<()>,
    /// Compiled modules of this host (only an agent with a compiler writes any).
    #[cfg_attr(not(feature = "compiler"), allow(dead_code))]
    cache_dir: PathBuf,
    /// Number of running workloads; the ticker sleeps while it is zero so an idle agent stays idle.
    active: Arc<AtomicU64>,
    ticker_wake: Arc<(Mutex<()>, std::sync::Condvar)>,
}

/// What exists once the first workload needs it.
struct Ready {
    engine: Engine,
    /// Engine version, architecture and settings: names compatible entries of the compiled-module cache.
    fingerprint: String,
}

impl std::fmt::Debug for WasmRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmRuntime")
            .field(
                "fingerprint",
                &self.inner.ready.get().map(|r| r.fingerprint.as_str()),
            )
            .finish()
    }
}

/// A capped ring of log bytes shared between the guest's stdout/stderr and the agent.
#[derive(Clone, Default)]
struct RingLog(Arc<Mutex<VecDeque<u8>>>);

impl RingLog {
    fn push(&self, bytes: &[u8]) {
        // Poisoning only happens if a holder panicked mid-push; the buffer is still usable bytes.
        let mut buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
        buf.extend(bytes.iter().copied());
        let excess = buf.len().saturating_sub(LOG_CAPACITY);
        buf.drain(..excess);
    }
    fn text(&self) -> String {
        let buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&buf.iter().copied().collect::<Vec<_>>()).into_owned()
    }
}

impl tokio::io::AsyncWrite for RingLog {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl wasmtime_wasi::cli::IsTerminal for RingLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for RingLog {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// Per-store host state.
struct Host {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
    config: Vec<u8>,
    name: WorkloadName,
    events: Sender<RuntimeEvent>,
    log: RingLog,
    stop: Arc<AtomicBool>,
    deadline: Instant,
    telemetry_dropped: u64,
    /// The workload's opened secrets (`secret_len`/`secret_read`).
    secrets: super::Secrets,
}

impl Host {
    /// Hands a guest's event to the agent without ever blocking the guest: when the queue is full the event is
    /// dropped and counted, and the guest gets 1 (0 when queued).
    fn send_or_drop(&mut self, ev: RuntimeEvent) -> i32 {
        if self.events.try_send(ev).is_err() {
            self.telemetry_dropped += 1;
            return 1;
        }
        0
    }
}

impl WasmRuntime {
    /// Creates the module cache under `cache_dir`; the engine follows on first use.
    pub fn new(cache_dir: &Path) -> wasmtime::Result<Self> {
        std::fs::create_dir_all(cache_dir)?;
        Ok(Self {
            inner: Arc::new(Inner {
                ready: std::sync::OnceLock::new(),
                init: Mutex::new(()),
                cache_dir: cache_dir.to_owned(),
                active: Arc::new(AtomicU64::new(0)),
                ticker_wake: Arc::new((Mutex::new(()), std::sync::Condvar::new())),
            }),
        })
    }

    /// Loads (compiling if not cached) a module; used to pre-warm the cache and by benchmarks.
    pub fn load_module(
        &self,
        artifact: &flotilla_shared::Digest,
        path: &Path,
    ) -> wasmtime::Result<Module> {
        self.inner.load_module(artifact, path)
    }
}

impl Inner {
    /// The engine and its epoch ticker, built on the first call.
    fn ready(&self) -> wasmtime::Result<&Ready> {
        if let Some(r) = self.ready.get() {
            return Ok(r);
        }
        let _guard = self.init.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = self.ready.get() {
            return Ok(r);
        }
        // The settings precompiled variants are made with (flotilla-engine), so signed variants load here.
        let engine = Engine::new(&flotilla_engine::config())?;
        // Names this host's compiled-module cache entries: unlike a signed variant's fingerprint, it covers the
        // host-detected CPU features the on-device compiler uses.
        #[cfg(feature = "compiler")]
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut h);
            format!(
                "wasmtime-{}-{}-{:016x}",
                flotilla_engine::WASMTIME_VERSION,
                std::env::consts::ARCH,
                h.finish()
            )
        };
        #[cfg(not(feature = "compiler"))]
        let fingerprint = flotilla_engine::fingerprint(flotilla_engine::Target::host());
        let (e, a, w) = (
            engine.clone(),
            self.active.clone(),
            self.ticker_wake.clone(),
        );
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                loop {
                    if a.load(Ordering::Acquire) == 0 {
                        let guard = w.0.lock().unwrap_or_else(|e| e.into_inner());
                        // Woken when a workload starts; the timeout bounds a missed wake-up.
                        let _ = w.1.wait_timeout(guard, Duration::from_secs(1));
                        continue;
                    }
                    std::thread::sleep(EPOCH_TICK);
                    e.increment_epoch();
                }
            })?;
        Ok(self.ready.get_or_init(|| Ready {
            engine,
            fingerprint,
        }))
    }

    /// Loads a module: a signed precompiled variant as it is; a source module from the compiled cache when
    /// possible, compiling and caching it otherwise.
    pub fn load_module(
        &self,
        artifact: &flotilla_shared::Digest,
        path: &Path,
    ) -> wasmtime::Result<Module> {
        let ready = self.ready()?;
        // Not an ELF file at all (a WebAssembly module) reads as an error here: that is "not precompiled".
        if matches!(
            Engine::detect_precompiled_file(path),
            Ok(Some(wasmtime::Precompiled::Module))
        ) {
            // SAFETY: artifacts reach the cache only after their digest matched a signed release; a precompiled
            // one is chosen only when its release signs it for this target and engine fingerprint (see
            // `crate::variant`). wasmtime also checks the header (version, target, settings, CPU features) and
            // refuses a mismatch with an error, which fails the start with its reason.
            tracing::info!(%artifact, "loading precompiled module");
            #[allow(unsafe_code)]
            return unsafe { Module::deserialize_file(&ready.engine, path) };
        }
        self.compile_cached(ready, artifact, path)
    }

    /// Without the compiler: not reached through a desired state (the variant choice refuses first); a direct
    /// load says why.
    #[cfg(not(feature = "compiler"))]
    fn compile_cached(
        &self,
        _ready: &Ready,
        _artifact: &flotilla_shared::Digest,
        _path: &Path,
    ) -> wasmtime::Result<Module> {
        wasmtime::bail!("this agent has no WASM compiler and the artifact is not precompiled")
    }

    /// Compiles a source module, or loads this host's earlier compilation of it from the cache.
    #[cfg(feature = "compiler")]
    fn compile_cached(
        &self,
        ready: &Ready,
        artifact: &flotilla_shared::Digest,
        path: &Path,
    ) -> wasmtime::Result<Module> {
        let cached =
            self.cache_dir
                .join(format!("{}-{}.cwasm", artifact.to_hex(), ready.fingerprint));
        if cached.exists() {
            // SAFETY: the file was written by `Module::serialize` of this same engine configuration (its name
            // carries the engine fingerprint) into the agent's private cache directory; wasmtime additionally
            // checks the engine's compatibility header and refuses mismatches.
            #[allow(unsafe_code)]
            match unsafe { Module::deserialize_file(&ready.engine, &cached) } {
                Ok(m) => return Ok(m),
                Err(e) => {
                    tracing::warn!(error = %e, path = %cached.display(), "discarding unusable compiled module")
                }
            }
        }
        tracing::info!(%artifact, "compiling module");
        let module = Module::from_file(&ready.engine, path)?;
        let bytes = module.serialize()?;
        let tmp = cached.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &cached)?;
        Ok(module)
    }

    fn linker(&self) -> wasmtime::Result<Linker<Host>> {
        let mut linker: Linker<Host> = Linker::new(&self.ready()?.engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |h: &mut Host| &mut h.wasi)?;
        linker.func_wrap(
            "flotilla",
            "telemetry",
            |mut caller: Caller<'_, Host>, sp: i32, sl: i32, dp: i32, dl: i32| -> i32 {
                let Some(stream) = read_guest(&mut caller, sp, sl, 64) else {
                    return -1;
                };
                let Some(payload) = read_guest(&mut caller, dp, dl, MAX_TELEMETRY) else {
                    return -1;
                };
                let Ok(stream) = String::from_utf8(stream) else {
                    return -1;
                };
                let h = caller.data_mut();
                let ev = RuntimeEvent::Telemetry {
                    name: h.name.clone(),
                    stream,
                    payload,
                };
                h.send_or_drop(ev)
            },
        )?;
        linker.func_wrap(
            "flotilla",
            "metric",
            |mut caller: Caller<'_, Host>, ptr: i32, len: i32, value: f64| -> i32 {
                let Some(metric) = read_guest(&mut caller, ptr, len, 64) else {
                    return -1;
                };
                let h = caller.data_mut();
                let ev = RuntimeEvent::Metric {
                    name: h.name.clone(),
                    metric: String::from_utf8_lossy(&metric).into_owned(),
                    value,
                };
                h.send_or_drop(ev)
            },
        )?;
        linker.func_wrap(
            "flotilla",
            "hold",
            |mut caller: Caller<'_, Host>, ptr: i32, len: i32, secs: i32| -> i32 {
                let Some(reason) = read_guest(&mut caller, ptr, len, 256) else {
                    return -1;
                };
                let h = caller.data_mut();
                let ev = RuntimeEvent::Hold {
                    name: h.name.clone(),
                    reason: String::from_utf8_lossy(&reason).into_owned(),
                    secs: u32::try_from(secs).unwrap_or(0),
                };
                h.send_or_drop(ev)
            },
        )?;
        linker.func_wrap(
            "flotilla",
            "config_len",
            |caller: Caller<'_, Host>| -> i32 {
                i32::try_from(caller.data().config.len()).unwrap_or(i32::MAX)
            },
        )?;
        linker.func_wrap(
            "flotilla",
            "config_read",
            |mut caller: Caller<'_, Host>, ptr: i32, len: i32| -> i32 {
                let config = caller.data().config.clone();
                let n = config.len().min(usize::try_from(len).unwrap_or(0));
                write_guest(&mut caller, ptr, &config[..n])
                    .map_or(-1, |()| i32::try_from(n).unwrap_or(-1))
            },
        )?;
        // Secrets: `secret_len(name)` is the value's length or -1 when the workload has no such secret;
        // `secret_read(name, buf, len)` copies up to `len` bytes and returns how many (or -1).
        linker.func_wrap(
            "flotilla",
            "secret_len",
            |mut caller: Caller<'_, Host>, np: i32, nl: i32| -> i32 {
                let Some(name) = read_guest(&mut caller, np, nl, 64) else {
                    return -1;
                };
                let name = String::from_utf8_lossy(&name);
                caller
                    .data()
                    .secrets
                    .0
                    .get(name.as_ref())
                    .map_or(-1, |v| i32::try_from(v.len()).unwrap_or(-1))
            },
        )?;
        linker.func_wrap(
            "flotilla",
            "secret_read",
            |mut caller: Caller<'_, Host>, np: i32, nl: i32, ptr: i32, len: i32| -> i32 {
                let Some(name) = read_guest(&mut caller, np, nl, 64) else {
                    return -1;
                };
                let name = String::from_utf8_lossy(&name).into_owned();
                let Some(value) = caller.data().secrets.0.get(&name).cloned() else {
                    return -1;
                };
                let n = value.len().min(usize::try_from(len).unwrap_or(0));
                write_guest(&mut caller, ptr, &value[..n])
                    .map_or(-1, |()| i32::try_from(n).unwrap_or(-1))
            },
        )?;
        linker.func_wrap(
            "flotilla",
            "log",
            |mut caller: Caller<'_, Host>, ptr: i32, len: i32| {
                if let Some(bytes) = read_guest(&mut caller, ptr, len, 4096) {
                    let log = caller.data().log.clone();
                    log.push(&bytes);
                    log.push(b"\n");
                }
            },
        )?;
        Ok(linker)
    }
}

fn memory(caller: &mut Caller<'_, Host>) -> Option<wasmtime::Memory> {
    caller.get_export("memory").and_then(|e| e.into_memory())
}

/// Copies `len` bytes out of guest memory, refusing out-of-range or over-long requests.
fn read_guest(caller: &mut Caller<'_, Host>, ptr: i32, len: i32, max: usize) -> Option<Vec<u8>> {
    let (ptr, len) = (usize::try_from(ptr).ok()?, usize::try_from(len).ok()?);
    if len > max {
        return None;
    }
    let mem = memory(caller)?;
    let data = mem.data(&caller);
    data.get(ptr..ptr.checked_add(len)?).map(<[u8]>::to_vec)
}

fn write_guest(caller: &mut Caller<'_, Host>, ptr: i32, bytes: &[u8]) -> Option<()> {
    let ptr = usize::try_from(ptr).ok()?;
    let mem = memory(caller)?;
    mem.write(caller, ptr, bytes).ok()
}

/// Handle to a workload thread.
struct WasmWorkload {
    stop: Arc<AtomicBool>,
    stop_op: Arc<AtomicU64>,
    thread: std::thread::Thread,
    log: RingLog,
}

impl RunningWorkload for WasmWorkload {
    fn stop(&mut self, op: OpId) {
        self.stop_op.store(op, Ordering::Release);
        self.stop.store(true, Ordering::Release);
        self.thread.unpark();
    }
    fn logs(&self) -> String {
        self.log.text()
    }
}

/// Turns a wasmtime error into a one-line reason for reports.
fn describe(e: &wasmtime::Error) -> String {
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return format!("exited with status {}", exit.0);
    }
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        return match trap {
            wasmtime::Trap::Interrupt => "cpu budget exceeded (interrupted)".to_owned(),
            wasmtime::Trap::StackOverflow => {
                "trap: call stack exhausted (deep recursion)".to_owned()
            }
            other => format!("trap: {other}"),
        };
    }
    // wasmtime wraps the cause in a multi-line "error while executing at wasm backtrace" context; keep the first
    // line of each meaningful cause.
    let mut msg = e
        .chain()
        .filter_map(|c| c.to_string().lines().next().map(str::to_owned))
        .filter(|l| !l.starts_with("error while executing"))
        .collect::<Vec<_>>()
        .join(": ");
    if msg.is_empty() {
        msg = format!("{e:?}").replace('\n', " ");
    }
    msg.truncate(300);
    msg
}

impl super::Runtime for WasmRuntime {
    fn start(&self, req: StartRequest, events: Sender<RuntimeEvent>) -> Box<dyn RunningWorkload> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_op = Arc::new(AtomicU64::new(0));
        let log = RingLog::default();
        let ctx = RunCtx {
            rt: self.inner.clone(),
            req,
            events,
            stop: stop.clone(),
            stop_op: stop_op.clone(),
            log: log.clone(),
        };
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        self.inner.ticker_wake.1.notify_all();
        let handle = std::thread::Builder::new()
            .name(format!("wasm-{}", ctx.req.name))
            .spawn(move || ctx.run())
            .map(|h| h.thread().clone());
        match handle {
            Ok(thread) => Box::new(WasmWorkload {
                stop,
                stop_op,
                thread,
                log,
            }),
            Err(e) => {
                // No thread means no workload; report the failed start on the caller's side.
                tracing::error!(error = %e, "cannot spawn workload thread");
                Box::new(WasmWorkload {
                    stop,
                    stop_op,
                    thread: std::thread::current(),
                    log,
                })
            }
        }
    }
}

struct RunCtx {
    rt: Arc<Inner>,
    req: StartRequest,
    events: Sender<RuntimeEvent>,
    stop: Arc<AtomicBool>,
    stop_op: Arc<AtomicU64>,
    log: RingLog,
}

impl RunCtx {
    fn send(&self, ev: RuntimeEvent) {
        // The agent loop outlives workload threads except at shutdown, when losing the event is fine.
        let _ = self.events.blocking_send(ev);
    }

    fn run(self) {
        let name = self.req.name.clone();
        let op = self.req.op;
        let outcome = self.run_inner();
        self.rt.active.fetch_sub(1, Ordering::AcqRel);
        match outcome {
            Outcome::StartFailed(e) => self.send(RuntimeEvent::Started {
                name,
                op,
                result: Err(e),
            }),
            Outcome::Exited(exit) => self.send(RuntimeEvent::Exited { name, op, exit }),
            Outcome::Stopped => {
                let op = self.stop_op.load(Ordering::Acquire);
                self.send(RuntimeEvent::Stopped { name, op });
            }
        }
    }

    fn run_inner(&self) -> Outcome {
        // Compiling (or loading the cached compilation) happens here, off the agent's loop.
        let module = match self
            .rt
            .load_module(&self.req.artifact, &self.req.artifact_path)
        {
            Ok(m) => m,
            Err(e) => return Outcome::StartFailed(format!("compile: {e:#}")),
        };
        let linker = match self.rt.linker() {
            Ok(l) => l,
            Err(e) => return Outcome::StartFailed(format!("linker: {e:#}")),
        };
        // Built by `load_module` above; asking again is a lookup.
        let engine = match self.rt.ready() {
            Ok(r) => &r.engine,
            Err(e) => return Outcome::StartFailed(format!("engine: {e:#}")),
        };
        let spec = &self.req.spec;
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .stdout(self.log.clone())
            .stderr(self.log.clone())
            .args(&[self.req.name.as_str()])
            .build_p1();
        let memory_bytes = usize::try_from(spec.resources.memory_mib)
            .unwrap_or(usize::MAX)
            .saturating_mul(1 << 20);
        let limits = StoreLimitsBuilder::new()
            .memory_size(memory_bytes)
            .instances(2)
            .trap_on_grow_failure(true)
            .build();
        let host = Host {
            wasi,
            limits,
            config: spec.config.clone(),
            name: self.req.name.clone(),
            events: self.events.clone(),
            log: self.log.clone(),
            stop: self.stop.clone(),
            deadline: Instant::now()
                + Duration::from_millis(u64::from(spec.resources.cpu_ms.max(1))),
            telemetry_dropped: 0,
            secrets: self.req.secrets.clone(),
        };
        let mut store = Store::new(engine, host);
        store.limiter(|h| &mut h.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            let h = ctx.data();
            if h.stop.load(Ordering::Acquire) {
                return Err(wasmtime::Trap::Interrupt.into());
            }
            if Instant::now() >= h.deadline {
                return Err(wasmtime::Trap::Interrupt.into());
            }
            Ok(UpdateDeadline::Continue(1))
        });
        let budget = Duration::from_millis(u64::from(spec.resources.cpu_ms.max(1)));
        store.data_mut().deadline = Instant::now() + budget;
        let instance = match linker.instantiate(&mut store, &module) {
            Ok(i) => i,
            Err(e) => return Outcome::StartFailed(format!("instantiate: {}", describe(&e))),
        };
        if spec.tick_ms == 0 {
            let Ok(start) = instance.get_typed_func::<(), ()>(&mut store, "_start") else {
                return Outcome::StartFailed(
                    "module exports no `_start` (and tick_ms is 0)".into(),
                );
            };
            self.send(RuntimeEvent::Started {
                name: self.req.name.clone(),
                op: self.req.op,
                result: Ok(()),
            });
            store.data_mut().deadline = Instant::now() + budget;
            return match start.call(&mut store, ()) {
                Ok(()) => Outcome::Exited(Exit::Completed),
                Err(_) if self.stop.load(Ordering::Acquire) => Outcome::Stopped,
                Err(e)
                    if e.downcast_ref::<wasmtime_wasi::I32Exit>()
                        .is_some_and(|x| x.0 == 0) =>
                {
                    Outcome::Exited(Exit::Completed)
                }
                Err(e) => Outcome::Exited(Exit::Failed(describe(&e))),
            };
        }
        // Ticked module: optional `_initialize`, then `tick` every `tick_ms`.
        if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
            store.data_mut().deadline = Instant::now() + budget;
            if let Err(e) = init.call(&mut store, ()) {
                return Outcome::StartFailed(format!("_initialize: {}", describe(&e)));
            }
        }
        let Ok(tick) = instance.get_typed_func::<(), ()>(&mut store, "tick") else {
            return Outcome::StartFailed("module exports no `tick` function (tick_ms > 0)".into());
        };
        self.send(RuntimeEvent::Started {
            name: self.req.name.clone(),
            op: self.req.op,
            result: Ok(()),
        });
        let period = Duration::from_millis(u64::from(spec.tick_ms));
        let mut next = Instant::now();
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Outcome::Stopped;
            }
            store.data_mut().deadline = Instant::now() + budget;
            if let Err(e) = tick.call(&mut store, ()) {
                if self.stop.load(Ordering::Acquire) {
                    return Outcome::Stopped;
                }
                return Outcome::Exited(Exit::Failed(describe(&e)));
            }
            next += period;
            // Park until the next tick; `stop` unparks early.
            loop {
                let now = Instant::now();
                if now >= next || self.stop.load(Ordering::Acquire) {
                    break;
                }
                std::thread::park_timeout(next - now);
            }
            if Instant::now() > next + period {
                // Fell behind (a slow tick or a suspended process): skip missed ticks instead of bursting.
                next = Instant::now();
            }
        }
    }
}

enum Outcome {
    StartFailed(String),
    Exited(Exit),
    Stopped,
}
