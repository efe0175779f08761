"""The dashboard's data: latency per second, the front end's state, the latest backup queries
(kept only while someone watches), and the token a browser can send."""

import asyncio
import base64
import io

import numpy as np
import orjson
import pytest
from PIL import Image
from test_frontend import CLASSES, FakeWorker, classify_all, frontend

from collage_inference.errors import UnauthorizedError
from collage_inference.serving.api import FrontEndApi
from collage_inference.serving.dashboard import dashboard_state
from collage_inference.serving.live import LiveView
from collage_inference.serving.types import Answer, CloseReason, Group, Prediction, Reply, Source
from collage_inference.serving.web.routes import Request, check_token, error_response


def answer(request_id: str, latency: float, source: Source = Source.PRIMARY) -> Answer:
    return Answer(request_id, 1, "c1", 0.9, source, latency, "w")


def test_latency_is_kept_per_second_over_the_window() -> None:
    live = LiveView(window_s=4)
    for second, latencies in ((10.2, [0.010, 0.020, 0.030]), (11.5, [0.1]), (14.1, [0.005])):
        for i, latency in enumerate(latencies):
            live.observe(answer(f"r{second}{i}", latency), second)
    series = live.series(14.5)
    assert [s["t"] for s in series] == [-3.5, -0.5]  # second 10 fell out of the 4 s window
    assert series[0] == {"t": -3.5, "n": 1, "p50": 100.0, "p99": 100.0}


def test_backup_queries_are_kept_only_while_watched_and_show_what_rescued() -> None:
    live = LiveView(queries=2, watch_s=5.0)
    assert not live.watching(0.0)
    live.watch(1.0)
    assert live.watching(5.9) and not live.watching(6.0)
    requests = [type("R", (), {"id": f"r{i}"})() for i in range(3)]
    group = Group(7, 2, tuple(requests), 0.0, 0.01, CloseReason.DEADLINE)
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    live.keep_query(group, "collage", pixels, 2.0)
    cells = tuple(Prediction(label, 0.9) for label in (3, 1, 0, len(CLASSES)))
    live.query_answered(group, Reply(Source.COLLAGE, "c", cells, group_id=7), CLASSES)
    live.observe(answer("r1", 0.02, Source.COLLAGE), 2.1)
    (shown,) = live.queries(3.0)
    assert (shown["group"], shown["kind"], shown["grid"], shown["age_s"]) == (7, "collage", 2, 1.0)
    assert [c["label"] for c in shown["cells"]] == ["c3", "c1", "c0"]
    assert [c["rescued"] for c in shown["cells"]] == [False, True, False]
    image = Image.open(io.BytesIO(base64.b64decode(shown["png"])))
    assert image.size == (8, 8) and np.array_equal(np.asarray(image), pixels[:, :, 0])


def test_the_state_shows_sources_groups_and_workers_of_a_running_front_end() -> None:
    slow = FakeWorker("s0", delay=0.4)
    fe = frontend(
        "collage", [slow, FakeWorker("s1"), FakeWorker("s2"), FakeWorker("s3")], FakeWorker("c", grid=2)
    )
    asyncio.run(classify_all(fe, [1, 2, 3]))  # warm the windows
    fe.live.watch(fe.clock.now())
    asyncio.run(classify_all(fe, [0, 1, 2, 3, 4, 5, 6, 7]))
    state = dashboard_state(fe, fe.clock.now())
    assert state["mode"] == "collage" and state["k"] == 4 and state["grid"] == 2
    assert state["answered"] == 11 and sum(state["answers"].values()) == 11
    assert set(state["answers"]) == {"primary", "collage", "replica"}
    assert state["group_fill"]["mean"] > 0 and state["series"] and state["series"][-1]["p99"] > 0
    assert [w["id"] for w in state["workers"]] == ["s0", "s1", "s2", "s3", "c"]
    assert all(w["up"] for w in state["workers"])
    queries = fe.live.queries(fe.clock.now())
    assert queries and all(len(q["cells"]) <= 4 for q in queries)
    if state["answers"]["collage"]:
        assert any(c["rescued"] for q in queries for c in q["cells"])
    orjson.dumps(state)  # the endpoint's JSON


def test_the_page_and_its_endpoints_are_served_under_the_token() -> None:
    fe = frontend("collage", [FakeWorker("s0")], FakeWorker("c", grid=2))
    router = FrontEndApi(fe).router(token="s3cret")
    basic = "Basic " + base64.b64encode(b"anyone:s3cret").decode()

    def get(path: str, authorization: str | None = None):
        headers = {"authorization": authorization} if authorization else {}
        return router.handle(Request("GET", path, "", headers, b""))

    refused = get("/dashboard")
    assert refused.status == 401 and "Basic" in refused.headers["WWW-Authenticate"]
    page = get("/dashboard", basic)
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b"dashboard/state" in page.body and b"http://" not in page.body and b"https://" not in page.body
    state = get("/dashboard/state", "Bearer s3cret")
    assert state.status == 200 and orjson.loads(state.body)["mode"] == "collage"
    assert fe.live.watching(fe.clock.now())  # asking turned the pictures on
    assert orjson.loads(get("/dashboard/queries", basic).body) == {"queries": []}


@pytest.mark.parametrize(
    "authorization",
    [None, "Basic " + base64.b64encode(b"anyone:wrong").decode(), "Basic !!notbase64", "Basic " + "czNjcmV0"],
)
def test_basic_needs_the_token_as_its_password(authorization: str | None) -> None:
    with pytest.raises(UnauthorizedError):
        check_token("/dashboard", authorization, "s3cret")  # "czNjcmV0" is s3cret without a user:
    assert error_response(UnauthorizedError("no")).status == 401
