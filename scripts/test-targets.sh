#!/usr/bin/env bash
# The tests that need other builds than the workspace's debug build (part of the README's test command, run by
# scripts/test.sh after the workspace tests):
#   - the release agent for amd64 with and without the WASM compiler, against the size budgets;
#   - the Debian packages, installed, upgraded and purged in a Debian root (a container from debootstrap);
#   - the agent cross-built for aarch64 (and armv7 when Debian's armhf index has the standard library): unit
#     tests under qemu-user, and a fleet test with the emulated agent against the x86_64 hub;
#   - the fleet tests of the precompiled-only agent.
# Needs root for apt-get and debootstrap on a fresh machine; caches the cross toolchain, the cross target dir and
# the Debian image outside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
t0=$SECONDS
step() { echo "== $1 (at $((SECONDS - t0)) s)"; }
MIB=$((1024 * 1024))
# Stripped release agent budgets (issue 16): with Cranelift, and precompiled modules only.
BUDGET_FULL=$((24 * MIB))
BUDGET_PRECOMPILED=$((11 * MIB))

need=""
command -v dpkg-deb >/dev/null || need="$need dpkg"
command -v debootstrap >/dev/null || need="$need debootstrap"
command -v file >/dev/null || need="$need file"
if [ -n "$need" ]; then apt-get install -y -qq $need >/dev/null; fi

step "release agents for amd64, with and without the compiler"
# Copied out, never copied back: target/release/flotilla-agent is a hard link to cargo's own artifact of the last
# build, and writing through it would corrupt that artifact. The full agent is built last, so it is what
# target/release/flotilla-agent holds afterwards.
mkdir -p target
cargo build --release -p flotilla-agent --bin flotilla-agent --no-default-features 2>&1 | tee target/agent-precompiled-only.log
cp --remove-destination target/release/flotilla-agent target/release/flotilla-agent-precompiled-only
cargo build --release -p flotilla-agent --bin flotilla-agent 2>&1 | tee target/agent-full.log
cp --remove-destination target/release/flotilla-agent target/release/flotilla-agent-full
# The link order (edge-agent/build.rs) names symbols by their hashed names in exactly this build; a dependency or
# toolchain change renames them, and the linker then lays out the code as it likes and the idle agent's RSS grows
# by about 3 MiB. The linker's warnings (shown for the agent) name every symbol it could not find.
for v in precompiled-only full; do
  order=edge-agent/link-order/x86_64-unknown-linux-gnu.txt
  [ "$v" = precompiled-only ] && order=edge-agent/link-order/x86_64-unknown-linux-gnu.precompiled-only.txt
  total=$(wc -l < "$order")
  missing=$(grep -c 'symbol ordering file: no such symbol' "target/agent-$v.log" || true)
  echo "link order of the $v agent: $((total - missing)) of $total symbols found ($order)"
  if [ $((missing * 10)) -gt "$total" ]; then
    echo "more than a tenth of the $v agent's link order is stale: run scripts/gen-agent-link-order.sh" >&2
    exit 1
  fi
done
# The launcher the agent's unit runs (it undoes a self-update that does not come up healthy).
cargo build --release -p flotilla-agent-launcher
full=$(stat -c %s target/release/flotilla-agent-full)
pre=$(stat -c %s target/release/flotilla-agent-precompiled-only)
awk -v f="$full" -v p="$pre" -v m="$MIB" 'BEGIN { printf "size: agent with compiler %d bytes (%.2f MiB, budget 24 MiB); precompiled-only %d bytes (%.2f MiB, budget 11 MiB)\n", f, f / m, p, p / m }'
if [ "$full" -gt "$BUDGET_FULL" ] || [ "$pre" -gt "$BUDGET_PRECOMPILED" ]; then
  echo "the stripped release agent exceeds its size budget" >&2
  exit 1
fi
# Neither agent loads glibc's libm (edge-agent/src/libm_shim.rs): loading it costs about 330 KiB of idle RSS.
for v in precompiled-only full; do
  if readelf -d "target/release/flotilla-agent-$v" | grep -q 'NEEDED.*\[libm\.so'; then
    nm -D --undefined-only "target/release/flotilla-agent-$v" | awk '{print $2}' | cut -d@ -f1 | sort > target/imports.txt
    nm -D --defined-only "$(gcc -print-file-name=libm.so.6)" | awk '{print $3}' | cut -d@ -f1 | sort -u \
      | comm -12 target/imports.txt - | tr '\n' ' ' > target/libm-imports.txt
    echo "the $v agent loads libm again, for: $(cat target/libm-imports.txt)(use the libm crate instead)" >&2
    exit 1
  fi
