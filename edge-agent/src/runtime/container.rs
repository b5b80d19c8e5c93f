//! Container workloads on the device's Docker-compatible engine (Docker, balenaEngine, Podman's Docker API),
//! through `bollard` over the engine's unix socket.
//!
//! The agent owns the lifecycle, not the engine: restart policy `no`, restarts come from the reconciler with the
//! same backoff as WASM. Each start brings up exactly one container, named from the workload and its spec hash
//! (see [`flotilla_agent_core::containers`]): a running one is adopted, a stopped one started as it is, a missing
//! one created from the cached image, which is loaded from the verified tarball only when the engine does not
//! have it (so an offline reboot, even one that lost the engine's storage, needs no network). Containers keep
//! running across an agent restart: at shutdown the agent detaches instead of stopping them.

use super::{RunningWorkload, Runtime, RuntimeEvent, StartRequest};
use crate::config::ContainerConfig;
use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, DeviceMapping, HealthConfig, HealthStatusEnum, HostConfig,
    HostConfigLogConfig, Mount, MountType, PortBinding,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
    StopContainerOptions,
};
use flotilla_agent_core::containers::{
    self, AllowList, Bring, Found, LABEL_DEVICE, LABEL_GENERATION, LABEL_MANAGED, LABEL_RELEASE,
    LABEL_SPEC_HASH, LABEL_WORKLOAD,
};
use flotilla_agent_core::{Exit, OpId};
use flotilla_shared::wire::{
    ContainerEngine, ContainerImage, ExitCause, ImageProblem, NetworkMode,
};
use futures_util::StreamExt;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// How often an absent or refusing engine socket is tried again (the engine may start after the agent).
const RETRY: Duration = Duration::from_secs(2);
/// Engine API request timeout; image loads stream for longer (bollard#503), so it is generous.
const API_TIMEOUT_SECS: u64 = 600;
/// How long a start waits for the engine probe before it fails (and is retried with backoff).
const PROBE_PATIENCE: Duration = Duration::from_secs(5);
/// How long a registry pull may take before the agent falls back to delivery over MQTT.
const PULL_TIMEOUT: Duration = Duration::from_secs(300);
/// Lines of a container's output kept for `logs()` after it ends.
const LOG_TAIL: &str = "200";

/// The container runtime: one engine connection shared by every container workload.
#[derive(Clone)]
pub struct ContainerRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ContainerConfig,
    device: String,
    /// Per-container files (the rendered `config`), absolute: the engine resolves bind sources itself.
    files: PathBuf,
    /// The connection once the probe succeeded; starts that arrive before wait for it (bounded).
    docker: tokio::sync::watch::Sender<Option<Docker>>,
    engine: Mutex<Option<ContainerEngine>>,
    /// Where the engine keeps images (`DockerRootDir`), for the image collection's disk watermark.
    root_dir: Mutex<Option<PathBuf>>,
    /// Containers this agent run has brought up: never orphans, whatever the sweep's `keep` (computed at start,
    /// possibly before the engine answered and the first desired state was applied) says.
    ours: Mutex<BTreeSet<String>>,
    last_error: Mutex<String>,
}

