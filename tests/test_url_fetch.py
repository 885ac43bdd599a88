"""Queries by image URL (POST /match {"url": ...}) against local servers: redirects, huge, slow and private targets.

The "public" image server of these tests listens on 127.0.0.1 too, so the tests
let exactly that address through (``allow_networks``), while the default policy
refuses it like any loopback, private or link-local address.
"""

from __future__ import annotations

import http.server
import io
import ipaddress
import socket
import struct
import threading
import time
import zlib

import pytest
from conftest import start_http_server
from PIL import Image

from app.config import Settings
from app.problems import BadRequest, Forbidden, UpstreamFailed
from app.urlfetch import UrlFetcher, public_only

LOCAL = ["127.0.0.1/32"]


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a 1x1 PNG with its IHDR rewritten)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    banner = b""

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        routes = {
            "/banner.jpg": lambda: self._send(200, self.banner, {"Content-Type": "image/jpeg"}),
            "/hop": lambda: self._send(302, headers={"Location": "/banner.jpg"}),
            "/to-private": lambda: self._send(302, headers={"Location": "http://10.1.2.3/banner.jpg"}),
            "/to-loopback": lambda: self._send(301, headers={"Location": f"http://127.0.0.2:{port}/banner.jpg"}),
            "/loop": lambda: self._send(302, headers={"Location": "/loop"}),
            "/huge": lambda: self._send(200, b"", {"Content-Length": str(1 << 30), "Content-Type": "image/jpeg"}),
            "/bomb": lambda: self._send(200, _png_bomb(), {"Content-Type": "image/png"}),
        }
        if self.path in routes:
            routes[self.path]()
        elif self.path == "/endless":  # no length: a body that never ends
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            try:
                for _ in range(10_000):
                    self.wfile.write(b"\xff" * 65536)
            except OSError:
                pass
        elif self.path == "/slow":  # a trickle: a byte every 0.2 s
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        else:
            self._send(404, b"no")


@pytest.fixture(scope="module")
def image_server(built_index):
    _Handler.banner = (built_index.banners / "40.jpg").read_bytes()
    server = start_http_server(_Handler)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def fetcher(**kw) -> UrlFetcher:
    return UrlFetcher(kw.pop("timeout_s", 2.0), kw.pop("max_bytes", 1 << 20), public_only(kw.pop("allow", LOCAL)))


def test_address_policy():
    allow = public_only()
    for refused in ("127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "::1",
                    "fe80::1", "fc00::1", "::ffff:127.0.0.1", "0.0.0.0", "224.0.0.1"):  # fmt: skip
        assert not allow(ipaddress.ip_address(refused)), refused
    for ok in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"):
        assert allow(ipaddress.ip_address(ok))
    assert public_only(["10.0.0.0/8"])(ipaddress.ip_address("10.9.9.9"))
    # IPv6 addresses that reach an IPv4 one, judged by it: NAT64 (of 127.0.0.1, 169.254.169.254, 10.0.0.1), the
    # local-use NAT64 prefix, 6to4, IPv4-compatible
    for refused in ("64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::a00:1", "64:ff9b:1::a00:1",
                    "2002:a9fe:a9fe::1", "::7f00:1"):  # fmt: skip
        assert not allow(ipaddress.ip_address(refused)), refused
    assert allow(ipaddress.ip_address("64:ff9b::5db8:d822"))  # NAT64 of a public address


