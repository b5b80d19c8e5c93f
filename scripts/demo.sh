#!/usr/bin/env bash
# The main job: builds the hub and agent, then runs `flotilla demo` (a hub with the embedded broker, six real
# agents across three regions, a signed WASM workload, a geo-aware deployment, a live convergence table).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --bins
exec ./target/debug/flotilla demo "$@"
