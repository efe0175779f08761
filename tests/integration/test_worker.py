"""A real worker process on loopback: every endpoint, JSON and binary tensors, errors that leave
it serving, limits, injected stragglers, both backends, and a clean SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from collage_inference.grid import fit_images, pack
from collage_inference.onnxfile import read_onnx_meta
from collage_inference.serving.metrics import parse_metrics
from collage_inference.serving.v2 import (
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    InferTensor,
    RequestedOutput,
    parse_infer_response,
    render_infer_request,
)

pytestmark = pytest.mark.slow


def call(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of one HTTP call; 4xx and 5xx are answers, not exceptions."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def infer(url: str, request: InferRequest, binary: bool = True) -> InferResponse:
    body, headers = render_infer_request(request, binary_inputs=binary)
    status, reply_headers, payload = call("POST", url, body, headers)
    assert status == 200, payload
    return parse_infer_response(payload, reply_headers.get(HEADER_LENGTH))


def image_request(images: np.ndarray, binary_outputs: bool = True) -> InferRequest:
    return InferRequest(None, (InferTensor.of("image", images),), binary_outputs=binary_outputs)


def error_of(status_headers_body) -> tuple[int, str]:
    status, headers, body = status_headers_body
    assert headers["Content-Type"].startswith("application/json")
    return status, json.loads(body)["error"]


@pytest.fixture(scope="module")
def scnn(serving_models, worker_factory):
    name = read_onnx_meta(serving_models["scnn"]).name
    worker = worker_factory("--model", str(serving_models["scnn"]))
    return worker, name, f"{worker.url}/v2/models/{name}"


@pytest.fixture(scope="module")
def collage(serving_models, worker_factory):
    name = read_onnx_meta(serving_models["collage-2x2"]).name
    worker = worker_factory("--model", str(serving_models["collage-2x2"]))
    return worker, name, f"{worker.url}/v2/models/{name}"


def test_health_and_metadata(scnn) -> None:
    worker, name, model = scnn
    assert call("GET", f"{worker.url}/v2/health/live")[0] == 200
    assert call("GET", f"{worker.url}/v2/health/ready")[0] == 200
    assert "binary_tensor_data" in json.loads(call("GET", f"{worker.url}/v2")[2])["extensions"]
    status, _, body = call("GET", model)
    meta = json.loads(body)
    assert status == 200 and meta["name"] == name and meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}
    assert meta["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
    ]
    assert meta["parameters"]["kind"] == "scnn" and len(meta["parameters"]["labels"]) == 10
    assert json.loads(call("GET", f"{model}/ready")[2])["ready"] is True
    assert call("GET", f"{worker.url}/v2/models/{name}/versions/1")[0] == 200
    assert error_of(call("GET", f"{worker.url}/v2/models/{name}/versions/2"))[0] == 404
    status, message = error_of(call("GET", f"{worker.url}/v2/models/other/ready"))
    assert status == 404 and repr(name) in message


def test_fp32_input_json_and_binary_agree(scnn) -> None:
    _, _, model = scnn
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    request = InferRequest("a", (InferTensor.of("input", x),))
    as_json = infer(f"{model}/infer", request, binary=False)
    as_binary = infer(f"{model}/infer", InferRequest("b", request.inputs, binary_outputs=True))
    assert as_json.id == "a" and as_binary.id == "b"
    labels, probabilities = as_json.output("label").data, as_json.output("probabilities").data
    assert labels.shape == (3,) and labels.dtype == np.int64 and probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(labels, probabilities.argmax(axis=1))
    np.testing.assert_array_equal(as_binary.output("label").data, labels)
    np.testing.assert_allclose(as_binary.output("probabilities").data, probabilities, rtol=1e-6)
    timings = as_binary.parameters
    assert timings["kind"] == "scnn" and timings["grid"] == 1 and timings["injected_ms"] == 0
    assert 0 <= timings["queue_ms"] < 1000 and 0 < timings["compute_ms"] < 1000


def test_uint8_images_in_every_layout(scnn) -> None:
    _, _, model = scnn
    url = f"{model}/infer"
    images = np.random.default_rng(1).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    batch = infer(url, image_request(images))
    pixels = infer(url, InferRequest(None, (InferTensor.of("input", images[:, None] / np.float32(255)),)))
    np.testing.assert_allclose(
        batch.output("probabilities").data, pixels.output("probabilities").data, atol=1e-6
    )
    single = infer(url, image_request(images[0]))
    assert single.output("label").data.shape == (1,)
    np.testing.assert_allclose(
        single.output("probabilities").data[0], batch.output("probabilities").data[0], atol=1e-6
    )
    channels_last = infer(url, image_request(images[..., None]))
    np.testing.assert_array_equal(channels_last.output("label").data, batch.output("label").data)
    rgb = infer(url, image_request(np.repeat(images[0][..., None], 3, axis=2)))
    assert rgb.output("label").data.shape == (1,)
    resized = infer(url, image_request(np.kron(images, np.ones((1, 2, 2), np.uint8))))  # 56x56 -> 28x28
    assert resized.output("probabilities").data.shape == (2, 10)


def test_collage_worker_answers_every_cell(collage) -> None:
    _, _, model = collage
    meta = json.loads(call("GET", model)[2])
    side = meta["inputs"][0]["shape"][-1]
    assert meta["parameters"]["kind"] == "collage" and meta["parameters"]["grid"] == 2
    assert meta["parameters"]["labels"][-1] == "empty" and meta["outputs"][0]["shape"] == [-1, 4]
    collages = np.random.default_rng(2).integers(0, 256, (3, side, side), dtype=np.uint8)
    reply = infer(f"{model}/infer", image_request(collages))
    assert reply.output("label").data.shape == (3, 4)
    assert reply.output("probabilities").data.shape == (3, 4, 11)
    assert reply.parameters["kind"] == "collage" and reply.parameters["grid"] == 2


def test_only_the_requested_outputs_come_back(scnn) -> None:
    _, _, model = scnn
    images = np.zeros((1, 28, 28), np.uint8)
    request = InferRequest(None, (InferTensor.of("image", images),), (RequestedOutput("label", True),))
    body, headers = render_infer_request(request)
    status, reply_headers, payload = call("POST", f"{model}/infer", body, headers)
    reply = parse_infer_response(payload, reply_headers[HEADER_LENGTH])
    assert status == 200 and [t.name for t in reply.outputs] == ["label"]
    request = InferRequest(None, request.inputs, (RequestedOutput("logits"),))
    status, message = error_of(call("POST", f"{model}/infer", *render_infer_request(request)))
    assert status == 400 and "'logits'" in message


def _json(**doc) -> bytes:
    return json.dumps(doc).encode()


def _image(shape, datatype="UINT8", name="image", fill=0) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": [fill] * int(np.prod(shape))}


BAD = [
    ("malformed JSON", b'{"inputs": [', {}, 400, "malformed"),
    ("unknown field", _json(inputs=[_image((28, 28))], mode="fast"), {}, 400, "unknown field"),
    ("wrong dtype", _json(inputs=[_image((1, 1, 28, 28), "FP64", "input")]), {}, 400, "unexpected input"),
    (
        "wrong shape",
        _json(inputs=[_image((1, 1, 14, 14), "FP32", "input")]),
        {},
        400,
        "must be (N, 1, 28, 28)",
    ),
    ("pixels over 1", _json(inputs=[_image((1, 1, 28, 28), "FP32", "input", 255)]), {}, 400, "divide"),
    ("two inputs", _json(inputs=[_image((4, 4)), _image((4, 4), name="x")]), {}, 400, "exactly one"),
    ("five channels", _json(inputs=[_image((1, 4, 4, 5))]), {}, 400, "channels"),
    ("empty image", _json(inputs=[_image((0, 4))]), {}, 400, "H, W >= 1"),
    ("count mismatch", _json(inputs=[{**_image((2, 2)), "data": [1]}]), {}, 400, "4 elements"),
    ("bad header length", _json(inputs=[_image((2, 2))]), {HEADER_LENGTH: "x"}, 400, "integer"),
]


def test_bad_requests_get_4xx_and_the_worker_keeps_serving(scnn) -> None:
    worker, name, model = scnn
    for label, body, headers, status, fragment in BAD:
        got, message = error_of(
            call("POST", f"{model}/infer", body, {"Content-Type": "application/json", **headers})
        )
        assert (got, fragment in message) == (status, True), (label, message)
    nan = np.array([np.nan] * 784, "<f4").tobytes()
    head = _json(
        inputs=[
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [1, 1, 28, 28],
                "parameters": {"binary_data_size": len(nan)},
            }
        ]
    )
    assert error_of(call("POST", f"{model}/infer", head + nan, {HEADER_LENGTH: str(len(head))}))[0] == 400
    assert error_of(call("POST", f"{worker.url}/v2/models/nope/infer", BAD[1][1]))[0] == 404
    assert error_of(call("GET", f"{model}/infer"))[0] == 405
    assert error_of(call("GET", f"{worker.url}/v3/anything"))[0] == 404
    assert worker.proc.poll() is None
    assert infer(f"{model}/infer", image_request(np.zeros((28, 28), np.uint8))).output(
        "label"
    ).data.shape == (1,)


def test_limits_queue_and_injected_stragglers(serving_models, worker_factory) -> None:
    path = serving_models["scnn"]
    name = read_onnx_meta(path).name
    worker = worker_factory(
        "--model", str(path), "--max-body-mb", "0.01", "--max-batch", "2", "--max-queue", "2",
        "--slowdown", "pareto:alpha=3,scale=0.3,cap=0.3",  # every request takes max(compute, 0.3 s)
    )  # fmt: skip
    url = f"{worker.url}/v2/models/{name}/infer"
    status, message = error_of(call("POST", url, _json(inputs=[_image((100, 100))])))
    assert status == 413 and "exceeds" in message
    status, message = error_of(
        call("POST", url, *render_infer_request(image_request(np.zeros((3, 8, 8), np.uint8))))
    )
    assert status == 413 and "batch of 3" in message

    body, headers = render_infer_request(image_request(np.zeros((28, 28), np.uint8)))
    start = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda _: call("POST", url, body, headers), range(3)))
    elapsed = time.monotonic() - start
    assert sorted(r[0] for r in replies) == [200, 200, 429], [r[2][:200] for r in replies]
    (refused,) = [r for r in replies if r[0] == 429]
    assert refused[1]["Retry-After"] == "1"
    shown = parse_metrics(call("GET", f"{worker.url}/metrics")[2].decode())  # prometheus_client's parser
    assert shown[("collage_worker_shed_total", f'model="{name}"')] == 1
    assert shown[("collage_worker_queue_limit", f'model="{name}"')] == 2
    timings = [parse_infer_response(r[2], r[1][HEADER_LENGTH]).parameters for r in replies if r[0] == 200]
    for t in timings:
        assert t["compute_ms"] + t["injected_ms"] == pytest.approx(300, abs=2)
    assert max(t["queue_ms"] for t in timings) > 200  # the second waited behind the first straggler
    assert elapsed >= 0.6
    meta = json.loads(call("GET", f"{worker.url}/v2/models/{name}")[2])
    assert meta["parameters"]["slowdown"] == "pareto:alpha=3,scale=0.3,cap=0.3 per-request"


def test_torch_backend_matches_onnx(serving_models, scnn, worker_factory) -> None:
    _, name, model = scnn
    pt = serving_models["scnn"].with_suffix(".pt")
    worker = worker_factory("--model", str(pt), "--backend", "torch")
    meta = json.loads(call("GET", f"{worker.url}/v2/models/{name}")[2])
    assert meta["platform"] == "pytorch_torchscript" and meta["parameters"]["backend"] == "torch"
    images = np.random.default_rng(3).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    torch_reply = infer(f"{worker.url}/v2/models/{name}/infer", image_request(images))
    onnx_reply = infer(f"{model}/infer", image_request(images))
    np.testing.assert_allclose(
        torch_reply.output("probabilities").data, onnx_reply.output("probabilities").data, atol=1e-4
    )


def test_sigterm_stops_the_worker_cleanly(serving_models, worker_factory) -> None:
    worker = worker_factory("--model", str(serving_models["collage-2x2"]))
    assert call("GET", f"{worker.url}/v2/health/ready")[0] == 200
    assert worker.stop() == 0
    assert "Traceback" not in worker.proc.stderr.read()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{worker.url}/v2/health/live", timeout=2)


def test_a_missing_model_is_a_one_line_error(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "collage_inference.serving.worker", "--model", str(tmp_path / "m.onnx")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error:") and "does not exist" in done.stderr


# --- real labels: the shipped models on real Fashion-MNIST test images ---------------------------


def _shipped(models_dir: Path, name: str) -> Path:
    path = models_dir / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"shipped model {path} is absent; train it with `make models`")
    return path


def test_shipped_scnn_labels_fashion_mnist(models_dir, fashion_test, worker_factory) -> None:
    path = _shipped(models_dir, "scnn")
    worker = worker_factory("--model", str(path))
    n = 250  # within the default --max-batch of 256
    reply = infer(
        f"{worker.url}/v2/models/{read_onnx_meta(path).name}/infer", image_request(fashion_test.images[:n])
    )
    accuracy = (reply.output("label").data == fashion_test.labels[:n]).mean()
    assert accuracy > 0.85


@pytest.mark.parametrize("grid", [2, 3])
def test_shipped_collage_labels_every_cell(grid, models_dir, fashion_test, worker_factory) -> None:
    path = _shipped(models_dir, f"collage-{grid}x{grid}")
    meta = read_onnx_meta(path)
    worker = worker_factory("--model", str(path))
    k, groups = grid * grid, 40
    tiles = fit_images(fashion_test.images[: groups * k], meta.config.image_size, 1)
    truth = fashion_test.labels[: groups * k].reshape(groups, k).copy()
    tiles = tiles.reshape(groups, k, *tiles.shape[1:])
    tiles[-1, -1] = 0  # one partial group: its last cell is empty (black)
    truth[-1, -1] = len(meta.class_names)
    reply = infer(f"{worker.url}/v2/models/{meta.name}/infer", image_request(pack(tiles, grid)))
    labels = reply.output("label").data
    assert labels.shape == (groups, k)
    assert (labels == truth).mean() > 0.75
    assert labels[-1, -1] == len(meta.class_names)  # the empty cell is called empty


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # a process that ended while we looked
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_per_instance_slowdown_and_contention_start_and_stop_with_the_worker(serving_models, worker_factory):
    path = serving_models["scnn"]
    name = read_onnx_meta(path).name
    worker = worker_factory(
        "--model", str(path), "--slowdown", "bimodal:0.1", "--slowdown-kind", "per-instance",
        "--slow-onset-rate", "2", "--slow-period", "0.5", "--contention", "0.2",
    )  # fmt: skip
    meta = json.loads(call("GET", f"{worker.url}/v2/models/{name}")[2])["parameters"]
    assert meta["slowdown"] == "bimodal:0.1 per-instance (onset 2/s, mean period 0.5s)"
    assert meta["contention"] == "cpu contention 0.2 x 1"
    burners = _children(worker.proc.pid)
    assert len(burners) == 1
    reply = infer(f"{worker.url}/v2/models/{name}/infer", image_request(np.zeros((28, 28), np.uint8)))
    assert reply.parameters["injected_ms"] >= 0
    assert worker.stop() == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in burners)
