"""The whole system in real processes on loopback: a LocalCluster in collage mode (S = 3) with
the shipped models, fed real Fashion-MNIST test images. Exactly-once answers and accuracy, the
front end's metrics, bad inputs, a straggling worker rescued by the collage, a worker killed
mid-run and restarted, and a stop that leaves no process behind.

One cluster serves the module, with s-CNN worker 0 straggling (about 1.5 s per request) from
the start. The pool picks the least loaded worker and breaks ties by order, so the very first
request goes to worker 0; after that its latency keeps it out of the picks. The tests run in
file order and each leaves the cluster serving.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from collage_inference.config import ServeConfig, SlowdownSettings
from collage_inference.deploy.local import LocalCluster
from collage_inference.deploy.process import running
from collage_inference.modes import MODES
from collage_inference.serving.metrics import metric_total, parse_metrics
from collage_inference.serving.v2 import (
    HEADER_LENGTH,
    InferRequest,
    InferTensor,
    parse_infer_response,
    render_infer_request,
)

pytestmark = pytest.mark.slow

GRID = int(os.environ.get("COLLAGE_TEST_GRID", "3"))
IMAGES = 300
DELAY_S = 1.5  # the injected straggler delay; rescued answers must come far sooner
BURST = 18
STRAGGLER = SlowdownSettings(f"pareto:alpha=50,scale={DELAY_S},cap={DELAY_S + 0.1}", workers=(0,))


@pytest.fixture(scope="module")
def cluster(models_dir: Path):
    folder = Path(os.environ.get("COLLAGE_TEST_MODELS_DIR", models_dir))
    for name in ("scnn", f"collage-{GRID}x{GRID}"):
        if not (folder / f"{name}.onnx").is_file():
            pytest.skip(f"the shipped model {name}.onnx is not in {folder} yet")
    config = ServeConfig(
        mode="collage", grid=GRID, models_dir=folder, port=0, request_timeout=10.0, slowdown=STRAGGLER
    )
    with LocalCluster(config) as running_cluster:
        yield running_cluster


@pytest.fixture(scope="module")
def first_run(cluster: LocalCluster, fashion_test) -> dict[str, Any]:
    """The module's first traffic: IMAGES test images at once, half by V2 infer, half by /predict,
    with /metrics before and after and the calls outstanding at the slow worker sampled during."""
    url = cluster.url

    async def run() -> dict[str, Any]:
        at_slow: list[float] = []
        sending = asyncio.create_task(send(url, fashion_test.images[:IMAGES]))
        while not sending.done():
            text = await _get_text(f"{url}/metrics")
            at_slow.append(metric_total(parse_metrics(text), "collage_worker_outstanding", 'worker="scnn-0"'))
            await asyncio.sleep(0.05)
        return {"answers": await sending, "at_slow": at_slow}

    before = metrics(url)
    result = asyncio.run(run())
    return {**result, "before": before, "after": metrics(url)}


# --- a small async client ------------------------------------------------------------------------


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


async def v2_infer(session: aiohttp.ClientSession, url: str, image: np.ndarray, rid: str) -> dict[str, Any]:
    body, headers = render_infer_request(
        InferRequest(rid, (InferTensor.of("image", image),)), binary_inputs=True
    )
    async with session.post(f"{url}/v2/models/classifier/infer", data=body, headers=headers) as resp:
        raw = await resp.read()
        assert resp.status == 200, raw[:300]
        parsed = parse_infer_response(raw, resp.headers.get(HEADER_LENGTH))
    (label,) = parsed.output("label").data.tolist()
    (source,) = parsed.output("source").data.tolist()
    source = source.decode() if isinstance(source, bytes) else source
    latency = parsed.parameters["latency_ms"][0]
    return {"id": parsed.id, "label": label, "source": source, "latency_ms": latency, "worker": None}


async def v2_batch(url: str, images: np.ndarray) -> int:
    """Classify a batch (N, H, W, C) in one V2 call; the number of labels answered."""
    body, headers = render_infer_request(
        InferRequest("batch", (InferTensor.of("image", images),)), binary_inputs=True
    )
    infer = f"{url}/v2/models/classifier/infer"
    async with aiohttp.ClientSession() as session, session.post(infer, data=body, headers=headers) as resp:
        raw = await resp.read()
        assert resp.status == 200, raw[:300]
    return len(parse_infer_response(raw, resp.headers.get(HEADER_LENGTH)).output("label").data)


async def predict(session: aiohttp.ClientSession, url: str, image: np.ndarray, rid: str) -> dict[str, Any]:
    async with session.post(f"{url}/predict", data=png(image)) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
    return {"id": rid, **answer}


async def send(
    url: str, images: np.ndarray, *, spacing: float = 0.0, limit: int = 48
) -> list[dict[str, Any]]:
    """Classify every image concurrently (even ones by V2 infer, odd ones by /predict); answers
    in image order, each tagged with the id it was sent with."""
    gate = asyncio.Semaphore(limit)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(i: int) -> dict[str, Any]:
            await asyncio.sleep(i * spacing)
            async with gate:
                call = v2_infer if i % 2 == 0 else predict
                answer = await call(session, url, images[i], f"img-{i}")
                return {**answer, "sent_id": f"img-{i}"}

        return list(await asyncio.gather(*(one(i) for i in range(len(images)))))


def metrics(url: str) -> dict[tuple[str, str], float]:
    """The front end's /metrics as {(name, labels): value}."""
    return parse_metrics(asyncio.run(_get_text(f"{url}/metrics")))


