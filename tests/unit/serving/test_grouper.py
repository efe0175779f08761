import pytest

from collage_inference.errors import ConfigError
from collage_inference.serving.grouper import Grouper, GroupingPolicy, Plan
from collage_inference.serving.latency import LatencyWindow
from collage_inference.serving.types import CloseReason


def fixed(grid: int = 2, timeout: float = 0.01) -> Grouper:
    return Grouper(GroupingPolicy(grids=(grid,), grid=grid, timeout=timeout))


def test_full_group_closes_on_the_kth_request(clock, make_request):
    grouper = fixed(grid=2)
    requests = [make_request(i * 0.001) for i in range(4)]
    for request in requests[:3]:
        assert grouper.add(request, clock.set(request.arrival)) == []
    assert grouper.pending == 3
    [group] = grouper.add(requests[3], clock.set(requests[3].arrival))
    assert group.reason == CloseReason.FULL
    assert group.grid == 2 and group.k == 4 and group.empty_cells == 0
    assert group.request_ids == tuple(r.id for r in requests)
    assert group.opened_at == 0.0 and group.closed_at == pytest.approx(0.003)
    assert grouper.pending == 0 and grouper.next_deadline() is None


def test_group_deadline_closes_a_partial_group(clock, make_request):
    grouper = fixed(grid=3, timeout=0.01)
    grouper.add(make_request(0.0), 0.0)
    grouper.add(make_request(0.002), 0.002)
    assert grouper.next_deadline() == pytest.approx(0.01)  # from the first request's arrival
    assert grouper.poll(0.009) == []
    [group] = grouper.poll(0.01)
    assert group.reason == CloseReason.DEADLINE
    assert len(group.requests) == 2 and group.empty_cells == 7
    assert grouper.poll(1.0) == [] and grouper.next_deadline() is None


def test_add_after_a_missed_poll_closes_the_stale_group_first(make_request):
    grouper = fixed(grid=2, timeout=0.01)
    first = make_request(0.0)
    grouper.add(first, 0.0)
    late = make_request(0.05)
    [stale] = grouper.add(late, 0.05)
    assert stale.reason == CloseReason.DEADLINE and stale.request_ids == (first.id,)
    assert grouper.pending == 1 and grouper.next_deadline() == pytest.approx(0.06)


def test_flush_closes_a_partial_group_and_nothing_when_empty(make_request):
    grouper = fixed(grid=2)
    assert grouper.flush(0.0) == []
    grouper.add(make_request(0.0), 0.0)
    [group] = grouper.flush(0.001)
    assert group.reason == CloseReason.FLUSH and len(group.requests) == 1
    assert grouper.flush(0.002) == []


def test_group_ids_increase_and_cells_follow_arrival_order(make_request):
    grouper = fixed(grid=2)
    groups = []
    for i in range(8):
        groups += grouper.add(make_request(i * 0.001, request_id=f"q{i}"), i * 0.001)
    assert [g.id for g in groups] == [0, 1]
    assert groups[1].request_ids == ("q4", "q5", "q6", "q7")
    assert groups[1].cell_of("q6") == 2


def feed(grouper: Grouper, make_request, gap: float, n: int, start: float = 0.0) -> float:
    """Feed n requests at a steady gap (polling deadlines between them); the last one's time."""
    now = start
    for i in range(n):
        now = start + i * gap
        grouper.poll(now)
        grouper.add(make_request(now), now)
    return now


def window(values: list[float]) -> LatencyWindow:
    w = LatencyWindow(len(values))
    for v in values:
        w.add(v)
    return w


def stragglers(n: int = 200, fast: float = 0.14, slow: float = 0.70, every: int = 50) -> LatencyWindow:
    """Primary latencies like the cloud trace: mostly ``fast``, one in ``every`` at ``slow``."""
    return window([slow if i % every == 0 else fast for i in range(n)])


def adaptive(grids=(3,), grid=3, primaries=None, service=None, workers=1, **kwargs) -> Grouper:
    return Grouper(GroupingPolicy(grids=grids, grid=grid, **kwargs), primaries, service, workers)


def test_the_straggler_window_is_the_straggler_quantile_minus_one_collage_pass():
    grouper = adaptive(primaries=stragglers(), service=window([0.15] * 50))
    assert grouper.straggler_window() == pytest.approx(0.70 - 0.15)
    assert adaptive().straggler_window() is None  # no primaries measured yet


def test_before_enough_samples_the_slowest_call_stands_in_for_the_quantile():
    few = window([0.1] * 30 + [0.5])  # 31 samples: a p99 of 31 samples would be the max anyway
    grouper = adaptive(primaries=few, service=window([0.1] * 30))
    assert grouper.straggler_window() == pytest.approx(0.5 - 0.1)


def test_a_window_too_short_to_fill_closes_the_group_early(make_request):
    # stragglers only 60 ms slower than a 20 ms collage pass; 10 req/s would need 0.8 s to fill
    grouper = adaptive(primaries=window([0.02] * 150 + [0.06] * 10), service=window([0.02] * 50))
    feed(grouper, make_request, 0.1, 20)
    plan = grouper.plan()
    assert plan.window == pytest.approx(0.04)
    assert plan.timeout <= 0.04  # the backup must land before the straggler would
    grouper.add(make_request(5.0), 5.0)
    [group] = grouper.poll(5.0 + plan.timeout)
    assert group.reason == CloseReason.DEADLINE and len(group.requests) == 1


