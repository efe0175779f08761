"""Open Inference Protocol (KServe V2) payloads: parse bodies into NumPy tensors, render them back.

Both directions are here because both ends of the wire are ours: a worker parses requests and
renders responses; the front end renders requests and parses responses. Two body layouts:

* JSON: ``{"id", "parameters", "inputs": [{"name", "shape", "datatype", "data"}], "outputs"}``,
  where ``data`` is the tensor in row-major order, flat or nested.
* binary tensor extension: the ``Inference-Header-Content-Length`` HTTP header gives the length
  of a leading JSON header; the raw little-endian tensor bytes follow, in tensor order. A tensor
  sent this way has ``parameters.binary_data_size`` instead of ``data``. BYTES elements are each
  a 4-byte little-endian length then the bytes. A client asks for binary outputs per output
  (``"parameters": {"binary_data": true}``) or for all (``"parameters": {"binary_data_output": true}``).

Parsing is strict, because a lenient parser turns client bugs into wrong answers: unknown fields,
element counts that disagree with the shape, values that do not fit the datatype (including NaN
and Inf in float tensors) and oversize bodies are all refused with a message that says how to fix
the request. Every failure is a :class:`ProtocolError` (or :class:`PayloadTooLargeError`).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, cast

import numpy as np
import orjson

from collage_inference import __version__
from collage_inference.config import Limits
from collage_inference.errors import PayloadTooLargeError, ProtocolError
from collage_inference.serving.kept import Kept

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

# Wire datatypes and their little-endian NumPy dtypes; BYTES elements are Python ``bytes``.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_DATATYPE_OF_KIND = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items() if name != "BYTES"}
# struct codes of the fixed-size datatypes (little-endian), for values held as Python lists
_STRUCT_CODES = {
    "BOOL": "?", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q", "INT8": "b",
    "INT16": "h", "INT32": "i", "INT64": "q", "FP16": "e", "FP32": "f", "FP64": "d",
}  # fmt: skip

_REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs"})
_RESPONSE_FIELDS = frozenset({"model_name", "model_version", "id", "parameters", "outputs"})
_TENSOR_FIELDS = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_REQUEST_FIELDS = frozenset({"name", "parameters"})


SERVER_METADATA: dict[str, Any] = {
    "name": "collage-inference",
    "version": __version__,
    "extensions": ["binary_tensor_data"],
}  # what ``GET /v2`` answers on every server of the project


@dataclass(frozen=True, eq=False)
class InferTensor:
    """One named tensor; ``data`` already has ``shape`` and the datatype's NumPy dtype.

    Equality is identity: comparing tensors element-wise is a test's job, not a dataclass's.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> InferTensor:
        """Wrap a NumPy array, picking the wire datatype from its dtype."""
        array = np.asarray(array)
        if array.dtype.kind in "OSU":
            datatype = "BYTES"
            data = np.array([_as_bytes(v) for v in array.ravel()], dtype=object).reshape(array.shape)
        else:
            datatype = _DATATYPE_OF_KIND.get((array.dtype.kind, array.dtype.itemsize), "")
            if not datatype:
                raise ProtocolError(f"tensor {name!r}: NumPy dtype {array.dtype} has no V2 datatype")
            data = array.astype(DATATYPES[datatype], copy=False)
        return cls(name, datatype, array.shape, data)


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for; ``binary`` None means "as the request-level default"."""

    name: str
    binary: bool | None = None


@dataclass(frozen=True)
class InferRequest:
    """A parsed inference request. No ``outputs_requested`` means "every output, as JSON"
    unless ``binary_outputs`` (the request-level ``binary_data_output``) says otherwise."""

    id: str | None
    inputs: tuple[InferTensor, ...]
    outputs_requested: tuple[RequestedOutput, ...] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)
    binary_outputs: bool = False

    def wants_binary(self, output: str) -> bool:
        """Whether ``output`` should be rendered as raw bytes in the response."""
        for requested in self.outputs_requested:
            if requested.name == output and requested.binary is not None:
                return requested.binary
        return self.binary_outputs


@dataclass(frozen=True)
class InferResponse:
    """A model's answer: named output tensors and free-form ``parameters`` (timings, kind)."""

    model_name: str
    outputs: tuple[InferTensor, ...]
    id: str | None = None
    model_version: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def output(self, name: str) -> InferTensor:
        """The output tensor called ``name``."""
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor
        names = ", ".join(t.name for t in self.outputs) or "none"
        raise ProtocolError(f"the response has no output {name!r} (it has: {names})")


