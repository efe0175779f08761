"""Prometheus metrics of the front end, rendered by hand in the text exposition format.

Request counters and durations follow Triton's naming (``nv_inference_*``) so existing
dashboards read them; collage-specific series use the ``collage_`` prefix: answers by source,
straggler detections, group sizes, late replies dropped, load shed, worker health.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections import Counter
from collections.abc import Iterable

from collage_inference.serving.types import Answer, Group

WorkerGauges = tuple[str, str, int, int, int]  # id, url, up, outstanding, calls
DURATION_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    """Counters kept by the front end; :meth:`render` writes the exposition text."""

    def __init__(self, model: str = "classifier") -> None:
        self.model = model
        self.success = 0
        self.failures: Counter[int] = Counter()
        self.answers: Counter[str] = Counter()
        self.duration_sum = 0.0
        self.queue_sum = 0.0
        self.compute_sum = 0.0
        self.duration_counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last one: above every bound
        self.group_sizes: Counter[int] = Counter()
        self.group_reasons: Counter[str] = Counter()
        self.reissues = 0
        self.reissues_skipped = 0  # lateness re-issues not sent: no idle worker (reissue_to idle)
        self.group_deadline = 0.0  # the deadline the grouper gave the newest group, seconds
        self.straggler_window = 0.0  # the grouper's straggler window W when it opened that group
        self.collages_skipped = 0  # groups whose collage could not land before their stragglers
        self.worker_errors = 0
        self.shed = 0
        self.bad_requests = 0
        self.cancelled = 0  # pending s-CNN calls cancelled once their request was answered
        # What the decoder alone sees: replies it dropped, and cells that were no answer.
        self.late_replies: Counter[str] = Counter()  # by source: their request was already answered
        self.unknown_replies = 0  # for requests never admitted or long forgotten
        self.empty_cells = 0  # collage cells of real requests that came back ``empty``
        self.bad_replies = 0  # replies with a missing or out-of-range label

    def observe_answer(self, answer: Answer) -> None:
        self.success += 1
        self.answers[str(answer.source)] += 1
        self.duration_sum += answer.latency
        self.queue_sum += answer.timings.get("queue", 0.0)
        self.compute_sum += answer.timings.get("compute", 0.0)
        # Counted in its one bucket here; the cumulative counts Prometheus wants are summed in render.
        self.duration_counts[bisect.bisect_left(DURATION_BUCKETS, answer.latency)] += 1

    def observe_failure(self, status: int) -> None:
        self.failures[status] += 1

    def observe_group(self, group: Group, deadline: float | None = None, window: float | None = None) -> None:
        self.group_sizes[len(group.requests)] += 1
        self.group_reasons[str(group.reason)] += 1
        if deadline is not None:
            self.group_deadline = deadline
        if window is not None:
            self.straggler_window = window

    @property
    def stragglers(self) -> int:
        """Requests whose primary was too late: answered by another path or re-issued."""
        return self.answers["collage"] + self.reissues

    def render(self, workers: Iterable[WorkerGauges] = (), in_flight: int = 0) -> str:
        """The exposition text, with one sample per worker in each per-worker family."""
        workers = list(workers)
        m = f'model="{self.model}",version="1"'
        lines: list[str] = []
        one = lambda value: [("", value)]  # noqa: E731  (a family with a single, unlabelled sample)
        bucket_counts = zip(DURATION_BUCKETS, itertools.accumulate(self.duration_counts[:-1]), strict=True)
        families = [
            ("nv_inference_request_success", "counter", "Successful inference requests", [(m, self.success)]),
            ("nv_inference_request_failure", "counter", "Failed inference requests",
             [(m, sum(self.failures.values()))]),
            ("nv_inference_count", "counter", "Inferences performed", [(m, self.success)]),
            ("nv_inference_request_duration_us", "counter", "Cumulative end-to-end request duration",
             [(m, round(self.duration_sum * 1e6))]),
            ("nv_inference_queue_duration_us", "counter", "Cumulative worker queue duration of answers",
             [(m, round(self.queue_sum * 1e6))]),
            ("nv_inference_compute_infer_duration_us", "counter", "Cumulative worker compute of answers",
             [(m, round(self.compute_sum * 1e6))]),
            ("collage_answers_total", "counter", "Answers by the path that gave them",
             [(f'source="{s}"', self.answers[s]) for s in ("primary", "collage", "replica")]),
            ("collage_failures_total", "counter", "Requests failed, by HTTP status",
             [(f'status="{s}"', n) for s, n in sorted(self.failures.items())]),
            ("collage_straggler_detections_total", "counter",
             "Requests whose primary was late: answered by the collage or re-issued", one(self.stragglers)),
            ("collage_reissues_total", "counter", "s-CNN calls re-issued to another worker",
             one(self.reissues)),
            ("collage_reissues_skipped_total", "counter",
             "Re-issues for lateness not sent because no worker was idle (reissue_to idle)",
             one(self.reissues_skipped)),
            ("collage_collages_skipped_total", "counter",
             "Groups whose collage was not sent: the collage worker's backlog outlasted the straggler window",
             one(self.collages_skipped)),
            ("collage_group_deadline_seconds", "gauge",
             "The group deadline the grouper chose for the newest group", one(self.group_deadline)),
            ("collage_straggler_window_seconds", "gauge",
             "The straggler window W (p99 of primary latencies minus one collage pass) for the newest group",
             one(self.straggler_window)),
            ("collage_group_size_total", "counter", "Groups closed, by requests in the group",
             [(f'size="{s}"', n) for s, n in sorted(self.group_sizes.items())]),
            ("collage_groups_closed_total", "counter", "Groups closed, by reason",
             [(f'reason="{r}"', n) for r, n in sorted(self.group_reasons.items())]),
            ("collage_worker_errors_total", "counter", "Worker calls that failed", one(self.worker_errors)),
            ("collage_shed_total", "counter", "Requests refused with 429 (overload)", one(self.shed)),
            ("collage_bad_requests_total", "counter", "Requests refused with 4xx", one(self.bad_requests)),
            ("collage_cancelled_calls_total", "counter",
             "Pending s-CNN calls cancelled because their request was answered (transports that can cancel)",
             one(self.cancelled)),
            ("collage_decoder_late_replies", "gauge", "Replies dropped because their request was answered",
             one(sum(self.late_replies.values()))),
            ("collage_requests_in_flight", "gauge", "Requests admitted and not yet answered", one(in_flight)),
            *((name, "gauge", help_text, [(f'worker="{w[0]}",url="{w[1]}"', w[i]) for w in workers])
              for name, help_text, i in (("collage_worker_up", "1 when the worker is taking requests", 2),
                                         ("collage_worker_outstanding", "Calls in flight to the worker", 3),
                                         ("collage_worker_calls", "Calls sent to the worker", 4))),
        ]  # fmt: skip
        for name, kind, help_text, samples in families:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{{{labels}}} {value:g}" for labels, value in samples]
        lines += [
            "# HELP collage_request_duration_seconds End-to-end latency of answered requests",
            "# TYPE collage_request_duration_seconds histogram",
            *(f'collage_request_duration_seconds_bucket{{{m},le="{b:g}"}} {c}' for b, c in bucket_counts),
            f'collage_request_duration_seconds_bucket{{{m},le="+Inf"}} {self.success}',
            f"collage_request_duration_seconds_sum{{{m}}} {self.duration_sum:g}",
            f"collage_request_duration_seconds_count{{{m}}} {self.success}",
        ]
        return "\n".join(lines) + "\n"


_SAMPLE = re.compile(r"(\w+)(?:\{(.*)\})? (\S+)")


def metric_total(found: dict[tuple[str, str], float], name: str, labels: str = "") -> float:
    """The sum of the samples of ``name`` (from :func:`parse_metrics`) whose labels contain ``labels``."""
    return sum(v for (n, lab), v in found.items() if n == name and labels in lab)


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """Exposition text back to {(name, labels): value}, for clients, tests and the harness."""
    found = {}
    for line in text.splitlines():
        match = _SAMPLE.fullmatch(line)
        if match and not line.startswith("#"):
            found[(match[1], match[2] or "")] = float(match[3])
    return found
