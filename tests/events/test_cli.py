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


def test_gen_delta_then_maintain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "lake")
    assert (
        main(["gen", "--users", "400", "--days", "2", "--no-progress", "--store", store, "--format", "delta"])
        == 0
    )
    assert "Delta tables" in capsys.readouterr().out
    ds = EventDataset(LocalObjectStore(tmp_path / "lake"))
    assert ds.lake is not None and ds.population_size() == 400
    assert main(["data", "maintain", "--store", store, "--keep-all", "--min-small-files", "2"]) == 0
    out = capsys.readouterr().out
    assert "events" in out and "compaction" in out
    assert EventDataset(LocalObjectStore(tmp_path / "lake")).scan_events().collect().height == (
        ds.scan_events().collect().height
    )
    # Clear errors naming the flag; a manifest dataset is not a lake.
    assert main(["data", "maintain", "--store", store, "--retention-days", "0"]) == 2
    assert "--retention-days must be >= 1" in capsys.readouterr().err
    assert (
        main(["gen", "--users", "100", "--days", "1", "--no-progress", "--store", str(tmp_path / "m")]) == 0
    )
    assert main(["data", "maintain", "--store", str(tmp_path / "m")]) == 2
    assert "no event lake" in capsys.readouterr().err


def test_table_format_variable_is_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASHCROWD_TABLE_FORMAT", "parquet")
    assert (
        main(["gen", "--users", "100", "--days", "1", "--no-progress", "--store", str(tmp_path / "x")]) == 2
    )
    assert "FLASHCROWD_TABLE_FORMAT" in capsys.readouterr().err


def test_data_migrate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "s")
    assert main(["gen", "--users", "300", "--days", "1", "--no-progress", "--store", store]) == 0
    capsys.readouterr()
    assert main(["data", "migrate", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "on both" in out
    assert EventDataset(LocalObjectStore(tmp_path / "s")).lake is not None
    assert main(["data", "migrate", "--store", store]) == 2
    assert "already an event lake" in capsys.readouterr().err
    assert main(["data", "migrate", "--store", str(tmp_path / "missing")]) == 2


def test_data_erase_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "s")
    assert (
        main(["gen", "--users", "300", "--days", "1", "--no-progress", "--store", store, "--format", "delta"])
        == 0
    )
    victim = int(EventDataset(LocalObjectStore(tmp_path / "s")).scan_profiles().collect()["user_id"][0])
    capsys.readouterr()
    assert main(["data", "erase", "--store", store, "--user", str(victim), "--vacuum-hours", "0"]) == 0
    assert "profiles 1" in capsys.readouterr().out
    assert main(["data", "erase", "--store", store, "--user", "-3"]) == 2
    assert "--user must be in" in capsys.readouterr().err
