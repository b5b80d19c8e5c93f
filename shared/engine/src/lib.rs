//! The WASM engine settings that the hub's precompiler and every agent share, and the names of the targets a
//! release can carry precompiled variants for.
//!
//! A module compiled ahead of time loads only into an engine whose settings that change generated code (tunables,
//! WebAssembly features, code generator flags) are the ones it was compiled with; wasmtime checks this when it
//! loads the module and refuses a mismatch. Both sides therefore build their `wasmtime::Config` here, and the
//! release names each variant by a [`fingerprint`] made of the wasmtime version, this crate's settings profile and
//! the target. The fingerprint is computed from constants, not from the host: the hub compiles for the target's
//! baseline CPU (no host-detected features), which every device of that architecture can run.

use std::fmt;

/// The wasmtime release both sides are built with (the workspace pins it exactly).
pub const WASMTIME_VERSION: &str = "48.0.8";

/// Bumped whenever [`config`] changes in a way that changes generated code: variants signed under an older profile
/// stop matching, and agents fall back to compiling (or refuse, without a compiler) instead of failing to load.
pub const PROFILE: u32 = 1;

/// Guest stack limit (bytes): deep enough for real code, shallow enough that runaway recursion traps quickly.
pub const MAX_WASM_STACK: usize = 512 * 1024;

/// A target a module can be precompiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// Native x86-64 code.
    X86_64,
    /// Native AArch64 code (64-bit ARM gateways).
    Aarch64,
    /// Pulley bytecode for 32-bit hosts (armv7), run by wasmtime's interpreter.
    Pulley32,
    /// Pulley bytecode for 64-bit hosts without a native code generator.
    Pulley64,
}

/// A target name that is not one of [`Target::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown precompile target {0:?}: expected one of x86_64, aarch64, pulley32, pulley64")]
pub struct UnknownTarget(pub String);

impl Target {
    pub const ALL: [Target; 4] = [
        Target::X86_64,
        Target::Aarch64,
        Target::Pulley32,
        Target::Pulley64,
    ];

