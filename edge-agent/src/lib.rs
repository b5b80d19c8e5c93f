//! The Flotilla edge agent: configuration, SQLite state, MQTT link, workload runtimes and the main loop.

pub mod agent;
pub mod config;
pub mod runtime;
pub mod store;
