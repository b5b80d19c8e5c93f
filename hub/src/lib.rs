//! The Flotilla hub: fleet registry, placement, signed desired state over MQTT, and the operator CLI.

pub mod keyfile;
pub mod keys_cli;
