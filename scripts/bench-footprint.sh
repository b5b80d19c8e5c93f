#!/usr/bin/env bash
# Agent footprint benchmark: stripped release binary sizes, and agent RSS/PSS and CPU idle with 0 and with 10 WASM
# workloads, using the release binaries and the real hub over the embedded broker. Side by side in the same idle
# window: the agent built without the compiler (when target/release/flotilla-agent-precompiled-only exists, as
# scripts/test-targets.sh leaves it), and mender-client (Debian `mender-client`) pointed at a dummy local HTTP
# server, with the ratios. The ten workloads are pushed with a variant precompiled for x86_64, so both agents run
# them. Writes /etc/mender/artifact_info if it is missing (mender refuses to run without it).
#   cargo build --release --bins && scripts/bench-footprint.sh [IDLE_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE="${1:-60}"
BIN=target/release
# The hub's own footprint is not measured here; HUB=target/debug/flotilla saves a release build of it.
HUB="${HUB:-$BIN/flotilla}"
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; pkill -f "mender --config $W" 2>/dev/null || true; rm -rf "$W"' EXIT

mem() { # pid -> "rss_kib pss_kib"
  local rss pss
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$1/status")
  pss=$(awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup")
  echo "$rss $pss"
}

echo "binary sizes (stripped, release profile: lto, codegen-units=1, opt-level=s):"
ls -l "$BIN/flotilla-agent" "$HUB" | awk '{printf "  %-28s %6.1f MiB (%d bytes)\n", $9, $5/1048576, $5}'

"$HUB" init --data-dir "$W/hub" >/dev/null
"$HUB" serve --data-dir "$W/hub" --http 127.0.0.1:0 --mqtt 127.0.0.1:0 --mqtt-tls 127.0.0.1:0 >/dev/null 2>"$W/hub.log" &
for _ in $(seq 100); do [ -f "$W/hub/endpoints.txt" ] && break; sleep 0.1; done
API=$(sed -n 's/^http=//p' "$W/hub/endpoints.txt"); MQTT=$(sed -n 's/^mqtt=//p' "$W/hub/endpoints.txt")
export FLOTILLA_SERVER="$API" FLOTILLA_TOKEN_FILE="$W/hub/admin.token"
for _ in $(seq 100); do "$HUB" device ls >/dev/null 2>&1 && break; sleep 0.1; done
TOKEN=$("$HUB" enroll-token create --region eu-west --label role=gateway)
mkdir -p "$W/agent"
cat > "$W/agent/agent.toml" <<CFG
version = 1
device_id = "bench-gw"
data_dir = "$W/agent/state"
broker = "$MQTT"
enroll_token = "$TOKEN"
region = "eu-west"
[position]
lat = 52.5
lon = 13.4
[limits]
keepalive_secs = 300
report_interval_secs = 300
[telemetry]
metrics_interval_secs = 3600
CFG
"$BIN/flotilla-agent" --config "$W/agent/agent.toml" 2>"$W/agent.log" &
AGENT=$!
PRE=""
if [ -x "$BIN/flotilla-agent-precompiled-only" ]; then
  mkdir -p "$W/pre"
  TOKEN2=$("$HUB" enroll-token create --region eu-west --label role=gateway)
  sed -e 's/bench-gw/bench-pre/' -e "s|$W/agent/state|$W/pre/state|" -e "s|$TOKEN|$TOKEN2|" "$W/agent/agent.toml" \
    > "$W/pre/agent.toml"
  "$BIN/flotilla-agent-precompiled-only" --config "$W/pre/agent.toml" 2>"$W/pre.log" &
  PRE=$!
fi
want=1; [ -n "$PRE" ] && want=2
for _ in $(seq 100); do
  [ "$("$HUB" device ls -o json | grep -c '"online": true' || true)" -ge "$want" ] && break; sleep 0.1
done

# The peer, started now so that both idle through the same window.
MENDER=""
if command -v mender >/dev/null; then
  mkdir -p "$W/mender/data" /etc/mender
  [ -f /etc/mender/artifact_info ] || echo "artifact_name=flotilla-bench" > /etc/mender/artifact_info
  echo "device_type=bench" > "$W/mender/data/device_type"
  DUMMY_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  (cd "$W/mender" && exec python3 -m http.server "$DUMMY_PORT" --bind 127.0.0.1 >"$W/mender/http.log" 2>&1) &
  printf '{"ServerURL":"http://127.0.0.1:%s","UpdatePollIntervalSeconds":1800,"InventoryPollIntervalSeconds":28800,"RetryPollIntervalSeconds":300}\n' \
    "$DUMMY_PORT" > "$W/mender/mender.conf"
  mender --config "$W/mender/mender.conf" --fallback-config "$W/mender/none.conf" --data "$W/mender/data" \
    --no-syslog --log-file "$W/mender/mender.log" daemon >/dev/null 2>&1 &
  MENDER=$!
else
  echo "mender-client not installed (apt-get install mender-client): no peer comparison"
fi
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
# Warm-up (enrollment, mender's key generation), then the measured idle window.
sleep 5
a0=$(ticks $AGENT); [ -n "$MENDER" ] && m0=$(ticks $MENDER); [ -n "$PRE" ] && p0=$(ticks $PRE); t0=$(date +%s.%N)
sleep "$IDLE"
a1=$(ticks $AGENT); [ -n "$MENDER" ] && m1=$(ticks $MENDER); t1=$(date +%s.%N)
read -r rss0 pss0 < <(mem $AGENT)
[ -n "$PRE" ] && read -r prss0 ppss0 < <(mem $PRE) && p1=$(ticks $PRE)
cpu_pct() { awk "BEGIN{printf \"%.4f\", ($2-$1)/$HZ/($t1-$t0)*100}"; }
if [ -n "$MENDER" ]; then
  read -r mrss mpss < <(mem $MENDER)
  msize=$(stat -c %s "$(command -v mender)"); asize=$(stat -c %s "$BIN/flotilla-agent")
  echo "peer, same idle window (${IDLE}s):"
  echo "  mender-client $(mender --version | head -1 | cut -f1): RSS $mrss KiB, PSS $mpss KiB, CPU $(cpu_pct "$m0" "$m1") % of a core, binary $msize bytes"
  echo "  flotilla-agent: RSS $rss0 KiB, PSS $pss0 KiB, CPU $(cpu_pct "$a0" "$a1") % of a core, binary $asize bytes"
  echo "  ratio agent/mender: RSS $(awk "BEGIN{printf \"%.2f\", $rss0/$mrss}")x, PSS $(awk "BEGIN{printf \"%.2f\", $pss0/$mpss}")x, binary $(awk "BEGIN{printf \"%.2f\", $asize/$msize}")x"
  kill "$MENDER"
fi

specfile="$W/ten.toml"
echo 'name = "ten"' > "$specfile"
printf '[target]\nselector = { role = "gateway" }\n' >> "$specfile"
for i in $(seq 0 9); do
  "$HUB" release push firmware-images/wasm/sensor.wasm --name "sensor-$i" --version 1.0.0 \
      --key "$W/hub/keys/release.key" --precompile x86_64 >/dev/null 2>&1
  printf '[[workloads]]\nname = "sensor-%s"\nrelease = "sensor-%s@1.0.0"\ntick_ms = 1000\nmemory_mib = 1\ncpu_ms = 20\n' "$i" "$i" >> "$specfile"
done
"$HUB" apply -f "$specfile" >/dev/null
for _ in $(seq 300); do
  n=$("$HUB" device ls -o json | grep -c '"state": "running"' || true)
  [ "$n" -ge $((10 * want)) ] && break; sleep 0.2
done
echo "workloads running: $n"
sleep "$IDLE"
read -r rss10 pss10 < <(mem $AGENT)
[ -n "$PRE" ] && read -r prss10 ppss10 < <(mem $PRE)
echo "agent idle after ${IDLE}s, 0 workloads:  RSS $((rss0)) KiB ($(awk "BEGIN{printf \"%.2f\", $rss0/1024}") MiB), PSS $pss0 KiB"
echo "agent idle after ${IDLE}s, 10 workloads: RSS $((rss10)) KiB ($(awk "BEGIN{printf \"%.2f\", $rss10/1024}") MiB), PSS $pss10 KiB"
echo "per extra idle workload: $(awk "BEGIN{printf \"%.0f\", ($rss10-$rss0)/10}") KiB RSS (each guest has 64 KiB of linear memory)"
echo "agent CPU over the ${IDLE}s idle window, 0 workloads: $((a1-a0)) ticks = $(cpu_pct "$a0" "$a1") % of one core"
if [ -n "$PRE" ]; then
  echo "precompiled-only agent ($(stat -c %s "$BIN/flotilla-agent-precompiled-only") bytes), same windows:"
  echo "  idle after ${IDLE}s, 0 workloads:  RSS $prss0 KiB ($(awk "BEGIN{printf \"%.2f\", $prss0/1024}") MiB), PSS $ppss0 KiB, CPU $(cpu_pct "$p0" "$p1") % of one core"
  echo "  idle after ${IDLE}s, 10 workloads: RSS $prss10 KiB ($(awk "BEGIN{printf \"%.2f\", $prss10/1024}") MiB), PSS $ppss10 KiB"
  [ -n "$MENDER" ] && echo "  ratio to mender-client: RSS $(awk "BEGIN{printf \"%.2f\", $prss0/$mrss}")x, PSS $(awk "BEGIN{printf \"%.2f\", $ppss0/$mpss}")x"
fi