# --- parsing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RequestTemplate:
    """What a request's JSON header says, checked: everything but the binary tensor bytes."""

    id: str | None
    layouts: tuple[_Layout, ...]
    elements: int
    outputs_requested: tuple[RequestedOutput, ...]
    parameters: Mapping[str, Any]
    binary_outputs: bool


# Clients send the same JSON header with every request of a shape (binary tensors keep the
# pixels out of it), so the checked header is kept, keyed by its bytes: a request whose header
# was seen skips JSON and its checks, and only its tensor bytes are read.
_MAX_TEMPLATES = 256
_MAX_TEMPLATE_BYTES = 4096
_TEMPLATES: Kept[bytes, _RequestTemplate] = Kept(_MAX_TEMPLATES)


def parse_infer_request(
    body: bytes, header_length: str | int | None = None, limits: Limits = Limits()
) -> InferRequest:
    """Parse a request body; ``header_length`` is the ``Inference-Header-Content-Length`` header."""
    header, binary = _split_header(body, header_length, limits)
    template = _TEMPLATES.get(header)
    if template is None:
        template = _request_template(_decode_header(header, header_length), limits)
        if len(header) <= _MAX_TEMPLATE_BYTES and all(t.data is None for t in template.layouts):
            _TEMPLATES.keep(header, template)
    _check_elements(template.elements, limits, "the request")
    return InferRequest(
        id=template.id,
        inputs=_fill_tensors(template.layouts, binary, "input"),
        outputs_requested=template.outputs_requested,
        parameters=template.parameters,
        binary_outputs=template.binary_outputs,
    )


def _request_template(doc: dict, limits: Limits) -> _RequestTemplate:
    _check_fields(doc, _REQUEST_FIELDS, "the request")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError('the request needs a non-empty "inputs" list of tensors')
    parameters = _parameters(doc, "the request")
    binary_outputs = parameters.get("binary_data_output", False)
    if not isinstance(binary_outputs, bool):
        raise ProtocolError("parameters.binary_data_output must be true or false")
    request_id = _optional_str(doc, "id", "the request")
    layouts, elements = _tensor_layouts(inputs, limits, "input")
    return _RequestTemplate(
        request_id,
        layouts,
        elements,
        _parse_requested_outputs(doc.get("outputs", [])),
        MappingProxyType(parameters),  # shared by every request with this header: read-only
        binary_outputs,
    )


def parse_infer_response(
    body: bytes, header_length: str | int | None = None, limits: Limits = Limits()
) -> InferResponse:
    """Parse a response body (what the front end does with a worker's answer)."""
    doc, binary = _split_body(body, header_length, limits)
    _check_fields(doc, _RESPONSE_FIELDS, "the response")
    outputs = doc.get("outputs")
    if not isinstance(outputs, list):
        raise ProtocolError('the response needs an "outputs" list of tensors')
    name = doc.get("model_name")
    if not isinstance(name, str):
        raise ProtocolError('the response needs a "model_name" string')
    layouts, elements = _output_layouts(outputs, limits)
    _check_elements(elements, limits, "the response")
    return InferResponse(
        model_name=name,
        outputs=_fill_tensors(layouts, binary, "output"),
        id=_optional_str(doc, "id", "the response"),
        model_version=_optional_str(doc, "model_version", "the response"),
        parameters=_parameters(doc, "the response"),
    )


