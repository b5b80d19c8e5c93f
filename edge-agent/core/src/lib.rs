//! Sans-IO core of the Flotilla agent: the reconcile state machine and geofence evaluation. No tokio, SQLite, MQTT
//! or clock in here (enforced by this crate's dependency list); the shell feeds events and executes actions.

pub mod geo;
pub mod reconcile;

pub use reconcile::{Action, DesiredWorkload, Exit, Millis, OpId, Reconciler};