def _host_recorder(seen: list[str]) -> type[http.server.BaseHTTPRequestHandler]:
    """A handler that notes each request's Host header in ``seen`` and answers b"abc"."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.headers["Host"])
            self.send_response(200)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"abc")

    return Handler


def test_an_internationalised_host_is_fetched_by_its_ascii_name(monkeypatch):
    """A host name in Unicode goes out in its IDNA form, in DNS and in Host alike (Host cannot carry Unicode)."""
    seen: list[str] = []
    server = start_http_server(_host_recorder(seen))
    port = server.server_address[1]
    resolved = []
    real = socket.getaddrinfo
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda host, *a, **kw: resolved.append(host) or real("127.0.0.1", *a, **kw)
    )
    try:
        assert UrlFetcher(5, 1000, public_only(["127.0.0.1/32"])).fetch(f"http://例え.jp:{port}/x.png") == b"abc"
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [f"xn--r8jz45g.jp:{port}"] and resolved[0] == "xn--r8jz45g.jp"


def test_fetches_and_follows_checked_redirects(image_server, built_index):
    want = (built_index.banners / "40.jpg").read_bytes()
    assert fetcher().fetch(image_server + "/banner.jpg") == want
    assert fetcher().fetch(image_server + "/hop") == want


@pytest.mark.parametrize(
    ("path", "kind", "code"),
    [
        ("/to-private", Forbidden, "url_not_allowed"),  # refused before any connection to 10.1.2.3
        ("/to-loopback", Forbidden, "url_not_allowed"),  # 127.0.0.2 is not the allowed 127.0.0.1
        ("/loop", UpstreamFailed, "url_fetch_failed"),
        ("/huge", UpstreamFailed, "url_too_large"),  # refused from Content-Length
        ("/endless", UpstreamFailed, "url_too_large"),  # cut while streaming
        pytest.param("/slow", UpstreamFailed, "url_fetch_timeout", marks=pytest.mark.slow),  # waits its deadline
        ("/missing", UpstreamFailed, "url_fetch_failed"),
    ],
)
def test_refused_targets(image_server, path, kind, code):
    start = time.monotonic()
    with pytest.raises(kind) as e:
        fetcher(timeout_s=1.0).fetch(image_server + path)
    assert e.value.code == code
    assert time.monotonic() - start < 10  # bounded by the fetch deadline, not the server


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("ftp://example.com/a.jpg", BadRequest),
        ("file:///etc/passwd", BadRequest),
        ("http://user:pw@example.com/a.jpg", BadRequest),
        ("http://[::1", BadRequest),
        ("http://localhost:1/a.jpg", Forbidden),
        ("http://169.254.169.254/latest/meta-data", Forbidden),
    ],
)
def test_refused_urls(url, kind):
    with pytest.raises(kind):
        UrlFetcher(1.0, 1000, public_only()).fetch(url)  # the service's policy: public addresses only


def test_post_match_by_url(make_client, image_server):
    client = make_client(url_fetch=True, url_fetch_allow_networks=LOCAL)
    r = client.post("/match?strategy=SimpleS16&k=3", json={"url": image_server + "/hop"})
    assert r.status_code == 200, r.data
    assert r.get_json()["matches"][0]["appid"] == 40
    bomb = client.post("/match?strategy=SimpleS16", json={"url": image_server + "/bomb"})
    assert bomb.status_code == 400 and bomb.get_json()["error"]["code"] == "too_many_pixels"
    private = client.post("/match", json={"url": image_server + "/to-private"})
    assert private.status_code == 403 and private.get_json()["error"]["code"] == "url_not_allowed"
    assert client.post("/match", json={"uri": "x"}).get_json()["error"]["code"] == "bad_url"
    assert client.post("/match", json={"url": "gopher://x"}).status_code == 400

    default = make_client(url_fetch=True)  # the default policy refuses loopback, our test server included
    assert default.post("/match", json={"url": image_server + "/banner.jpg"}).status_code == 403
    off = make_client()
    r = off.post("/match", json={"url": image_server + "/banner.jpg"})
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "url_fetch_disabled"


def test_url_settings_are_checked():
    from app.config import ConfigError

    s = Settings.from_env({"URL_FETCH": "1", "URL_FETCH_ALLOW_NETWORKS": "10.0.0.0/8, 127.0.0.1"})
    assert s.url_fetch and s.url_fetch_allow_networks == ["10.0.0.0/8", "127.0.0.1/32"]
    with pytest.raises(ConfigError, match="URL_FETCH_ALLOW_NETWORKS"):
        Settings.from_env({"URL_FETCH_ALLOW_NETWORKS": "intranet"})


class _V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def test_url_fetch_of_an_ipv6_literal_sends_a_bracketed_host_header():
    """RFC 9112/3986: an IPv6 literal in Host is bracketed ("[::1]:8080"); "::1:8080" is not a host and port."""
    seen: list[str] = []
    try:
        server = _V6Server(("::1", 0), _host_recorder(seen))
    except OSError:
        pytest.skip("no IPv6 loopback")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        fetcher = UrlFetcher(5, 1 << 20, public_only(["::1/128"]))
        assert fetcher.fetch(f"http://[::1]:{port}/x.png") == b"abc"
        assert seen == [f"[::1]:{port}"]
    finally:
        server.shutdown()
        server.server_close()
