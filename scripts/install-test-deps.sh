#!/usr/bin/env bash
# Installs the Debian tools the tests use, only those missing; quiet when everything is there.
# Run by `npm test` (pretest) and `npm run bench`. Needs root for apt-get (CI and the test machines are root).
set -euo pipefail

declare -A need=(
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdfuse]=nbdfuse
  [qemu-img]=qemu-utils [qemu-io]=qemu-utils [qemu-nbd]=qemu-utils
  [fio]=fio [nbdkit]=nbdkit [mkfs.ext4]=e2fsprogs [e2fsck]=e2fsprogs
  [fusermount3]=fuse3 [losetup]=mount [blockdev]=util-linux
  [qemu-system-x86_64]=qemu-system-x86 [nbd-client]=nbd-client [cpio]=cpio [gcc]=gcc
  [chromium]=chromium  # the status-page browser test (driven by playwright-core)
  [openssl]=openssl [unshare]=util-linux  # NBD TLS test: a throwaway CA; a network namespace for 0.0.0.0
  [podman]=podman [runc]=runc [debootstrap]=debootstrap [ip]=iproute2  # the container image test
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx insmod || missing+=(busybox-static)
ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || missing+=(linux-image-cloud-amd64)
# Debian builds fio's nbd engine into the fio package itself (linked to libnbd); no separate engine package.
fio_has_nbd() { fio --enghelp 2>/dev/null | grep -qw nbd; }

if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "install-test-deps: installing ${pkgs[*]}" >&2
  if [ "$(id -u)" != 0 ]; then
    echo "install-test-deps: these packages are missing and installing them needs root: ${pkgs[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  log=$(mktemp)
  if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"; } >"$log" 2>&1; then
    tail -30 "$log" >&2
    echo "install-test-deps: apt-get failed (full log: $log)" >&2
    exit 1
  fi
  rm -f "$log"
fi
for cmd in "${!need[@]}"; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || { echo "install-test-deps: $cmd is still missing after installing ${need[$cmd]}" >&2; exit 1; }
done
fio_has_nbd || { echo "install-test-deps: fio has no nbd engine (fio --enghelp does not list nbd); install a fio built with libnbd" >&2; exit 1; }

# FUSE and loop devices are used by the ext4 interop test.
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || { echo "install-test-deps: /dev/fuse is missing" >&2; exit 1; }
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || { echo "install-test-deps: loop devices are unavailable" >&2; exit 1; }
exit 0
