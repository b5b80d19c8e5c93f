#!/usr/bin/env bash
# Writes edge-agent/link-order/x86_64-unknown-linux-gnu{,.precompiled-only}.txt, the order in which the linker lays
# out each release agent's code (edge-agent/build.rs): every function the agent runs, in the order it first runs
# it, while it starts for the first time and enrolls, connects, reports and idles; starts again from its database;
# and then starts a precompiled WASM workload. That code then shares a few hundred pages at the start of .text
# instead of touching nearly every 64 KiB of it (the kernel maps 64 KiB around each page fault), which is most of
# an idle agent's RSS. Each idle window (IDLE_SECONDS, default 65) outlasts the agent's longest timer of its own
# (image garbage collection and the database checkpoint, once a minute; reports, pings and metrics run on short
# intervals here), so that an agent idling for hours runs no code the order lacks. The traces run under valgrind's
# lackey, which sees every block of code the agent runs. Then, as root, a native run refines each file (see
# "native pass" below): code that valgrind's CPU does not reach (the SHA-NI, VAES and AVX2 paths chosen at run
# time) and the named read-only data the agent reads.
#
# Run it after a dependency or toolchain change (scripts/test-targets.sh reports how much of the file still
# applies). Needs valgrind (Debian `valgrind`) and, for the native pass, root; builds the release agents (two
# links each) and the debug hub.
#   scripts/gen-agent-link-order.sh [--native-only] [--variant precompiled|full] [IDLE_SECONDS]
# --native-only skips the traces and refines the files as they are (run it again after a first full run: each
# native pass sees the layout the previous one made); --variant does one agent only.
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=65 NATIVE_ONLY=0 VARIANTS="precompiled full"
while [ $# -gt 0 ]; do
  case "$1" in
    --native-only) NATIVE_ONLY=1 ;;
    --variant) VARIANTS="$2"; shift ;;
    *) IDLE="$1" ;;
  esac
  shift
done
OUT=edge-agent/link-order/x86_64-unknown-linux-gnu
[ "$NATIVE_ONLY" = 1 ] || command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
T=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$T"' EXIT

# As under systemd: with RUST_BACKTRACE set, every error would capture a backtrace and trace the unwinder.
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
cargo build -q -p flotilla-hub --bin flotilla
HUB=target/debug/flotilla
"$HUB" init --data-dir "$T/hub" >/dev/null
"$HUB" serve --data-dir "$T/hub" --http 127.0.0.1:0 --mqtt 127.0.0.1:0 --mqtt-tls 127.0.0.1:0 >/dev/null 2>"$T/hub.log" &
for _ in $(seq 100); do [ -f "$T/hub/endpoints.txt" ] && break; sleep 0.1; done
API=$(sed -n 's/^http=//p' "$T/hub/endpoints.txt"); MQTT=$(sed -n 's/^mqtt=//p' "$T/hub/endpoints.txt")
export FLOTILLA_SERVER="$API" FLOTILLA_TOKEN_FILE="$T/hub/admin.token"
for _ in $(seq 100); do "$HUB" device ls >/dev/null 2>&1 && break; sleep 0.1; done
for variant in $VARIANTS; do
  "$HUB" release push firmware-images/wasm/sensor.wasm --name "sensor-$variant" --version 1.0.0 \
    --key "$T/hub/keys/release.key" --precompile x86_64 >/dev/null
done