def test_a_long_window_fills_the_group(make_request):
    # the cloud trace's shape: W ~ 0.55 s; 40 req/s fills 9 cells in 0.2 s, well inside it
    grouper = adaptive(primaries=stragglers(), service=window([0.15] * 50))
    end = feed(grouper, make_request, 1 / 40, 90)
    plan = grouper.plan()
    fill = 8 / 40
    assert fill < plan.timeout <= plan.window
    assert plan.timeout == pytest.approx(fill / 0.8, rel=0.05)  # stretched against Poisson jitter
    groups = []
    for i in range(1, 46):
        now = end + i / 40
        groups += grouper.poll(now) + grouper.add(make_request(now), now)
    assert groups and all(g.reason == CloseReason.FULL for g in groups)


def test_a_light_collage_worker_sends_partial_groups_early_and_a_busy_one_waits_to_fill(make_request):
    quick = adaptive(primaries=stragglers(), service=window([0.005] * 50))  # 5 ms collage passes
    feed(quick, make_request, 0.1, 70)  # 10 req/s: 0.8 s to fill, far past W
    light = quick.plan()
    assert light.timeout < 0.2 and light.utilisation < 0.7

    slow = adaptive(primaries=stragglers(), service=window([0.15] * 50))  # passes as slow as an s-CNN's
    feed(slow, make_request, 0.1, 70)
    busy = slow.plan()
    assert busy.timeout > light.timeout  # near-empty collages would flood the collage worker
    assert busy.utilisation is not None and busy.utilisation < 0.7


def test_a_second_collage_worker_allows_an_earlier_deadline(make_request):
    plans = []
    for workers in (1, 2):
        grouper = adaptive(primaries=stragglers(), service=window([0.15] * 50), workers=workers)
        feed(grouper, make_request, 0.1, 70)
        plans.append(grouper.plan())
    assert plans[1].timeout < plans[0].timeout


def test_when_even_full_groups_overload_the_collage_worker_the_deadline_is_the_window(make_request):
    grouper = adaptive(primaries=stragglers(), service=window([0.15] * 50))
    feed(grouper, make_request, 1 / 60, 100)  # 60 req/s / 9 per collage * 0.15 s = 1.0 busy
    plan = grouper.plan()
    assert plan.timeout == pytest.approx(plan.window) and plan.rescue is None


def test_simultaneous_arrivals_fill_at_once(make_request):
    grouper = adaptive(primaries=stragglers(), service=window([0.15] * 50))
    for _ in range(3):
        groups = []
        for _ in range(9):
            groups += grouper.add(make_request(1.0), 1.0)
        assert [g.reason for g in groups] == [CloseReason.FULL]
    assert grouper.arrival_rate == float("inf")


def test_without_measurements_the_initial_deadline_and_smallest_grid_apply(make_request):
    grouper = Grouper(GroupingPolicy(grids=(4, 2, 3), initial_timeout=0.03))
    assert grouper.plan() == Plan(2, 0.03)
    grouper.add(make_request(0.0), 0.0)
    assert grouper.next_deadline() == pytest.approx(0.03)


def test_before_latencies_are_measured_groups_fill_at_the_measured_rate(make_request):
    grouper = adaptive(initial_timeout=0.5)
    feed(grouper, make_request, 0.01, 5)  # 100 req/s: 8 more requests take 80 ms
    assert grouper.plan().timeout == pytest.approx(0.08 / 0.8)
    slow = adaptive(initial_timeout=0.5)
    feed(slow, make_request, 1.0, 3)  # 1 req/s: filling would take 8 s
    assert slow.plan().timeout == pytest.approx(0.5)


def test_a_collage_behind_more_than_the_window_of_work_is_not_worth_sending():
    grouper = adaptive(primaries=stragglers(), service=window([0.15] * 50))  # W = 0.55 s
    assert grouper.worth_sending(0) and grouper.worth_sending(3)  # 0.45 s of work ahead
    assert not grouper.worth_sending(4)  # 0.60 s: it would land after the stragglers
    two = adaptive(primaries=stragglers(), service=window([0.15] * 50), workers=2)
    assert two.worth_sending(4)
    assert adaptive().worth_sending(100)  # nothing measured: no grounds to skip


def test_adaptive_grid_prefers_a_bigger_grid_when_the_collage_worker_is_busy(make_request):
    grouper = adaptive(grids=(2, 3, 4), grid=None, primaries=stragglers(), service=window([0.15] * 50))
    feed(grouper, make_request, 1 / 40, 100)  # S=2 would need 10 collages/s (1.5 busy)
    assert grouper.plan().grid == 4
    light = adaptive(grids=(2, 3, 4), grid=None, primaries=stragglers(), service=window([0.005] * 50))
    feed(light, make_request, 1 / 40, 100)
    assert light.plan().grid == 2  # cheap collages: the smallest, most accurate grid


def test_a_fixed_deadline_picks_the_largest_grid_that_fills_within_it(make_request):
    grouper = Grouper(GroupingPolicy(grids=(2, 3, 4), timeout=0.02, fill_margin=0.8))
    feed(grouper, make_request, 0.0015, 40)  # 8 gaps = 12 ms fits 16 ms; 15 gaps = 22.5 ms does not
    assert grouper.plan() == Plan(3, 0.02)
    assert grouper.arrival_rate == pytest.approx(1 / 0.0015)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"grids": ()},
        {"grids": (0, 2)},
        {"grid": 0},
        {"timeout": 0.0},
        {"min_timeout": 0.1, "initial_timeout": 0.01},
        {"fill_margin": 1.5},
        {"max_utilisation": 0.0},
        {"straggler_quantile": 2.0},
        {"rate_window": 1},
        {"grid_tolerance": -1.0},
    ],
)
def test_bad_policies_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        GroupingPolicy(**kwargs)


def test_a_grouper_needs_a_collage_worker():
    with pytest.raises(ConfigError):
        Grouper(collage_workers=0)
