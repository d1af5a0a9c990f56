"""A real Milvus standalone server for the tests, started the way redis-server is: once per
session, on free loopback ports, in a temporary data directory, stopped at the end.

`milvus_server_uri` is the fixture: `RAGLINE_TEST_MILVUS_URI` when that names a server,
else a Milvus 2.3.5 standalone (PyPI `milvus`, installed into .venv-milvus by
`scripts/milvus-server.sh`), else the tests that need it are skipped with that hint.

The package's own `milvus-server` launcher picks the HTTP port (9091: /healthz, /metrics)
itself, by probing upward from 9091, without saying which it took, and leaves the embedded
etcd on 2379/2380; two sessions on one machine would collide or talk to each other's etcd.
So the launcher below uses the package's config writer, then execs the `milvus` binary
(unpacked once by the install script) with every port chosen here: the nine gRPC ports
through the config, the HTTP one through METRICS_PORT, etcd's client and peer ports through
an embed-etcd file (ETCD_CONFIG_PATH). All are free ports, so two test sessions never
collide. What cannot be moved: the gRPC ports listen on every
interface (Milvus 2.3 binds `:port`; each role's `ip` only sets the address it advertises,
set to 127.0.0.1 here so the components talk over loopback); etcd listens on loopback only.

`python tests/milvus_server.py` runs one in the foreground (in a fresh temporary data
directory) and prints its URI, for `RAGLINE_TEST_MILVUS_URI=... pytest` loops.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MILVUS_VENV = REPO_ROOT / ".venv-milvus"
MILVUS_BINARY = MILVUS_VENV / "server" / "bin" / "milvus"  # unpacked by the install script
INSTALL_HINT = "install it with `scripts/milvus-server.sh` (`make test` does)"
# Ready in ~3 s from a fresh data directory on an idle machine, ~8 s on a busy one.
READY_TIMEOUT_S = 120.0
# SIGTERM stops an idle server in ~2 s; one that has loaded collections spends 10-20 s
# handing them over (common.gracefulStopTimeout does not shorten it). Its data is thrown
# away, so past this it is killed.
STOP_TIMEOUT_S = 5.0

# The config template's port settings (milvus/data/config.yaml.template); each gets a free
# port. etcd_port is only the client endpoint there: the embedded etcd's own listeners are
# set by the embed-etcd file below.
PORT_KEYS = (
    "proxy_port",
    "proxy_internal_port",
    "root_coord_port",
    "query_coord_port",
    "query_node_port",
    "index_coord_port",
    "index_node_port",
    "data_coord_port",
    "data_node_port",
    "etcd_port",
)
ROLES = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")

# Runs under .venv-milvus's python: writes DATA/configs/milvus.yaml with the package's own
# config writer, then becomes the server (exec of the binary that scripts/milvus-server.sh
# unpacked), so the process started here is the server itself. PR_SET_PDEATHSIG survives
# the exec: a test session killed outright takes its server with it.
_LAUNCH = r"""
import ctypes, json, os, signal, sys
from milvus import MilvusServerConfig
spec = json.loads(sys.argv[1])
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != spec["parent"]:
    sys.exit("the test session that started this server is gone")
config = MilvusServerConfig(data_dir=spec["data"], **spec["ports"])
for key, value in spec["extra"].items():
    config.set(key, value)
config.resolve()
base, exe = config.base_data_dir, spec["binary"]
env = dict(os.environ, DEPLOY_MODE="STANDALONE", MILVUS_RUN_DIR=os.path.join(base, "run"))
env["LD_LIBRARY_PATH"] = os.path.dirname(exe) + ":" + env.get("LD_LIBRARY_PATH", "")
env.update(spec["env"])
os.chdir(base)
os.execve(exe, [exe, "run", "standalone"], env)
"""


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports nobody listens on right now (the OS picks them)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def installed_python() -> Path | None:
    """.venv-milvus's python where scripts/milvus-server.sh finished, else None."""
    python = MILVUS_VENV / "bin" / "python"
    done = (MILVUS_VENV / ".installed").exists() and MILVUS_BINARY.exists()
    return python if done and python.exists() else None


class MilvusServerFailed(RuntimeError):
    pass


class MilvusServer:
    """One Milvus standalone under `base`, on free ports; a context manager."""

    def __init__(self, base: Path, python: Path) -> None:
        self.base = base
        self.python = python
        ports = free_ports(len(PORT_KEYS) + 2)
        self.ports = dict(zip(PORT_KEYS, ports, strict=False))
        self.http_port, self.etcd_peer_port = ports[-2:]
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = base / "milvus.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy_port']}"

    def _etcd_config(self) -> Path:
        client = f"http://127.0.0.1:{self.ports['etcd_port']}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        path = self.base / "embed-etcd.yaml"
        path.write_text(
            f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
            f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
            f"initial-cluster: default={peer}\n"
        )
        return path

    def start(self) -> None:
        spec = {
            "parent": os.getpid(),
            "binary": str(MILVUS_BINARY),
            "data": str(self.base / "data"),
            "ports": self.ports,
            "extra": {
                **{f"{role}.ip": "127.0.0.1" for role in ROLES},
                # A Strong read waits for the proxy's next time tick: 20 ms, not 200, keeps
                # the suite fast (the retriever reads Strong just after its own writes).
                "proxy.timeTickInterval": 20,
            },
            "env": {
                "METRICS_PORT": str(self.http_port),
                "ETCD_CONFIG_PATH": str(self._etcd_config()),
            },
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.python), "-c", _LAUNCH, json.dumps(spec)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends all of it
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Seconds until /healthz answers OK; raises if the server exits or the deadline
        passes. Each poll waits on the process itself, so an exit is seen at once."""
        assert self.process is not None
        started = time.monotonic()
        deadline = started + timeout
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if b"OK" in response.read():
                        return time.monotonic() - started
            except (OSError, urllib.error.URLError):
                pass
            try:
                code = self.process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            raise MilvusServerFailed(f"milvus exited with {code}:\n{self.log_tail()}")
        raise MilvusServerFailed(f"milvus not ready in {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL past STOP_TIMEOUT_S."""
        process, self.process = self.process, None
        if process is None:
            return
        for sig, timeout in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # anything else left in the group (it spawns nothing today)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> MilvusServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture(scope="session")
def milvus_server_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URI of a real Milvus server for this session (see the module docstring)."""
    uri = os.environ.get("RAGLINE_TEST_MILVUS_URI")
    if uri:
        yield uri
        return
    python = installed_python()
    if python is None:
        reason = f"no Milvus server: set RAGLINE_TEST_MILVUS_URI, or {INSTALL_HINT}"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    with MilvusServer(tmp_path_factory.mktemp("milvus"), python) as server:
        yield server.uri


def drop_prefixed(uri: str, prefix: str) -> None:
    """Drops every collection on the server whose name starts with `prefix`."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    try:
        for name in client.list_collections():
            if name.startswith(prefix):
                client.drop_collection(name)
    finally:
        client.close()


def main() -> None:
    python = installed_python()
    if python is None:
        sys.exit(f"Milvus is not installed: {INSTALL_HINT}")
    # SIGTERM (`timeout`, a supervisor) stops it as Ctrl-C does, removing its data.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="milvus-test-") as base:
        server = MilvusServer(Path(base), python)
        server.start()
        try:
            took = server.wait_ready()
            print(f"RAGLINE_TEST_MILVUS_URI={server.uri}  (ready in {took:.1f} s; Ctrl-C stops it)")
            assert server.process is not None
            server.process.wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()


if __name__ == "__main__":
    main()
