//! The Flotilla hub: fleet registry, placement, signed desired state over MQTT, and the operator CLI.

pub mod access;
pub mod admission;
pub mod api;
pub mod artifacts;
#[macro_use]
pub mod cli;
pub mod client;
pub mod console;
pub mod demo;
pub mod deploy;
pub mod embedded;
pub mod fleet;
pub mod hub;
pub mod image_import;
pub mod keyfile;
pub mod keys_cli;
pub mod mosquitto;
pub mod pki;
pub mod rollout;
pub mod server;
pub mod slis;
pub mod spec;
pub mod spec_container;
pub mod store;
pub mod telemetry;
