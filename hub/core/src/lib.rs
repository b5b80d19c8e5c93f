//! Sans-IO core of the Flotilla hub: geo-aware placement (and, later, rollout state machines). No tokio, SQLite,
//! MQTT or clock in here; callers pass `now`.

pub mod placement;

pub use placement::{Constraints, DeviceView, Excluded, Placement, Policy, Target, place};
