from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collage_inference.errors import ConfigError, DeadlineExceededError, ProtocolError, UnavailableError
from collage_inference.modes import DecoderPolicy
from collage_inference.serving.decoder import Decoder, DecoderConfig
from collage_inference.serving.latency import AdaptiveTimeout, LatencyWindow
from collage_inference.serving.types import (
    Answer,
    CloseReason,
    Fail,
    Group,
    Prediction,
    Reissue,
    Reply,
    Request,
    Source,
)

CLASSES = ("cat", "dog", "owl")
EMPTY = len(CLASSES)
PRIMARY_DUE = 0.1  # fixed patience: the windows never reach min_samples in these tests
COLLAGE_PATIENCE = 0.05


def make_decoder(policy: DecoderPolicy = DecoderPolicy.PATIENT, max_reissues: int = 1) -> Decoder:
    fixed = {"floor": 0.001, "ceiling": 1.0, "min_samples": 10**6}
    return Decoder(
        DecoderConfig(
            CLASSES,
            policy=policy,
            primary_timeout=AdaptiveTimeout(initial=PRIMARY_DUE, **fixed),
            collage_timeout=AdaptiveTimeout(initial=COLLAGE_PATIENCE, **fixed),
            max_reissues=max_reissues,
        )
    )


def single(request_id: str, label: int, source: Source = Source.PRIMARY, worker: str = "w1") -> Reply:
    return Reply(source, worker, (Prediction(label, 0.9),), request_id=request_id, timings={"infer": 0.01})


def collage(group: Group, labels: list[int], worker: str = "c1") -> Reply:
    labels = labels + [EMPTY] * (group.k - len(labels))
    return Reply(Source.COLLAGE, worker, tuple(Prediction(lb, 0.7) for lb in labels), group_id=group.id)


def group_of(requests: list[Request], grid: int = 2, closed_at: float = 0.005) -> Group:
    return Group(0, grid, tuple(requests), 0.0, closed_at, CloseReason.DEADLINE)


@pytest.fixture
def one(make_request):
    """A decoder with one admitted request r in a 2x2 group whose collage was sent at 5 ms."""
    decoder = make_decoder()
    request = make_request(0.0, deadline=1.0)
    group = group_of([request])
    assert decoder.admit(request, 0.0, worker_id="w1") == []
    assert decoder.add_group(group, 0.005) == []
    return decoder, request, group


def test_primary_first_answers_at_once_and_drops_the_collage(one):
    decoder, request, group = one
    [answer] = decoder.primary_reply(request.id, single(request.id, 1), 0.02)
    assert isinstance(answer, Answer)
    assert (answer.label, answer.class_name, answer.source, answer.worker_id) == (
        1,
        "dog",
        Source.PRIMARY,
        "w1",
    )
    assert answer.latency == pytest.approx(0.02) and answer.timings["infer"] == 0.01
    assert decoder.collage_reply(group, collage(group, [2]), 0.03) == []
    assert decoder.metrics.late_replies[Source.COLLAGE] == 1 and answer.source == Source.PRIMARY
    assert decoder.pending == 0 and decoder.next_deadline() is None


def test_collage_first_under_policy_first_answers_from_the_cell(make_request):
    decoder = make_decoder(DecoderPolicy.FIRST)
    a, b = make_request(0.0), make_request(0.0)
    group = group_of([a, b])
    decoder.admit(a, 0.0)
    decoder.admit(b, 0.0)
    decoder.add_group(group, 0.005)
    answers = decoder.collage_reply(group, collage(group, [2, 0]), 0.02)
    assert [(x.request_id, x.label, x.source) for x in answers] == [
        (a.id, 2, Source.COLLAGE),
        (b.id, 0, Source.COLLAGE),
    ]
    assert decoder.primary_reply(a.id, single(a.id, 1), 0.03) == []
    assert decoder.metrics.late_replies[Source.PRIMARY] == 1


@pytest.mark.parametrize(("confidence", "at_once"), [(0.95, True), (0.6, False)])
def test_confident_cells_answer_at_once_and_unsure_ones_wait_for_the_primary(
    make_request, confidence, at_once
):
    decoder = make_decoder(DecoderPolicy.CONFIDENT)
    request = make_request(0.0, deadline=1.0)
    group = group_of([request])
    decoder.admit(request, 0.0, worker_id="w1")
    decoder.add_group(group, 0.005)
    reply = Reply(
        Source.COLLAGE, "c1", (Prediction(1, confidence), *[Prediction(EMPTY, 0.9)] * 3), group_id=0
    )
    actions = decoder.collage_reply(group, reply, 0.02)
    if at_once:
        [answer] = actions
        assert answer.source == Source.COLLAGE and answer.latency == pytest.approx(0.02)
    else:
        assert actions == []
        [answer] = decoder.tick(PRIMARY_DUE)  # held until the primary is due, as under patient
        assert answer.source == Source.COLLAGE and answer.latency == pytest.approx(PRIMARY_DUE)


