"""The catalog command against a fake Steam on loopback (devtools/fake_steam.py): the game list (GetAppList with a
key, SteamSpy without), each game's store metadata (GetItems), bad answers, resume after a kill, incremental runs;
then the downloader on the store's banner paths, and the whole pipeline from nothing to an index."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT

from core.apps import load_apps
from devtools.fake_steam import FakeGame, FakeSteam
from indexer.cli.fetch_catalog import main as catalog_main
from indexer.download import RECORD_FILE, download_banners

QUICK = ("--rate", "1000", "--steamspy-interval", "0", "--timeout", "0.5", "--backoff", "0.01", "--no-progress")
FAST_DL = {"timeout": 2.0, "retries": 2, "backoff": 0.01, "progress": False}


def store() -> dict[int, FakeGame]:
    """Ten games: plain and hashed banners, one without a banner, one unknown to the store, one delisted, one name
    with control characters."""
    games = {appid: FakeGame(f"Game {appid}", hashed=appid % 20 == 0) for appid in range(10, 110, 10)}
    games[30].banner = False
    games[40].success = 0
    games[50].visible = False
    games[60].name = "Bad\x00 name\x1b\n  here"
    games[70].type = 6
    return games


@pytest.fixture
def steam(monkeypatch):
    fake = FakeSteam(store(), page_size=3, spy_page_size=4)
    for name, value in fake.env().items():
        monkeypatch.setenv(name, value)
    yield fake
    fake.close()


def catalog(run_main, out: Path, *args: str):
    return run_main(catalog_main, "--out", str(out), *QUICK, *args)


def entries(path: Path) -> dict[int, dict]:
    return {a["appid"]: a for a in json.loads(path.read_text(encoding="utf-8"))}


def test_the_whole_store_with_a_key(steam, run_main, tmp_path):
    out = tmp_path / "apps.json"
    r = catalog(run_main, out, "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    got = entries(out)
    assert sorted(got) == [10, 20, 30, 60, 70, 80, 90, 100]  # 40 unknown to the store, 50 delisted (not listed)
    assert got[10] == {
        "appid": 10, "name": "Game 10", "type": "game", "release_date": "2011-03-13",
        "banner": "steam/apps/10/library_600x900.jpg?t=1", "last_modified": 1_700_000_000,
    }  # fmt: skip
    assert got[20]["banner"] == f"{steam.banner_path(20)}?t=1" and len(got[20]["banner"].split("/")) == 5
    assert "banner" not in got[30] and got[60]["name"] == "Bad name here" and got[70]["type"] == "software"
    assert steam.counts["GetAppList"] == 3 and steam.counts["GetItems"] == 3  # 9 listed: pages of 3, batches of 4
    assert [q["last_appid"] for q in steam.queries] == [["0"], ["30"], ["70"]]
    assert r.stdout.startswith("catalog: 8 games (7 with the store's banner path); 9 listed, 1 not on the store")
    assert "PARTIAL" not in r.stdout + r.stderr and not out.with_name("apps.json.journal").exists()
    assert load_apps(out)[0]["banner"] == got[10]["banner"], "the downloader and the builder read it as it is"


def test_bad_answers_are_retried_or_left_out(steam, run_main, tmp_path):
    clean = tmp_path / "clean.json"
    assert catalog(run_main, clean).returncode == 0
    steam.faults["GetAppList"] = ["503", "malformed"]
    steam.faults["GetItems"] = ["429", "slow", "malformed", "503"]
    steam.slow_s = 1.0
    duplicate = steam.item(10) | {"name": "Another name"}
    steam.extra_items = ["junk", {"appid": "20", "success": 1}, {"success": 1}, duplicate, {"appid": 999, "success": 1}]
    out = tmp_path / "apps.json"
    r = catalog(run_main, out, "--retries", "5")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == clean.read_bytes()  # the first answer for a repeated appid; unasked appids ignored


def test_a_store_that_keeps_failing_changes_nothing(steam, run_main, tmp_path):
    out = tmp_path / "apps.json"
    out.write_text("[]\n")
    steam.faults["GetItems"] = ["503"] * 3
    r = catalog(run_main, out, "--retries", "2", "--full")
    assert r.returncode == 1 and "HTTP 503" in r.stderr and "rerun" in r.stderr
    assert out.read_text() == "[]\n" and out.with_name("apps.json.journal").exists()
    assert catalog(run_main, out, "--full").returncode == 0  # resumed: the list is not asked again
    assert steam.counts["GetAppList"] == 3 and len(entries(out)) == 8


@pytest.mark.slow
def test_retry_after_is_honoured(steam, run_main, tmp_path):
    steam.faults["GetItems"] = ["429"]
    steam.retry_after = "1"
    t0 = time.monotonic()
    assert catalog(run_main, tmp_path / "apps.json").returncode == 0
    assert time.monotonic() - t0 >= 0.9 and steam.counts["GetItems"] == 2


def test_without_a_key_steamspy_gives_a_partial_list(steam, run_main, tmp_path, monkeypatch):
    monkeypatch.delenv("STEAM_API_KEY")
    out = tmp_path / "apps.json"
    r = catalog(run_main, out)
    assert r.returncode == 0, r.stderr
    assert "PARTIAL" in r.stdout and "STEAM_API_KEY" in r.stdout and "PARTIAL" in r.stderr
    assert steam.counts["GetAppList"] == 0 and steam.counts["SteamSpy"] == 4  # 9 games, 4 a page, then an empty one
    assert sorted(entries(out)) == [10, 20, 30, 60, 70, 80, 90, 100]
    assert all("last_modified" not in a for a in entries(out).values())


def test_a_list_of_games_gets_their_store_metadata(steam, run_main, tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps([{"appid": 20, "name": "Mine"}, {"appid": 50, "name": "Delisted"}, {"appid": 5}]))
    out = tmp_path / "apps.json"
    r = catalog(run_main, out, "--apps", str(mine))
    assert r.returncode == 0, r.stderr
    assert list(entries(out)) == [20] and entries(out)[20]["name"] == "Game 20"
    assert steam.counts["GetAppList"] == 0 and steam.counts["GetItems"] == 1


def test_a_rerun_asks_only_for_what_changed(steam, run_main, tmp_path):
    out = tmp_path / "apps.json"
    assert catalog(run_main, out).returncode == 0
    before = entries(out)
    steam.games[20].token, steam.games[20].last_modified = 2, 1_700_000_100  # re-uploaded art
    steam.games[120] = FakeGame("New game", last_modified=1_700_000_200)
    steam.counts.clear()
    r = catalog(run_main, out)
    assert r.returncode == 0, r.stderr
    assert steam.queries[-1]["if_modified_since"] == ["1700000000"]
    assert steam.counts["GetItems"] == 1 and "2 listed" in r.stdout
    after = entries(out)
    assert sorted(after) == [*sorted(before), 120] and after[20]["banner"] == f"{steam.banner_path(20)}?t=2"
    assert {a: after[a] for a in before if a != 20} == {a: e for a, e in before.items() if a != 20}
    assert catalog(run_main, out, "--since", "2023-11-14").returncode == 0
    assert steam.queries[-1]["if_modified_since"] == ["1699920000"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({"STEAM_API_URL": "ftp://nope"}, "STEAM_API_URL"),
        ({"apps": "[{'appid': 1}]"}, "not valid JSON"),
        ({"apps": '[{"appid": 1, "banner": "https://elsewhere/x.jpg"}]'}, "store asset path"),
        ({"out": '{"not": "a catalog"}'}, "--full"),
    ],
)
def test_bad_input_changes_nothing(steam, run_main, tmp_path, monkeypatch, setup, message):
    out = tmp_path / "catalog" / "apps.json"  # its folder is made only once the input is good
    args = []
    if "apps" in setup:
        (tmp_path / "mine.json").write_text(setup.pop("apps"))
        args = ["--apps", str(tmp_path / "mine.json")]
    if "out" in setup:
        out.parent.mkdir()
        out.write_text(setup.pop("out"))
    for name, value in setup.items():
        monkeypatch.setenv(name, value)
    before = sorted(tmp_path.iterdir())
    r = catalog(run_main, out, *args)
    assert r.returncode == 2 and message in r.stderr
    assert sorted(tmp_path.iterdir()) == before and sum(steam.counts.values()) == 0


def test_a_refused_key_is_said(steam, run_main, tmp_path, monkeypatch):
    monkeypatch.setenv("STEAM_API_KEY", "not-the-key-1234")
    r = catalog(run_main, tmp_path / "apps.json")
    assert r.returncode == 1 and "403" in r.stderr and not (tmp_path / "apps.json").exists()
    assert "not-the-key-1234" not in r.stderr + r.stdout and "<STEAM_API_KEY>" in r.stderr, "the key is never shown"
    assert steam.counts["GetAppList"] == 1, "a refused key is not retried"


@pytest.mark.slow
def test_killed_then_rerun_gives_the_same_file(tmp_path):
    games = {appid: FakeGame(f"Game {appid}", hashed=appid % 3 == 0) for appid in range(1, 41)}
    steam = FakeSteam(games, page_size=7)
    try:
        env = {**os.environ, **steam.env(), "PYTHONPATH": str(ROOT)}
        command = [sys.executable, str(ROOT / "scripts" / "fetch_catalog.py"), "--batch-size", "2", "--no-progress"]
        whole = tmp_path / "whole.json"
        subprocess.run([*command, "--out", str(whole), "--rate", "1000"], env=env, check=True, capture_output=True)
        steam.counts.clear()
        out = tmp_path / "apps.json"
        journal = out.with_name("apps.json.journal")
        run = subprocess.Popen([*command, "--out", str(out), "--rate", "20"], env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not journal.exists() or journal.read_text().count('"items"') < 4):
            time.sleep(0.02)
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert not out.exists() and journal.read_text().count('"items"') >= 4
        asked = steam.counts["GetItems"]
        rerun = subprocess.run([*command, "--out", str(out), "--rate", "1000"], env=env, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr
        assert "steps resumed" in rerun.stdout
        assert out.read_bytes() == whole.read_bytes() and not journal.exists()
        assert steam.counts["GetItems"] <= 20 + 1 and steam.counts["GetItems"] - asked < 20 - 3
    finally:
        steam.close()


# -- the downloader on the store's paths ------------------------------------------------------------------------


def test_banners_come_from_the_store_and_a_reupload_is_fetched_again(steam, run_main, tmp_path):
    apps, banners = tmp_path / "apps.json", tmp_path / "banners"
    assert catalog(run_main, apps).returncode == 0
    assets = steam.env()["STEAM_ASSETS_URL"]
    first = download_banners(load_apps(apps), banners, assets_url=assets, **FAST_DL)
    assert first.ok and first.downloaded == [10, 20, 30, 60, 70, 80, 90, 100] and first.changed == []
    for appid in first.downloaded:
        assert (banners / f"{appid}.jpg").read_bytes() == steam.banner_bytes(appid)
    assert steam.counts["/store_item_assets/steam/apps/20/library_600x900.jpg"] == 0, "no guess where the store told"
    assert steam.counts["/store_item_assets/steam/apps/30/library_600x900.jpg"] == 1, "the plain path: no banner given"
    record = json.loads((banners / RECORD_FILE).read_text())
    assert record["fetched"]["20"] == f"{steam.banner_path(20)}?t=1"

    steam.games[20].token = steam.games[10].token = 2  # re-uploaded: a new hash for 20, a new token for 10
    steam.games[20].last_modified = steam.games[10].last_modified = 1_700_000_100
    assert catalog(run_main, apps).returncode == 0
    hits = steam.counts.copy()
    second = download_banners(load_apps(apps), banners, assets_url=assets, **FAST_DL)
    assert second.downloaded == second.changed == [10, 20] and len(second.skipped) == 6
    assert "2 downloaded (2 changed in the store), 6 skipped (unchanged)" in second.line()
    assert steam.counts["CDN"] - hits["CDN"] == 2, "unchanged banners are not requested"
    assert (banners / "20.jpg").read_bytes() == steam.banner_bytes(20)


@pytest.mark.slow
def test_from_nothing_to_an_index_then_only_the_changes(steam, run_main, tmp_path, install_checkpoints):
    from indexer.cli.build_index import main as build_main
    from indexer.cli.download_banners import main as download_main

    install_checkpoints("S16")
    apps, banners, index = tmp_path / "apps.json", tmp_path / "banners", tmp_path / "index"
    build = [
        "--images",
        str(banners),
        "--out",
        str(index),
        "--apps",
        str(apps),
        "--strategies",
        "SimpleS16",
        "--k",
        "3",
    ]
    assert catalog(run_main, apps).returncode == 0
    r = run_main(download_main, "--apps", str(apps), "--out", str(banners), "--no-progress")
    assert r.returncode == 0 and "8 downloaded" in r.stdout, r.stderr
    r = run_main(build_main, *build)
    assert r.returncode == 0 and "8 images (8 embedded, 0 reused" in r.stdout, r.stdout + r.stderr
    built = json.loads((index / "apps.json").read_text())
    assert [a["appid"] for a in built] == [10, 20, 30, 60, 70, 80, 90, 100] and built[3]["name"] == "Bad name here"

    steam.games[90].token, steam.games[90].last_modified = 5, 1_700_000_500
    assert catalog(run_main, apps).returncode == 0
    r = run_main(download_main, "--apps", str(apps), "--out", str(banners), "--no-progress")
    assert "1 downloaded (1 changed in the store), 7 skipped" in r.stdout
    r = run_main(build_main, *build)
    assert r.returncode == 0 and "8 images (1 embedded, 7 reused" in r.stdout, r.stdout + r.stderr

    # served, without the banners (a dyno's ephemeral disk): each game's banner where the store says it is
    from app import create_app
    from app.config import Settings

    settings = Settings.from_env(os.environ | {"INDEX_DIR": str(index), "BANNERS_DIR": str(tmp_path / "none")})
    client = create_app(settings).test_client()
    urls = {a: client.get(f"/apps/{a}").get_json()["banner_url"] for a in (20, 30, 90)}
    assets = f"{steam.url}/store_item_assets/"
    assert urls == {
        20: f"{assets}{steam.banner_path(20)}?t=1",  # under a content hash: the plain path is not it
        30: f"{assets}steam/apps/30/library_600x900.jpg",  # the store gave none: the path it was downloaded from
        90: f"{assets}{steam.banner_path(90)}?t=5",  # re-uploaded
    }
    assert all(requests.get(url, timeout=5).status_code == 200 for url in urls.values())


@pytest.mark.parametrize("extra", [("--full",), ()])
def test_out_a_folder_is_bad_input_before_any_request(steam, run_main, tmp_path, extra):
    (tmp_path / "apps.json").mkdir()
    r = catalog(run_main, tmp_path / "apps.json", *extra)
    assert r.returncode == 2 and "is a folder" in r.stderr, r.stderr
    assert steam.counts["GetAppList"] == 0 and steam.counts["GetItems"] == 0
