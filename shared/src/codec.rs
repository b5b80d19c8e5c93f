//! The versioned envelope around every MQTT payload: `[magic, version, kind] ++ postcard(body)`, with hard size caps.
//!
//! Decoding is total: any byte string gives a [`Message`] or a [`DecodeError`], never a panic. The size cap is
//! checked against the kind's own limit *before* the body is parsed, so an oversized payload costs nothing.

use crate::wire::{
    ArtifactChunk, ArtifactRequest, CredentialRequest, CredentialResponse, EnrollRequest,
    EnrollResponse, LogsRequest, LogsResponse, Presence, RootUpdate, Signed, TelemetryRecord,
};
use serde::{Serialize, de::DeserializeOwned};

/// First byte of every envelope; lets a consumer tell Flotilla payloads from anything else on a shared broker.
pub const MAGIC: u8 = 0xF1;
/// Bumped on any change to a wire type.
pub const PROTOCOL_VERSION: u8 = 8;
/// Largest envelope of any kind. MQTT clients set their max packet size just above this.
pub const MAX_ENVELOPE: usize = 80 * 1024;
/// Largest artifact chunk payload; leaves room for the chunk header inside [`MAX_ENVELOPE`].
pub const MAX_CHUNK_DATA: usize = 64 * 1024;

/// Every message kind that crosses MQTT.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Hub -> agent, retained: a signed [`crate::wire::DesiredState`].
    DesiredState(Signed),
    /// Hub -> agent, retained: root rotations.
    RootUpdate(RootUpdate),
    /// Agent -> hub: a device-signed [`crate::wire::Report`].
    Report(Signed),
    Presence(Presence),
    ArtifactRequest(ArtifactRequest),
    ArtifactChunk(ArtifactChunk),
    Telemetry(Vec<TelemetryRecord>),
    /// Boxed: the inventory it carries makes it several times larger than every other message.
    EnrollRequest(Box<EnrollRequest>),
    EnrollResponse(EnrollResponse),
    /// Agent -> hub: a CSR for renewed or rotated credentials.
    CredentialRequest(CredentialRequest),
    /// Hub -> agent: new credentials, or a request to rotate.
    CredentialResponse(CredentialResponse),
    LogsRequest(LogsRequest),
    LogsResponse(LogsResponse),
}

/// The one-byte kind tag and its size cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    DesiredState = 1,
    RootUpdate = 2,
    Report = 3,
    Presence = 4,
    ArtifactRequest = 5,
    ArtifactChunk = 6,
    Telemetry = 7,
    EnrollRequest = 8,
    EnrollResponse = 9,
    CredentialRequest = 10,
    CredentialResponse = 11,
    LogsRequest = 12,
    LogsResponse = 13,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::DesiredState,
            2 => Self::RootUpdate,
            3 => Self::Report,
            4 => Self::Presence,
            5 => Self::ArtifactRequest,
            6 => Self::ArtifactChunk,
            7 => Self::Telemetry,
            8 => Self::EnrollRequest,
            9 => Self::EnrollResponse,
            10 => Self::CredentialRequest,
            11 => Self::CredentialResponse,
            12 => Self::LogsRequest,
            13 => Self::LogsResponse,
            _ => return None,
        })
    }

    /// Hard cap on the whole envelope for this kind, in bytes.
    pub fn cap(self) -> usize {
        match self {
            Self::DesiredState => 16 * 1024,
            Self::RootUpdate => 32 * 1024,
            Self::Report => 32 * 1024,
            Self::Presence => 256,
            Self::ArtifactRequest => 256,
            Self::ArtifactChunk => MAX_ENVELOPE,
            Self::Telemetry => 64 * 1024,
            Self::EnrollRequest => 8 * 1024,
            Self::EnrollResponse => 16 * 1024,
            Self::CredentialRequest => 4 * 1024,
            Self::CredentialResponse => 8 * 1024,
            Self::LogsRequest => 256,
            Self::LogsResponse => crate::wire::LOGS_MAX_BYTES + 1024,
        }
    }
}

impl Message {
    /// The kind tag of this message.
    pub fn kind(&self) -> Kind {
        match self {
            Self::DesiredState(_) => Kind::DesiredState,
            Self::RootUpdate(_) => Kind::RootUpdate,
            Self::Report(_) => Kind::Report,
            Self::Presence(_) => Kind::Presence,
            Self::ArtifactRequest(_) => Kind::ArtifactRequest,
            Self::ArtifactChunk(_) => Kind::ArtifactChunk,
            Self::Telemetry(_) => Kind::Telemetry,
            Self::EnrollRequest(_) => Kind::EnrollRequest,
            Self::EnrollResponse(_) => Kind::EnrollResponse,
            Self::CredentialRequest(_) => Kind::CredentialRequest,
            Self::CredentialResponse(_) => Kind::CredentialResponse,
            Self::LogsRequest(_) => Kind::LogsRequest,
            Self::LogsResponse(_) => Kind::LogsResponse,
        }
    }
}

