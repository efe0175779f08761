"""KServe V2 parse/render (serving.v2): round trips in both layouts, every refusal, and fuzzing."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from collage_inference.config import Limits
from collage_inference.errors import PayloadTooLargeError, ProtocolError
from collage_inference.serving.v2 import (
    DATATYPES,
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    InferTensor,
    RequestedOutput,
    V2Parser,
    parse_infer_request,
    parse_infer_response,
    render_infer_request,
    render_infer_response,
)

NUMERIC = [name for name in DATATYPES if name != "BYTES"]


def sample_array(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    rng = np.random.default_rng(0)
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([info.min, info.max, 0, 1, info.max - 1, info.min + 1], dtype).reshape(shape)
    return (rng.standard_normal(shape) * 100).astype(dtype)


def round_trip(request: InferRequest, binary: bool) -> InferRequest:
    body, headers = render_infer_request(request, binary_inputs=binary)
    return parse_infer_request(body, headers.get(HEADER_LENGTH))


def json_body(**doc) -> bytes:
    return json.dumps(doc).encode()


def tensor(name="x", datatype="FP32", shape=(2,), data=(0.5, 1.0), **extra) -> dict:
    entry = {"name": name, "datatype": datatype, "shape": None if shape is None else list(shape), **extra}
    if data is not None:
        entry["data"] = list(data)
    return entry


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", NUMERIC)
def test_numeric_tensors_round_trip(datatype: str, binary: bool) -> None:
    array = sample_array(datatype)
    parsed = round_trip(InferRequest("r1", (InferTensor.of("x", array),)), binary)
    (got,) = parsed.inputs
    assert parsed.id == "r1" and got.name == "x" and got.datatype == datatype and got.shape == (2, 3)
    assert got.data.dtype == DATATYPES[datatype]
    np.testing.assert_array_equal(got.data, array)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_bytes_tensors_round_trip(binary: bool) -> None:
    values = np.array([b"", "héllo".encode(), b"x" * 300], dtype=object)
    parsed = round_trip(InferRequest(None, (InferTensor.of("s", values),)), binary)
    assert parsed.inputs[0].datatype == "BYTES" and list(parsed.inputs[0].data) == list(values)


def test_binary_bytes_layout_is_length_prefixed_little_endian() -> None:
    request = InferRequest(None, (InferTensor.of("s", np.array([b"ab", b"c"], dtype=object)),))
    body, headers = render_infer_request(request)
    assert body[int(headers[HEADER_LENGTH]) :] == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"


def test_binary_numbers_are_little_endian() -> None:
    request = InferRequest(None, (InferTensor.of("x", np.array([1], ">u2")),))
    body, headers = render_infer_request(request)
    assert body[int(headers[HEADER_LENGTH]) :] == b"\x01\x00"


def test_several_binary_and_json_inputs_mix_in_one_body() -> None:
    header = {
        "inputs": [
            tensor("a", "UINT8", (3,), None, parameters={"binary_data_size": 3}),
            tensor("b", "INT32", (2,), (7, -8)),
            tensor("c", "FP32", (1,), None, parameters={"binary_data_size": 4}),
        ]
    }
    head = json.dumps(header).encode()
    body = head + bytes([1, 2, 3]) + np.array([2.5], "<f4").tobytes()
    a, b, c = parse_infer_request(body, str(len(head))).inputs
    assert a.data.tolist() == [1, 2, 3] and b.data.tolist() == [7, -8] and c.data.tolist() == [2.5]


def test_nested_json_data_is_read_in_row_major_order() -> None:
    body = json_body(inputs=[tensor("x", "INT64", (2, 2), [[1, 2], [3, 4]])])
    assert parse_infer_request(body).inputs[0].data.tolist() == [[1, 2], [3, 4]]


def test_requested_outputs_and_binary_flags() -> None:
    body = json_body(
        inputs=[tensor()],
        outputs=[{"name": "label"}, {"name": "probabilities", "parameters": {"binary_data": False}}],
        parameters={"binary_data_output": True},
    )
    request = parse_infer_request(body)
    assert request.outputs_requested == (RequestedOutput("label"), RequestedOutput("probabilities", False))
    assert request.wants_binary("label") and not request.wants_binary("probabilities")
    assert request.wants_binary("unlisted")  # the request-level default
    again = round_trip(request, binary=True)
    assert again.outputs_requested == request.outputs_requested and again.binary_outputs


def test_a_repeated_binary_header_reads_each_request_its_own_bytes_and_checks_them() -> None:
    """A parser keeps a binary request's checked header: the second request with the same header
    gets its own pixels, and the same refusals of a bad binary part as the first."""
    first = np.arange(6, dtype=np.float32)
    request = InferRequest(None, (InferTensor.of("x", first),), binary_outputs=True)
    body, headers = render_infer_request(request)
    header_length = headers[HEADER_LENGTH]
    size = int(header_length)
    parser = V2Parser()
    np.testing.assert_array_equal(parser.parse_request(body, header_length).inputs[0].data, first)
    second = body[:size] + (first + 10).tobytes()
    parsed = parser.parse_request(second, header_length)
    np.testing.assert_array_equal(parsed.inputs[0].data, first + 10)
    assert parsed.binary_outputs and parsed.id is None
    with pytest.raises(ProtocolError, match="NaN"):
        parser.parse_request(body[:size] + np.full(6, np.nan, np.float32).tobytes(), header_length)
    with pytest.raises(ProtocolError, match="runs past"):
        parser.parse_request(body[:-4], header_length)
    with pytest.raises(ProtocolError, match="belong to no tensor"):
        parser.parse_request(body + b"xx", header_length)
    with pytest.raises(PayloadTooLargeError, match="6 elements"):
        V2Parser(Limits(max_elements=5)).parse_request(body, header_length)


def test_the_header_cache_is_the_parsers_own_and_bounded() -> None:
    """Each parser keeps at most ``cache`` binary headers; one holding JSON data is not kept (its
    arrays would be shared); kept parameters are read-only."""
    parser, other = V2Parser(cache=2), V2Parser(cache=2)
    for n in range(1, 5):
        request = InferRequest(str(n), (InferTensor.of("x", np.zeros(n, np.uint8)),), parameters={"n": n})
        body, headers = render_infer_request(request)
        parsed = parser.parse_request(body, headers[HEADER_LENGTH])
        assert parsed.id == str(n) and parsed.parameters == {"n": n} and parsed.inputs[0].shape == (n,)
        assert parser.parse_request(body, headers[HEADER_LENGTH]).parameters is parsed.parameters  # kept
        with pytest.raises(TypeError):
            parsed.parameters["n"] = 0  # type: ignore[index]
    assert len(parser._heads) == 2 and len(other._heads) == 0
    body = json_body(inputs=[tensor()])
    assert parser.parse_request(body).inputs[0].data is not parser.parse_request(body).inputs[0].data
    uncached = V2Parser(cache=0)
    body, headers = render_infer_request(InferRequest(None, (InferTensor.of("x", np.zeros(1)),)))
    uncached.parse_request(body, headers[HEADER_LENGTH])
    assert len(uncached._heads) == 0


@pytest.mark.parametrize("count", [3, 65, 1000], ids=["few", "just-many", "many"])
@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_binary_nan_and_inf_are_refused_in_small_and_large_tensors(datatype: str, count: int) -> None:
    for bad in (np.nan, np.inf, -np.inf):
        values = np.zeros(count, DATATYPES[datatype])
        values[count // 2] = bad
        body, headers = render_infer_request(InferRequest(None, (InferTensor.of("x", values),)))
        with pytest.raises(ProtocolError, match="NaN or infinite"):
            parse_infer_request(body, headers[HEADER_LENGTH])


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_responses_round_trip(binary: bool) -> None:
    labels = np.array([[3, 10]], np.int64)
    probabilities = np.full((1, 2, 11), 1 / 11, np.float32)
    response = InferResponse(
        "collage-2x2",
        (InferTensor.of("label", labels), InferTensor.of("probabilities", probabilities)),
        id="abc",
        model_version="1",
        parameters={"queue_ms": 0.5, "kind": "collage"},
    )
    request = InferRequest(None, (), binary_outputs=binary)
    body, headers = render_infer_response(response, request)
    assert (HEADER_LENGTH in headers) == binary
    parsed = parse_infer_response(body, headers.get(HEADER_LENGTH))
    assert (parsed.model_name, parsed.id, parsed.model_version) == ("collage-2x2", "abc", "1")
    assert parsed.parameters == {"queue_ms": 0.5, "kind": "collage"}
    np.testing.assert_array_equal(parsed.output("label").data, labels)
    np.testing.assert_array_equal(parsed.output("probabilities").data, probabilities)
    with pytest.raises(ProtocolError, match="no output 'nope'"):
        parsed.output("nope")


def test_answers_with_the_same_outputs_read_their_own_parameters_and_bytes() -> None:
    """A worker's answers differ in their timings only: each gets its own parameters and values,
    and the same refusals."""

    def answer(values: np.ndarray, queue_ms: float) -> tuple[bytes, str]:
        response = InferResponse("m", (InferTensor.of("p", values),), parameters={"queue_ms": queue_ms})
        body, headers = render_infer_response(response, InferRequest(None, (), binary_outputs=True))
        return body, headers[HEADER_LENGTH]

    first = np.full((1, 4), 0.25, np.float32)
    parser = V2Parser()
    for values, queue_ms in ((first, 0.5), (first / 2, 12.125)):
        parsed = parser.parse_response(*answer(values, queue_ms))
        assert parsed.parameters == {"queue_ms": queue_ms}
        np.testing.assert_array_equal(parsed.output("p").data, values)
    assert len(parser._outputs) == 1  # both answers read with one kept output list
    body, header_length = answer(first, 1.0)
    with pytest.raises(PayloadTooLargeError, match="4 elements"):
        V2Parser(Limits(max_elements=3)).parse_response(body, header_length)
    with pytest.raises(ProtocolError, match="NaN"):
        parser.parse_response(answer(np.full((1, 4), np.nan, np.float32), 1.0)[0], header_length)
    with pytest.raises(ProtocolError, match="runs past"):
        parser.parse_response(body[:-4], header_length)
    with pytest.raises(ProtocolError, match="belong to no tensor"):
        parser.parse_response(body + b"x", header_length)


def test_kept_outputs_are_told_apart_by_every_field_and_json_data_is_not_kept() -> None:
    parser = V2Parser(cache=4)
    for datatype, shape, size in (
        ("FP32", [1, 2], 8),
        ("FP32", [2, 1], 8),
        ("INT32", [1, 2], 8),
        ("FP64", [2], 16),
    ):
        header = orjson.dumps(
            {
                "model_name": "m",
                "outputs": [tensor("p", datatype, shape, None, parameters={"binary_data_size": size})],
            }
        )
        raw = np.arange(2, dtype=DATATYPES[datatype]).tobytes()
        got = parser.parse_response(header + raw, len(header)).output("p")
        assert (got.datatype, got.shape, got.data.ravel().tolist()) == (datatype, tuple(shape), [0, 1])
    assert len(parser._outputs) == 4
    body = json_body(model_name="m", outputs=[tensor("p", "INT32", (2,), (1, 2))])
    first, again = parser.parse_response(body), parser.parse_response(body)
    assert first.output("p").data is not again.output("p").data and len(parser._outputs) == 4


def test_outputs_nested_deeper_than_orjson_writes_are_parsed_not_kept() -> None:
    deep: object = 1
    for _ in range(300):
        deep = [deep]
    output = tensor("p", shape=(0,), data=None, parameters={"x": deep, "binary_data_size": 0})
    body = json.dumps({"model_name": "m", "outputs": [output]}).encode()
    parser = V2Parser()
    assert parser.parse_response(body, len(body)).output("p").shape == (0,)
    assert len(parser._outputs) == 0


def test_parsed_parameters_are_read_only_and_list_columns_are_1d() -> None:
    body, headers = render_infer_request(
        InferRequest(None, (InferTensor("x", "UINT8", (1,), np.zeros(1, np.uint8), {"scale": 2}),))
    )
    (x,) = V2Parser().parse_request(body, headers[HEADER_LENGTH]).inputs
    assert x.parameters == {"scale": 2, "binary_data_size": 1}
    with pytest.raises(TypeError):
        x.parameters["scale"] = 3  # type: ignore[index]
    column = InferTensor.column("label", "INT64", [3, 1, 4])
    assert (column.shape, column.data) == ((3,), [3, 1, 4])


def test_numbers_beyond_float_range_are_malformed_json() -> None:
    """orjson refuses 1e400 (it would read as infinity) anywhere in a header, parameters included."""
    for scale in (b"1e400", b"null", b"-1e400"):
        header = (
            b'{"model_name":"m","outputs":[{"name":"p","datatype":"FP32","shape":[1],'
            b'"parameters":{"binary_data_size":4,"scale":' + scale + b"}}]}"
        )
        body = header + np.ones(1, np.float32).tobytes()
        if scale == b"null":
            assert parse_infer_response(body, len(header)).output("p").parameters["scale"] is None
        else:
            with pytest.raises(ProtocolError, match="malformed.*infinity"):
                parse_infer_response(body, len(header))


def test_json_response_content_type() -> None:
    _, headers = render_infer_response(InferResponse("m", (InferTensor.of("y", np.zeros(1, np.float32)),)))
    assert headers == {"Content-Type": "application/json"}


# --- refusals ------------------------------------------------------------------------------------

BAD_REQUESTS = {
    "not json": (b"{nope", None, "malformed"),
    "not an object": (b"[1, 2]", None, "must be an object"),
    "bad utf-8": (b'{"inputs": "\xff"}', None, "malformed"),
    "NaN literal": (
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
        None,
        "malformed.*NaN",
    ),
    "Infinity literal": (
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [Infinity]}]}',
        None,
        "malformed.*Infinity",
    ),
    "unknown top field": (json_body(inputs=[tensor()], model="m"), None, "unknown field.*'model'"),
    "no inputs": (json_body(outputs=[]), None, 'non-empty "inputs"'),
    "empty inputs": (json_body(inputs=[]), None, 'non-empty "inputs"'),
    "id not a string": (json_body(id=5, inputs=[tensor()]), None, '"id".*string'),
    "parameters not object": (json_body(inputs=[tensor()], parameters=[1]), None, "parameters"),
    "binary_data_output not bool": (
        json_body(inputs=[tensor()], parameters={"binary_data_output": 1}),
        None,
        "binary_data_output",
    ),
    "tensor not object": (json_body(inputs=[5]), None, r"inputs\[0\] must be an object"),
    "unknown tensor field": (json_body(inputs=[tensor(content=1)]), None, "unknown field.*'content'"),
    "missing name": (json_body(inputs=[{"datatype": "FP32", "shape": [1], "data": [1]}]), None, '"name"'),
    "duplicate input": (json_body(inputs=[tensor(), tensor()]), None, "appears twice"),
    "unknown datatype": (json_body(inputs=[tensor(datatype="FP8")]), None, "unknown datatype 'FP8'"),
    "shape not a list": (json_body(inputs=[tensor(shape=None)]), None, '"shape"'),
    "negative dim": (json_body(inputs=[tensor(shape=(-1,))]), None, '"shape"'),
    "bool dim": (json_body(inputs=[{**tensor(), "shape": [True, 2]}]), None, '"shape"'),
    "count mismatch": (json_body(inputs=[tensor(shape=(3,))]), None, "3 elements but data has 2"),
    "no data": (json_body(inputs=[tensor(data=None)]), None, 'needs "data"'),
    "ragged": (json_body(inputs=[tensor(shape=(3,), data=[[1, 2], [3]])]), None, "rectangular"),
    "string in numbers": (json_body(inputs=[tensor(data=[1.0, "2"])]), None, "numbers"),
    "float for int": (json_body(inputs=[tensor(datatype="INT32", data=[1.5, 2])]), None, "integers"),
    "bool for int": (json_body(inputs=[tensor(datatype="INT32", data=[True, False])]), None, "integers"),
    "int out of range": (json_body(inputs=[tensor(datatype="UINT8", data=[0, 256])]), None, r"\[0, 255\]"),
    "huge int": (
        json_body(inputs=[tensor(datatype="INT64", data=[2**70, 1])]),
        None,
        "integers past 64 bits",
    ),
    "int64 past its max": (json_body(inputs=[tensor(datatype="INT64", data=[2**63, 1])]), None, "integers"),
    "uint64 past 64 bits": (json_body(inputs=[tensor(datatype="UINT64", data=[2**64, 1])]), None, "integers"),
    "uint64 negative": (
        json_body(inputs=[tensor(datatype="UINT64", data=[2**64 - 1, -1])]),
        None,
        "integers",
    ),
    "number for bool": (json_body(inputs=[tensor(datatype="BOOL", data=[1, 0])]), None, "true/false"),
    "number for bytes": (json_body(inputs=[tensor(datatype="BYTES", data=[1, 2])]), None, "strings"),
    "lone surrogate": (
        b'{"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}',
        None,
        "malformed.*surrogate",
    ),
    "infinite float": (
        b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [1e400]}]}',
        None,
        "malformed.*infinity",
    ),
    "ragged bytes": (
        json_body(inputs=[tensor(datatype="BYTES", shape=(2,), data=[["a", "b"], ["c"]])]),
        None,
        "BYTES data in JSON must be strings",
    ),
    "fp16 overflow": (json_body(inputs=[tensor(datatype="FP16", data=[1.0, 1e6])]), None, "too large"),
    "outputs not list": (json_body(inputs=[tensor()], outputs={"name": "y"}), None, '"outputs"'),
    "output twice": (json_body(inputs=[tensor()], outputs=[{"name": "y"}, {"name": "y"}]), None, "twice"),
    "output unknown field": (json_body(inputs=[tensor()], outputs=[{"name": "y", "x": 1}]), None, "'x'"),
    "binary_data not bool": (
        json_body(inputs=[tensor()], outputs=[{"name": "y", "parameters": {"binary_data": "yes"}}]),
        None,
        "binary_data",
    ),
    "header length not int": (json_body(inputs=[tensor()]), "ten", "must be an integer"),
    "header length too big": (json_body(inputs=[tensor()]), "100000", "outside the body"),
    "header length negative": (json_body(inputs=[tensor()]), "-1", "outside the body"),
    "header length cuts JSON": (
        json_body(inputs=[tensor()]),
        "5",
        "malformed.*is Inference-Header-Content-Length right",
    ),
    "stray binary bytes": (json_body(inputs=[tensor()]) + b"xx", "JSONLEN", "belong to no tensor"),
}


def _with_binary(header: dict, tail: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + tail, str(len(head))


BAD_BINARY = {
    "data and size": ({"inputs": [tensor(parameters={"binary_data_size": 8})]}, bytes(8), "both"),
    "size not int": (
        {"inputs": [tensor(data=None, parameters={"binary_data_size": "8"})]},
        bytes(8),
        "non-negative",
    ),
    "size past end": (
        {"inputs": [tensor(data=None, parameters={"binary_data_size": 9})]},
        bytes(8),
        "runs past",
    ),
    "size vs dtype": (
        {"inputs": [tensor(data=None, parameters={"binary_data_size": 4})]},
        bytes(4),
        "need 8 bytes",
    ),
    "binary NaN": (
        {"inputs": [tensor(data=None, parameters={"binary_data_size": 8})]},
        np.array([1, np.nan], "<f4").tobytes(),
        "NaN",
    ),
    "bool byte 2": (
        {"inputs": [tensor(datatype="BOOL", data=None, parameters={"binary_data_size": 2})]},
        bytes([1, 2]),
        "0 or 1",
    ),
    "bytes truncated": (
        {"inputs": [tensor(datatype="BYTES", shape=(1,), data=None, parameters={"binary_data_size": 6})]},
        b"\x05\x00\x00\x00ab",
        "claims 5 bytes",
    ),
    "bytes leftover": (
        {"inputs": [tensor(datatype="BYTES", shape=(1,), data=None, parameters={"binary_data_size": 7})]},
        b"\x01\x00\x00\x00abc",
        "left over",
    ),
    "bytes too few": (
        {"inputs": [tensor(datatype="BYTES", shape=(3,), data=None, parameters={"binary_data_size": 4})]},
        b"\x00\x00\x00\x00",
        "at least 12",
    ),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_are_refused_with_a_reason(name: str) -> None:
    body, header_length, message = BAD_REQUESTS[name]
    if header_length == "JSONLEN":
        header_length = str(len(body) - 2)
    with pytest.raises(ProtocolError, match=message) as info:
        parse_infer_request(body, header_length)
    assert type(info.value) is ProtocolError


@pytest.mark.parametrize("name", BAD_BINARY)
def test_bad_binary_requests_are_refused_with_a_reason(name: str) -> None:
    header, tail, message = BAD_BINARY[name]
    body, header_length = _with_binary(header, tail)
    with pytest.raises(ProtocolError, match=message):
        parse_infer_request(body, header_length)


def test_oversize_body_and_too_many_elements_are_413() -> None:
    body = json_body(inputs=[tensor(shape=(2,))])
    with pytest.raises(PayloadTooLargeError, match="limit of 10") as info:
        parse_infer_request(body, limits=Limits(max_body_bytes=10))
    assert info.value.status == 413
    with pytest.raises(PayloadTooLargeError, match="more than the limit of 1"):
        parse_infer_request(body, limits=Limits(max_elements=1))
    huge = json_body(inputs=[tensor(shape=(10**12, 10**12), data=None, parameters={"binary_data_size": 0})])
    with pytest.raises(PayloadTooLargeError):
        parse_infer_request(huge, str(len(huge)))


def test_bad_responses_are_refused() -> None:
    with pytest.raises(ProtocolError, match="model_name"):
        parse_infer_response(json_body(outputs=[]))
    with pytest.raises(ProtocolError, match="outputs"):
        parse_infer_response(json_body(model_name="m"))
    with pytest.raises(ProtocolError, match="unknown field"):
        parse_infer_response(json_body(model_name="m", outputs=[], inputs=[]))


@pytest.mark.parametrize("where", ["request", "response", "columns", "tensor"])
def test_rendering_refuses_nan_in_parameters(where: str) -> None:
    nan = {"timings": [1.0, float("nan")]}
    x = InferTensor.of("x", np.zeros(1, np.float32))
    column = InferTensor.column("x", "FP32", [0.0])
    render = {
        "request": lambda: render_infer_request(InferRequest(None, (x,), parameters=nan)),
        "response": lambda: render_infer_response(InferResponse("m", (x,), parameters=nan)),
        "columns": lambda: render_infer_response(
            InferResponse("m", (column,), parameters={"a": {"b": -np.inf}})
        ),
        "tensor": lambda: render_infer_response(
            InferResponse("m", (InferTensor("x", "FP32", (1,), x.data, nan),))
        ),
    }[where]
    with pytest.raises(ProtocolError, match="JSON.*(nan|inf)"):
        render()


@pytest.mark.parametrize(
    "parameters",
    [{"n": np.float32(1.0)}, {"n": np.int64(1)}, {"n": 2**64}, {"n": -(2**63) - 1}, {1: "key not a string"}],
)
def test_rendering_refuses_what_orjson_cannot_write(parameters: dict) -> None:
    x = InferTensor.of("x", np.zeros(1, np.float32))
    with pytest.raises(ProtocolError, match="cannot render the payload as JSON"):
        render_infer_request(InferRequest(None, (x,), parameters=parameters))
    with pytest.raises(ProtocolError, match="cannot render the payload as JSON"):
        render_infer_response(InferResponse("m", (x,), parameters=parameters))


def test_list_columns_refuse_values_their_datatype_cannot_hold() -> None:
    for request in (InferRequest(None, (), binary_outputs=True), None):  # checked in JSON as in binary
        for datatype, values in (("INT8", [300]), ("UINT8", [-1]), ("INT64", [1.5]), ("FP32", [1e39])):
            response = InferResponse("m", (InferTensor.column("x", datatype, values),))
            with pytest.raises(ProtocolError, match=f"no {datatype}"):
                render_infer_response(response, request)
    with pytest.raises(ProtocolError, match="JSON"):
        render_infer_response(InferResponse("m", (InferTensor.column("x", "FP64", [float("inf")]),)))
    with pytest.raises(ProtocolError, match="binary"):
        render_infer_response(InferResponse("m", (InferTensor.column("s", "BYTES", [b"\xff"]),)))


def test_the_front_ends_answer_renders_as_arrays_of_its_values_would() -> None:
    """label INT64, class_name BYTES, confidence FP32 (in JSON, as float32 gives it back), source BYTES."""
    columns = [("label", "INT64", [3, 7]), ("class_name", "BYTES", [b"three", b"seven"])]
    columns += [("confidence", "FP32", [0.1, 0.87654321]), ("source", "BYTES", [b"collage", b"scnn"])]
    parameters = {"latency_ms": [12.345, 3.0], "queue_ms": [0.5, None]}
    for request in (None, InferRequest(None, (), binary_outputs=True)):
        lists = InferResponse("m", tuple(InferTensor.column(*c) for c in columns), "i", "1", parameters)
        arrays = tuple(InferTensor.of(n, np.array(v, DATATYPES[d])) for n, d, v in columns)
        body, headers = render_infer_response(lists, request)
        assert (body, headers) == render_infer_response(
            InferResponse("m", arrays, "i", "1", parameters), request
        )
        parsed = parse_infer_response(body, headers.get(HEADER_LENGTH))
        assert parsed.output("confidence").data.tolist() == np.array([0.1, 0.87654321], np.float32).tolist()
        assert parsed.output("class_name").data.tolist() == [b"three", b"seven"]
        assert parsed.output("label").data.tolist() == [3, 7]
        if request is None:
            assert b'"data":[0.10000000149011612,0.8765432238578796]' in body


def test_rendering_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(ProtocolError, match="binary"):
        render_infer_request(InferRequest(None, (InferTensor.of("s", np.array([b"\xff"], object)),)), False)
    with pytest.raises(ProtocolError, match="JSON"):
        render_infer_request(InferRequest(None, (InferTensor.of("x", np.array([np.nan])),)), False)
    with pytest.raises(ProtocolError, match="no V2 datatype"):
        InferTensor.of("c", np.zeros(2, np.complex64))


@pytest.mark.parametrize("number", [2**64, -(2**63) - 1, 10**30, -(10**20)])
def test_integers_past_64_bits_read_as_floats_and_integer_tensors_refuse_them(number: int) -> None:
    """orjson reads an integer past 64 bits as a float: a float tensor gets that float, an integer
    tensor refuses it rather than hold a rounded value."""
    fp64 = json_body(inputs=[tensor(datatype="FP64", shape=(1,), data=[number])])
    assert parse_infer_request(fp64).inputs[0].data.tolist() == [float(number)]
    for datatype in ("INT64", "UINT64"):
        body = json_body(inputs=[tensor(datatype=datatype, shape=(1,), data=[number])])
        with pytest.raises(ProtocolError, match=f"{datatype} data must be integers"):
            parse_infer_request(body)


def test_the_64_bit_integer_extremes_read_exactly() -> None:
    for datatype, values in (("UINT64", [2**64 - 1, 0, 2**63]), ("INT64", [-(2**63), 2**63 - 1])):
        body = json_body(inputs=[tensor(datatype=datatype, shape=(len(values),), data=values)])
        assert parse_infer_request(body).inputs[0].data.tolist() == values


# --- fuzzing: whatever arrives, the parsers raise ProtocolError or succeed ------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
    | st.sampled_from(["\ud800", "a\udfff"]),  # lone surrogates: valid JSON, invalid Unicode
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
shapes = st.lists(st.integers(-1, 4) | st.sampled_from([0, 10**9, True]), max_size=4)
tensors = st.fixed_dictionaries(
    {"name": st.sampled_from(["x", "y", "", 3]), "datatype": st.sampled_from([*DATATYPES, "F", None])},
    optional={
        "shape": shapes,
        "data": json_values | st.lists(st.integers(-300, 300) | st.floats(allow_nan=False), max_size=20),
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-2, 40)}),
    },
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.lists(tensors, max_size=3) | json_values,
        "outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=3)}), max_size=2) | json_values,
        "parameters": json_values,
        "id": json_values,
        "extra": json_values,
    },
)


FUZZ_LIMITS = Limits(max_body_bytes=10_000, max_elements=10_000)
SHARED = V2Parser(FUZZ_LIMITS, cache=8)  # kept headers and outputs carried from example to example


def _parses_or_protocol_error(body: bytes, header_length: str | None) -> None:
    for parse in (parse_infer_request, parse_infer_response):
        with contextlib.suppress(ProtocolError):  # anything else fails the test
            parse(body, header_length, FUZZ_LIMITS)
    for parse_cached in (SHARED.parse_request, SHARED.parse_response) * 2:  # the second from what was kept
        with contextlib.suppress(ProtocolError):
            parse_cached(body, header_length)


@FUZZ
@given(
    body=st.binary(max_size=300),
    header_length=st.none() | st.integers(-5, 310).map(str) | st.text(max_size=4),
)
def test_fuzz_arbitrary_bytes(body: bytes, header_length: str | None) -> None:
    _parses_or_protocol_error(body, header_length)


@FUZZ
@given(doc=documents, tail=st.binary(max_size=48), binary=st.booleans())
def test_fuzz_structured_documents(doc: dict, tail: bytes, binary: bool) -> None:
    head = json.dumps(doc).encode()
    _parses_or_protocol_error(head + tail if binary else head, str(len(head)) if binary else None)


@FUZZ
@given(doc=json_values)
def test_fuzz_arbitrary_json(doc: object) -> None:
    _parses_or_protocol_error(json.dumps(doc).encode(), None)


@FUZZ
@given(
    array=hnp.arrays(
        st.sampled_from([DATATYPES[name] for name in NUMERIC]),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
        elements={"allow_nan": False, "allow_infinity": False},
    ),
    binary=st.booleans(),
)
def test_fuzz_round_trip_preserves_every_value(array: np.ndarray, binary: bool) -> None:
    parsed = round_trip(InferRequest(None, (InferTensor.of("x", array),)), binary)
    assert parsed.inputs[0].shape == array.shape
    np.testing.assert_array_equal(parsed.inputs[0].data, array)


column_values = {
    "INT64": st.integers(-(2**63), 2**63 - 1),
    "INT8": st.integers(-128, 127),
    "UINT32": st.integers(0, 2**32 - 1),
    "BOOL": st.booleans(),
    "FP32": st.floats(-3e38, 3e38),  # float64 values, rounded to float32 as the array would
    "FP64": st.floats(allow_nan=False, allow_infinity=False),
    "BYTES": st.binary(max_size=6),
}
columns = st.lists(
    st.sampled_from(sorted(column_values)).flatmap(
        lambda datatype: st.tuples(st.just(datatype), st.lists(column_values[datatype], max_size=4))
    ),
    max_size=4,
)


@FUZZ
@given(
    columns=columns,
    binary=st.booleans(),
    ident=st.none() | st.text(max_size=4),
    parameters=st.dictionaries(
        st.text(max_size=4), st.lists(st.floats(allow_nan=False, allow_infinity=False)), max_size=2
    ),
)
def test_fuzz_list_columns_render_as_arrays(
    columns: list[tuple[str, list]], binary: bool, ident: str | None, parameters: dict
) -> None:
    """A list column renders the bytes an array of the same values does."""
    named = [(f"out{i}", datatype, values) for i, (datatype, values) in enumerate(columns)]
    if not binary:  # JSON holds BYTES only as UTF-8 text
        named = [
            (n, d, [v.decode("latin-1").encode() for v in values] if d == "BYTES" else values)
            for n, d, values in named
        ]
    request = InferRequest(None, (), binary_outputs=binary)
    arrays = tuple(
        InferTensor(n, d, (len(v),), np.array(v, dtype=DATATYPES[d]).reshape(len(v))) for n, d, v in named
    )
    lists = tuple(InferTensor.column(n, d, v) for n, d, v in named)
    expected = render_infer_response(InferResponse("m", arrays, ident, "1", parameters), request)
    assert render_infer_response(InferResponse("m", lists, ident, "1", parameters), request) == expected


json_parameters = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(parameters=st.dictionaries(st.text(max_size=8), json_parameters, max_size=4), binary=st.booleans())
def test_fuzz_parameters_read_back_exactly(parameters: dict, binary: bool) -> None:
    """Free-form parameters that JSON and 64 bits can hold come back as they were sent."""
    parsed = round_trip(
        InferRequest("r", (InferTensor.of("x", np.zeros(2, np.float32)),), parameters=parameters), binary
    )
    assert parsed.parameters == parameters


def _as_orjson_reads(value: object) -> object:
    """What orjson makes of a value json.dumps wrote: integers past 64 bits become floats."""
    if isinstance(value, dict):
        return {k: _as_orjson_reads(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_orjson_reads(v) for v in value]
    return float(value) if type(value) is int and not -(2**63) <= value < 2**64 else value


@FUZZ
@given(doc=json_values)
def test_fuzz_what_the_standard_library_writes_is_read_or_refused_as_malformed(doc: object) -> None:
    """Lone surrogates and Infinity (json.dumps writes both) are malformed JSON; the rest reads
    back, integers past 64 bits as floats."""
    raw = json.dumps({"inputs": [tensor()], "parameters": {"v": doc}}).encode()
    try:
        json.dumps(doc, ensure_ascii=False, allow_nan=False).encode()
    except (UnicodeEncodeError, ValueError):  # a lone surrogate; an infinity
        with pytest.raises(ProtocolError, match="malformed"):
            parse_infer_request(raw)
    else:
        assert parse_infer_request(raw).parameters["v"] == _as_orjson_reads(doc)


def test_null_optional_fields_read_as_absent() -> None:
    # KServe's model server writes "parameters": null and "versions": null
    body = json_body(inputs=[tensor()], parameters=None, id=None)
    request = parse_infer_request(body)
    assert request.id is None and dict(request.parameters) == {}
