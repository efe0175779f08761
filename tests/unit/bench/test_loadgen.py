"""The load generator's pure parts: the seeded schedule, config checks, payloads and answers."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from collage_inference.bench.loadgen import LoadConfig, arrival_offsets
from collage_inference.bench.payload import TensorInput, parse_answer, render_payload
from collage_inference.errors import ConfigError, ProtocolError
from collage_inference.serving.runtime import prepare_images
from collage_inference.serving.v2 import (
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    InferTensor,
    parse_infer_request,
    render_infer_response,
)

URL = "http://127.0.0.1:9"


def test_poisson_schedule_is_seeded_and_has_the_rate() -> None:
    a = arrival_offsets(20_000, 500.0, "poisson", seed=7)
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
    np.testing.assert_array_equal(a, arrival_offsets(20_000, 500.0, "poisson", seed=7))
    assert not np.array_equal(a, arrival_offsets(20_000, 500.0, "poisson", seed=8))
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(1 / 500, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 500, rel=0.05)  # exponential: std equals mean


def test_burst_schedule_sends_whole_bursts_at_once_at_the_same_mean_rate() -> None:
    a = arrival_offsets(9 * 4000, 90.0, "burst", seed=3, burst_size=9)
    bursts = a.reshape(-1, 9)
    assert a[0] == 0.0 and np.all(bursts == bursts[:, :1])  # nine requests at each instant
    gaps = np.diff(bursts[:, 0])
    assert np.all(gaps > 0) and gaps.mean() == pytest.approx(9 / 90.0, rel=0.05)  # Poisson bursts
    assert gaps.std() == pytest.approx(9 / 90.0, rel=0.08)
    np.testing.assert_array_equal(a, arrival_offsets(9 * 4000, 90.0, "burst", seed=3, burst_size=9))
    assert len(arrival_offsets(10, 5.0, "burst", burst_size=4)) == 10  # a partial last burst


def test_constant_schedule_is_evenly_spaced() -> None:
    np.testing.assert_allclose(arrival_offsets(5, 4.0, "constant"), [0, 0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ConfigError, match="arrival"):
        arrival_offsets(3, 1.0, "bursty")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"url": "127.0.0.1:8000"}, "http://"),
        ({"rate": 0.0}, "--rate"),
        ({"rate": float("inf")}, "--rate"),
        ({"requests": 0}, "--requests"),
        ({"warmup": -1}, "--warmup"),
        ({"arrival": "bursty"}, "arrival"),
        ({"target": "grpc"}, "target"),
        ({"timeout_s": 0}, "timeouts"),
        ({"overall_timeout_s": -1.0}, "timeouts"),
        ({"max_in_flight": 0}, "--max-in-flight"),
        ({"arrival": "burst", "burst_size": 0}, "--burst-size"),
        ({"model": "a/b"}, "--model"),
    ],
)
def test_bad_settings_are_config_errors(overrides: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        LoadConfig(**{"url": URL, "rate": 10.0, "requests": 5, **overrides})


def test_endpoints() -> None:
    assert LoadConfig(URL + "/", 1.0, 1, model="m").endpoint == URL + "/v2/models/m/infer"
    assert LoadConfig(URL, 1.0, 1, target="predict").endpoint == URL + "/predict"


@pytest.mark.parametrize("binary", [True, False])
def test_v2_payload_is_one_uint8_image_the_protocol_parses(binary: bool) -> None:
    image = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    body, headers = render_payload(image, LoadConfig(URL, 1.0, 1, binary=binary))
    assert (HEADER_LENGTH in headers) is binary
    request = parse_infer_request(body, headers.get(HEADER_LENGTH))
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("image", "UINT8", (28, 28, 1))
    np.testing.assert_array_equal(tensor.data, image)
    assert request.binary_outputs is binary


@pytest.mark.parametrize("channels", [1, 3])
def test_predict_payload_is_a_png(channels: int) -> None:
    image = np.random.default_rng(1).integers(0, 256, (9, 7, channels), dtype=np.uint8)
    body, headers = render_payload(image, LoadConfig(URL, 1.0, 1, target="predict"))
    assert headers == {"Content-Type": "image/png"}
    decoded = np.asarray(Image.open(io.BytesIO(body)))
    np.testing.assert_array_equal(decoded.reshape(image.shape), image)


def _v2_answer(outputs: tuple[InferTensor, ...], binary: bool, **parameters) -> tuple[bytes, dict]:
    asked = InferRequest(None, (), binary_outputs=binary)
    return render_infer_response(InferResponse("m", outputs, parameters=parameters), asked)


@pytest.mark.parametrize("binary", [True, False])
def test_v2_answers_give_label_source_and_timings(binary: bool) -> None:
    outputs = (
        InferTensor.of("label", np.array([3], np.int64)),
        InferTensor.of("source", np.array(["collage"], object)),
    )
    body, headers = _v2_answer(outputs, binary, latency_ms=[12.5], queue_ms=1, kind="scnn", flag=True)
    answer = parse_answer(body, headers, "v2")
    assert (answer.label, answer.source) == (3, "collage")
    assert answer.timings == {"latency_ms": 12.5, "queue_ms": 1.0}


def test_a_bare_worker_answer_has_no_source() -> None:
    body, headers = _v2_answer((InferTensor.of("label", np.array([7], np.int64)),), True)
    assert parse_answer(body, headers, "v2").source is None


@pytest.mark.parametrize(
    "outputs",
    [
        (InferTensor.of("label", np.array([1, 2], np.int64)),),  # two labels for one image
        (InferTensor.of("label", np.array([0.5], np.float32)),),
        (InferTensor.of("probabilities", np.zeros((1, 10), np.float32)),),  # no label at all
    ],
)
def test_v2_answers_without_one_integer_label_are_refused(outputs) -> None:
    with pytest.raises(ProtocolError):
        parse_answer(*_v2_answer(outputs, False), "v2")


def test_predict_answers() -> None:
    doc = {
        "label": 4,
        "class_name": "coat",
        "source": "primary",
        "latency_ms": 3.5,
        "timings_ms": {"scnn": 2},
    }
    answer = parse_answer(json.dumps(doc).encode(), {}, "predict")
    assert (answer.label, answer.source) == (4, "primary")
    assert answer.timings == {"latency_ms": 3.5, "scnn_ms": 2.0}
    assert parse_answer(b'{"label": [5]}', {}, "predict").label == 5
    for bad in [b"not json", b"[1]", b'{"label": true}', b'{"label": "4"}', b"{}"]:
        with pytest.raises(ProtocolError):
            parse_answer(bad, {}, "predict")


def test_tensor_payload_is_the_exported_models_own_input() -> None:
    image = np.random.default_rng(2).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    config = LoadConfig(URL, 1.0, 1, target="tensor", tensor=TensorInput(side=24, channels=3))
    body, headers = render_payload(image, config)
    (tensor,) = parse_infer_request(body, headers.get(HEADER_LENGTH)).inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("input", "FP32", (1, 3, 24, 24))
    np.testing.assert_array_equal(tensor.data, prepare_images(image[None], 24, 3))
    assert tensor.data.min() >= 0.0 and tensor.data.max() <= 1.0


def test_tensor_answers_are_the_argmax_of_the_scores() -> None:
    logits = np.array([[0.1, -2.0, 3.5, 0.0]], np.float32)
    body, headers = _v2_answer((InferTensor.of("logits", logits),), True)
    assert parse_answer(body, headers, "tensor").label == 2
    body, headers = _v2_answer((InferTensor.of("scores", logits),), False)
    assert parse_answer(body, headers, "tensor", scores="scores").label == 2
    for bad in (np.zeros((2, 4), np.float32), np.zeros((1, 4), np.int64), np.zeros((1, 0), np.float32)):
        with pytest.raises(ProtocolError):
            parse_answer(*_v2_answer((InferTensor.of("logits", bad),), True), "tensor")
    with pytest.raises(ProtocolError):  # no logits at all
        parse_answer(*_v2_answer((InferTensor.of("label", np.array([1], np.int64)),), True), "tensor")


def test_the_tensor_target_needs_the_models_input(models_dir) -> None:
    with pytest.raises(ConfigError, match="--model-file"):
        LoadConfig(URL, 1.0, 1, target="tensor")
    with pytest.raises(ConfigError, match="--model-file"):
        LoadConfig(URL, 1.0, 1, tensor=TensorInput(28, 1))
    assert TensorInput.of_file(models_dir / "collage-3x3.onnx") == TensorInput(side=72, channels=1)
    with pytest.raises(ConfigError, match="--model-file"):
        TensorInput.of_file(models_dir / "MODEL_CARD.md")