# A worker answers every call of a shape with the same outputs part; only the parameters (its
# timings) change. So checked binary output layouts are kept, keyed by that part's JSON.
_OUTPUT_LAYOUTS: Kept[bytes, tuple[tuple[_Layout, ...], int]] = Kept(_MAX_TEMPLATES)


def _output_layouts(outputs: list, limits: Limits) -> tuple[tuple[_Layout, ...], int]:
    """The checked layouts of a response's ``outputs`` entries, and the elements they hold."""
    try:
        key = orjson.dumps(outputs)
    except TypeError:  # what orjson cannot write is not worth keeping
        return _tensor_layouts(outputs, limits, "output")
    kept = _OUTPUT_LAYOUTS.get(key)
    if kept is None:
        kept = _tensor_layouts(outputs, limits, "output")
        # orjson writes infinities as null, so a key holding null may stand for two documents.
        if b"null" not in key and len(key) <= _MAX_TEMPLATE_BYTES and all(t.data is None for t in kept[0]):
            _OUTPUT_LAYOUTS.keep(key, kept)
    return kept


def _split_body(body: bytes, header_length: str | int | None, limits: Limits) -> tuple[dict, memoryview]:
    """The JSON document and the binary tail (empty for a pure-JSON body)."""
    header, binary = _split_header(body, header_length, limits)
    return _decode_header(header, header_length), binary


def _split_header(body: bytes, header_length: str | int | None, limits: Limits) -> tuple[bytes, memoryview]:
    """The JSON header's bytes and the binary tail (empty for a pure-JSON body)."""
    if len(body) > limits.max_body_bytes:
        raise PayloadTooLargeError(
            f"the body has {len(body)} bytes, more than the limit of {limits.max_body_bytes}; "
            "send fewer or smaller images per request"
        )
    if header_length is None:
        size = len(body)
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 <= size <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH}={size} lies outside the body of {len(body)} bytes")
    return bytes(body[:size]), memoryview(body)[size:]


