#!/bin/sh
# Builds the specdec image (compose/Dockerfile) with BuildKit, from the repository root:
#
#   compose/build-image.sh [cpu|cuda] [TAG]          # default: cpu, tag specdec:VARIANT
#
# Settings (environment; `make image` passes its variables of the same names):
#   CPU_BASE       base image of the cpu variant; default specdec-base:bookworm when that image
#                  exists locally (`make base-image`), else the Dockerfile's python:3.11-slim
#   WHEELS         a directory of wheels; torch's wheel for the variant is installed from it
#                  (torch-<version>+cpu-*.whl for cpu) instead of the PyTorch index
#   CA_CERT        a CA bundle for pip's index, passed as the build secret `ca` (never in a layer)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL   the package index (http(s) URLs)
#   HOST_PIP=1     fill the unset ones above from this machine's `pip config list`
#                  (find-links -> WHEELS, cert -> CA_CERT, index-url, extra-index-url)
#   BUILD_ARGS     more `docker build` options
#
# BuildKit builds with `docker buildx build --load` where buildx is installed; otherwise with a
# docker CLI that has BuildKit built in (Debian's docker.io 20.10: /usr/bin/docker), the wheel
# dir then travelling as a small local image (specdec-wheels:local).
set -eu
variant=${1:-cpu}
tag=${2:-specdec:$variant}
docker=${DOCKER:-docker}
cd "$(dirname "$0")/.."

pip_config() {  # the last value pip reports for a key, any scope
  python3 -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'$/\1/p" | tail -n 1
}
if [ "${HOST_PIP:-0}" = 1 ]; then
  if [ -z "${WHEELS:-}" ]; then
    for d in $(pip_config find-links); do [ -d "$d" ] && WHEELS=$d && break; done
  fi
  : "${CA_CERT:=$(pip_config cert)}"
  : "${PIP_INDEX_URL:=$(pip_config index-url)}"
  if [ -z "${PIP_EXTRA_INDEX_URL:-}" ]; then  # file:// indexes are not reachable inside the build
    PIP_EXTRA_INDEX_URL=$(for u in $(pip_config extra-index-url); do case $u in http*) printf '%s ' "$u";; esac; done)
  fi
fi
if [ -z "${CPU_BASE:-}" ] && [ "$variant" = cpu ] && "$docker" image inspect specdec-base:bookworm >/dev/null 2>&1; then
  CPU_BASE=specdec-base:bookworm
fi

# How to run BuildKit here.
if "$docker" buildx version >/dev/null 2>&1; then
  build="$docker buildx build --load"; contexts=buildx
else
  build=; contexts=image
  for cli in "$docker" /usr/bin/docker; do
    if command -v "$cli" >/dev/null && DOCKER_BUILDKIT=1 "$cli" build --help 2>/dev/null | grep -q -- '--secret'; then
      build="$cli build"; break
    fi
  done
  if [ -z "$build" ]; then
    echo "compose/build-image.sh: BuildKit is needed (RUN --mount); install docker buildx" \
         "(docker-buildx-plugin) or Debian's docker.io, whose CLI has BuildKit built in" >&2
    exit 1
  fi
  export DOCKER_BUILDKIT=1
fi

set -- --build-arg "VARIANT=$variant" -f compose/Dockerfile -t "$tag"
[ -n "${CPU_BASE:-}" ] && set -- "$@" --build-arg "CPU_BASE=$CPU_BASE"
[ -n "${PIP_INDEX_URL:-}" ] && set -- "$@" --build-arg "PIP_INDEX_URL=$PIP_INDEX_URL"
[ -n "${PIP_EXTRA_INDEX_URL:-}" ] && set -- "$@" --build-arg "PIP_EXTRA_INDEX_URL=$PIP_EXTRA_INDEX_URL"
if [ -n "${CA_CERT:-}" ]; then
  [ -r "$CA_CERT" ] || { echo "CA_CERT=$CA_CERT is not a readable file" >&2; exit 1; }
  set -- "$@" --secret "id=ca,src=$CA_CERT"
fi
if [ -n "${WHEELS:-}" ]; then
  [ -d "$WHEELS" ] || { echo "WHEELS=$WHEELS is not a directory" >&2; exit 1; }
  if [ "$contexts" = buildx ]; then
    set -- "$@" --build-context "wheels=$WHEELS"
  else
    printf 'FROM scratch\nCOPY . /\n' | $build -q -t specdec-wheels:local -f - "$WHEELS" >/dev/null
    set -- "$@" --build-arg WHEELS_IMAGE=specdec-wheels:local
  fi
fi
echo "+ $build $* ${BUILD_ARGS:-} ." >&2
# shellcheck disable=SC2086
exec $build "$@" ${BUILD_ARGS:-} .
