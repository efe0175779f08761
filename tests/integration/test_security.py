"""Hostile clients and the shared token, against real worker and front-end processes on loopback:
a missing or wrong token is a 401 (health checks stay open), the token never shows in logs or
process arguments, and a client that sends its body too slowly gets a 408 without holding the
server."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from test_worker import call  # the integration tests' HTTP helper

from collage_inference.config import ServeConfig
from collage_inference.deploy.local import LocalCluster
from collage_inference.onnxfile import read_onnx_meta
from collage_inference.serving.v2 import InferRequest, InferTensor, render_infer_request

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token-for-tests"
BODY, HEADERS = render_infer_request(
    InferRequest(None, (InferTensor.of("image", np.zeros((28, 28), np.uint8)),)), binary_inputs=True
)


def test_worker_token_guards_everything_but_health(serving_models, worker_factory, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    path = serving_models["scnn"]
    name = read_onnx_meta(path).name
    worker = worker_factory("--model", str(path), "--token-file", str(token_file))
    assert call("GET", f"{worker.url}/v2/health/ready")[0] == 200
    assert call("GET", f"{worker.url}/v2/health/live")[0] == 200
    infer = f"{worker.url}/v2/models/{name}/infer"
    for sent in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        status, reply_headers, payload = call("POST", infer, BODY, {**HEADERS, **sent})
        assert status == 401 and reply_headers["WWW-Authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in json.loads(payload)["error"]
        assert TOKEN.encode() not in payload
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert call("POST", infer, BODY, {**HEADERS, **auth})[0] == 200
    assert call("GET", f"{worker.url}/metrics", headers=auth)[0] == 200
    assert call("GET", f"{worker.url}/metrics")[0] == 401
    worker.stop()
    out, err = worker.proc.communicate()
    assert TOKEN not in out + err


def test_a_slow_body_gets_408_and_the_worker_keeps_serving(serving_models, worker_factory) -> None:
    path = serving_models["scnn"]
    name = read_onnx_meta(path).name
    worker = worker_factory("--model", str(path), "--body-timeout", "0.5")
    host, port = worker.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as slow:
        slow.sendall(
            f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n{".encode()
        )  # ... and never the rest
        started = time.monotonic()
        assert call("GET", f"{worker.url}/v2/health/ready")[0] == 200  # others are served meanwhile
        reply = slow.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408") and "took longer than 0.5s" in reply
        assert time.monotonic() - started < 5
    assert call("POST", f"{worker.url}/v2/models/{name}/infer", BODY, HEADERS)[0] == 200


def test_a_protected_cluster_passes_the_token_by_file_only(models_dir: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = ServeConfig(mode="none", grid=2, models_dir=models_dir, port=0, token_file=token_file)
    with LocalCluster(config) as cluster:
        for proc in cluster.processes():  # every settings file has the path, none has the token
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            args = cmdline.split(b"\0")
            settings = Path(args[args.index(b"--config") + 1].decode()).read_text()
            assert str(token_file) in settings and TOKEN not in settings and TOKEN.encode() not in cmdline
            assert TOKEN not in proc.log_tail(200)
        url = cluster.url
        assert call("GET", f"{url}/v2/health/ready")[0] == 200
        status, _, payload = call("POST", f"{url}/predict", b"x")
        assert status == 401, payload
        assert call("GET", f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert call("GET", f"{cluster.worker_urls[0]}/v2/models/scnn")[0] == 401  # workers too


@pytest.fixture(scope="module")
def frontend_url(models_dir: Path):
    with LocalCluster(ServeConfig(mode="none", grid=2, models_dir=models_dir, port=0)) as cluster:
        yield cluster.url


def _v2(tensor: dict, header_length: int | None = None) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"inputs": [tensor]}).encode()
    return body, ({"Inference-Header-Content-Length": str(header_length)} if header_length else {})


HOSTILE = {
    "bad JSON": (b"{not json", {}, 400),
    "wrong dtype": (*_v2({"name": "image", "datatype": "FP32", "shape": [2, 2], "data": [0.1] * 4}), 400),
    "wrong shape": (
        *_v2({"name": "image", "datatype": "UINT8", "shape": [2, 2, 2, 2, 2], "data": [0] * 32}),
        400,
    ),
    "huge shape": (*_v2({"name": "image", "datatype": "UINT8", "shape": [2**20, 2**20], "data": [0]}), 413),
    "lying binary header": (
        *_v2({"name": "image", "datatype": "UINT8", "shape": [4]}, header_length=10**6),
        400,
    ),
    "64 MiB body without 100-continue": (b"x" * (64 * 2**20), {}, 413),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_gets_a_4xx_every_client_reads_and_the_front_end_serves_on(frontend_url, case) -> None:
    body, headers, status = HOSTILE[case]
    # urllib sends the whole body before it reads the answer: it must still read the status
    got, _, payload = call("POST", f"{frontend_url}/v2/models/classifier/infer", body, headers)
    assert got == status, (case, payload[:200])
    assert json.loads(payload)["error"]
    assert call("GET", f"{frontend_url}/v2/models/nope")[0] == 404  # unknown model
    assert call("POST", f"{frontend_url}/v2/models/classifier/infer", BODY, HEADERS)[0] == 200