def _decode_header(header: bytes, header_length: str | int | None) -> dict:
    try:
        doc = _decode_json(header)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        hint = f" (is {HEADER_LENGTH} right?)" if header_length is not None else ""
        raise ProtocolError(f"the JSON header is malformed{hint}: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"the JSON header must be an object, got {type(doc).__name__}")
    return doc


def _reject_constant(name: str) -> float:
    raise ProtocolError(f"{name} is not valid JSON; send only finite numbers")


# Built once: json.loads and json.dumps with options build a new decoder or encoder per call.
_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_JSON_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


# Every request is parsed and answered once at a worker and once at a front end, so JSON speed
# is latency: orjson reads and writes these small documents several times faster than the
# standard library. The rules stay the standard library's, strict as above, in both directions.


# orjson reads an integer past 64 bits as a float, where the standard decoder keeps it exact;
# every such integer has at least 19 digits, so a document with a run of 19 goes the slow way.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def _decode_json(raw: bytes) -> Any:
    """orjson's speed with the standard decoder's rules: what orjson refuses (NaN, lone
    surrogates, bad UTF-8) or would read differently (integers past 64 bits) goes to the
    standard decoder, which accepts it or says in its own words what is wrong."""
    if _LONG_DIGITS.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return _JSON_DECODER.decode(raw.decode())


def _encode_json(doc: dict[str, Any]) -> bytes:
    """The compact JSON of ``doc``. Callers refuse NaN and infinities first (orjson would write
    null); what orjson cannot encode (integers past 64 bits, NumPy scalars, keys that are not
    strings) gets the standard encoder's result or its error."""
    try:
        return orjson.dumps(doc)
    except TypeError:
        return _JSON_ENCODER.encode(doc).encode()


def _check_json_floats(value: Any, where: str) -> None:
    """Refuse NaN and infinities anywhere in free-form ``parameters``: JSON cannot hold them."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError(f"cannot render the payload as JSON: {where} hold {value}")
    elif isinstance(value, dict):
        for item in value.values():
            _check_json_floats(item, where)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_json_floats(item, where)


def _check_fields(doc: dict, allowed: frozenset[str], where: str) -> None:
    if doc.keys() <= allowed:
        return
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise ProtocolError(
            f"{where} has unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


def _parameters(doc: dict, where: str) -> dict[str, Any]:
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ProtocolError(f'"parameters" of {where} must be an object')
    return parameters


def _optional_str(doc: dict, key: str, where: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise ProtocolError(f'"{key}" of {where} must be a string, got {type(value).__name__}')
    return value


def _parse_requested_outputs(entries: Any) -> tuple[RequestedOutput, ...]:
    if not isinstance(entries, list):
        raise ProtocolError('"outputs" must be a list of {"name": ..., "parameters": ...} objects')
    requested: list[RequestedOutput] = []
    for i, entry in enumerate(entries):
        where = f"outputs[{i}]"
        if not isinstance(entry, dict):
            raise ProtocolError(f"{where} must be an object with a name")
        _check_fields(entry, _OUTPUT_REQUEST_FIELDS, where)
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f'{where} needs a non-empty "name" string')
        if any(r.name == name for r in requested):
            raise ProtocolError(f"output {name!r} is requested twice")
        binary = _parameters(entry, where).get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise ProtocolError(f"{where}.parameters.binary_data must be true or false")
        requested.append(RequestedOutput(name, binary))
    return tuple(requested)


@dataclass(frozen=True, slots=True)
class _Layout:
    """One tensor as its JSON entry describes it: ``data`` when the JSON holds the values,
    else ``size`` bytes of the binary tail."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    count: int
    parameters: Mapping[str, Any]
    size: int | None
    data: np.ndarray | None


def _tensor_layouts(entries: list, limits: Limits, role: str) -> tuple[tuple[_Layout, ...], int]:
    """Every tensor entry checked, and the elements they hold in all."""
    layouts: list[_Layout] = []
    total = 0
    for i, entry in enumerate(entries):
        where = f"{role}s[{i}]"
        if not isinstance(entry, dict):
            raise ProtocolError(f"{where} must be a tensor object with name, shape, datatype and data")
        _check_fields(entry, _TENSOR_FIELDS, where)
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f'{where} needs a non-empty "name" string')
        where = f"{role} {name!r}"
        if any(t.name == name for t in layouts):
            raise ProtocolError(f"{where} appears twice")
        datatype = entry.get("datatype")
        if datatype not in DATATYPES:
            raise ProtocolError(f"{where}: unknown datatype {datatype!r}; use one of {', '.join(DATATYPES)}")
        shape = _parse_shape(entry.get("shape"), where)
        count = math.prod(shape)
        total += count
        _check_elements(total, limits, where)
        parameters = _parameters(entry, where)
        size = parameters.get("binary_data_size")
        data = None
        if size is None:
            if "data" not in entry:
                raise ProtocolError(f'{where} needs "data" or parameters.binary_data_size')
            data = _json_data(entry["data"], datatype, count, where)
        elif "data" in entry:
            raise ProtocolError(f'{where} has both "data" and binary_data_size; send one')
        elif type(size) is not int or size < 0:
            raise ProtocolError(f"{where}: binary_data_size must be a non-negative integer")
        layouts.append(_Layout(name, datatype, shape, count, parameters, size, data))
    return tuple(layouts), total


def _check_elements(total: int, limits: Limits, where: str) -> None:
    if total > limits.max_elements:
        raise PayloadTooLargeError(
            f"{where}: the tensors hold {total} elements, more than the limit of {limits.max_elements}"
        )


