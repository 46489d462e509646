"""``flashcrowd db migrate|status`` (the Kubernetes retarget-migrate Job's command)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.main import main


def test_db_migrate_and_status_on_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    assert main(["db", "migrate", "--database-url", url]) == 0
    assert "applied [1, 2]" in capsys.readouterr().out
    assert main(["db", "migrate", "--database-url", url]) == 0
    assert "nothing to apply" in capsys.readouterr().out
    assert main(["db", "status", "--database-url", url]) == 0
    assert "schema version 2" in capsys.readouterr().out


def test_db_migrate_reads_the_environment_on_postgresql(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLASHCROWD_DATABASE_URL", pg_url)
    assert main(["db", "migrate"]) == 0
    assert "applied [1, 2]" in capsys.readouterr().out


def test_db_bad_url_is_exit_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "migrate", "--database-url", "mysql://nope"]) == 2
    assert "FLASHCROWD_DATABASE_URL" in capsys.readouterr().err


def test_the_attribution_migration_counts_members_of_earlier_launches(tmp_path: Path) -> None:
    from services.retarget.db import Database
    from services.retarget.migrations import V1, V2, migrate

    database = Database.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        assert migrate(database, (V1,)) == [1]

        def launched(tx):  # type: ignore[no-untyped-def]
            tx.insert_many(
                "campaign_members",
                ("campaign_pk", "user_id", "arm_id", "holdout", "outcome", "process_us"),
                [(7, u, "a" if u % 3 else "holdout", int(u % 3 == 0), "ISSUED", 1) for u in range(30)],
            )

        database.call(launched)
        assert migrate(database, (V1, V2)) == [2]
        rows = database.call(lambda tx: tx.all("SELECT arm_id, members FROM arm_stats ORDER BY arm_id"))
        assert [(r["arm_id"], r["members"]) for r in rows] == [("a", 20), ("holdout", 10)]
    finally:
        database.close()
