"""Mode parm in real processes on loopback: k s-CNN workers and one parity worker serving the
shipped ParM model, s-CNN worker 0 straggling. Every request is answered once, the parity
answers for stragglers (source ``parity`` in the answers and the metrics), and the groups are
counted by how many of their requests the backup found unanswered."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from collage_inference.bench.loadgen import LoadConfig, run_load_sync
from collage_inference.config import ServeConfig, SlowdownSettings
from collage_inference.deploy.local import LocalCluster
from collage_inference.serving.metrics import metric_total, parse_metrics

pytestmark = pytest.mark.slow

REQUESTS = 240


@pytest.mark.parametrize(("k", "encoder"), [(4, "concat"), (2, "sum")])
def test_parm_answers_stragglers_from_the_parity(
    models_dir: Path, fashion_test, k: int, encoder: str
) -> None:
    straggler = SlowdownSettings("pareto:alpha=50,scale=0.4,cap=0.5", workers=(0,))
    config = ServeConfig(
        mode="parm", parity_k=k, parity_encoder=encoder, models_dir=models_dir, port=0, slowdown=straggler
    )
    images, labels = fashion_test.images[: REQUESTS + 20], fashion_test.labels[: REQUESTS + 20]
    with LocalCluster(config) as cluster:
        assert (len(cluster.scnn), len(cluster.collage)) == (k, 1)
        result = run_load_sync(
            LoadConfig(cluster.url, rate=40, requests=REQUESTS, warmup=20, seed=5), images, labels
        )
        with urllib.request.urlopen(f"{cluster.url}/metrics", timeout=5) as response:
            metrics = parse_metrics(response.read().decode())
        with urllib.request.urlopen(f"{cluster.url}/v2/models/classifier", timeout=5) as response:
            facts = json.loads(response.read())["parameters"]
    assert (facts["mode"], facts["parity_k"], facts["parity_encoder"]) == ("parm", k, encoder), facts
    assert (result.answered, result.failed, result.unsent, result.overflowed) == (REQUESTS, 0, 0, 0), (
        result.summary
    )
    assert result.accuracy >= 0.88, result.accuracy
    assert result.source_shares.get("parity", 0) > 0, result.source_shares
    assert metric_total(metrics, "collage_answers_total", 'source="parity"') > 0
    groups = metric_total(metrics, "collage_backup_stragglers_total")
    assert groups > 0 and metric_total(metrics, "collage_backup_stragglers_total", 'unanswered="1"') > 0