def test_collage_first_under_patient_waits_for_a_timely_primary(one):
    decoder, request, group = one
    assert decoder.collage_reply(group, collage(group, [2]), 0.02) == []
    assert decoder.next_deadline() == pytest.approx(PRIMARY_DUE)
    assert decoder.tick(0.05) == []
    [answer] = decoder.primary_reply(request.id, single(request.id, 1), 0.06)
    assert answer.source == Source.PRIMARY and answer.label == 1


def test_patient_deadline_expiry_answers_from_the_held_cell(one):
    decoder, request, group = one
    decoder.collage_reply(group, collage(group, [2]), 0.02)
    [answer] = decoder.tick(PRIMARY_DUE)
    assert (answer.source, answer.label, answer.class_name) == (Source.COLLAGE, 2, "owl")
    assert answer.timings["held"] == pytest.approx(PRIMARY_DUE - 0.02)
    assert decoder.primary_reply(request.id, single(request.id, 1), 0.3) == []
    assert decoder.metrics.late_replies[Source.PRIMARY] == 1


def test_a_collage_after_the_primary_is_due_answers_at_once_under_patient(one):
    decoder, request, group = one
    [answer] = decoder.collage_reply(group, collage(group, [0]), PRIMARY_DUE + 0.01)
    assert answer.source == Source.COLLAGE


def test_failed_primary_lets_a_held_cell_answer_at_once(one):
    decoder, request, group = one
    decoder.collage_reply(group, collage(group, [2]), 0.02)
    [answer] = decoder.worker_failed(request.id, 0.03)
    assert answer.source == Source.COLLAGE


def test_empty_cell_is_never_an_answer(one):
    decoder, request, group = one
    assert decoder.collage_reply(group, collage(group, [EMPTY]), 0.02) == []
    assert decoder.metrics.empty_cells == 1
    [reissue] = decoder.tick(PRIMARY_DUE)  # primary late and backup lost: re-issue
    assert reissue == Reissue(request.id, "w1", 1, optional=True)
    [answer] = decoder.primary_reply(request.id, single(request.id, 0, Source.REPLICA, "w2"), 0.15)
    assert (answer.source, answer.worker_id) == (Source.REPLICA, "w2")


def test_both_late_reissues_once_the_later_of_the_two_is_due(make_request):
    decoder = make_decoder()
    request = make_request(0.0)
    group = group_of([request])
    decoder.admit(request, 0.0, worker_id="w1")
    decoder.add_group(group, 0.08)  # collage due at 0.13, after the primary (0.1)
    assert decoder.next_deadline() == pytest.approx(0.08 + COLLAGE_PATIENCE)
    assert decoder.tick(PRIMARY_DUE) == []
    [reissue] = decoder.tick(0.13)
    assert reissue.exclude_worker == "w1" and reissue.attempt == 1


def test_a_lateness_reissue_is_optional_and_a_skipped_one_keeps_waiting_for_the_primary(make_request):
    decoder = make_decoder()
    request = make_request(0.0, deadline=1.0)
    decoder.admit(request, 0.0, worker_id="w1", backup=False)
    [reissue] = decoder.tick(PRIMARY_DUE)
    assert reissue.optional  # the primary is still running
    assert decoder.reissue_skipped(request.id, PRIMARY_DUE) == []
    assert decoder.pending == 1
    [answer] = decoder.primary_reply(request.id, single(request.id, 2), 0.3)
    assert answer.label == 2 and answer.source == Source.PRIMARY


def test_a_reissue_replacing_a_failed_call_is_not_optional(make_request):
    decoder = make_decoder()
    request = make_request(0.0, deadline=1.0)
    decoder.admit(request, 0.0, worker_id="w1", backup=False)
    [reissue] = decoder.worker_failed(request.id, 0.01)
    assert isinstance(reissue, Reissue) and not reissue.optional


def test_not_yet_grouped_requests_wait_for_their_group(make_request):
    decoder = make_decoder()
    request = make_request(0.0, deadline=1.0)
    decoder.admit(request, 0.0, worker_id="w1")
    assert decoder.next_deadline() == pytest.approx(1.0)  # only the end-to-end deadline
    assert decoder.tick(0.5) == []


