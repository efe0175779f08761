"""Mode parm (ParM's parity backup) on the Ray Serve backend: the parity model as a deployment
beside two s-CNN replicas, one of which straggles about 1.5 s per call. Every request must be
answered with the right labels, and some recovered from the parity query by subtraction (how
soon is measured on the local backend, tests/e2e/test_parm_serving.py: here Ray's own router
places the calls, and both members of a pair can wait on the straggling replica).

Run the Ray tests alone with ``pytest -m ray``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

pytest.importorskip("ray")

from test_ray_backend import STRAGGLER, classify, get, metric, ray_tempdir  # noqa: E402

from collage_inference.config import RaySettings, ServeConfig  # noqa: E402
from collage_inference.deploy.ray import RayCluster  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

K = 2
IMAGES = 48
# 2 x 0.3 + 0.3 + 0.3 = 1.2 of the 2 CPUs: the controller and proxy take none.
PAIR = RaySettings(
    num_cpus=2, object_store_mb=150, scnn_replicas=K, scnn_cpus=0.3, collage_cpus=0.3, ingress_cpus=0.3
)


@pytest.fixture(scope="module")
def parm_run(models_dir: Path, fashion_test) -> Iterator[dict[str, Any]]:
    for name in ("scnn", f"parm-k{K}-concat"):
        if not (models_dir / f"{name}.onnx").is_file():
            pytest.skip(f"the shipped model {name}.onnx is not in {models_dir}")
    temp = ray_tempdir()
    config = ServeConfig(
        mode="parm", parity_k=K, parity_encoder="concat", models_dir=models_dir, port=0,
        request_timeout=10.0, slowdown=STRAGGLER, ray=PAIR, ready_timeout=90.0,
    )  # fmt: skip
    cluster = RayCluster(config, ray_init={"_temp_dir": temp})
    try:
        cluster.start()
        url = cluster.url

        async def run() -> list[dict[str, Any]]:
            connector = aiohttp.TCPConnector(limit=8)
            async with aiohttp.ClientSession(connector=connector) as session:
                images = fashion_test.images[:IMAGES]
                return list(
                    await asyncio.gather(*(classify(session, url, im, i) for i, im in enumerate(images)))
                )

        answers = asyncio.run(run())
        model = json.loads(get(f"{url}/v2/models/classifier")[1])
        yield {"answers": answers, "metrics": get(f"{url}/metrics")[1].decode(), "model": model}
    finally:
        cluster.stop()
        shutil.rmtree(temp, ignore_errors=True)


def test_parm_on_ray_answers_every_request_and_recovers_the_stragglers(parm_run, fashion_test) -> None:
    answers, text = parm_run["answers"], parm_run["metrics"]
    labels = np.asarray(fashion_test.labels[:IMAGES])
    accuracy = np.mean([a["label"] for a in answers] == labels)
    sources = Counter(a["source"] for a in answers)
    assert len(answers) == IMAGES and accuracy >= 0.85, (accuracy, sources)
    assert sources["parity"] >= 4, sources
    assert set(sources) <= {"primary", "parity", "replica"}, sources
    assert metric(text, "nv_inference_request_success_total") == IMAGES
    facts = parm_run["model"]["parameters"]
    assert (facts["mode"], facts["parity_k"], facts["parity_encoder"]) == ("parm", K, "concat"), facts
