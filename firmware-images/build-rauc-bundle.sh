#!/usr/bin/env bash
# Builds a signed RAUC bundle holding a tiny sample root file system (ext4 with an os-release naming the version).
#   firmware-images/build-rauc-bundle.sh OUT_DIR VERSION COMPATIBLE [SIGNER]
# The X.509 signing pair of SIGNER (default "release") is made with openssl on first use in OUT_DIR/keys/: test
# keys are never committed. Writes OUT_DIR/<VERSION>.raucb and prints its path. Needs rauc (its `bundle`
# command runs mksquashfs from squashfs-tools), openssl and mkfs.ext4 (e2fsprogs).
set -euo pipefail
out=${1:?OUT_DIR}
version=${2:?VERSION}
compatible=${3:?COMPATIBLE}
signer=${4:-release}
mkdir -p "$out/keys"
key="$out/keys/$signer.key.pem"
cert="$out/keys/$signer.cert.pem"
if [ ! -f "$key" ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$key" -out "$cert" -days 2 \
    -subj "/O=Flotilla test/CN=$signer" >/dev/null 2>&1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/etc" "$work/content"
printf 'NAME="Flotilla sample"\nVERSION_ID="%s"\n' "$version" >"$work/root/etc/os-release"
truncate -s 2M "$work/content/rootfs.ext4"
mkfs.ext4 -q -F -d "$work/root" "$work/content/rootfs.ext4"
cat >"$work/content/manifest.raucm" <<MANIFEST
[update]
compatible=$compatible
version=$version

[bundle]
format=plain

[image.rootfs]
filename=rootfs.ext4
MANIFEST
rm -f "$out/$version.raucb"
rauc bundle --cert="$cert" --key="$key" "$work/content" "$out/$version.raucb" >/dev/null
echo "$out/$version.raucb"