def test_requests_without_backup_reissue_when_the_primary_is_late(make_request):
    decoder = make_decoder()
    request = make_request(0.0)
    decoder.admit(request, 0.0, worker_id="w1", backup=False)
    [reissue] = decoder.tick(PRIMARY_DUE)
    assert isinstance(reissue, Reissue)


def test_collage_failure_then_late_primary_reissues(one):
    decoder, request, group = one
    assert decoder.worker_failed(group, 0.02) == []
    [reissue] = decoder.tick(PRIMARY_DUE)
    assert isinstance(reissue, Reissue)


def test_garbage_collage_reply_is_a_lost_backup(one):
    decoder, request, group = one
    bad = Reply(Source.COLLAGE, "c1", (Prediction(1, 0.5),), group_id=group.id)  # 1 cell, not 4
    assert decoder.collage_reply(group, bad, 0.02) == []
    assert decoder.metrics.bad_replies == 1
    assert isinstance(decoder.tick(PRIMARY_DUE)[0], Reissue)


def test_end_to_end_deadline_fails_with_504(make_request):
    decoder = make_decoder()
    request = make_request(0.0, deadline=0.15)
    decoder.admit(request, 0.0, worker_id="w1", backup=False)
    [reissue] = decoder.tick(PRIMARY_DUE)
    assert isinstance(reissue, Reissue)
    assert decoder.next_deadline() == pytest.approx(0.15)  # the replica is due later
    [fail] = decoder.tick(0.15)
    assert isinstance(fail, Fail) and fail.status == 504
    assert isinstance(fail.error(), DeadlineExceededError)
    assert decoder.primary_reply(request.id, single(request.id, 1, Source.REPLICA), 0.2) == []
    assert decoder.metrics.late_replies[Source.REPLICA] == 1


def test_a_held_cell_beats_a_504(make_request):
    decoder = make_decoder()
    request = make_request(0.0, deadline=0.05)  # before the primary is due
    group = group_of([request])
    decoder.admit(request, 0.0)
    decoder.add_group(group, 0.005)
    decoder.collage_reply(group, collage(group, [1]), 0.02)
    [answer] = decoder.tick(0.05)
    assert answer.source == Source.COLLAGE


def test_every_path_failed_without_reissues_is_503(make_request):
    decoder = make_decoder(max_reissues=0)
    request = make_request(0.0)
    group = group_of([request])
    decoder.admit(request, 0.0)
    decoder.add_group(group, 0.005)
    assert decoder.worker_failed(request.id, 0.01) == []  # the collage may still come
    [fail] = decoder.worker_failed(group, 0.02)
    assert fail.status == 503 and isinstance(fail.error(), UnavailableError)


def test_failed_replica_with_reissues_left_reissues_again(make_request):
    decoder = make_decoder(max_reissues=2)
    request = make_request(0.0)
    decoder.admit(request, 0.0, worker_id="w1", backup=False)
    [first] = decoder.worker_failed(request.id, 0.01)
    [second] = decoder.worker_failed(request.id, 0.02)
    assert (first.attempt, second.attempt) == (1, 2)
    [fail] = decoder.worker_failed(request.id, 0.03)
    assert fail.status == 503


def test_bad_primary_label_is_not_an_answer(one):
    decoder, request, group = one
    assert decoder.primary_reply(request.id, single(request.id, EMPTY), 0.01) == []
    assert decoder.metrics.bad_replies == 1
    [answer] = decoder.collage_reply(group, collage(group, [1]), 0.02)  # nothing else to wait for
    assert answer.source == Source.COLLAGE


def test_unknown_replies_are_counted_and_duplicates_rejected(make_request):
    decoder = make_decoder()
    assert decoder.primary_reply("nope", single("nope", 0), 0.0) == []
    assert decoder.metrics.unknown_replies == 1
    request = make_request(0.0)
    decoder.admit(request, 0.0)
    with pytest.raises(ProtocolError):
        decoder.admit(request, 0.0)


def test_latency_windows_see_late_primaries_too(make_request):
    primary = LatencyWindow(8)
    decoder = Decoder(DecoderConfig(CLASSES, policy=DecoderPolicy.FIRST), primary_latencies=primary)
    request = make_request(0.0)
    group = group_of([request])
    decoder.admit(request, 0.0)
    decoder.add_group(group, 0.005)
    decoder.collage_reply(group, collage(group, [1]), 0.02)
    decoder.primary_reply(request.id, single(request.id, 0), 0.3)
    assert primary.quantile(1.0) == pytest.approx(0.3)
    assert decoder.collage_latencies.quantile(1.0) == pytest.approx(0.015)


