import pytest

from collage_inference.errors import ConfigError
from collage_inference.serving.grouper import Grouper, GroupingPolicy
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
    """Feed n requests at a steady gap; returns the time of the last one."""
    now = start
    for i in range(n):
        now = start + i * gap
        grouper.add(make_request(now), now)
    return now


def test_adaptive_grid_starts_with_the_smallest_grid(make_request):
    grouper = Grouper(GroupingPolicy(grids=(4, 2, 3), timeout=0.02))
    assert grouper.plan()[0] == 2  # no rate estimate yet
    grouper.add(make_request(0.0), 0.0)
    [group] = grouper.flush(0.0)
    assert group.grid == 2


def test_adaptive_grid_picks_the_largest_grid_that_fills_in_time_at_high_rate(make_request):
    grouper = Grouper(GroupingPolicy(grids=(2, 3, 4), timeout=0.02, fill_margin=0.8))
    feed(grouper, make_request, 0.0005, 40)  # 2000 req/s: 15 gaps = 7.5 ms <= 16 ms
    assert grouper.arrival_rate == pytest.approx(2000)
    assert grouper.plan() == (4, 0.02)


def test_adaptive_grid_falls_back_to_the_smallest_grid_at_low_rate(make_request):
    grouper = Grouper(GroupingPolicy(grids=(2, 3, 4), timeout=0.02, fill_margin=0.8))
    feed(grouper, make_request, 0.1, 20)  # 10 req/s: even 3 gaps = 300 ms
    assert grouper.plan()[0] == 2


def test_adaptive_grid_picks_a_middle_grid_at_a_middle_rate(make_request):
    grouper = Grouper(GroupingPolicy(grids=(2, 3, 4), timeout=0.02, fill_margin=0.8))
    feed(grouper, make_request, 0.0015, 40)  # 8 gaps = 12 ms fits 16 ms; 15 gaps = 22.5 ms does not
    assert grouper.plan()[0] == 3


def test_adaptive_grid_follows_a_rate_change(make_request):
    grouper = Grouper(GroupingPolicy(grids=(2, 4), timeout=0.02))
    end = feed(grouper, make_request, 0.0005, 40)
    assert grouper.plan()[0] == 4
    feed(grouper, make_request, 0.05, 30, start=end + 0.05)
    assert grouper.plan()[0] == 2


def test_adaptive_deadline_is_just_the_fill_time_at_high_rate(make_request):
    policy = GroupingPolicy(grids=(2,), grid=2, min_timeout=0.001, max_timeout=0.05, fill_margin=0.5)
    grouper = Grouper(policy)
    feed(grouper, make_request, 0.002, 20)
    grid, timeout = grouper.plan()
    assert grid == 2 and timeout == pytest.approx(3 * 0.002 / 0.5)


def test_adaptive_deadline_is_capped_by_a_fraction_of_primary_latency(make_request):
    latencies = LatencyWindow(16)
    for _ in range(16):
        latencies.add(0.020)
    policy = GroupingPolicy(grids=(2,), grid=2, max_timeout=0.05, latency_fraction=0.5)
    grouper = Grouper(policy, primary_latencies=latencies)
    feed(grouper, make_request, 0.1, 10)  # slow arrivals: would want 375 ms to fill
    assert grouper.plan()[1] == pytest.approx(0.010)
    assert grouper.ceiling() == pytest.approx(0.010)


def test_adaptive_deadline_without_latencies_uses_max_timeout(make_request):
    grouper = Grouper(GroupingPolicy(grids=(3,), grid=3, max_timeout=0.03))
    assert grouper.plan() == (3, 0.03)
    grouper.add(make_request(0.0), 0.0)
    assert grouper.next_deadline() == pytest.approx(0.03)


def test_adaptive_grid_and_deadline_together_close_full_groups_at_high_rate(make_request):
    grouper = Grouper(GroupingPolicy(grids=(2, 3), max_timeout=0.05))
    groups = []
    for i in range(200):
        now = i * 0.001
        groups += grouper.poll(now)
        groups += grouper.add(make_request(now), now)
    later = [g for g in groups if g.id >= 5]
    assert later and all(g.grid == 3 for g in later)
    assert all(g.reason == CloseReason.FULL for g in later)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"grids": ()},
        {"grids": (0, 2)},
        {"grid": 0},
        {"timeout": 0.0},
        {"min_timeout": 0.1, "max_timeout": 0.01},
        {"fill_margin": 1.5},
        {"rate_alpha": 0.0},
        {"latency_quantile": 2.0},
    ],
)
def test_bad_policies_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        GroupingPolicy(**kwargs)
