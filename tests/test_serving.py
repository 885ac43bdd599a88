"""How the service is served (serving/): request framing, the workers' board, and the real gunicorn service
with its worker class: readiness, balanced connections, slow clients, upload admission, bad framing."""

from __future__ import annotations

import http.client
import json
import logging
import os
import select
import signal
import socket
import threading
import time
import types

import pytest
import requests
from conftest import GunicornServer, server_env
from gunicorn.config import Config

from devtools.server import connection_owner, connections_per_worker, running_server
from serving.board import READY, Board
from serving.dispatch import AppCall, Limits
from serving.http1 import ChunkScanner, RequestError, error_response, head_framing

# -- framing (no server) ----------------------------------------------------------------------------


def test_head_framing_reads_length_chunked_and_expect():
    assert head_framing(b"POST / HTTP/1.1\r\nContent-Length: 12\r\nHost: x").length == 12
    assert head_framing(b"POST / HTTP/1.1\r\ntransfer-encoding: Chunked").chunked
    assert head_framing(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3").expect_continue
    assert head_framing(b"GET / HTTP/1.1\r\nHost: x") == head_framing(b"GET / HTTP/1.1")


def test_expect_continue_counts_from_http_1_1_clients_only():
    assert not head_framing(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3").expect_continue


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked", 400, "bad_framing"),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4", 400, "bad_content_length"),
        (b"POST / HTTP/1.1\r\nContent-Length: -3", 400, "bad_content_length"),
        (b"POST / HTTP/1.1\r\nContent-Length: 0x10", 400, "bad_content_length"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked", 501, "unsupported_transfer_coding"),
    ],
)
def test_head_framing_refuses_ambiguous_bodies(head, status, code):
    with pytest.raises(RequestError) as e:
        head_framing(head)
    assert (e.value.status, e.value.code) == (status, code)


def _scan_bytewise(body: bytes, max_bytes: int = 1000) -> int | None:
    """Feed a chunked body one byte at a time, as a trickling client would; the end index, once found."""
    buf = bytearray()
    scanner = ChunkScanner(0, max_bytes)
    for b in body:
        buf.append(b)
        end = scanner.scan(buf)
        if end is not None:
            return end
    return None


def test_chunk_scanner_finds_the_end_with_extensions_and_trailers():
    body = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\nNEXT"
    assert _scan_bytewise(body) == len(body) - len(b"NEXT")
    assert _scan_bytewise(b"5\r\nhel") is None  # incomplete: wait for more


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"zz\r\nabc\r\n", 400, "bad_chunk_size"),
        (b"-5\r\nabc\r\n", 400, "bad_chunk_size"),
        (b"\r\n", 400, "bad_chunk_size"),
        (b"3\r\nabcXY", 400, "bad_chunked_body"),
        (b"400\r\n", 413, "too_large"),
    ],
)
def test_chunk_scanner_refuses_bad_chunks(body, status, code):
    with pytest.raises(RequestError) as e:
        _scan_bytewise(body, max_bytes=1000)
    assert (e.value.status, e.value.code) == (status, code)


def test_error_response_is_the_api_shape():
    raw = error_response(503, "busy", "try later", retry_after=1)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head and b"Connection: close" in head
    assert json.loads(body) == {"error": {"code": "busy", "message": "try later"}}


def test_board_counts_live_ready_workers_only():
    board = Board(rows=4)
    mine, other = board.claim(), board.claim()
    assert board.ready() == []
    board.set(mine, READY, 3)
    assert board.ready() == [(mine, os.getpid(), 3)] and board.fewest_connections_elsewhere(other) == 3
    pid = os.fork()
    if pid == 0:  # a worker that says it serves, then dies without cleaning up (SIGKILL)
        board.set(other, READY, 0)
        os._exit(0)
    os.waitpid(pid, 0)
    assert [row for row, _, _ in board.ready()] == [mine]
    assert board.claim() == other  # the dead worker's row is reused