def _fill_tensors(layouts: tuple[_Layout, ...], binary: memoryview, role: str) -> tuple[InferTensor, ...]:
    """The tensors, binary ones read from ``binary`` in order; every byte must belong to one."""
    tensors: list[InferTensor] = []
    offset = 0
    for t in layouts:
        data = t.data
        if data is None:
            size = cast(int, t.size)
            if offset + size > len(binary):
                raise ProtocolError(
                    f"{role} {t.name!r}: binary_data_size={size} runs past the {len(binary)} binary "
                    f"bytes after the JSON header (offset {offset})"
                )
            data = _binary_data(
                binary[offset : offset + size], t.datatype, t.shape, t.count, f"{role} {t.name!r}"
            )
            offset += size
        else:
            data = data.reshape(t.shape)
        tensors.append(InferTensor(t.name, t.datatype, t.shape, data, t.parameters))
    if offset != len(binary):
        raise ProtocolError(
            f"{len(binary) - offset} bytes after the JSON header belong to no tensor; "
            "binary_data_size values must add up to the binary part"
        )
    return tuple(tensors)


def _parse_shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f'{where}: "shape" must be a list of non-negative integers, got {shape!r}')
    return tuple(shape)


def _json_data(data: Any, datatype: str, count: int, where: str) -> np.ndarray:
    """A flat array from JSON ``data`` (flat or nested, row-major), checked against the datatype."""
    if not isinstance(data, list):
        data = [data]  # a scalar tensor may be sent bare
    if datatype == "BYTES":
        flat = _flatten(data, where)
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(f"{where}: BYTES data in JSON must be strings")
        try:
            values = np.array([v.encode() for v in flat], dtype=object)
        except UnicodeEncodeError:
            raise ProtocolError(
                f"{where}: BYTES strings must be valid Unicode, not lone surrogates"
            ) from None
    else:
        try:
            values = np.asarray(data).ravel()
        except (ValueError, TypeError, RecursionError):
            raise ProtocolError(
                f"{where}: data must be a flat or rectangular nested list of numbers"
            ) from None
        if datatype == "UINT64" and values.dtype.kind in "fO":
            values = _uint64(data, where)  # values past INT64 made NumPy fall back to float or object
        values = _checked_cast(values, datatype, where)
    if values.size != count:
        raise ProtocolError(f"{where}: the shape holds {count} elements but data has {values.size}")
    return values


def _uint64(data: list, where: str) -> np.ndarray:
    flat = _flatten(data, where)
    if not all(type(v) is int for v in flat):
        raise ProtocolError(f"{where}: UINT64 data must be integers")
    try:
        return np.array(flat, dtype=np.uint64)
    except OverflowError:
        raise ProtocolError(f"{where}: UINT64 values must lie in [0, {2**64 - 1}]") from None


def _flatten(data: list, where: str) -> list:
    flat: list = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                if len(stack) > 32:
                    raise ProtocolError(f"{where}: data is nested more than 32 levels deep")
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _checked_cast(values: np.ndarray, datatype: str, where: str) -> np.ndarray:
    """Cast JSON numbers to the datatype, refusing anything that would change a value's meaning."""
    dtype = DATATYPES[datatype]
    kind = values.dtype.kind
    if values.size == 0:
        return values.astype(dtype)
    if datatype == "BOOL":
        if kind != "b":
            raise ProtocolError(f"{where}: BOOL data must be true/false")
        return values
    if dtype.kind in "iu":
        if kind not in "iu":
            raise ProtocolError(f"{where}: {datatype} data must be integers, got {_kind_name(kind)}")
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise ProtocolError(f"{where}: {datatype} values must lie in [{info.min}, {info.max}]")
        return values.astype(dtype)
    if kind not in "iuf":
        raise ProtocolError(f"{where}: {datatype} data must be numbers, got {_kind_name(kind)}")
    with np.errstate(over="ignore"):
        cast = values.astype(dtype)
    _check_finite(cast, where)
    return cast


def _kind_name(kind: str) -> str:
    return {"b": "booleans", "f": "floats", "U": "strings", "O": "mixed or out-of-range values"}.get(
        kind, "non-numbers"
    )


# A few values (a classifier's scores, checked at every answer) are checked in Python: on a
# server that idles between requests, NumPy's first calls after a pause cost tens of
# microseconds each, and a tensor this small is done sooner without them.
_SMALL = 64  # elements
_NOT_FINITE = "NaN or infinite values (or values too large for the datatype)"


