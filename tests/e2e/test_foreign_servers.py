"""The front end in front of real V2 servers that are not ours: a Triton Inference Server (the one
`nvidia-pytriton` bundles) serving both shipped ONNX files, and KServe's Python model server
serving the s-CNN, each in the exported model's own tensors (the `tensor` contract), with the
model facts read from the exported files (`model_file`). They run from `.venv-triton`, which
`make setup` builds; where it could not be built the tests say so and are skipped."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from collage_inference.bench.loadgen import LoadConfig, LoadResult, run_load_sync
from collage_inference.bench.serving import overhead
from collage_inference.config import ServeConfig, WorkerEndpoint
from collage_inference.deploy.local import LocalCluster
from collage_inference.onnxfile import onnx_session

REPO = Path(__file__).resolve().parents[2]
TRITON = REPO / "examples" / "triton" / "pytriton_server.py"
PYTHON = REPO / ".venv-triton" / "bin" / "python"
SERVERS = Path(__file__).resolve().parent / "servers"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not PYTHON.exists(), reason=".venv-triton is missing (`make setup` builds it where it can)"
    ),
]


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (Triton takes HTTP, gRPC and metrics ports),
    drawn below the kernel's ephemeral range: a port from ``bind(0)`` is one the client sockets
    opened meanwhile (front end, load generator) may take before the server binds it."""
    low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    while True:
        port = random.randrange(20000, max(20001, low - count))
        if all(_free(port + i) for i in range(count)):
            return port


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@contextmanager
def server(args: Callable[[int], list[str]], ports: int, models: list[str]) -> Iterator[str]:
    """A server process from .venv-triton on ``ports`` consecutive ports, yielding its URL once
    every one of ``models`` answers ready. A port taken between the check and the server's bind
    is tried again on other ports."""
    for attempt in range(3):
        port = free_ports(ports)
        try:
            with _server_on(args(port), f"http://127.0.0.1:{port}", models) as url:
                yield url
                return
        except _PortTaken:
            if attempt == 2:
                raise


class _PortTaken(Exception):
    pass


