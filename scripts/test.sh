#!/usr/bin/env bash
# The test command: builds the binaries the fleet harness starts, then runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
# The fleet tests also run against a real Mosquitto, container tests build their images from Debian's
# busybox-static (no registry is reachable) and pull from a loopback docker-registry they start; install all three
# on a fresh Debian machine. One container test mounts a small tmpfs (a disk that fills up): run as root.
# The telemetry feed test reads the JSON feed with mosquitto_sub (mosquitto-clients) and checks it against the
# schema with Python's jsonschema.
# The Prometheus scrape test runs Debian's prometheus (which also brings promtool for the rule tests).
# The console's browser tests drive Debian's chromium through chromium-driver (same source package: versions match).
# The firmware A/B tests use u-boot-tools' fw_printenv/fw_setenv/mkenvimage on a U-Boot environment in files; the
# RAUC test runs Debian's rauc service on a private D-Bus bus (dbus-daemon) and builds bundles (squashfs-tools,
# e2fsprogs, openssl for the test signing keys).
if ! command -v mosquitto >/dev/null 2>&1 || ! command -v mosquitto_sub >/dev/null 2>&1 || [ ! -x /bin/busybox ] \
  || ! command -v docker-registry >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1 \
  || ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 \
  || ! command -v fw_setenv >/dev/null 2>&1 \
  || ! command -v rauc >/dev/null 2>&1 || ! command -v dbus-daemon >/dev/null 2>&1 || ! command -v mksquashfs >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients \
      busybox-static docker-registry prometheus chromium chromium-driver u-boot-tools rauc dbus squashfs-tools e2fsprogs openssl >/dev/null
    # The packages start system services on the ports tests might pick; tests start their own.
    (systemctl stop mosquitto docker-registry prometheus prometheus-node-exporter || true) >/dev/null 2>&1
  else
    echo "a test dependency is missing: sudo apt-get install -y mosquitto mosquitto-clients busybox-static docker-registry prometheus chromium chromium-driver u-boot-tools rauc dbus squashfs-tools e2fsprogs openssl" >&2
    exit 1
  fi
fi
# The Sparkplug test decodes the hub's Sparkplug B feed with pysparkplug (it brings paho-mqtt and protobuf).
if ! python3 -c 'import jsonschema, pysparkplug' 2>/dev/null; then
  python3 -m pip install -q 'jsonschema>=4.18' 'pysparkplug==0.6.1'
fi
# Container tests drive the local Docker engine.
if ! docker version >/dev/null 2>&1; then
  echo "the Docker engine is not reachable (container tests need it): install docker.io and start it" >&2
  exit 1
fi
# The shipped Prometheus rules: syntax, the scrape config, and their unit tests.
(cd deploy/prometheus && promtool check rules flotilla-alerts.yml >/dev/null && promtool check config prometheus.yml >/dev/null \
  && promtool test rules flotilla-alerts.test.yml)
cargo build --workspace --bins
cargo nextest run --workspace --profile ci
# Builds other than the workspace's debug build: release agents against their size budgets, the Debian packages in
# a Debian root, the agent cross-built for ARM under qemu, the precompiled-only agent (scripts/test-targets.sh).
./scripts/test-targets.sh
