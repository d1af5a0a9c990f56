# Sourced by scripts/images.sh (and run by tests/test_images.py): picks the container runtime.
# docker where a docker daemon answers (a docker CLI alone is not enough), else podman. Sets
# RUNTIME (docker|podman), or leaves it empty with RUNTIME_MISSING saying why.
RUNTIME=""
RUNTIME_MISSING=""
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  RUNTIME=docker
elif command -v podman >/dev/null 2>&1; then
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/scripts/podman/containers.conf}
  if podman info >/dev/null 2>&1; then
    RUNTIME=podman
  else
    RUNTIME_MISSING="podman is installed but cannot run here: $(podman info 2>&1 | tail -n 1)"
  fi
else
  RUNTIME_MISSING="no docker daemon answers and podman is not installed (scripts/bootstrap.sh --system installs it)"
fi
