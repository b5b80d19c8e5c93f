//! Sealed secrets: a value encrypted to one X25519 public key so that only the holder of the matching secret key
//! can open it (libsodium's sealed box: an ephemeral X25519 key, XSalsa20-Poly1305; through `crypto_box`, not our
//! own construction). The hub seals each workload secret to each placed device's sealing key and keeps its own
//! copy sealed to a hub key; the agent opens a secret only in memory, when it starts the workload.

/// Largest secret value accepted (the sealed form travels inside the 16 KiB desired state).
pub const MAX_SECRET_BYTES: usize = 4096;

/// Why a sealed value could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    #[error("the sealed value does not open with this key (sealed to another key, or altered)")]
    Open,
    #[error("the sealing key is not 32 bytes")]
    KeyLength,
}

/// An X25519 key pair that opens values sealed to its public key.
#[derive(Clone)]
pub struct SealingKey(crypto_box::SecretKey);

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret key itself.
        write!(f, "SealingKey(public {})", hex::encode(self.public()))
    }
}

impl SealingKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        Self(crypto_box::SecretKey::generate(&mut rand_core::OsRng))
    }

    /// The key from its 32 stored bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| SealError::KeyLength)?;
        Ok(Self(crypto_box::SecretKey::from(bytes)))
    }

    /// The 32 secret bytes, for storage in a private file or database.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public key others seal to.
    pub fn public(&self) -> [u8; 32] {
        *self.0.public_key().as_bytes()
    }

    /// Opens a value sealed to this key.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        self.0.unseal(sealed).map_err(|_| SealError::Open)
    }
}

/// Seals `plaintext` to `public` (48 bytes longer than the plaintext).
pub fn seal(public: &[u8; 32], plaintext: &[u8]) -> Vec<u8> {
    let pk = crypto_box::PublicKey::from(*public);
    // Sealing only fails if the random source does; the OS source does not on a running system, and an empty
    // result never opens, so it is refused downstream rather than panicking here.
    pk.seal(&mut rand_core::OsRng, plaintext)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value sealed to one key opens with that key only, and not once altered.
    #[test]
    fn only_the_recipient_opens() {
        let a = SealingKey::generate();
        let b = SealingKey::generate();
        let sealed = seal(&a.public(), b"db-password-123");
        assert_eq!(sealed.len(), 15 + 48);
        assert_eq!(a.open(&sealed).as_deref(), Ok(&b"db-password-123"[..]));
        assert_eq!(b.open(&sealed), Err(SealError::Open));
        let mut altered = sealed.clone();
        altered[40] ^= 1;
        assert_eq!(a.open(&altered), Err(SealError::Open));
        assert_eq!(a.open(&[]), Err(SealError::Open));
        let again = SealingKey::from_bytes(&a.to_bytes()).expect("32 bytes");
        assert_eq!(again.public(), a.public());
        assert_eq!(
            SealingKey::from_bytes(&[1; 31]).err(),
            Some(SealError::KeyLength)
        );
        assert!(!format!("{a:?}").contains(&hex::encode(a.to_bytes())));
    }
}
