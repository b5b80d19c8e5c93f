//! Which artifact of a verified release this agent runs: the module precompiled for its target and engine when the
//! release signs one, else the source module, compiled on the device, which an agent built without a compiler
//! cannot do, so it refuses with a typed reason that `why` shows.

use flotilla_engine::Target;
use flotilla_shared::trust::select_precompiled;
use flotilla_shared::wire::{RejectReason, Release, WorkloadKind};

/// Whether this agent was built with the on-device compiler (the `compiler` feature).
pub const HAS_COMPILER: bool = cfg!(feature = "compiler");

/// The release as this agent runs it: for WASM, `artifact_digest` and `artifact_size` name the variant it will
/// fetch, verify and load. Everything downstream (cache, fetch, staging, fallback, collection) uses those two.
pub(crate) fn for_this_agent(release: Release) -> Result<Release, RejectReason> {
    choose(release, Target::host(), HAS_COMPILER)
}

/// The decision, with the target and the compiler as inputs so every case is testable on any machine.
fn choose(mut release: Release, target: Target, compiler: bool) -> Result<Release, RejectReason> {
    if release.kind != WorkloadKind::Wasm {
        return Ok(release);
    }
    let fingerprint = flotilla_engine::fingerprint(target);
    if let Some(v) = select_precompiled(&release, target.name(), &fingerprint) {
        // Loading a variant skips compilation entirely (milliseconds instead of seconds on a gateway), so it is
        // preferred even by agents that could compile.
        let (digest, size) = (v.digest, v.size);
        release.artifact_digest = digest;
        release.artifact_size = size;
        return Ok(release);
    }
    if compiler {
        return Ok(release);
    }
    Err(RejectReason::NoPrecompiledVariant {
        target: target.name().to_owned(),
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::wire::Precompiled;
    use flotilla_shared::{Digest, WorkloadName};

    fn release(kind: WorkloadKind, variants: &[(&str, String, u8)]) -> Release {
        Release {
            name: WorkloadName::new("w".to_owned()).expect("valid name"),
            version: "1".into(),
            epoch: 0,
            kind,
            artifact_digest: Digest([1; 32]),
            artifact_size: 100,
            precompiled: variants
                .iter()
                .map(|(t, f, d)| Precompiled {
                    target: (*t).to_owned(),
                    engine_fingerprint: f.clone(),
                    digest: Digest([*d; 32]),
                    size: u64::from(*d) * 10,
                })
                .collect(),
            image: None,
            compatible: None,
        }
    }

    #[test]
    fn picks_the_variant_for_its_target_and_engine_or_compiles_or_refuses() {
        let fp = flotilla_engine::fingerprint;
        let old_engine = "wasmtime-47.0.0/flotilla-1/aarch64".to_owned();
        let both = [
            ("x86_64", fp(Target::X86_64), 2),
            ("aarch64", fp(Target::Aarch64), 3),
        ];
        // (variants, target, has compiler) -> Ok(artifact digest byte) or Err(refused)
        type Variants = Vec<(&'static str, String, u8)>;
        let cases: Vec<(Variants, Target, bool, Result<u8, ()>)> = vec![
            (both.to_vec(), Target::Aarch64, false, Ok(3)),
            (both.to_vec(), Target::X86_64, false, Ok(2)),
            (both.to_vec(), Target::X86_64, true, Ok(2)),
            // No variant: the compiler builds from source; without one the release is refused.
            (vec![], Target::X86_64, true, Ok(1)),
            (vec![], Target::Aarch64, false, Err(())),
            (both.to_vec(), Target::Pulley32, false, Err(())),
            (both.to_vec(), Target::Pulley32, true, Ok(1)),
            // A variant signed for another engine (older wasmtime or settings) never loads.
            (
                vec![("aarch64", old_engine.clone(), 4)],
                Target::Aarch64,
                false,
                Err(()),
            ),
            (
                vec![("aarch64", old_engine, 4)],
                Target::Aarch64,
                true,
                Ok(1),
            ),
            // The target name must match too, not only the fingerprint.
            (
                vec![("x86_64", fp(Target::Aarch64), 5)],
                Target::Aarch64,
                false,
                Err(()),
            ),
        ];
        for (variants, target, compiler, want) in cases {
            let got = choose(release(WorkloadKind::Wasm, &variants), target, compiler);
            match (got, want) {
                (Ok(r), Ok(d)) => {
                    assert_eq!(r.artifact_digest, Digest([d; 32]), "{target} {compiler}");
                    assert_eq!(
                        r.artifact_size,
                        if d == 1 { 100 } else { u64::from(d) * 10 }
                    );
                }
                (
                    Err(RejectReason::NoPrecompiledVariant {
                        target: t,
                        fingerprint,
                    }),
                    Err(()),
                ) => {
                    assert_eq!(t, target.name());
                    assert_eq!(fingerprint, fp(target));
                }
                (got, want) => panic!("{target} {compiler}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn container_releases_are_untouched() {
        let r = release(WorkloadKind::Container, &[]);
        assert_eq!(choose(r.clone(), Target::Aarch64, false), Ok(r));
    }
}
