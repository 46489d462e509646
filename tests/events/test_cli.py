from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.main import main
from services.events.dataset import EventDataset
from services.storage import LocalObjectStore


def test_gen_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASHCROWD_STORE_URL", str(tmp_path / "env-store"))
    args = ["gen", "--users", "400", "--days", "2", "--seed", "9", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "events" in out and "peak RSS" in out
    ds = EventDataset(LocalObjectStore(tmp_path / "env-store"))
    assert ds.population_size() == 400 and len(ds.days()) == 2

    assert main(args) == 2  # exists: the message says what to do
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--prefix", "data"]) == 0

    assert main(["gen", "--days", "3", "--sale-day", "3", "--no-progress"]) == 2
    assert "sale day 3" in capsys.readouterr().err
    assert main(["gen", "--store", "s3://nohost", "--no-progress"]) == 2
    assert "cannot open object store" in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "gen" in capsys.readouterr().err
