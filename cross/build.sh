#!/usr/bin/env bash
# Cross-compiles flotilla-agent for an ARM gateway on a Debian bookworm x86_64 machine without rustup targets
# (see env.sh and ../shared/docs/CROSS.md), and runs things under qemu-user.
#
#   cross/build.sh aarch64|armv7 release      # the release agent (what packages ship), both with and without
#                                              # the compiler; prints where they are and what `file` says
#   cross/build.sh aarch64|armv7 test         # the agent-core, shared, engine and agent unit tests under qemu,
#                                              # and a dev-profile agent binary for the qemu fleet test
#
# When armv7's standard library cannot be had from Debian, prints one line saying so and exits 0 (for aarch64 that
# is a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
arch="${1:?usage: cross/build.sh aarch64|armv7 release|test}"
what="${2:-release}"
rc=0
# shellcheck source=env.sh
. cross/env.sh "$arch" || rc=$?
# Only armv7 may be skipped (Debian's armhf index has lagged before); aarch64 is a supported target.
if [ "$rc" = 2 ] && [ "$arch" = armv7 ]; then exit 0; fi
[ "$rc" = 0 ] || exit "$rc"
echo "== $TARGET ($what) with $("$RUSTC" --version), target dir $CARGO_TARGET_DIR"
case "$what" in
  release)
    out="$CARGO_TARGET_DIR/$TARGET/release"
    # Copied out, never back: flotilla-agent is a hard link to cargo's artifact of the last build. The full agent
    # is built last, so flotilla-agent is the full one afterwards.
    cargo build --release --target "$TARGET" -p flotilla-agent --bin flotilla-agent --no-default-features
    cp --remove-destination "$out/flotilla-agent" "$out/flotilla-agent-precompiled-only"
    cargo build --release --target "$TARGET" -p flotilla-agent --bin flotilla-agent
    cp --remove-destination "$out/flotilla-agent" "$out/flotilla-agent-full"
    cargo build --release --target "$TARGET" -p flotilla-agent-launcher
    for b in flotilla-agent-full flotilla-agent-precompiled-only; do
      echo "$b: $(stat -c %s "$out/$b") bytes; $(file -b "$out/$b" | cut -d, -f1-2)"
      $QEMU "$out/$b" --version
    done
    ;;
  test)
    cargo test --target "$TARGET" -p flotilla-agent-core -p flotilla-shared -p flotilla-engine -p flotilla-agent --lib --tests
    cargo build --target "$TARGET" -p flotilla-agent --bin flotilla-agent
    # Separately: with --bin, cargo would build only binaries of that name from every package named.
    cargo build --target "$TARGET" -p flotilla-agent-launcher
    echo "agent for the qemu fleet test: $CARGO_TARGET_DIR/$TARGET/debug/flotilla-agent"
    ;;
  *) echo "unknown step $what (release or test)" >&2; exit 1 ;;
esac
