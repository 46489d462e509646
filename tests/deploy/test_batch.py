"""Batch work: the Indexed pack build + merge (packjob tool), the refresh script, the CronJobs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.cli.main import build_parser
from tests.deploy.conftest import k8scheck, packjob, refresh_packs


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "clickers.yaml"
    path.write_text("displayName: sale-hour clickers\nspec: {}\n")
    return path


def _run(default_spec: Path, **overrides: Any) -> Any:
    values = {"tenant": "demo", "pack_id": "clickers", "spec": default_spec, "shards": 8, "parallelism": 3}
    values["run_id"] = "r1"
    return packjob.PackRun(**{**values, **overrides})


@pytest.fixture(scope="module")
def pack_jobs(tmp_path_factory) -> dict[str, tuple[list[dict], list[dict]]]:
    spec = tmp_path_factory.mktemp("spec") / "spec.yaml"
    spec.write_text("spec: {}\n")
    return {overlay: packjob.render_pack_jobs(_run(spec), overlay) for overlay in ("dev", "prod")}


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_indexed_build_job_shards_the_pack(pack_jobs, overlay: str) -> None:
    (spec_map, build, merge), _ = pack_jobs[overlay]
    assert build["metadata"]["name"] == "pack-build-r1"
    assert build["spec"]["completionMode"] == "Indexed"
    assert build["spec"]["completions"] == 8 and build["spec"]["parallelism"] == 3
    assert build["spec"]["maxFailedIndexes"] == 0 and build["spec"]["backoffLimitPerIndex"] >= 1
    container = build["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["flashcrowd"]
    args = container["args"]
    assert args[:3] == ["pack", "build", "/etc/flashcrowd/pack/spec.yaml"]
    assert args[args.index("--shard") + 1] == "$(JOB_COMPLETION_INDEX)/$(PACK_SHARDS)"
    assert args[args.index("--run-id") + 1] == "$(PACK_RUN_ID)"
    env = {e["name"]: e for e in container["env"]}
    assert {k: env[k]["value"] for k in ("PACK_TENANT", "PACK_ID", "PACK_SHARDS", "PACK_RUN_ID")} == {
        "PACK_TENANT": "demo",
        "PACK_ID": "clickers",
        "PACK_SHARDS": "8",
        "PACK_RUN_ID": "r1",
    }
    # Declared before use, so $(JOB_COMPLETION_INDEX) expands on every Kubernetes version.
    names = [e["name"] for e in container["env"]]
    assert names.index("JOB_COMPLETION_INDEX") < names.index("PACK_SHARDS")
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    spec_volume = next(v for v in build["spec"]["template"]["spec"]["volumes"] if v["name"] == "spec")
    assert spec_volume["configMap"]["name"] == spec_map["metadata"]["name"]
    assert spec_map["data"]["spec.yaml"] == "spec: {}\n"
    margs = merge["spec"]["template"]["spec"]["containers"][0]["args"]
    assert margs[:2] == ["pack", "merge"] and margs[margs.index("--shards") + 1] == "$(PACK_SHARDS)"
    for obj in (spec_map, build, merge):
        assert obj["metadata"]["labels"]["flashcrowd.io/pack-run"] == "r1"
        assert obj["metadata"]["namespace"] == ("flashcrowd-dev" if overlay == "dev" else "flashcrowd")


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_pack_jobs_use_the_serving_image_and_config(pack_jobs, overlay: str) -> None:
    (_, build, merge), context = pack_jobs[overlay]
    audience = next(o for o in context if o["kind"] == "Deployment" and o["metadata"]["name"] == "audience")
    image = audience["spec"]["template"]["spec"]["containers"][0]["image"]
    audience_config = audience["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]
    for job in (build, merge):
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == image
        assert container["envFrom"][0] == audience_config
        assert (
            job["metadata"]["labels"]["app.kubernetes.io/instance"]
            == audience["metadata"]["labels"]["app.kubernetes.io/instance"]
        )


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_pack_jobs_pass_schemas_and_policy(pack_jobs, declared_secrets, overlay: str) -> None:
    objs, context = pack_jobs[overlay]
    for version in k8scheck.schema_versions():
        assert not k8scheck.validate_schemas(objs, version)
    problems = k8scheck.check_policy(context, profile=overlay, declared_secrets=declared_secrets)
    assert not problems, "\n".join(map(str, problems))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tenant": "Demo"}, "--tenant 'Demo'"),
        ({"pack_id": "-x"}, "--pack-id '-x'"),
        ({"shards": 0}, "--shards must be in 1..4096"),
        ({"parallelism": 0}, "--parallelism must be at least 1"),
        ({"run_id": "R_1"}, "--run-id 'R_1'"),
        ({"spec": Path("/nonexistent/spec.yaml")}, "no such file"),
    ],
)
def test_pack_run_rejects_bad_parameters(spec_file: Path, overrides, message: str) -> None:
    with pytest.raises(packjob.PackJobError) as error:
        packjob.render_pack_jobs(_run(spec_file, **overrides), "dev")
    assert message in str(error.value)


def test_unknown_overlay(spec_file: Path) -> None:
    with pytest.raises(packjob.PackJobError, match=r"overlay 'staging': no kustomization\.yaml"):
        packjob.render_pack_jobs(_run(spec_file), "staging")


class FakeKubectl:
    """Records kubectl calls; answers `get job` with scripted statuses per Job name."""

    def __init__(self, statuses: dict[str, list[dict[str, Any]]]) -> None:
        self.statuses = statuses
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, args, stdin=None) -> str:
        self.calls.append((list(args), stdin))
        if args[:2] == ["get", "job"]:
            queue = self.statuses[args[2]]
            return json.dumps({"status": queue.pop(0) if len(queue) > 1 else queue[0]})
        return ""


COMPLETE = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 8}


def test_run_applies_build_waits_then_merges(spec_file: Path, capsys) -> None:
    kubectl = FakeKubectl(
        {
            "pack-build-r1": [{"active": 3}, {"active": 3, "succeeded": 5}, COMPLETE],
            "pack-merge-r1": [{"active": 1}, {"conditions": [{"type": "Complete", "status": "True"}]}],
        }
    )
    packjob.run_pack_jobs(_run(spec_file), "dev", kubectl, poll=0, sleep=lambda _: None)
    applies = [stdin for args, stdin in kubectl.calls if args[0] == "apply"]
    assert len(applies) == 2
    assert (
        "kind: ConfigMap" in applies[0]
        and "name: pack-build-r1" in applies[0]
        and "pack-merge" not in applies[0]
    )
    assert "name: pack-merge-r1" in applies[1]
    order = [args[0] if args[0] == "apply" else args[2] for args, _ in kubectl.calls]
    assert order.index("pack-merge-r1") > max(i for i, x in enumerate(order) if x == "pack-build-r1")
    out = capsys.readouterr().out
    assert "job/pack-build-r1: 5 succeeded, 3 active, 0 failed pods" in out
    assert "run r1 merged" in out


def test_run_stops_when_a_shard_fails_and_never_merges(spec_file: Path) -> None:
    failed = {
        "conditions": [
            {
                "type": "Failed",
                "status": "True",
                "reason": "FailedIndexes",
                "message": "Job has failed indexes",
            }
        ],
        "failedIndexes": "3,5",
    }
    kubectl = FakeKubectl({"pack-build-r1": [{"active": 8}, failed]})
    with pytest.raises(packjob.PackJobError) as error:
        packjob.run_pack_jobs(_run(spec_file), "dev", kubectl, poll=0, sleep=lambda _: None)
    assert "job/pack-build-r1 failed: FailedIndexes: Job has failed indexes (failed shards: 3,5)" in str(
        error.value
    )
    assert "kubectl logs -n flashcrowd-dev -l job-name=pack-build-r1" in str(error.value)
    assert not any("pack-merge" in (stdin or "") for _, stdin in kubectl.calls)


def test_run_times_out(spec_file: Path) -> None:
    ticks = iter(range(0, 10_000, 100))
    with pytest.raises(packjob.PackJobError, match="did not finish within 250s"):
        packjob.wait_for(
            FakeKubectl({"j": [{"active": 1}]}),
            "ns",
            "j",
            timeout=250,
            poll=0,
            sleep=lambda _: None,
            clock=lambda: next(ticks),
        )


def test_cli_render_prints_applicable_yaml(spec_file: Path, capsys) -> None:
    argv = ["render", "--overlay", "dev", "--tenant", "demo", "--pack-id", "p1", "--spec", str(spec_file)]
    assert packjob.main([*argv, "--shards", "4", "--run-id", "x1"]) == 0
    import yaml

    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job", "Job"]
    assert packjob.main([*argv, "--shards", "0"]) == 1
    assert "--shards must be in 1..4096" in capsys.readouterr().err


# --- refresh_packs.py (the pack-refresh CronJob) ----------------------------------------------------


def _schedule(tmp_path: Path, body: str, specs: tuple[str, ...] = ("a.yaml", "b.yaml")) -> Path:
    for name in specs:
        (tmp_path / name).write_text("spec: {}\n")
    path = tmp_path / "scheduled-packs.yaml"
    path.write_text(body)
    return path


def test_refresh_builds_every_shard_then_merges(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FLASHCROWD_DATASET_PREFIX", "data/")
    path = _schedule(
        tmp_path,
        "packs:\n"
        "  - {tenant: demo, pack_id: clickers, spec: a.yaml, shards: 2}\n"
        "  - {tenant: demo, pack_id: buyers, spec: b.yaml}\n",
    )
    calls: list[tuple[list[str], str]] = []

    def fake(argv, env, check):
        calls.append((argv, env["FLASHCROWD_RUN_ID"]))
        return subprocess.CompletedProcess(argv, 0)

    assert refresh_packs.main(["--schedule", str(path), "--run-id", "r9"], run=fake) == 0
    argvs = [" ".join(a[1:]) for a, _ in calls]
    spec_a, spec_b = (tmp_path / "a.yaml").resolve(), (tmp_path / "b.yaml").resolve()
    tail = "--run-id r9 --prefix data/ --no-progress"
    assert argvs == [
        f"pack build {spec_a} --tenant demo --pack-id clickers --shard 0/2 {tail}",
        f"pack build {spec_a} --tenant demo --pack-id clickers --shard 1/2 {tail}",
        "pack merge --tenant demo --pack-id clickers --shards 2 --run-id r9",
        f"pack build {spec_b} --tenant demo --pack-id buyers --shard 0/1 {tail}",
        "pack merge --tenant demo --pack-id buyers --shards 1 --run-id r9",
    ]
    assert {run_id for _, run_id in calls} == {"r9"}


def test_refresh_reports_a_failed_pack_and_still_does_the_others(tmp_path: Path, capsys) -> None:
    path = _schedule(
        tmp_path,
        "packs:\n  - {tenant: demo, pack_id: clickers, spec: a.yaml, shards: 2}\n"
        "  - {tenant: demo, pack_id: buyers, spec: b.yaml}\n",
    )

    def fake(argv, env, check):
        return subprocess.CompletedProcess(argv, 1 if "--shard" in argv and "1/2" in argv else 0)

    assert refresh_packs.main(["--schedule", str(path)], run=fake) == 1
    captured = capsys.readouterr()
    assert "refresh demo/clickers: FAILED (exit 1)" in captured.err
    assert "refresh demo/buyers: ok" in captured.out
    assert "1 of 2 packs refreshed" in captured.out and "failed: demo/clickers" in captured.err


def test_refresh_with_the_shipped_empty_schedule_does_nothing(capsys) -> None:
    shipped = Path(refresh_packs.__file__).parent / "scheduled-packs.yaml"
    assert refresh_packs.main(["--schedule", str(shipped)], run=None) == 0
    assert "no scheduled packs" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("packs: {}\n", "expected a mapping with a list under 'packs'"),
        ("packs:\n  - {tenant: demo, spec: a.yaml}\n", "packs[0]: 'pack_id' is required"),
        ("packs:\n  - {tenant: Demo, pack_id: p, spec: a.yaml}\n", "tenant 'Demo' must be lower-case"),
        (
            "packs:\n  - {tenant: d, pack_id: p, spec: a.yaml, shards: 0}\n",
            "shards must be an integer in 1..4096",
        ),
        ("packs:\n  - {tenant: d, pack_id: p, spec: missing.yaml}\n", "spec file 'missing.yaml' not found"),
        ("packs:\n  - {tenant: d, pack_id: p, spec: a.yaml, shard: 2}\n", "unknown field(s) shard"),
        (
            "packs:\n  - {tenant: d, pack_id: p, spec: a.yaml}\n  - {tenant: d, pack_id: p, spec: b.yaml}\n",
            "packs[1]: pack d/p is listed twice",
        ),
        ("packs: [\n", "cannot read schedule"),
    ],
)
def test_refresh_refuses_a_bad_schedule_before_running_anything(
    tmp_path: Path, capsys, body, message
) -> None:
    path = _schedule(tmp_path, body)
    assert refresh_packs.main(["--schedule", str(path)], run=None) == 2
    assert message in capsys.readouterr().err


def test_cronjobs_are_bounded(rendered) -> None:
    for overlay, objs in rendered.items():
        crons = {o["metadata"]["name"]: o for o in objs if o["kind"] == "CronJob"}
        assert crons["lookalike-train"]["spec"]["schedule"] == "30 2 * * *"  # nightly
        assert crons["pack-refresh"]["spec"]["schedule"] == "15 * * * *"
        for cron in crons.values():
            spec = cron["spec"]
            assert spec["concurrencyPolicy"] == "Forbid" and spec["timeZone"] == "Etc/UTC"
            assert spec["successfulJobsHistoryLimit"] <= 5 and spec["failedJobsHistoryLimit"] <= 5
            job = spec["jobTemplate"]["spec"]
            assert job["backoffLimit"] <= 3 and job["activeDeadlineSeconds"] > 0, overlay
        train = crons["lookalike-train"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        keep = crons["lake-maintain"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        assert keep["command"] == ["flashcrowd"] and keep["args"][:2] == ["data", "maintain"]
        assert (train["command"], train["args"]) == (
            ["flashcrowd"],
            ["lookalike", "train", "--model-id", "nightly"],
        )
        assert crons["lookalike-refresh"]["spec"]["schedule"] == "45 * * * *"  # hourly
        refresh_job = crons["lookalike-refresh"]["spec"]["jobTemplate"]["spec"]
        refresh = refresh_job["template"]["spec"]["containers"][0]
        assert (refresh["command"], refresh["args"]) == (["flashcrowd"], ["lookalike", "refresh"])
        # The CLI accepts what the CronJobs run (train once ran without its required --model-id).
        for container in (train, refresh, keep):
            build_parser().parse_args(container["args"])


def test_migration_job_runs_the_cli(rendered) -> None:
    for objs in rendered.values():
        job = next(o for o in objs if o["kind"] == "Job" and o["metadata"]["name"] == "retarget-migrate")
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert (container["command"], container["args"]) == (["flashcrowd"], ["db", "migrate"])
        assert job["spec"]["ttlSecondsAfterFinished"] > 0  # so that a later apply can recreate it
