"""NetworkPolicies evaluated on the rendered objects: only the designed calls get through."""

from __future__ import annotations

import pytest

from tests.deploy.conftest import k8scheck

EXTERNAL = k8scheck.EXTERNAL

DEV_ALLOWED = [
    ("gateway", "audience", 50051),
    ("gateway", "retarget", 50051),
    ("gateway", "sale-monitor", 50051),  # SaleMonitorService, proxied
    ("retarget", "audience", 50051),
    ("sale-monitor", "retarget", 50051),  # campaign rules: PauseCampaign, CopyCampaign
    ("audience", "minio", 9000),
    ("compactor", "minio", 9000),  # Parquet parts + manifest
    ("sale-monitor", "minio", 9000),  # rule firings (audit log)
    ("pack-refresh", "minio", 9000),
    ("lookalike-train", "minio", 9000),
    ("lake-maintain", "minio", 9000),  # the event lake's Delta tables
    ("lookalike-refresh", "minio", 9000),
    ("minio-bucket-init", "minio", 9000),
    ("retarget", "postgres", 5432),
    ("retarget-migrate", "postgres", 5432),
    ("gateway", "postgres", 5432),  # the shared API-key store
    ("audience", "postgres", 5432),  # the shared control plane (operations, build queue, quotas)
    ("audience", "nats", 4222),  # ingest (EventService), live packs
    ("compactor", "nats", 4222),
    ("sale-monitor", "nats", 4222),
    ("retarget", "nats", 4222),  # the order feed (pay / refund events)
    ("gateway", "redis", 6379),  # shared rate-limit buckets
    ("audience", "otel-collector", 4317),
    ("gateway", "otel-collector", 4317),
    ("compactor", "otel-collector", 4317),
    ("sale-monitor", "otel-collector", 4317),
    ("pack-refresh", "otel-collector", 4318),
    ("otel-collector", "jaeger", 4317),
    (EXTERNAL, "gateway", 50051),
    (EXTERNAL, "gateway", 8080),
]
DEV_DENIED = [
    ("audience", "retarget", 50051),
    ("audience", "gateway", 50051),
    ("retarget", "gateway", 50051),
    ("pack-refresh", "audience", 50051),
    ("jaeger", "audience", 50051),
    ("minio", "audience", 50051),
    ("otel-collector", "audience", 50051),
    ("gateway", "minio", 9000),
    ("retarget", "minio", 9000),
    ("compactor", "postgres", 5432),
    ("sale-monitor", "postgres", 5432),
    ("pack-refresh", "postgres", 5432),
    ("lake-maintain", "postgres", 5432),
    ("lake-maintain", "nats", 4222),
    ("gateway", "nats", 4222),
    ("audience", "redis", 6379),
    ("retarget", "redis", 6379),
    ("audience", "jaeger", 16686),
    # the compactor accepts nothing and calls no service
    ("gateway", "compactor", 50051),
    ("audience", "compactor", 50051),
    ("compactor", "audience", 50051),
    ("compactor", "retarget", 50051),
    ("compactor", "sale-monitor", 50051),
    # the sale monitor: called by the gateway only; calls retarget only
    ("audience", "sale-monitor", 50051),
    ("retarget", "sale-monitor", 50051),
    ("pack-refresh", "sale-monitor", 50051),
    ("sale-monitor", "audience", 50051),
    ("sale-monitor", "gateway", 50051),
    ("gateway", "audience", 9000),  # right peer, wrong port
    (EXTERNAL, "audience", 50051),
    (EXTERNAL, "retarget", 50051),
    (EXTERNAL, "minio", 9000),
    (EXTERNAL, "postgres", 5432),
    (EXTERNAL, "sale-monitor", 50051),
    (EXTERNAL, "compactor", 50051),
    ("audience", EXTERNAL, 443),
    ("gateway", EXTERNAL, 443),
    ("compactor", EXTERNAL, 443),
    ("sale-monitor", EXTERNAL, 443),
]


@pytest.mark.parametrize(("source", "destination", "port"), DEV_ALLOWED)
def test_dev_allows_the_designed_calls(rendered, source, destination, port) -> None:
    assert k8scheck.allowed(rendered["dev"], source, destination, port)


@pytest.mark.parametrize(("source", "destination", "port"), DEV_DENIED)
def test_dev_denies_everything_else(rendered, source, destination, port) -> None:
    assert not k8scheck.allowed(rendered["dev"], source, destination, port)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_pod_may_resolve_dns(rendered, overlay) -> None:
    for w in k8scheck.Index(rendered[overlay]).workloads:
        assert k8scheck.dns_allowed(rendered[overlay], w.name), w.ref


