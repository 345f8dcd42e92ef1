"""Protected writes (bearer token), the fresh-news cap with eviction, Prometheus metrics."""
from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from newsrec.config import ServeConfig
from newsrec.errors import ConfigError
from newsrec.serve import index as index_module
from newsrec.serve.app import check_open_writes, create_app
from newsrec.serve.service import Recommender
from tests.test_service import a_user_with_history, serving_dirs  # noqa: F401  (shared fixture)

TOKEN = "s3cret-token"


def _service(serving_dirs, **serve):  # noqa: F811
    return Recommender.load(serving_dirs.model_dir, serving_dirs.index_dir,
                            serve_cfg=ServeConfig(retrieve_k=50, max_k=20, max_history=30, batch_max=1,
                                                  **serve))


def _samples(text: str) -> dict:
    """{(name, sorted labels): value} of a Prometheus text page."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_writes_need_the_token(serving_dirs, monkeypatch):  # noqa: F811
    monkeypatch.delenv("NEWSREC_ADMIN_TOKEN", raising=False)
    service = _service(serving_dirs, admin_token=TOKEN)
    with TestClient(create_app(service, save_on_shutdown=False)) as client:
        body = {"news_id": "W-1", "title": "a title"}
        r = client.post("/news", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in r.json()["detail"]
        assert client.post("/news", json=body, headers={"Authorization": "Bearer nope"}).status_code == 403
        assert client.post("/news", json=body, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        assert client.post("/index/save").status_code == 401
        assert service.key_of("W-1") is None  # nothing was added by the refused requests
        r = client.post("/news", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 201, r.text
        # reads stay open
        assert client.post("/recommend", json={"history": ["W-1"]}).status_code == 200
        assert client.get("/health").status_code == 200


def test_token_from_the_environment(serving_dirs, monkeypatch):  # noqa: F811
    monkeypatch.setenv("NEWSREC_ADMIN_TOKEN", TOKEN)
    service = _service(serving_dirs)
    with TestClient(create_app(service, save_on_shutdown=False)) as client:
        assert client.post("/news", json={"news_id": "E-1", "title": "t"}).status_code == 401
        assert client.post("/news", json={"news_id": "E-1", "title": "t"},
                           headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 201


def test_open_writes_refused_off_loopback(monkeypatch):
    monkeypatch.delenv("NEWSREC_ADMIN_TOKEN", raising=False)
    for host in ("127.0.0.1", "localhost", "::1"):
        check_open_writes(ServeConfig(), host)
    with pytest.raises(ConfigError, match="0.0.0.0 without an admin token.*--allow-open-writes"):
        check_open_writes(ServeConfig(), "0.0.0.0")
    check_open_writes(ServeConfig(admin_token=TOKEN), "0.0.0.0")
    check_open_writes(ServeConfig(allow_open_writes=True), "10.1.2.3")
    monkeypatch.setenv("NEWSREC_ADMIN_TOKEN", TOKEN)
    check_open_writes(ServeConfig(), "0.0.0.0")


def test_fresh_news_cap_evicts_the_oldest(serving_dirs, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setattr(index_module, "COMPACT_AFTER", 3)  # compact during the test, not only at save
    service = _service(serving_dirs, max_fresh_news=2)
    base = service.index.count
    titles = [str(t) for t in serving_dirs.dataset.news["title"][:6]]
    for i, title in enumerate(titles):
        service.add_news(f"F-{i}", title)
        kept = [f"F-{j}" for j in range(max(0, i - 1), i + 1)]
        assert [m["news_id"] for m in service.index.fresh] == kept
        assert service.index.count == base + len(kept)
        assert [service.key_of(f"F-{j}") is not None for j in range(i + 1)] == \
            [f"F-{j}" in kept for j in range(i + 1)]
    assert service.stats()["fresh_news"] == 2 and service.evicted == 4
    # evicted news are never retrieved; the survivors are, exactly as brute force over the live rows
    history = [str(serving_dirs.dataset.news_idx_to_id[i]) for i in (1, 2, 3)]
    rec = service.recommend(history=history, k=20)
    user = service.encode_history(service.resolve_history(history, ignore_unknown=False)[0])
    live_keys = np.array([k for k in service.index.keys if k in service.index])
    scores = service.index.vectors_of(live_keys) @ user
    scores[np.isin(live_keys, [service.key_of(h) for h in history])] = -np.inf
    order = np.argsort(-scores, kind="stable")[:20]
    # the same top 20 up to ties (news of one subcategory share the category-lift part of their
    # scores; an untrained deep part separates them by rounding only), and only live news
    np.testing.assert_allclose([i.score for i in rec.items], scores[order], rtol=0, atol=1e-5)
    live = {service.news_id_of(int(k)): s for k, s in zip(live_keys, scores)}
    for item in rec.items:
        assert item.news_id in live and live[item.news_id] == pytest.approx(item.score, abs=1e-5)
    # keys are never reused, and a save keeps only the survivors
    key = service.add_news("F-new", "another title")
    assert key == serving_dirs.dataset.n_news + 7
    service.save(tmp_path / "index")
    reloaded = Recommender.load(serving_dirs.model_dir, tmp_path / "index")
    assert [m["news_id"] for m in reloaded.index.fresh] == ["F-5", "F-new"]
    assert reloaded.index.count == base + 2
    assert reloaded.add_news("F-after", "t") == key + 1


def test_prometheus_metrics(serving_dirs):  # noqa: F811
    service = _service(serving_dirs)
    service_b = _service(serving_dirs)
    user = a_user_with_history(serving_dirs.dataset)
    with TestClient(create_app(service, save_on_shutdown=False)) as client, \
            TestClient(create_app(service_b, save_on_shutdown=False)) as other:
        for _ in range(3):
            assert client.post("/recommend", json={"user_id": user}).status_code == 200
        assert client.post("/recommend", json={"user_id": "nobody"}).status_code == 404
        assert client.post("/news", json={"news_id": "P-1", "title": "fresh"}).status_code == 201
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        got = _samples(r.text)
        rec = (("method", "POST"), ("route", "/recommend"))
        assert got[("newsrec_requests_total", rec + (("status", "200"),))] == 3
        assert got[("newsrec_requests_total", rec + (("status", "404"),))] == 1
        assert got[("newsrec_request_duration_seconds_count", rec)] == 4
        assert got[("newsrec_request_duration_seconds_bucket", (("le", "+Inf"),) + rec)] == 4
        assert got[("newsrec_index_news", ())] == service.index.count
        assert got[("newsrec_fresh_news", ())] == 1
        assert got[("newsrec_fresh_news_evicted_total", ())] == 0
        # batch_max=1: each request is one model call of size 1
        assert got[("newsrec_batch_size_count", ())] == 3 and got[("newsrec_batch_size_sum", ())] == 3
        # a second app in the same process has its own registry
        other_got = _samples(other.get("/metrics").text)
        assert ("newsrec_requests_total", rec + (("status", "200"),)) not in other_got
        assert client.get("/metrics.json").json()["endpoints"]["POST /recommend"]["requests"] == 4


def test_serve_cli_refuses_open_writes_off_loopback(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from newsrec.cli import main
    from newsrec.config import config_from_dict

    monkeypatch.delenv("NEWSREC_ADMIN_TOKEN", raising=False)
    r = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "m"), "--index", str(tmp_path / "i"),
                                  "--host", "0.0.0.0"])
    assert r.exit_code == 1
    assert "error: serving on 0.0.0.0 without an admin token" in r.output and "--allow-open-writes" in r.output
    # the token never reaches a saved config
    assert "s3cret" not in config_from_dict({"serve": {"admin_token": "s3cret"}}).to_yaml()
