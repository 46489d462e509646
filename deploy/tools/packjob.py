"""Build one pack in N user-id shards on Kubernetes: an Indexed Job, then the merge Job.

    # print the manifests (ConfigMap with the spec, the Indexed build Job, the merge Job)
    python deploy/tools/packjob.py render --overlay dev --tenant demo --pack-id clickers \\
        --spec spec.yaml --shards 8 --parallelism 4

    # apply the build, wait for every shard, then apply the merge and wait for it
    python deploy/tools/packjob.py run --overlay dev --tenant demo --pack-id clickers \\
        --spec spec.yaml --shards 8

The templates live in deploy/k8s/jobs/pack-build. They are rendered by kustomize *together with
the overlay*, so the Jobs get the overlay's namespace, the hashed names of its ConfigMaps and
Secrets, and the image (tag or digest) its audience Deployment runs: a build uses exactly the code
and configuration of the serving pods. Only the Jobs and the spec ConfigMap are kept.

Each shard pod runs ``flashcrowd pack build SPEC --tenant T --pack-id P --shard $(JOB_COMPLETION_INDEX)/N
--run-id R``; the merge runs ``flashcrowd pack merge --tenant T --pack-id P --shards N --run-id R``.
Everything of one run carries the label ``flashcrowd.io/pack-run=R``:
``kubectl delete job,configmap -l flashcrowd.io/pack-run=R`` cleans up (the Jobs also expire a day
after they finish).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from k8scheck import K8S, OVERLAYS, RenderError, kubectl_binary, render

TEMPLATES = K8S / "jobs" / "pack-build"
RUN_LABEL = "flashcrowd.io/pack-run"
COPIED_LABELS = (
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "flashcrowd.io/environment",
)
ID = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
RUN_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,22}[a-z0-9])?$")
MAX_SHARDS = 4096


class PackJobError(Exception):
    """Bad parameters or a failed build; the message says which and why."""


@dataclass(frozen=True)
class PackRun:
    tenant: str
    pack_id: str
    spec: Path
    shards: int
    parallelism: int
    run_id: str

    def validate(self) -> None:
        if not ID.match(self.tenant):
            raise PackJobError(f"--tenant {self.tenant!r}: 1-63 of a-z, 0-9, '-', starting with a letter")
        if not ID.match(self.pack_id):
            raise PackJobError(f"--pack-id {self.pack_id!r}: 1-63 of a-z, 0-9, '-', starting with a letter")
        if not RUN_ID.match(self.run_id):
            raise PackJobError(
                f"--run-id {self.run_id!r}: 1-24 of a-z, 0-9, '-' (it becomes part of Job names)"
            )
        if not 1 <= self.shards <= MAX_SHARDS:
            raise PackJobError(f"--shards must be in 1..{MAX_SHARDS}, got {self.shards}")
        if not self.parallelism >= 1:
            raise PackJobError(f"--parallelism must be at least 1, got {self.parallelism}")
        if not self.spec.is_file():
            raise PackJobError(f"--spec {self.spec}: no such file")

    @property
    def build_name(self) -> str:
        return f"pack-build-{self.run_id}"

    @property
    def merge_name(self) -> str:
        return f"pack-merge-{self.run_id}"


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def overlay_path(overlay: str | Path) -> Path:
    path = Path(overlay)
    if not (path / "kustomization.yaml").is_file():
        path = OVERLAYS / str(overlay)
    if not (path / "kustomization.yaml").is_file():
        raise PackJobError(f"overlay {overlay!r}: no kustomization.yaml (try dev or prod)")
    return path.resolve()


def _overlay_namespace(path: Path) -> str:
    document = yaml.safe_load((path / "kustomization.yaml").read_text(encoding="utf-8")) or {}
    namespace = document.get("namespace")
    if not namespace:
        raise PackJobError(f"overlay {path} sets no namespace")
    return namespace


def _set_env(container: dict[str, Any], values: dict[str, str]) -> None:
    for item in container.get("env", []):
        if item["name"] in values:
            item["value"] = values[item["name"]]


def render_pack_jobs(
    run: PackRun, overlay: str | Path = "dev", templates: Path = TEMPLATES
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The objects to apply (spec ConfigMap, build Job, merge Job) and, for checks, everything the
    combined render produced (the overlay's objects the Jobs refer to)."""
    run.validate()
    path = overlay_path(overlay)
    namespace = _overlay_namespace(path)
    with tempfile.TemporaryDirectory(prefix="packjob-") as tmp:
        work = Path(tmp)
        (work / "spec.yaml").write_bytes(run.spec.read_bytes())
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": namespace,
            "resources": [os.path.relpath(path, work), os.path.relpath(templates.resolve(), work)],
            "configMapGenerator": [{"name": "pack-spec", "files": ["spec.yaml"]}],
        }
        (work / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
        try:
            objs = render(work)
        except RenderError as error:
            raise PackJobError(str(error)) from None
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    audience = by_name.get(("Deployment", "audience"))
    if audience is None:
        raise PackJobError(f"overlay {path} renders no Deployment/audience to take the image from")
    image = audience["spec"]["template"]["spec"]["containers"][0]["image"]
    labels = {k: v for k, v in (audience["metadata"].get("labels") or {}).items() if k in COPIED_LABELS}
    labels[RUN_LABEL] = run.run_id
    labels["flashcrowd.io/tenant"] = run.tenant
    labels["flashcrowd.io/pack-id"] = run.pack_id

    spec_maps = [
        o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("pack-spec-")
    ]
    build = copy.deepcopy(by_name[("Job", "pack-build")])
    merge = copy.deepcopy(by_name[("Job", "pack-merge")])
    params = {
        "PACK_TENANT": run.tenant,
        "PACK_ID": run.pack_id,
        "PACK_SHARDS": str(run.shards),
        "PACK_RUN_ID": run.run_id,
    }
    for job, name in ((build, run.build_name), (merge, run.merge_name)):
        job["metadata"]["name"] = name
        job["metadata"].setdefault("labels", {}).update(labels)
        template = job["spec"]["template"]
        template["metadata"].setdefault("labels", {}).update(labels)
        for container in template["spec"]["containers"]:
            container["image"] = image
            _set_env(container, params)
    build["spec"]["completions"] = run.shards
    build["spec"]["parallelism"] = min(run.parallelism, run.shards)
    spec_map = copy.deepcopy(spec_maps[0])
    spec_map["metadata"].setdefault("labels", {}).update(labels)
    # For checks: the combined render with the finished Jobs instead of the templates.
    context = [
        o
        for o in objs
        if (o["kind"], o["metadata"]["name"]) not in {("Job", "pack-build"), ("Job", "pack-merge")}
        and not o["metadata"]["name"].startswith("pack-spec-")
    ]
    return [spec_map, build, merge], [*context, spec_map, build, merge]


def to_yaml(objs: Sequence[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objs, sort_keys=False)


# ------------------------------------------------------------------------------------------------
# run: apply the build, wait, apply the merge, wait
# ------------------------------------------------------------------------------------------------

Kubectl = Callable[[Sequence[str], str | None], str]


def kubectl_runner(binary: str | None = None) -> Kubectl:
    exe = binary or os.environ.get("KUBECTL") or kubectl_binary()

    def call(args: Sequence[str], stdin: str | None = None) -> str:
        result = subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise PackJobError(f"kubectl {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    return call


def job_state(status: dict[str, Any]) -> tuple[str, str]:
    """(``running`` | ``complete`` | ``failed``, a one-line description) of a Job's status."""
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return "complete", "complete"
        if condition.get("type") == "Failed":
            why = condition.get("reason", "Failed")
            message = condition.get("message", "")
            failed = status.get("failedIndexes")
            return "failed", f"{why}: {message}" + (f" (failed shards: {failed})" if failed else "")
    done = status.get("succeeded", 0)
    return (
        "running",
        f"{done} succeeded, {status.get('active', 0)} active, {status.get('failed', 0)} failed pods",
    )


def wait_for(
    kubectl: Kubectl,
    namespace: str,
    name: str,
    timeout: float,
    poll: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    deadline = clock() + timeout
    last = ""
    while True:
        status = json.loads(kubectl(["get", "job", name, "-n", namespace, "-o", "json"], None)).get(
            "status", {}
        )
        state, line = job_state(status)
        if line != last:
            print(f"job/{name}: {line}", flush=True)
            last = line
        if state == "complete":
            return
        if state == "failed":
            raise PackJobError(
                f"job/{name} failed: {line}; see kubectl logs -n {namespace} -l job-name={name} --prefix"
            )
        if clock() > deadline:
            raise PackJobError(f"job/{name} did not finish within {timeout:.0f}s ({line})")
        sleep(poll)


def run_pack_jobs(
    run: PackRun,
    overlay: str | Path,
    kubectl: Kubectl,
    *,
    timeout: float = 4 * 3600,
    poll: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    (spec_map, build, merge), _ = render_pack_jobs(run, overlay)
    namespace = build["metadata"]["namespace"]
    print(
        f"pack {run.tenant}/{run.pack_id}: run {run.run_id}, {run.shards} shard(s) in {namespace}", flush=True
    )
    kubectl(["apply", "-f", "-"], to_yaml([spec_map, build]))
    wait_for(kubectl, namespace, build["metadata"]["name"], timeout, poll, sleep)
    kubectl(["apply", "-f", "-"], to_yaml([merge]))
    wait_for(kubectl, namespace, merge["metadata"]["name"], timeout, poll, sleep)
    print(f"pack {run.tenant}/{run.pack_id}: run {run.run_id} merged", flush=True)


def main(argv: Sequence[str] | None = None, kubectl: Kubectl | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("render", "print the manifests"), ("run", "apply, wait for the shards, merge")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--overlay", default="dev", help="dev, prod or a kustomize directory (default dev)")
        p.add_argument("--tenant", required=True)
        p.add_argument("--pack-id", required=True)
        p.add_argument("--spec", required=True, type=Path, help="pack spec file (YAML/JSON)")
        p.add_argument("--shards", type=int, required=True, help="user-id shards = pods of the Indexed Job")
        p.add_argument("--parallelism", type=int, default=None, help="shards at once (default: all)")
        p.add_argument("--run-id", default=None, help="default: UTC timestamp YYYYmmdd-HHMMSS")
        if name == "run":
            p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per Job (default 4 h)")
            p.add_argument("--poll", type=float, default=10.0, help="seconds between status checks")
    args = parser.parse_args(argv)
    run = PackRun(
        args.tenant,
        args.pack_id,
        args.spec,
        args.shards,
        args.parallelism or args.shards,
        args.run_id or new_run_id(),
    )
    try:
        if args.command == "render":
            print(to_yaml(render_pack_jobs(run, args.overlay)[0]), end="")
        else:
            run_pack_jobs(
                run, args.overlay, kubectl or kubectl_runner(), timeout=args.timeout, poll=args.poll
            )
    except PackJobError as error:
        print(f"packjob: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