HEAVY = [  # (the request's head, whether it runs a model pass) with the CDN fallback on; appid 424242 is not indexed
    (b"GET /match/424242 HTTP/1.1", True),
    (b"GET http://h.example/match/424242 HTTP/1.1", True),  # absolute form
    (b"GET /%6Datch/424242 HTTP/1.1", True),  # percent-encoded: routed as /match/424242
    (b"HEAD /match/424242 HTTP/1.1", True),
    (b"GET /match/424242?strategy=nope HTTP/1.1", False),  # a 400, no fetch
    (b"GET /match/10 HTTP/1.1", False),  # indexed: the tables
    (b"GET /%6Datch/10?mirror=1 HTTP/1.1", False),
    (b"GET /health HTTP/1.1", False),
    (b"POST /match HTTP/1.1", True),
    (b"POST /upload HTTP/1.1", True),
    (b"PUT /match/424242 HTTP/1.1", False),  # a 405
    (b"POST /no/such/thing HTTP/1.1", False),  # a 404
    (b"OPTIONS /match/424242 HTTP/1.1", False),
    (b"GET /why/10/20 HTTP/1.1", True),  # two forward passes
    (b"GET /w%68y/10/20.png?strategy=SimpleS16 HTTP/1.1", True),
    (b"GET /attention/10.png HTTP/1.1", False),  # the stored map
    (b"GET /pair/10/20 HTTP/1.1", False),  # the page; its picture is a /why
]


@pytest.mark.parametrize(("head", "heavy"), HEAVY)
def test_model_passes_are_classified_on_the_route_the_app_matches(make_app, head, heavy):
    """The worker parses the head as gunicorn does and asks the app, which decides on its own routing."""
    with_fallback = make_app(fallback_fetch=True, steam_api_url="http://127.0.0.1:9")
    without = make_app()
    worker = types.SimpleNamespace(cfg=Config(), log=logging.getLogger("test"))
    call = AppCall(worker, head + b"\r\nHost: x\r\nContent-Length: 0\r\n\r\n", ("127.0.0.1", 1), ("127.0.0.1", 2))
    assert Limits(**with_fallback.config["SERVING"]).is_heavy(call.environ) is heavy
    assert Limits(**without.config["SERVING"]).is_heavy(call.environ) is head.startswith(
        (b"POST /match", b"POST /upload", b"GET /w")
    )


