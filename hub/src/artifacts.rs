//! Releases and artifacts: storing a pushed release after the same signature checks a device runs, and serving
//! release documents and artifact blobs to devices in chunks over MQTT.

use crate::hub::{Hub, HubError, unix_now};
use flotilla_mqtt::Publisher;
use flotilla_shared::codec::{self, MAX_CHUNK_DATA, Message};
use flotilla_shared::topics::{self, DeviceTopic};
use flotilla_shared::trust;
use flotilla_shared::wire::{ArtifactChunk, ArtifactRef, ArtifactRequest, Signed, WorkloadSpec};
use flotilla_shared::{DeviceId, Digest};
use std::io::{Read, Seek};

impl Hub {
    pub(crate) fn on_artifact_request(
        &mut self,
        device: &DeviceId,
        req: ArtifactRequest,
    ) -> Result<(), String> {
        let topic = topics::device(device, DeviceTopic::ArtifactChunk);
        let max = (req.max_len as usize).clamp(1, MAX_CHUNK_DATA);
        let chunk = match req.what {
            ArtifactRef::Release(d) => match self
                .store
                .release_by_digest(&d)
                .map_err(|e| e.to_string())?
            {
                Some(row) => {
                    let bytes = postcard::to_stdvec(&row.signed).map_err(|e| e.to_string())?;
                    slice_chunk(req.what, &bytes, req.offset, max)
                }
                None => ArtifactChunk::NotFound { what: req.what },
            },
            ArtifactRef::Blob(d) => {
                let path = self.store.blob_path(&d);
                match std::fs::File::open(&path) {
                    Ok(mut f) => {
                        let total = f.metadata().map_err(|e| e.to_string())?.len();
                        let offset = req.offset.min(total);
                        f.seek(std::io::SeekFrom::Start(offset))
                            .map_err(|e| e.to_string())?;
                        let mut data =
                            vec![0u8; max.min(usize::try_from(total - offset).unwrap_or(max))];
                        f.read_exact(&mut data).map_err(|e| e.to_string())?;
                        ArtifactChunk::Data {
                            what: req.what,
                            offset,
                            total,
                            data,
                        }
                    }
                    Err(_) => ArtifactChunk::NotFound { what: req.what },
                }
            }
        };
        let bytes = codec::encode(&Message::ArtifactChunk(chunk)).map_err(|e| e.to_string())?;
        self.link
            .publish(&topic, bytes, false)
            .map_err(|e| e.to_string())?;
        self.metrics.chunks_served += 1;
        Ok(())
    }

    /// Stores a release after checking its signatures against the root and that its artifact is present.
    pub fn push_release(
        &mut self,
        signed: Signed,
        who: &str,
    ) -> Result<(Digest, String), HubError> {
        let release: flotilla_shared::wire::Release = codec::decode_exact(&signed.body)
            .map_err(|e| HubError::BadRequest(format!("release: {e}")))?;
        let digest = trust::document_digest(&signed);
        // Verify with the same check a device runs, so a release the fleet would refuse is refused here.
        let probe = WorkloadSpec {
            name: release.name.clone(),
            kind: release.kind,
            release: digest,
            config: vec![],
            resources: flotilla_shared::wire::Resources {
                memory_mib: 1,
                cpu_ms: 1,
            },
            restart: flotilla_shared::wire::RestartPolicy::Never,
            health: flotilla_shared::wire::HealthRule::RunningFor(0),
            tick_ms: 0,
            geofence: None,
            secrets: vec![],
            container: None,
        };
        trust::verify_release_for(&self.root, &signed, &probe, &trust::TrustFloor::default())
            .map_err(|e| HubError::BadRequest(format!("release rejected: {e}")))?;
        // A container tarball gets the device's own check here, so a release devices would refuse never lands.
        if let Some(image) = &release.image {
            if let Some(r) = &image.registry {
                flotilla_shared::image::check_registry_ref(r).map_err(|e| {
                    HubError::BadRequest(format!("release rejected: registry reference {r:?}: {e}"))
                })?;
            }
            let file = std::fs::File::open(self.store.blob_path(&release.artifact_digest))
                .map_err(|_| {
                    HubError::BadRequest(format!(
                        "artifact {} has not been uploaded",
                        release.artifact_digest
                    ))
                })?;
            flotilla_shared::image::verify(std::io::BufReader::new(file), image).map_err(|e| {
                HubError::BadRequest(format!(
                    "release rejected: the container image tarball: {e}"
                ))
            })?;
        }
        let blob = self.store.blob_path(&release.artifact_digest);
        let size = std::fs::metadata(&blob).map(|m| m.len()).map_err(|_| {
            HubError::BadRequest(format!(
                "artifact {} has not been uploaded",
                release.artifact_digest
            ))
        })?;
        if size != release.artifact_size {
            return Err(HubError::BadRequest(
                "uploaded artifact size differs from the release".into(),
            ));
        }
        // Every precompiled variant a device may pick must be here too, or that device's download would fail.
        for v in &release.precompiled {
            let got = std::fs::metadata(self.store.blob_path(&v.digest)).map(|m| m.len());
            match got {
                Ok(n) if n == v.size => {}
                Ok(_) => {
                    return Err(HubError::BadRequest(format!(
                        "the module precompiled for {} differs in size from the release",
                        v.target
                    )));
                }
                Err(_) => {
                    return Err(HubError::BadRequest(format!(
                        "the module precompiled for {} ({}) has not been uploaded",
                        v.target, v.digest
                    )));
                }
            }
        }
        if self
            .store
            .release_by_version(release.name.as_str(), &release.version)?
            .is_some()
        {
            return Err(HubError::Conflict(format!(
                "release {}@{} exists",
                release.name, release.version
            )));
        }
        let now = unix_now();
        self.store.insert_release(&digest, &release, &signed, now)?;
        self.store.audit(
            now,
            who,
            "release",
            &format!("{}@{} {}", release.name, release.version, digest),
        )?;
        Ok((digest, format!("{}@{}", release.name, release.version)))
    }
}

fn slice_chunk(what: ArtifactRef, bytes: &[u8], offset: u64, max: usize) -> ArtifactChunk {
    let total = bytes.len() as u64;
    let start = usize::try_from(offset.min(total)).unwrap_or(bytes.len());
    let end = start.saturating_add(max).min(bytes.len());
    ArtifactChunk::Data {
        what,
        offset: start as u64,
        total,
        data: bytes[start..end].to_vec(),
    }
}
