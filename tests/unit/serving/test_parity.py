"""Mode parm's stages: the parity encoder, the subtraction decoder's book, and the decoder
answering a straggler with the recovered output (source ``parity``)."""

import asyncio
from pathlib import Path

import numpy as np
import pytest
from test_frontend import CLASSES as TEN
from test_frontend import FakeWorker, classify_all

from collage_inference import parm
from collage_inference.config import FrontEndSettings
from collage_inference.errors import ConfigError, GeometryError
from collage_inference.modes import DecoderPolicy
from collage_inference.serving.decoder import Decoder, DecoderConfig
from collage_inference.serving.frontend import FrontEnd
from collage_inference.serving.latency import AdaptiveTimeout
from collage_inference.serving.parity import ParityBook, ParityCode, ParityEncoder, slot_counts
from collage_inference.serving.pool import Worker, WorkerPool
from collage_inference.serving.runtime import load_runner, softmax
from collage_inference.serving.transports.fake import FakeTransport
from collage_inference.serving.types import (
    Answer,
    CloseReason,
    Group,
    Prediction,
    Reissue,
    Reply,
    Request,
    Source,
)

CLASSES = ("cat", "dog", "owl")


def group_of(requests, k: int = 4, group_id: int = 0) -> Group:
    return Group(group_id, k, tuple(requests), 0.0, 0.005, CloseReason.DEADLINE, size=k)


def scores(logits) -> np.ndarray:
    return softmax(np.asarray(logits, np.float32))


def parity_reply(group: Group, logits) -> Reply:
    return Reply.from_probabilities(Source.PARITY, "parity-0", scores(logits), group_id=group.id)


def scnn_reply(request_id: str, logits, source: Source = Source.PRIMARY) -> Reply:
    return Reply.from_probabilities(source, "scnn-0", scores(logits), request_id=request_id)


def test_slot_counts_fill_k_slots_in_turn() -> None:
    assert slot_counts(4, 4) == (1, 1, 1, 1)
    assert slot_counts(1, 4) == (4,)
    assert slot_counts(3, 4) == (2, 1, 1)
    assert slot_counts(1, 2) == (2,)


def test_the_encoder_codes_a_partial_group_with_its_own_images_in_turn(make_request) -> None:
    requests = [make_request(fill=v, shape=(28, 28, 1)) for v in (10, 200, 90)]
    query = ParityEncoder(4, "sum", 28, 1).encode(group_of(requests))
    assert query.pixels.shape == (28, 28, 1)
    assert np.all(query.pixels == round((10 + 200 + 90 + 10) / 4))  # slot 3 holds member 0 again
    concat = ParityEncoder(2, "concat", 28, 1).encode(group_of(requests[:2], k=2))
    assert np.all(concat.pixels[:, :14] == 10) and np.all(concat.pixels[:, 14:] == 200)


def test_the_encoder_refuses_codes_parm_does_not_define() -> None:
    with pytest.raises(GeometryError, match="k = 2 or 4"):
        ParityEncoder(3, "concat", 28, 1)
    with pytest.raises(ConfigError, match="channels"):
        ParityEncoder(2, "sum", 28, 2)


def test_one_missing_member_is_recovered_by_subtraction(make_request) -> None:
    a, b, c, d = (make_request() for _ in range(4))
    group = group_of([a, b, c, d])
    outputs = {a.id: [3.0, 0.0, 0.0], b.id: [0.0, 2.0, 0.0], c.id: [0.0, 0.0, 1.0], d.id: [1.0, 0.0, 5.0]}
    book = ParityBook(4)
    book.add_group(group)
    for r in (a, b, c):
        assert book.scnn_output(r.id, scores(outputs[r.id])) == []
    (found,) = book.parity_output(group.id, parity_reply(group, np.sum(list(outputs.values()), axis=0)))
    request_id, prediction, reply = found
    assert request_id == d.id and prediction.label == 2 and reply.source == Source.PARITY
    # log-probabilities stand in for logits: the recovered softmax is the missing one's own
    np.testing.assert_allclose(prediction.probabilities, scores(outputs[d.id]), atol=1e-5)
    assert book.scnn_output(d.id, scores(outputs[d.id])) == []  # late: the group is settled
    assert book.missing(group.id) == []


def test_two_missing_wait_until_all_but_one_are_in(make_request) -> None:
    a, b = make_request(), make_request()
    group = group_of([a, b], k=4)  # a partial group: a fills slots 0 and 2, b slots 1 and 3
    book = ParityBook(4)
    book.add_group(group)
    la, lb = np.array([0.0, 4.0, 0.0]), np.array([2.0, 0.0, 0.0])
    assert book.parity_output(group.id, parity_reply(group, 2 * la + 2 * lb)) == []
    assert sorted(book.missing(group.id)) == sorted([a.id, b.id])
    ((request_id, prediction, _),) = book.scnn_output(a.id, scores(la))
    assert request_id == b.id and prediction.label == 0
    np.testing.assert_allclose(prediction.probabilities, scores(lb), atol=1e-5)


def test_a_group_of_one_is_recovered_from_the_parity_alone(make_request) -> None:
    a = make_request()
    group = group_of([a], k=2)
    book = ParityBook(2)
    book.add_group(group)
    ((request_id, prediction, _),) = book.parity_output(group.id, parity_reply(group, [0.0, 6.0, 2.0]))
    assert request_id == a.id and prediction.label == 1
    np.testing.assert_allclose(prediction.probabilities, scores([0.0, 3.0, 1.0]), atol=1e-5)


