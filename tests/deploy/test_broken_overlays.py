"""Bad input: a copy of deploy/k8s broken on purpose must fail the check with a message that names
the object and the problem (what a reviewer reads in a red CI run).

Each breakage edits its own copy of deploy/k8s; the copies are checked concurrently once per session
(rendering mostly waits on kubectl), then each test asserts on its breakage's problems.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.conftest import K8S, k8scheck

# --- edits to a copy of deploy/k8s ----------------------------------------------------------------


@dataclass(frozen=True)
class Replace:
    """Replace the first occurrence of `old` (which must be there) in one file."""

    path: str
    old: str
    new: str = ""

    def apply(self, k8s: Path) -> None:
        path = k8s / self.path
        text = path.read_text()
        assert self.old in text, f"{self.old!r} not in {path}"
        path.write_text(text.replace(self.old, self.new, 1))


@dataclass(frozen=True)
class Cut:
    """Remove the text from `start` up to (not including) the next `end` after it."""

    path: str
    start: str
    end: str

    def apply(self, k8s: Path) -> None:
        path = k8s / self.path
        text = path.read_text()
        begin = text.index(self.start)
        path.write_text(text[:begin] + text[text.index(self.end, begin + len(self.start)) :])


# --- what a report must contain -------------------------------------------------------------------


@dataclass(frozen=True)
class Has:
    """This exact problem is reported."""

    message: str

    def matches(self, problems: list[str]) -> bool:
        return self.message in problems


@dataclass(frozen=True)
class Starts:
    """Some problem starts with `prefix` and contains every fragment of `contains`."""

    prefix: str
    contains: tuple[str, ...] = ()

    def matches(self, problems: list[str]) -> bool:
        return any(p.startswith(self.prefix) and all(c in p for c in self.contains) for p in problems)


@dataclass(frozen=True)
class Only:
    """Exactly one problem is reported, and it contains every fragment of `contains`."""

    contains: tuple[str, ...]

    def matches(self, problems: list[str]) -> bool:
        return len(problems) == 1 and all(c in problems[0] for c in self.contains)


Expectation = Has | Starts | Only


# --- the breakages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Breakage:
    name: str
    overlay: str
    edits: tuple[Replace | Cut, ...] = ()
    # Empty for the unbroken copies and for breakages asserted by their own test below.
    expected: tuple[Expectation, ...] = ()

    def apply(self, k8s: Path) -> Path:
        """Break a copy of deploy/k8s; return the overlay to check."""
        for edit in self.edits:
            edit.apply(k8s)
        return k8s / "overlays" / self.overlay


RETARGET = "base/retarget/deployment.yaml"
GATEWAY = "base/gateway/deployment.yaml"
AUDIENCE = "base/audience/deployment.yaml"
JAEGER = "components/jaeger/deployment.yaml"
DEV = "overlays/dev/kustomization.yaml"
PROD = "overlays/prod/kustomization.yaml"

BUS_CLIENT_PROBLEMS = tuple(
    Has(
        f"Deployment/{name}: container '{name}' is a NATS client (flashcrowd.io/access-nats) but "
        "gets no FLASHCROWD_BUS_URL: it would run on the in-process memory:// bus"
    )
    for name in ("audience", "compactor", "sale-monitor", "retarget")
)

BREAKAGES = [
    Breakage("unbroken_dev", "dev"),
    Breakage("unbroken_prod", "prod"),
    Breakage(
        "missing_secret_reference_in_prod",
        "prod",
        (
            Replace(
                RETARGET,
                "            - name: FLASHCROWD_DATABASE_URL\n",
                "            - name: FLASHCROWD_REDIS_URL\n"
                "              valueFrom:\n"
                "                secretKeyRef:\n"
                "                  name: flashcrowd-redis\n"
                "                  key: url\n"
                "            - name: FLASHCROWD_DATABASE_URL\n",
            ),
        ),
        (
            Has(
                "Deployment/retarget: container 'retarget' env FLASHCROWD_REDIS_URL: references Secret "
                "'flashcrowd-redis' key 'url', which is neither rendered by the overlay nor listed in "
                "required-secrets.yaml"
            ),
        ),
    ),
    Breakage(
        "secret_key_missing_from_the_documented_list",
        "prod",
        (Replace("overlays/prod/required-secrets.yaml", "      access-key:", "      access-key-id:"),),
        (
            Starts(
                "Deployment/audience: container 'audience' env FLASHCROWD_S3_ACCESS_KEY: key 'access-key' "
                "of Secret 'flashcrowd-store' is not listed in required-secrets.yaml"
            ),
        ),
    ),
    Breakage(
        # A missing secret in dev is not excused by the prod list.
        "missing_secret_in_dev",
        "dev",
        (
            Replace(
                "components/postgres/kustomization.yaml",
                "secretGenerator:\n  - name: flashcrowd-database\n",
                "secretGenerator:\n  - name: flashcrowd-db\n",
            ),
        ),
        (
            Starts(
                "Deployment/retarget: container 'retarget' env FLASHCROWD_DATABASE_URL: references Secret "
                "'flashcrowd-database' key 'url', which is neither rendered by the overlay"
            ),
        ),
    ),
    Breakage(
        "latest_tag",
        "dev",
        (Replace(DEV, "newTag: dev", "newTag: latest"),),
        (
            Has(
                "Deployment/audience: container 'audience': image 'flashcrowd:latest' uses the mutable "
                "tag 'latest'"
            ),
            Starts("CronJob/pack-refresh:", contains=("'latest'",)),
        ),
    ),
    Breakage(
        "untagged_third_party_image",
        "dev",
        (Replace(JAEGER, "jaegertracing/jaeger:2.10.0", "jaegertracing/jaeger"),),
        (
            Has(
                "Deployment/jaeger: container 'jaeger': image 'jaegertracing/jaeger' has no tag and no "
                "digest (it would pull ':latest')"
            ),
        ),
    ),
    Breakage(
        # A prod image by tag instead of by digest.
        "prod_image_by_tag",
        "prod",
        (
            Replace(
                PROD,
                "    newName: ghcr.io/flashcrowd/flashcrowd\n    digest: sha256:" + "0" * 64,
                "    newName: ghcr.io/flashcrowd/flashcrowd\n    newTag: 1.4.0",
            ),
        ),
        (
            Has(
                "Deployment/gateway: container 'gateway': image 'ghcr.io/flashcrowd/flashcrowd:1.4.0' must "
                "be pinned by digest in prod"
            ),
        ),
    ),
    Breakage(
        "missing_probe",
        "prod",
        (Cut(AUDIENCE, "          readinessProbe:", "          livenessProbe:"),),
        (Has("Deployment/audience: container 'audience' has no readinessProbe"),),
    ),
    Breakage(
        "tcp_probe_instead_of_grpc",
        "dev",
        (
            Replace(
                GATEWAY,
                "          livenessProbe:\n            grpc:\n              port: 50051\n",
                "          livenessProbe:\n            tcpSocket:\n              port: 50051\n",
            ),
        ),
        (Has("Deployment/gateway: container 'gateway': livenessProbe must be a native grpc probe"),),
    ),
    Breakage(
        "termination_grace_too_short",
        "dev",
        (Replace(RETARGET, "terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: 20"),),
        (
            Has(
                "Deployment/retarget: terminationGracePeriodSeconds (20) must exceed preStop sleep (5) + "
                "FLASHCROWD_GRACE_SECONDS (20), or SIGKILL cuts the graceful shutdown"
            ),
        ),
    ),
    Breakage(
        "grace_raised_in_config_only",
        "prod",
        (Replace("base/gateway/config.env", "FLASHCROWD_GRACE_SECONDS=20", "FLASHCROWD_GRACE_SECONDS=40"),),
        (
            Starts(
                "Deployment/gateway: terminationGracePeriodSeconds (30) must exceed preStop sleep (5) + "
                "FLASHCROWD_GRACE_SECONDS (40)"
            ),
        ),
    ),
    Breakage(
        "writable_root_and_capabilities",
        "dev",
        (
            Replace(
                "components/otel-collector/deployment.yaml",
                "            readOnlyRootFilesystem: true\n",
                "            readOnlyRootFilesystem: false\n",
            ),
            Replace(
                "components/otel-collector/deployment.yaml",
                '              drop: ["ALL"]\n',
                '              drop: ["NET_RAW"]\n',
            ),
        ),
        tuple(
            Has("Deployment/otel-collector: container 'otel-collector': securityContext." + rule)
            for rule in ("readOnlyRootFilesystem must be true", "capabilities.drop must include ALL")
        ),
    ),
    Breakage(
        "missing_limits",
        "dev",
        (Replace(JAEGER, "            limits:\n              cpu: 500m\n              memory: 512Mi\n"),),
        (
            Has("Deployment/jaeger: container 'jaeger' has no limits.cpu"),
            Has("Deployment/jaeger: container 'jaeger' has no limits.memory"),
        ),
    ),
    Breakage(
        "otel_service_name_hard_coded",
        "dev",
        (
            Replace(
                AUDIENCE,
                "            - name: OTEL_SERVICE_NAME\n              valueFrom:\n                fieldRef:\n"
                "                  fieldPath: metadata.labels['app.kubernetes.io/component']\n",
                "            - name: OTEL_SERVICE_NAME\n              value: audience\n",
            ),
        ),
        (
            Has(
                "Deployment/audience: container 'audience': OTEL_SERVICE_NAME must come from fieldRef "
                "metadata.labels['app.kubernetes.io/component']"
            ),
        ),
    ),
    Breakage(
        "prod_without_autoscaling",
        "prod",
        (Replace(PROD, "  - ../../components/autoscaling\n"),),
        tuple(
            expectation
            for service in ("audience", "retarget", "gateway")
            for expectation in (
                Has(f"Deployment/{service}: has no HorizontalPodAutoscaler in prod"),
                Has(f"Deployment/{service}: has no PodDisruptionBudget in prod"),
                Starts(f"Deployment/{service}: sets replicas: 1;"),
            )
        ),
    ),
    Breakage(
        "inline_secret_in_prod",
        "prod",
        (
            Replace(
                PROD,
                "configMapGenerator:\n",
                "secretGenerator:\n  - name: flashcrowd-nats\n    literals: [url=nats://user:hunter2@nats:4222]\n"
                "configMapGenerator:\n",
            ),
        ),
        (Starts("Secret/flashcrowd-nats-", contains=("must not ship secret values",)),),
    ),
    Breakage(
        "without_network_policies",
        "dev",
        (Replace(DEV, "  - ../../components/network-policies\n"),),
        (
            Has("NetworkPolicy/*: no default-deny policy (podSelector {}, Ingress and Egress, no rules)"),
            *(
                Has(f"NetworkPolicy/{name}-ingress: no ingress policy selects the {name} pods")
                for name in ("audience", "retarget", "sale-monitor", "minio", "postgres", "nats")
            ),
        ),
    ),
    Breakage(
        # The schema error names the object and the field.
        "schema_typo",
        "dev",
        (Replace(GATEWAY, "  revisionHistoryLimit: 5\n", "  revisionHistoryLimt: 5\n"),),
        (
            Starts(
                "Deployment/gateway: schema (Kubernetes 1.30): spec: Additional properties are not allowed",
                contains=("revisionHistoryLimt",),
            ),
        ),
    ),
    Breakage(
        "service_targets_a_missing_port",
        "dev",
        (Replace("base/gateway/service.yaml", "      targetPort: http\n", "      targetPort: https\n"),),
        (Has("Service/gateway: targetPort 'https' is not a port of Deployment/gateway"),),
    ),
    Breakage(
        # A kustomize error is one problem, not a crash.
        "kustomize_error",
        "dev",
        (Replace("base/kustomization.yaml", "  - gateway/service.yaml\n", "  - gateway/services.yaml\n"),),
        (Only(contains=("kustomize failed", "gateway/services.yaml")),),
    ),
    Breakage(
        "cronjob_may_overlap",
        "dev",
        (
            Replace(
                "components/batch/lookalike-train-cronjob.yaml",
                "  concurrencyPolicy: Forbid\n",
                "  concurrencyPolicy: Allow\n",
            ),
            Replace("components/batch/lookalike-train-cronjob.yaml", "      activeDeadlineSeconds: 14400\n"),
        ),
        (
            Has("CronJob/lookalike-train: concurrencyPolicy must be Forbid (runs must not overlap)"),
            Has("CronJob/lookalike-train: sets no activeDeadlineSeconds (a stuck run would never end)"),
        ),
    ),
    Breakage(
        # The single writer must stay single.
        "compactor_scaled_out_with_rolling_updates",
        "dev",
        (
            Replace("base/compactor/deployment.yaml", "  replicas: 1\n", "  replicas: 2\n"),
            Replace("base/compactor/deployment.yaml", "    type: Recreate\n", "    type: RollingUpdate\n"),
        ),
        (
            Has("Deployment/compactor: must run exactly one replica (single writer), got 2"),
            Has(
                "Deployment/compactor: strategy must be Recreate (got RollingUpdate): a rolling update runs "
                "two writers at once"
            ),
        ),
    ),
    # Both asserted with BUS_CLIENT_PROBLEMS by test_bus_clients_without_a_bus_url.
    Breakage("dev_without_nats", "dev", (Replace(DEV, "  - ../../components/nats\n"),)),
    Breakage(
        "prod_bus_clients_without_the_nats_secret",
        "prod",
        (Replace(PROD, "  - path: nats-from-secret.yaml\n"),),
    ),
    Breakage(
        "gateway_without_shared_keystore",
        "prod",
        (
            Replace(
                GATEWAY,
                "            - name: FLASHCROWD_KEYSTORE_URL\n"
                "              valueFrom:\n"
                "                secretKeyRef:\n"
                "                  name: flashcrowd-gateway-keystore\n"
                "                  key: url\n",
            ),
        ),
        (Starts("Deployment/gateway: container 'gateway' gets no FLASHCROWD_KEYSTORE_URL: "),),
    ),
    Breakage(
        # The sale monitor needs its ingress policy.
        "sale_monitor_open_to_every_pod",
        "dev",
        (
            Cut(
                "components/network-policies/backends.yaml",
                "---\n# sale-monitor (SaleMonitorService)",
                "---\n",
            ),
        ),
        (Has("NetworkPolicy/sale-monitor-ingress: no ingress policy selects the sale-monitor pods"),),
    ),
]
CASES = {breakage.name: breakage for breakage in BREAKAGES}
assert len(CASES) == len(BREAKAGES), "duplicate breakage name"


@pytest.fixture(scope="session")
def reports(tmp_path_factory) -> dict[str, list[str] | None]:
    """Problems per breakage (None when the broken overlay passed)."""
    root = tmp_path_factory.mktemp("broken")

    def run(name: str) -> list[str] | None:
        copy = root / name
        shutil.copytree(K8S, copy)
        overlay = CASES[name].apply(copy)
        # The unbroken copies get every schema version; a breakage needs only the oldest one.
        versions = None if name.startswith("unbroken") else (k8scheck.MIN_KUBE_VERSION,)
        report = k8scheck.check_overlay(overlay, versions=versions)
        return None if report.ok else [str(p) for p in report.problems]

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(CASES, pool.map(run, CASES), strict=True))


def problems_of(reports: dict[str, list[str] | None], name: str) -> list[str]:
    found = reports[name]
    assert found is not None, f"case {name}: the broken overlay passed the check"
    return found


def assert_reported(problems: list[str], expected: tuple[Expectation, ...], name: str) -> None:
    assert expected, f"case {name}: nothing to assert"
    for expectation in expected:
        assert expectation.matches(problems), (name, expectation, problems)


# --- the tests ------------------------------------------------------------------------------------


def test_unbroken_copies_pass(reports) -> None:
    assert reports["unbroken_dev"] is None, reports["unbroken_dev"]
    assert reports["unbroken_prod"] is None, reports["unbroken_prod"]


@pytest.mark.parametrize("breakage", [pytest.param(b, id=b.name) for b in BREAKAGES if b.expected])
def test_breakage_is_reported(reports, breakage: Breakage) -> None:
    assert_reported(problems_of(reports, breakage.name), breakage.expected, breakage.name)


def test_bus_clients_without_a_bus_url(reports) -> None:
    for name in ("dev_without_nats", "prod_bus_clients_without_the_nats_secret"):
        assert_reported(problems_of(reports, name), BUS_CLIENT_PROBLEMS, name)


def test_cli_exits_non_zero_and_prints_the_problems(tmp_path: Path, capsys) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    assert k8scheck.main([str(CASES["latest_tag"].apply(copy))]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    assert "Deployment/retarget: container 'retarget': image 'flashcrowd:latest' uses the mutable tag" in out


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="profile must be dev or prod"):
        k8scheck.check_policy([], profile="staging")
