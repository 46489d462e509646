"""Adapters from public data sets: exact mapping on small hand-written files, the published layout on
both stores, the CLI, and the real files under ../shared/data (skipped when absent)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from services.cli.main import main
from services.events.adapters import import_dataset, shared_data_dir, write_dataset
from services.events.adapters.movielens import OCCUPATION_INTERESTS, age_band, read_movielens
from services.events.adapters.taobao import OFFICIAL_END, OFFICIAL_START, SOURCE_TAG, read_taobao
from services.events.dataset import EventDataset
from services.events.generator import DatasetExistsError
from services.events.schema import EVENTS_SCHEMA, PROFILES_SCHEMA, AgeBand, EventType, Gender
from services.events.sharding import bucket_of
from services.storage import LocalObjectStore, ObjectStore

E = EventType
T0 = int(datetime(2017, 11, 26, 1, 0, tzinfo=UTC).timestamp())

TAOBAO_ROWS = [
    (1, 100, 7, "pv", T0),
    (1, 100, 7, "cart", T0 + 60),
    (1, 100, 7, "buy", T0 + 120),
    (2, 200, 8, "fav", T0 + 30),
    (2, 201, 8, "pv", T0 + 40),
    (3, 300, 9, "pv", int(datetime(2017, 9, 11, tzinfo=UTC).timestamp())),  # outside the official window
    (4, 400, 9, "pv", T0 + 3600),
]


@pytest.fixture
def taobao_csv(tmp_path: Path) -> Path:
    path = tmp_path / "UserBehavior.csv"
    path.write_text("".join(f"{u},{i},{c},{b},{t}\n" for u, i, c, b, t in TAOBAO_ROWS))
    return path


def test_taobao_mapping(taobao_csv: Path) -> None:
    data = read_taobao(taobao_csv)
    ev = data.events.sort(["user_id", "ts", "event_type"])
    assert ev.schema == EVENTS_SCHEMA
    rows = [(r["user_id"], r["event_type"], r["item_id"], r["category_id"]) for r in ev.iter_rows(named=True)]
    assert rows == [
        (1, E.PRODUCT_VIEW, 100, 7),
        (1, E.ADD_CART, 100, 7),
        (1, E.ORDER, 100, 7),
        (1, E.PAY, 100, 7),
        (2, E.FOLLOW, 200, 8),
        (2, E.PRODUCT_VIEW, 201, 8),
        (4, E.PRODUCT_VIEW, 400, 9),
    ]
    buy = ev.filter(pl.col("event_type").is_in([E.ORDER, E.PAY]))
    assert buy["order_id"].n_unique() == 1 and buy["order_id"].null_count() == 0
    assert buy["amount_fen"].to_list() == [0, 0]  # a purchase of unknown value, never an invented price
    others = ev.filter(~pl.col("event_type").is_in([E.ORDER, E.PAY]))
    assert (
        others["order_id"].null_count() == others.height
        and others["amount_fen"].null_count() == others.height
    )
    assert ev["event_id"].n_unique() == ev.height
    assert all(eid >> 56 == SOURCE_TAG for eid in ev["event_id"].to_list())
    assert ev["bucket"].to_list() == [bucket_of(u) for u in ev["user_id"].to_list()]
    assert ev["ts"].min() >= OFFICIAL_START and ev["ts"].max() < OFFICIAL_END
    assert data.report["rows_outside_window"] == 1 and data.report["outside_window"] == "dropped"
    # No demographics: an unknown profile per user of the file.
    assert data.profiles.schema == PROFILES_SCHEMA
    assert data.profiles["user_id"].to_list() == [1, 2, 4]
    assert set(data.profiles["age_band"].to_list()) == {0} and set(data.profiles["gender"].to_list()) == {0}
    assert data.profiles["region"].null_count() == 3

    kept = read_taobao(taobao_csv, keep_outside_window=True)
    assert kept.events.filter(pl.col("user_id") == 3).height == 1


@pytest.fixture
def movielens_dir(tmp_path: Path) -> Path:
    root = tmp_path / "ml"
    root.mkdir()
    (root / "u.genre").write_text("unknown|0\nAction|1\nDrama|2\nHorror|3\n\n")
    flags = {1: "0|1|1|0", 2: "0|0|1|0", 3: "0|0|1|1", 4: "0|0|0|0"}
    (root / "u.item").write_text(
        "".join(f"{i}|Film {i} (1995)|01-Jan-1995||http://x|{f}\n" for i, f in flags.items())
    )
    (root / "u.user").write_text("1|24|M|programmer|85711\n2|53|F|homemaker|94043\n3|15|F|student|32067\n")
    ratings = [(1, 1, 5, 880000000), (1, 3, 2, 880000100), (2, 2, 4, 880000200), (3, 4, 3, 880000300)]
    (root / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    return root


def test_movielens_mapping(movielens_dir: Path) -> None:
    data = read_movielens(movielens_dir)
    ev = data.events.sort(["user_id", "ts", "event_type"])
    rows = [
        (r["user_id"], r["event_type"], r["video_id"], r["category_id"]) for r in ev.iter_rows(named=True)
    ]
    # Drama is on 3 films, Action and Horror on 1 each: the most specific genre wins (ids = index + 1).
    assert rows == [
        (1, E.VIDEO_PLAY, 1, 2),  # Action+Drama -> Action (tie on count: lower index)
        (1, E.VIDEO_FINISH, 1, 2),  # rating 5
        (1, E.VIDEO_PLAY, 3, 4),  # Drama+Horror -> Horror
        (2, E.VIDEO_PLAY, 2, 3),
        (2, E.VIDEO_FINISH, 2, 3),  # rating 4
        (3, E.VIDEO_PLAY, 4, 1),  # no genre flag -> unknown (1)
    ]
    assert ev["item_id"].to_list() == ev["video_id"].to_list()
    assert ev["amount_fen"].null_count() == ev.height  # nothing was bought
    p = data.profiles.sort("user_id")
    assert p["age_band"].to_list() == [AgeBand.AGE_18_24, AgeBand.OVER_50, AgeBand.UNDER_18]
    assert p["gender"].to_list() == [Gender.MALE, Gender.FEMALE, Gender.FEMALE]
    assert p["interests"].to_list() == [
        list(OCCUPATION_INTERESTS["programmer"]),
        list(OCCUPATION_INTERESTS["homemaker"]),
        list(OCCUPATION_INTERESTS["student"]),
    ]
    assert [c["name"] for c in data.categories] == ["unknown", "Action", "Drama", "Horror"]


def test_age_bands() -> None:
    ages = (7, 17, 18, 24, 25, 30, 31, 35, 36, 40, 41, 50, 51, 73)
    expected = dict(zip(ages, (1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), strict=True))
    assert {age: int(age_band(age)) for age in expected} == expected
    assert age_band(0) == AgeBand.UNKNOWN


def test_written_dataset_reads_like_a_generated_one(any_store: ObjectStore, taobao_csv: Path) -> None:
    data = read_taobao(taobao_csv)
    result = write_dataset(any_store, data, prefix="tb/", chunk_users=2)
    ds = EventDataset(any_store, "tb/")
    assert ds.version == 1 and ds.population_size() == 3
    assert result.manifest["format"] == "flashcrowd.events.dataset/v1"
    assert result.manifest["stats"]["events"] == data.events.height
    back = ds.scan_events().collect().sort("event_id")
    assert back.equals(data.events.sort("event_id"))
    # Files split by day and bucket-range chunk, sorted by (bucket, user_id, ts): the generator's layout.
    parts = ds.parts("events")
    assert all(p["key"].startswith("tb/events/dt=") for p in parts)
    for part in parts:
        frame = pl.read_parquet(any_store.get_bytes(part["key"]))
        assert frame.equals(frame.sort(["bucket", "user_id", "ts"]))
    assert ds.scan_profiles().collect().height == 3
    assert {c["category_id"] for c in ds.world["categories"]} == {7, 8, 9}
    with pytest.raises(DatasetExistsError):
        write_dataset(any_store, data, prefix="tb/")
    write_dataset(any_store, data, prefix="tb/", overwrite=True)


def test_imported_lake_holds_the_same_rows(any_store: ObjectStore, taobao_csv: Path) -> None:
    data = read_taobao(taobao_csv)
    result = write_dataset(any_store, data, prefix="tb/", chunk_users=2, table_format="delta")
    ds = EventDataset(any_store, "tb/")
    assert ds.lake is not None and ds.version == 1 and ds.population_size() == 3
    assert result.manifest["stats"]["events"] == data.events.height
    assert ds.scan_events().collect().sort("event_id").equals(data.events.sort("event_id"))
    assert all(p["key"].startswith("tb/tables/events/dt=") for p in ds.parts("events"))
    assert {c["category_id"] for c in ds.world["categories"]} == {7, 8, 9}
    with pytest.raises(DatasetExistsError):
        write_dataset(any_store, data, prefix="tb/", table_format="delta")


def test_cli_import(tmp_path: Path, movielens_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    assert main(["data", "import", "movielens", str(movielens_dir), "--store", str(store), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert report["ratings"] == 4 and report["events"] == 6
    assert main(["data", "import", "movielens", str(movielens_dir), "--store", str(store)]) == 2
    assert "already has a dataset" in capsys.readouterr().err
    assert main(["data", "import", "taobao", str(tmp_path / "missing"), "--store", str(store)]) == 2
    assert "no Taobao UserBehavior.csv" in capsys.readouterr().err
    lake = tmp_path / "lake"
    assert (
        main(["data", "import", "movielens", str(movielens_dir), "--store", str(lake), "--format", "delta"])
        == 0
    )
    assert EventDataset(LocalObjectStore(lake)).lake is not None


# --- the real files ---------------------------------------------------------------------------------

DATA = shared_data_dir()


def _need(folder: str, file: str) -> Path:
    path = DATA / folder
    if not (path / file).is_file():
        pytest.skip(f"real data set {folder} not found under {DATA} (set FLASHCROWD_SHARED_DATA)")
    return path


@pytest.mark.realdata
def test_real_taobao_first_users(local_store: ObjectStore) -> None:
    path = _need("taobao-userbehavior-first-users", "UserBehavior.csv")
    data = read_taobao(path)
    # README: 84,475 events of 815 users; pv 75,872, cart 4,497, fav 2,356, buy 1,750; a handful
    # outside the official 9 days.
    assert data.report["rows"] == 84_475
    outside = data.report["rows_outside_window"]
    assert 0 < outside < 100
    counts = data.report["events_by_type"]
    assert counts["add_cart"] == 4_497 and counts["follow"] == 2_356
    assert counts["order"] == counts["pay"] == 1_750  # no buy fell outside the window
    assert counts["product_view"] == 75_872 - outside
    assert data.report["users"] == 815
    import_dataset(local_store, "taobao", path)
    ds = EventDataset(local_store)
    assert ds.population_size() == 815
    assert ds.scan_events().select(pl.len()).collect().item() == data.events.height


@pytest.mark.realdata
def test_real_taobao_slice() -> None:
    path = _need("taobao-userbehavior-slice", "UserBehavior.csv")
    data = read_taobao(path)
    assert data.report["rows"] == 110_300 and data.report["rows_outside_window"] == 0
    assert data.report["users"] == 66_454
    assert data.report["events_by_type"]["pay"] == 2_493
    buyers = data.events.filter(pl.col("event_type") == E.PAY)["user_id"].n_unique()
    assert buyers == 2_407  # README: 2,407 distinct buyers


@pytest.mark.realdata
def test_real_movielens() -> None:
    path = _need("movielens-100k", "u.data")
    data = read_movielens(path)
    assert data.report["ratings"] == 100_000 and data.report["users"] == 943
    assert data.report["unknown_occupations"] == []
    counts = data.report["events_by_type"]
    assert counts["video_play"] == 100_000
    raw = pl.read_csv(path / "u.data", separator="\t", has_header=False, new_columns=["u", "i", "r", "t"])
    assert counts["video_finish"] == raw.filter(pl.col("r") >= 4).height
    assert data.profiles["gender"].is_in([Gender.FEMALE, Gender.MALE]).all()
    assert data.profiles["age_band"].is_in(list(range(1, 8))).all()