/// Why a byte string is not a valid envelope or document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("truncated: {len} bytes is shorter than the 3-byte header")]
    Truncated { len: usize },
    #[error("{len} bytes exceeds the {cap}-byte cap")]
    TooLarge { len: usize, cap: usize },
    #[error("not a Flotilla payload (magic byte {0:#04x})")]
    BadMagic(u8),
    #[error("unsupported protocol version {got} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { got: u8 },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("invalid body: {0}")]
    Body(String),
    #[error("{0} trailing bytes after the body")]
    TrailingBytes(usize),
}

/// Why a message could not be encoded (only oversize; postcard itself cannot fail on these types).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("encoded {kind:?} is {len} bytes, over its {cap}-byte cap")]
    TooLarge { kind: Kind, len: usize, cap: usize },
    #[error("serialisation failed: {0}")]
    Serialize(String),
}

fn body_bytes<T: Serialize>(v: &T) -> Result<Vec<u8>, EncodeError> {
    postcard::to_stdvec(v).map_err(|e| EncodeError::Serialize(e.to_string()))
}

/// Encodes a message into an envelope, refusing to produce anything the receiver would reject as oversized.
pub fn encode(msg: &Message) -> Result<Vec<u8>, EncodeError> {
    let kind = msg.kind();
    let body = match msg {
        Message::DesiredState(s) | Message::Report(s) => body_bytes(s)?,
        Message::RootUpdate(v) => body_bytes(v)?,
        Message::Presence(v) => body_bytes(v)?,
        Message::ArtifactRequest(v) => body_bytes(v)?,
        Message::ArtifactChunk(v) => body_bytes(v)?,
        Message::Telemetry(v) => body_bytes(v)?,
        Message::EnrollRequest(v) => body_bytes(v)?,
        Message::EnrollResponse(v) => body_bytes(v)?,
        Message::CredentialRequest(v) => body_bytes(v)?,
        Message::CredentialResponse(v) => body_bytes(v)?,
        Message::LogsRequest(v) => body_bytes(v)?,
        Message::LogsResponse(v) => body_bytes(v)?,
    };
    let mut out = Vec::with_capacity(3 + body.len());
    out.extend_from_slice(&[MAGIC, PROTOCOL_VERSION, kind as u8]);
    out.extend_from_slice(&body);
    if out.len() > kind.cap() {
        return Err(EncodeError::TooLarge {
            kind,
            len: out.len(),
            cap: kind.cap(),
        });
    }
    Ok(out)
}

/// Decodes a postcard value that must use every byte of `bytes` (no trailing garbage accepted).
pub fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) =
        postcard::take_from_bytes::<T>(bytes).map_err(|e| DecodeError::Body(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

/// Decodes an envelope. Total: never panics, whatever the input.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    if bytes.len() > MAX_ENVELOPE {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            cap: MAX_ENVELOPE,
        });
    }
    let [magic, version, kind, body @ ..] = bytes else {
        return Err(DecodeError::Truncated { len: bytes.len() });
    };
    if *magic != MAGIC {
        return Err(DecodeError::BadMagic(*magic));
    }
    if *version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion { got: *version });
    }
    let kind = Kind::from_u8(*kind).ok_or(DecodeError::UnknownKind(*kind))?;
    if bytes.len() > kind.cap() {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            cap: kind.cap(),
        });
    }
    Ok(match kind {
        Kind::DesiredState => Message::DesiredState(decode_exact(body)?),
        Kind::RootUpdate => Message::RootUpdate(decode_exact(body)?),
        Kind::Report => Message::Report(decode_exact(body)?),
        Kind::Presence => Message::Presence(decode_exact(body)?),
        Kind::ArtifactRequest => Message::ArtifactRequest(decode_exact(body)?),
        Kind::ArtifactChunk => Message::ArtifactChunk(decode_exact(body)?),
        Kind::Telemetry => Message::Telemetry(decode_exact(body)?),
        Kind::EnrollRequest => Message::EnrollRequest(Box::new(decode_exact(body)?)),
        Kind::EnrollResponse => Message::EnrollResponse(decode_exact(body)?),
        Kind::CredentialRequest => Message::CredentialRequest(decode_exact(body)?),
        Kind::CredentialResponse => Message::CredentialResponse(decode_exact(body)?),
        Kind::LogsRequest => Message::LogsRequest(decode_exact(body)?),
        Kind::LogsResponse => Message::LogsResponse(decode_exact(body)?),
    })
}
