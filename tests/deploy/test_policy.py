"""Policy on the rendered overlays: the rules a platform engineer checks before trusting manifests."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.conftest import k8scheck

SERVICES = ("audience", "retarget", "gateway")
#: Every long-running process of the image: Deployment name -> ``python -m`` module.
PROCESSES = {
    "audience": "services.audience",
    "retarget": "services.retarget",
    "gateway": "services.gateway",
    "compactor": "services.compactor",
    "sale-monitor": "services.monitor",
}
#: terminationGracePeriodSeconds where it is not the services' 30 s.
TERMINATION = {"compactor": 60}  # + the final flush of the micro-batch (up to 30 s)


def _get(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def _pod(obj: dict[str, Any]) -> dict[str, Any]:
    return k8scheck.pod_template(obj)["spec"]


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_passes_every_policy(rendered, declared_secrets, overlay: str) -> None:
    problems = k8scheck.check_policy(rendered[overlay], profile=overlay, declared_secrets=declared_secrets)
    assert not problems, "\n".join(map(str, problems))


def test_every_deployment_of_the_image_is_listed_here(rendered) -> None:
    """The per-process tests below cover every Deployment of our image, not just the first three."""
    for objs in rendered.values():
        ours = {
            w.name
            for w in k8scheck.Index(objs).workloads
            if w.kind == "Deployment" and any(k8scheck.is_ours(c["image"]) for c in w.containers())
        }
        assert ours == set(PROCESSES)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
@pytest.mark.parametrize("service", PROCESSES)
def test_service_pods_probe_the_grpc_health_service(rendered, overlay: str, service: str) -> None:
    container = _pod(_get(rendered[overlay], "Deployment", service))["containers"][0]
    assert container["args"] == [PROCESSES[service]]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}, probe  # service "" = overall health
    assert container["ports"][0] == {"name": "grpc", "containerPort": 50051, "protocol": "TCP"}


@pytest.mark.parametrize("overlay", ["dev", "prod"])
@pytest.mark.parametrize("service", PROCESSES)
def test_service_pods_are_restricted_and_bounded(rendered, overlay: str, service: str) -> None:
    pod = _pod(_get(rendered[overlay], "Deployment", service))
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])


@pytest.mark.parametrize("overlay", ["dev", "prod"])
@pytest.mark.parametrize("service", PROCESSES)
def test_shutdown_budget_and_service_name(rendered, overlay: str, service: str) -> None:
    objs = rendered[overlay]
    deployment = _get(objs, "Deployment", service)
    pod = _pod(deployment)
    container = pod["containers"][0]
    config = next(
        o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(f"{service}-config-")
    )
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    grace = float(config["data"]["FLASHCROWD_GRACE_SECONDS"])
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    termination = pod["terminationGracePeriodSeconds"]
    assert (grace, pre_stop, termination) == (20, 5, TERMINATION.get(service, 30))
    assert termination > grace + pre_stop
    if service == "compactor":  # stop(): waits max(grace, 30 s) for the last micro-batch
        assert termination > pre_stop + grace + max(grace, 30)
    env = {e["name"]: e for e in container["env"]}
    assert env["OTEL_SERVICE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['app.kubernetes.io/component']"
    )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == service
    assert labels["app.kubernetes.io/part-of"] == "flashcrowd"
    assert config["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert config["data"]["FLASHCROWD_HOST"] == "0.0.0.0" and config["data"]["FLASHCROWD_PORT"] == "50051"


def test_config_wires_the_services_together(rendered) -> None:
    objs = rendered["dev"]
    data = {
        name: next(
            o
            for o in objs
            if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(f"{name}-config-")
        )["data"]
        for name in PROCESSES
    }
    assert data["gateway"]["FLASHCROWD_AUDIENCE_TARGET"] == "dns:///audience-headless:50051"
    assert data["gateway"]["FLASHCROWD_RETARGET_TARGET"] == "dns:///retarget-headless:50051"
    assert data["gateway"]["FLASHCROWD_HTTP_PORT"] == "8080"
    assert data["retarget"]["FLASHCROWD_AUDIENCE_TARGET"] == "dns:///audience-headless:50051"
    assert data["audience"]["FLASHCROWD_BUS_URL"] == "nats://nats:4222"
    assert data["gateway"]["FLASHCROWD_SALE_MONITOR_TARGET"] == "dns:///sale-monitor-headless:50051"
    assert data["sale-monitor"]["FLASHCROWD_RETARGET_TARGET"] == "dns:///retarget-headless:50051"
    for name in ("compactor", "sale-monitor"):
        assert data[name]["FLASHCROWD_BUS_URL"] == "nats://nats:4222"
    # The compactor writes the dataset the audience service reads.
    assert data["compactor"]["FLASHCROWD_DATASET_PREFIX"] == data["audience"]["FLASHCROWD_DATASET_PREFIX"]
    assert "FLASHCROWD_KEYSTORE_PATH" not in data["gateway"]
    store = next(
        o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"].startswith("flashcrowd-store-")
    )
    import base64

    assert base64.b64decode(store["data"]["url"]).decode() == "s3://minio:9000/flashcrowd?secure=false"
    keystore = next(
        o
        for o in objs
        if o["kind"] == "Secret" and o["metadata"]["name"].startswith("flashcrowd-gateway-keystore-")
    )
    assert base64.b64decode(keystore["data"]["url"]).decode().startswith("postgresql://")
    assert "@postgres:5432/" in base64.b64decode(keystore["data"]["url"]).decode()


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_gateway_replicas_share_one_key_store(rendered, overlay: str) -> None:
    pod = _pod(_get(rendered[overlay], "Deployment", "gateway"))
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    ref = env["FLASHCROWD_KEYSTORE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["name"].startswith("flashcrowd-gateway-keystore") and ref["key"] == "url"
    assert not ref.get("optional"), "a missing Secret must stop the pod, not fall back to SQLite"
    assert pod["containers"][0].get("volumeMounts") == [{"name": "tmp", "mountPath": "/tmp"}], (
        "no per-pod state volume"
    )
    labels = _get(rendered[overlay], "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    assert labels["flashcrowd.io/access-database"] == "true"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_audience_reads_the_identity_pepper_from_its_secret(rendered, overlay: str) -> None:
    import base64

    from services.events.pepper import parse_pepper

    objs = rendered[overlay]
    readers = {
        o["metadata"]["name"]
        for o in objs
        if k8scheck.pod_template(o) is not None
        for c in _pod(o)["containers"]
        if any(e["name"] == "FLASHCROWD_IDENTITY_PEPPER" for e in c.get("env", []))
    }
    assert readers == {"audience"}, "only the service that matches and exports identities holds the pepper"
    env = {e["name"]: e for e in _pod(_get(objs, "Deployment", "audience"))["containers"][0]["env"]}
    ref = env["FLASHCROWD_IDENTITY_PEPPER"]["valueFrom"]["secretKeyRef"]
    assert ref["name"].startswith("flashcrowd-identity-pepper") and ref["key"] == "pepper"
    assert not ref.get("optional"), "a missing Secret must stop the pod, not fall back to a generated pepper"
    if overlay == "dev":
        secret = _get(objs, "Secret", ref["name"])
        assert len(parse_pepper(base64.b64decode(secret["data"]["pepper"]).decode()).key) >= 32


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_sale_monitors_overlap_in_rollouts_their_rules_run_on_the_lease_holder(
    rendered, overlay: str
) -> None:
    deployment = _get(rendered[overlay], "Deployment", "sale-monitor")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
@pytest.mark.parametrize("name", ["compactor"])
def test_single_writers_run_one_pod_at_a_time(rendered, overlay: str, name: str) -> None:
    objs = rendered[overlay]
    deployment = _get(objs, "Deployment", name)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert not [
            o
            for o in objs
            if o["kind"] == kind
            and name
            in (
                o["spec"].get("scaleTargetRef", {}).get("name"),
                o["spec"].get("selector", {}).get("matchLabels", {}).get("app.kubernetes.io/name"),
            )
        ]


@pytest.mark.parametrize("name", ["audience", "compactor", "sale-monitor"])
def test_prod_bus_clients_read_nats_from_the_secret(rendered, name: str) -> None:
    container = _pod(_get(rendered["prod"], "Deployment", name))["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["FLASHCROWD_BUS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "flashcrowd-nats", "key": "url"}


def test_every_image_is_pinned(rendered) -> None:
    for overlay, objs in rendered.items():
        for w in k8scheck.Index(objs).workloads:
            for c in w.containers():
                assert k8scheck.image_problem(c["image"]) is None, (overlay, w.ref, c["image"])
                if overlay == "prod":
                    assert k8scheck.DIGEST.search(c["image"]), (w.ref, c["image"])


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        ("flashcrowd", "has no tag and no digest"),
        ("flashcrowd:latest", "mutable tag 'latest'"),
        ("registry:5000/team/flashcrowd", "has no tag and no digest"),
        ("flashcrowd@sha256:abc", "malformed digest"),
        ("flashcrowd:1.2.3", None),
        ("registry:5000/team/flashcrowd:1.2.3", None),
        ("flashcrowd@sha256:" + "a" * 64, None),
        ("nats:2.11.9-alpine@sha256:" + "b" * 64, None),
    ],
)
def test_image_rules(image: str, problem: str | None) -> None:
    found = k8scheck.image_problem(image)
    assert (found is None) if problem is None else (problem in found), found


def test_prod_secret_references_resolve_to_the_documented_list(rendered, declared_secrets) -> None:
    index = k8scheck.Index(rendered["prod"])
    referenced: set[tuple[str, str]] = set()
    for w in index.workloads:
        for c in w.containers():
            for item in c.get("env", []):
                ref = (item.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    referenced.add((ref["name"], ref["key"]))
    assert referenced, "prod reads its credentials from Secrets"
    for name, key in referenced:
        assert key in declared_secrets[name], (name, key)
    assert {name for name, _ in referenced} == set(declared_secrets)


def test_prod_scales_and_survives_disruption(rendered) -> None:
    objs = rendered["prod"]
    for service in SERVICES:
        hpa = _get(objs, "HorizontalPodAutoscaler", service)
        assert hpa["spec"]["minReplicas"] >= 3 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
        pdb = _get(objs, "PodDisruptionBudget", service)
        assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": service}
        deployment = _get(objs, "Deployment", service)
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
        spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    dev = {(o["kind"], o["metadata"]["name"]) for o in rendered["dev"]}
    assert not {k for k, _ in dev if k in ("HorizontalPodAutoscaler", "PodDisruptionBudget")}


def test_namespaces_enforce_the_restricted_pod_security_standard(rendered) -> None:
    for objs in rendered.values():
        namespace = next(o for o in objs if o["kind"] == "Namespace")
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_release_gate_refuses_placeholder_digests(rendered) -> None:
    problems = k8scheck.check_release(rendered["prod"])
    assert any("Deployment/audience" in str(p) and "placeholder digest" in str(p) for p in problems)
    assert not k8scheck.check_release(
        [
            {**o, "spec": o["spec"]}
            for o in rendered["dev"]
            if o["kind"] == "Deployment"  # tags, no digests: nothing to refuse
        ]
    )


def test_cli_reports_ok_for_the_shipped_overlays(capsys) -> None:
    assert k8scheck.main([]) == 0
    out = capsys.readouterr().out
    assert "ok   " in out and "dev" in out and "prod" in out


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_gateway_and_backends_share_the_assertion_key_secret(rendered, overlay: str) -> None:
    """Backends refuse calls without the gateway's assertion: all four hold the same Secret."""
    objs = rendered[overlay]
    readers = {}
    for o in objs:
        if k8scheck.pod_template(o) is None:
            continue
        for c in _pod(o)["containers"]:
            for e in c.get("env", []):
                if e["name"] == "FLASHCROWD_GATEWAY_ASSERTION_KEY":
                    readers[o["metadata"]["name"]] = e["valueFrom"]["secretKeyRef"]
    assert set(readers) == {"gateway", "audience", "retarget", "sale-monitor"}
    assert len({ref["name"] for ref in readers.values()}) == 1
    assert all(ref["key"] == "key" and not ref.get("optional") for ref in readers.values())
