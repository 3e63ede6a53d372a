#!/bin/sh
# A minimal Debian base image built from the Debian archive alone, for machines that cannot pull
# one from a registry: debootstrap (minbase) with Debian's Python 3.11 (bookworm's python3, the
# same cp311 as the torch wheels), venv and CA certificates, imported with `docker import`.
#
#   compose/base-image.sh [TAG]      # default specdec-base:bookworm; run as root (debootstrap chroots)
#
# Then build with --build-arg CPU_BASE=TAG (`make base-image` does this step; `make up PROFILE=cpu
# CPU_BASE=TAG` and `make image` use it). DEBIAN_MIRROR picks another mirror.
set -eu
tag=${1:-specdec-base:bookworm}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}

command -v debootstrap >/dev/null || {
  echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "debootstrap needs root" >&2; exit 1; }

root=$(mktemp -d /tmp/specdec-base.XXXXXX)
trap 'rm -rf "$root"' EXIT INT TERM
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$suite" "$root" "$mirror"
# Only what a container needs: no package lists, caches, docs or man pages.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* \
       "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log "$root"/tmp/*
tar --numeric-owner -C "$root" -c . | "$docker" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase $suite + python3" - "$tag"
"$docker" image ls "$tag"
