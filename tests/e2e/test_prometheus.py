"""A real Prometheus scrapes a running cluster: the shipped scrape config (examples/prometheus.yml)
pointed at a local cluster under load, checked through Prometheus' own HTTP API, which also runs
every query of the shipped Grafana dashboard (examples/grafana/); and `promtool check metrics`
passes on the front end's and a worker's /metrics."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from collage_inference.config import ServeConfig
from collage_inference.deploy.local import LocalCluster
from collage_inference.serving.v2 import InferRequest, InferTensor, render_infer_request

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
BUCKETS = "collage_request_duration_seconds_bucket"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "prometheus.yml"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None,
        reason="Prometheus is not installed (Debian's prometheus package; `make setup` installs it)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read()


def query(api: str, expression: str) -> float | None:
    """The value of an instant query with one result, else None."""
    doc = json.loads(get(f"{api}/api/v1/query?query={urllib.parse.quote(expression)}"))
    result = doc["data"]["result"]
    return float(result[0]["value"][1]) if len(result) == 1 else None


DASHBOARD = EXAMPLE.parent / "grafana" / "collage-dashboard.json"
# Panels of what this run has none of (failures, stragglers), which Prometheus may answer empty.
QUIET_PANELS = {"Inference Request Failure", "Stragglers and re-issues"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of the shipped Grafana dashboard, with Grafana's
    rate interval filled in for this test's 1 s scrapes."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"].replace("$__rate_interval", "30s")) for p in panels for t in p["targets"]]


def test_a_real_prometheus_scrapes_the_cluster_under_load(
    models_dir: Path, fashion_test, tmp_path: Path
) -> None:
    config = ServeConfig(mode="collage", grid=2, models_dir=models_dir, port=0)
    with LocalCluster(config) as cluster:
        frontend, worker = cluster.url.removeprefix("http://"), cluster.worker_urls[0].removeprefix("http://")
        for url in (cluster.url, cluster.worker_urls[0]):
            done = subprocess.run(
                [PROMTOOL, "check", "metrics"], input=get(f"{url}/metrics"), capture_output=True
            )
            assert done.returncode == 0, (url, done.stderr.decode())
        scrape = EXAMPLE.read_text().replace("127.0.0.1:8000", frontend).replace("5s", "1s")
        scrape += f'  - job_name: collage-workers\n    static_configs:\n      - targets: ["{worker}"]\n'
        (tmp_path / "prometheus.yml").write_text(scrape)
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if get(f"{api}/-/ready", timeout=1.0):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            sent = 0
            load_until = time.monotonic() + 4.0  # a few scrapes' worth of traffic
            while time.monotonic() < load_until:
                image = fashion_test.images[sent % 100]
                body, headers = render_infer_request(InferRequest(None, (InferTensor.of("image", image),)))
                request = urllib.request.Request(f"{cluster.url}/v2/models/classifier/infer", body, headers)
                with urllib.request.urlopen(request, timeout=10) as reply:
                    assert reply.status == 200
                sent += 1
                time.sleep(0.01)
            seen: dict[str, float | None] = {}
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                seen = {
                    "frontend up": query(api, 'up{job="collage-frontend"}'),
                    "worker up": query(api, 'up{job="collage-workers"}'),
                    "answered": query(api, "sum(nv_inference_request_success_total)"),
                    "histogram count": query(api, "sum(collage_request_duration_seconds_count)"),
                    "p50": query(
                        api, "histogram_quantile(0.5, sum(collage_request_duration_seconds_bucket) by (le))"
                    ),
                }
                if seen["answered"] == seen["histogram count"] == sent and seen["worker up"] == 1:
                    break
                time.sleep(0.5)
            targets = json.loads(get(f"{api}/api/v1/targets"))["data"]["activeTargets"]
            assert seen["frontend up"] == 1 and seen["worker up"] == 1, (seen, targets)
            assert seen["answered"] == sent and seen["histogram count"] == sent, (sent, seen)
            assert seen["p50"] is not None and 0 < seen["p50"] < 1.0, seen
            # Every panel of the Grafana dashboard runs; a rate needs two scrapes in its window.
            deadline = time.monotonic() + 20
            while True:
                empty = []
                for title, expression in dashboard_queries():
                    doc = json.loads(get(f"{api}/api/v1/query?query={urllib.parse.quote(expression)}"))
                    assert doc["status"] == "success", (title, expression, doc)
                    if title not in QUIET_PANELS and not doc["data"]["result"]:
                        empty.append((title, expression))
                if not empty or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert not empty, empty
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=15)