def _check_finite(values: np.ndarray, where: str) -> None:
    """``values``: 1-D."""
    small = values.size <= _SMALL
    if not (all(map(math.isfinite, values.tolist())) if small else np.isfinite(values).all()):
        raise ProtocolError(f"{where}: {_NOT_FINITE}")


def _check_finite_raw(raw: memoryview, datatype: str, count: int, where: str) -> None:
    """As :func:`_check_finite`, on the little-endian bytes of ``count`` floats."""
    if count > _SMALL:
        _check_finite(np.frombuffer(raw, DATATYPES[datatype]), where)
    elif not all(map(math.isfinite, struct.unpack(f"<{count}{_STRUCT_CODES[datatype]}", raw))):
        raise ProtocolError(f"{where}: {_NOT_FINITE}")


def _binary_data(
    raw: memoryview, datatype: str, shape: tuple[int, ...], count: int, where: str
) -> np.ndarray:
    """The tensor of ``shape`` held in ``raw``, checked: a view of the bytes, not a copy."""
    if datatype == "BYTES":
        return _parse_bytes_elements(raw, count, where).reshape(shape)
    dtype = DATATYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(
            f"{where}: {count} {datatype} elements need {count * dtype.itemsize} bytes, "
            f"binary_data_size says {len(raw)}"
        )
    if datatype == "BOOL":
        values = np.frombuffer(raw, np.uint8)
        if values.size and values.max() > 1:
            raise ProtocolError(f"{where}: BOOL bytes must be 0 or 1")
        return values.view(np.bool_).reshape(shape)
    if dtype.kind == "f":
        _check_finite_raw(raw, datatype, count, where)
    return np.ndarray(shape, dtype, raw)  # one call: shaped at once


def _parse_bytes_elements(raw: memoryview, count: int, where: str) -> np.ndarray:
    if 4 * count > len(raw):
        raise ProtocolError(
            f"{where}: {count} BYTES elements need at least {4 * count} bytes, got {len(raw)}"
        )
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise ProtocolError(f"{where}: BYTES data ends before element {i} of {count}")
        n = int.from_bytes(raw[pos : pos + 4], "little")
        pos += 4
        if pos + n > len(raw):
            raise ProtocolError(f"{where}: BYTES element {i} claims {n} bytes but the data ends first")
        out[i] = bytes(raw[pos : pos + n])
        pos += n
    if pos != len(raw):
        raise ProtocolError(f"{where}: {len(raw) - pos} bytes left over after {count} BYTES elements")
    return out


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


# --- rendering -----------------------------------------------------------------------------------


def render_infer_request(request: InferRequest, binary_inputs: bool = True) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a request; binary inputs skip JSON number formatting on both ends."""
    doc: dict[str, Any] = {}
    if request.id is not None:
        doc["id"] = request.id
    parameters = dict(request.parameters)
    if request.binary_outputs:
        parameters["binary_data_output"] = True
    if parameters:
        _check_json_floats(parameters, "the request's parameters")
        doc["parameters"] = parameters
    tail: list[bytes] = []
    doc["inputs"] = [_render_tensor(t, binary_inputs, tail) for t in request.inputs]
    if request.outputs_requested:
        doc["outputs"] = [
            {"name": r.name, **({"parameters": {"binary_data": r.binary}} if r.binary is not None else {})}
            for r in request.outputs_requested
        ]
    return _render_body(doc, tail)


def render_infer_response(
    response: InferResponse, request: InferRequest | None = None
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a response; outputs are binary where ``request`` asked for that."""
    doc: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        doc["model_version"] = response.model_version
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        _check_json_floats(response.parameters, "the response's parameters")
        doc["parameters"] = dict(response.parameters)
    tail: list[bytes] = []
    doc["outputs"] = [
        _render_tensor(t, request is not None and request.wants_binary(t.name), tail)
        for t in response.outputs
    ]
    return _render_body(doc, tail)


