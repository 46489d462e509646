"""Print hash-pinned requirements for one package of ``uv.lock`` and everything it depends on.

The image builder uses it to install the stub generator (``grpcio-tools``, a dev dependency) at
exactly the version and hashes the lock file pins, without installing the whole dev group:

    python locked_requirements.py uv.lock grpcio-tools > protoc.txt
    uv pip install --require-hashes -r protoc.txt

Standard library only (it runs before anything is installed). Environment markers on the
dependency edges are carried over, so a dependency that only applies elsewhere is skipped.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections import deque
from pathlib import Path


class LockError(Exception):
    """The lock file does not describe the requested package well enough to pin it."""


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _index(lock: dict) -> dict[str, list[dict]]:
    packages: dict[str, list[dict]] = {}
    for package in lock.get("package", []):
        packages.setdefault(normalise(package["name"]), []).append(package)
    return packages


def _pick(packages: dict[str, list[dict]], name: str, version: str | None) -> dict:
    candidates = packages.get(normalise(name), [])
    if version is not None:
        candidates = [p for p in candidates if p.get("version") == version]
    if not candidates:
        raise LockError(f"{name}{'==' + version if version else ''} is not in the lock file")
    if len(candidates) > 1:
        versions = ", ".join(str(p.get("version")) for p in candidates)
        raise LockError(f"{name} is locked at several versions ({versions}); the edge names none")
    return candidates[0]


def _hashes(package: dict) -> list[str]:
    artifacts = [*package.get("wheels", [])]
    if "sdist" in package:
        artifacts.append(package["sdist"])
    return sorted({a["hash"] for a in artifacts if "hash" in a})


def requirements(lock_text: str, root: str) -> list[str]:
    """Requirement lines (``name==version ; marker --hash=...``) for ``root`` and its closure."""
    packages = _index(tomllib.loads(lock_text))
    # name -> markers of the edges that reach it (None = unconditional)
    reached: dict[str, set[str | None]] = {}
    chosen: dict[str, dict] = {}
    queue: deque[tuple[str, str | None, str | None]] = deque([(root, None, None)])
    while queue:
        name, version, marker = queue.popleft()
        package = _pick(packages, name, version)
        key = normalise(package["name"])
        first_visit = key not in chosen
        chosen[key] = package
        reached.setdefault(key, set()).add(marker)
        if not first_visit:
            continue
        for dep in package.get("dependencies", []):
            queue.append((dep["name"], dep.get("version"), dep.get("marker")))
    lines = []
    for key in sorted(chosen):
        package = chosen[key]
        source = package.get("source", {})
        if "registry" not in source:
            raise LockError(f"{package['name']} does not come from a package registry ({source})")
        hashes = _hashes(package)
        if not hashes:
            raise LockError(f"{package['name']} has no artifact hashes in the lock file")
        markers = reached[key]
        marker = "" if None in markers else " ; " + " or ".join(f"({m})" for m in sorted(markers))
        pins = " ".join(f"--hash={h}" for h in hashes)
        lines.append(f"{package['name']}=={package['version']}{marker} {pins}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: locked_requirements.py UV_LOCK PACKAGE", file=sys.stderr)
        return 2
    try:
        lines = requirements(Path(argv[0]).read_text(encoding="utf-8"), argv[1])
    except (OSError, LockError, tomllib.TOMLDecodeError) as error:
        print(f"locked_requirements: {error}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
