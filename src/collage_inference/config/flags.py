"""The command-line flags that set config keys, named as the keys (``--request-timeout`` is
``request_timeout``), and the overrides they give."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from collage_inference.config.common import SLOWDOWN_FLAGS
from collage_inference.modes import MODES, REISSUE_TARGETS, DecoderPolicy
from collage_inference.parm import ENCODERS
from collage_inference.slowdown import KINDS


def add_frontend_arguments(parser: argparse.ArgumentParser) -> None:
    """The front end's flags (``collage frontend`` and ``collage serve``), named as the config
    keys; each defaults to None, so the config file (or the default written above) holds."""
    p = parser
    p.add_argument("--mode", choices=tuple(MODES), help="redundancy strategy (default collage)")
    p.add_argument("--grid", help="collage side S (k = S*S), or 'auto' (default 3)")
    p.add_argument(
        "--policy", choices=[d.value for d in DecoderPolicy], help="decoder policy (default confident)"
    )
    p.add_argument(
        "--confident-at", type=float, help="policy confident: the cell confidence that answers at once"
    )
    p.add_argument("--group-timeout", type=float, help="group deadline, seconds (default adaptive)")
    p.add_argument("--parity-k", type=int, help="mode parm: requests per parity query, 2 or 4 (default 4)")
    p.add_argument("--parity-encoder", choices=ENCODERS, help="mode parm: parity code (default concat)")
    p.add_argument("--request-timeout", type=float, help="end-to-end deadline, seconds (504 past it)")
    p.add_argument("--replicate-timeout", type=float, help="re-issue timeout of mode replicate, seconds")
    p.add_argument(
        "--reissue-to", choices=REISSUE_TARGETS, help="where re-issues for lateness go (default idle)"
    )
    p.add_argument("--max-pending", type=int, help="requests in flight before 429")
    p.add_argument("--model-name", help="the model name clients use in the front end's V2 URLs")
    p.add_argument("--host", help="front end address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="front end port; 0 picks a free one (default 8000)")
    p.add_argument(
        "--token-file", type=Path, help="file holding the shared bearer token (default: $COLLAGE_TOKEN)"
    )
    p.add_argument("--scnn", action="append", metavar="URL#MODEL", help="an s-CNN V2 server (repeat)")
    p.add_argument("--collage", action="append", metavar="URL#MODEL", help="a collage V2 server (repeat)")


def add_slowdown_arguments(group: argparse._ActionsContainer) -> None:
    """The straggler-injection flags of every command that starts workers (``[slowdown]`` keys)."""
    group.add_argument(
        "--slowdown", help="delay sampler: none, bimodal[:SCALE], trace:PATH[:SCALE], pareto:..."
    )
    group.add_argument("--slowdown-kind", choices=KINDS, help="how delays apply (default per-request)")
    group.add_argument("--seed", type=int, help="seed of the delays (worker i of a cluster: seed + i)")
    group.add_argument("--contention", type=float, help="CPU fraction burnt beside each slow worker")
    group.add_argument("--slow-onset-rate", type=float, help="per-instance: slow periods per second")
    group.add_argument("--slow-period", type=float, help="per-instance: mean slow period, seconds")


def slowdown_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The values of :func:`add_slowdown_arguments`' flags given, by ``[slowdown]`` key."""
    flags = {k: f for k, f in SLOWDOWN_FLAGS.items() if k not in ("workers", "collage")}
    return {key: getattr(args, flag) for key, flag in flags.items() if getattr(args, flag) is not None}


FRONTEND_FLAG_KEYS = (
    "mode", "grid", "parity_k", "parity_encoder", "policy", "confident_at", "group_timeout",
    "request_timeout", "replicate_timeout",
    "reissue_to", "max_pending", "model_name", "host", "port", "token_file", "scnn", "collage",
)  # fmt: skip


def frontend_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The values of :func:`add_frontend_arguments`' flags, as config keys (None: not given)."""
    return {key: getattr(args, key) for key in FRONTEND_FLAG_KEYS}