done

step "aarch64: agent-core, shared, engine and agent unit tests under qemu, and the agent for the fleet test"
cross/build.sh aarch64 test
C="${FLOTILLA_CROSS_CACHE:-$HOME/.cache/flotilla-cross}"
a64="${FLOTILLA_CROSS_TARGET_DIR:-$C/target}/aarch64-unknown-linux-gnu/debug/flotilla-agent"

step "armv7 (Pulley): the same unit tests under qemu, when Debian can supply the standard library"
mkdir -p target
cross/build.sh armv7 test | tee target/armv7-build.log
armv7=""
if ! grep -q '^skipped' target/armv7-build.log; then
  armv7="${FLOTILLA_CROSS_TARGET_DIR:-$C/target}/armv7-unknown-linux-gnueabihf/debug/flotilla-agent"
fi

step "Debian packages (amd64 agent and hub, arm64 agent)"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
rm -rf target/debian
# The hub and arm64 packages carry this run's debug builds (a release hub build would add minutes); gzip packs
# those quickly. `cross/package.sh` with release builds makes the packages to ship.
export FLOTILLA_DEB_COMPRESS=gzip
cross/package.sh --arch amd64 --agent target/release/flotilla-agent-full --launcher target/release/flotilla-agent-launcher \
  --hub target/debug/flotilla --out target/debian
cross/package.sh --arch amd64 --agent target/release/flotilla-agent-full --launcher target/release/flotilla-agent-launcher \
  --version "$version+upgrade1" \
  --out target/debian/upgrade >/dev/null
cross/package.sh --arch arm64 --agent "$a64" --launcher "$(dirname "$a64")/flotilla-agent-launcher" --out target/debian
for deb in target/debian/*.deb; do
  echo "$deb: $(dpkg-deb -f "$deb" Package Version Architecture | tr '\n' ' ')"
done
tmp=$(mktemp -d)
dpkg-deb -x "target/debian/flotilla-agent_${version}_arm64.deb" "$tmp"
echo "packaged arm64 binary: $(file -b "$tmp/usr/bin/flotilla-agent" | cut -d, -f1-2)"
file -b "$tmp/usr/bin/flotilla-agent" | grep -q "ARM aarch64"
rm -rf "$tmp"

step "a Debian root for the package test"
image=flotilla-test-debian:bookworm
if ! docker image inspect "$image" >/dev/null 2>&1; then
  root=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
  tar -C "$root" -c . | docker import - "$image" >/dev/null
  rm -rf "$root"
fi

step "fleet tests of these builds"
FLOTILLA_AGENT_PRECOMPILED_ONLY="$PWD/target/release/flotilla-agent-precompiled-only" \
FLOTILLA_CROSS_AGENT="$a64" FLOTILLA_CROSS_LAUNCHER="qemu-aarch64-static -L /usr/aarch64-linux-gnu" FLOTILLA_CROSS_PRECOMPILE=aarch64 \
FLOTILLA_DEB_AGENT="$PWD/target/debian/flotilla-agent_${version}_amd64.deb" \
FLOTILLA_DEB_HUB="$PWD/target/debian/flotilla_${version}_amd64.deb" \
FLOTILLA_DEB_AGENT_UPGRADE="$PWD/target/debian/upgrade/flotilla-agent_${version}+upgrade1_amd64.deb" \
FLOTILLA_DEBIAN_IMAGE="$image" \
  cargo nextest run -p flotilla-fleet-tests --profile ci --run-ignored only
if [ -n "$armv7" ]; then
  step "the fleet test with the armv7 agent under qemu (modules as Pulley bytecode)"
  FLOTILLA_CROSS_AGENT="$armv7" FLOTILLA_CROSS_LAUNCHER="qemu-arm-static -L /usr/arm-linux-gnueabihf" \
  FLOTILLA_CROSS_PRECOMPILE=pulley32 \
    cargo nextest run -p flotilla-fleet-tests --profile ci --run-ignored only -E 'test(a_cross_built_agent)'
fi
step "done"
