//! The Flotilla hub: fleet registry, placement, signed desired state over MQTT, and the operator CLI.

pub mod api;
pub mod broker;
pub mod client;
pub mod demo;
pub mod hub;
pub mod keyfile;
pub mod keys_cli;
pub mod server;
pub mod spec;
pub mod store;
