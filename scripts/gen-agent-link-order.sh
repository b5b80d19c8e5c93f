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
#   scripts/gen-agent-link-order.sh [IDLE_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE="${1:-65}"
OUT=edge-agent/link-order/x86_64-unknown-linux-gnu
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
T=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$T"' EXIT

# As under systemd: with RUST_BACKTRACE set, every error would capture a backtrace and trace the unwinder.
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
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
for variant in precompiled full; do
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

# Native pass. With read-ahead off on the disk under $T and the binary evicted from the page cache, a page fault
# reads and maps exactly the page it needs (the kernel's fault-around maps only pages already cached), so
# /proc/PID/pagemap then lists exactly the pages of the executable the agent touched. The symbols on those pages
# that the order lacks are appended: code first, then named read-only data (anonymous constants and strings have
# no symbol to order by). Page-sized, so it also appends some neighbours of what ran; they cost little.
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
for variant in precompiled full; do
  features=(); suffix=""; [ "$variant" = precompiled ] && features=(--no-default-features) && suffix=.precompiled-only
  FLOTILLA_LINK_MAP="$T/$variant.native.map" cargo build -q --release -p flotilla-agent --bin flotilla-agent "${features[@]}"
  cp target/release/flotilla-agent "$T/$variant.native"
  for round in 1 2; do
    [ "$round" = 1 ] && config "native-$variant" "$variant"
    echo 0 > "$ra"
    python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' \
      "$T/$variant.native"
    "$T/$variant.native" --config "$T/native-$variant/agent.toml" 2>"$T/native-$variant.log$round" &
    pid=$!
    wait_for '"connected"' "$T/native-$variant.log$round"
    sleep "$IDLE"
    python3 - "$pid" "$T/$variant.native" "$T/$variant.native.map" "$OUT$suffix.txt" <<'PY'
"""Append the symbols on the executable's touched pages that the order file lacks."""
import bisect, re, struct, subprocess, sys
pid, binary, link_map, order_file = sys.argv[1:5]
sections = []  # [start, end, first symbol or None, executable?]
for line in open(link_map):
    m = re.match(r"\s*([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+\d+\s+(.*)$", line)
    if not m:
        continue
    vma, size, rest = int(m.group(1), 16), int(m.group(2), 16), m.group(3).strip()
    if ":(" in rest:
        sections.append([vma, vma + size, None, rest.split(":(", 1)[1].startswith(".text")])
    elif sections and sections[-1][2] is None and not rest.startswith("."):
        sections[-1][2] = rest
sections.sort()
starts = [s[0] for s in sections]
# File offset -> virtual address, per PT_LOAD segment.
loads = []
for line in subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True, check=True).stdout.splitlines():
    f = line.split()
    if f and f[0] == "LOAD":
        loads.append((int(f[1], 16), int(f[2], 16), int(f[4], 16)))
order = [l.strip() for l in open(order_file) if l.strip()]
have = set(order)
code, data = [], []
pagemap = open(f"/proc/{pid}/pagemap", "rb")
for line in open(f"/proc/{pid}/maps"):
    f = line.split()
    if len(f) < 6 or f[5] != binary:
        continue
    start, end = (int(x, 16) for x in f[0].split("-"))
    offset = int(f[2], 16)
    delta = next((va - fo for fo, va, size in loads if fo // 4096 * 4096 <= offset < fo + size), 0)
    pagemap.seek(start // 4096 * 8)
    entries = pagemap.read((end - start) // 4096 * 8)
    for i in range((end - start) // 4096):
        if not struct.unpack_from("<Q", entries, i * 8)[0] >> 63:
            continue
        page = offset + i * 4096 + delta
        j = max(bisect.bisect_right(starts, page) - 1, 0)
        while j < len(sections) and sections[j][0] < page + 4096:
            lo, hi, name, is_code = sections[j]
            if hi > page and name and name not in have:
                have.add(name)
                (code if is_code else data).append(name)
            j += 1
with open(order_file, "w") as out:
    out.write("\n".join(order + code + data) + "\n")
print(f"{order_file}: {len(code)} functions and {len(data)} data symbols added from the native run")
PY
    kill -TERM "$pid"; wait "$pid" || true
  done
done
echo "rebuild the release agents to link with the new order"