def test_patience_adapts_to_recent_primary_latencies():
    timeout = AdaptiveTimeout(quantile=0.5, factor=2.0, floor=0.01, ceiling=0.5, initial=0.1, min_samples=3)
    window = LatencyWindow(4)
    assert timeout.of(window) == 0.1
    for latency in (0.02, 0.03, 0.04):
        window.add(latency)
    assert timeout.of(window) == pytest.approx(0.06)
    for latency in (5.0, 5.0, 5.0):
        window.add(latency)
    assert timeout.of(window) == 0.5  # bounded
    with pytest.raises(ConfigError):
        DecoderConfig(())


# -- property: exactly once under any event order ---------------------------------------------


@st.composite
def scenarios(draw):
    grid = draw(st.sampled_from([1, 2, 3]))
    n = draw(st.integers(1, grid * grid))
    events: list[tuple] = [("group",)]
    for i in range(n):
        rid = f"r{i}"
        kind = draw(st.sampled_from(["good", "bad", "fail", "none"]))
        if kind in ("good", "bad"):
            events.append(
                ("single", rid, Source.PRIMARY, draw(st.integers(0, 2)) if kind == "good" else EMPTY)
            )
        elif kind == "fail":
            events.append(("single_failed", rid))
        for _ in range(draw(st.integers(0, 2))):
            if draw(st.booleans()):
                events.append(("single", rid, Source.REPLICA, draw(st.integers(0, 2))))
            else:
                events.append(("single_failed", rid))
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.booleans()):
            events.append(("collage", draw(st.lists(st.integers(0, EMPTY), min_size=n, max_size=n))))
        else:
            events.append(("collage_failed",))
    events += [("tick",)] * draw(st.integers(0, 4))
    order = draw(st.permutations(events))
    times = sorted(draw(st.lists(st.floats(0.0, 0.6), min_size=len(order), max_size=len(order))))
    deadlines = draw(st.lists(st.floats(0.05, 0.5), min_size=n, max_size=n))
    policy = draw(st.sampled_from(list(DecoderPolicy)))
    return grid, deadlines, list(zip(times, order, strict=True)), policy, draw(st.integers(0, 2))


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_each_request_is_finished_exactly_once_in_any_event_order(scenario):
    grid, deadlines, timeline, policy, max_reissues = scenario
    decoder = make_decoder(policy, max_reissues)
    image = np.zeros((4, 4, 1), np.uint8)
    requests = [Request(f"r{i}", image, 0.0, d) for i, d in enumerate(deadlines)]
    group = group_of(requests, grid, closed_at=0.0)
    actions = []
    for request in requests:
        actions += decoder.admit(request, 0.0, worker_id="w1")
    finished: set[str] = set()
    late = 0

    def run(new):
        for action in new:
            if isinstance(action, Answer | Fail):
                finished.add(action.request_id)
        actions.extend(new)

    for now, event in timeline:
        kind = event[0]
        if kind == "group":
            run(decoder.add_group(group, now))
        elif kind == "single":
            late += event[1] in finished
            run(decoder.primary_reply(event[1], single(event[1], event[3], event[2]), now))
        elif kind == "single_failed":
            run(decoder.worker_failed(event[1], now))
        elif kind == "collage":
            late += sum(r.id in finished for r in requests)
            run(decoder.collage_reply(group, collage(group, event[1]), now))
        elif kind == "collage_failed":
            run(decoder.worker_failed(group, now))
        else:
            run(decoder.tick(now))
    run(decoder.tick(10.0))

    assert decoder.pending == 0 and decoder.next_deadline() is None
    terminal = Counter(a.request_id for a in actions if isinstance(a, Answer | Fail))
    assert terminal == Counter(r.id for r in requests)  # each exactly once
    seen: set[str] = set()
    reissues: Counter[str] = Counter()
    for action in actions:
        assert action.request_id not in seen, "an action after the request was finished"
        if isinstance(action, Answer):
            assert 0 <= action.label < EMPTY  # never the empty class
            seen.add(action.request_id)
        elif isinstance(action, Fail):
            assert action.status in (503, 504)
            seen.add(action.request_id)
        else:
            reissues[action.request_id] += 1
    assert all(count <= max_reissues for count in reissues.values())
    assert sum(decoder.metrics.late_replies.values()) == late
