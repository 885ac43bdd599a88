"""`make demo`'s first step: without internet it stops at once, with a message saying what it needs."""

from __future__ import annotations

import importlib.util
import time

from conftest import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("check_online", ROOT / "scripts" / "check_online.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_stops_at_once_with_a_clear_message(monkeypatch, capsys):
    check = _module()
    monkeypatch.setattr(check, "CHECKS", {"the Steam CDN (banners)": "http://127.0.0.1:9/620/library_600x900.jpg"})
    start = time.monotonic()
    assert check.main() == 1
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert "cannot reach the Steam CDN (banners)" in err
    assert "needs internet access" in err and "make test" in err


def test_any_http_answer_counts_as_online(file_server, tmp_path, monkeypatch):
    check = _module()
    url = file_server(tmp_path) + "/no-such-file"  # a 404 is still an answer
    assert check.reachable(url) is None
    monkeypatch.setattr(check, "CHECKS", {"a local server": url})
    assert check.main() == 0