impl std::fmt::Debug for ContainerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerRuntime")
            .field("socket", &self.inner.cfg.socket)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ContainerRuntime {
    /// Starts probing the engine in the background (must be called inside a tokio runtime). Until the probe
    /// succeeds, container starts fail with "engine unreachable" and are retried by the reconciler.
    pub fn new(cfg: ContainerConfig, device: &str, data_dir: &Path) -> std::io::Result<Self> {
        let files = data_dir.join("containers");
        std::fs::create_dir_all(&files)?;
        let files = std::fs::canonicalize(files)?;
        let rt = Self {
            inner: Arc::new(Inner {
                cfg,
                device: device.to_owned(),
                files,
                docker: tokio::sync::watch::Sender::new(None),
                engine: Mutex::new(None),
                root_dir: Mutex::new(None),
                ours: Mutex::new(BTreeSet::new()),
                last_error: Mutex::new("not probed yet".into()),
            }),
        };
        let inner = rt.inner.clone();
        tokio::spawn(async move { inner.probe_until_connected().await });
        Ok(rt)
    }

    /// The engine as probed, once it answered.
    pub fn engine(&self) -> Option<ContainerEngine> {
        lock(&self.inner.engine).clone()
    }

    /// The image collection's policy at `now` (unix seconds): the configured age, and whether the engine's disk
    /// (or, when its directory is not visible from here, the agent's data partition) is above the watermark.
    pub fn image_gc(&self, now: u64, data_dir: &Path) -> containers::ImageGc {
        let root = lock(&self.inner.root_dir).clone();
        let used = |p: &Path| {
            rustix::fs::statvfs(p).ok().and_then(|s| {
                let used = s.f_blocks.saturating_sub(s.f_bfree);
                let total = used.saturating_add(s.f_bavail);
                (total > 0).then(|| used.saturating_mul(100) / total)
            })
        };
        let percent = root
            .as_deref()
            .and_then(used)
            .or_else(|| used(data_dir))
            .unwrap_or(0);
        containers::ImageGc {
            now,
            keep_secs: self.inner.cfg.image_keep_secs,
            disk_high: percent >= u64::from(self.inner.cfg.image_gc_high_percent),
        }
    }

    /// The local allow-list.
    pub fn allow_list(&self) -> AllowList {
        AllowList {
            host_network: self.inner.cfg.allow_host_network,
            devices: self.inner.cfg.allow_devices.clone(),
            capabilities: self.inner.cfg.allow_capabilities.clone(),
        }
    }

    /// Reads the last `lines` lines of container `name`'s output from the engine and answers with them (or why
    /// not) through the agent loop.
    pub fn fetch_logs(
        &self,
        name: String,
        lines: usize,
        mut answer: flotilla_shared::wire::LogsResponse,
        events: mpsc::Sender<RuntimeEvent>,
    ) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            match inner.docker() {
                Some(docker) => {
                    if docker.inspect_container(&name, None).await.is_ok() {
                        answer.text = inner.tail(&docker, &name, &lines.to_string()).await;
                    } else {
                        answer.error = Some(format!("no container {name} on the engine"));
                    }
                }
                None => answer.error = Some("the container engine is unreachable".into()),
            }
            let _ = events.send(RuntimeEvent::Logs(answer)).await;
        });
    }

    /// Removes images the agent loaded and no longer needs; the ones the engine removed are reported back (an
    /// image a container still uses stays, and is tried again at the next collection).
    pub fn remove_images(&self, images: Vec<String>, events: mpsc::Sender<RuntimeEvent>) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let Some(docker) = inner.docker() else { return };
            let mut removed = Vec::new();
            for image in images {
                match docker
                    .remove_image(
                        &image,
                        None::<bollard::query_parameters::RemoveImageOptions>,
                        None,
                    )
                    .await
                {
                    Ok(_) => {
                        tracing::info!(image = %image, "image removed");
                        removed.push(image);
                    }
                    // Already gone (removed by hand): forget it too.
                    Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 404,
                        ..
                    }) => {
                        removed.push(image);
                    }
                    Err(e) => tracing::info!(image = %image, error = %e, "image kept"),
                }
            }
            if !removed.is_empty() {
                let _ = events.send(RuntimeEvent::ImagesRemoved(removed)).await;
            }
        });
    }

    /// Pulls a release's image from the registry its release names (the second source for connected sites),
    /// unless the engine has it already; answers with [`RuntimeEvent::Pulled`].
    pub fn pull(
        &self,
        workload: flotilla_shared::WorkloadName,
        artifact: flotilla_shared::Digest,
        image: ContainerImage,
        events: mpsc::Sender<RuntimeEvent>,
    ) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let result = inner.pull(&image).await;
            let _ = events
                .send(RuntimeEvent::Pulled {
                    workload,
                    artifact,
                    result,
                })
                .await;
        });
    }

    /// Loads a staged release's verified tarball into the engine ahead of its cutover (creating nothing); answers
    /// with [`RuntimeEvent::Preloaded`] (and [`RuntimeEvent::ImageLoaded`] when this call loaded it, for the image
    /// collection).
    pub fn preload(
        &self,
        workload: flotilla_shared::WorkloadName,
        artifact: flotilla_shared::Digest,
        tarball: std::path::PathBuf,
        image: ContainerImage,
        events: mpsc::Sender<RuntimeEvent>,
    ) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let result = match inner.docker_within(PROBE_PATIENCE).await {
                Some(docker) => inner
                    .ensure_image(&docker, &tarball, &image, async {})
                    .await
                    .map(|(id, fresh)| (fresh).then_some(id)),
                None => Err("container engine unreachable".to_owned()),
            };
            if let Ok(Some(id)) = &result {
                let _ = events
                    .send(RuntimeEvent::ImageLoaded {
                        name: workload,
                        image: id.clone(),
                    })
                    .await;
            }
            let _ = events
                .send(RuntimeEvent::Preloaded {
                    artifact,
                    result: result.map(|_| ()),
                })
                .await;
        });
    }

    /// Removes, once the engine answers, every container of this device that is not in `keep` and that this run
    /// did not bring up (in any state):
    /// leftovers of workloads that were removed or replaced while the agent was down. Never touches a container
    /// without this device's managed label.
    pub fn sweep(&self, keep: BTreeSet<String>) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let docker = loop {
                if let Some(d) = inner.docker() {
                    break d;
                }
                tokio::time::sleep(RETRY).await;
            };
            match inner.managed(&docker).await {
                Ok(found) => {
                    let mut keep = keep;
                    keep.extend(lock(&inner.ours).iter().cloned());
                    for name in containers::orphans(&keep, &found) {
                        tracing::info!(container = %name, "removing a container no longer desired");
                        let _ = docker.remove_container(&name, Some(force_remove())).await;
                        inner.forget_secrets(&name);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list containers to sweep"),
            }
        });
    }
}