wait_for() { # pattern file: the agent's log line that ends a phase
  for _ in $(seq 1200); do grep -q "$1" "$2" && return 0; sleep 0.1; done
  echo "timed out waiting for '$1' in $2" >&2; tail -5 "$2" >&2; exit 1
}
config() { # id variant: a fresh device (state dir, enrollment token) for one agent
  mkdir -p "$T/$1"
  cat > "$T/$1/agent.toml" <<CFG
version = 1
device_id = "$1"
data_dir = "$T/$1/state"
broker = "$MQTT"
enroll_token = "$("$HUB" enroll-token create --region eu-west --label "order=$2")"
region = "eu-west"
[position]
lat = 52.5
lon = 13.4
# Short intervals, so that the idle window sees the periodic work too (reports, pings, metrics).
[limits]
keepalive_secs = 5
report_interval_secs = 3
[telemetry]
metrics_interval_secs = 3
CFG
}
# The traces (skipped with --native-only).
for variant in $VARIANTS; do
  [ "$NATIVE_ONLY" = 1 ] && break
  features=(); [ "$variant" = precompiled ] && features=(--no-default-features)
  # The same build as the one that ships (the order file in place, so only the link changes), plus a link map.
  FLOTILLA_LINK_MAP="$T/$variant.map" cargo build -q --release -p flotilla-agent --bin flotilla-agent "${features[@]}"
  cp target/release/flotilla-agent "$T/$variant"
  id="order-$variant"
  config "$id" "$variant"
  for round in 1 2; do
    # lackey prints "SB <address>" for every superblock the program runs; only the first sighting of each is kept.
    valgrind --tool=lackey --trace-superblocks=yes --log-fd=9 "$T/$variant" --config "$T/$id/agent.toml" \
      9> >(awk '$1 == "SB" && !seen[$2]++ { print $2 }' > "$T/$id.sb$round") 2>"$T/$id.log$round" &
    pid=$!
    wait_for '"connected"' "$T/$id.log$round"
    # Where the executable is mapped: the addresses above are the process's, the link map's are the file's.
    awk -v bin="$T/$variant" '$6 == bin && $3 == "00000000" { print $1; exit }' "/proc/$pid/maps" | cut -d- -f1 \
      > "$T/$id.base$round"
    sleep "$IDLE"
    if [ "$round" = 2 ]; then
      printf 'name = "%s"\n[target]\nselector = { order = "%s" }\n[[workloads]]\nname = "sensor-%s"\nrelease = "sensor-%s@1.0.0"\ntick_ms = 1000\nmemory_mib = 1\ncpu_ms = 200\n' \
        "$id" "$variant" "$variant" "$variant" > "$T/$id.toml"
      "$HUB" apply -f "$T/$id.toml" >/dev/null
      wait_for '"message":"running"' "$T/$id.log$round"
      sleep "$IDLE"
    fi
    kill -TERM "$pid"; wait "$pid" || true
  done
done

if [ "$NATIVE_ONLY" = 0 ]; then
  for variant in $VARIANTS; do
    suffix=""; [ "$variant" = precompiled ] && suffix=.precompiled-only
    python3 scripts/link_order.py trace "$T/$variant.map" "$OUT$suffix.txt" \
      "$T/order-$variant.base1" "$T/order-$variant.sb1" "$T/order-$variant.base2" "$T/order-$variant.sb2"
  done
fi

# Native pass. With read-ahead off on the disk under $T and the binary evicted from the page cache, a page fault
# reads and maps exactly the page it needs (the kernel's fault-around maps only pages already cached), so
# /proc/PID/pagemap then lists exactly the pages of the executable the agent touched while it started (fresh and
# again from its database) and idled. The order is then sorted by that: first what it has on touched pages (in its
# order), then the symbols on touched pages that it lacks (code valgrind's CPU does not reach, such as the SHA-NI,
# VAES and AVX2 paths chosen at run time; then named read-only data: anonymous constants and strings have no
# symbol to order by), and last what is on untouched pages (code only a workload runs, or that ran only under
# valgrind). Page-sized, so each pass keeps some neighbours of what ran; the next pass, on the layout this one
# made, drops those on pages that are no longer touched.
src=$(findmnt -no SOURCE --target "$T" || true)
disk=$(lsblk -no PKNAME "$src" 2>/dev/null || true); disk=${disk:-$(basename "$src")}
ra=/sys/block/$disk/queue/read_ahead_kb
if [ "$(id -u)" != 0 ] || [ ! -w "$ra" ]; then
  echo "native pass skipped: needs root and a writable $ra"
  echo "rebuild the release agents to link with the new order"
  exit 0
fi
saved_ra=$(cat "$ra")
trap 'echo "$saved_ra" > "$ra"; kill $(jobs -p) 2>/dev/null || true; rm -rf "$T"' EXIT
for variant in $VARIANTS; do
  features=(); suffix=""; [ "$variant" = precompiled ] && features=(--no-default-features) && suffix=.precompiled-only
  FLOTILLA_LINK_MAP="$T/$variant.native.map" cargo build -q --release -p flotilla-agent --bin flotilla-agent "${features[@]}"
  cp target/release/flotilla-agent "$T/$variant.native"
  for round in 1 2; do
    [ "$round" = 1 ] && config "native-$variant" "$variant"
    echo 0 > "$ra"
    # Written back first: the kernel cannot drop the dirty pages of a file just copied, and their neighbours would
    # then be mapped around every fault.
    python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' \
      "$T/$variant.native"
    "$T/$variant.native" --config "$T/native-$variant/agent.toml" 2>"$T/native-$variant.log$round" &
    pid=$!
    wait_for '"connected"' "$T/native-$variant.log$round"
    sleep "$IDLE"
    python3 scripts/link_order.py pages "$pid" "$T/$variant.native" > "$T/native-$variant.pages$round"
    kill -TERM "$pid"; wait "$pid" || true
  done
  python3 scripts/link_order.py native "$T/$variant.native" "$T/$variant.native.map" "$OUT$suffix.txt" \
    "$T"/native-"$variant".pages*
done
echo "rebuild the release agents to link with the new order"