@pytest.mark.parametrize(
    ("source", "destination", "port", "expected"),
    [
        ("gateway", "audience", 50051, True),
        ("retarget", "audience", 50051, True),
        ("audience", "retarget", 50051, False),
        ("audience", EXTERNAL, 9000, True),  # external S3/MinIO
        ("audience", EXTERNAL, 443, True),
        ("audience", EXTERNAL, 4222, True),  # external NATS
        ("retarget", EXTERNAL, 5432, True),  # external PostgreSQL
        ("retarget-migrate", EXTERNAL, 5432, True),
        ("pack-refresh", EXTERNAL, 9000, True),
        ("retarget", EXTERNAL, 9000, False),
        ("gateway", EXTERNAL, 5432, True),  # external PostgreSQL: the API-key store
        ("gateway", EXTERNAL, 443, False),
        ("gateway", EXTERNAL, 4222, False),
        ("gateway", "sale-monitor", 50051, True),
        ("sale-monitor", "retarget", 50051, True),
        ("sale-monitor", EXTERNAL, 4222, True),  # external NATS
        ("sale-monitor", EXTERNAL, 443, True),  # external S3 (rule firings)
        ("sale-monitor", EXTERNAL, 5432, False),
        ("compactor", EXTERNAL, 4222, True),
        ("compactor", EXTERNAL, 9000, True),
        ("compactor", EXTERNAL, 5432, False),
        ("compactor", "audience", 50051, False),
        (EXTERNAL, "sale-monitor", 50051, False),
        (EXTERNAL, "compactor", 50051, False),
        ("otel-collector", EXTERNAL, 4317, True),
        (EXTERNAL, "gateway", 50051, True),
        (EXTERNAL, "audience", 50051, False),
    ],
)
def test_prod_reaches_external_datastores_only_from_their_clients(
    rendered, source, destination, port, expected
):
    assert k8scheck.allowed(rendered["prod"], source, destination, port) is expected


def test_cloud_metadata_address_is_never_reachable(rendered) -> None:
    assert not k8scheck.allowed(rendered["prod"], "audience", EXTERNAL, 443, address="169.254.169.254")
    assert k8scheck.allowed(rendered["prod"], "audience", EXTERNAL, 443, address="10.20.30.40")


def test_every_workload_is_in_the_reachability_matrix(rendered) -> None:
    """A new workload must be added to the matrix above, not slip through with defaults."""
    covered = {name for s, d, _ in DEV_ALLOWED + DEV_DENIED for name in (s, d)} - {EXTERNAL}
    workloads = {w.name for w in k8scheck.Index(rendered["dev"]).workloads}
    assert workloads - covered == set(), "add these workloads to DEV_ALLOWED / DEV_DENIED"


def test_each_backend_and_datastore_has_its_ingress_policy(rendered) -> None:
    policies = {o["metadata"]["name"] for o in rendered["dev"] if o["kind"] == "NetworkPolicy"}
    assert {"default-deny-all", "allow-dns-egress", "audience-ingress", "retarget-ingress"} <= policies
    assert {"sale-monitor-ingress", "sale-monitor-clients-egress"} <= policies
    assert {"minio-ingress", "postgres-ingress", "nats-ingress"} <= policies


def test_evaluator_understands_selectors_and_named_ports() -> None:
    def workload(name, labels, ports):
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": name, "ports": ports}]},
                }
            },
        }

    objs = [
        workload("a", {"app": "a", "tier": "front"}, []),
        workload("b", {"app": "b"}, [{"name": "web", "containerPort": 8080}]),
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "b-in", "namespace": "ns"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "b"}},
                "ingress": [
                    {
                        "from": [
                            {
                                "podSelector": {
                                    "matchExpressions": [
                                        {"key": "tier", "operator": "In", "values": ["front"]}
                                    ]
                                }
                            }
                        ],
                        "ports": [{"port": "web"}],
                    }
                ],
            },
        },
    ]
    assert k8scheck.allowed(objs, "a", "b", 8080)
    assert not k8scheck.allowed(objs, "a", "b", 9090)
    assert not k8scheck.allowed(objs, "b", "b", 8080)
    assert k8scheck.allowed(objs, "b", "a", 1234)  # no policy selects a: open