async def _get_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return await resp.text()


def status_of(url: str) -> int:
    async def go() -> int:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            return resp.status

    return asyncio.run(go())


# --- the tests -----------------------------------------------------------------------------------


def test_cluster_runs_what_the_mode_needs(cluster: LocalCluster) -> None:
    assert len(cluster.scnn) == MODES["collage"].scnn_workers(GRID * GRID) and len(cluster.collage) == 1
    assert len(set(cluster.worker_urls)) == len(cluster.scnn)
    assert status_of(f"{cluster.url}/v2/health/ready") == 200


def test_every_request_answered_once_and_accurately(first_run: dict[str, Any], fashion_test) -> None:
    answers, before, after = first_run["answers"], first_run["before"], first_run["after"]
    assert [a["id"] for a in answers] == [f"img-{i}" for i in range(IMAGES)]  # one answer each, matched
    labels = fashion_test.labels[:IMAGES]
    accuracy = float(np.mean([a["label"] == y for a, y in zip(answers, labels, strict=True)]))
    assert accuracy >= 0.9, (accuracy, Counter(a["source"] for a in answers))
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert metric_total(delta, "nv_inference_request_success_total") == IMAGES
    assert metric_total(delta, "collage_answers_total") == IMAGES
    assert (
        metric_total(delta, "nv_inference_request_failure_total") == 0
        and metric_total(delta, "collage_bad_requests_total") == 0
    )
    sources = Counter(a["source"] for a in answers)
    for source, count in sources.items():
        assert metric_total(delta, "collage_answers_total", f'source="{source}"') == count
    assert metric_total(delta, "collage_group_size_total") >= IMAGES / (GRID * GRID)  # a collage per group
    assert metric_total(after, "collage_requests_in_flight") == 0


def test_straggling_worker_is_answered_by_the_collage(first_run: dict[str, Any]) -> None:
    answers = first_run["answers"]
    assert max(first_run["at_slow"], default=0) >= 1, "no request was routed to the slow worker"
    sources = Counter(a["source"] for a in answers)
    assert sources["collage"] >= 1, sources  # those routed to it, at least
    slowest = max(a["latency_ms"] for a in answers)
    assert slowest < DELAY_S * 1e3 / 2, (slowest, sources)  # far below the injected delay
    assert not any(a.get("worker") == "scnn-0" for a in answers)  # it never answered in time