fn force_remove() -> RemoveContainerOptions {
    RemoveContainerOptions {
        force: true,
        v: false,
        link: false,
    }
}

impl Inner {
    fn docker(&self) -> Option<Docker> {
        self.docker.borrow().clone()
    }

    /// The connection, waiting up to `patience` for the probe: at agent start the restored workloads' starts
    /// arrive before the engine answered, and failing them would cost a restart backoff.
    async fn docker_within(&self, patience: Duration) -> Option<Docker> {
        let mut rx = self.docker.subscribe();
        let ready = tokio::time::timeout(patience, rx.wait_for(Option::is_some)).await;
        match ready {
            Ok(Ok(d)) => d.clone(),
            _ => None,
        }
    }

    async fn probe_until_connected(&self) {
        loop {
            match self.probe().await {
                Ok((docker, engine, root_dir)) => {
                    tracing::info!(
                        engine = %engine.name,
                        api = %engine.api_version,
                        memory_limit = engine.memory_limit,
                        storage = %engine.storage_driver,
                        "container engine"
                    );
                    *lock(&self.engine) = Some(engine);
                    *lock(&self.root_dir) = root_dir;
                    self.docker.send_replace(Some(docker));
                    return;
                }
                Err(e) => {
                    let mut last = lock(&self.last_error);
                    if *last != e {
                        tracing::info!(socket = %self.cfg.socket.display(), error = %e, "container engine not reachable yet");
                        *last = e;
                    }
                }
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Connects, negotiates the API version down to the engine's (Docker 29 refuses old clients, old engines
    /// refuse new ones), and reads what the engine can enforce.
    async fn probe(&self) -> Result<(Docker, ContainerEngine, Option<PathBuf>), String> {
        let path = self.cfg.socket.to_string_lossy();
        let docker =
            Docker::connect_with_unix(&path, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
                .map_err(|e| e.to_string())?
                .negotiate_version()
                .await
                .map_err(|e| e.to_string())?;
        let version = docker.version().await.map_err(|e| e.to_string())?;
        let info = docker.info().await.map_err(|e| e.to_string())?;
        let name = version
            .platform
            .as_ref()
            .map(|p| p.name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "container engine".into());
        let engine = ContainerEngine {
            name: format!("{name} {}", version.version.unwrap_or_default()),
            api_version: version.api_version.unwrap_or_default(),
            memory_limit: info.memory_limit.unwrap_or(false),
            storage_driver: info.driver.unwrap_or_default(),
        };
        let root_dir = info.docker_root_dir.map(PathBuf::from);
        Ok((docker, engine, root_dir))
    }

    /// This device's managed containers, in any state.
    async fn managed(&self, docker: &Docker) -> Result<Vec<Found>, String> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_DEVICE}={}", self.device),
            ],
        )]);
        let list = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| e.to_string())?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                let name = c.names?.first()?.trim_start_matches('/').to_owned();
                Some(Found {
                    name,
                    workload: labels.get(LABEL_WORKLOAD).cloned().unwrap_or_default(),
                    spec_hash: labels.get(LABEL_SPEC_HASH).cloned().unwrap_or_default(),
                    running: c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING),
                })
            })
            .collect())
    }

    /// Pulls `image` by the digest reference its release signs, and accepts it only if the engine then has an
    /// image with the signed config (or manifest) digest; anything else that was pulled is removed again.
    async fn pull(&self, image: &ContainerImage) -> Result<(String, bool), String> {
        let reference = image
            .registry
            .as_deref()
            .ok_or("the release names no registry")?;
        flotilla_shared::image::check_registry_ref(reference)
            .map_err(|e| format!("registry reference {reference:?}: {e}"))?;
        let docker = self
            .docker_within(PROBE_PATIENCE)
            .await
            .ok_or("container engine unreachable")?;
        if let Some(id) = present(&docker, image).await {
            return Ok((id, false));
        }
        // As the docker CLI sends it: the repository, and the digest in `tag`.
        let (repo, digest) = reference
            .split_once('@')
            .ok_or("a registry reference without a digest")?;
        let mut progress = docker.create_image(
            Some(bollard::query_parameters::CreateImageOptions {
                from_image: Some(repo.to_owned()),
                tag: Some(digest.to_owned()),
                ..Default::default()
            }),
            None,
            None,
        );
        let pulled = tokio::time::timeout(PULL_TIMEOUT, async {
            while let Some(item) = progress.next().await {
                item.map_err(|e| format!("pulling {reference}: {e}"))?;
            }
            Ok::<(), String>(())
        })
        .await
        .map_err(|_| format!("pulling {reference}: no answer within {PULL_TIMEOUT:?}"))?;
        pulled?;
        if let Some(id) = present(&docker, image).await {
            tracing::info!(image = %id, from = %reference, "image pulled");
            return Ok((id, true));
        }
        let _ = docker
            .remove_image(
                reference,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await;
        Err(format!(
            "the registry served another image than the signed one ({}); removed it",
            ImageProblem::LoadedIdMismatch
        ))
    }

    /// Makes sure the engine has the signed image, loading it from the verified tarball if not. Returns the
    /// image ID to create containers from (never a tag), and whether this call loaded it.
    async fn ensure_image(
        &self,
        docker: &Docker,
        tarball: &Path,
        image: &ContainerImage,
        loading: impl std::future::Future<Output = ()>,
    ) -> Result<(String, bool), String> {
        if let Some(id) = present(docker, image).await {
            return Ok((id, false));
        }
        if !tarball.exists() {
            // Pulled from its registry before, and the engine lost it since: pull again or download.
            return Err(format!(
                "the engine no longer has image {} and no tarball is cached",
                image.config_digest
            ));
        }
        loading.await;
        // Checked again right before the load: the cached file is what the engine will read.
        let path = tarball.to_owned();
        let signed = image.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&path).map_err(|e| format!("cached image: {e}"))?;
            flotilla_shared::image::verify(std::io::BufReader::new(f), &signed)
                .map_err(|p| format!("container image refused before loading: {p}"))
        })
        .await
        .map_err(|e| e.to_string())?;
        checked?;
        let file = tokio::fs::File::open(tarball)
            .await
            .map_err(|e| format!("cached image: {e}"))?;
        let body = futures_util::stream::unfold(file, |mut f| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 256 * 1024];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), f))
                }
                Err(e) => Some((Err(e), f)),
            }
        });
        let mut progress = docker.import_image_stream(
            bollard::query_parameters::ImportImageOptions {
                quiet: true,
                platform: None,
            },
            body,
            None,
        );
        while let Some(item) = progress.next().await {
            item.map_err(|e| format!("the engine refused the image: {e}"))?;
        }
        if let Some(id) = present(docker, image).await {
            tracing::info!(image = %id, "image loaded");
            return Ok((id, true));
        }
        Err(format!(
            "container image refused after loading: {}",
            ImageProblem::LoadedIdMismatch
        ))
    }

    /// Brings up the container for `req`: adopt, start or create. Returns its name, and the image ID when this
    /// start loaded the image into the engine.
    async fn bring_up(
        &self,
        req: &StartRequest,
        events: &mpsc::Sender<RuntimeEvent>,
    ) -> Result<(String, Option<String>), String> {
        let docker = self.docker_within(PROBE_PATIENCE).await.ok_or_else(|| {
            format!(
                "container engine unreachable at {}: {}",
                self.cfg.socket.display(),
                lock(&self.last_error)
            )
        })?;
        let image = req
            .image
            .as_ref()
            .ok_or("the release names no container image")?;
        let hash = containers::spec_hash(&self.device, &req.spec);
        let name = containers::container_name(&req.name, &hash);
        lock(&self.ours).insert(name.clone());
        // Written before any start: a reboot empties the tmpfs under an existing container's mount.
        let secrets = self.write_secrets(&name, &req.secrets)?;
        let found = self.managed(&docker).await?;
        let (remove, bring) = containers::bring_up(req.name.as_str(), &name, &found);
        let mut loaded = None;
        for old in remove {
            tracing::info!(container = %old, "removing an older container of this workload");
            docker
                .remove_container(&old, Some(force_remove()))
                .await
                .map_err(|e| format!("removing {old}: {e}"))?;
            self.forget_secrets(&old);
        }
        match bring {
            Bring::Adopt => {
                tracing::info!(container = %name, "adopted running container");
                return Ok((name, None));
            }
            Bring::StartExisting => {}
            Bring::Create => {
                let loading = async {
                    let _ = events
                        .send(RuntimeEvent::Loading {
                            name: req.name.clone(),
                            op: req.op,
                        })
                        .await;
                };
                let (image_id, fresh) = self
                    .ensure_image(&docker, &req.artifact_path, image, loading)
                    .await?;
                loaded = fresh.then(|| image_id.clone());
                let dir = self.files.join(&name);
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                let config_file = dir.join("config");
                std::fs::write(&config_file, &req.spec.config).map_err(|e| e.to_string())?;
                let body = create_body(
                    req,
                    &self.device,
                    &hash,
                    &image_id,
                    &config_file,
                    secrets.as_deref(),
                )?;
                docker
                    .create_container(
                        Some(CreateContainerOptions {
                            name: Some(name.clone()),
                            ..Default::default()
                        }),
                        body,
                    )
                    .await
                    .map_err(|e| format!("creating {name}: {e}"))?;
            }
        }
        docker
            .start_container(&name, None)
            .await
            .map_err(|e| format!("starting {name}: {e}"))?;
        Ok((name, loaded))
    }

    /// Writes a container's opened secrets as files (mode 0444) in its own directory under `secrets_dir`, which
    /// must be a tmpfs (or ramfs): a secret never reaches a disk. Returns the directory to mount, if any.
    fn write_secrets(
        &self,
        name: &str,
        secrets: &super::Secrets,
    ) -> Result<Option<PathBuf>, String> {
        use std::os::unix::fs::PermissionsExt;
        if secrets.0.is_empty() {
            return Ok(None);
        }
        let root = &self.cfg.secrets_dir;
        let refuse = |why: String| {
            format!(
                "cannot hand secrets to the container: [container] secrets_dir {}: {why}",
                root.display()
            )
        };
        // Only the host's root may look into the root directory; the container sees its own directory only.
        std::fs::create_dir_all(root).map_err(|e| refuse(e.to_string()))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| refuse(e.to_string()))?;
        if !on_tmpfs(root) {
            return Err(refuse(
                "is not on a tmpfs, and secrets are never written to a disk".into(),
            ));
        }
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| refuse(e.to_string()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| refuse(e.to_string()))?;
        for (secret, value) in &secrets.0 {
            if secret.is_empty()
                || secret.starts_with('.')
                || !secret
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return Err(format!("secret name {secret:?} cannot be a file name"));
            }
            // Replaced atomically: an adopted container never reads a half-written file.
            let tmp = dir.join(format!(".{secret}.tmp"));
            std::fs::write(&tmp, value)
                .and_then(|()| {
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))
                })
                .and_then(|()| std::fs::rename(&tmp, dir.join(secret)))
                .map_err(|e| refuse(e.to_string()))?;
        }
        Ok(Some(dir))
    }

    /// Removes a container's secret files (its directory), if it had any.
    fn forget_secrets(&self, name: &str) {
        let _ = std::fs::remove_dir_all(self.cfg.secrets_dir.join(name));
    }

    /// The last lines of a container's output.
    async fn tail(&self, docker: &Docker, name: &str, lines: &str) -> String {
        let mut out = String::new();
        let mut s = docker.logs(
            name,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: lines.into(),
                ..Default::default()
            }),
        );
        while let Some(Ok(chunk)) = s.next().await {
            out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
        }
        out
    }
}

