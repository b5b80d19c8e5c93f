//! Flotilla's shared protocol: validated ids, wire types, the MQTT topic scheme, the versioned envelope codec and
//! the two-key trust model. Both hub and agent depend on this crate and on nothing of each other.

pub mod codec;
pub mod geo;
pub mod ids;
pub mod image;
pub mod seal;
pub mod topics;
pub mod trust;
pub mod wire;

pub use ids::{DeviceId, Digest, IdError, Label, WorkloadName};
