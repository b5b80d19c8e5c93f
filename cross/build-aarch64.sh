#!/usr/bin/env bash
# Cross-compiles flotilla-agent for aarch64-unknown-linux-gnu on a Debian bookworm x86_64 machine without rustup
# targets, following ../shared/docs/CROSS.md: Debian's rustc-web (1.96, which ships an arm64 std) as RUSTC, Debian's
# aarch64 gcc for the C parts (ring, SQLite), and qemu-user to run the result.
#
#   cross/build-aarch64.sh            # build target/aarch64-unknown-linux-gnu/release/flotilla-agent
#   cross/build-aarch64.sh --test     # also run the agent's unit tests under qemu
#
# The toolchain cache lives in $FLOTILLA_CROSS_CACHE (default ~/.cache/flotilla-cross) and is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
C="${FLOTILLA_CROSS_CACHE:-$HOME/.cache/flotilla-cross}"
TARGET=aarch64-unknown-linux-gnu

if [ ! -x "$C/root/usr/bin/rustc" ]; then
  echo "== fetching Debian rustc-web with an arm64 standard library into $C"
  mkdir -p "$C/lists/partial" "$C/cache" "$C/debs" "$C/root"
  o="-o Dir::State::Lists=$C/lists -o Dir::Cache=$C/cache -o APT::Architectures::=amd64 -o APT::Architectures::=arm64"
  # shellcheck disable=SC2086
  apt-get $o update -qq
  # shellcheck disable=SC2086
  ver=$(apt-cache $o search '^libstd-rust-web-1\.[0-9]+$' | awk '{print $1}' | sort -V | tail -n1 | sed 's/libstd-rust-web-//')
  # shellcheck disable=SC2086
  llvm=$(apt-cache $o depends rustc-web | awk '/libllvm/ {print $2}' | head -n1)
  echo "   rustc-web std $ver, $llvm"
  # shellcheck disable=SC2086
  (cd "$C/debs" && apt-get $o download rustc-web "libstd-rust-web-$ver" libstd-rust-web-dev \
      "libstd-rust-web-$ver:arm64" libstd-rust-web-dev:arm64 "$llvm")
  for f in "$C"/debs/*.deb; do dpkg -x "$f" "$C/root"; done
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
  apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static >/dev/null
fi
cat > "$C/rustc" <<WRAP
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$C/root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$C/root/usr/bin/rustc" "\$@"
WRAP
chmod +x "$C/rustc"

export RUSTC="$C/rustc"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu"
# A separate target dir: the host build is made by rustc 1.95 and must not be invalidated by 1.96 artefacts.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cross}"

cargo build --release --target "$TARGET" -p flotilla-agent --bin flotilla-agent
bin="$CARGO_TARGET_DIR/$TARGET/release/flotilla-agent"
ls -l "$bin"
qemu-aarch64-static -L /usr/aarch64-linux-gnu "$bin" --version
if [ "${1:-}" = "--test" ]; then
  cargo test --target "$TARGET" -p flotilla-agent-core -p flotilla-shared
fi