/// Whether `path` is on a tmpfs or ramfs (memory only).
fn on_tmpfs(path: &Path) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    rustix::fs::statfs(path).is_ok_and(|s| {
        #[allow(clippy::unnecessary_cast)] // the field's type differs between targets
        let t = s.f_type as u64;
        t == TMPFS_MAGIC || t == RAMFS_MAGIC
    })
}

/// The engine's ID for the signed image, if the engine has it: the config digest (classic image store,
/// balenaEngine, Podman) or the manifest digest (containerd image store).
async fn present(docker: &Docker, image: &ContainerImage) -> Option<String> {
    for d in [&image.config_digest, &image.manifest_digest] {
        let id = format!("sha256:{}", d.to_hex());
        if docker.inspect_image(&id).await.is_ok() {
            return Some(id);
        }
    }
    None
}

/// The engine configuration for a container workload: the hardened default (no privileges, every capability
/// dropped, no new privileges, read-only root with a tmpfs `/tmp`, a pids limit, the engine never restarts it,
/// a capped log) plus exactly what the typed spec asks for. Allow-list checks happen before this (in the agent,
/// where a refusal is reported as the workload's rejection).
pub(crate) fn create_body(
    req: &StartRequest,
    device: &str,
    hash: &str,
    image_id: &str,
    config_file: &Path,
    secrets: Option<&Path>,
) -> Result<ContainerCreateBody, String> {
    let c = req
        .spec
        .container
        .as_ref()
        .ok_or("a container workload without container fields")?;
    let labels = HashMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_DEVICE.to_owned(), device.to_owned()),
        (LABEL_WORKLOAD.to_owned(), req.name.to_string()),
        (LABEL_SPEC_HASH.to_owned(), hash.to_owned()),
        (LABEL_GENERATION.to_owned(), req.generation.to_string()),
        (LABEL_RELEASE.to_owned(), req.spec.release.to_hex()),
    ]);
    let mut mounts = vec![
        Mount {
            target: Some(c.config_path.clone()),
            source: Some(config_file.to_string_lossy().into_owned()),
            typ: Some(MountType::BIND),
            read_only: Some(true),
            ..Default::default()
        },
        // The host API: the directory, not the socket, so a re-created socket (agent restart) is seen too.
        Mount {
            target: Some("/run/flotilla".into()),
            source: config_file
                .parent()
                .map(|d| d.join("api").to_string_lossy().into_owned()),
            typ: Some(MountType::BIND),
            read_only: Some(true),
            ..Default::default()
        },
    ];
    // Secrets as files on a tmpfs, never environment variables (those show in `inspect` and leak into children).
    if let Some(dir) = secrets {
        mounts.push(Mount {
            target: Some("/run/secrets".into()),
            source: Some(dir.to_string_lossy().into_owned()),
            typ: Some(MountType::BIND),
            read_only: Some(true),
            ..Default::default()
        });
    }
    for v in &c.volumes {
        mounts.push(Mount {
            target: Some(v.path.clone()),
            // Per workload, not per version: the data survives updates.
            source: Some(format!("flotilla_{}_{}", req.name, v.name)),
            typ: Some(MountType::VOLUME),
            read_only: Some(v.read_only),
            ..Default::default()
        });
    }
    let mut port_bindings = HashMap::new();
    let mut exposed = Vec::new();
    for p in &c.ports {
        let key = format!("{}/{}", p.container, if p.udp { "udp" } else { "tcp" });
        exposed.push(key.clone());
        port_bindings.insert(
            key,
            Some(vec![PortBinding {
                host_ip: None,
                host_port: Some(p.host.to_string()),
            }]),
        );
    }
    let memory = i64::from(req.spec.resources.memory_mib) << 20;
    // Two files of half the cap each: the engine rotates, the total stays within the cap.
    let log_file = (c.log_max_bytes / 2).max(1 << 20);
    let host = HostConfig {
        memory: Some(memory),
        memory_swap: Some(memory),
        nano_cpus: (c.cpus_milli > 0).then(|| i64::from(c.cpus_milli) * 1_000_000),
        pids_limit: Some(i64::from(c.pids)),
        privileged: Some(false),
        cap_drop: Some(vec!["ALL".into()]),
        cap_add: (!c.capabilities.is_empty()).then(|| c.capabilities.clone()),
        security_opt: Some(vec!["no-new-privileges".into()]),
        readonly_rootfs: Some(c.read_only),
        tmpfs: c
            .read_only
            .then(|| HashMap::from([("/tmp".to_owned(), "rw,nosuid,nodev,size=64m".to_owned())])),
        network_mode: Some(
            match c.network {
                NetworkMode::Bridge => "bridge",
                NetworkMode::None => "none",
                NetworkMode::Host => "host",
            }
            .into(),
        ),
        port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
        mounts: Some(mounts),
        devices: (!c.devices.is_empty()).then(|| {
            c.devices
                .iter()
                .map(|d| DeviceMapping {
                    path_on_host: Some(d.clone()),
                    path_in_container: Some(d.clone()),
                    cgroup_permissions: Some("rwm".into()),
                })
                .collect()
        }),
        log_config: Some(HostConfigLogConfig {
            typ: Some("local".into()),
            config: Some(HashMap::from([
                ("max-size".to_owned(), log_file.to_string()),
                ("max-file".to_owned(), "2".to_owned()),
            ])),
        }),
        // The agent restarts, with its own backoff; the engine never does.
        restart_policy: Some(bollard::models::RestartPolicy {
            name: Some(bollard::models::RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        ..Default::default()
    };
    let env: Vec<String> = c.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Ok(ContainerCreateBody {
        image: Some(image_id.to_owned()),
        cmd: (!c.command.is_empty()).then(|| c.command.clone()),
        env: (!env.is_empty()).then_some(env),
        user: c.user.clone(),
        labels: Some(labels),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        stop_timeout: Some(i64::from(c.stop_timeout_secs)),
        healthcheck: c.health.as_ref().map(|h| HealthConfig {
            test: Some(
                std::iter::once("CMD".to_owned())
                    .chain(h.command.iter().cloned())
                    .collect(),
            ),
            interval: Some(i64::from(h.interval_secs) * 1_000_000_000),
            timeout: Some(i64::from(h.interval_secs) * 1_000_000_000),
            retries: Some(i64::from(h.retries)),
            ..Default::default()
        }),
        host_config: Some(host),
        ..Default::default()
    })
}

/// Stops the host API server when the lifecycle that started it ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Messages from the agent to a container's lifecycle task.
#[derive(Debug)]
enum Ctl {
    Stop(OpId),
    /// The agent is shutting down: leave the container running for the next agent to adopt.
    Detach,
}

struct ContainerHandle {
    ctl: mpsc::UnboundedSender<Ctl>,
    logs: Arc<Mutex<String>>,
}

impl RunningWorkload for ContainerHandle {
    fn stop(&mut self, op: OpId) {
        let _ = self.ctl.send(Ctl::Stop(op));
    }
    fn logs(&self) -> String {
        lock(&self.logs).clone()
    }
    fn detach(&mut self) -> bool {
        let _ = self.ctl.send(Ctl::Detach);
        true
    }
}

impl Runtime for ContainerRuntime {
    fn start(
        &self,
        req: StartRequest,
        events: mpsc::Sender<RuntimeEvent>,
    ) -> Box<dyn RunningWorkload> {
        let (tx, rx) = mpsc::unbounded_channel();
        let logs = Arc::new(Mutex::new(String::new()));
        let inner = self.inner.clone();
        tokio::spawn(lifecycle(inner, req, events, rx, logs.clone()));
        Box::new(ContainerHandle { ctl: tx, logs })
    }
}

/// One run of a container: bring it up, report, then watch it until it exits, turns unhealthy, or the agent
/// stops or detaches.
async fn lifecycle(
    inner: Arc<Inner>,
    req: StartRequest,
    events: mpsc::Sender<RuntimeEvent>,
    mut ctl: mpsc::UnboundedReceiver<Ctl>,
    logs: Arc<Mutex<String>>,
) {
    let (workload, op) = (req.name.clone(), req.op);
    // The host API socket exists before the container starts (so its first call works) and is re-created for
    // an adopted container, which sees it through its directory mount.
    let api_dir = inner
        .files
        .join(containers::container_name(
            &req.name,
            &containers::spec_hash(&inner.device, &req.spec),
        ))
        .join("api");
    let api = std::fs::create_dir_all(&api_dir).and_then(|()| {
        super::host_api::serve(
            &api_dir.join("api.sock"),
            req.name.clone(),
            req.spec.config.clone(),
            events.clone(),
        )
    });
    let api = match api {
        Ok(task) => AbortOnDrop(task),
        Err(e) => {
            let _ = events
                .send(RuntimeEvent::Started {
                    name: workload,
                    op,
                    result: Err(format!("host API socket: {e}")),
                })
                .await;
            return;
        }
    };
    let _api = api;
    let name = match inner.bring_up(&req, &events).await {
        Ok((n, loaded)) => {
            if let Some(image) = loaded {
                let _ = events
                    .send(RuntimeEvent::ImageLoaded {
                        name: workload.clone(),
                        image,
                    })
                    .await;
            }
            n
        }
        Err(e) => {
            let _ = events
                .send(RuntimeEvent::Started {
                    name: workload,
                    op,
                    result: Err(e),
                })
                .await;
            return;
        }
    };
    let _ = events
        .send(RuntimeEvent::Started {
            name: workload.clone(),
            op,
            result: Ok(()),
        })
        .await;
    let Some(docker) = inner.docker() else {
        return;
    };
    let mut wait = docker.wait_container(&name, None);
    let health_every = req
        .spec
        .container
        .as_ref()
        .and_then(|c| c.health.as_ref())
        .map(|h| Duration::from_secs(u64::from(h.interval_secs)));
    let mut health = tokio::time::interval(health_every.unwrap_or(Duration::from_secs(3600)));
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unhealthy = false;
    loop {
        tokio::select! {
            // Ends on exit, and on a lost engine connection (then the inspect below fails and the reconciler
            // restarts, which adopts the container if it still runs).
            _ = wait.next() => {
                let exit = match docker.inspect_container(&name, None).await {
                    Ok(i) => {
                        let st = i.state.unwrap_or_default();
                        if st.running == Some(true) {
                            Exit::Failed("lost the engine's wait on the container".into())
                        } else if unhealthy {
                            Exit::Ended(ExitCause::Unhealthy)
                        } else if st.oom_killed == Some(true) {
                            Exit::Ended(ExitCause::OomKilled { limit_mib: req.spec.resources.memory_mib })
                        } else {
                            match st.exit_code.unwrap_or(-1) {
                                0 => Exit::Completed,
                                code => Exit::Ended(ExitCause::Code(code)),
                            }
                        }
                    }
                    Err(e) => Exit::Failed(format!("container {name} lost: {e}")),
                };
                *lock(&logs) = inner.tail(&docker, &name, LOG_TAIL).await;
                let _ = events.send(RuntimeEvent::Exited { name: workload, op, exit }).await;
                return;
            }
            c = ctl.recv() => match c {
                Some(Ctl::Stop(stop_op)) => {
                    let t = req.spec.container.as_ref().map_or(10, |c| c.stop_timeout_secs);
                    let _ = docker
                        .stop_container(&name, Some(StopContainerOptions { t: i32::try_from(t).ok(), signal: None }))
                        .await;
                    *lock(&logs) = inner.tail(&docker, &name, LOG_TAIL).await;
                    if let Err(e) = docker.remove_container(&name, Some(force_remove())).await {
                        tracing::warn!(container = %name, error = %e, "cannot remove stopped container");
                    }
                    let _ = std::fs::remove_dir_all(inner.files.join(&name));
                    inner.forget_secrets(&name);
                    let _ = events.send(RuntimeEvent::Stopped { name: workload, op: stop_op }).await;
                    return;
                }
                Some(Ctl::Detach) | None => return,
            },
            _ = health.tick(), if health_every.is_some() => {
                let status = docker
                    .inspect_container(&name, None)
                    .await
                    .ok()
                    .and_then(|i| i.state)
                    .and_then(|s| s.health)
                    .and_then(|h| h.status);
                if status == Some(HealthStatusEnum::UNHEALTHY) {
                    tracing::warn!(container = %name, "unhealthy; restarting it");
                    unhealthy = true;
                    let _ = docker.kill_container(&name, None).await;
                }
            }
        }
    }
}
