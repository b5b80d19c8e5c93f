#!/usr/bin/env bash
# Writes edge-agent/link-order/x86_64-unknown-linux-gnu{,.precompiled-only}.txt, the order in which the linker lays
# out each release agent's code (edge-agent/build.rs): every function the agent runs, in the order it first runs
# it, while it starts for the first time and enrolls, connects, reports and idles; starts again from its database;
# and then starts a precompiled WASM workload. That code then shares a few hundred pages at the start of .text
# instead of touching nearly every 64 KiB of it (the kernel maps 64 KiB around each page fault), which is most of
# an idle agent's RSS. The traces run under valgrind's lackey, which sees every block of code the agent runs.
#
# Run it after a dependency or toolchain change (scripts/test-targets.sh reports how much of the file still
# applies). Needs valgrind (Debian `valgrind`); builds the release agents and the debug hub.
#   scripts/gen-agent-link-order.sh [IDLE_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE="${1:-10}"
OUT=edge-agent/link-order/x86_64-unknown-linux-gnu
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
T=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$T"' EXIT

cargo build -q -p flotilla-hub --bin flotilla
HUB=target/debug/flotilla
for variant in precompiled full; do
  features=(); [ "$variant" = precompiled ] && features=(--no-default-features)
  # The same build as the one that ships (the order file in place, so only the link changes), plus a link map.
  FLOTILLA_LINK_MAP="$T/$variant.map" cargo build -q --release -p flotilla-agent --bin flotilla-agent "${features[@]}"
  cp target/release/flotilla-agent "$T/$variant"
done
"$HUB" init --data-dir "$T/hub" >/dev/null
"$HUB" serve --data-dir "$T/hub" --http 127.0.0.1:0 --mqtt 127.0.0.1:0 --mqtt-tls 127.0.0.1:0 >/dev/null 2>"$T/hub.log" &
for _ in $(seq 100); do [ -f "$T/hub/endpoints.txt" ] && break; sleep 0.1; done
API=$(sed -n 's/^http=//p' "$T/hub/endpoints.txt"); MQTT=$(sed -n 's/^mqtt=//p' "$T/hub/endpoints.txt")
export FLOTILLA_SERVER="$API" FLOTILLA_TOKEN_FILE="$T/hub/admin.token"
for _ in $(seq 100); do "$HUB" device ls >/dev/null 2>&1 && break; sleep 0.1; done
for variant in precompiled full; do
  "$HUB" release push firmware-images/wasm/sensor.wasm --name "sensor-$variant" --version 1.0.0 \
    --key "$T/hub/keys/release.key" --precompile x86_64 >/dev/null
done

wait_for() { # pattern file: the agent's log line that ends a phase
  for _ in $(seq 1200); do grep -q "$1" "$2" && return 0; sleep 0.1; done
  echo "timed out waiting for '$1' in $2" >&2; tail -5 "$2" >&2; exit 1
}
for variant in precompiled full; do
  id="order-$variant"
  mkdir -p "$T/$id"
  cat > "$T/$id/agent.toml" <<CFG
version = 1
device_id = "$id"
data_dir = "$T/$id/state"
broker = "$MQTT"
enroll_token = "$("$HUB" enroll-token create --region eu-west --label "order=$variant")"
region = "eu-west"
[position]
lat = 52.5
lon = 13.4
CFG
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

python3 - "$T" "$OUT" <<'PY'
"""Map the traced addresses to the link map's input sections and write the first symbol of each, in order."""
import bisect, re, sys
tmp, out = sys.argv[1], sys.argv[2]
for variant, suffix in (("precompiled", ".precompiled-only"), ("full", "")):
    order, seen = [], set()
    # LLD map lines: VMA LMA Size Align, then an output section, an input section "file:(.text.name)", or a symbol.
    sections = []  # [start, end, first symbol]
    current = None
    for line in open(f"{tmp}/{variant}.map"):
        m = re.match(r"\s*([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+\d+\s+(.*)$", line)
        if not m:
            continue
        vma, size, rest = int(m.group(1), 16), int(m.group(2), 16), m.group(3).strip()
        if ":(" in rest:
            current = [vma, vma + size, None] if rest.split(":(", 1)[1].startswith(".text") else None
            if current:
                sections.append(current)
        elif current is not None and current[2] is None and not rest.startswith("."):
            current[2] = rest
    sections = [s for s in sections if s[2]]
    sections.sort()
    starts = [s[0] for s in sections]
    for round_ in (1, 2):
        base = int(open(f"{tmp}/order-{variant}.base{round_}").read().strip(), 16)
        for line in open(f"{tmp}/order-{variant}.sb{round_}"):
            addr = int(line, 16) - base
            i = bisect.bisect_right(starts, addr) - 1
            if i >= 0 and addr < sections[i][1]:
                name = sections[i][2]
                if name not in seen:
                    seen.add(name)
                    order.append(name)
    with open(f"{out}{suffix}.txt", "w") as f:
        f.write("\n".join(order) + "\n")
    print(f"{out}{suffix}.txt: {len(order)} symbols")
PY
echo "rebuild the release agents to link with the new order"
