//! The device's check of container image tarballs: the canonical form passes, every tampering is refused with
//! its typed reason (data-driven: one row per attack).

use flotilla_shared::Digest;
use flotilla_shared::image::{self, ImageParts, blob_path};
use flotilla_shared::wire::{ContainerImage, ImageProblem};
use std::io::Read;

/// A one-file layer tar.
fn layer(name: &str, body: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(body.len() as u64);
    h.set_mode(0o755);
    b.append_data(&mut h, name, body).expect("layer");
    b.into_inner().expect("layer")
}

fn config(layers: &[&[u8]]) -> Vec<u8> {
    let ids: Vec<String> = layers
        .iter()
        .map(|l| image::oci_digest(&Digest::of(l)))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": ids}
    }))
    .expect("config")
}

fn sample() -> (Vec<u8>, ContainerImage) {
    let l1 = layer("bin/app", b"#!/bin/sh\necho hi\n");
    let l2 = layer("etc/app.conf", b"x=1\n");
    let parts = ImageParts {
        config: config(&[&l1, &l2]),
        layers: vec![l1, l2],
    };
    image::write_canonical(&parts).expect("canonical")
}

/// A tarball as a list of (path, type, bytes), to tamper with and write back.
type Entries = Vec<(String, tar::EntryType, Vec<u8>)>;

fn entries(tarball: &[u8]) -> Entries {
    let mut a = tar::Archive::new(tarball);
    a.entries()
        .expect("entries")
        .map(|e| {
            let mut e = e.expect("entry");
            let path = e.path().expect("path").to_string_lossy().into_owned();
            let kind = e.header().entry_type();
            let mut bytes = Vec::new();
            e.read_to_end(&mut bytes).expect("read");
            (path, kind, bytes)
        })
        .collect()
}

fn write(entries: &Entries) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, bytes) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        if *kind == tar::EntryType::Symlink {
            h.set_size(0);
            h.set_link_name("/etc/passwd").expect("link");
            b.append_data(&mut h, path, std::io::empty())
                .expect("append");
        } else {
            b.append_data(&mut h, path, bytes.as_slice())
                .expect("append");
        }
    }
    b.into_inner().expect("tar")
}

fn edit_json(e: &mut Entries, path: &str, f: impl FnOnce(&mut serde_json::Value)) {
    let entry = e.iter_mut().find(|(p, _, _)| p == path).expect("entry");
    let mut v: serde_json::Value = serde_json::from_slice(&entry.2).expect("json");
    f(&mut v);
    entry.2 = serde_json::to_vec(&v).expect("json");
}

#[test]
fn canonical_tarball_passes_and_is_deterministic() {
    let (bytes, signed) = sample();
    assert_eq!(image::verify(bytes.as_slice(), &signed), Ok(()));
    let (again, signed_again) = sample();
    assert_eq!(bytes, again, "the same image gives the same artifact");
    assert_eq!(signed, signed_again);
    // Re-writing the same entries (other header details) still passes: the check is about content.
    assert_eq!(
        image::verify(write(&entries(&bytes)).as_slice(), &signed),
        Ok(())
    );
}

