//! Workload runtimes behind one trait, so the container runtime plugs in beside WASM.

pub mod container;
pub mod host_api;
pub mod wasm;

use flotilla_agent_core::{Exit, OpId};
use flotilla_shared::WorkloadName;
use flotilla_shared::wire::WorkloadSpec;
use std::path::PathBuf;

/// What a runtime reports back to the agent loop.
#[derive(Debug, PartialEq)]
pub enum RuntimeEvent {
    /// The start operation `op` finished: the workload is running, or could not be started.
    Started {
        name: WorkloadName,
        op: OpId,
        result: Result<(), String>,
    },
    /// The run launched by start operation `op` ended by itself.
    Exited {
        name: WorkloadName,
        op: OpId,
        exit: Exit,
    },
    /// The stop operation `op` finished; the workload no longer runs.
    Stopped { name: WorkloadName, op: OpId },
    /// A guest published telemetry through the host API.
    Telemetry {
        name: WorkloadName,
        stream: String,
        payload: Vec<u8>,
    },
    /// A guest reported a named numeric metric (published on its `metrics` telemetry stream).
    Metric {
        name: WorkloadName,
        metric: String,
        value: f64,
    },
    /// A firmware image was written to the inactive slot, read back and activated (or why not).
    FirmwareInstalled {
        release: flotilla_shared::Digest,
        result: Result<(), String>,
    },
    /// A downloaded container tarball (in `staging`) was checked against its signed image.
    ImageChecked {
        digest: flotilla_shared::Digest,
        size: u64,
        staging: PathBuf,
        result: Result<(), flotilla_shared::wire::ImageProblem>,
    },
    /// The start `op` of `name` is loading its container image into the engine.
    Loading { name: WorkloadName, op: OpId },
    /// A registry pull for the release whose artifact is `artifact` ended: the engine's image ID and whether
    /// this pull brought it (false: the engine had it already), or why not (the agent then downloads the
    /// tarball over MQTT).
    Pulled {
        workload: WorkloadName,
        artifact: flotilla_shared::Digest,
        result: Result<(String, bool), String>,
    },
    /// A staged release's image is in the engine (or why not).
    Preloaded {
        artifact: flotilla_shared::Digest,
        result: Result<(), String>,
    },
    /// The container runtime loaded `image` into the engine for workload `name`.
    ImageLoaded { name: WorkloadName, image: String },
    /// The answer to a `flotilla logs` request, read from the engine.
    Logs(flotilla_shared::wire::LogsResponse),
    /// The container runtime removed these images from the engine.
    ImagesRemoved(Vec<String>),
    /// A guest asked to hold updates for `secs` seconds (0 lifts its hold).
    Hold {
        name: WorkloadName,
        reason: String,
        secs: u32,
    },
}

/// One workload start request: the verified artifact on disk and the spec it runs under.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub name: WorkloadName,
    pub op: OpId,
    pub spec: WorkloadSpec,
    pub artifact_path: PathBuf,
    pub artifact: flotilla_shared::Digest,
    /// For a container release: the image identity it signs (the artifact is its canonical tarball).
    pub image: Option<flotilla_shared::wire::ContainerImage>,
    /// The desired-state generation this start belongs to (a label on containers, for operators).
    pub generation: u64,
    /// The workload's secrets, opened in memory for this start only (never stored or logged in the clear).
    pub secrets: Secrets,
}

/// Opened secret values by name. `Debug` shows names only.
#[derive(Clone, Default)]
pub struct Secrets(pub std::collections::BTreeMap<String, Vec<u8>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// A runtime that can start and stop workloads. Starts and stops never block the caller; results arrive as
/// [`RuntimeEvent`]s on the channel given at start.
pub trait Runtime: Send + Sync {
    fn start(
        &self,
        req: StartRequest,
        events: tokio::sync::mpsc::Sender<RuntimeEvent>,
    ) -> Box<dyn RunningWorkload>;
}

/// A handle to a started workload.
pub trait RunningWorkload: Send {
    /// Asks the workload to stop; a [`RuntimeEvent::Stopped`] with `op` follows.
    fn stop(&mut self, op: OpId);
    /// The bounded stdout/stderr capture of the workload, newest last.
    fn logs(&self) -> String;
    /// At agent shutdown: let go of a workload that keeps running without the agent (a container, adopted by
    /// the next agent) and return true; workloads that live in the agent's process return false and are stopped.
    fn detach(&mut self) -> bool {
        false
    }
}
