"""Every /metrics output is valid exposition format: read back with prometheus_client's parser,
and accepted by `promtool check metrics` where Prometheus' tools are installed."""

import asyncio
import shutil
import subprocess

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from collage_inference.config import FrontEndSettings
from collage_inference.serving.api import FrontEndApi
from collage_inference.serving.frontend import FrontEnd
from collage_inference.serving.metrics import Exposition, Metrics, metric_total, parse_metrics
from collage_inference.serving.pool import Worker, WorkerPool
from collage_inference.serving.transports.fake import FakeTransport
from collage_inference.serving.types import Answer, Source
from collage_inference.serving.web.routes import Request

PROMTOOL = shutil.which("promtool")
CLASSES = tuple(f"c{i}" for i in range(10))


def families_of(text: str) -> dict[str, str]:
    """Family name -> type, from the library's parser (which raises on malformed text)."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def promtool_check(text: str) -> None:
    if PROMTOOL is None:
        return
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def test_the_counters_as_families_with_the_served_model_name():
    metrics = Metrics("fashion")
    metrics.observe_answer(Answer("r0", 3, "3", 0.9, Source.COLLAGE, 0.004, "c0", {"compute": 0.001}))
    metrics.observe_failure(504)
    metrics.late_replies["primary"] += 2
    workers = [("w0", "http://a", 1, 2, 7), ("w1", "http://b", 0, 0, 3)]
    text = Exposition(lambda: metrics.families(workers, in_flight=4)).render().decode()
    found = parse_metrics(text)
    assert found[("nv_inference_request_success_total", 'model="fashion",version="1"')] == 1
    assert found[("nv_inference_request_failure_total", 'model="fashion",version="1"')] == 1
    assert found[("collage_answers_total", 'model="fashion",source="collage"')] == 1
    assert found[("collage_request_duration_seconds_bucket", 'le="0.005",model="fashion"')] == 1
    assert found[("collage_worker_up", 'url="http://a",worker="w0"')] == 1
    assert found[("collage_worker_calls_total", 'url="http://b",worker="w1"')] == 3
    assert metric_total(found, "collage_late_replies_total") == 2
    assert found[("collage_requests_in_flight", 'model="fashion"')] == 4
    assert text.count("# HELP collage_worker_up ") == 1  # one family, a sample per worker
    types = families_of(text)
    assert types["collage_request_duration_seconds"] == "histogram"
    assert types["nv_inference_request_success"] == "counter" and types["collage_worker_up"] == "gauge"
    assert metrics.stragglers == 1
    promtool_check(text)


def test_a_front_ends_metrics_endpoint_parses_and_passes_promtool():
    def answer(images: np.ndarray) -> np.ndarray:
        return np.eye(len(CLASSES), dtype=np.float32)[[1]]

    async def scrape() -> tuple[str, str]:
        workers = [Worker(f"s{i}", FakeTransport(f"s{i}", answer)) for i in range(2)]
        frontend = FrontEnd(FrontEndSettings("none", grid="auto"), WorkerPool(workers), {}, CLASSES, {}, 1)
        api = FrontEndApi(frontend)
        await frontend.start()
        try:
            await frontend.classify(np.zeros((4, 4, 1), np.uint8))
            response = api.router().handle(Request("GET", "/metrics", "", {}, b""))
        finally:
            await frontend.stop()
        return response.body.decode(), response.headers["Content-Type"]

    text, content_type = asyncio.run(scrape())
    assert content_type.startswith("text/plain; version=0.0.4")
    assert metric_total(parse_metrics(text), "nv_inference_request_success_total") == 1
    assert set(families_of(text)) >= {"nv_inference_request_success", "collage_worker_outstanding"}
    promtool_check(text)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian's prometheus package) is not installed")
def test_promtool_refuses_what_the_old_renderer_wrote():
    # One HELP per sample of a family is what strict consumers reject: the check is real.
    broken = '# HELP a x\n# TYPE a gauge\na{w="1"} 1\n# HELP a x\n# TYPE a gauge\na{w="2"} 1\n'
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=broken.encode(), capture_output=True, timeout=30
    )
    assert done.returncode != 0


def test_the_grafana_dashboard_reads_series_the_front_end_writes():
    """Every series a panel of examples/grafana/ queries is one the front end's /metrics holds."""
    import json
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "examples" / "grafana" / "collage-dashboard.json"
    dashboard = json.loads(path.read_text())
    metrics = Metrics("fashion")
    metrics.observe_answer(Answer("r0", 3, "3", 0.9, Source.PRIMARY, 0.004, "c0", {"compute": 0.001}))
    metrics.observe_failure(504)  # families with a sample per status or source need one to be written
    metrics.late_replies["primary"] += 1
    metrics.group_sizes[4] += 1
    text = Exposition(lambda: metrics.families([("w0", "http://a", 1, 0, 1)], in_flight=0)).render().decode()
    written = {name for name, _ in parse_metrics(text)}
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels) and dashboard["uid"]
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            series = set(re.findall(r"\b(?:nv|collage)_[a-z_]+\b", target["expr"]))
            assert series and series <= written, (panel["title"], series - written)
