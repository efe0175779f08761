"""The Ray Serve backend for real: a private Ray instance held to this machine's 2 cores, the
shipped models as deployments, real Fashion-MNIST test images over the Serve HTTP proxy.

One application serves the module (collage mode, S = 2, three s-CNN replicas of which rank 0
straggles about 1.5 s per call, fractional CPUs so everything fits into 2). It must answer
every request with the right labels, rescue the straggler's requests from the collage and
cancel their pending primaries, answer errors as the local backend does, and leave no process
behind once stopped. Then ``collage serve --backend ray`` does the same from the command line.

Run them alone with ``pytest -m ray``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from collage_inference.serving.metrics import metric_total, parse_metrics

pytest.importorskip("ray")

from collage_inference.config import RaySettings, ServeConfig, SlowdownSettings  # noqa: E402
from collage_inference.deploy.process import process_tree, running  # noqa: E402
from collage_inference.deploy.ray import RayCluster  # noqa: E402
from collage_inference.serving.v2 import (  # noqa: E402
    HEADER_LENGTH,
    InferRequest,
    InferTensor,
    parse_infer_response,
    render_infer_request,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GRID = 2
IMAGES = 96
DELAY_S = 1.5
STRAGGLER = SlowdownSettings(f"pareto:alpha=50,scale={DELAY_S},cap={DELAY_S + 0.1}", workers=(0,))
# 3 x 0.3 + 0.3 + 0.3 = 1.5 of the 2 CPUs: the controller and proxy take none.
SMALL = RaySettings(
    num_cpus=2, object_store_mb=150, scnn_replicas=3, scnn_cpus=0.3, collage_cpus=0.3, ingress_cpus=0.3
)


def ray_tempdir() -> str:
    # Short (Ray's socket paths must fit 107 bytes) and private: other Ray users on the machine
    # neither see these processes nor share their session files.
    return tempfile.mkdtemp(prefix="ray-", dir="/tmp")


def wait_gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if running(p)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name ``text`` (a Ray session's temp dir)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd and running(int(entry)):
                found.append(f"{entry}: {cmd[:120]}")
    return found


@pytest.fixture(scope="module")
def app(models_dir: Path):
    """The running application, and the processes this test process had before Ray started."""
    for name in ("scnn", f"collage-{GRID}x{GRID}"):
        if not (models_dir / f"{name}.onnx").is_file():
            pytest.skip(f"the shipped model {name}.onnx is not in {models_dir}")
    before = process_tree(os.getpid())
    temp = ray_tempdir()
    config = ServeConfig(
        mode="collage", grid=GRID, models_dir=models_dir, port=0, request_timeout=10.0,
        slowdown=STRAGGLER, ray=SMALL, ready_timeout=90.0,
    )  # fmt: skip
    cluster = RayCluster(config, ray_init={"_temp_dir": temp})
    try:
        cluster.start()
        yield {"cluster": cluster, "before": before, "ray": process_tree(os.getpid()) - before, "temp": temp}
    finally:
        cluster.stop()
        shutil.rmtree(temp, ignore_errors=True)


def png_of(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0]).save(buf, format="PNG")
    return buf.getvalue()


async def classify(session: aiohttp.ClientSession, url: str, image: np.ndarray, i: int) -> dict[str, Any]:
    """Half the images by V2 binary infer, half by /predict; the same fields either way."""
    if i % 2:
        async with session.post(f"{url}/predict", data=png_of(image)) as resp:
            assert resp.status == 200, await resp.text()
            doc = await resp.json()
        return {"label": doc["label"], "source": doc["source"], "latency": doc["latency_ms"] / 1e3}
    body, headers = render_infer_request(
        InferRequest(f"q{i}", (InferTensor.of("image", image),)), binary_inputs=True
    )
    async with session.post(f"{url}/v2/models/classifier/infer", data=body, headers=headers) as resp:
        raw = await resp.read()
        assert resp.status == 200, raw[:300]
        parsed = parse_infer_response(raw, resp.headers.get(HEADER_LENGTH))
    return {
        "label": int(parsed.output("label").data[0]),
        "source": bytes(parsed.output("source").data[0]).decode(),
        "latency": parsed.parameters["latency_ms"][0] / 1e3,
    }


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric(text: str, name: str) -> float:
    return metric_total(parse_metrics(text), name)


@pytest.fixture(scope="module")
def first_run(app, fashion_test) -> dict[str, Any]:
    url = app["cluster"].url

    async def run() -> list[dict[str, Any]]:
        connector = aiohttp.TCPConnector(limit=12)  # a dozen clients at a time
        async with aiohttp.ClientSession(connector=connector) as session:
            images = fashion_test.images[:IMAGES]
            return list(await asyncio.gather(*(classify(session, url, im, i) for i, im in enumerate(images))))

    answers = asyncio.run(run())
    return {"answers": answers, "metrics": get(f"{url}/metrics")[1].decode()}


def test_serves_real_images_with_the_right_labels(first_run, fashion_test) -> None:
    answers = first_run["answers"]
    labels = np.asarray(fashion_test.labels[:IMAGES])
    accuracy = np.mean([a["label"] for a in answers] == labels)
    assert len(answers) == IMAGES and accuracy >= 0.85, accuracy
    assert {a["source"] for a in answers} <= {"primary", "collage", "replica"}
    assert metric(first_run["metrics"], "nv_inference_request_success_total") == IMAGES


def test_slow_replica_is_rescued_by_the_collage_and_its_calls_cancelled(first_run) -> None:
    answers, text = first_run["answers"], first_run["metrics"]
    rescued = [a for a in answers if a["source"] == "collage"]
    sources = Counter(a["source"] for a in answers)
    assert rescued, sources
    # Only rank 0 straggles: were every replica slow (ranks not told apart), nothing would come
    # back from an s-CNN replica within the collage's time.
    assert sources["primary"] >= IMAGES // 4, sources
    assert max(a["latency"] for a in rescued) < DELAY_S * 0.7  # long before the straggler answers
    assert metric(text, "collage_answers_total") == IMAGES
    assert metric(text, "collage_cancelled_calls_total") >= 1  # DeploymentResponse.cancel()


def test_endpoints_and_errors_over_the_serve_proxy(app) -> None:
    url = app["cluster"].url
    status, body = get(f"{url}/v2/models/classifier")
    doc = json.loads(body)
    assert status == 200 and doc["parameters"]["mode"] == "collage" and len(doc["parameters"]["labels"]) == 10
    assert get(f"{url}/v2/health/ready")[0] == 200 and get(f"{url}/v2/models/nope")[0] == 404
    request = urllib.request.Request(f"{url}/predict", data=b"not an image", method="POST")
    try:
        urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as exc:
        assert exc.code == 400 and "does not decode" in json.loads(exc.read())["error"]
    else:
        pytest.fail("a broken image was accepted")
    assert metric(get(f"{url}/metrics")[1].decode(), "collage_bad_requests_total") >= 2


def test_stop_leaves_no_process_behind(app) -> None:
    ray_pids = app["ray"]
    assert len(ray_pids) >= 5, "expected Ray's own processes and the replicas under this process"
    app["cluster"].stop()
    assert not wait_gone(ray_pids), "Ray processes left after stop"
    assert not processes_mentioning(app["temp"])


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "ctrl-c"])
def test_collage_serve_backend_ray_from_the_command_line(
    models_dir: Path, tmp_path: Path, ctrl_c: bool
) -> None:
    """SIGTERM to the process, or SIGINT to its whole process group as a terminal's Ctrl-C
    sends it (to Ray's processes too): either way a clean exit and no process left."""
    config = tmp_path / "ray.toml"
    config.write_text(
        f'backend = "ray"\nmode = "collage"\ngrid = {GRID}\nport = 0\nmodels_dir = "{models_dir}"\n'
        "[ray]\nnum_cpus = 2\nobject_store_mb = 150\nscnn_replicas = 2\n"
        "scnn_cpus = 0.3\ncollage_cpus = 0.3\ningress_cpus = 0.3\n"
    )
    temp = ray_tempdir()
    env = {**os.environ, "RAY_TMPDIR": temp, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "collage_inference.cli", "serve", "--config", str(config)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any(line.startswith("serving;") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-30:])
            time.sleep(0.2)
        url = next(line.split()[2] for line in lines if line.strip().startswith("front end"))
        tree = process_tree(proc.pid) - {proc.pid}
        assert get(f"{url}/v2/health/ready")[0] == 200
        assert len(tree) >= 5, "expected Ray's own processes and the replicas under collage serve"
        if ctrl_c:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(lines[-30:])
        assert not wait_gone(tree), "Ray processes left after collage serve stopped"
        assert not processes_mentioning(temp)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: collage serve and all it started
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)
