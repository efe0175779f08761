"""The front end over HTTP: KServe V2 for tools, ``/predict`` for curl, ``/metrics`` for Prometheus.

    python -m collage_inference.serving.api --scnn http://127.0.0.1:8001#scnn \\
        --collage http://127.0.0.1:8010#collage-3x3 --mode collage --grid 3 --port 8000

Clients send one image per request: a V2 infer call on the classifier model with a UINT8
tensor (H, W) or (H, W, C), or BYTES holding a PNG/JPEG (several images as a batch are split
into one request each), or ``POST /predict`` with the image file as the body (or as a
multipart field). Answers carry the label, class name, confidence, the ``source`` that
answered (primary, collage, replica) and timings. Worker metadata tells the front end the
class names and each collage model's grid and tile size, so it can front any V2 server that
publishes them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import sys
import warnings
from collections.abc import Awaitable, Mapping
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from PIL import Image

from collage_inference.errors import (
    CollageError,
    ConfigError,
    ModelNotFoundError,
    PayloadTooLargeError,
    ProtocolError,
    RequestTimeoutError,
    ServingError,
)
from collage_inference.serving.dispatch import HEADER_LENGTH, WorkerClient, WorkerPool
from collage_inference.serving.frontend import FrontEnd, FrontEndConfig
from collage_inference.serving.http import load_token, read_body, run, server_middlewares
from collage_inference.serving.modes import MODES, REISSUE_TARGETS, get_mode
from collage_inference.serving.protocol import (
    SERVER_METADATA,
    InferRequest,
    InferTensor,
    Limits,
    parse_infer_request,
    render_column_response,
)
from collage_inference.serving.server import FAST_ROUTES, FastRoutes, Payload, serve_app
from collage_inference.serving.types import Answer, DecoderPolicy

log = logging.getLogger("collage_inference.serving")
MAX_IMAGE_SIDE = 4096  # decoded images beyond this are refused: no decompression bombs
MAX_IMAGES_PER_CALL = 64
OUTPUT_NAMES = ("label", "class_name", "confidence", "source")
FRONTEND = web.AppKey("frontend", FrontEnd)
MODEL_NAME = web.AppKey("model_name", str)
LIMITS = web.AppKey("limits", Limits)


# --- payloads --------------------------------------------------------------------------------


def parse_image_bytes(data: bytes) -> np.ndarray:
    """A PNG/JPEG file to uint8 (H, W, C), refusing huge or broken images with a clear 4xx."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if max(im.size) > MAX_IMAGE_SIDE:
                    width, height = im.size
                    raise PayloadTooLargeError(
                        f"image of {width}x{height} pixels exceeds {MAX_IMAGE_SIDE} per side; resize it"
                    )
                im.load()
                array = np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16", "I") else "RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLargeError(f"image refused as a decompression bomb: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ProtocolError(f"the image does not decode as PNG or JPEG ({exc})") from exc
    return array[:, :, None] if array.ndim == 2 else array


def images_from_tensor(tensor: InferTensor) -> list[np.ndarray]:
    """One uint8 (H, W, C) image per request from a V2 input tensor."""
    data = tensor.data
    if tensor.datatype == "BYTES":
        return [parse_image_bytes(bytes(item)) for item in data.reshape(-1)]
    if tensor.datatype != "UINT8":
        raise ProtocolError(
            f"input {tensor.name!r} is {tensor.datatype}; send UINT8 pixels (H, W) or (H, W, C), "
            "or BYTES holding a PNG/JPEG file"
        )
    if data.ndim == 2:
        return [data[:, :, None]]
    if data.ndim == 3 and data.shape[2] in (1, 3):
        return [data]
    if data.ndim == 4 and data.shape[3] in (1, 3):
        return list(data)
    raise ProtocolError(
        f"input {tensor.name!r} has shape {list(data.shape)}; send (H, W), (H, W, C) or (N, H, W, C) "
        "with C = 1 or 3"
    )


def _check_side(image: np.ndarray) -> np.ndarray:
    if image.shape[0] < 1 or image.shape[1] < 1 or max(image.shape[:2]) > MAX_IMAGE_SIDE:
        raise ProtocolError(f"image sides must lie in 1..{MAX_IMAGE_SIDE}, got {image.shape[:2]}")
    return np.ascontiguousarray(image)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


def answer_json(answer: Answer) -> dict[str, Any]:
    return {
        "label": answer.label,
        "class_name": answer.class_name,
        "confidence": round(answer.confidence, 6),
        "source": str(answer.source),
        "latency_ms": round(answer.latency * 1e3, 3),
        "worker": answer.worker_id,
        "timings_ms": {k: round(v * 1e3, 3) for k, v in answer.timings.items()},
    }


# --- what the endpoints answer, framework-neutral ---------------------------------------------
# Bytes and headers in, payload and headers out: the aiohttp handlers below and the Ray Serve
# ingress (serving/ray/ingress.py) both call these, so both transports answer alike.


def submit_images(frontend: FrontEnd, images: list[np.ndarray]) -> Awaitable[list[Answer]]:
    """Admit each image as its own request now (their worker calls go out before this
    returns); the awaitable gives their answers."""
    if not images or len(images) > MAX_IMAGES_PER_CALL:
        raise ProtocolError(f"send between 1 and {MAX_IMAGES_PER_CALL} images per call, got {len(images)}")
    checked = [_check_side(image) for image in images]
    futures: list[asyncio.Future[Answer]] = []
    try:
        for image in checked:
            futures.append(frontend.submit(image))
    except Exception:  # refused part way (429): those admitted are answered but not awaited
        for future in futures:
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise
    return _gathered(futures)


async def _gathered(futures: list[asyncio.Future[Answer]]) -> list[Answer]:
    if len(futures) == 1:  # the common case, without gather's own future
        return [await futures[0]]
    return list(await asyncio.gather(*futures))


def check_model(name: str, model_name: str) -> None:
    """404 unless ``name`` (from the URL) is the model this front end serves."""
    if name != model_name:
        raise ModelNotFoundError(f"unknown model {name!r}; this front end serves {model_name!r}")


def infer_payload(
    frontend: FrontEnd, model_name: str, limits: Limits, body: bytes, header_length: str | None
) -> Awaitable[Payload]:
    """A V2 infer call: the request body (and its binary header length) to the response body
    and headers. The request is checked and its worker calls are sent before this returns
    (a bad request raises here); the awaitable renders the answer."""
    parsed = parse_infer_request(body, header_length, limits)
    if len(parsed.inputs) != 1:
        raise ProtocolError(f"send exactly one input tensor (the image), got {len(parsed.inputs)}")
    wanted = {r.name for r in parsed.outputs_requested}
    if wanted - set(OUTPUT_NAMES):
        raise ProtocolError(f"unknown outputs {sorted(wanted)}; have {', '.join(OUTPUT_NAMES)}")
    answers = submit_images(frontend, images_from_tensor(parsed.inputs[0]))
    return _infer_response(answers, model_name, parsed, wanted)


async def _infer_response(
    pending: Awaitable[list[Answer]], model_name: str, parsed: InferRequest, wanted: set[str]
) -> Payload:
    answers = await pending
    columns = (
        ("label", "INT64", [a.label for a in answers]),
        ("class_name", "BYTES", [a.class_name.encode() for a in answers]),
        ("confidence", "FP32", [a.confidence for a in answers]),
        ("source", "BYTES", [a.source.encode() for a in answers]),
    )
    # Where each answer's time went: admission to answer, and the timings of the call that
    # answered it (worker queue and compute, the front end's round trip, a cell held for its primary).
    parameters: dict[str, list[float | None]] = {"latency_ms": [round(a.latency * 1e3, 3) for a in answers]}
    for key in sorted({k for a in answers for k in a.timings}):
        parameters[f"{key}_ms"] = [_ms(a.timings.get(key)) for a in answers]
    return render_column_response(
        model_name,
        [c for c in columns if not wanted or c[0] in wanted],
        parsed,
        model_version="1",
        id=parsed.id,
        parameters=parameters,
    )


async def predict_payload(frontend: FrontEnd, data: bytes) -> dict[str, Any]:
    """``POST /predict``: one image file to its answer as JSON."""
    if not data:
        raise ProtocolError("empty body; send the image file, e.g. curl --data-binary @image.png")
    (answer,) = await submit_images(frontend, [parse_image_bytes(bytes(data))])
    return answer_json(answer)


def model_metadata_doc(frontend: FrontEnd, model_name: str) -> dict[str, Any]:
    """The V2 model metadata of the classifier the front end serves."""
    return {
        "name": model_name,
        "versions": ["1"],
        "platform": "collage-inference",
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "class_name", "datatype": "BYTES", "shape": [-1]},
            {"name": "confidence", "datatype": "FP32", "shape": [-1]},
            {"name": "source", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {
            "mode": frontend.mode.name,
            "grid": frontend.config.grid,
            "labels": list(frontend.class_names),
            "scnn_workers": len(frontend.scnn),
            "collage_workers": sum(len(p) for p in frontend.collage.values()),
        },
    }


def metrics_text(frontend: FrontEnd) -> str:
    """The Prometheus exposition text: the front end's counters and per-worker gauges."""
    gauges = [
        ("collage_requests_in_flight", "Requests admitted and not yet answered", "", frontend.in_flight),
        ("collage_decoder_late_replies", "Replies dropped because their request was answered",
         "", sum(frontend.decoder.stats.late.values())),
    ]  # fmt: skip
    for pool in (frontend.scnn, *frontend.collage.values()):
        for w in pool.workers:
            labels = f'worker="{w.id}",url="{w.url}"'
            gauges.append(("collage_worker_up", "1 when the worker is taking requests", labels, int(w.up)))
            gauges.append(
                ("collage_worker_outstanding", "Calls in flight to the worker", labels, w.outstanding)
            )
            gauges.append(("collage_worker_calls", "Calls sent to the worker", labels, pool.picked[w.id]))
    return frontend.metrics.render(gauges)


def readiness(frontend: FrontEnd) -> tuple[dict[str, Any], int]:
    """``/v2/health/ready``: ready while an s-CNN worker is up; ``degraded`` when the collage
    path is down (requests are still answered, by the primaries alone)."""
    ok = frontend.ready
    degraded = frontend.mode.collage and not all(p.ready for p in frontend.collage.values())
    return {"ready": ok, "degraded": degraded}, 200 if ok else 503


def count_status(frontend: FrontEnd, status: int) -> None:
    """Count a refused request (4xx but 429, which is load shedding) in the front end's metrics."""
    if 400 <= status < 500 and status != 429:
        frontend.metrics.bad_requests += 1


# --- aiohttp handlers ------------------------------------------------------------------------


def _check_model(request: web.Request) -> None:
    check_model(request.match_info["name"], request.app[MODEL_NAME])


async def _read_body(request: web.Request) -> bytes:
    return await read_body(request, request.app[LIMITS])


async def _read_multipart_file(request: web.Request) -> bytes:
    """The first file of a multipart body, within the same size and time limits as a body."""
    limits = request.app[LIMITS]
    try:
        async with asyncio.timeout(limits.body_timeout):
            part = await (await request.multipart()).next()
            if part is None:
                raise ProtocolError("the multipart body holds no file; send -F file=@image.png")
            data = bytearray()
            while chunk := await part.read_chunk():
                data += chunk
                if len(data) > limits.max_body_bytes:
                    raise PayloadTooLargeError(f"the file exceeds the limit of {limits.max_body_bytes} bytes")
    except TimeoutError:
        raise RequestTimeoutError(f"the body took longer than {limits.body_timeout:g}s to arrive") from None
    return bytes(data)


async def infer(request: web.Request) -> web.Response:
    _check_model(request)
    body = await _read_body(request)
    payload, headers = await infer_payload(
        request.app[FRONTEND], request.app[MODEL_NAME], request.app[LIMITS], body,
        request.headers.get(HEADER_LENGTH),
    )  # fmt: skip
    return web.Response(body=payload, headers=headers)


async def predict(request: web.Request) -> web.Response:
    if request.content_type.startswith("multipart/"):
        data = await _read_multipart_file(request)
    else:
        data = await _read_body(request)
    return web.json_response(await predict_payload(request.app[FRONTEND], data))


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    doc, status = readiness(request.app[FRONTEND])
    return web.json_response(doc, status=status)


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response(SERVER_METADATA)


async def model_metadata(request: web.Request) -> web.Response:
    _check_model(request)
    return web.json_response(model_metadata_doc(request.app[FRONTEND], request.app[MODEL_NAME]))


async def model_ready(request: web.Request) -> web.Response:
    _check_model(request)
    ok = request.app[FRONTEND].ready
    return web.json_response({"name": request.app[MODEL_NAME], "ready": ok}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    text = metrics_text(request.app[FRONTEND])
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def move_worker(request: web.Request) -> web.Response:
    """``PUT /admin/workers/{id}`` with ``{"url": ...}``: a worker restarted at a new address."""
    try:
        url = (await request.json())["url"]
    except (ValueError, KeyError, TypeError):
        raise ProtocolError('send JSON {"url": "http://HOST:PORT"}') from None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ProtocolError(f"url must look like http://HOST:PORT, got {url!r}")
    request.app[FRONTEND].retarget(request.match_info["id"], url)
    return web.json_response({"worker": request.match_info["id"], "url": url})


@web.middleware
async def count_bad_requests(request: web.Request, handler) -> web.StreamResponse:
    response = await handler(request)
    count_status(request.app[FRONTEND], response.status)
    return response


def build_app(
    frontend: FrontEnd,
    model_name: str = "classifier",
    limits: Limits | None = None,
    token: str | None = None,
) -> web.Application:
    """The front end's aiohttp application; its lifecycle starts and drains the front end.
    With ``token``, every endpoint but the health checks wants ``Authorization: Bearer``."""
    limits = limits or Limits(max_body_bytes=16 * 2**20)
    app = web.Application(
        middlewares=[count_bad_requests, *server_middlewares(token)], client_max_size=limits.max_body_bytes
    )
    app[FRONTEND], app[MODEL_NAME], app[LIMITS] = frontend, model_name, limits
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.router.add_get(prefix, model_metadata)
        app.router.add_get(prefix + "/ready", model_ready)
        app.router.add_post(prefix + "/infer", infer)
    app.router.add_post("/predict", predict)
    app.router.add_get("/metrics", metrics)
    app.router.add_put("/admin/workers/{id}", move_worker)

    def fast_infer(body: bytes, headers: Mapping[str, str]) -> Awaitable[Payload]:
        return infer_payload(frontend, model_name, limits, body, headers.get(HEADER_LENGTH.lower()))

    paths = (f"/v2/models/{model_name}/infer", f"/v2/models/{model_name}/versions/1/infer")
    app[FAST_ROUTES] = FastRoutes(
        dict.fromkeys(paths, fast_infer), limits, token, on_status=lambda s: count_status(frontend, s)
    )

    async def lifecycle(app: web.Application):
        await frontend.start()
        yield
        await frontend.drain(timeout=5.0)
        await frontend.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


# --- building a front end from worker URLs -------------------------------------------------------


def parse_worker_arg(value: str) -> tuple[str, str]:
    """``URL#MODEL`` -> (url, model)."""
    url, sep, model = value.partition("#")
    if not sep or not url.startswith(("http://", "https://")) or not model:
        raise ConfigError(f"worker {value!r} must look like http://HOST:PORT#MODEL_NAME")
    return url, model


async def connect(
    config: FrontEndConfig,
    scnn: list[tuple[str, str]],
    collage: list[tuple[str, str]],
    session: aiohttp.ClientSession,
    token: str | None = None,
) -> FrontEnd:
    """Describe every worker (V2 model metadata) and build the front end over them."""
    if not scnn:
        raise ConfigError("give at least one s-CNN worker (--scnn URL#MODEL)")
    scnn_clients = [WorkerClient(f"scnn-{i}", u, m, session, token) for i, (u, m) in enumerate(scnn)]
    collage_clients = [WorkerClient(f"collage-{i}", u, m, session, token) for i, (u, m) in enumerate(collage)]
    infos = await asyncio.gather(*(w.describe() for w in scnn_clients + collage_clients))
    class_names = infos[0].labels
    pools: dict[int, list[WorkerClient]] = {}
    tiles: dict[int, int] = {}
    for client, info in zip(collage_clients, infos[len(scnn_clients) :], strict=True):
        if info.kind != "collage" or info.labels[: len(class_names)] != class_names:
            raise ConfigError(
                f"worker {client.url} serves {info.kind} {info.model}, not a matching collage model"
            )
        pools.setdefault(info.grid, []).append(client)
        tiles[info.grid] = info.image_size
    for client, info in zip(scnn_clients, infos[: len(scnn_clients)], strict=True):
        if info.kind != "scnn" or info.labels != class_names:
            raise ConfigError(f"worker {client.url} serves {info.kind} {info.model}, not a matching s-CNN")
    channels = infos[0].channels
    return FrontEnd(
        config,
        WorkerPool(scnn_clients),
        {g: WorkerPool(p) for g, p in pools.items()},
        class_names,
        tiles,
        channels,
    )


async def serve(args: argparse.Namespace) -> None:
    config = FrontEndConfig(
        mode=get_mode(args.mode),
        grid=None if args.grid == "auto" else int(args.grid),
        group_timeout=args.group_timeout,
        policy=DecoderPolicy(args.policy),
        request_timeout=args.request_timeout,
        replicate_timeout=args.replicate_timeout,
        max_pending=args.max_pending,
        reissue_to=args.reissue_to,
        confident_at=args.confident_at,
    )
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        scnn = [parse_worker_arg(v) for v in args.scnn]
        collage = [parse_worker_arg(v) for v in args.collage] if config.mode.collage else []
        token = load_token(args.token_file)
        frontend = await connect(config, scnn, collage, session, token)
        try:
            await serve_app(build_app(frontend, args.model_name, token=token), args.host, args.port)
        finally:
            for pool in (frontend.scnn, *frontend.collage.values()):
                for worker in pool.workers:
                    worker.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collage frontend", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scnn", action="append", default=[], metavar="URL#MODEL", help="an s-CNN worker (repeat)"
    )
    p.add_argument(
        "--collage", action="append", default=[], metavar="URL#MODEL", help="a collage worker (repeat)"
    )
    p.add_argument("--mode", default="collage", choices=tuple(MODES), help="redundancy strategy")
    p.add_argument("--grid", default="3", help="collage side S, or 'auto' to pick S from the arrival rate")
    p.add_argument("--group-timeout", type=float, help="group deadline in seconds (default: adaptive)")
    p.add_argument("--policy", default="confident", choices=[d.value for d in DecoderPolicy])
    p.add_argument(
        "--confident-at",
        type=float,
        default=0.9,
        help="policy confident: the cell confidence that answers at once",
    )
    p.add_argument("--request-timeout", type=float, default=5.0, help="end-to-end deadline (504 past it)")
    p.add_argument("--replicate-timeout", type=float, default=0.1, help="re-issue timeout of mode replicate")
    p.add_argument("--max-pending", type=int, default=4096, help="requests in flight before 429")
    p.add_argument(
        "--reissue-to",
        default="idle",
        choices=REISSUE_TARGETS,
        help="where a re-issue for lateness goes: an idle worker only (else skipped), or the least-loaded",
    )
    p.add_argument("--model-name", default="classifier", help="the model name clients use in V2 URLs")
    p.add_argument(
        "--token-file", help="file holding the shared bearer token for clients and workers "
        "(default: $COLLAGE_TOKEN; none: open)"
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed when ready)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s frontend %(levelname)s %(message)s")
    try:
        run(serve(args))
    except (CollageError, ServingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