#[test]
fn tampered_tarballs_are_refused_with_their_reason() {
    let (bytes, signed) = sample();
    let config_path = blob_path(&signed.config_digest);
    let layer_path = blob_path(&signed.diff_ids[0]);
    type Attack = (&'static str, Box<dyn Fn(&mut Entries)>, ImageProblem);
    let layer_for_flip = layer_path.clone();
    let layer_for_drop = layer_path.clone();
    let config_for_swap = config_path.clone();
    let attacks: Vec<Attack> = vec![
        (
            "one byte flipped in a layer",
            Box::new(move |e| {
                let l = e.iter_mut().find(|x| x.0 == layer_for_flip).expect("layer");
                l.2[600] ^= 1;
            }),
            ImageProblem::BlobDigestMismatch(signed.diff_ids[0].to_hex()),
        ),
        (
            "a swapped config (named by its own digest)",
            Box::new(move |e| {
                let other =
                    br#"{"rootfs":{"type":"layers","diff_ids":[]},"config":{"Cmd":["/evil"]}}"#;
                let d = Digest::of(other);
                e.push((blob_path(&d), tar::EntryType::Regular, other.to_vec()));
                edit_json(e, "manifest.json", |v| {
                    v[0]["Config"] = blob_path(&d).into();
                });
                let _ = &config_for_swap;
            }),
            ImageProblem::NotTheSignedImage("config".into()),
        ),
        (
            "an extra tag in manifest.json",
            Box::new(|e| {
                edit_json(e, "manifest.json", |v| {
                    v[0]["RepoTags"] = serde_json::json!(["library/nginx:latest"]);
                })
            }),
            ImageProblem::Tagged,
        ),
        (
            "a ref-name annotation in index.json",
            Box::new(|e| {
                edit_json(e, "index.json", |v| {
                    v["manifests"][0]["annotations"] =
                        serde_json::json!({"org.opencontainers.image.ref.name": "latest"});
                })
            }),
            ImageProblem::Tagged,
        ),
        (
            "a legacy repositories file",
            Box::new(|e| {
                e.push((
                    "repositories".into(),
                    tar::EntryType::Regular,
                    br#"{"x":{"1":"abc"}}"#.to_vec(),
                ))
            }),
            ImageProblem::LegacyFormat,
        ),
        (
            "a symlink",
            Box::new(|e| e.push(("oci-link".into(), tar::EntryType::Symlink, vec![]))),
            ImageProblem::UnexpectedEntry("oci-link".into()),
        ),
        (
            "a duplicate manifest.json (a later one would win)",
            Box::new(|e| {
                let dup = e
                    .iter()
                    .find(|x| x.0 == "manifest.json")
                    .expect("m")
                    .clone();
                e.push(dup);
            }),
            ImageProblem::UnexpectedEntry("manifest.json".into()),
        ),
        (
            "a missing layer",
            Box::new(move |e| e.retain(|x| x.0 != layer_for_drop)),
            ImageProblem::BadMetadata(format!("layer {}", signed.diff_ids[0].short())),
        ),
        (
            "layers in another order",
            Box::new(|e| {
                edit_json(e, "manifest.json", |v| {
                    let layers = v[0]["Layers"].as_array_mut().expect("layers");
                    layers.reverse();
                })
            }),
            ImageProblem::NotTheSignedImage("layers".into()),
        ),
        (
            "a blob outside blobs/sha256",
            Box::new(|e| e.push(("etc/passwd".into(), tar::EntryType::Regular, b"x".to_vec()))),
            ImageProblem::UnexpectedEntry("etc/passwd".into()),
        ),
        (
            "no oci-layout",
            Box::new(|e| e.retain(|x| x.0 != "oci-layout")),
            ImageProblem::BadMetadata("oci-layout".into()),
        ),
    ];
    for (what, attack, want) in attacks {
        let mut e = entries(&bytes);
        attack(&mut e);
        let got = image::verify(write(&e).as_slice(), &signed);
        assert_eq!(got, Err(want), "{what}");
    }
}

#[test]
fn not_a_tar_and_truncated_are_refused() {
    let (bytes, signed) = sample();
    assert_eq!(
        image::verify(&bytes[..bytes.len() / 2], &signed),
        Err(ImageProblem::NotATar)
    );
    assert_eq!(
        image::verify(&b"\x1f\x8b not a tar at all"[..], &signed),
        Err(ImageProblem::NotATar)
    );
}

#[test]
fn another_signed_image_is_refused() {
    let (bytes, mut signed) = sample();
    signed.manifest_digest = Digest([7; 32]);
    assert_eq!(
        image::verify(bytes.as_slice(), &signed),
        Err(ImageProblem::NotTheSignedImage("manifest".into()))
    );
}

#[test]
fn a_config_that_does_not_name_the_layers_is_not_written() {
    let l1 = layer("a", b"1");
    let parts = ImageParts {
        config: config(&[]),
        layers: vec![l1],
    };
    assert!(matches!(
        image::write_canonical(&parts),
        Err(ImageProblem::NotTheSignedImage(_))
    ));
}

/// Registry references must name a registry host and an image by digest; tags and odd characters are refused.
#[test]
fn registry_references_are_digests_on_a_named_registry() {
    let d = "a".repeat(64);
    let cases: Vec<(String, bool)> = vec![
        (format!("registry.example.com/team/web@sha256:{d}"), true),
        (format!("127.0.0.1:5000/flotilla-test/web@sha256:{d}"), true),
        (format!("localhost/web@sha256:{d}"), true),
        // A tag can be moved after signing.
        ("registry.example.com/web:1.0".into(), false),
        // Docker Hub shorthand: the first component is not a registry host.
        (format!("library/web@sha256:{d}"), false),
        (format!("web@sha256:{d}"), false),
        (
            format!("registry.example.com/web@sha256:{}", "A".repeat(64)),
            false,
        ),
        (
            format!("registry.example.com/web@sha256:{}", "a".repeat(63)),
            false,
        ),
        (format!("registry.example.com/Web@sha256:{d}"), false),
        (format!("registry.example.com//web@sha256:{d}"), false),
        (format!("registry.example.com/web;rm@sha256:{d}"), false),
        (format!("{}/web@sha256:{d}", "r.".repeat(300)), false),
    ];
    for (r, ok) in cases {
        assert_eq!(image::check_registry_ref(&r).is_ok(), ok, "{r}");
    }
}