@pytest.mark.parametrize("app_fails", [False, True])
def test_request_hooks_run_around_every_call_and_a_failing_post_request_costs_nothing(app_fails, caplog):
    """gunicorn's pre_request/post_request, as its own workers run them: post_request after every request, even
    a failed one, and an exception in it is logged without touching the answer (or the worker's loop)."""
    seen = []
    cfg = Config()
    cfg.set("pre_request", lambda worker, req: seen.append(("pre", req.path)))

    def post_request(worker, req, environ, resp):
        seen.append(("post", req.path))
        raise RuntimeError("a broken hook")

    def wsgi(environ, start_response):
        if app_fails:
            raise RuntimeError("a broken app")
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    class Log(logging.LoggerAdapter):  # gunicorn's logger: the standard one, and an access log
        def access(self, *args) -> None:
            seen.append(("access", args[1].path))

    cfg.set("post_request", post_request)
    worker = types.SimpleNamespace(
        cfg=cfg,
        log=Log(logging.getLogger("test"), {}),
        wsgi=wsgi,
        nr=0,
        max_requests=10,
        alive=True,
        workers_ready=None,
    )
    call = AppCall(worker, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n", ("127.0.0.1", 1), ("127.0.0.1", 2))
    parts, keep = call.run()
    answer = b"".join(parts)
    assert seen == ([("pre", "/x"), ("post", "/x")] if app_fails else [("pre", "/x"), ("access", "/x"), ("post", "/x")])
    assert answer.startswith(b"HTTP/1.1 500" if app_fails else b"HTTP/1.1 200") and keep is not app_fails
    assert answer.endswith(b'has been logged"}}' if app_fails else b"\r\n\r\nok")
    assert "Exception in post_request hook" in caplog.text


# -- the real service (gunicorn.conf.py, serving.worker.BufferedWorker) ----------------------------


class StartWatcher(GunicornServer):
    """A server whose every /health answer, from launch on, is recorded as (status, body)."""

    def watch_until(self, status: int, timeout: float = 120.0) -> list[tuple[int, dict]]:
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()[-3000:]
            try:
                r = requests.get(self.url + "/health", timeout=5)
                seen.append((r.status_code, r.json()))
                if r.status_code == status:
                    return seen
            except requests.RequestException:
                pass
            time.sleep(0.02)
        raise AssertionError(f"not ready in {timeout} s: {self.output()[-3000:]}")


@pytest.fixture(scope="module")
def served(built_index, tmp_path_factory):
    """2 workers, short deadlines, one model pass per worker and no queue, 12 MB of bodies per worker;
    ViT-S/16 loaded before serving."""
    env = server_env(
        built_index,
        HEADER_TIMEOUT="2",
        UPLOAD_TIMEOUT="3",
        UPLOAD_CONCURRENCY="1",
        UPLOAD_QUEUE="0",
        UPLOAD_BUFFER_MB="12",
        PRELOAD_MODELS="SimpleS16",
    )
    srv = StartWatcher(env, tmp_path_factory.mktemp("serving") / "gunicorn.log")
    try:
        srv.start_seen = srv.watch_until(200)
        yield srv
    finally:
        srv.stop()


def raw_exchange(srv, data: bytes, timeout: float = 10.0, pause: float = 0.0) -> bytes:
    """Send raw bytes (then wait `pause` s), read until the server closes or `timeout`."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as s:
        s.sendall(data)
        if pause:
            time.sleep(pause)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            out += b"<timeout>"
    return out


def json_body(reply: bytes) -> dict:
    return json.loads(reply.partition(b"\r\n\r\n")[2])


@pytest.mark.slow
def test_ready_only_when_every_worker_serves_even_after_a_worker_dies(served):
    assert all(body["workers_ready"] == 2 for status, body in served.start_seen if status == 200)
    assert all(body["status"] == "starting" for status, body in served.start_seen if status != 200)
    old = served.workers(expect=2)
    os.kill(old[0], signal.SIGKILL)
    served.watch_until(503, timeout=10)  # noticed within a poll or two (the board re-checks pids every 0.1 s)
    seen = served.watch_until(200, timeout=60)  # the replacement loads its model, then serves
    starting = [body for status, body in seen if status == 503]
    assert starting and all(b["status"] == "starting" and b["workers_ready"] == 1 for b in starting), seen[:3]
    assert seen[-1][1]["workers_ready"] == 2 and old[0] not in served.workers(expect=2)


def settled(srv) -> list[int]:
    """The workers' pids, once earlier tests' connections are gone (the workers balance all they hold)."""
    pids = srv.workers(expect=2)
    deadline = time.monotonic() + 10
    while sum(connections_per_worker(srv.port, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


@pytest.mark.slow
def test_a_stopping_worker_loses_no_keep_alive_request(served):
    """A worker told to stop (SIGTERM, as in every restart) answers its keep-alive connections' next
    request with Connection: close before it closes them; the clients reconnect to the other worker."""
    stop, answered, failures = threading.Event(), [], []

    def lookups() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)  # reconnects after a close
        while not stop.wait(0.005):
            try:
                conn.request("GET", "/match/10?k=1")
                r = conn.getresponse()
                r.read()
                (answered if r.status == 200 else failures).append(r.status)
            except (OSError, http.client.HTTPException) as e:
                failures.append(repr(e))
                conn.close()
        conn.close()

    threads = [threading.Thread(target=lookups) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        old = served.workers(expect=2)
        os.kill(old[0], signal.SIGTERM)
        deadline = time.monotonic() + 30
        while old[0] in served.workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == [] and len(answered) > 50, (failures[:5], len(answered))
    served.watch_until(200, timeout=60)  # the replacement serves


@pytest.mark.slow
def test_keep_alive_connections_spread_over_the_workers(served):
    pids = settled(served)
    conns = [http.client.HTTPConnection("127.0.0.1", served.port, timeout=10) for _ in range(8)]
    try:
        for _ in range(6):  # a worker over its share closes surplus connections; the clients reconnect
            for c in conns:
                c.request("GET", "/match/10?k=3")
                r = c.getresponse()
                assert r.status == 200
                r.read()
            if all(c.sock is not None for c in conns):  # none was closed in this round: settled
                break
        owners = [connection_owner(served.port, c.sock.getsockname()[1], pids) for c in conns]
        split = [owners.count(pid) for pid in pids]
        assert sum(split) == 8 and max(split) - min(split) <= 1, (split, owners)
    finally:
        for c in conns:
            c.close()


@pytest.mark.slow
def test_slow_clients_get_408_and_lookups_keep_flowing(served):
    slow = []
    for i in range(32):  # half stall in the headers, half trickle a body
        s = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        if i % 2:
            s.sendall(b"POST /match HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n")
        else:
            s.sendall(b"GET /match/10 HTTP/1.1\r\n")
        slow.append(s)
    try:
        for s in slow:  # one more byte each: still nowhere near a complete request
            s.sendall(b"X")
        with requests.Session() as http:
            for _ in range(40):
                assert http.get(f"{served.url}/match/10?k=3", timeout=10).status_code == 200
        for i, s in enumerate(slow):  # then the total deadline (2 s headers, 3 s body) answers each
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert json_body(reply)["error"]["code"] == ("upload_timeout" if i % 2 else "request_timeout")
    finally:
        for s in slow:
            s.close()


@pytest.mark.slow
def test_oversized_declared_body_is_refused_before_it_is_sent(served):
    reply = raw_exchange(served, b"POST /match HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413") and json_body(reply)["error"]["code"] == "too_large"
    # the home page's upload form: its refusal is a page for the person who chose the file
    reply = raw_exchange(served, b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    head, _, page = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"Content-Type: text/html" in head
    assert b"<h1>413: too large</h1>" in page and b"MB limit" in page


@pytest.mark.slow
def test_bodies_beyond_the_memory_budget_get_503_and_closing_frees_it(served, built_index):
    """6 uploads declaring 5 MB each, none sent: a worker holds 2 (10 of its 12 MB), so 2 or more get 503."""
    head = b"POST /match?strategy=SimpleS16 HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
    socks = [socket.create_connection(("127.0.0.1", served.port), timeout=10) for _ in range(6)]
    try:
        for s in socks:
            s.sendall(head + f"Content-Length: {5 * 2**20}\r\n\r\n".encode())
        time.sleep(0.5)  # refusals are immediate; the others wait for their bodies (3 s deadline)
        refused = [s for s in socks if select.select([s], [], [], 0)[0]]
        assert 2 <= len(refused) <= 4, len(refused)
        for s in refused:
            reply = s.recv(65536)
            assert reply.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in reply, reply[:300]
            assert json_body(reply)["error"]["code"] == "busy" and "12 MB" in json_body(reply)["error"]["message"]
    finally:
        for s in socks:
            s.close()
    image = (built_index.banners / "30.jpg").read_bytes()
    for _ in range(4):  # the closed connections gave their share back: uploads get through on both workers
        headers = {"Content-Type": "image/jpeg"}
        r = requests.post(f"{served.url}/match?strategy=SimpleS16&k=1", data=image, headers=headers, timeout=30)
        assert r.status_code == 200 and r.json()["matches"][0]["appid"] == 30


@pytest.mark.slow
@pytest.mark.parametrize("size", [b"zz", b"-5"])
def test_bad_chunk_size_is_400_json(served, size):
    head = b"POST /match?strategy=SimpleS16 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    reply = raw_exchange(served, head + b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\nabc\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert json_body(reply)["error"]["code"] == "bad_chunk_size"


@pytest.mark.slow
def test_disconnect_mid_chunk_logs_one_line(served):
    start = len(served.output())
    head = b"POST /match HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    with socket.create_connection(("127.0.0.1", served.port)) as s:
        s.sendall(head + b"100\r\nonly a few bytes of the chunk")
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while "in the middle of a request" not in served.output()[start:] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    log = served.output()[start:]
    assert log.count("in the middle of a request") == 1, log
    assert "Traceback" not in log and "ERROR" not in log, log


@pytest.mark.slow
@pytest.mark.parametrize("line", [b"GARBAGE", b"GET /match/10 HTTP/9.9", b"GET  HTTP/1.1"])
def test_malformed_request_line_gets_json(served, line):
    reply = raw_exchange(served, line + b"\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert json_body(reply)["error"]["code"] == "bad_request"


@pytest.mark.slow
def test_pipelined_requests_are_answered_in_order(served):
    two = b"GET /match/10?k=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    two += b"GET /match/20?k=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    reply = raw_exchange(served, two)
    first, second = reply.split(b"HTTP/1.1 200 OK")[1:]
    assert b'"k":1' in first and b'"appid":10' in first and b'"k":2' in second


@pytest.mark.slow
def test_a_thousand_pipelined_requests_in_one_send_are_all_answered(served):
    settled(served)  # alone on its worker: not a surplus connection, which would be closed after one answer
    one = b"GET /match/10?k=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    reply = raw_exchange(served, one * 999 + b"GET /match/20?k=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.count(b"HTTP/1.1 200 OK") == 1000 and b"HTTP/1.1 4" not in reply and b"HTTP/1.1 5" not in reply
    assert b'"appid":20' in reply.rpartition(b"HTTP/1.1 200 OK")[2]  # in order, to the last one
    assert served.proc.poll() is None and len(served.workers(expect=2)) == 2


@pytest.mark.slow
def test_http_1_0_client_expecting_continue_gets_only_the_final_answer(served):
    head = b"POST /match?strategy=SimpleS16 HTTP/1.0\r\nContent-Type: image/png\r\nExpect: 100-continue\r\n"
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
        s.sendall(head + b"Content-Length: 3\r\n\r\n")
        assert select.select([s], [], [], 0.5)[0] == []  # no interim 100 Continue
        s.sendall(b"abc")
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.0 400") and json_body(reply)["error"]["code"] == "not_an_image", reply[:300]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["upload", "why", "form"])
def test_model_passes_beyond_the_slots_get_503_with_retry_after(served, built_index, kind):
    """Uploads, the upload form (whose 503 is a page) and /why (two forward passes, each pair a new one) share
    the model slots."""
    image = (built_index.banners / "30.jpg").read_bytes()
    if kind == "form":
        body = (
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n' + image + b"\r\n--b--\r\n"
        )
        head = "POST /upload?strategy=SimpleS16&k=3 HTTP/1.1\r\nHost: x\r\n"
        head += "Content-Type: multipart/form-data; boundary=b\r\n"
    else:
        body = image
        head = "POST /match?strategy=SimpleS16&k=3 HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    why = "GET /why/30/{}?strategy=SimpleS16 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    sends = [why.format(10 * i).encode() for i in range(1, 7)] if kind == "why" else [head.encode() + body] * 6
    socks = [socket.create_connection(("127.0.0.1", served.port), timeout=60) for _ in range(6)]
    try:
        for s, data in zip(socks, sends, strict=True):  # all at once: 2 workers x 1 slot, no queue
            s.sendall(data)
        replies = []
        for s in socks:
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            replies.append(reply)
    finally:
        for s in socks:
            s.close()
    statuses = sorted(int(r.split(b" ", 2)[1]) for r in replies)
    assert set(statuses) == {200, 503} and statuses.count(200) <= 2, statuses
    busy = next(r for r in replies if r.startswith(b"HTTP/1.1 503"))
    assert b"Retry-After: 1" in busy
    ok = next(r for r in replies if r.startswith(b"HTTP/1.1 200"))
    if kind == "form":
        assert b"Content-Type: text/html" in busy and b"<h1>503: busy</h1>" in busy
        assert b'href="/render/30' in ok  # the gallery of the upload's matches, itself first
        return
    assert json_body(busy)["error"]["code"] == "busy"
    assert (json_body(ok)["matches"][0]["appid"] if kind == "upload" else json_body(ok)["a"]["appid"]) == 30


@pytest.mark.slow
def test_max_requests_replaces_the_worker_and_every_request_is_answered(built_index, tmp_path):
    """gunicorn's --max-requests: the worker answers its last request, is replaced, and no request fails."""
    env = server_env(built_index, WEB_CONCURRENCY="1", GUNICORN_CMD_ARGS="--max-requests 3")
    with running_server(env, tmp_path) as srv:
        first = srv.workers(expect=1)
        statuses = [requests.get(f"{srv.url}/strategies", timeout=30).status_code for _ in range(8)]
        assert statuses == [200] * 8
        assert srv.workers(expect=1) != first
        assert "Autorestarting worker after current request." in srv.output()
