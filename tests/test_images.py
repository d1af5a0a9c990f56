"""The four images, built by `make images` and run as the Kubernetes manifests run them.

What users deploy is the images, not the editable installs the other tests run: a package
that drops a module, a writable path the code needs but no manifest mounts, or a probe on
the wrong port shows only here. The images are started as deploy/k8s/overlays/cpu runs them
(read-only root, its user, every capability dropped, no privilege escalation, exactly the
manifest's writable mounts, its settings and probe paths), on the host network with
redis-server and nginx beside them; then a document is ingested through nginx, an answer
streams that cites it, the retriever is stopped and started again on its volume, and every
container is SIGTERMed and must exit 0 within its grace period.

Departures from a cluster, each needed to run on one machine: every service listens on a
free port (its RAGLINE_*_PORT) and reaches the others on loopback instead of at Service
names; the retriever uses its embedded stores (Elasticsearch cannot run here; the cpu
overlay's try-it Elasticsearch and Milvus are stock images), so its data folder, an
emptyDir in the manifest, is a volume here that outlives its restart (its write log is in
the Redis beside it, as in the cluster); the api-keys Secret is a folder mounted
read-only where the manifest mounts the Secret.

Skipped, with the reason, only where neither docker nor podman can run containers. The
first build on a clean machine takes about 4 minutes (README, "Images").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from ragline_cli.processes import ManagedProcess, free_port, nginx, redis_server

from manifests import ROOT, config_of, pod_spec, render, workload
from service_helpers import bearer, poll, write_keys
from sse_client import read_events

# The first test's set-up builds the images: about 4 minutes on a clean 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

TAG = "dev"
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "cpu"
# Manifest workload -> (Dockerfile folder, settings prefix).
SERVICES = {
    "gateway": ("gateway", "RAGLINE_GATEWAY"),
    "retriever": ("retriever-svc", "RAGLINE_RETRIEVER"),
    "reranker": ("reranker-svc", "RAGLINE_RERANKER"),
    "llm": ("llm-svc", "RAGLINE_LLM"),
}
DOC = {
    "id": "kakapo",
    "title": "The kakapo",
    "url": "https://example.org/kakapo",
    "text": (
        "The kakapo is a large, flightless, nocturnal parrot endemic to New Zealand. "
        "Kakapo breed only in years when the rimu trees fruit heavily, about every two "
        "to four years, and each female lays one to four eggs."
    ),
}
QUESTION = "How often do kakapo breed?"


def container_runtime() -> str:
    """docker or podman, as `make images` picks it; skips the module, with the reason,
    where neither can run containers."""
    proc = subprocess.run(
        ["scripts/images.sh", "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        pytest.skip(f"no container runtime: {proc.stdout.strip() or proc.stderr.strip()}")
    return proc.stdout.strip()


def runtime_env() -> dict[str, str]:
    """The podman settings scripts/container-runtime.sh uses (runc, the VM's ulimits)."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(ROOT / "scripts" / "podman" / "containers.conf"))
    return env


def run(*argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=runtime_env()
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def runtime() -> str:
    name = container_runtime()
    # The test builds what it runs: a stale image would test yesterday's code. With the
    # runtime's layer cache this takes seconds after the first build.
    proc = subprocess.run(
        ["scripts/images.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1800,
        check=False, env={**runtime_env(), "TAG": TAG},
    )  # fmt: skip
    print(proc.stdout)
    assert proc.returncode == 0, f"make images failed:\n{proc.stdout}\n{proc.stderr}"
    return name


def image_config(runtime: str, service: str) -> dict[str, Any]:
    """The image's run configuration (podman keeps the health check beside it, docker in it)."""
    out = json.loads(run(runtime, "image", "inspect", f"ragline/{service}:{TAG}").stdout)[0]
    config: dict[str, Any] = out["Config"]
    if "Healthcheck" not in config and out.get("Healthcheck"):
        config["Healthcheck"] = out["Healthcheck"]
    return config


# --- what a manifest asks of a container ------------------------------------------------


@dataclass
class Spec:
    """One service's container as the manifest defines it."""

    service: str
    container: dict[str, Any]
    pod: dict[str, Any]
    env: dict[str, str]
    claims: set[str]  # volume names that are StatefulSet volumeClaimTemplates

    @property
    def port(self) -> int:
        return int(self.container["ports"][0]["containerPort"])

    def user(self) -> str:
        pod_ctx = self.pod.get("securityContext", {})
        ctx = {**pod_ctx, **self.container.get("securityContext", {})}
        return f"{ctx['runAsUser']}:{ctx.get('runAsGroup', ctx['runAsUser'])}"

    def probe_paths(self) -> dict[str, str]:
        return {
            kind: self.container[kind]["httpGet"]["path"]
            for kind in ("startupProbe", "readinessProbe", "livenessProbe")
            if kind in self.container
        }

    def startup_deadline(self) -> float:
        probe = self.container["startupProbe"]
        return float(probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3))

    def grace(self) -> float:
        return float(self.pod.get("terminationGracePeriodSeconds", 30))

    def mounts(self) -> dict[str, dict[str, Any]]:
        """mountPath -> the volume behind it ({"claim": name} for a volume claim).

        The retriever's data folder is an emptyDir in the manifest (with remote stores it
        holds nothing durable); here it holds the embedded stores, so it is a volume that
        outlives the restart, named "data" like a claim."""
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        data_dir = self.env.get("RAGLINE_RETRIEVER_DATA_DIR")
        found = {}
        for mount in self.container.get("volumeMounts", []):
            name = mount["name"]
            if name in self.claims or mount["mountPath"] == data_dir:
                found[mount["mountPath"]] = {"claim": "data"}
            else:
                found[mount["mountPath"]] = volumes[name]
        return found


def manifest_specs() -> dict[str, Spec]:
    objects = render(OVERLAY)
    specs = {}
    for service in SERVICES:
        w = workload(objects, service)
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        pod = pod_spec(w)
        specs[service] = Spec(service, pod["containers"][0], pod, config_of(objects, w), claims)
    return specs


# --- running the images as the manifests do ----------------------------------------------


@dataclass
class Container:
    runtime: str
    spec: Spec
    port: int
    env: dict[str, str]
    secrets: dict[str, Path]
    volumes: dict[str, str]  # claim name -> runtime volume
    name: str = ""
    started: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        spec = self.spec
        ctx = {**spec.pod.get("securityContext", {}), **spec.container.get("securityContext", {})}
        argv = [self.runtime, "run", "-d", "--name", self.name, "--network", "host"]
        argv += ["--user", spec.user()]
        if ctx.get("readOnlyRootFilesystem"):
            argv.append("--read-only")
            if self.runtime == "podman":  # podman's --read-only adds writable /tmp, /run
                argv.append("--read-only-tmpfs=false")
        for cap in ctx.get("capabilities", {}).get("drop", []):
            argv += ["--cap-drop", cap]
        if ctx.get("allowPrivilegeEscalation") is False:
            argv += ["--security-opt", "no-new-privileges"]
        for path, volume in spec.mounts().items():
            if "claim" in volume:
                argv += ["-v", f"{self.volumes[volume['claim']]}:{path}"]
            elif "emptyDir" in volume:
                argv += ["--tmpfs", f"{path}:rw,mode=1777"]
            elif "secret" in volume:
                folder = self.secrets[volume["secret"]["secretName"]]
                argv += ["-v", f"{folder}:{path}:ro"]
            else:
                raise AssertionError(f"{spec.service}: no stand-in for volume {volume}")
        for key, value in self.env.items():
            argv += ["-e", f"{key}={value}"]
        argv.append(f"ragline/{spec.service}:{TAG}")
        argv += spec.container.get("command", []) + spec.container.get("args", [])
        return argv

    def start(self) -> None:
        self.name = f"ragline-test-{self.spec.service}-{uuid.uuid4().hex[:8]}"
        run(*self.argv())
        self.started.append(self.name)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def state(self) -> dict[str, Any]:
        out = run(self.runtime, "inspect", self.name).stdout
        state: dict[str, Any] = json.loads(out)[0]["State"]
        return state

    def logs(self) -> str:
        proc = run(self.runtime, "logs", "--tail", "60", self.name, check=False)
        return proc.stdout + proc.stderr

    def wait_started(self, probe: str = "startupProbe") -> None:
        """Polls the probe's path within the manifest's startup budget."""
        path = self.spec.probe_paths()[probe]
        deadline = time.monotonic() + self.spec.startup_deadline()
        while time.monotonic() < deadline:
            if not self.state().get("Running"):
                raise AssertionError(f"{self.name} exited while starting:\n{self.logs()}")
            try:
                if httpx.get(self.url(path), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{self.name}: {path} not 200 in time:\n{self.logs()}")

    def stop(self) -> tuple[int, float]:
        """SIGTERM, the runtime's kill after the grace period; (exit code, seconds taken)."""
        began = time.monotonic()
        run(self.runtime, "stop", "-t", str(int(self.spec.grace())), self.name, timeout=120)
        return int(self.state()["ExitCode"]), time.monotonic() - began


@dataclass
class Deployment:
    runtime: str
    containers: dict[str, Container]
    public_url: str
    key: str


def container_env(spec: Spec, ports: dict[str, int], redis_port: int) -> dict[str, str]:
    """The manifest's settings, with addresses moved to loopback ports (module docstring)."""
    prefix = SERVICES[spec.service][1]
    env = dict(spec.env)
    env[f"{prefix}_PORT"] = str(ports[spec.service])
    if f"{prefix}_METRICS_PORT" in env:  # a port of its own in the pod; any free one here
        env[f"{prefix}_METRICS_PORT"] = str(free_port())
    if spec.service == "gateway":
        for upstream in ("retriever", "reranker", "llm"):
            env[f"{prefix}_{upstream.upper()}_URL"] = f"http://127.0.0.1:{ports[upstream]}"
        env[f"{prefix}_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    if spec.service == "retriever":
        for setting in ("LEXICAL_BACKEND", "ES_URL", "DENSE_BACKEND", "MILVUS_URI"):
            env.pop(f"{prefix}_{setting}", None)
        # The shared write log in the Redis beside it, as in the cluster.
        env[f"{prefix}_WRITE_LOG_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    return env


@pytest.fixture(scope="module")
def deployment(runtime: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("images")
    specs = manifest_specs()
    ports = {service: free_port() for service in specs}
    volume = f"ragline-test-retriever-data-{uuid.uuid4().hex[:8]}"
    run(runtime, "volume", "create", volume)

    keys_dir = work / "keys"
    keys_dir.mkdir(mode=0o755)
    keys = write_keys(
        keys_dir / "keys.json",
        [{"id": "smoke", "tenant": "smoke", "scopes": ["chat", "admin"], "collections": ["smoke"]}],
    )
    (keys_dir / "keys.json").chmod(0o444)

    redis_port = free_port()
    helpers: list[ManagedProcess] = [redis_server(redis_port, work / "redis").start()]
    containers = {
        service: Container(
            runtime,
            spec,
            ports[service],
            container_env(spec, ports, redis_port),
            secrets={"ragline-api-keys": keys_dir},
            volumes={"data": volume},
        )
        for service, spec in specs.items()
    }
    try:
        helpers[0].wait_ready(15)
        for c in containers.values():
            c.start()
        # As Kubernetes routes to a pod: started, then ready.
        for c in containers.values():
            c.wait_started()
        for c in containers.values():
            c.wait_started("readinessProbe")
        nginx_port = free_port()
        proxy = nginx(nginx_port, f"127.0.0.1:{ports['gateway']}", work / "nginx", ROOT / "web")
        helpers.append(proxy.start())
        proxy.wait_ready(15)
        deployment = Deployment(
            runtime, containers, f"http://127.0.0.1:{nginx_port}", keys["smoke"]
        )
        ingest(deployment)
        yield deployment
    finally:
        for helper in helpers:
            helper.stop()
        for c in containers.values():
            for name in c.started:
                run(runtime, "rm", "-f", "-t", "0", name, check=False)
        run(runtime, "volume", "rm", "-f", volume, check=False)


def ingest(deployment: Deployment) -> None:
    """Ingests DOC; a 503 with Retry-After is waited out as a client would (the gateway
    watches its upstreams once a second and may not have seen the retriever come up)."""

    def post() -> httpx.Response | None:
        response = httpx.post(
            f"{deployment.public_url}/api/collections/smoke/documents",
            json={"documents": [DOC]},
            headers=bearer(deployment.key),
            timeout=120,
        )
        if response.status_code == 503 and "retry-after" in response.headers:
            return None
        return response

    response = poll(post, 60, "ingest through nginx", interval=1.0)
    assert response.status_code == 200, response.text


def ask(deployment: Deployment) -> list[Any]:
    """One answer through nginx; waits (with a deadline) until the gateway is ready."""
    poll(
        lambda: httpx.get(f"{deployment.public_url}/readyz", timeout=2).status_code == 200,
        60,
        "gateway ready through nginx",
    )
    with httpx.stream(
        "POST",
        f"{deployment.public_url}/api/chat",
        json={"message": QUESTION, "collection": "smoke"},
        headers=bearer(deployment.key),
        timeout=120,
    ) as response:
        assert response.status_code == 200, response.read()
        return read_events(response)


def assert_cited_answer(events: list[Any]) -> None:
    names = [e.name for e in events]
    assert names[0] == "meta" and names[-1] == "done", names
    assert "error" not in names
    sources = events[names.index("sources")].data["sources"]
    assert sources and sources[0]["doc_id"] == DOC["id"], sources
    answer = "".join(e.data["text"] for e in events if e.name == "token")
    assert "[1]" in answer and "rimu" in answer, answer
    assert events[-1].data["degraded"] == [], events[-1].data


# --- the tests ------------------------------------------------------------------------------


def test_every_probe_of_the_manifests_answers(deployment: Deployment) -> None:
    for c in deployment.containers.values():
        for kind, path in c.spec.probe_paths().items():
            status = httpx.get(c.url(path), timeout=3).status_code
            assert status == 200, f"{c.spec.service} {kind} {path}: {status}"


def test_containers_run_unprivileged_on_a_read_only_root(deployment: Deployment) -> None:
    for c in deployment.containers.values():
        probe = run(
            deployment.runtime, "exec", c.name, "python", "-c",
            "import os\n"
            "print(os.getuid(), os.getgid())\n"
            "try:\n    open('/probe', 'w')\nexcept OSError as e:\n    print('errno', e.errno)\n"
            "print(open('/proc/self/status').read())",
        ).stdout  # fmt: skip
        uid, gid = c.spec.user().split(":")
        assert probe.splitlines()[0] == f"{uid} {gid}", c.spec.service
        assert probe.splitlines()[1] == "errno 30", f"{c.spec.service}: root is writable"  # EROFS
        caps = dict(re.findall(r"^(Cap\w+):\s*(\w+)$", probe, re.MULTILINE))
        assert int(caps["CapEff"], 16) == 0 and int(caps["CapBnd"], 16) == 0, caps
        assert re.search(r"^NoNewPrivs:\s*1$", probe, re.MULTILINE), c.spec.service


def test_an_answer_through_the_containers_cites_the_ingested_document(
    deployment: Deployment,
) -> None:
    assert_cited_answer(ask(deployment))


def test_the_retriever_keeps_its_chunks_across_a_restart(deployment: Deployment) -> None:
    retriever = deployment.containers["retriever"]
    code, took = retriever.stop()
    assert code == 0, retriever.logs()
    assert took < retriever.spec.grace(), took
    retriever.start()
    retriever.wait_started()
    retriever.wait_started("readinessProbe")
    # Nothing was ingested again: the chunks come from the volume.
    assert_cited_answer(ask(deployment))


def test_every_container_exits_0_on_sigterm_within_its_grace(deployment: Deployment) -> None:
    containers = list(deployment.containers.values())
    with ThreadPoolExecutor(len(containers)) as pool:
        results = list(pool.map(Container.stop, containers))
    for c, (code, took) in zip(containers, results, strict=True):
        assert code == 0, f"{c.spec.service} exited {code}:\n{c.logs()}"
        assert took < c.spec.grace(), f"{c.spec.service} took {took:.1f}s"


# --- the manifests and the images agree ----------------------------------------------------


@dataclass
class ImageFacts:
    """What an image does by itself, from its Dockerfile or from the built image."""

    user: str
    ports: set[int]
    cmd: list[str]
    volumes: set[str]
    home: str | None
    healthcheck: str


def dockerfile_facts(service: str) -> ImageFacts:
    """The final stage of the service's Dockerfile (runs without any container runtime)."""
    text = (ROOT / SERVICES[service][0] / "Dockerfile").read_text().replace("\\\n", " ")
    final = text[text.rindex("\nFROM ") :]
    user = re.findall(r"^USER (\S+)$", final, re.MULTILINE)[-1]
    ports = {int(p) for p in re.findall(r"^EXPOSE (\d+)", final, re.MULTILINE)}
    cmd = json.loads(re.findall(r"^CMD (\[.*\])$", final, re.MULTILINE)[-1])
    volumes: set[str] = set()
    for found in re.findall(r"^VOLUME (\[.*\])$", final, re.MULTILINE):
        volumes |= set(json.loads(found))
    home = re.search(r"\bHOME=(\S+)", final)
    check = re.search(r"^HEALTHCHECK .*$", final, re.MULTILINE)
    return ImageFacts(
        user, ports, cmd, volumes, home.group(1) if home else None, check.group(0) if check else ""
    )


def built_image_facts(runtime: str, service: str) -> ImageFacts:
    config = image_config(runtime, service)
    env = dict(item.split("=", 1) for item in config.get("Env", []))
    health = config.get("Healthcheck") or {}
    return ImageFacts(
        config["User"],
        {int(p.split("/")[0]) for p in config.get("ExposedPorts", {})},
        config["Cmd"],
        set(config.get("Volumes") or {}),
        env.get("HOME"),
        " ".join(health.get("Test", [])),
    )


def assert_agree(spec: Spec, image: ImageFacts) -> None:
    service, prefix = spec.service, SERVICES[spec.service][1]
    assert image.user == spec.user(), f"{service}: image runs as {image.user}"
    assert spec.port in image.ports, f"{service}: image exposes {image.ports}, not {spec.port}"
    assert spec.env.get(f"{prefix}_PORT", str(spec.port)) == str(spec.port), service
    # The manifest runs the image's own command (or names the same one).
    assert spec.container.get("command", image.cmd) == image.cmd, service
    assert not spec.container.get("args"), service
    mounts = set(spec.mounts())
    assert image.volumes <= mounts, f"{service}: volumes {image.volumes - mounts} not mounted"
    if image.home and image.home != "/nonexistent":
        assert image.home in mounts, f"{service}: HOME {image.home} is not writable"
    # The image's own health check asks the readiness path on the port the setting names.
    ready = spec.probe_paths()["readinessProbe"]
    assert f"/{ready.lstrip('/')}'" in image.healthcheck, image.healthcheck
    assert f"'{prefix}_PORT', '{spec.port}'" in image.healthcheck, image.healthcheck


@pytest.mark.parametrize("service", SERVICES)
def test_each_manifest_runs_its_dockerfile_as_written(service: str) -> None:
    assert_agree(manifest_specs()[service], dockerfile_facts(service))


@pytest.mark.parametrize("service", SERVICES)
def test_each_manifest_runs_its_built_image_as_built(runtime: str, service: str) -> None:
    assert_agree(manifest_specs()[service], built_image_facts(runtime, service))