    /// The name used on the command line and in signed releases.
    pub fn name(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
            Self::Pulley32 => "pulley32",
            Self::Pulley64 => "pulley64",
        }
    }

    /// The triple wasmtime compiles for. The operating system is part of the module's header and must match the
    /// device's (Linux); the environment (gnu, musl) is not checked by wasmtime and does not matter.
    pub fn triple(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64-unknown-linux-gnu",
            Self::Aarch64 => "aarch64-unknown-linux-gnu",
            Self::Pulley32 => "pulley32",
            Self::Pulley64 => "pulley64",
        }
    }

    pub fn parse(s: &str) -> Result<Self, UnknownTarget> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s.trim())
            .ok_or_else(|| UnknownTarget(s.to_owned()))
    }

    /// The target this process runs modules for: native code on x86-64 and AArch64, Pulley bytecode elsewhere
    /// (wasmtime's own choice on hosts without a Cranelift back end, such as armv7).
    pub fn host() -> Self {
        if cfg!(target_arch = "x86_64") {
            Self::X86_64
        } else if cfg!(target_arch = "aarch64") {
            Self::Aarch64
        } else if cfg!(target_pointer_width = "32") {
            Self::Pulley32
        } else {
            Self::Pulley64
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The engine fingerprint a precompiled variant for `target` is signed with.
pub fn fingerprint(target: Target) -> String {
    format!(
        "wasmtime-{WASMTIME_VERSION}/flotilla-{PROFILE}/{}",
        target.name()
    )
}

/// The engine configuration every agent runs with and the precompiler compiles with.
pub fn config() -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    // Workloads are preempted by epochs (the agent's ticker), never by fuel: cheaper, and part of the tunables a
    // precompiled module must match.
    config.epoch_interruption(true);
    config.max_wasm_stack(MAX_WASM_STACK);
    #[cfg(feature = "compiler")]
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    // Pulley hosts (armv7) run the interpreter; say so explicitly so the engine and the variant agree on it.
    if matches!(Target::host(), Target::Pulley32 | Target::Pulley64) {
        // The triple is one of ours and always parses.
        let _ = config.target(Target::host().triple());
    }
    config
}

/// Why a module could not be precompiled.
#[cfg(feature = "compiler")]
#[derive(Debug, thiserror::Error)]
pub enum PrecompileError {
    #[error("this build cannot compile for {0} (it needs the `cross` feature)")]
    Unsupported(Target),
    #[error("compiling for {target}: {message}")]
    Compile { target: Target, message: String },
}

/// Compiles `wasm` (binary or text) for `target` with the agents' settings, for the baseline CPU of that target.
#[cfg(feature = "compiler")]
pub fn precompile(target: Target, wasm: &[u8]) -> Result<Vec<u8>, PrecompileError> {
    if target != Target::host() && !cfg!(feature = "cross") {
        return Err(PrecompileError::Unsupported(target));
    }
    let compile = |message: String| PrecompileError::Compile { target, message };
    let mut config = config();
    // Setting the target, even the host's, turns off host CPU detection: the code runs on every device of the
    // architecture, and the result does not depend on the machine that compiled it.
    config
        .target(target.triple())
        .map_err(|e| compile(e.to_string()))?;
    let engine = wasmtime::Engine::new(&config).map_err(|e| compile(format!("{e:#}")))?;
    engine
        .precompile_module(wasm)
        .map_err(|e| compile(format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_targets_are_refused() {
        for t in Target::ALL {
            assert_eq!(Target::parse(t.name()), Ok(t));
        }
        assert_eq!(
            Target::parse("armv7"),
            Err(UnknownTarget("armv7".to_owned()))
        );
    }

    #[test]
    fn fingerprints_differ_per_target() {
        let all: std::collections::BTreeSet<_> = Target::ALL.into_iter().map(fingerprint).collect();
        assert_eq!(all.len(), Target::ALL.len());
        assert_eq!(
            fingerprint(Target::Aarch64),
            format!("wasmtime-{WASMTIME_VERSION}/flotilla-{PROFILE}/aarch64")
        );
    }

    /// A module precompiled for the host target loads into the engine every agent builds, and runs.
    #[cfg(feature = "compiler")]
    #[test]
    fn a_host_variant_loads_into_the_agents_engine() {
        let wasm = wat::parse_str(r#"(module (func (export "f") (result i32) i32.const 7))"#)
            .expect("valid wat");
        let bytes = precompile(Target::host(), &wasm).expect("precompiles");
        let engine = wasmtime::Engine::new(&config()).expect("engine");
        assert!(wasmtime::Engine::detect_precompiled(&bytes).is_some());
        // SAFETY: the bytes were produced just above by `precompile` with the same settings.
        #[allow(unsafe_code)]
        let module = unsafe { wasmtime::Module::deserialize(&engine, &bytes) }.expect("loads");
        let mut store = wasmtime::Store::new(&engine, ());
        store.set_epoch_deadline(1_000);
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).expect("instance");
        let f = instance
            .get_typed_func::<(), i32>(&mut store, "f")
            .expect("export");
        assert_eq!(f.call(&mut store, ()).expect("runs"), 7);
    }

    /// A variant for another architecture is refused by the loader (the agent then compiles or refuses).
    #[cfg(feature = "cross")]
    #[test]
    fn a_variant_for_another_architecture_does_not_load() {
        let other = if Target::host() == Target::Aarch64 {
            Target::X86_64
        } else {
            Target::Aarch64
        };
        let wasm = wat::parse_str("(module)").expect("valid wat");
        let bytes = precompile(other, &wasm).expect("precompiles");
        let engine = wasmtime::Engine::new(&config()).expect("engine");
        // SAFETY: the bytes are a wasmtime artifact made just above; loading must fail on its header check.
        #[allow(unsafe_code)]
        let err = unsafe { wasmtime::Module::deserialize(&engine, &bytes) }
            .expect_err("another architecture's code must not load");
        assert!(format!("{err:#}").contains("architecture"), "{err:#}");
    }
}
