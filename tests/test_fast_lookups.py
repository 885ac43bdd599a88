"""The lookup fast path (app/fast_lookups.py) answers exactly what Flask answers, and only when it is sure."""

from __future__ import annotations

import pytest
from werkzeug.test import Client

from app.fast_lookups import FastLookups, plain_query

PLAIN = [  # answered by the fast path
    "/match/{a}",
    "/match/{a}?k=3",
    "/match/{a}?k=10&strategy=SimpleS16",
    "/match/{a}?strategy=complexb16&k=1",  # strategy names are case-insensitive, as in Flask's path
    "/match/{a}?k=&strategy=",  # empty values: the defaults
    "/match/0{a}",  # leading zeros: the same appid, as parse_appid reads it
]
DEFERRED = [  # left to Flask: same answers, by construction
    ("/match/{a}?k=0", {}),
    ("/match/{a}?k=11", {}),
    ("/match/{a}?k=abc", {}),
    ("/match/{a}?strategy=Nope", {}),
    ("/match/{a}?k=3&k=4", {}),
    ("/match/{a}?k=%33", {}),
    ("/match/{a}?offset=2", {}),
    ("/match/{a}?mirror=1", {}),
    ("/match/{a}?k", {}),
    ("/match/{a}/", {}),
    ("/match/-5", {}),
    ("/match/99999999", {}),  # not in the index: the CDN fallback path
    ("/match/{a}", {"If-None-Match": "*"}),
    ("/match/{a}", {"Origin": "https://example.com"}),
    ("/match/{a}", {"Accept-Encoding": "gzip"}),
]


def both(app):
    """Clients of the app with the fast path (the app as served) and of Flask behind it."""
    fast = app.wsgi_app
    assert isinstance(fast, FastLookups)
    return Client(fast), Client(fast.wsgi_app)


def assert_same(a, b) -> None:
    assert a.status == b.status
    assert list(a.headers.items()) == list(b.headers.items())  # in order
    assert a.get_data() == b.get_data()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"cors_origins": ["*"]}, {"public_url": "https://example.com/"}, {"cache_max_age": 0}],
    ids=["defaults", "cors", "public_url", "no_cache"],
)
def test_plain_lookups_are_answered_here_exactly_as_flask_answers(make_app, built_index, overrides):
    app = make_app(**overrides)
    fast, flask = both(app)
    for appid in (built_index.apps[0]["appid"], built_index.apps[-1]["appid"]):
        for url in PLAIN:
            url = url.format(a=appid)
            path, _, query = url.partition("?")
            environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query, "SCRIPT_NAME": ""}
            assert app.wsgi_app.answer(environ) is not None, url
            a, b = fast.get(url), flask.get(url)
            assert a.status_code == 200, url
            assert_same(a, b)


def test_everything_else_goes_to_flask(make_app, built_index):
    app = make_app(cors_origins=["https://example.com"])
    fast, flask = both(app)
    appid = built_index.apps[3]["appid"]
    for url, headers in DEFERRED:
        url = url.format(a=appid)
        path, _, query = url.partition("?")
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query}
        environ |= {"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()}
        assert app.wsgi_app.answer(environ) is None, (url, headers)
        assert_same(fast.get(url, headers=headers), flask.get(url, headers=headers))
    assert fast.head(f"/match/{appid}").status_code == 200
    assert fast.post(f"/match/{appid}").status_code == 405


def test_fast_answers_are_counted_in_the_metrics(make_app, built_index):
    fast, _ = both(make_app())
    label = 'http_request_duration_seconds_count{endpoint="/match/<appid>",method="GET",status="200"}'

    def count() -> float:
        for line in fast.get("/metrics").get_data(as_text=True).splitlines():
            if line.startswith(label):
                return float(line.split()[-1])
        return 0.0

    before = count()
    for _ in range(3):
        assert fast.get(f"/match/{built_index.apps[1]['appid']}?k=2").status_code == 200
    assert count() == before + 3


def test_an_app_still_starting_is_answered_by_flask(make_app, built_index):
    app = make_app()
    from app.params import EXTENSION_KEY

    service = app.extensions.pop(EXTENSION_KEY)
    fast, _ = both(app)
    r = fast.get(f"/match/{built_index.apps[0]['appid']}")
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "starting"
    app.extensions[EXTENSION_KEY] = service
    assert fast.get(f"/match/{built_index.apps[0]['appid']}").status_code == 200


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", {}),
        ("k=5", {"k": "5"}),
        ("strategy=ComplexB16&k=5", {"strategy": "ComplexB16", "k": "5"}),
        ("k=", {"k": ""}),
        ("k=5&k=6", None),
        ("k", None),
        ("k=5&", None),
        ("x=1", None),
        ("k=%35", None),
        ("strategy=a+b", None),
        ("strategy=Complex%42", None),
    ],
)
def test_plain_query(query, expected):
    assert plain_query(query) == expected