def render_column_response(
    model_name: str,
    columns: Sequence[tuple[str, str, list]],
    request: InferRequest | None = None,
    *,
    model_version: str | None = None,
    id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """What :func:`render_infer_response` renders, byte for byte, for a response whose outputs
    are 1-D columns held as Python lists, ``(name, datatype, values)``: one value per image,
    as a classifier answers. It builds no arrays or tensors, which is most of the cost of
    rendering the small answer a front end sends with every request. BYTES values are
    ``bytes``."""
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if id is not None:
        doc["id"] = id
    if parameters:
        _check_json_floats(parameters, "the response's parameters")
        doc["parameters"] = dict(parameters)
    tail: list[bytes] = []
    outputs = []
    for name, datatype, values in columns:
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": [len(values)]}
        if request is not None and request.wants_binary(name):
            raw = _pack_column(name, datatype, values)
            tail.append(raw)
            entry["parameters"] = {"binary_data_size": len(raw)}
        elif datatype == "BYTES":
            entry["data"] = _texts(name, values)
        elif datatype in ("FP16", "FP32"):  # rounded, as the array of that datatype would give them back
            code = f"<{len(values)}{_STRUCT_CODES[datatype]}"
            entry["data"] = list(struct.unpack(code, _pack_column(name, datatype, values)))
            _check_json_floats(entry["data"], f"output {name!r}")
        else:
            entry["data"] = list(values)
            if datatype == "FP64":
                _check_json_floats(entry["data"], f"output {name!r}")
        outputs.append(entry)
    doc["outputs"] = outputs
    return _render_body(doc, tail)


def _pack_column(name: str, datatype: str, values: list) -> bytes:
    """A column's binary layout: as :func:`_tensor_bytes` gives it for the same tensor."""
    if datatype == "BYTES":
        return _length_prefixed(values)
    try:
        return struct.pack(f"<{len(values)}{_STRUCT_CODES[datatype]}", *values)
    except (struct.error, OverflowError) as exc:
        raise ProtocolError(f"output {name!r} holds a value that is no {datatype}: {exc}") from None


def _render_tensor(tensor: InferTensor, binary: bool, tail: list[bytes]) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
    parameters = {k: v for k, v in tensor.parameters.items() if k != "binary_data_size"}
    if binary:
        raw = _tensor_bytes(tensor)
        tail.append(raw)
        parameters["binary_data_size"] = len(raw)
    elif tensor.datatype == "BYTES":
        entry["data"] = _texts(tensor.name, tensor.data.ravel())
    else:
        if tensor.data.dtype.kind == "f" and tensor.data.size and not np.isfinite(tensor.data).all():
            raise ProtocolError(f"cannot render the payload as JSON: tensor {tensor.name!r} holds NaN or inf")
        entry["data"] = tensor.data.ravel().tolist()
    if parameters:
        _check_json_floats(parameters, f"the parameters of tensor {tensor.name!r}")
        entry["parameters"] = parameters
    return entry


def _tensor_bytes(tensor: InferTensor) -> bytes:
    if tensor.datatype == "BYTES":
        return _length_prefixed(tensor.data.ravel())
    return np.ascontiguousarray(tensor.data, DATATYPES[tensor.datatype]).tobytes()


def _length_prefixed(values: Iterable[bytes]) -> bytes:
    """BYTES elements in the binary layout: each a 4-byte little-endian length, then the bytes."""
    return b"".join([len(v).to_bytes(4, "little") + v for v in values])


def _texts(name: str, values: Iterable[bytes]) -> list[str]:
    """BYTES elements as the strings JSON holds them in."""
    try:
        return [v.decode() for v in values]
    except UnicodeDecodeError:
        raise ProtocolError(f"tensor {name!r} holds non-UTF-8 bytes; request it as binary data") from None


def _render_body(doc: dict[str, Any], tail: list[bytes]) -> tuple[bytes, dict[str, str]]:
    try:
        header = _encode_json(doc)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"cannot render the payload as JSON: {exc}") from None
    if not tail:
        return header, {"Content-Type": JSON_CONTENT_TYPE}
    headers = {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(header))}
    return b"".join([header, *tail]), headers
