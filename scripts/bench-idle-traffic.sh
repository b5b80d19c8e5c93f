#!/usr/bin/env bash
# Idle traffic per device: two release agents connected over mutual TLS to the hub's embedded broker, one with the
# default intervals (report every 60 s, agent metrics every 30 s, keepalive 60 s) and one configured for metered
# links (keepalive 300 s, report and metrics once a day). After enrollment settles, reads each agent's TCP
# counters (tcp_info through `ss -ti`) at the start and end of the idle window and prints bytes per hour: TLS
# payload both ways, and an estimate on the wire adding 52 bytes of IPv4+TCP header per segment.
#   cargo build --release --bins && scripts/bench-idle-traffic.sh [IDLE_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE="${1:-1200}"
BIN=target/release
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$W"' EXIT

# A test PKI: CA, server certificate for localhost, one device certificate.
P="$W/pki"; mkdir -p "$P"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
  -keyout "$P/ca.key" -out "$P/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout "$P/server.key" -out "$P/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$P/server.ext"
openssl x509 -req -in "$P/server.csr" -CA "$P/ca.pem" -CAkey "$P/ca.key" -CAcreateserial -days 2 \
  -extfile "$P/server.ext" -out "$P/server.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=device" \
  -keyout "$P/client.key" -out "$P/client.csr" 2>/dev/null
printf 'extendedKeyUsage=clientAuth\n' > "$P/client.ext"
openssl x509 -req -in "$P/client.csr" -CA "$P/ca.pem" -CAkey "$P/ca.key" -CAcreateserial -days 2 \
  -extfile "$P/client.ext" -out "$P/client.pem" 2>/dev/null
# rustls reads PKCS#8 or SEC1 keys; openssl writes PKCS#8 with -nodes.

"$BIN/flotilla" init --data-dir "$W/hub" >/dev/null
"$BIN/flotilla" serve --data-dir "$W/hub" --http 127.0.0.1:0 --mqtt 127.0.0.1:0 --mqtt-tls 127.0.0.1:0 \
  --mqtt-tls-cert "$P/server.pem" --mqtt-tls-key "$P/server.key" --mqtt-client-ca "$P/ca.pem" \
  >/dev/null 2>"$W/hub.log" &
for _ in $(seq 100); do [ -f "$W/hub/endpoints.txt" ] && break; sleep 0.1; done
API=$(sed -n 's/^http=//p' "$W/hub/endpoints.txt")
TLS_PORT=$(sed -n 's/^mqtts=.*://p' "$W/hub/endpoints.txt")
export FLOTILLA_SERVER="$API" FLOTILLA_TOKEN_FILE="$W/hub/admin.token"
for _ in $(seq 100); do "$BIN/flotilla" device ls >/dev/null 2>&1 && break; sleep 0.1; done

start_agent() { # name keepalive report_interval metrics_interval
  local token; token=$("$BIN/flotilla" enroll-token create --region eu-west --label role=gateway)
  mkdir -p "$W/$1"
  cat > "$W/$1/agent.toml" <<CFG
version = 1
device_id = "$1"
data_dir = "$W/$1/state"
broker = "mqtts://localhost:$TLS_PORT"
enroll_token = "$token"
region = "eu-west"
[position]
lat = 52.5
lon = 13.4
[limits]
keepalive_secs = $2
report_interval_secs = $3
[telemetry]
metrics_interval_secs = $4
[tls]
ca_file = "$P/ca.pem"
client_cert = "$P/client.pem"
client_key = "$P/client.key"
CFG
  "$BIN/flotilla-agent" --config "$W/$1/agent.toml" 2>"$W/$1.log" &
}
start_agent default 60 60 30
DEFAULT=$!
start_agent metered 300 86400 86400
METERED=$!
for _ in $(seq 200); do
  [ "$("$BIN/flotilla" device ls -o json | grep -c '"online": true')" -ge 2 ] && break; sleep 0.1
done
sleep 20 # enrollment and the first reports settle

# "bytes_sent bytes_received segs_out segs_in" of the agent's connection to the TLS port.
counters() {
  ss -tinpH "dport = :$TLS_PORT" | awk -v pid="pid=$1," '
    $0 ~ pid { want = 1; next }
    want { for (i = 1; i <= NF; i++) { split($i, kv, ":"); v[kv[1]] = kv[2] }
           print v["bytes_sent"] + 0, v["bytes_received"] + 0, v["segs_out"] + 0, v["segs_in"] + 0; exit }'
}
read -r ds0 dr0 dso0 dsi0 < <(counters $DEFAULT)
read -r ms0 mr0 mso0 msi0 < <(counters $METERED)
t0=$(date +%s.%N)
sleep "$IDLE"
read -r ds1 dr1 dso1 dsi1 < <(counters $DEFAULT)
read -r ms1 mr1 mso1 msi1 < <(counters $METERED)
t1=$(date +%s.%N)
per_hour() { awk "BEGIN{printf \"%.0f\", ($1) * 3600 / ($t1 - $t0)}"; }
report() { # name s0 s1 r0 r1 so0 so1 si0 si1
  local payload=$(( ($3 - $2) + ($5 - $4) )) segs=$(( ($7 - $6) + ($9 - $8) ))
  echo "$1: TLS payload $(per_hour $payload) B/h (sent $(per_hour $(($3 - $2))), received $(per_hour $(($5 - $4)))), on the wire with IPv4+TCP headers ~$(per_hour "$payload + 52 * $segs") B/h ($(per_hour $segs) segments/h)"
}
echo "idle window ${IDLE}s, mutual TLS to the embedded broker:"
report "default intervals (keepalive 60 s, report 60 s, metrics 30 s)" "$ds0" "$ds1" "$dr0" "$dr1" "$dso0" "$dso1" "$dsi0" "$dsi1"
report "metered (keepalive 300 s, report and metrics daily)" "$ms0" "$ms1" "$mr0" "$mr1" "$mso0" "$mso1" "$msi0" "$msi1"
