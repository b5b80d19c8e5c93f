#!/usr/bin/env bash
# The test command: builds the binaries the fleet harness starts, then runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
# The fleet tests also run against a real Mosquitto, container tests build their images from Debian's
# busybox-static (no registry is reachable) and pull from a loopback docker-registry they start; install all three
# on a fresh Debian machine. One container test mounts a small tmpfs (a disk that fills up): run as root.
# The telemetry feed test reads the JSON feed with mosquitto_sub (mosquitto-clients) and checks it against the
# schema with Python's jsonschema.
if ! command -v mosquitto >/dev/null 2>&1 || ! command -v mosquitto_sub >/dev/null 2>&1 || [ ! -x /bin/busybox ] \
  || ! command -v docker-registry >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients \
      busybox-static docker-registry >/dev/null
  else
    echo "a test dependency is missing: sudo apt-get install -y mosquitto mosquitto-clients busybox-static docker-registry" >&2
    exit 1
  fi
fi
if ! python3 -c 'import jsonschema' 2>/dev/null; then
  python3 -m pip install -q 'jsonschema>=4.18'
fi
# Container tests drive the local Docker engine.
if ! docker version >/dev/null 2>&1; then
  echo "the Docker engine is not reachable (container tests need it): install docker.io and start it" >&2
  exit 1
fi
cargo build --workspace --bins
cargo nextest run --workspace --profile ci
