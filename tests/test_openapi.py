"""The OpenAPI document against the code: every Flask route documented, the README's table in agreement, the
docs page served from here, and a bounded property-based run (schemathesis) against the live gunicorn service."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from app.openapi import document

IGNORED_METHODS = {"HEAD", "OPTIONS"}


def operations(doc: dict) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation in a document, paths as Flask writes them (``/match/<appid>``)."""
    return {(m.upper(), path.replace("{", "<").replace("}", ">")) for path, item in doc["paths"].items() for m in item}


def test_every_route_is_documented(app):
    documented = operations(document())
    routes = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"<\1>", rule.rule)
        routes |= {(m, path) for m in rule.methods - IGNORED_METHODS}
    missing = routes - documented
    assert not missing, f"routes without an operation in app/openapi.py: {sorted(missing)}"
    assert not documented - routes, f"documented but not served: {sorted(documented - routes)}"


def test_readme_api_table_matches_the_document():
    text = (ROOT / "README.md").read_text()
    section = text.split("## HTTP API", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(GET|POST) (/[^` ]*)`", section, flags=re.M))
    api = {
        (method.upper(), path.replace("{", "<").replace("}", ">"))
        for path, item in document()["paths"].items()
        for method, op in item.items()
        if op["tags"] != ["pages"]
    }
    assert listed == api, f"README only: {sorted(listed - api)}; document only: {sorted(api - listed)}"


def test_document_and_docs_page(app, built_index):
    client = app.test_client()
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"] == "3.1.0" and operations(doc) == operations(document())
    k = next(p for p in doc["paths"]["/match/{appid}"]["get"]["parameters"] if p["name"] == "k")
    assert k["schema"]["maximum"] == 10  # this index's table width
    strategy = next(p for p in doc["paths"]["/match/{appid}"]["get"]["parameters"] if p["name"] == "strategy")
    assert strategy["schema"]["enum"] == built_index.strategies
    page = client.get("/docs")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "script-src 'none'" in page.headers["Content-Security-Policy"] and "<script" not in html
    assert "http://" not in html.replace("http://localhost", "")  # nothing from elsewhere
    for method, path in operations(doc):
        assert f"{method} {path.replace('<', '{').replace('>', '}')}" in html
    assert client.get("/static/docs.css").status_code == 200


def test_answers_fit_their_schemas(app, built_index):
    """Every JSON answer of a few real requests validates against the document (refs resolved)."""
    from jsonschema_rs import validator_for

    doc = document()
    client = app.test_client()
    cases = [
        ("get", "/match/{appid}", "/match/10?k=3&offset=1"),
        ("get", "/match", "/match?appids=10,99999"),
        ("get", "/strategies", "/strategies"),
        ("get", "/apps/{appid}", "/apps/10"),
        ("get", "/apps", "/apps?q=portal"),
        ("get", "/unique", "/unique?n=2"),
        ("get", "/compare/{appid}", "/compare/10?k=2"),
        ("get", "/health", "/health"),
        ("get", "/match/{appid}", "/match/99999"),
        ("get", "/attention/{appid}", "/attention/10?strategy=SimpleS16"),
        ("get", "/why/{appid}/{other}", "/why/10/20?strategy=SimpleS16"),
        ("get", "/why/{appid}/{other}", "/why/10/99999"),
    ]
    for method, path, url in cases:
        r = getattr(client, method)(url)
        spec = doc["paths"][path][method]["responses"][str(r.status_code)]["content"]["application/json"]["schema"]
        schema = {**spec, "components": doc["components"]}
        validator_for(schema).validate(r.get_json())


@pytest.mark.slow
def test_property_based_run_against_the_live_service(server):
    """schemathesis: generated requests for every operation; no 5xx, every answer as documented.

    Bounded: a few examples per operation, each request with a timeout, no shrinking.
    """
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", timeout=10)
    failures, calls = [], {}

    def make_check(op):
        name = f"{op.method.upper()} {op.path}"

        @settings(
            max_examples=4,
            deadline=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy())
        def check(case):
            calls[name] = calls.get(name, 0) + 1
            # an upload's bytes valid for the schema may still not be an image (a 400 by design)
            excluded = [positive_data_acceptance] if op.method == "post" else []
            case.call_and_validate(base_url=server.url, timeout=30, excluded_checks=excluded)

        return name, check

    for operation in schema.get_all_operations():
        name, check = make_check(operation.ok())
        try:
            check()
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # schemathesis reports a group of failures; one line each, all operations
            failures.append(f"{name}: {str(e)[:800]}")
    assert len(calls) >= 15, calls  # every operation was exercised
    assert not failures, "\n\n".join(failures)