async def _raw_oversized(url: str) -> tuple[int, str]:
    """A body announced beyond the 16 MiB limit, sent by hand: the server must refuse it up front."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 20000000\r\nConnection: close\r\n\r\n" + b"\0" * 65536
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.read(65536), 30)
    writer.close()
    status_line, _, rest = head.decode(errors="replace").partition("\r\n")
    return int(status_line.split()[1]), rest


def test_bad_inputs_get_4xx_with_a_message_and_serving_goes_on(cluster: LocalCluster, fashion_test) -> None:
    infer = f"{cluster.url}/v2/models/classifier/infer"
    tensor = {"name": "image", "shape": [28, 28], "datatype": "FP32", "data": [0.0] * 784}
    five_d = {"name": "image", "shape": [1, 1, 2, 2, 1], "datatype": "UINT8", "data": [0, 0, 0, 0]}
    not_png = {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["this is no image"]}
    cases = [
        ("wrong dtype", infer, json.dumps({"inputs": [tensor]}).encode(), 400, "FP32"),
        ("5-D", infer, json.dumps({"inputs": [five_d]}).encode(), 400, "shape"),
        ("undecodable", infer, json.dumps({"inputs": [not_png]}).encode(), 400, "decode"),
        ("unknown model", f"{cluster.url}/v2/models/resnet/infer", b"{}", 404, "resnet"),
        ("malformed JSON", infer, b'{"inputs": [', 400, ""),
        ("empty /predict", f"{cluster.url}/predict", b"", 400, "empty"),
    ]
    before = metrics(cluster.url)

    async def go() -> list[tuple[str, int, str]]:
        out = []
        async with aiohttp.ClientSession() as session:
            for name, url, body, _, _ in cases:
                async with session.post(url, data=body) as resp:
                    out.append((name, resp.status, (await resp.json())["error"]))
        return out

    for (name, status, message), (_, _, _, want, word) in zip(asyncio.run(go()), cases, strict=True):
        assert status == want and word in message and len(message) > 10, (name, status, message)
    status, text = asyncio.run(_raw_oversized(cluster.url))
    assert status == 413 and "exceeds" in text
    answers = asyncio.run(send(cluster.url, fashion_test.images[:4]))  # still serving
    assert len(answers) == 4
    delta = metric_total(metrics(cluster.url), "collage_bad_requests_total") - metric_total(
        before, "collage_bad_requests_total"
    )
    assert delta == len(cases) + 1


def test_killed_worker_loses_no_request_and_comes_back(cluster: LocalCluster, fashion_test) -> None:
    # The victim is the straggling worker 0: its calls last 1.5 s, so one is surely in flight when
    # it is killed (a fast worker's last 2 ms). The supervisor restarts it, straggling as before.
    url, count, victim = cluster.url, 150, 0
    ready_checks: list[int] = []
    before = metrics(url)

    async def holds_a_call(worker: int, seconds: float) -> None:
        """Wait until the front end has a call in flight to ``worker``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = parse_metrics(await _get_text(f"{url}/metrics"))
            if metric_total(found, "collage_worker_outstanding", f'worker="scnn-{worker}"') >= 1:
                return
            await asyncio.sleep(0.01)
        up = metric_total(found, "collage_worker_up", f'worker="scnn-{worker}"')
        calls = metric_total(found, "collage_worker_calls_total", f'worker="scnn-{worker}"')
        raise AssertionError(f"scnn-{worker} never got a call (up {up}, calls {calls})")

    async def run() -> list[dict[str, Any]]:
        # One V2 call of twice as many images as workers admits them at once: each worker, the
        # slow one included, gets two.
        burst = asyncio.create_task(v2_batch(url, fashion_test.images[: 2 * len(cluster.scnn)]))
        sending = asyncio.create_task(send(url, fashion_test.images[:count], spacing=0.008))
        await holds_a_call(victim, 5.0)
        old_pid = cluster.kill_worker(victim)  # SIGKILL, mid-call
        async with aiohttp.ClientSession() as session:
            while not sending.done():
                async with session.get(f"{url}/v2/health/ready") as resp:
                    ready_checks.append(resp.status)
                await asyncio.sleep(0.05)
        assert await burst == 2 * len(cluster.scnn)
        answers = await sending
        await asyncio.to_thread(cluster.wait_restarted, victim, old_pid, 60.0)
        return answers

    old_urls = list(cluster.worker_urls)
    answers = asyncio.run(run())
    assert [a["id"] for a in answers] == [f"img-{i}" for i in range(count)]  # every one answered
    assert ready_checks and set(ready_checks) == {200}  # other s-CNN workers are up: truly ready
    assert cluster.worker_urls == old_urls  # restarted on the same port
    assert any(f"scnn-{victim} exited" in e for e in cluster.events)
    name = f'worker="scnn-{victim}"'
    deadline = time.monotonic() + 20  # the front end's probe sees it back
    while (after := metrics(url)) and metric_total(after, "collage_worker_up", name) != 1:
        assert time.monotonic() < deadline, "the front end never saw the restarted worker"
        time.sleep(0.2)
    errors = metric_total(after, "collage_worker_errors_total") - metric_total(
        before, "collage_worker_errors_total"
    )
    assert errors >= 1  # the kill did hit calls (answered by the collage or re-issued instead)
    assert status_of(f"{old_urls[victim]}/v2/models/scnn/ready") == 200  # the same URL serves again
    answers = asyncio.run(send(url, fashion_test.images[:BURST]))
    assert [a["id"] for a in answers] == [f"img-{i}" for i in range(BURST)]


def test_stop_leaves_no_process_behind(cluster: LocalCluster) -> None:
    tree = cluster.process_tree()
    pids = cluster.pids()
    assert len(tree) >= len(cluster.processes())
    started = time.monotonic()
    cluster.stop()
    assert time.monotonic() - started < 15
    assert not [pid for pid in tree | set(pids) if running(pid)]
    assert all(p.proc is not None and p.proc.returncode is not None for p in cluster.processes())
