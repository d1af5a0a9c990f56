#!/usr/bin/env bash
# `make images`: builds ragline/gateway, ragline/retriever, ragline/reranker and ragline/llm
# (tag TAG, default dev) from the Dockerfiles, with docker where a docker daemon answers, else
# podman (scripts/bootstrap.sh --system installs it).
#   scripts/images.sh [SERVICE...]        all four, or only those named (gateway retriever ...)
#   scripts/images.sh --check             prints the runtime, or why none can run; exit 1 if none
# Where no container registry answers (this project's CI machines), the base image is made
# locally from Debian packages (scripts/base-image.sh) and passed as BASE; elsewhere the
# Dockerfiles keep the official python image. BASE=... picks one yourself.
# Caching between runs on one machine: the runtime keeps the base image, every layer (torch's
# is shared by the retriever and reranker images, and only a change to locks/stack.txt or
# TORCH rebuilds it) and uv's download cache (a build cache mount), so a rebuild after a code
# change takes seconds. A clean machine builds everything (README, "Images", has the times).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/container-runtime.sh

if [ "${1:-}" = "--check" ]; then
  if [ -n "$RUNTIME" ]; then echo "$RUNTIME"; exit 0; fi
  echo "$RUNTIME_MISSING"
  exit 1
fi
[ -n "$RUNTIME" ] || { echo "make images: $RUNTIME_MISSING" >&2; exit 1; }

TAG=${TAG:-dev}
LOCAL_BASE=localhost/ragline-base:bookworm-py3.11
services=("$@")
[ ${#services[@]} -gt 0 ] || services=(gateway retriever reranker llm)

args=(--network host)
if [ "$RUNTIME" = podman ]; then
  # Podman's default (OCI) image format drops HEALTHCHECK.
  args+=(--format docker)
  # A TLS-intercepting proxy's CA, trusted by this host only, for pip and uv in the build.
  for bundle in /etc/ssl/certs/ca-certificates.crt; do
    [ -f "$bundle" ] && args+=(-v "$bundle:/etc/ssl/certs/ca-certificates.crt:ro")
  done
fi

if [ -z "${BASE:-}" ]; then
  if curl -fsS -m 10 -o /dev/null https://registry-1.docker.io/v2/ 2>/dev/null ||
    [ "$(curl -sS -m 10 -o /dev/null -w '%{http_code}' https://registry-1.docker.io/v2/ 2>/dev/null)" = 401 ]; then
    BASE="" # the registry answers: the Dockerfiles' own python image
  else
    BASE=$LOCAL_BASE
    if ! "$RUNTIME" image exists "$LOCAL_BASE" 2>/dev/null &&
      ! "$RUNTIME" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
      echo "no container registry answers: making the base image locally"
      scripts/base-image.sh "$LOCAL_BASE"
    fi
  fi
fi
[ -n "$BASE" ] && args+=(--build-arg "BASE=$BASE")

# torch: the pinned CPU wheel from a local wheel folder when one holds it (no torch index
# answers here), mounted into the build; else the Dockerfiles' default CPU index. podman only:
# docker build cannot mount a host folder.
torch_args=()
if [ "$RUNTIME" = podman ] && [ -n "${PIP_FIND_LINKS:-}" ] &&
  compgen -G "$PIP_FIND_LINKS/torch-2.13.0+cpu-*.whl" >/dev/null; then
  torch_args=(-v "$PIP_FIND_LINKS:/wheels:ro" --build-arg WHEELS=/wheels --build-arg TORCH_INDEX=)
fi

for service in "${services[@]}"; do
  case "$service" in
    gateway) dockerfile=gateway/Dockerfile extra=() ;;
    retriever) dockerfile=retriever-svc/Dockerfile extra=("${torch_args[@]}") ;;
    reranker) dockerfile=reranker-svc/Dockerfile extra=("${torch_args[@]}") ;;
    llm) dockerfile=llm-svc/Dockerfile extra=() ;;
    *) echo "make images: unknown service '$service' (gateway, retriever, reranker, llm)" >&2; exit 2 ;;
  esac
  mkdir -p run
  log=run/image-$service.log
  start=$SECONDS
  echo "building ragline/$service:$TAG with $RUNTIME (log: $log)"
  if ! "$RUNTIME" build "${args[@]}" "${extra[@]}" -f "$dockerfile" -t "ragline/$service:$TAG" . >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "make images: ragline/$service:$TAG failed; full log in $log" >&2
    exit 1
  fi
  size=$("$RUNTIME" image inspect --format '{{.Size}}' "ragline/$service:$TAG")
  echo "built ragline/$service:$TAG in $((SECONDS - start)) s, $((size / 1000000)) MB"
done
