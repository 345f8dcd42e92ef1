"""The HTTP app: bad input answers 4xx with a clear message and the service keeps serving; property
tests generate bodies from the request models; a real uvicorn on 127.0.0.1 survives a mixed burst."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from newsrec.config import ServeConfig
from newsrec.serve.app import create_app
from newsrec.serve.service import Recommender
from tests.test_service import a_user_with_history, serving_dirs  # noqa: F401  (shared fixture)

LIMITS = ServeConfig(retrieve_k=50, default_k=5, max_k=20, max_history=30, max_body_bytes=4000,
                     max_title_chars=200)


@pytest.fixture(scope="module")
def app_service(serving_dirs):  # noqa: F811
    return Recommender.load(serving_dirs.model_dir, serving_dirs.index_dir, serve_cfg=LIMITS)


@pytest.fixture(scope="module")
def client(app_service):
    app = create_app(app_service, LIMITS, save_on_shutdown=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def known(app_service, serving_dirs):  # noqa: F811
    dataset = serving_dirs.dataset
    return {"user": a_user_with_history(dataset), "news": [str(dataset.news_idx_to_id[i]) for i in (1, 2, 3)]}


def detail(response) -> str:
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str), body
    return body["detail"]


def test_good_requests(client, known):
    r = client.post("/recommend", json={"user_id": known["user"], "k": 7})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 7 and {"news_id", "score", "title"} <= set(items[0])
    assert [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)
    r = client.post("/recommend", json={"history": known["news"]})
    assert r.status_code == 200 and len(r.json()["items"]) == LIMITS.default_k
    assert not set(known["news"]) & {i["news_id"] for i in r.json()["items"]}
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["news"] >= 1


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"", 422, "body"),
    (b"[1, 2]", 422, "body"),
    (b"{}", 422, "exactly one of user_id or history"),
    (b'{"user_id": "U1", "history": []}', 422, "exactly one of user_id or history"),
    (b'{"user_id": "U1", "k": 0}', 422, "k: Input should be greater than or equal to 1"),
    (b'{"user_id": "U1", "k": 21}', 422, "k: Input should be less than or equal to 20"),
    (b'{"user_id": "U1", "k": "5"}', 422, "k: Input should be a valid integer"),
    (b'{"user_id": "U1", "k": 2.5}', 422, "k"),
    (b'{"user_id": 12}', 422, "user_id: Input should be a valid string"),
    (b'{"history": "N1"}', 422, "history: Input should be a valid list"),
    (b'{"history": [1, 2]}', 422, "history.0"),
    (b'{"user_id": "U1", "extra": 1}', 422, "extra: Extra inputs are not permitted"),
    (b'{"history": [' + b",".join([b'"N1"'] * 31) + b"]}", 422, "history: List should have at most 30"),
])
def test_malformed_recommend_is_4xx_with_message(client, known, body, status, message):
    r = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in detail(r)
    ok = client.post("/recommend", json={"user_id": known["user"]})  # and the service keeps serving
    assert ok.status_code == 200


def test_unknown_user_404_and_unknown_ids_422(client, known):
    r = client.post("/recommend", json={"user_id": "no-such-user"})
    assert r.status_code == 404 and "unknown user 'no-such-user'" in detail(r)
    r = client.post("/recommend", json={"history": [known["news"][0], "NX1", "NX2"]})
    assert r.status_code == 422 and "NX1, NX2" in detail(r)
    r = client.post("/recommend", json={"history": [known["news"][0], "NX1"], "ignore_unknown": True})
    assert r.status_code == 200 and r.json()["ignored_ids"] == ["NX1"] and r.json()["history_used"] == 1


def test_oversized_body_413(client, known):
    big = {"history": ["N" + "9" * 200] * 25}
    r = client.post("/recommend", json=big)
    assert r.status_code == 413 and "serve.max_body_bytes=4000" in detail(r)

    def chunks():  # no Content-Length: the limit applies while the body streams in
        yield b'{"history": ['
        for _ in range(100):
            yield b'"' + b"N" * 100 + b'",'
        yield b'"N1"]}'

    r = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in detail(r)
    assert client.post("/recommend", json={"user_id": known["user"]}).status_code == 200


def test_add_news_then_recommendable(client, app_service, known):
    r = client.post("/news", json={"news_id": "LIVE-1", "title": "storm warning for the coast",
                                   "category": "news"})
    assert r.status_code == 201, r.text
    assert r.json() == {"news_id": "LIVE-1", "news_count": app_service.index.count}
    assert app_service.key_of("LIVE-1") is not None
    r = client.post("/news", json={"news_id": "LIVE-1", "title": "again"})
    assert r.status_code == 409 and "already known" in detail(r)
    for bad in ({"news_id": "X"}, {"title": "t"}, {"news_id": " ", "title": "t"},
                {"news_id": "X", "title": "t" * 201}, {"news_id": "X", "title": 5}):
        r = client.post("/news", json=bad)
        assert r.status_code == 422, (bad, r.text)
    # the fresh news can be clicked and is then excluded
    r = client.post("/recommend", json={"history": ["LIVE-1"], "k": 20})
    assert r.status_code == 200 and "LIVE-1" not in {i["news_id"] for i in r.json()["items"]}


def test_unexpected_failure_is_500_and_service_recovers(client, app_service, known, monkeypatch):
    original = app_service.index.search
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # fails inside the model work, on the batching worker
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(app_service.index, "search", flaky)
    r = client.post("/recommend", json={"user_id": known["user"]})
    assert r.status_code == 500 and "RuntimeError" in detail(r)
    assert client.post("/recommend", json={"user_id": known["user"]}).status_code == 200
    assert calls["n"] == 2


def test_metrics_count_requests_and_latency(client, known):
    before = client.get("/metrics.json").json()
    client.post("/recommend", json={"user_id": known["user"]})
    client.post("/recommend", json={"user_id": "no-such-user"})
    after = client.get("/metrics.json").json()
    ep = after["endpoints"]["POST /recommend"]
    prev = before["endpoints"].get("POST /recommend", {"requests": 0, "4xx": 0})
    assert ep["requests"] == prev["requests"] + 2 and ep["4xx"] == prev["4xx"] + 1
    assert 0 < ep["p50_ms"] <= ep["p95_ms"] <= ep["p99_ms"]


def test_openapi_states_the_limits(client):
    spec = client.get("/openapi.json").json()
    assert {"/recommend", "/news", "/health", "/metrics"} <= set(spec["paths"])
    props = spec["components"]["schemas"]["RecommendRequest"]["properties"]
    assert props["k"]["maximum"] == LIMITS.max_k and props["k"]["minimum"] == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
recommend_bodies = st.fixed_dictionaries({}, optional={
    "user_id": st.text(max_size=140) | json_values,
    "history": st.lists(st.text(max_size=12), max_size=40) | json_values,
    "k": st.integers(-5, 30) | json_values,
    "ignore_unknown": st.booleans() | json_values,
}) | json_values
news_bodies = st.fixed_dictionaries({}, optional={
    "news_id": st.text(max_size=140) | json_values,
    "title": st.text(max_size=250) | json_values,
    "category": st.text(max_size=10) | json_values,
})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=recommend_bodies)
def test_property_recommend_never_5xx(client, body):
    r = client.post("/recommend", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 404, 413, 422), (body, r.status_code, r.text)
    if r.status_code != 200:
        detail(r)
    else:
        assert len(r.json()["items"]) <= LIMITS.max_k


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=news_bodies)
def test_property_news_never_5xx(client, body):
    r = client.post("/news", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code in (201, 400, 409, 413, 422), (body, r.status_code, r.text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_live_uvicorn_survives_mixed_burst(app_service, known):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(app_service, LIMITS, save_on_shutdown=False),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    rng = np.random.default_rng(0)
    kinds = [
        ("good", lambda: {"json": {"user_id": known["user"], "k": 5}}),
        ("good", lambda: {"json": {"history": known["news"]}}),
        ("bad", lambda: {"content": b"{oops", "headers": {"content-type": "application/json"}}),
        ("bad", lambda: {"json": {"user_id": known["user"], "k": 999}}),
        ("bad", lambda: {"json": {"user_id": "ghost"}}),
        ("bad", lambda: {"json": {"history": ["x" * 300] * 20}}),
    ]
    plan = [kinds[i] for i in rng.integers(0, len(kinds), size=120)]
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            def fire(item):
                kind, make = item
                return kind, http.post("/recommend", **make()).status_code

            with ThreadPoolExecutor(max_workers=4) as pool:
                results = list(pool.map(fire, plan))
            statuses = [s for _, s in results]
            assert all(s < 500 for s in statuses), statuses
            assert all(s == 200 for kind, s in results if kind == "good")
            assert all(400 <= s < 500 for kind, s in results if kind == "bad")
            health = http.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            metrics = http.get("/metrics.json").json()
            assert metrics["errors_5xx"] == 0 and metrics["requests"] >= len(plan)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()
