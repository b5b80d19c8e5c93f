//! Sans-IO core of the Flotilla agent: the reconcile state machine (geofence evaluation lives in the shared crate, the hub uses it too). No tokio, SQLite, MQTT
//! or clock in here (enforced by this crate's dependency list); the shell feeds events and executes actions.

pub mod boot;
pub mod containers;
pub mod reconcile;

pub use flotilla_shared::geo;
pub use reconcile::{Action, DesiredWorkload, Exit, Millis, OpId, Reconciler};
