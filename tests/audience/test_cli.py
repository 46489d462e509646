"""``flashcrowd pack``: build, shard builds + merge, show, list, and exit status 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.audience.packstore import PackStore
from services.cli.main import main
from services.events.generator import generate
from services.storage import LocalObjectStore
from tests.audience.conftest import WORLD

SPEC = """\
displayName: Clicked, did not buy
labels: {campaign: "618"}
spec:
  exclude:
    base: {shortcut: {kind: clickers, window: {last: 48h}}}
    subtract:
      - shortcut: {kind: purchasers, window: {last: 48h}}
ttl: 30d
"""


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "store"
    generate(LocalObjectStore(root), WORLD)
    return root


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    return path


def run(store_dir: Path, *args: str) -> int:
    return main(["pack", *args, "--store", str(store_dir)])


def test_build_show_list(store_dir: Path, spec_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run(store_dir, "build", str(spec_file), "--tenant", "acme", "--pack-id", "whole", "--no-progress")
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("tenants/acme/packs/whole version 1:")
    packs = PackStore(LocalObjectStore(store_dir))
    pack = packs.get("acme", "whole")
    assert pack.labels == {"campaign": "618"} and pack.size > 0 and pack.build_stats.bots_excluded > 0
    assert run(store_dir, "show", "--tenant", "acme", "--pack-id", "whole") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "tenants/acme/packs/whole" and shown["displayName"] == "Clicked, did not buy"
    assert run(store_dir, "list", "--tenant", "acme", "--filter", "labels.campaign=618", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert "tenants/acme/packs/whole" in [p["name"] for p in listed["packs"]]


def test_shards_then_merge_equal_the_whole_build(
    store_dir: Path, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = ["build", str(spec_file), "--tenant", "acme", "--pack-id", "ref", "--no-progress"]
    assert run(store_dir, *whole) == 0
    capsys.readouterr()
    for i in (0, 1, 3):
        args = ["build", str(spec_file), "--tenant", "acme", "--pack-id", "sharded", "--shard", f"{i}/4"]
        assert run(store_dir, *args, "--run-id", "run-7", "--no-progress", "--json") == 0
        staged = json.loads(capsys.readouterr().out)
        assert staged["shard"] == f"{i}/4" and staged["staged"].endswith(
            f"staging/run-7/shard-{i}-of-4.manifest.json"
        )
    merge = ["merge", "--tenant", "acme", "--pack-id", "sharded", "--shards", "4", "--run-id", "run-7"]
    assert run(store_dir, *merge) == 2
    err = capsys.readouterr().err
    assert "lacks shard(s) 2/4" in err
    packs = PackStore(LocalObjectStore(store_dir))
    assert not packs.exists("acme", "sharded")
    args = ["build", str(spec_file), "--tenant", "acme", "--pack-id", "sharded", "--shard", "2/4"]
    assert run(store_dir, *args, "--run-id", "run-7", "--no-progress") == 0
    assert run(store_dir, *merge) == 0
    merged, whole = packs.load_bitmap("acme", "sharded")[0], packs.load_bitmap("acme", "ref")[0]
    assert merged == whole and len(merged) > 0
    stats = packs.get("acme", "sharded").build_stats
    assert stats.files_read == packs.get("acme", "ref").build_stats.files_read  # distinct files, not a sum


@pytest.mark.parametrize(
    ("args", "text", "message"),
    [
        (["--pack-id", "Bad_Id"], SPEC, "pack_id"),
        (["--pack-id", "p", "--shard", "4/4", "--run-id", "r"], SPEC, "--shard"),
        (["--pack-id", "p", "--shard", "1/4"], SPEC, "--run-id"),
        (
            ["--pack-id", "p"],
            SPEC.replace("kind: clickers", "kind: clikers"),
            "line 5: unknown Kind 'clikers'",
        ),
        (
            ["--pack-id", "p"],
            "spec:\n  union:\n    operands: [{profile: {genders: [male]}}]\n",
            "spec.union.operands: line 3: union needs at least 2 operands",
        ),
        (["--pack-id", "p"], "spec: {pack: {pack: tenants/rival/packs/x}}\n", "tenants/rival/packs/x"),
    ],
)
def test_bad_input_exits_2_naming_the_field(
    store_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    text: str,
    message: str,
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert run(store_dir, "build", str(path), "--tenant", "acme", *args, "--no-progress") == 2
    assert message in capsys.readouterr().err


def test_console_script_with_progress_bar(store_dir: Path, spec_file: Path) -> None:
    command = [
        "pack",
        "build",
        str(spec_file),
        "--tenant",
        "acme",
        "--pack-id",
        "proc",
        "--store",
        str(store_dir),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli.main", *command], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "done" in proc.stderr and "100%" in proc.stderr  # the bar is drawn on stderr
    assert proc.stdout.startswith("tenants/acme/packs/proc version 1:")
    assert len(PackStore(LocalObjectStore(store_dir)).load_bitmap("acme", "proc")[0]) > 0


@pytest.mark.parametrize("command", ["list", "show"])
def test_read_commands_refuse_a_missing_store_and_create_nothing(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "no-such-store"
    args = ["--tenant", "acme"] + (["--pack-id", "p"] if command == "show" else [])
    assert run(typo, command, *args) == 2
    err = capsys.readouterr().err
    assert f"flashcrowd pack {command}: error: no object store at {typo}" in err
    assert not typo.exists()
