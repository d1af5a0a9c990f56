"""What users install is a wheel (an image installs one), not the editable tree the tests
otherwise run: each package's wheel must hold every module of its source tree, and each
module must import from the wheel alone.

The gateway and llm-svc packages once listed only their top package, so their wheels left
out `clients/` and `engines/` and their images exited at start; editable installs hid it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from ragline_cli.stack import REPO_ROOT

PACKAGES = {
    "common": "ragline_common",
    "gateway": "ragline_gateway",
    "retriever-svc": "ragline_retriever",
    "reranker-svc": "ragline_reranker",
    "llm-svc": "ragline_llm",
    "cli": "ragline_cli",
}
# Modules that need a dependency only their own deployment installs (vLLM has a venv and
# an image of its own): their import may fail on that dependency, never on one of ours.
OPTIONAL_DEPENDENCIES = {"ragline_llm.engines.vllm_engine": "vllm"}


def source_modules(folder: str, package: str) -> list[str]:
    root = REPO_ROOT / folder
    return sorted(p.relative_to(root).as_posix() for p in (root / package).rglob("*.py"))


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    built = {}
    for folder in PACKAGES:
        # From a copy without build/: setuptools packs whatever an earlier build left there.
        source = out / "src" / folder
        leftovers = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
        shutil.copytree(REPO_ROOT / folder, source, ignore=leftovers)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "-w", str(out / folder), str(source)],
            check=True, timeout=300,
        )  # fmt: skip
        (built[folder],) = (out / folder).glob("*.whl")
    return built


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_the_wheel_holds_every_module(wheels: dict[str, Path], folder: str) -> None:
    with zipfile.ZipFile(wheels[folder]) as wheel:
        inside = {name for name in wheel.namelist() if name.endswith(".py")}
    missing = [m for m in source_modules(folder, PACKAGES[folder]) if m not in inside]
    assert missing == []


def test_every_module_imports_from_the_wheels(wheels: dict[str, Path], tmp_path: Path) -> None:
    """A fresh venv holding only the six wheels; third-party packages come from the dev
    venv's site-packages on PYTHONPATH, which does not run its `.pth` files, so the editable
    installs of our own packages are not seen there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    for wheel in wheels.values():
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(target)
    modules = [
        m.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for folder, package in PACKAGES.items()
        for m in source_modules(folder, package)
    ]
    script = (
        "import importlib, json, sys\n"
        "failed = {}\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        module = importlib.import_module(name)\n"
        "        assert module.__file__.startswith(sys.argv[1]), module.__file__\n"
        "    except ModuleNotFoundError as exc:\n"
        "        failed[name] = exc.name\n"
        "print(json.dumps(failed))\n"
    )
    result = subprocess.run(
        [str(python), "-c", script, target],
        env={"PYTHONPATH": sysconfig.get_paths()["purelib"], "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert failed == {k: v for k, v in OPTIONAL_DEPENDENCIES.items() if k in failed}
    assert all(not v.startswith("ragline") for v in failed.values())
