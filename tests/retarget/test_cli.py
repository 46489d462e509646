"""``flashcrowd db migrate|status`` (the Kubernetes retarget-migrate Job's command)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.main import main


def test_db_migrate_and_status_on_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    assert main(["db", "migrate", "--database-url", url]) == 0
    assert "applied [1]" in capsys.readouterr().out
    assert main(["db", "migrate", "--database-url", url]) == 0
    assert "nothing to apply" in capsys.readouterr().out
    assert main(["db", "status", "--database-url", url]) == 0
    assert "schema version 1" in capsys.readouterr().out


def test_db_migrate_reads_the_environment_on_postgresql(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLASHCROWD_DATABASE_URL", pg_url)
    assert main(["db", "migrate"]) == 0
    assert "applied [1]" in capsys.readouterr().out


def test_db_bad_url_is_exit_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "migrate", "--database-url", "mysql://nope"]) == 2
    assert "FLASHCROWD_DATABASE_URL" in capsys.readouterr().err
