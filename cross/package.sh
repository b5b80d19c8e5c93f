#!/usr/bin/env bash
# Builds the Debian packages with dpkg-deb (no debhelper needed):
#   flotilla-agent_VERSION_ARCH.deb  /usr/bin/flotilla-agent, /usr/bin/flotilla-agent-launcher (the unit's main
#                                    process: runs the self-updated agent and switches back from a bad one),
#                                    /etc/flotilla/agent.toml (a conffile), the systemd
#                                    unit, a `flotilla` system user, state in /var/lib/flotilla
#   flotilla_VERSION_ARCH.deb        /usr/bin/flotilla (hub and operator CLI), its unit (user `flotilla`), state
#                                    in /var/lib/flotilla-hub, which a purge keeps (the hub's keys and database)
#
#   cross/package.sh --arch amd64|arm64 --agent PATH --launcher PATH [--hub PATH] [--version V] [--out DIR]
#
# FLOTILLA_DEB_COMPRESS=gzip packs faster (the tests' debug builds). Binaries are taken as given (release builds: `cargo build --release`, or cross/build.sh ARCH release).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
arch="" agent="" launcher="" hub="" out="$here/../target/debian"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../Cargo.toml" | head -n1)"
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch="$2"; shift 2 ;;
    --agent) agent="$2"; shift 2 ;;
    --launcher) launcher="$2"; shift 2 ;;
    --hub) hub="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 1 ;;
  esac
done
case "$arch" in amd64|arm64|armhf) ;; *) echo "--arch amd64|arm64|armhf" >&2; exit 1 ;; esac
[ -x "$agent" ] || { echo "--agent: no executable at '$agent'" >&2; exit 1; }
[ -x "$launcher" ] || { echo "--launcher: no executable at '$launcher'" >&2; exit 1; }
mkdir -p "$out"

# One package: $1 name, $2 staging root prepared by the caller, $3 the glibc it needs, $4 the description.
build() {
  local name="$1" root="$2" glibc="$3" desc="$4"
  local size
  size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
  cat > "$root/DEBIAN/control" <<CTL
Package: $name
Version: $version
Architecture: $arch
Maintainer: Flotilla developers <flotilla@example.invalid>
Installed-Size: $size
Depends: libc6 (>= $glibc), passwd
Section: admin
Priority: optional
Homepage: https://example.invalid/flotilla
Description: $desc
CTL
  find "$root" -path "$root/DEBIAN" -prune -o -type f -print0 | xargs -0 md5sum | sed "s|$root/||" \
    > "$root/DEBIAN/md5sums"
  dpkg-deb --root-owner-group "-Z${FLOTILLA_DEB_COMPRESS:-xz}" --build "$root" "$out/${name}_${version}_${arch}.deb" >/dev/null
  echo "$out/${name}_${version}_${arch}.deb"
}

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

a="$stage/agent"
install -d "$a/DEBIAN" "$a/usr/bin" "$a/etc/flotilla" "$a/lib/systemd/system" "$a/usr/share/doc/flotilla-agent"
install -m 0755 "$agent" "$a/usr/bin/flotilla-agent"
install -m 0755 "$launcher" "$a/usr/bin/flotilla-agent-launcher"
install -m 0640 "$here/../edge-agent/agent.example.toml" "$a/etc/flotilla/agent.toml"
install -m 0644 "$here/systemd/flotilla-agent.service" "$a/lib/systemd/system/"
install -m 0644 "$here/debian/copyright" "$a/usr/share/doc/flotilla-agent/copyright"
echo "/etc/flotilla/agent.toml" > "$a/DEBIAN/conffiles"
for s in postinst prerm postrm; do
  sed -e "s/@UNIT@/flotilla-agent.service/g" -e "s/@USER@/flotilla/g" -e "s|@STATE@|/var/lib/flotilla|g" \
    -e "s|@CONF@|/etc/flotilla|g" -e "s/@PURGE_STATE@/yes/g" "$here/debian/$s" > "$a/DEBIAN/$s"
  chmod 0755 "$a/DEBIAN/$s"
done
# amd64 needs 2.36: the agent is linked with packed relative relocations there (DT_RELR, edge-agent/build.rs).
agent_glibc=2.34; [ "$arch" = amd64 ] && agent_glibc=2.36
build flotilla-agent "$a" "$agent_glibc" "Flotilla edge agent (offline-first WASM and container workloads)
 Runs signed WASM and container workloads pushed by a Flotilla hub over MQTT, keeps its desired state in
 SQLite and reconciles it across reboots without the hub. Configure /etc/flotilla/agent.toml, then
 systemctl start flotilla-agent."

if [ -n "$hub" ]; then
  [ -x "$hub" ] || { echo "--hub: no executable at '$hub'" >&2; exit 1; }
  h="$stage/hub"
  install -d "$h/DEBIAN" "$h/usr/bin" "$h/lib/systemd/system" "$h/usr/share/doc/flotilla"
  install -m 0755 "$hub" "$h/usr/bin/flotilla"
  install -m 0644 "$here/systemd/flotilla.service" "$h/lib/systemd/system/"
  install -m 0644 "$here/debian/copyright" "$h/usr/share/doc/flotilla/copyright"
  for s in postinst prerm postrm; do
    sed -e "s/@UNIT@/flotilla.service/g" -e "s/@USER@/flotilla/g" -e "s|@STATE@|/var/lib/flotilla-hub|g" \
      -e "s|@CONF@||g" -e "s/@PURGE_STATE@/no/g" "$here/debian/$s" > "$h/DEBIAN/$s"
    chmod 0755 "$h/DEBIAN/$s"
  done
  build flotilla "$h" 2.34 "Flotilla hub and operator CLI
 The hub places signed workloads on edge agents by region, rolls them out in health-gated waves and serves
 the REST API, the console and the MQTT telemetry feeds. Run flotilla init --data-dir /var/lib/flotilla-hub
 as the flotilla-hub user, then systemctl start flotilla."
fi
