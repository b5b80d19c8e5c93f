//! The Flotilla edge agent: configuration, SQLite state, MQTT link, workload runtimes and the main loop
//! (`agent`), with each of the loop's concerns in its own module.

pub mod agent;
pub mod config;
pub mod credentials;
pub mod desired;
pub mod disk;
pub mod enroll;
pub mod fetch;
pub mod firmware;
pub mod gc;
pub mod holds;
pub mod inventory;
pub mod metrics;
pub mod notify;
pub mod outbox;
pub mod rauc;
pub mod report;
pub mod runtime;
pub mod secrets;
pub mod staging;
pub mod store;
pub mod system;
pub mod trust;
pub mod variant;
