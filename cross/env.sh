# Sourced by the cross scripts: sets up Debian's rustc-web (1.96, which ships arm64 and armhf standard libraries)
# as RUSTC, Debian's cross gcc for the C parts (ring, bundled SQLite), and qemu-user as the test runner, following
# ../shared/docs/CROSS.md. Fetches the toolchain into $FLOTILLA_CROSS_CACHE (default ~/.cache/flotilla-cross) once.
#
#   . cross/env.sh aarch64|armv7      # exports RUSTC, CARGO_TARGET_DIR, the target's linker/CC/AR/RUNNER, and
#                                      # TARGET, QEMU (the command that runs a binary of the target)
# Returns 2 (and prints why, in one line) when the target's standard library cannot be had.

C="${FLOTILLA_CROSS_CACHE:-$HOME/.cache/flotilla-cross}"
case "$1" in
  aarch64) TARGET=aarch64-unknown-linux-gnu; DEBARCH=arm64; GNU=aarch64-linux-gnu; QEMU_BIN=qemu-aarch64-static ;;
  armv7) TARGET=armv7-unknown-linux-gnueabihf; DEBARCH=armhf; GNU=arm-linux-gnueabihf; QEMU_BIN=qemu-arm-static ;;
  *) echo "usage: . cross/env.sh aarch64|armv7" >&2; return 1 ;;
esac
export DEBIAN_FRONTEND=noninteractive
o="-o Dir::State::Lists=$C/lists -o Dir::Cache=$C/cache -o APT::Architectures::=amd64 -o APT::Architectures::=$DEBARCH"
if [ ! -d "$C/root/usr/lib/rustlib/$TARGET" ] || [ ! -x "$C/root/usr/bin/rustc" ]; then
  echo "== fetching Debian rustc-web with the $DEBARCH standard library into $C"
  mkdir -p "$C/lists/partial" "$C/cache" "$C/debs-$DEBARCH" "$C/root"
  # shellcheck disable=SC2086
  apt-get $o update -qq 2>/dev/null
  # The newest rustc-web; its standard library must exist for the target at the same version.
  # shellcheck disable=SC2086
  ver=$(apt-cache $o policy rustc-web | awk '/Candidate:/ {print $2}')
  short=$(echo "$ver" | sed -E 's/^([0-9]+\.[0-9]+).*/\1/')
  # shellcheck disable=SC2086
  tver=$(apt-cache $o policy "libstd-rust-web-dev:$DEBARCH" | awk '/Candidate:/ {print $2}')
  if [ "$tver" != "$ver" ]; then
    echo "skipped $TARGET: Debian's $DEBARCH index offers libstd-rust-web-dev $tver, not the $ver that rustc-web is"
    return 2
  fi
  # shellcheck disable=SC2086
  llvm=$(apt-cache $o depends "libstd-rust-web-$short" | awk '/Depends: libllvm/ {print $2}' | head -n1)
  echo "   rustc-web $ver, $llvm"
  # shellcheck disable=SC2086
  (cd "$C/debs-$DEBARCH" && apt-get $o download -qq rustc-web "libstd-rust-web-$short" libstd-rust-web-dev \
      "libstd-rust-web-$short:$DEBARCH" "libstd-rust-web-dev:$DEBARCH" "$llvm" 2>/dev/null) || {
    echo "skipped $TARGET: the $DEBARCH standard library $ver could not be downloaded"
    return 2
  }
  for f in "$C/debs-$DEBARCH"/*.deb; do dpkg -x "$f" "$C/root"; done
fi
if ! command -v "$GNU-gcc" >/dev/null || ! command -v "$QEMU_BIN" >/dev/null; then
  apt-get install -y -qq "gcc-$GNU" "libc6-dev-$DEBARCH-cross" qemu-user-static >/dev/null
fi
cat > "$C/rustc" <<WRAP
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$C/root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$C/root/usr/bin/rustc" "\$@"
WRAP
chmod +x "$C/rustc"

T=$(echo "$TARGET" | tr 'a-z-' 'A-Z_')
export RUSTC="$C/rustc"
export "CARGO_TARGET_${T}_LINKER=$GNU-gcc"
export "CC_${TARGET//-/_}=$GNU-gcc" "AR_${TARGET//-/_}=$GNU-ar"
QEMU="$QEMU_BIN -L /usr/$GNU"
export "CARGO_TARGET_${T}_RUNNER=$QEMU"
export TARGET QEMU
# Outside the repository, so fresh clones on this machine reuse it; never mixed with the host's 1.95 artefacts.
export CARGO_TARGET_DIR="${FLOTILLA_CROSS_TARGET_DIR:-$C/target}"
return 0
