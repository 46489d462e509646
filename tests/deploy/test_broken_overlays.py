"""Bad input: a copy of deploy/k8s broken on purpose must fail the check with a message that names
the object and the problem (what a reviewer reads in a red CI run).

Each case breaks its own copy of deploy/k8s; the copies are checked concurrently once per session
(rendering mostly waits on kubectl), then each test asserts on its case's problems.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.deploy.conftest import K8S, k8scheck

CASES: dict[str, Callable[[Path], str]] = {}


def case(function: Callable[[Path], str]) -> Callable[[Path], str]:
    """Register a breakage: it edits a copy of deploy/k8s and returns the overlay to check."""
    CASES[function.__name__] = function
    return function


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.fixture(scope="session")
def reports(tmp_path_factory) -> dict[str, list[str] | None]:
    """Problems per case (None when the broken overlay passed)."""
    root = tmp_path_factory.mktemp("broken")

    def run(name: str) -> list[str] | None:
        copy = root / name
        shutil.copytree(K8S, copy)
        overlay = CASES[name](copy)
        # The unbroken copies get every schema version; a breakage needs only the oldest one.
        versions = None if name.startswith("unbroken") else (k8scheck.MIN_KUBE_VERSION,)
        report = k8scheck.check_overlay(copy / "overlays" / overlay, versions=versions)
        return None if report.ok else [str(p) for p in report.problems]

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(CASES, pool.map(run, CASES), strict=True))


def problems_of(reports: dict[str, list[str] | None], name: str) -> list[str]:
    found = reports[name]
    assert found is not None, f"case {name}: the broken overlay passed the check"
    return found


# --- the cases ------------------------------------------------------------------------------------


@case
def unbroken_dev(k8s: Path) -> str:
    return "dev"


@case
def unbroken_prod(k8s: Path) -> str:
    return "prod"


@case
def missing_secret_reference_in_prod(k8s: Path) -> str:
    _edit(
        k8s / "base" / "retarget" / "deployment.yaml",
        "            - name: FLASHCROWD_DATABASE_URL\n",
        "            - name: FLASHCROWD_REDIS_URL\n"
        "              valueFrom:\n"
        "                secretKeyRef:\n"
        "                  name: flashcrowd-redis\n"
        "                  key: url\n"
        "            - name: FLASHCROWD_DATABASE_URL\n",
    )
    return "prod"


@case
def secret_key_missing_from_the_documented_list(k8s: Path) -> str:
    _edit(k8s / "overlays" / "prod" / "required-secrets.yaml", "      access-key:", "      access-key-id:")
    return "prod"


@case
def missing_secret_in_dev(k8s: Path) -> str:
    _edit(
        k8s / "components" / "postgres" / "kustomization.yaml",
        "secretGenerator:\n  - name: flashcrowd-database\n",
        "secretGenerator:\n  - name: flashcrowd-db\n",
    )
    return "dev"


@case
def latest_tag(k8s: Path) -> str:
    _edit(k8s / "overlays" / "dev" / "kustomization.yaml", "newTag: dev", "newTag: latest")
    return "dev"


@case
def untagged_third_party_image(k8s: Path) -> str:
    _edit(
        k8s / "components" / "jaeger" / "deployment.yaml",
        "jaegertracing/jaeger:2.10.0",
        "jaegertracing/jaeger",
    )
    return "dev"


@case
def prod_image_by_tag(k8s: Path) -> str:
    _edit(
        k8s / "overlays" / "prod" / "kustomization.yaml",
        "    newName: ghcr.io/flashcrowd/flashcrowd\n    digest: sha256:" + "0" * 64,
        "    newName: ghcr.io/flashcrowd/flashcrowd\n    newTag: 1.4.0",
    )
    return "prod"


@case
def missing_probe(k8s: Path) -> str:
    path = k8s / "base" / "audience" / "deployment.yaml"
    text = path.read_text()
    path.write_text(
        text[: text.index("          readinessProbe:")] + text[text.index("          livenessProbe:") :]
    )
    return "prod"


@case
def tcp_probe_instead_of_grpc(k8s: Path) -> str:
    _edit(
        k8s / "base" / "gateway" / "deployment.yaml",
        "          livenessProbe:\n            grpc:\n              port: 50051\n",
        "          livenessProbe:\n            tcpSocket:\n              port: 50051\n",
    )
    return "dev"


@case
def termination_grace_too_short(k8s: Path) -> str:
    _edit(
        k8s / "base" / "retarget" / "deployment.yaml",
        "terminationGracePeriodSeconds: 30",
        "terminationGracePeriodSeconds: 20",
    )
    return "dev"


@case
def grace_raised_in_config_only(k8s: Path) -> str:
    _edit(
        k8s / "base" / "gateway" / "config.env", "FLASHCROWD_GRACE_SECONDS=20", "FLASHCROWD_GRACE_SECONDS=40"
    )
    return "prod"


@case
def writable_root_and_capabilities(k8s: Path) -> str:
    path = k8s / "components" / "otel-collector" / "deployment.yaml"
    _edit(path, "            readOnlyRootFilesystem: true\n", "            readOnlyRootFilesystem: false\n")
    _edit(path, '              drop: ["ALL"]\n', '              drop: ["NET_RAW"]\n')
    return "dev"


@case
def missing_limits(k8s: Path) -> str:
    _edit(
        k8s / "components" / "jaeger" / "deployment.yaml",
        "            limits:\n              cpu: 500m\n              memory: 512Mi\n",
        "",
    )
    return "dev"


@case
def otel_service_name_hard_coded(k8s: Path) -> str:
    _edit(
        k8s / "base" / "audience" / "deployment.yaml",
        "            - name: OTEL_SERVICE_NAME\n              valueFrom:\n                fieldRef:\n"
        "                  fieldPath: metadata.labels['app.kubernetes.io/component']\n",
        "            - name: OTEL_SERVICE_NAME\n              value: audience\n",
    )
    return "dev"


@case
def prod_without_autoscaling(k8s: Path) -> str:
    _edit(k8s / "overlays" / "prod" / "kustomization.yaml", "  - ../../components/autoscaling\n", "")
    return "prod"


@case
def inline_secret_in_prod(k8s: Path) -> str:
    _edit(
        k8s / "overlays" / "prod" / "kustomization.yaml",
        "configMapGenerator:\n",
        "secretGenerator:\n  - name: flashcrowd-nats\n    literals: [url=nats://user:hunter2@nats:4222]\n"
        "configMapGenerator:\n",
    )
    return "prod"


@case
def without_network_policies(k8s: Path) -> str:
    _edit(k8s / "overlays" / "dev" / "kustomization.yaml", "  - ../../components/network-policies\n", "")
    return "dev"


@case
def schema_typo(k8s: Path) -> str:
    _edit(
        k8s / "base" / "gateway" / "deployment.yaml",
        "  revisionHistoryLimit: 5\n",
        "  revisionHistoryLimt: 5\n",
    )
    return "dev"


@case
def service_targets_a_missing_port(k8s: Path) -> str:
    _edit(k8s / "base" / "gateway" / "service.yaml", "      targetPort: http\n", "      targetPort: https\n")
    return "dev"


@case
def kustomize_error(k8s: Path) -> str:
    _edit(k8s / "base" / "kustomization.yaml", "  - gateway/service.yaml\n", "  - gateway/services.yaml\n")
    return "dev"


@case
def cronjob_may_overlap(k8s: Path) -> str:
    path = k8s / "components" / "batch" / "lookalike-train-cronjob.yaml"
    _edit(path, "  concurrencyPolicy: Forbid\n", "  concurrencyPolicy: Allow\n")
    _edit(path, "      activeDeadlineSeconds: 14400\n", "")
    return "dev"


@case
def compactor_scaled_out_with_rolling_updates(k8s: Path) -> str:
    path = k8s / "base" / "compactor" / "deployment.yaml"
    _edit(path, "  replicas: 1\n", "  replicas: 2\n")
    _edit(path, "    type: Recreate\n", "    type: RollingUpdate\n")
    return "dev"


@case
def dev_without_nats(k8s: Path) -> str:
    _edit(k8s / "overlays" / "dev" / "kustomization.yaml", "  - ../../components/nats\n", "")
    return "dev"


@case
def prod_bus_clients_without_the_nats_secret(k8s: Path) -> str:
    _edit(k8s / "overlays" / "prod" / "kustomization.yaml", "  - path: nats-from-secret.yaml\n", "")
    return "prod"


@case
def gateway_without_shared_keystore(k8s: Path) -> str:
    _edit(
        k8s / "base" / "gateway" / "deployment.yaml",
        "            - name: FLASHCROWD_KEYSTORE_URL\n"
        "              valueFrom:\n"
        "                secretKeyRef:\n"
        "                  name: flashcrowd-gateway-keystore\n"
        "                  key: url\n",
        "",
    )
    return "prod"


@case
def sale_monitor_open_to_every_pod(k8s: Path) -> str:
    path = k8s / "components" / "network-policies" / "backends.yaml"
    text = path.read_text()
    start = text.index("---\n# sale-monitor (SaleMonitorService)")
    end = text.index("---\n", start + 4)
    path.write_text(text[:start] + text[end:])
    return "dev"


# --- the tests ------------------------------------------------------------------------------------


def test_unbroken_copies_pass(reports) -> None:
    assert reports["unbroken_dev"] is None, reports["unbroken_dev"]
    assert reports["unbroken_prod"] is None, reports["unbroken_prod"]


def test_missing_secret_reference_in_prod(reports) -> None:
    assert (
        "Deployment/retarget: container 'retarget' env FLASHCROWD_REDIS_URL: references Secret "
        "'flashcrowd-redis' key 'url', which is neither rendered by the overlay nor listed in "
        "required-secrets.yaml"
    ) in problems_of(reports, "missing_secret_reference_in_prod")


def test_secret_key_missing_from_the_documented_list(reports) -> None:
    problems = problems_of(reports, "secret_key_missing_from_the_documented_list")
    assert any(
        p.startswith(
            "Deployment/audience: container 'audience' env FLASHCROWD_S3_ACCESS_KEY: key 'access-key' "
            "of Secret 'flashcrowd-store' is not listed in required-secrets.yaml"
        )
        for p in problems
    ), problems


def test_missing_secret_in_dev_is_not_excused_by_the_prod_list(reports) -> None:
    problems = problems_of(reports, "missing_secret_in_dev")
    assert any(
        p.startswith(
            "Deployment/retarget: container 'retarget' env FLASHCROWD_DATABASE_URL: references Secret "
            "'flashcrowd-database' key 'url', which is neither rendered by the overlay"
        )
        for p in problems
    ), problems


def test_latest_tag(reports) -> None:
    problems = problems_of(reports, "latest_tag")
    assert (
        "Deployment/audience: container 'audience': image 'flashcrowd:latest' uses the mutable tag 'latest'"
    ) in problems
    assert any(p.startswith("CronJob/pack-refresh:") and "'latest'" in p for p in problems)


def test_untagged_third_party_image(reports) -> None:
    assert (
        "Deployment/jaeger: container 'jaeger': image 'jaegertracing/jaeger' has no tag and no digest "
        "(it would pull ':latest')"
    ) in problems_of(reports, "untagged_third_party_image")


def test_prod_image_by_tag_instead_of_digest(reports) -> None:
    assert (
        "Deployment/gateway: container 'gateway': image 'ghcr.io/flashcrowd/flashcrowd:1.4.0' must be "
        "pinned by digest in prod"
    ) in problems_of(reports, "prod_image_by_tag")


def test_missing_probe(reports) -> None:
    assert "Deployment/audience: container 'audience' has no readinessProbe" in problems_of(
        reports, "missing_probe"
    )


def test_tcp_probe_instead_of_grpc(reports) -> None:
    assert (
        "Deployment/gateway: container 'gateway': livenessProbe must be a native grpc probe"
        in problems_of(reports, "tcp_probe_instead_of_grpc")
    )


def test_termination_grace_too_short(reports) -> None:
    assert (
        "Deployment/retarget: terminationGracePeriodSeconds (20) must exceed preStop sleep (5) + "
        "FLASHCROWD_GRACE_SECONDS (20), or SIGKILL cuts the graceful shutdown"
    ) in problems_of(reports, "termination_grace_too_short")


def test_grace_raised_in_config_only(reports) -> None:
    assert any(
        p.startswith(
            "Deployment/gateway: terminationGracePeriodSeconds (30) must exceed preStop sleep (5) + "
            "FLASHCROWD_GRACE_SECONDS (40)"
        )
        for p in problems_of(reports, "grace_raised_in_config_only")
    )


def test_writable_root_and_capabilities(reports) -> None:
    problems = problems_of(reports, "writable_root_and_capabilities")
    prefix = "Deployment/otel-collector: container 'otel-collector': securityContext."
    assert prefix + "readOnlyRootFilesystem must be true" in problems
    assert prefix + "capabilities.drop must include ALL" in problems


def test_missing_limits(reports) -> None:
    problems = problems_of(reports, "missing_limits")
    assert "Deployment/jaeger: container 'jaeger' has no limits.cpu" in problems
    assert "Deployment/jaeger: container 'jaeger' has no limits.memory" in problems


def test_otel_service_name_hard_coded(reports) -> None:
    assert (
        "Deployment/audience: container 'audience': OTEL_SERVICE_NAME must come from fieldRef "
        "metadata.labels['app.kubernetes.io/component']"
    ) in problems_of(reports, "otel_service_name_hard_coded")


def test_prod_without_autoscaling(reports) -> None:
    problems = problems_of(reports, "prod_without_autoscaling")
    for service in ("audience", "retarget", "gateway"):
        assert f"Deployment/{service}: has no HorizontalPodAutoscaler in prod" in problems
        assert f"Deployment/{service}: has no PodDisruptionBudget in prod" in problems
        assert any(p.startswith(f"Deployment/{service}: sets replicas: 1;") for p in problems)


def test_inline_secret_in_prod(reports) -> None:
    problems = problems_of(reports, "inline_secret_in_prod")
    assert any(
        p.startswith("Secret/flashcrowd-nats-") and "must not ship secret values" in p for p in problems
    )


def test_without_network_policies(reports) -> None:
    problems = problems_of(reports, "without_network_policies")
    assert (
        "NetworkPolicy/*: no default-deny policy (podSelector {}, Ingress and Egress, no rules)" in problems
    )
    for name in ("audience", "retarget", "sale-monitor", "minio", "postgres", "nats"):
        assert f"NetworkPolicy/{name}-ingress: no ingress policy selects the {name} pods" in problems


def test_single_writer_must_stay_single(reports) -> None:
    problems = problems_of(reports, "compactor_scaled_out_with_rolling_updates")
    assert "Deployment/compactor: must run exactly one replica (single writer), got 2" in problems
    assert (
        "Deployment/compactor: strategy must be Recreate (got RollingUpdate): a rolling update runs "
        "two writers at once"
    ) in problems


def test_bus_clients_without_a_bus_url(reports) -> None:
    for case_name in ("dev_without_nats", "prod_bus_clients_without_the_nats_secret"):
        problems = problems_of(reports, case_name)
        for name in ("audience", "compactor", "sale-monitor"):
            assert (
                f"Deployment/{name}: container '{name}' is a NATS client (flashcrowd.io/access-nats) but "
                "gets no FLASHCROWD_BUS_URL: it would run on the in-process memory:// bus"
            ) in problems, (case_name, problems)


def test_gateway_without_shared_keystore(reports) -> None:
    problems = problems_of(reports, "gateway_without_shared_keystore")
    assert any(
        p.startswith("Deployment/gateway: container 'gateway' gets no FLASHCROWD_KEYSTORE_URL: ")
        for p in problems
    ), problems


def test_sale_monitor_needs_its_ingress_policy(reports) -> None:
    assert (
        "NetworkPolicy/sale-monitor-ingress: no ingress policy selects the sale-monitor pods"
        in problems_of(reports, "sale_monitor_open_to_every_pod")
    )


def test_schema_error_names_object_and_field(reports) -> None:
    problems = problems_of(reports, "schema_typo")
    assert any(
        p.startswith(
            "Deployment/gateway: schema (Kubernetes 1.30): spec: Additional properties are not allowed"
        )
        and "revisionHistoryLimt" in p
        for p in problems
    ), problems


def test_service_pointing_at_a_missing_port(reports) -> None:
    assert "Service/gateway: targetPort 'https' is not a port of Deployment/gateway" in problems_of(
        reports, "service_targets_a_missing_port"
    )


def test_kustomize_error_is_a_problem_not_a_crash(reports) -> None:
    problems = problems_of(reports, "kustomize_error")
    assert len(problems) == 1 and "kustomize failed" in problems[0] and "gateway/services.yaml" in problems[0]


def test_cronjob_rules(reports) -> None:
    problems = problems_of(reports, "cronjob_may_overlap")
    assert "CronJob/lookalike-train: concurrencyPolicy must be Forbid (runs must not overlap)" in problems
    assert "CronJob/lookalike-train: sets no activeDeadlineSeconds (a stuck run would never end)" in problems


def test_cli_exits_non_zero_and_prints_the_problems(tmp_path: Path, capsys) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    latest_tag(copy)
    assert k8scheck.main([str(copy / "overlays" / "dev")]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    assert "Deployment/retarget: container 'retarget': image 'flashcrowd:latest' uses the mutable tag" in out


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="profile must be dev or prod"):
        k8scheck.check_policy([], profile="staging")
