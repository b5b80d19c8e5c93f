//! Validated identifiers that appear in MQTT topics and signed documents (device ids, names, digests, key ids).

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {max} characters")]
    TooLong { kind: &'static str, max: usize },
    #[error("{kind} {value:?} must start with a lowercase letter or digit")]
    BadStart { kind: &'static str, value: String },
    #[error("{kind} {value:?} contains {ch:?}; allowed are a-z, 0-9, '.', '_' and '-'")]
    BadChar {
        kind: &'static str,
        value: String,
        ch: char,
    },
}

/// Checks the shared identifier grammar `[a-z0-9][a-z0-9._-]{0,max-1}`.
///
/// The grammar excludes every MQTT special character (`#`, `+`, `/`, `$`), so an identifier can be put in a topic
/// level without escaping and can never widen a subscription or an ACL.
fn check_ident(kind: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    let first = s.chars().next().ok_or(IdError::Empty { kind })?;
    if s.len() > max {
        return Err(IdError::TooLong { kind, max });
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(IdError::BadStart {
            kind,
            value: s.to_owned(),
        });
    }
    if let Some(ch) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Err(IdError::BadChar {
            kind,
            value: s.to_owned(),
            ch,
        });
    }
    Ok(())
}

macro_rules! ident_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check_ident($kind, &s, $max)?;
                Ok(Self(s))
            }
            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        /// Maps keyed by the id can be searched with a `&str` (hashes and order agree with `String`'s).
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }
        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
    };
}

ident_type!(
    /// A device id: `[a-z0-9][a-z0-9._-]{0,63}`; also the device's MQTT client id and topic level.
    DeviceId,
    "device id",
    64
);
ident_type!(
    /// A workload name, unique within a device's desired state.
    WorkloadName,
    "workload name",
    64
);
ident_type!(
    /// A region, zone or telemetry stream name; used as a topic level in the telemetry feed.
    Label,
    "label",
    64
);

/// A SHA-256 digest (of an artifact, or of a signed document's body).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Hashes `bytes` with SHA-256.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
    /// Lowercase hex, as used in file names and the API.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Result<Self, hex::FromHexError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)?;
        Ok(Self(out))
    }
    /// The first 12 hex characters, for logs and tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.short())
    }
}
impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device id grammar accepts exactly `[a-z0-9][a-z0-9._-]{0,63}`, so no id can contain an MQTT wildcard.
    #[test]
    fn device_id_grammar() {
        let cases: &[(&str, bool)] = &[
            ("gw-01", true),
            ("0", true),
            ("a.b_c-d", true),
            ("", false),
            ("-gw", false),
            (".gw", false),
            ("Gw", false),
            ("gw/1", false),
            ("gw+", false),
            ("gw#", false),
            ("$sys", false),
            ("gw 1", false),
            ("gé", false),
        ];
        for (input, ok) in cases {
            assert_eq!(DeviceId::new(*input).is_ok(), *ok, "{input:?}");
        }
        assert!(DeviceId::new("a".repeat(64)).is_ok());
        assert_eq!(
            DeviceId::new("a".repeat(65)),
            Err(IdError::TooLong {
                kind: "device id",
                max: 64
            })
        );
    }

    /// Deserialising an id runs the same validation, so a decoded message never carries a bad id.
    #[test]
    fn ids_validate_on_decode() {
        let bytes = postcard::to_stdvec(&"gw/#".to_owned()).expect("encode");
        assert!(postcard::from_bytes::<DeviceId>(&bytes).is_err());
        let bytes = postcard::to_stdvec(&"gw-1".to_owned()).expect("encode");
        assert_eq!(
            postcard::from_bytes::<DeviceId>(&bytes).ok(),
            DeviceId::new("gw-1").ok()
        );
    }
}
