#!/usr/bin/env bash
# Installs what `make up` and `make test` need, idempotently.
#   scripts/bootstrap.sh          Python packages into .venv
#   scripts/bootstrap.sh --system also the Debian packages the tests run for real
# TORCH (default torch==2.13.0) picks the torch build: on this project's CPU machines that
# version resolves to a local CPU wheel; on a GPU host pip's default is a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
VENV=.venv

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "need root to run: $*" >&2; return 1; fi; }

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

if [ "${1:-}" = "--system" ]; then
  apt_install nginx redis-server
  # Debian enables and starts a system nginx/redis on install; the stack runs its own.
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  # Debian splits venv support into python3-venv; install it only when venv fails.
  if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    apt_install python3-venv
    "$PYTHON" -m venv "$VENV"
  fi
fi
pip=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
log="$VENV/install.log"
echo "installing Python packages into $VENV (log: $log)"
run_pip() {
  if ! "${pip[@]}" "$@" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "pip install $* failed; full log in $log" >&2
    exit 1
  fi
}
run_pip install --upgrade 'pip>=25.1'
# torch first, so sentence-transformers finds it satisfied and never pulls another build.
run_pip install "$TORCH"
run_pip install -e ./common -e ./retriever-svc -e ./reranker-svc -e ./llm-svc -e ./gateway -e ./cli \
  --group dev
"$VENV/bin/python" -c 'import ragline_gateway, ragline_retriever, ragline_reranker, ragline_llm, ragline_cli'
touch "$VENV/.installed"
