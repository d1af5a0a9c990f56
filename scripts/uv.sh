# Sourced by scripts/*.sh: `uv`, installed by pip into a small tools venv on first use.
# Installs go through uv because it takes seconds where pip takes minutes (../shared FACTS
# measured 9 s against 1-7 min). The same uv version is pinned in the Dockerfiles (UV).
# uv does not read PIP_* settings (callers pass PIP_FIND_LINKS on themselves); a
# TLS-intercepting proxy's CA is trusted through the system store.
UV_VERSION=0.13.10
UV_VENV=.venv-tools
PYTHON=${PYTHON:-python3}

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

# make_venv DIR: a venv at DIR (Debian splits venv support into python3-venv; it is
# installed only when venv fails).
make_venv() {
  [ -x "$1/bin/python" ] && return 0
  if ! "$PYTHON" -m venv "$1" >/dev/null 2>&1; then
    rm -rf "$1"
    apt_install python3-venv
    "$PYTHON" -m venv "$1"
  fi
}

ensure_uv() {
  [ -x "$UV_VENV/bin/uv" ] && [ "$("$UV_VENV/bin/uv" --version | cut -d' ' -f2)" = "$UV_VERSION" ] && return 0
  make_venv "$UV_VENV"
  echo "installing uv $UV_VERSION into $UV_VENV"
  "$UV_VENV/bin/python" -m pip -q --disable-pip-version-check install "uv==$UV_VERSION" >"$UV_VENV/install.log" 2>&1 ||
    { tail -n 20 "$UV_VENV/install.log" >&2; exit 1; }
}

uv() {
  ensure_uv
  UV_SYSTEM_CERTS=1 "$UV_VENV/bin/uv" "$@"
}
