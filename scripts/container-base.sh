#!/usr/bin/env bash
# Makes the base image that test/container-image.test.ts builds the Dockerfile on, when podman does not have it:
# Debian bookworm (debootstrap, minbase) with this machine's Node.js laid out as the official node:20 images lay
# it out (node and npm under /usr/local, headers in /usr/local/include/node, a `node` user with uid 1000).
# The official image is not used because no container registry is reachable here; Debian's archive is.
# The machine's own CA certificates (/usr/local/share/ca-certificates) go in too, so that npm inside the build
# reaches the registry through this site's TLS-inspecting egress as it does outside.
# Usage: scripts/container-base.sh [IMAGE]   (default localhost/blockferry-test-base:bookworm). Needs root.
set -euo pipefail

image=${1:-localhost/blockferry-test-base:bookworm}
if podman image exists "$image"; then exit 0; fi

node_bin=$(command -v node)
node_bin=$(readlink -f "$node_bin")
major=$("$node_bin" -p 'process.versions.node.split(".")[0]')
[ "$major" = 20 ] || { echo "container-base: needs Node.js 20 on this machine, found $("$node_bin" -v)" >&2; exit 1; }
prefix=$(dirname "$(dirname "$node_bin")")
npm_dir=$prefix/lib/node_modules/npm
headers=$prefix/include/node
[ -d "$npm_dir" ] || { echo "container-base: npm not found at $npm_dir" >&2; exit 1; }
[ -f "$headers/node_api.h" ] || { echo "container-base: Node.js headers not found at $headers" >&2; exit 1; }

root=$(mktemp -d /var/tmp/blockferry-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
log=$(mktemp)
if ! debootstrap --variant=minbase --include=ca-certificates bookworm "$root" http://deb.debian.org/debian >"$log" 2>&1; then
  tail -20 "$log" >&2
  echo "container-base: debootstrap failed (log: $log)" >&2
  exit 1
fi
rm -f "$log"

mkdir -p "$root/usr/local/bin" "$root/usr/local/lib/node_modules" "$root/usr/local/include"
cp "$node_bin" "$root/usr/local/bin/node"
cp -a "$npm_dir" "$root/usr/local/lib/node_modules/npm"
cp -a "$headers" "$root/usr/local/include/node"
ln -s ../lib/node_modules/npm/bin/npm-cli.js "$root/usr/local/bin/npm"
ln -s ../lib/node_modules/npm/bin/npx-cli.js "$root/usr/local/bin/npx"
shopt -s nullglob
certs=(/usr/local/share/ca-certificates/*.crt)
if [ ${#certs[@]} -gt 0 ]; then
  cp "${certs[@]}" "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
chroot "$root" groupadd --gid 1000 node
chroot "$root" useradd --uid 1000 --gid node --shell /bin/bash --create-home node
chroot "$root" /usr/local/bin/node --version >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

tar -C "$root" -c . | podman import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["node"]' \
  - "$image" >/dev/null
echo "container-base: made $image" >&2
