//! Reading and writing key files and signed documents on disk; private keys are created with mode 0600.

use anyhow::{Context, Result};
use flotilla_shared::codec::decode_exact;
use flotilla_shared::trust::SigningKey;
use flotilla_shared::wire::{PublicKey, Signed};
use std::io::Write;
use std::path::Path;

/// Writes `text` to a new file readable only by its owner. Refuses to overwrite an existing key.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating private key file {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Generates a key pair and writes `<stem>.key` (0600) and `<stem>.pub`.
pub fn generate(stem: &Path) -> Result<(SigningKey, std::path::PathBuf, std::path::PathBuf)> {
    let key = SigningKey::generate();
    let secret = stem.with_extension("key");
    let public = stem.with_extension("pub");
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_private(&secret, &key.to_file_text())?;
    std::fs::write(&public, key.public().to_file_text())
        .with_context(|| format!("writing {}", public.display()))?;
    Ok((key, secret, public))
}

pub fn read_signing_key(path: &Path) -> Result<SigningKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading key {}", path.display()))?;
    SigningKey::from_file_text(&text).with_context(|| format!("parsing key {}", path.display()))
}

pub fn read_public_key(path: &Path) -> Result<PublicKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading public key {}", path.display()))?;
    // Accept either a public key file or a private key file (whose public half is derived).
    PublicKey::from_file_text(&text)
        .or_else(|_| SigningKey::from_file_text(&text).map(|k| k.public()))
        .with_context(|| format!("parsing public key {}", path.display()))
}

pub fn read_signed(path: &Path) -> Result<Signed> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode_exact(&bytes).with_context(|| format!("decoding signed document {}", path.display()))
}

pub fn write_signed(path: &Path, signed: &Signed) -> Result<()> {
    let bytes = postcard::to_stdvec(signed).context("encoding signed document")?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}
