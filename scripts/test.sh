#!/usr/bin/env bash
# The test command: builds the binaries the fleet harness starts, then runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
# The fleet tests also run against a real Mosquitto; install it on a fresh Debian machine.
if ! command -v mosquitto >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  else
    echo "mosquitto is missing: sudo apt-get install -y mosquitto" >&2
    exit 1
  fi
fi
cargo build --workspace --bins
cargo nextest run --workspace --profile ci
