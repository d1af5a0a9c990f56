#!/usr/bin/env bash
# Makes the Dockerfiles' base image from Debian packages, for machines that reach no container
# registry (as this project's CI machines): the Debian release of the pinned
# python:3.11.10-slim-bookworm (bookworm, whose python3 is 3.11) with Python, venv support and
# CA certificates, `python` linked to python3. scripts/images.sh passes it as BASE.
#   scripts/base-image.sh IMAGE    (~3 min; needs root, debootstrap and the Debian mirror)
# The image is made once per machine and kept by the runtime; images.sh only calls this when
# IMAGE is missing, so CI on one machine pays for it once (`podman rmi IMAGE` to remake it).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/uv.sh
source scripts/container-runtime.sh
IMAGE=${1:?usage: scripts/base-image.sh IMAGE}
[ -n "$RUNTIME" ] || { echo "$RUNTIME_MISSING" >&2; exit 1; }
apt_install debootstrap
[ "$(id -u)" = 0 ] || { echo "making a base image needs root (debootstrap, chroot)" >&2; exit 1; }

# The mirror apt already uses here (a proxy or a local mirror may be the only one reachable).
MIRROR=${DEBIAN_MIRROR:-$(grep -rhoE '(https?://[^ ]+/debian)/?( |$)' /etc/apt/sources.list \
  /etc/apt/sources.list.d/ 2>/dev/null | head -n 1 | tr -d ' ' || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
rootfs=$(mktemp -d /var/tmp/ragline-base.XXXXXX)
chmod 755 "$rootfs" # apt in the chroot downloads as _apt
trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT
echo "making base image $IMAGE: debootstrap bookworm from $MIRROR"
debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 ||
  { tail -n 30 "$rootfs.log" >&2; exit 1; }
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
chroot "$rootfs" /bin/sh -eu -c '
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    python3 python3-venv ca-certificates >/dev/null
  ln -sf python3 /usr/bin/python
  apt-get clean
  rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* /var/cache/debconf/*-old
  : >/etc/resolv.conf' >>"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; exit 1; }
python_version=$(chroot "$rootfs" python --version)
case "$python_version" in "Python 3.11."*) ;; *) echo "base has $python_version, not 3.11" >&2; exit 1 ;; esac
tar -C "$rootfs" -c . | "$RUNTIME" import --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
echo "made $IMAGE ($python_version)"
