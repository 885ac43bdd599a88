"""A fake Steam on 127.0.0.1 for tests: the Web API's GetAppList and GetItems, SteamSpy's ``all`` pages and the
store assets' CDN, in one server answering in the documented shapes.

``FakeSteam.games`` is the store (appid -> ``FakeGame``): bump a game's ``token`` to re-upload its banner (under a
new content hash when ``hashed``). ``faults[endpoint]`` ("GetAppList", "GetItems", "SteamSpy", "CDN") is a queue
of misbehaviours, one per request before the normal answers: "429" (with ``retry_after``), "503", "slow" (the
answer after ``slow_s``), "malformed" (a cut JSON body). ``extra_items`` go into every GetItems answer.
``counts`` counts the requests per endpoint and per CDN path; ``env()`` points the project's settings here.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import parse_qs, urlsplit

from devtools.workspace import banner_jpeg

ENDPOINTS = {"/IStoreService/GetAppList/v1/": "GetAppList", "/IStoreBrowseService/GetItems/v1/": "GetItems"}


def start_http_server(handler: type[http.server.BaseHTTPRequestHandler]) -> http.server.ThreadingHTTPServer:
    """A threaded HTTP server on a free 127.0.0.1 port, serving from a daemon thread; ``shutdown()`` then
    ``server_close()`` stop it. It polls for shutdown every 50 ms (the default, 0.5 s, is added to every test)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def bare_items_answer(path: str) -> bytes | None:
    """For a test's own fake CDN (``path`` with its query): a GetItems answer describing each asked game without a
    banner path, so that the plain path is fetched; None for any other path."""
    url = urlsplit(path)
    if url.path != "/IStoreBrowseService/GetItems/v1/":
        return None
    ids = [i["appid"] for i in json.loads(parse_qs(url.query)["input_json"][0])["ids"]]
    return json.dumps({"response": {"store_items": [{"appid": a, "success": 1, "name": ""} for a in ids]}}).encode()


@dataclass
class FakeGame:
    name: str
    token: int = 1  # the banner's ?t= token
    hashed: bool = False  # the banner under a content hash (art uploaded since 2025)
    success: int = 1  # GetItems' item success (not 1: unknown to the store)
    visible: bool = True  # False: delisted
    banner: bool = True  # False: the store gives no library_capsule
    type: int = 0
    released: int = 1_300_000_000
    last_modified: int = 1_700_000_000


class FakeSteam:
    def __init__(self, games: dict[int, FakeGame], *, page_size: int = 50000, spy_page_size: int = 1000) -> None:
        self.games = games
        self.page_size = page_size
        self.spy_page_size = spy_page_size
        self.key = "test-key"
        self.faults: defaultdict[str, list[str]] = defaultdict(list)
        self.retry_after = "0"
        self.slow_s = 1.0
        self.extra_items: list[Any] = []
        self.counts: Counter[str] = Counter()
        self.queries: list[dict[str, list[str]]] = []  # GetAppList's, in order
        self.lock = threading.Lock()
        self.server = start_http_server(type("Handler", (_Handler,), {"fake": self}))
        self.server.handle_error = lambda *a: None  # a client that gave up on a slow answer is expected
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def env(self) -> dict[str, str]:
        return {
            "STEAM_API_URL": self.url,
            "STEAMSPY_URL": f"{self.url}/api.php",
            "STEAM_ASSETS_URL": f"{self.url}/store_item_assets/",
            "STEAM_API_KEY": self.key,
        }

    def capsule(self, appid: int) -> str:
        """The banner's file name in ``assets``: under a content hash of its upload when ``hashed``."""
        game = self.games[appid]
        digest = hashlib.sha1(f"{appid}-{game.token}".encode()).hexdigest()
        return f"{digest}/library_600x900.jpg" if game.hashed else "library_600x900.jpg"

    def banner_path(self, appid: int) -> str:
        """The banner's path under the assets' base, without its token."""
        return f"steam/apps/{appid}/{self.capsule(appid)}"

    def banner_bytes(self, appid: int) -> bytes:
        return _banner(appid * 1000 + self.games[appid].token)

    def item(self, appid: int) -> dict[str, Any] | None:
        game = self.games.get(appid)
        if game is None:
            return None
        if game.success != 1:
            return {"item_type": 0, "id": appid, "success": game.success}
        assets = {"asset_url_format": f"steam/apps/{appid}/${{FILENAME}}?t={game.token}", "header": "header.jpg"}
        if game.banner:
            assets |= {"library_capsule": self.capsule(appid), "library_capsule_2x": "library_600x900_2x.jpg"}
        return {
            "item_type": 0, "id": appid, "success": 1, "visible": game.visible, "name": game.name,
            "store_url_path": f"app/{appid}/", "appid": appid, "type": game.type,
            "release": {"steam_release_date": game.released}, "assets": assets,
        }  # fmt: skip

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_banner = cache(banner_jpeg)


