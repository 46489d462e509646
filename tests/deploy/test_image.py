"""The image recipe, checked statically (no Docker engine here): pinned bases, locked dependencies,
stubs generated inside, a final stage without build tools running as uid 10001."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import tomllib

import pytest

from tests.deploy.conftest import ROOT

DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
LOCKED = ROOT / "deploy" / "docker" / "locked_requirements.py"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    )
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {"(global)": []}
    current = "(global)"
    for instruction, args in _instructions(DOCKERFILE.read_text()):
        if instruction == "FROM":
            current = args.split(" AS ")[-1].strip() if " AS " in args else args
            stages[current] = []
        stages[current].append((instruction, args))
    return stages


def _global_args() -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in _stages()["(global)"] if i == "ARG" and "=" in a)


def test_base_images_are_exact_versions() -> None:
    args = _global_args()
    assert re.fullmatch(r"docker\.io/library/python:3\.11\.\d+-slim-\w+", args["PYTHON_IMAGE"]), args
    assert re.fullmatch(r"ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+", args["UV_IMAGE"]), args
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert ">=3.11" in requires and "<3.12" in requires  # the image's Python is the project's


def test_stages_and_their_order() -> None:
    assert list(_stages()) == ["(global)", "uv", "builder", "runtime"]


def test_builder_installs_exactly_the_lock_and_generates_the_stubs() -> None:
    runs = " ".join(a for i, a in _stages()["builder"] if i == "RUN")
    assert "uv sync --frozen --no-dev --no-install-project" in runs
    assert "uv sync --frozen --no-dev --no-editable" in runs
    assert "locked_requirements.py /tmp/lock/uv.lock grpcio-tools" in runs
    assert "--require-hashes" in runs
    assert "PYTHON=/opt/protoc/bin/python bash scripts/gen_protos.sh" in runs
    assert runs.index("gen_protos.sh") < runs.index("--no-editable")  # stubs exist before the wheel is built


def test_runtime_stage_is_minimal_and_non_root() -> None:
    runtime = _stages()["runtime"]
    text = " ".join(f"{i} {a}" for i, a in runtime)
    copies = [a for i, a in runtime if i == "COPY"]
    assert copies == ["--from=builder --chown=root:root /app/.venv /app/.venv"]
    for tool in ("uv ", "grpc_tools", "grpcio-tools", "apt-get install", "gcc", "protoc", "/opt/protoc"):
        assert tool not in text, f"{tool!r} in the runtime stage"
    assert "pip uninstall" in text
    assert ("USER", "10001:10001") in runtime
    assert ("ENTRYPOINT", '["python", "-m"]') in runtime
    assert ("CMD", '["services.gateway"]') in runtime
    assert "useradd --system --uid 10001" in text
    assert ("STOPSIGNAL", "SIGTERM") in runtime
    labels = " ".join(a for i, a in runtime if i == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "source", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    env = " ".join(a for i, a in runtime if i == "ENV")
    assert "FLASHCROWD_HOST=0.0.0.0" in env and "FLASHCROWD_PORT=50051" in env and "HOME=/tmp" in env


def _dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes (enough for our allow-list)."""
    allowed = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatch(p, pattern) for p in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        )
        if hit:
            allowed = negate
    return allowed


def test_build_context_is_an_allow_list() -> None:
    sources = []
    for stage in _stages().values():
        for instruction, args in stage:
            if instruction == "COPY" and "--from" not in args:
                sources += args.split()[:-1]
    sources += [m for m in re.findall(r"source=([\w./-]+)", DOCKERFILE.read_text())]
    assert sources
    for source in sources:
        assert _dockerignore_allows(source.rstrip("/")), f"{source} is excluded from the build context"
        assert (ROOT / source).exists(), source
    for excluded in (
        ".venv/bin/python",
        ".git/HEAD",
        "gen/flashcrowd/__init__.py",
        "tests/conftest.py",
        "var/store/x",
        "services/__pycache__/x.pyc",
        "node_modules/x",
        "deploy/k8s/base/x",
    ):
        assert not _dockerignore_allows(excluded), excluded


def test_locked_requirements_pin_the_lock_versions_with_hashes() -> None:
    lock = {p["name"]: p for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    result = subprocess.run(
        [sys.executable, str(LOCKED), str(ROOT / "uv.lock"), "grpcio-tools"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = {line.split("==")[0]: line for line in result.stdout.splitlines()}
    assert {"grpcio-tools", "grpcio", "protobuf"} <= set(lines)
    for name, line in lines.items():
        assert line.startswith(f"{name}=={lock[name]['version']}"), line
        assert "--hash=sha256:" in line
    # The generator's protobuf is the runtime's: stubs match the library that loads them.
    assert lines["protobuf"].split()[0] == f"protobuf=={lock['protobuf']['version']}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["no-such-package"], "no-such-package is not in the lock file"),
        ([], "usage: locked_requirements.py UV_LOCK PACKAGE"),
    ],
)
def test_locked_requirements_errors(argv, message) -> None:
    args = [str(ROOT / "uv.lock"), *argv] if argv else []
    result = subprocess.run([sys.executable, str(LOCKED), *args], capture_output=True, text=True, check=False)
    assert result.returncode != 0 and message in result.stderr
