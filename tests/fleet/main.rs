//! Fleet scenarios: real hub, real broker, real agents on loopback. One test binary (house style).

mod access;
mod cli;
mod console;
mod container_updates;
mod containers;
mod correctness;
mod crash;
mod e2e;
mod firmware;
mod lifecycle;
mod mosquitto;
mod offline;
mod packaging;
mod partition;
mod prometheus;
mod rauc;
mod rollout;
mod secrets;
mod selfupdate;
mod sparkplug;
mod storm;
mod targets;
mod telemetry;
mod trust;
