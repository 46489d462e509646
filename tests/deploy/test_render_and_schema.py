"""Every overlay renders with real kustomize and every object passes the strict Kubernetes schemas."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.deploy.conftest import K8S, k8scheck


def test_every_overlay_is_found() -> None:
    assert {p.name for p in k8scheck.iter_overlays()} == {"dev", "prod"}


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_renders_the_platform(rendered, overlay: str) -> None:
    kinds = Counter(obj["kind"] for obj in rendered[overlay])
    names = {(obj["kind"], obj["metadata"]["name"]) for obj in rendered[overlay]}
    for service in ("audience", "retarget", "gateway", "sale-monitor"):
        assert ("Deployment", service) in names
        assert ("Service", service) in names
        assert ("Service", f"{service}-headless") in names
        assert ("ServiceAccount", service) in names
    # The compactor serves nothing but its health: no Service.
    assert ("Deployment", "compactor") in names and ("ServiceAccount", "compactor") in names
    assert not {n for k, n in names if k == "Service" and n.startswith("compactor")}
    assert ("Deployment", "otel-collector") in names
    assert ("Job", "retarget-migrate") in names
    assert ("CronJob", "pack-refresh") in names and ("CronJob", "lookalike-train") in names
    assert kinds["NetworkPolicy"] >= 10
    namespaces = {obj["metadata"].get("namespace") for obj in rendered[overlay] if obj["kind"] != "Namespace"}
    assert namespaces == {"flashcrowd-dev" if overlay == "dev" else "flashcrowd"}


def test_dev_runs_every_server_in_cluster(rendered) -> None:
    names = {(obj["kind"], obj["metadata"]["name"]) for obj in rendered["dev"]}
    for kind, name in [
        ("StatefulSet", "minio"),
        ("Job", "minio-bucket-init"),
        ("StatefulSet", "postgres"),
        ("StatefulSet", "nats"),
        ("Deployment", "jaeger"),
    ]:
        assert (kind, name) in names
    for name in ("minio", "postgres", "nats"):
        sts = next(o for o in rendered["dev"] if o["kind"] == "StatefulSet" and o["metadata"]["name"] == name)
        assert sts["spec"]["volumeClaimTemplates"], f"{name} keeps its data on a PVC"


def test_prod_has_no_in_cluster_datastores(rendered) -> None:
    kinds_names = {(obj["kind"], obj["metadata"]["name"]) for obj in rendered["prod"]}
    assert not {n for k, n in kinds_names if k == "StatefulSet"}
    assert ("Deployment", "jaeger") not in kinds_names
    assert not [o for o in rendered["prod"] if o["kind"] == "Secret"]


def test_base_renders_alone() -> None:
    objs = k8scheck.render(K8S / "base")
    assert {o["kind"] for o in objs} == {"ServiceAccount", "ConfigMap", "Deployment", "Service"}


@pytest.mark.parametrize("overlay", ["dev", "prod"])
@pytest.mark.parametrize("version", k8scheck.schema_versions())
def test_every_object_validates_against_the_kubernetes_schema(rendered, overlay: str, version: str) -> None:
    problems = k8scheck.validate_schemas(rendered[overlay], version)
    assert not problems, "\n".join(map(str, problems))


def test_schema_versions_cover_the_oldest_supported_cluster() -> None:
    versions = k8scheck.schema_versions()
    assert versions[0] == k8scheck.MIN_KUBE_VERSION == "1.30"
    assert len(versions) == 2 and tuple(map(int, versions[1].split("."))) > (1, 30)


def test_strict_schema_rejects_unknown_fields_and_wrong_types(rendered) -> None:
    import copy

    deployment = copy.deepcopy(
        next(o for o in rendered["dev"] if o["kind"] == "Deployment" and o["metadata"]["name"] == "audience")
    )
    deployment["spec"]["replica"] = 3  # typo of replicas
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "50051"
    problems = [str(p) for p in k8scheck.validate_schemas([deployment], "1.30")]
    assert any("Deployment/audience" in p and "replica" in p and "unexpected" in p for p in problems), (
        problems
    )
    assert any("containerPort" in p and "integer" in p for p in problems), problems


def test_unknown_kinds_are_reported_not_skipped() -> None:
    obj = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    problems = k8scheck.validate_schemas([obj], "1.30")
    assert [str(p) for p in problems] == [
        "Widget/w: no schema for example.com/v1 Widget in Kubernetes 1.30 (unknown kind or API version)"
    ]
