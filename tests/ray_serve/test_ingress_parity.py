"""The front end's one route table is served identically by every entry point.

No Ray processes here: the same FrontEnd code over in-memory workers is served by the
project's HTTP server (real sockets on loopback) and by the Ray Serve :class:`Ingress` (fed
Starlette requests built from an ASGI scope, as Ray Serve's proxy builds them), and the same
requests (good, bad, unknown, too large) must get the same status, the same JSON and the same
4xx counting in /metrics.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")

import aiohttp  # noqa: E402
from starlette.requests import Request  # noqa: E402

from collage_inference.config import FrontEndSettings, Limits  # noqa: E402
from collage_inference.serving.api import FrontEndApi  # noqa: E402
from collage_inference.serving.frontend import FrontEnd  # noqa: E402
from collage_inference.serving.pool import Worker, WorkerPool  # noqa: E402
from collage_inference.serving.ray import ingress as ingress_module  # noqa: E402
from collage_inference.serving.ray.ingress import Ingress  # noqa: E402
from collage_inference.serving.transports.fake import FakeTransport  # noqa: E402
from collage_inference.serving.web.server import start_server  # noqa: E402

pytestmark = pytest.mark.ray

CLASSES = tuple(f"c{i}" for i in range(10))
LIMITS = Limits(max_body_bytes=4000)


def first_pixel(images: np.ndarray) -> np.ndarray:
    """The label is the image's first pixel value minus one."""
    return np.eye(len(CLASSES), dtype=np.float32)[[int(images[0, 0, 0, 0]) - 1]]


def make_frontend() -> FrontEnd:
    workers = [Worker(f"s{i}", FakeTransport(f"s{i}", first_pixel, delay=0.0)) for i in range(2)]
    settings = FrontEndSettings("none", grid="auto", request_timeout=2.0)
    return FrontEnd(settings, WorkerPool(workers), {}, CLASSES, {}, 1)


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def v2_json(value: int) -> bytes:
    tensor = {"name": "image", "datatype": "UINT8", "shape": [4, 4, 1], "data": [value] * 16}
    return json.dumps({"id": "q1", "inputs": [tensor]}).encode()


MULTIPART = (
    b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
    b"Content-Type: image/png\r\n\r\n" + png(4) + b"\r\n--XyZ--\r\n"
)
CASES: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("GET", "/v2", b"", {}),
    ("GET", "/v2/health/live", b"", {}),
    ("GET", "/v2/health/ready", b"", {}),
    ("GET", "/v2/models/classifier", b"", {}),
    ("GET", "/v2/models/classifier/versions/1/ready", b"", {}),
    ("GET", "/v2/models/other", b"", {}),
    ("POST", "/v2/models/classifier/infer", v2_json(3), {"Content-Type": "application/json"}),
    ("POST", "/v2/models/classifier/versions/1/infer", v2_json(7), {}),
    ("POST", "/v2/models/other/infer", v2_json(3), {}),
    ("POST", "/v2/models/classifier/infer", b"{not json", {}),
    ("POST", "/v2/models/classifier/infer", b"x" * 5000, {}),
    ("GET", "/v2/models/classifier/infer", b"", {}),
    ("POST", "/predict", png(6), {"Content-Type": "image/png"}),
    ("POST", "/predict", MULTIPART, {"Content-Type": "multipart/form-data; boundary=XyZ"}),
    ("POST", "/predict", b"", {}),
    ("POST", "/predict", b"not an image", {}),
    ("GET", "/predict", b"", {}),
    ("GET", "/nowhere", b"", {}),
]
VOLATILE = {"latency_ms", "timings_ms", "parameters", "worker"}  # times and picks differ run to run


def comparable(status: int, body: bytes) -> tuple[int, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        return status, body
    if isinstance(doc, dict):
        doc = {k: v for k, v in doc.items() if k not in VOLATILE}
        if isinstance(doc.get("error"), str):  # object addresses differ between two parses
            doc["error"] = re.sub(r"0x[0-9a-f]+", "0x", doc["error"])
    return status, doc


def starlette_request(method: str, path: str, body: bytes, headers: dict[str, str]) -> Request:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    all_headers = {**headers, "content-length": str(len(body))} if body else headers
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in all_headers.items()],
    }
    return Request(scope, receive)


async def both_ways(token: str | None = None) -> tuple[list, list, str, str]:
    http_frontend, ray_frontend = make_frontend(), make_frontend()
    listening = await start_server(FrontEndApi(http_frontend, LIMITS).router(token), "127.0.0.1", 0, LIMITS)
    ingress = Ingress.__new__(Ingress)  # as Serve would build it, minus the deployment handles
    ingress.frontend = ray_frontend
    ingress.router = FrontEndApi(ray_frontend, LIMITS).router(token)
    await http_frontend.start()
    await ray_frontend.start()
    served, ray = [], []
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with aiohttp.ClientSession(listening.url) as client:
            for method, path, body, headers in CASES:
                async with client.request(method, path, data=body or None, headers=headers) as resp:
                    served.append(comparable(resp.status, await resp.read()))
                answer = await ingress(starlette_request(method, path, body, headers))
                ray.append(comparable(answer.status_code, bytes(answer.body)))
            async with client.get("/metrics", headers=auth) as resp:
                served_metrics = await resp.text()
        ray_metrics = bytes((await ingress(starlette_request("GET", "/metrics", b"", auth))).body).decode()
    finally:
        await listening.close()
        await http_frontend.stop()
        await ingress.__del__()  # what Serve awaits on a graceful stop
    return served, ray, served_metrics, ray_metrics


@pytest.fixture(autouse=True)
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingress_module, "LIMITS", LIMITS)


def counter(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_every_endpoint_answers_alike_through_the_server_and_the_ingress() -> None:
    aio, ray, aio_metrics, ray_metrics = asyncio.run(both_ways())
    for case, a, r in zip(CASES, aio, ray, strict=True):
        assert r == a, f"{case[0]} {case[1]}: ingress {r} != server {a}"
    statuses = " ".join(str(status) for status, _ in ray)
    assert statuses == "200 200 200 200 200 404 200 200 404 400 413 405 200 200 400 400 405 404"
    assert ray[6][1]["outputs"][0]["data"] == [2]  # the fake's label: first pixel - 1
    assert ray[12][1]["label"] == 5 and ray[13][1]["label"] == 3
    names = {line.split("{")[0] for line in aio_metrics.splitlines() if not line.startswith("#")}
    assert names == {line.split("{")[0] for line in ray_metrics.splitlines() if not line.startswith("#")}
    for name in ("collage_bad_requests_total", "nv_inference_request_success_total"):
        assert counter(ray_metrics, name) == counter(aio_metrics, name) > 0


def test_the_shared_token_guards_both_alike() -> None:
    aio, ray, _, ray_metrics = asyncio.run(both_ways(token="t0ken"))
    for case, a, r in zip(CASES, aio, ray, strict=True):
        assert r == a, f"{case[0]} {case[1]}: ingress {r} != server {a}"
    open_paths = {"/v2/health/live", "/v2/health/ready"}
    for (method, path, body, _), (status, _) in zip(CASES, ray, strict=True):
        # a body over the limit is refused as it arrives, before the request is routed
        expected = 200 if path in open_paths else 413 if len(body) > LIMITS.max_body_bytes else 401
        assert status == expected, (method, path)
    assert "nv_inference_request_success" in ray_metrics  # with the token, /metrics answers
