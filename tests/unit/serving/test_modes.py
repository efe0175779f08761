import numpy as np
import pytest

from collage_inference.config import FrontEndSettings
from collage_inference.errors import ConfigError
from collage_inference.modes import MODES, get_mode
from collage_inference.serving.clock import FakeClock
from collage_inference.serving.decoder import Decoder, DecoderConfig
from collage_inference.serving.types import Reissue, Reply, Request, Source

CLASSES = tuple(str(i) for i in range(10))


def test_worker_counts_and_costs():
    k = 9
    assert {n: m.scnn_workers(k) for n, m in MODES.items()} == {
        "none": 9, "equal": 10, "replicate": 10, "hedge": 10, "replicate-all": 18, "collage": 9,
        "collage-2": 9, "parm": 9,
    }  # fmt: skip
    assert MODES["collage"].extra_cost(k) == pytest.approx(1 / 9)
    assert MODES["parm"].extra_cost(4) == pytest.approx(1 / 4) and MODES["parm"].parity
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


def test_reply_probabilities_pick_the_label():
    reply = Reply.from_probabilities(Source.PRIMARY, "w", np.eye(10, dtype=np.float32)[4], request_id="r")
    assert reply.predictions[0].label == 4