@contextmanager
def _server_on(args: list[str], url: str, models: list[str]) -> Iterator[str]:
    libdir = subprocess.run(
        [str(PYTHON), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")])),
    }
    # Its output goes to a file: a pipe nobody reads fills up and stalls a server that logs every call.
    log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in the finally below)
    proc = subprocess.Popen(  # its own session: KServe signals its whole process group on exit
        [str(PYTHON), *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                for model in models:
                    with urllib.request.urlopen(f"{url}/v2/models/{model}/ready", timeout=2):
                        pass
                break
            except OSError:  # refused, or 4xx/5xx (HTTPError) while the models load
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                text = log.read().decode(errors="replace")
                if proc.poll() is not None and "already in use" in text:
                    raise _PortTaken(text[-500:])
                pytest.fail(f"{args[0]} did not become ready: {text[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def load_front_end(config: ServeConfig, test, requests: int, warmup: int, seed: int) -> LoadResult:
    """A front end over ``config``'s servers, loaded at 30 requests/s with test images: every
    request answered, at least 90% of them correctly."""
    images, labels = test.images[: requests + 200], test.labels[: requests + 200]
    with LocalCluster(config) as cluster:
        load = LoadConfig(cluster.url, rate=30, requests=requests, warmup=warmup, seed=seed)
        result = run_load_sync(load, images, labels)
    assert (result.answered, result.failed, result.unsent, result.overflowed) == (requests, 0, 0, 0), (
        result.summary
    )
    assert result.accuracy >= 0.90, result.accuracy
    return result


def test_collage_in_front_of_a_real_triton(models_dir: Path, fashion_test) -> None:
    scnn, collage = models_dir / "scnn.onnx", models_dir / "collage-3x3.onnx"

    def args(port: int) -> list[str]:
        return [str(TRITON), str(port), f"scnn={scnn}", f"collage-3x3={collage}",
                "--slow", "scnn:0.05:0.3"]  # fmt: skip

    with server(args, 3, ["scnn", "collage-3x3"]) as url:
        config = ServeConfig(
            mode="collage", grid=3, port=0,
            scnn=(WorkerEndpoint(url, "scnn", model_file=scnn),),
            collage=(WorkerEndpoint(url, "collage-3x3", model_file=collage),),
        )  # fmt: skip
        result = load_front_end(config, fashion_test, requests=300, warmup=20, seed=3)
    assert result.source_shares.get("collage", 0) > 0  # the collage answered for Triton's stragglers


def test_the_s_cnn_in_front_of_kserve(models_dir: Path, fashion_test) -> None:
    scnn = models_dir / "scnn.onnx"
    kserve = lambda port: [str(SERVERS / "kserve_server.py"), str(port), "scnn", str(scnn)]  # noqa: E731
    with server(kserve, 2, ["scnn"]) as url:
        config = ServeConfig(
            mode="none", grid=2, port=0, scnn=(WorkerEndpoint(url, "scnn", model_file=scnn),)
        )
        load_front_end(config, fashion_test, requests=100, warmup=10, seed=4)


def test_bench_serving_measures_the_overhead_in_front_of_triton(models_dir: Path, fashion_test) -> None:
    """The direct side calls Triton in the model's own tensors, the other side goes through the
    front end; both are answered and judged on the same images."""
    scnn = models_dir / "scnn.onnx"
    with server(lambda port: [str(TRITON), str(port), f"scnn={scnn}"], 3, ["scnn"]) as url:
        images, labels = fashion_test.images[:300], fashion_test.labels[:300]
        report = overhead(50, 100, 2, images, labels, WorkerEndpoint(url, "scnn", model_file=scnn))
    assert report["server"] == f"{url}#scnn@{scnn}"
    assert report["errors"] == 0 and report["frontend_accuracy"] >= 0.90
    assert 0 < report["direct_p50_ms"] < report["direct_p99_ms"]
    assert 0 < report["frontend_call_p50_ms"] < report["frontend_p50_ms"]
    assert len(report["pair_overheads_p50_ms"]) == 2


_READ_CONFIGS = """
import json, sys
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

def tensors(items):
    return [[t.name, pb.DataType.Name(t.data_type), list(t.dims)] for t in items]

found = {}
for path in sys.argv[1:]:
    with open(path) as f:
        config = text_format.Parse(f.read(), pb.ModelConfig())  # strict: unknown fields fail
    found[config.name] = {
        "backend": config.backend, "max_batch_size": config.max_batch_size,
        "inputs": tensors(config.input), "outputs": tensors(config.output),
    }
print(json.dumps(found))
"""


def test_the_example_model_repository_describes_the_shipped_files(models_dir: Path) -> None:
    """examples/triton's config.pbtxt files parse as Triton's own ModelConfig (the protobuf that
    tritonclient ships) and name the tensors, types and shapes of the ONNX files they serve."""
    configs = sorted((REPO / "examples" / "triton" / "model_repository").glob("*/config.pbtxt"))
    done = subprocess.run([str(PYTHON), "-c", _READ_CONFIGS, *map(str, configs)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    found = json.loads(done.stdout)
    assert sorted(found) == sorted(path.parent.name for path in configs) == ["collage-3x3", "scnn"]
    for name, config in found.items():
        session = onnx_session(models_dir / f"{name}.onnx")
        (inp,), (out,) = session.get_inputs(), session.get_outputs()
        assert config["backend"] == "onnxruntime" and config["max_batch_size"] >= 1
        assert inp.type == out.type == "tensor(float)" and not isinstance(inp.shape[0], int)  # batch
        assert config["inputs"] == [[inp.name, "TYPE_FP32", inp.shape[1:]]]
        # The file leaves the collage's output dims symbolic: a run gives them.
        (logits,) = session.run([out.name], {inp.name: np.zeros([2, *inp.shape[1:]], np.float32)})
        assert config["outputs"] == [[out.name, "TYPE_FP32", list(logits.shape[1:])]]