def test_the_book_forgets_dropped_and_old_groups(make_request) -> None:
    book = ParityBook(2, recent=2)
    groups = [group_of([make_request(), make_request()], k=2, group_id=i) for i in range(3)]
    for group in groups:
        book.add_group(group)
    assert book.missing(0) == []  # the oldest was dropped beyond `recent`
    assert len(book.missing(2)) == 2
    book.drop(2)
    assert book.missing(2) == [] and book.parity_output(2, parity_reply(groups[2], [1, 0, 0])) == []


def make_decoder() -> Decoder:
    fixed = {"floor": 0.001, "ceiling": 1.0, "min_samples": 10**6}
    config = DecoderConfig(
        CLASSES,
        policy=DecoderPolicy.FIRST,
        primary_timeout=AdaptiveTimeout(initial=0.1, **fixed),
        collage_timeout=AdaptiveTimeout(initial=0.05, **fixed),
    )
    return Decoder(config, parity=ParityBook(2))


@pytest.fixture
def pair(make_request):
    """A decoder with two requests admitted at 0 in one k = 2 group whose parity was sent at 4 ms."""
    decoder = make_decoder()
    a, b = make_request(deadline=1.0), make_request(deadline=1.0)
    for r in (a, b):
        decoder.admit(r, 0.0, worker_id="scnn-0")
    group = group_of([a, b], k=2)
    decoder.add_group(group, 0.004)
    return decoder, a, b, group


def test_the_decoder_answers_a_straggler_from_the_parity(pair) -> None:
    decoder, a, b, group = pair
    la, lb = [5.0, 0.0, 0.0], [0.0, 0.0, 4.0]
    (answer_a,) = decoder.primary_reply(a.id, scnn_reply(a.id, la), 0.006)
    assert answer_a.source == Source.PRIMARY
    (answer_b,) = decoder.parity_reply(group, parity_reply(group, np.add(la, lb)), 0.010)
    assert isinstance(answer_b, Answer)
    assert (answer_b.request_id, answer_b.source, answer_b.label) == (b.id, Source.PARITY, 2)
    assert decoder.metrics.backup_stragglers["1"] == 1 and decoder.pending == 0


def test_two_stragglers_are_reissued_and_the_last_is_recovered_later(pair) -> None:
    decoder, a, b, group = pair
    la, lb = [5.0, 0.0, 0.0], [0.0, 4.0, 0.0]
    assert decoder.parity_reply(group, parity_reply(group, np.add(la, lb)), 0.010) == []
    assert decoder.metrics.backup_stragglers["2+"] == 1
    reissues = decoder.tick(0.2)  # both primaries late, the parity no help: both re-issued
    assert sorted(r.request_id for r in reissues if isinstance(r, Reissue)) == sorted([a.id, b.id])
    actions = decoder.primary_reply(a.id, scnn_reply(a.id, la, Source.REPLICA), 0.25)
    by_id = {x.request_id: x for x in actions}
    assert by_id[a.id].source == Source.REPLICA
    assert (by_id[b.id].source, by_id[b.id].label) == (Source.PARITY, 1)


def test_log_probabilities_decode_as_the_logits_do_on_the_test_set(models_dir: Path, fashion_test) -> None:
    """The one departure on the decoding path: subtraction on the workers' softmax scores (as
    log-probabilities) recovers the same labels as ParM's subtraction on logits."""
    scnn = load_runner(models_dir / "scnn.onnx")
    images = fashion_test.images[:1000]
    images = images[..., None] if images.ndim == 3 else images
    logits = scnn._logits(scnn.prepare_images(images))
    for k in (2, 4):
        parity = load_runner(models_dir / f"parm-k{k}-concat.onnx")
        groups = images.reshape(-1, k, *images.shape[1:])
        parity_logits = parity._logits(parity.prepare_images(parm.encode(groups, "concat")))
        member = logits.reshape(len(groups), k, -1)
        book = ParityBook(k)
        blank = np.zeros((1, 1, 1), np.uint8)
        for g in range(len(groups)):
            requests = [Request(f"g{g}m{i}", blank, 0.0, 1.0) for i in range(k)]
            group = Group(g, k, tuple(requests), 0.0, 0.0, CloseReason.FULL, size=k)
            book.add_group(group)
            for i in range(1, k):  # member 0 is the straggler
                assert book.scnn_output(requests[i].id, softmax(member[g, i])) == []
            reply = Reply(Source.PARITY, "p", (Prediction(0, 0.0, softmax(parity_logits[g])),), group_id=g)
            ((request_id, prediction, _),) = book.parity_output(g, reply)
            assert request_id == requests[0].id
            assert prediction.label == int(parm.decode(parity_logits[g], member[g, 1:]).argmax())


def test_a_parity_call_is_cancelled_once_every_request_of_its_group_is_answered() -> None:
    """As ParM does: redundant work for a complete group is dropped where the transport can."""
    uniform = np.full((1, len(TEN)), 1 / len(TEN), np.float32)
    parity = Worker("p", FakeTransport("p", lambda images: uniform, delay=1.0))
    settings = FrontEndSettings("parm", parity_k=2, group_timeout=0.005, request_timeout=2.0)
    scnn = WorkerPool([FakeWorker("s0"), FakeWorker("s1")])
    fe = FrontEnd(settings, scnn, {2: WorkerPool([parity])}, TEN, {}, 1, ParityCode(2, "sum", 4, 1))
    answers = asyncio.run(classify_all(fe, [3, 4]))
    assert [(a.label, a.source) for a in answers] == [(3, Source.PRIMARY), (4, Source.PRIMARY)]
    assert fe.metrics.cancelled == 1 and parity.outstanding == 0 and parity.calls == 1
