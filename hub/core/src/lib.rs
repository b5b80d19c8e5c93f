//! Sans-IO core of the Flotilla hub: geo-aware placement and the rollout state machine. No tokio, SQLite,
//! MQTT or clock in here; callers pass `now`.

pub mod placement;
pub mod rollout;

pub use placement::{Constraints, DeviceView, Excluded, Placement, Policy, Target, place};
