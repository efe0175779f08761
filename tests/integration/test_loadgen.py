"""The load generator against real servers on loopback.

A tiny in-process aiohttp server with scripted behaviour (a stall, delays, wrong labels, 503s)
proves the open-loop property and the accounting; the project's real worker, started as a
process, proves the wire format against the real thing (those tests are marked slow).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from collage_inference.bench.loadgen import LoadConfig, LoadResult, main, run_load, run_load_sync
from collage_inference.onnxfile import read_onnx_meta
from collage_inference.serving.v2 import (
    HEADER_LENGTH,
    InferResponse,
    InferTensor,
    parse_infer_request,
    render_infer_response,
)

# Image i is filled with the value i % 10, which is also its label, so the fake server can
# answer from the pixels alone.
IMAGES = np.repeat(np.arange(10, dtype=np.uint8), 28 * 28).reshape(10, 28, 28, 1)
LABELS = np.arange(10, dtype=np.int64)


@dataclass
class Script:
    """How the fake server behaves. Label 9 is answered wrongly (0), label 3 comes from the
    "collage" path, and ``fail_label`` gets HTTP 503."""

    stall_s: float = 0.0  # requests arriving within this long after the first wait until it ends
    delay_s: float = 0.0
    fail_label: int | None = None
    first: float | None = None

    async def answer(self, truth: int) -> tuple[int, str] | None:
        now = time.perf_counter()
        self.first = self.first if self.first is not None else now
        if now < self.first + self.stall_s:
            await asyncio.sleep(self.first + self.stall_s - now)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if truth == self.fail_label:
            return None
        return (0 if truth == 9 else truth), ("collage" if truth == 3 else "primary")


SCRIPT = web.AppKey("script", Script)


async def _v2(request: web.Request) -> web.Response:
    parsed = parse_infer_request(await request.read(), request.headers.get(HEADER_LENGTH))
    image = parsed.inputs[0].data
    assert image.shape == (28, 28, 1) and request.match_info["name"] == "fake"
    got = await request.app[SCRIPT].answer(int(image[0, 0, 0]))
    if got is None:
        return web.json_response({"error": "down"}, status=503)
    outputs = (
        InferTensor.of("label", np.array([got[0]], np.int64)),
        InferTensor.of("source", np.array([got[1]], object)),
    )
    body, headers = render_infer_response(
        InferResponse("fake", outputs, parameters={"queue_ms": 1.5}), parsed
    )
    return web.Response(body=body, headers=headers)


async def _predict(request: web.Request) -> web.Response:
    image = np.asarray(Image.open(io.BytesIO(await request.read())))
    got = await request.app[SCRIPT].answer(int(image[0, 0]))
    if got is None:
        return web.json_response({"error": "down"}, status=503)
    return web.json_response({"label": got[0], "source": got[1], "latency_ms": 2.0})


async def _with_fake_server(script: Script, body: Callable[[str], Awaitable[LoadResult]]) -> LoadResult:
    app = web.Application()
    app[SCRIPT] = script
    app.router.add_post("/v2/models/{name}/infer", _v2)
    app.router.add_post("/predict", _predict)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)  # do not wait out slow handlers
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        return await body(f"http://127.0.0.1:{runner.addresses[0][1]}")
    finally:
        await runner.cleanup()


def run_fake(script: Script, **settings) -> LoadResult:
    settings = {"model": "fake", "arrival": "constant", "rate": 100.0, **settings}
    return asyncio.run(
        _with_fake_server(script, lambda url: run_load(LoadConfig(url=url, **settings), IMAGES, LABELS))
    )


def test_a_server_stall_shows_in_every_request_scheduled_during_it() -> None:
    stall = 0.3
    result = run_fake(Script(stall_s=stall), requests=50)
    assert result.answered == 50 and result.summary.errors == {}
    during = [r for r in result.records if r.scheduled_s < stall - 0.05]
    after = [r for r in result.records if r.scheduled_s > stall + 0.05]
    assert len(during) >= 20
    for r in during:  # each waited for the end of the stall, counted from its own schedule
        assert stall - r.scheduled_s - 0.005 <= r.latency_s <= stall - r.scheduled_s + 0.2, r
    assert np.median([r.latency_s for r in after]) < 0.05
    assert sum(lat > 100 for lat in result.latencies_ms) >= 20  # a closed loop would see one
    assert result.summary.p90_ms > 150
    # open loop: the stall did not hold back the sending (a closed loop would send one request
    # during it); counted, not timed, so a scheduling hiccup on a busy machine cannot fail it
    assert sum(r.sent_s < stall for r in during) >= len(during) // 2


def test_bursts_report_each_burst_until_its_last_answer() -> None:
    # label 7 answers 0.2 s late: every burst of 10 holds one, so every burst takes >= 0.2 s
    class Slow7(Script):
        async def answer(self, truth: int) -> tuple[int, str] | None:
            if truth == 7:
                await asyncio.sleep(0.2)
            return await super().answer(truth)

    result = run_fake(Slow7(), arrival="burst", burst_size=10, rate=200.0, requests=60, warmup=10)
    assert result.answered == 60 and result.burst_summary is not None
    assert result.burst_summary.count == 6 and result.bursts_failed == 0
    assert result.burst_summary.p50_ms >= 200 > result.summary.p50_ms
    scheduled = [r.scheduled_s for r in result.records]
    assert len(set(scheduled)) == 7  # seven instants, ten requests each
    assert result.to_dict()["burst_summary"]["count"] == 6
    assert run_fake(Script(), requests=5).burst_summary is None


def test_a_late_sender_counts_its_own_lag_in_the_latency() -> None:
    async def body(url: str) -> LoadResult:
        asyncio.get_running_loop().call_later(0.15, time.sleep, 0.2)  # the generator itself stalls
        return await run_load(LoadConfig(url, 100.0, 50, model="fake", arrival="constant"), IMAGES, LABELS)

    result = asyncio.run(_with_fake_server(Script(), body))
    late = [r for r in result.records if r.sent_s - r.scheduled_s > 0.1]
    assert len(late) >= 8 and result.send_lag_max_ms > 150
    for r in late:
        assert r.latency_s >= r.sent_s - r.scheduled_s
    assert result.summary.max_ms > 150


@pytest.mark.parametrize("binary", [True, False])
def test_warmup_accuracy_sources_and_http_errors(binary: bool) -> None:
    result = run_fake(Script(fail_label=5), rate=400.0, requests=100, warmup=10, binary=binary)
    assert sum(r.warmup for r in result.records) == 10 and len(result.records) == 110
    assert (result.requests, result.sent, result.answered, result.failed) == (100, 100, 90, 10)
    assert dict(result.summary.errors) == {"503": 10} and result.summary.count == 90
    assert result.accuracy == pytest.approx(80 / 90)  # label 9 is answered wrongly
    assert dict(result.source_shares) == pytest.approx({"collage": 10 / 90, "primary": 80 / 90})
    assert dict(result.server_timings_ms) == {"queue_ms": 1.5}
    assert len(result.latencies_ms) == 90 and result.summary.throughput_rps > 0
    doc = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert doc["summary"]["errors"] == {"503": 10} and doc["answered"] == 90


def test_predict_target_sends_png_and_reads_json() -> None:
    result = run_fake(Script(), target="predict", requests=20)
    assert result.answered == 20 and result.accuracy == pytest.approx(18 / 20)
    assert dict(result.server_timings_ms) == {"latency_ms": 2.0}


def test_requests_beyond_the_in_flight_cap_are_overflow_errors() -> None:
    result = run_fake(Script(delay_s=0.4), rate=200.0, requests=10, max_in_flight=3)
    assert (result.sent, result.answered, result.overflowed) == (3, 3, 7)
    assert dict(result.summary.errors) == {"overflow": 7}
    assert result.requests == result.sent + result.overflowed + result.unsent


def test_per_request_and_overall_timeouts_bound_the_run() -> None:
    result = run_fake(Script(delay_s=1.0), requests=5, timeout_s=0.2)
    assert dict(result.summary.errors) == {"timeout": 5} and result.answered == 0
    assert math.isnan(result.accuracy) and math.isnan(result.summary.p50_ms)

    async def bounded(url: str) -> LoadResult:
        start = time.perf_counter()
        config = LoadConfig(url, 100.0, 60, model="fake", arrival="constant", overall_timeout_s=0.3)
        result = await run_load(config, IMAGES, LABELS)
        assert time.perf_counter() - start < 1.0  # the server would hold every request for 5 s
        return result

    result = asyncio.run(_with_fake_server(Script(delay_s=5.0), bounded))
    errors = result.summary.errors
    assert errors["cancelled"] >= 20 and errors["unsent"] >= 20, errors
    assert errors["cancelled"] + errors["unsent"] == 60 == result.requests
    assert result.sent == result.failed == errors["cancelled"]


def test_a_closed_port_is_a_connection_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_load_sync(LoadConfig(f"http://127.0.0.1:{port}", 100.0, 5, timeout_s=2.0), IMAGES, LABELS)
    assert dict(result.summary.errors) == {"connection": 5} and result.failed == 5


# --- the real worker -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scnn_worker(serving_models, worker_factory, models_dir):
    path = serving_models["scnn"]
    worker = worker_factory("--model", str(path))
    shipped = path.parent == models_dir
    return worker.url, read_onnx_meta(path).name, shipped


@pytest.mark.slow
def test_against_the_real_worker_binary_and_json_agree(scnn_worker, fashion_test) -> None:
    url, name, shipped = scnn_worker
    images, labels = fashion_test.images[:40], fashion_test.labels[:40]
    runs = {
        binary: run_load_sync(
            LoadConfig(url, 40.0, 40, model=name, warmup=5, seed=1, binary=binary), images, labels
        )
        for binary in (True, False)
    }
    for result in runs.values():
        assert (result.answered, result.failed, result.overflowed) == (40, 0, 0), result.summary.errors
        assert dict(result.source_shares) == {"unreported": 1.0}
        assert {"queue_ms", "compute_ms", "injected_ms"} <= set(result.server_timings_ms)
        assert 0 < result.summary.p50_ms < 1000 and result.summary.count == 40
        assert result.accuracy > 0.8 if shipped else 0 <= result.accuracy <= 1
    labels_of = {b: [r.label for r in run.records] for b, run in runs.items()}
    assert labels_of[True] == labels_of[False]


@pytest.mark.slow
def test_cli_prints_one_json_object_or_a_table(scnn_worker, capsys) -> None:
    url, name, _ = scnn_worker
    common = ["--url", url, "--rate", "50", "--requests", "20", "--warmup", "2", "--model", name]
    assert main([*common, "--json", "--arrival", "constant"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["answered"] == 20 and doc["dataset"] == "fashion-mnist" and doc["environment"]["cpus"]
    assert doc["summary"]["count"] == 20 and doc["accuracy"] is not None
    assert main([*common, "--json-body"]) == 0
    out = capsys.readouterr().out
    assert "p99" in out and "20 answered" in out and "environment" in out
    assert main([*common, "--predict"]) == 1  # a bare worker has no /predict: every request is a 404
    assert "404 20" in capsys.readouterr().out
    assert main([*common[:2], "--rate", "0", "--requests", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: --rate")
