#!/usr/bin/env bash
# Installs a real Milvus standalone server for the tests, idempotently, into .venv-milvus.
#   scripts/milvus-server.sh          install (a no-op when the stamp is current)
# MILVUS_PACKAGE (default milvus==2.3.5) is PyPI's "Embedded Milvus": the real `milvus run
# standalone` binary with an embedded etcd, behind a small `milvus-server` launcher
# (../shared FACTS, "A real Milvus server"). It gets a venv of its own: it is a server, not a
# library the services import, and its `client` extra pins pymilvus < 2.4 where the stack has
# 3.0. tests/milvus_server.py starts it (`python tests/milvus_server.py` by hand). The
# server's binary and libraries (246 MB, shipped xz-compressed) are unpacked here once, into
# .venv-milvus/server/bin, instead of into every test session's data directory.
set -euo pipefail
cd "$(dirname "$0")/.."

MILVUS_PACKAGE=${MILVUS_PACKAGE:-milvus==2.3.5}
VENV=.venv-milvus
STAMP=$VENV/.installed

# The stamp holds the package spec it was made for: a changed MILVUS_PACKAGE reinstalls.
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$MILVUS_PACKAGE" ] && [ -x "$VENV/server/bin/milvus" ]; then
  exit 0
fi

source scripts/uv.sh
make_venv "$VENV"
echo '*' >"$VENV/.gitignore" # a venv is never committed, wherever .gitignore stands
links=()
[ -n "${PIP_FIND_LINKS:-}" ] && links=(--find-links "$PIP_FIND_LINKS")
echo "installing into $VENV: $MILVUS_PACKAGE (log: $VENV/install.log)"
if ! uv pip install --python "$VENV/bin/python" "${links[@]}" "$MILVUS_PACKAGE" >>"$VENV/install.log" 2>&1; then
  tail -n 40 "$VENV/install.log" >&2
  echo "install failed; full log in $VENV/install.log" >&2
  exit 1
fi
[ -x "$VENV/bin/milvus-server" ]
# The package's own unpacker (it skips files whose checksum matches).
"$VENV/bin/python" -c 'import sys, milvus; milvus._initialize_data_files(sys.argv[1])' "$VENV/server"
[ -x "$VENV/server/bin/milvus" ]
echo "$MILVUS_PACKAGE" >"$STAMP"
