import numpy as np
import pytest

from collage_inference.config import FrontEndSettings
from collage_inference.errors import ConfigError
from collage_inference.modes import MODES, get_mode
from collage_inference.serving.clock import FakeClock
from collage_inference.serving.decoder import Decoder, DecoderConfig
from collage_inference.serving.metrics import Metrics
from collage_inference.serving.types import Answer, Reissue, Reply, Request, Source

CLASSES = tuple(str(i) for i in range(10))


def test_worker_counts_and_costs():
    k = 9
    assert {n: m.scnn_workers(k) for n, m in MODES.items()} == {
        "none": 9, "equal": 10, "replicate": 10, "hedge": 10, "replicate-all": 18, "collage": 9,
        "collage-2": 9,
    }  # fmt: skip
    assert MODES["collage"].extra_cost(k) == pytest.approx(1 / 9)
    assert (
        MODES["collage-2"].extra_cost(k) == pytest.approx(2 / 9) and MODES["collage-2"].collage_workers == 2
    )
    assert MODES["replicate-all"].extra_cost(k) == 1.0
    assert MODES["none"].extra_cost(k) == 0.0
    with pytest.raises(ConfigError, match="unknown mode"):
        get_mode("raid5")


def _request(clock: FakeClock) -> Request:
    return Request("r0", np.zeros((28, 28, 1), np.uint8), clock.now(), clock.now() + 5.0)


def _reissue_after(mode: str, seconds: float) -> bool:
    clock = FakeClock(100.0)
    settings = FrontEndSettings(mode, replicate_timeout=0.05)
    decoder = Decoder(DecoderConfig.for_mode(settings, CLASSES))
    decoder.admit(_request(clock), clock.now(), worker_id="w0", backup=False)
    clock.advance(seconds)
    return any(isinstance(a, Reissue) for a in decoder.tick(clock.now()))


def test_replicate_reissues_after_its_fixed_timeout_and_none_does_not():
    assert not _reissue_after("replicate", 0.04)
    assert _reissue_after("replicate", 0.06)
    assert not _reissue_after("none", 1.0)
    assert not _reissue_after("equal", 1.0)


def test_metrics_render_triton_names_and_sources():
    metrics = Metrics("fashion")
    metrics.observe_answer(Answer("r0", 3, "3", 0.9, Source.COLLAGE, 0.004, "c0", {"compute": 0.001}))
    metrics.observe_failure(504)
    text = metrics.render([("w0", "http://a", 1, 2, 7), ("w1", "http://b", 0, 0, 3)], in_flight=4)
    assert 'nv_inference_request_success{model="fashion",version="1"} 1' in text  # the served name
    assert 'nv_inference_request_failure{model="fashion",version="1"} 1' in text
    assert 'collage_answers_total{source="collage"} 1' in text
    assert 'collage_request_duration_seconds_bucket{model="fashion",version="1",le="0.005"} 1' in text
    assert 'collage_worker_up{worker="w0",url="http://a"} 1' in text
    assert 'collage_worker_calls{worker="w1",url="http://b"} 3' in text
    assert text.count("# HELP collage_worker_up ") == 1  # one family, a sample per worker
    assert "collage_requests_in_flight{} 4" in text
    assert metrics.stragglers == 1


def test_reply_probabilities_pick_the_label():
    reply = Reply.from_probabilities(Source.PRIMARY, "w", np.eye(10, dtype=np.float32)[4], request_id="r")
    assert reply.predictions[0].label == 4