class _Handler(http.server.BaseHTTPRequestHandler):
    fake: FakeSteam  # set on the subclass each FakeSteam serves

    def log_message(self, *args) -> None:
        pass

    def send(self, code: int, body: bytes, ctype: str = "application/json", **headers: str) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)

    def do_GET(self) -> None:
        fake = self.fake
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        endpoint = ENDPOINTS.get(url.path, "SteamSpy" if url.path == "/api.php" else "CDN")
        with fake.lock:
            fake.counts[endpoint] += 1
            fake.counts[url.path] += endpoint == "CDN"
            fault = fake.faults[endpoint].pop(0) if fake.faults[endpoint] else None
            if endpoint == "GetAppList":
                fake.queries.append(query)
        if fault == "slow":
            time.sleep(fake.slow_s)
        if fault in ("429", "503"):
            self.send(int(fault), b"busy", "text/plain", Retry_After=fake.retry_after)
        elif fault == "malformed":
            self.send(200, b'{"response": {"store_it')
        else:
            getattr(self, endpoint)(query, url.path)

    def json(self, data: object) -> None:
        self.send(200, json.dumps(data).encode())

    def GetAppList(self, query: dict, path: str) -> None:
        fake = self.fake
        if query.get("key") != [fake.key]:
            return self.send(403, b"<html><body>Forbidden</body></html>", "text/html")
        last, since = int(query["last_appid"][0]), int(query.get("if_modified_since", ["0"])[0])
        size = min(int(query["max_results"][0]), fake.page_size)
        listed = [a for a, g in sorted(fake.games.items()) if a > last and g.visible and g.last_modified > since]
        page = [{"appid": a, "name": fake.games[a].name, "last_modified": fake.games[a].last_modified,
                 "price_change_number": 1} for a in listed[:size]]  # fmt: skip
        more = {"have_more_results": True, "last_appid": listed[size - 1]} if len(listed) > size else {}
        self.json({"response": {"apps": page, **more}})

    def GetItems(self, query: dict, path: str) -> None:
        fake = self.fake
        ids = [i["appid"] for i in json.loads(query["input_json"][0])["ids"]]
        items = [item for a in ids if (item := fake.item(a)) is not None]
        self.json({"response": {"store_items": items + fake.extra_items}})

    def SteamSpy(self, query: dict, path: str) -> None:
        fake = self.fake
        page, size = int(query["page"][0]), fake.spy_page_size
        listed = [a for a, g in sorted(fake.games.items()) if g.visible][page * size : (page + 1) * size]
        self.json({str(a): {"appid": a, "name": fake.games[a].name, "owners": "0 .. 20,000"} for a in listed})

    def CDN(self, query: dict, path: str) -> None:
        fake = self.fake
        parts = path.split("/")  # /store_item_assets/steam/apps/<appid>/...
        appid = int(parts[4]) if len(parts) > 5 and parts[4].isdigit() else 0
        if appid in fake.games and path == f"/store_item_assets/{fake.banner_path(appid)}":
            self.send(200, fake.banner_bytes(appid), "image/jpeg")
        else:
            self.send(404, b"not found", "text/plain")
