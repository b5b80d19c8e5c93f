//! `flotilla release push|ls`: sign on the operator's side, upload the artifact and its release; list releases.

use super::{Conn, print_json, s};
use crate::keys_cli::{self, ReleaseSign};
use anyhow::Result;

/// Signs the artifact with the operator's release key(s), uploads it, then uploads the signed release.
pub fn push(sign: ReleaseSign, conn: Conn) -> Result<()> {
    let c = conn.client()?;
    let keys_cli::SignedRelease {
        signed,
        release,
        artifact: bytes,
        variants,
    } = keys_cli::sign_release(&sign)?;
    if let Some(out) = &sign.out {
        crate::keyfile::write_signed(out, &signed)?;
    }
    if let Some(image) = &release.image {
        eprintln!("{}", crate::image_import::describe(image));
    }
    eprintln!(
        "uploading {} ({} bytes)...",
        sign.artifact.display(),
        bytes.len()
    );
    c.upload("/api/v1/artifacts", bytes)?;
    // Each precompiled variant is a blob of its own; the hub refuses the release until all are uploaded.
    for (v, bytes) in release.precompiled.iter().zip(variants) {
        eprintln!(
            "uploading the module precompiled for {} ({} bytes)...",
            v.target, v.size
        );
        c.upload("/api/v1/artifacts", bytes)?;
    }
    let body = postcard::to_stdvec(&signed)?;
    let v = c.post("/api/v1/releases", "application/octet-stream", &body, &[])?;
    if conn.json() {
        print_json(&v);
    } else {
        outln!(
            "pushed {}@{} release {}",
            release.name,
            release.version,
            s(&v, "digest")
        );
    }

    Ok(())
}

/// Lists the hub's releases.
pub fn ls(conn: Conn) -> Result<()> {
    let v = conn.client()?.get("/api/v1/releases")?;
    if conn.json() {
        print_json(&v);
    } else {
        outln!(
            "{:<20} {:<12} {:>5} {:>10}  {:<16}  PRECOMPILED",
            "NAME",
            "VERSION",
            "EPOCH",
            "SIZE",
            "DIGEST"
        );
        for r in v.as_array().into_iter().flatten() {
            let d = s(r, "digest");
            let targets: Vec<&str> = r["precompiled"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str())
                .collect();
            outln!(
                "{:<20} {:<12} {:>5} {:>10}  {:<16}  {}",
                s(r, "name"),
                s(r, "version"),
                s(r, "epoch"),
                s(r, "size"),
                &d[..d.len().min(16)],
                if targets.is_empty() {
                    "-".to_owned()
                } else {
                    targets.join(",")
                }
            );
        }
    }

    Ok(())
}
