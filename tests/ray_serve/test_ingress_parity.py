"""The Ray Serve ingress answers every endpoint exactly as the aiohttp front end does.

No Ray processes here: the same FrontEnd code over fake workers is put behind serving/api.py's
aiohttp app and behind :class:`Ingress` (fed Starlette requests built from an ASGI scope, as
Ray Serve's proxy builds them), and the same requests (good, bad, unknown, too large) must get
the same status, the same JSON and the same 4xx counting in /metrics.
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

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402
from starlette.requests import Request  # noqa: E402

from collage_inference.serving.api import build_app  # noqa: E402
from collage_inference.serving.dispatch import Inference, WorkerPool  # noqa: E402
from collage_inference.serving.frontend import FrontEnd, FrontEndConfig  # noqa: E402
from collage_inference.serving.modes import get_mode  # noqa: E402
from collage_inference.serving.protocol import Limits  # noqa: E402
from collage_inference.serving.ray.ingress import Ingress  # noqa: E402

pytestmark = pytest.mark.ray

CLASSES = tuple(f"c{i}" for i in range(10))
LIMITS = Limits(max_body_bytes=4000)


class FakeWorker:
    """Answers at once: the label is the image's first pixel value minus one."""

    def __init__(self, worker_id: str) -> None:
        self.id, self.url, self.up = worker_id, f"fake://{worker_id}", True
        self.outstanding, self.latency = 0, 0.0

    async def infer(self, images: np.ndarray, request_id: str, timeout: float) -> Inference:
        self.outstanding -= 1
        return Inference(np.eye(len(CLASSES), dtype=np.float32)[[int(images[0, 0, 0, 0]) - 1]])

    async def ready(self, timeout: float = 1.0) -> bool:
        return True


def make_frontend() -> FrontEnd:
    config = FrontEndConfig(get_mode("none"), grid=None, request_timeout=2.0)
    return FrontEnd(config, WorkerPool([FakeWorker("s0"), FakeWorker("s1")]), {}, CLASSES, {}, 1)


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
VOLATILE = {"latency_ms", "timings_ms", "parameters"}  # times differ run to run


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
    aio_frontend, ray_frontend = make_frontend(), make_frontend()
    ingress = Ingress.__new__(Ingress)  # as Serve would build it, minus the deployment handles
    ingress.frontend, ingress.model_name, ingress.limits = ray_frontend, "classifier", LIMITS
    ingress.token = token
    await ray_frontend.start()
    aio, ray = [], []
    async with TestClient(TestServer(build_app(aio_frontend, limits=LIMITS, token=token))) as client:
        for method, path, body, headers in CASES:
            resp = await client.request(method, path, data=body or None, headers=headers)
            aio.append(comparable(resp.status, await resp.read()))
            answer = await ingress(starlette_request(method, path, body, headers))
            ray.append(comparable(answer.status_code, bytes(answer.body)))
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        aio_metrics = await (await client.get("/metrics", headers=auth)).text()
    ray_metrics = bytes((await ingress(starlette_request("GET", "/metrics", b"", auth))).body).decode()
    await ingress.__del__()  # what Serve awaits on a graceful stop
    return aio, ray, aio_metrics, ray_metrics


def counter(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_every_endpoint_answers_as_the_aiohttp_front_end() -> None:
    aio, ray, aio_metrics, ray_metrics = asyncio.run(both_ways())
    for case, a, r in zip(CASES, aio, ray, strict=True):
        assert r == a, f"{case[0]} {case[1]}: ray {r} != aiohttp {a}"
    statuses = " ".join(str(status) for status, _ in ray)
    assert statuses == "200 200 200 200 200 404 200 200 404 400 413 405 200 200 400 400 405 404"
    assert ray[6][1]["outputs"][0]["data"] == [2]  # the fake's label: first pixel - 1
    assert ray[12][1]["label"] == 5 and ray[13][1]["label"] == 3
    names = {line.split("{")[0] for line in aio_metrics.splitlines() if not line.startswith("#")}
    assert names == {line.split("{")[0] for line in ray_metrics.splitlines() if not line.startswith("#")}
    for name in ("collage_bad_requests_total", "nv_inference_request_success"):
        assert counter(ray_metrics, name) == counter(aio_metrics, name) > 0


def test_the_shared_token_guards_both_alike() -> None:
    aio, ray, _, ray_metrics = asyncio.run(both_ways(token="t0ken"))
    for case, a, r in zip(CASES, aio, ray, strict=True):
        assert r == a, f"{case[0]} {case[1]}: ray {r} != aiohttp {a}"
    open_paths = {"/v2/health/live", "/v2/health/ready"}
    for (method, path, _, _), (status, _) in zip(CASES, ray, strict=True):
        assert status == (200 if path in open_paths else 401), (method, path)
    assert "nv_inference_request_success" in ray_metrics  # with the token, /metrics answers
