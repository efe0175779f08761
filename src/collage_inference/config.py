"""The serving config: typed, validated, loaded from a TOML file and overridable by flags.

    config = load_config(Path("examples/local.toml"), {"mode": "replicate", "grid": "auto"})

One frozen :class:`ServeConfig` describes a whole deployment: the redundancy mode and grid, the
front end's knobs, and its workers. Workers are either *local* (the launcher starts them from
the models in ``models_dir``, optionally straggling on purpose) or *remote* (``[[scnn]]`` and
``[[collage]]`` tables list V2 model servers already running anywhere; the launcher then starts
only the front end). File keys and flags share names (``request_timeout`` is
``--request-timeout``), so every :class:`ConfigError` names both, says what was wrong and how to
fix it. Relative paths in a file are relative to the file, so a config can ship beside the
models it names.

File layout (every key optional)::

    mode = "collage"          # none | equal | replicate | hedge | replicate-all | collage | collage-2 | parm
    grid = 3                  # collage side S (k = S*S), or "auto"
    parity_k = 4              # mode parm: requests per parity query (2 or 4)
    parity_encoder = "concat" # mode parm: concat | sum (collage_inference.parm)
    policy = "confident"      # confident | patient | first
    confident_at = 0.9        # policy confident: a collage cell this sure answers at once
    group_timeout = 0.01      # seconds; omit for the adaptive group deadline
    request_timeout = 5.0
    replicate_timeout = 0.1
    reissue_to = "idle"       # or "least-loaded": where a re-issue for lateness goes
    max_pending = 4096
    model_name = "classifier"
    host = "127.0.0.1"
    port = 8000
    models_dir = "../models/fashion-mnist"
    threads = 1               # engine threads per local worker
    scnn_workers = 9          # omit: what the mode needs for k
    ready_timeout = 60.0
    restart = true            # restart local workers that die
    token_file = "token.txt"  # shared bearer token for clients and workers (or $COLLAGE_TOKEN)

    [slowdown]                # straggler injection into local workers (off by default)
    spec = "pareto:alpha=1.5,scale=0.05"
    kind = "per-request"      # per-request | per-instance
    seed = 0
    workers = [0]             # which s-CNN workers straggle; omit for all of them
    collage = false           # whether collage workers straggle too
    contention = 0.0
    onset_rate = 0.05
    period = 2.0

    [[scnn]]                  # remote workers instead of local ones
    url = "http://10.0.0.5:8001"
    model = "scnn"

    backend = "local"         # local (processes on this machine) | ray (Ray Serve deployments)
    [ray]                     # the Ray Serve backend (see docs/ray.md and examples/ray.toml)
    address = "local"         # local: a private Ray on this machine | auto | ray://HOST:10001
    scnn_replicas = 9         # omit: what the mode needs; ignored under autoscaling
    scnn_cpus = 1.0           # logical CPUs reserved per s-CNN replica (fractions allowed)
    autoscaling = false       # then min/max_replicas and target_ongoing_requests apply
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from collage_inference.errors import ConfigError
from collage_inference.modes import MODES, REISSUE_TARGETS, DecoderPolicy, Mode
from collage_inference.parm import CONCAT_KS, ENCODERS
from collage_inference.slowdown import KINDS, parse_slowdown

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODELS_DIR = Path(os.environ.get("COLLAGE_MODELS_DIR", REPO_ROOT / "models" / "fashion-mnist"))
AUTO = "auto"
AUTO_GRIDS = (2, 3, 4)  # the collage grids ``grid = "auto"`` serves when their models exist
AUTO_SIZING_GRID = 3  # with ``grid = "auto"``, s-CNN workers are sized for k = 3 x 3 by default
MAX_GRID = 8
COLLAGE_SEED_OFFSET = 1000  # collage worker i draws its delays with seed + 1000 + i
# [slowdown] keys -> the flags of `collage serve` (and of `collage worker`, where they exist)
SLOWDOWN_FLAGS = {"spec": "slowdown", "kind": "slowdown_kind", "workers": "slow_workers",
                  "collage": "slow_collage", "onset_rate": "slow_onset_rate", "period": "slow_period",
                  "seed": "seed", "contention": "contention"}  # fmt: skip


def _flag(key: str) -> str:
    """The command-line flag of a config key: ``slowdown.seed`` -> ``--seed``."""
    if key.startswith("ray."):
        return "--address" if key == "ray.address" else f"[ray] {key.removeprefix('ray.')}"
    flag = SLOWDOWN_FLAGS.get(key.removeprefix("slowdown."), key) if key.startswith("slowdown.") else key
    return "--" + flag.replace("_", "-")


def _bad(key: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"`{key}` ({_flag(key)}) {problem}; {fix}")


def _number(
    value: Any,
    key: str,
    *,
    integer: bool = False,
    low: float = 0.0,
    strict: bool = True,
    high: float = math.inf,
) -> Any:
    """Check a number (ints allowed where floats are); ``strict``: above ``low``, else at least;
    at most ``high``."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise _bad(key, f"must be {kind}, got {value!r}", f"write e.g. {key.split('.')[-1]} = {low + 1:g}")
    if value < low or (strict and value == low):
        bound = f"above {low:g}" if strict else f"at least {low:g}"
        raise _bad(key, f"must be {bound}, got {value!r}", "give a larger value")
    if value > high:
        raise _bad(key, f"must be at most {high:g}, got {value!r}", "give a smaller value")
    return value


def _choice(value: Any, key: str, choices: tuple[str, ...] | list[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _bad(key, f"is {value!r}", f"choose one of {', '.join(choices)}")
    return value


FACT_KEYS = ("kind", "grid", "labels", "image_size", "channels")  # what the front end must know of a model
CONTRACTS = ("image", "tensor")


@dataclass(frozen=True)
class WorkerEndpoint:
    """A V2 model server the front end calls: its base URL, the model name in its URLs, and,
    where the server does not publish them, the model's facts: from ``model_file`` (an exported
    ONNX file's metadata) and explicit ``facts`` (kind, grid, labels, image_size, channels),
    which override the file. ``contract``: ``image`` (a collage-inference worker: UINT8 images
    in, probabilities out) or ``tensor`` (the exported model's own: FP32 N,C,H,W in, logits
    out); None: read from the server's metadata."""

    url: str
    model: str
    model_file: Path | None = None
    contract: str | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"worker url {self.url!r} must look like http://HOST:PORT")
        if "#" in self.url or not self.url.partition("://")[2].strip("/"):
            raise ConfigError(f"worker url {self.url!r} must look like http://HOST:PORT (no '#')")
        if not isinstance(self.model, str) or not self.model or "/" in self.model:
            raise ConfigError(
                f'worker {self.url} needs `model`, the model name in its V2 URLs, e.g. model = "scnn"'
            )
        if self.contract is not None and self.contract not in CONTRACTS:
            raise ConfigError(f"worker {self.url}: contract is {self.contract!r}; choose image or tensor")
        if self.model_file is not None:
            object.__setattr__(self, "model_file", Path(self.model_file).expanduser())
            if not self.model_file.is_file():
                raise ConfigError(f"worker {self.url}: model_file {self.model_file} is not a file")
        unknown = set(self.facts) - set(FACT_KEYS)
        if unknown:
            raise ConfigError(
                f"worker {self.url}: unknown keys {sorted(unknown)}; facts are {', '.join(FACT_KEYS)}"
            )
        object.__setattr__(self, "facts", MappingProxyType(dict(self.facts)))

    @property
    def arg(self) -> str:
        """The front end's ``--scnn`` / ``--collage`` value: ``URL#MODEL[@MODEL_FILE]``."""
        base = f"{self.url.rstrip('/')}#{self.model}"
        return f"{base}@{self.model_file}" if self.model_file else base

    def table(self) -> dict[str, Any]:
        """As a ``[[scnn]]`` / ``[[collage]]`` table (what a settings file holds)."""
        table: dict[str, Any] = {"url": self.url, "model": self.model, **self.facts}
        if self.model_file is not None:
            table["model_file"] = str(self.model_file)
        if self.contract is not None:
            table["contract"] = self.contract
        return table


@dataclass(frozen=True)
class SlowdownSettings:
    """Straggler injection into local workers. ``workers``: the s-CNN worker indexes that
    straggle (None: all). Worker i draws with seed ``seed + i`` so workers do not straggle in
    lockstep."""

    spec: str = "none"
    kind: str = "per-request"
    seed: int = 0
    workers: tuple[int, ...] | None = None
    collage: bool = False
    contention: float = 0.0
    onset_rate: float = 0.05
    period: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str):
            raise _bad("slowdown.spec", f"must be a string, got {self.spec!r}", 'e.g. spec = "bimodal"')
        _choice(self.kind, "slowdown.kind", KINDS)
        _number(self.seed, "slowdown.seed", integer=True, strict=False)
        _number(self.onset_rate, "slowdown.onset_rate")
        _number(self.period, "slowdown.period")
        if not isinstance(self.collage, bool):
            raise _bad("slowdown.collage", f"must be true or false, got {self.collage!r}", "collage = false")
        if not isinstance(self.contention, int | float) or not 0.0 <= self.contention <= 1.0:
            raise _bad("slowdown.contention", f"is {self.contention!r}", "give a CPU fraction in [0, 1]")
        if self.workers is not None:
            if isinstance(self.workers, list):
                object.__setattr__(self, "workers", tuple(self.workers))
            if not isinstance(self.workers, tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.workers
            ):
                raise _bad("slowdown.workers", f"is {self.workers!r}", "list s-CNN worker indexes: [0, 2]")
        try:  # fail now, not in every worker process
            parse_slowdown(self.spec, self.kind, self.seed, self.onset_rate, self.period)
        except ConfigError as exc:
            raise _bad("slowdown.spec", f"is invalid: {exc}", "fix the spec") from exc

    @property
    def active(self) -> bool:
        return self.spec.strip() != "none" or self.contention > 0

    def slows(self, kind: str, index: int) -> bool:
        """Whether worker ``index`` of ``kind`` (scnn or collage) straggles."""
        if not self.active:
            return False
        if kind == "collage":
            return self.collage
        return self.workers is None or index in self.workers

    def for_worker(self, kind: str, index: int) -> SlowdownSettings | None:
        """How worker ``index`` of ``kind`` straggles: these settings with its own seed
        (``seed + index``; collage workers ``seed + 1000 + index``), or None if it does not."""
        if not self.slows(kind, index):
            return None
        return replace(self, seed=self.seed + index + (COLLAGE_SEED_OFFSET if kind == "collage" else 0))

    def describe(self) -> str:
        note = f"{self.spec} ({self.kind}, seed {self.seed})"
        return f"{note}, contention {self.contention:g}" if self.contention else note


@dataclass(frozen=True)
class Limits:
    """Bounds on what a server accepts, so one request cannot exhaust its memory or sockets."""

    max_body_bytes: int = 64 * 2**20
    max_elements: int = 2**24
    body_timeout: float = 10.0  # seconds a client may take to send its head and body (slow clients)


BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class RaySettings:
    """The Ray Serve backend: where Ray runs and how each deployment is sized.

    ``address``: ``local`` starts a private Ray instance on this machine (``num_cpus`` of its
    CPUs, all when omitted) and stops it afterwards; ``auto`` or ``ray://HOST:PORT`` joins a
    running cluster and leaves it running. Replica counts, CPUs per replica and the
    autoscaling bounds apply to the s-CNN deployment; the collage deployments (one per grid)
    and the front end's ingress take their own counts and CPUs. The engine threads per replica
    are the top-level ``threads``.
    """

    address: str = "local"
    num_cpus: float | None = None
    object_store_mb: int | None = None
    scnn_replicas: int | None = None
    collage_replicas: int = 1
    ingress_replicas: int = 1
    scnn_cpus: float = 1.0
    collage_cpus: float = 1.0
    ingress_cpus: float = 1.0
    max_ongoing_requests: int = 16
    autoscaling: bool = False
    min_replicas: int = 1
    max_replicas: int = 16
    target_ongoing_requests: float = 2.0
    app_name: str = "collage"

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or not (
            self.address in ("local", "auto") or self.address.startswith("ray://") or ":" in self.address
        ):
            raise _bad("ray.address", f"is {self.address!r}", 'give "local", "auto" or "ray://HOST:10001"')
        for key in ("num_cpus", "scnn_cpus", "collage_cpus", "ingress_cpus", "target_ongoing_requests"):
            if getattr(self, key) is not None:
                _number(getattr(self, key), f"ray.{key}")
        for key in ("collage_replicas", "ingress_replicas", "max_ongoing_requests", "min_replicas",
                    "max_replicas", "scnn_replicas", "object_store_mb"):  # fmt: skip
            if getattr(self, key) is not None:
                _number(getattr(self, key), f"ray.{key}", integer=True)
        if not isinstance(self.autoscaling, bool):
            raise _bad(
                "ray.autoscaling", f"must be true or false, got {self.autoscaling!r}", "autoscaling = true"
            )
        if self.min_replicas > self.max_replicas:
            raise _bad("ray.min_replicas", f"({self.min_replicas}) exceeds max_replicas", "lower it")
        if not isinstance(self.app_name, str) or not self.app_name or "/" in self.app_name:
            raise _bad("ray.app_name", f"is {self.app_name!r}", "give a non-empty name without '/'")

    @property
    def owns_cluster(self) -> bool:
        """True when the launcher starts (and later stops) a private Ray instance."""
        return self.address == "local"


def _port(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise _bad(key, f"is {value!r}", "give a port in 0..65535 (0 picks a free one)")


@dataclass(frozen=True)
class WorkerSettings:
    """One model worker: the model it serves, where it listens, its bounds and how it straggles.

    ``slowdown`` is this worker's own (its seed already chosen); None: it does not straggle.
    """

    model_path: Path
    backend: str = "onnx"
    threads: int = 1
    name: str | None = None  # the model name in its V2 URLs; None: the model's own name
    host: str = "127.0.0.1"
    port: int = 8001
    max_queue: int = 64  # calls admitted (waiting plus computing) before 429
    max_batch: int = 256  # images per call before 413
    limits: Limits = field(default_factory=Limits)
    slowdown: SlowdownSettings | None = None
    token_file: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_path", Path(self.model_path))
        _number(self.threads, "threads", integer=True)
        _number(self.max_queue, "max_queue", integer=True)
        _number(self.max_batch, "max_batch", integer=True)
        _port(self.port, "port")
        if isinstance(self.limits, dict):
            object.__setattr__(self, "limits", Limits(**self.limits))
        if isinstance(self.slowdown, dict):
            object.__setattr__(self, "slowdown", SlowdownSettings(**self.slowdown))
        if self.token_file is not None:
            object.__setattr__(self, "token_file", Path(self.token_file))

    def dump(self, path: Path) -> Path:
        """Write these settings as JSON (what a launcher hands a worker process)."""
        path.write_text(json.dumps(asdict(self), default=str))
        return path

    @classmethod
    def load(cls, path: Path | str) -> WorkerSettings:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read worker settings from {path}: {exc}") from exc


@dataclass(frozen=True)
class FrontEndSettings:
    """The front end's knobs: what every launcher hands the front end, each default written here."""

    mode: str = "collage"
    grid: int | str = 3
    policy: str = "confident"
    confident_at: float = 0.9  # policy confident: a collage cell this sure answers at once
    group_timeout: float | None = None  # None: the adaptive group deadline
    parity_k: int = 4  # mode parm: requests per parity query
    parity_encoder: str = "concat"  # mode parm: how the parity query is coded
    request_timeout: float = 5.0  # end-to-end deadline; past it the client gets 504
    replicate_timeout: float = 0.1  # the fixed re-issue timeout of mode ``replicate``
    reissue_to: str = "idle"  # or "least-loaded": where a re-issue for lateness goes
    max_pending: int = 4096  # requests in flight, or s-CNN calls outstanding, before 429
    model_name: str = "classifier"  # the model name clients use in the front end's V2 URLs

    def __post_init__(self) -> None:
        _choice(self.mode, "mode", tuple(MODES))
        if isinstance(self.grid, str) and self.grid != AUTO:
            if not self.grid.isdigit():
                raise _bad("grid", f"is {self.grid!r}", f'give the collage side 2..{MAX_GRID} or "auto"')
            object.__setattr__(self, "grid", int(self.grid))
        if self.grid != AUTO and (
            isinstance(self.grid, bool) or not isinstance(self.grid, int) or not 2 <= self.grid <= MAX_GRID
        ):
            raise _bad("grid", f"is {self.grid!r}", f'give the collage side 2..{MAX_GRID} or "auto"')
        _choice(self.policy, "policy", [p.value for p in DecoderPolicy])
        _choice(self.reissue_to, "reissue_to", REISSUE_TARGETS)
        _number(self.confident_at, "confident_at", strict=False, high=1.0)  # a probability
        if self.group_timeout is not None:
            _number(self.group_timeout, "group_timeout")
        _choice(self.parity_encoder, "parity_encoder", ENCODERS)
        if self.parity_k not in CONCAT_KS:  # the shipped parity models; the sum code would take any k
            raise _bad("parity_k", f"is {self.parity_k!r}", f"give one of {', '.join(map(str, CONCAT_KS))}")
        _number(self.request_timeout, "request_timeout")
        _number(self.replicate_timeout, "replicate_timeout")
        _number(self.max_pending, "max_pending", integer=True)
        if not isinstance(self.model_name, str) or not self.model_name or "/" in self.model_name:
            raise _bad("model_name", f"is {self.model_name!r}", "give a non-empty name without '/'")

    @property
    def redundancy(self) -> Mode:
        """The mode's row of settings."""
        return MODES[self.mode]

    @property
    def fixed_grid(self) -> int | None:
        """The collage side, or None under ``grid = "auto"`` (the grouper picks S)."""
        return None if self.grid == AUTO else int(self.grid)


@dataclass(frozen=True)
class ServeConfig(FrontEndSettings):
    """A whole deployment: front end, mode, and local or remote workers (see the module doc)."""

    host: str = "127.0.0.1"
    port: int = 8000
    models_dir: Path = DEFAULT_MODELS_DIR
    threads: int = 1
    scnn_workers: int | None = None
    ready_timeout: float = 60.0
    restart: bool = True
    token_file: Path | None = None  # the shared bearer token; None: $COLLAGE_TOKEN, if set
    slowdown: SlowdownSettings = field(default_factory=SlowdownSettings)
    scnn: tuple[WorkerEndpoint, ...] = ()
    collage: tuple[WorkerEndpoint, ...] = ()
    backend: str = "local"
    ray: RaySettings = field(default_factory=RaySettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice(self.backend, "backend", BACKENDS)
        if self.backend == "ray" and (self.scnn or self.collage):
            raise ConfigError(
                "backend ray serves the models as Ray Serve deployments; it cannot front listed "
                "[[scnn]] / [[collage]] V2 servers: remove those tables or use backend local"
            )
        _number(self.threads, "threads", integer=True)
        _number(self.ready_timeout, "ready_timeout")
        if self.scnn_workers is not None:
            _number(self.scnn_workers, "scnn_workers", integer=True)
        _port(self.port, "port")
        if not isinstance(self.host, str) or not self.host or "/" in self.host:
            raise _bad("host", f"is {self.host!r}", "give a non-empty name without '/'")
        if not isinstance(self.restart, bool):
            raise _bad("restart", f"must be true or false, got {self.restart!r}", "restart = true")
        if not isinstance(self.models_dir, Path):
            object.__setattr__(self, "models_dir", Path(self.models_dir))
        if self.token_file is not None:
            object.__setattr__(self, "token_file", Path(self.token_file).expanduser())
            if not self.token_file.is_file():
                raise _bad("token_file", f"{self.token_file} is not a file", "write the shared token in it")
        self._check_workers()

    def frontend_settings(self) -> FrontEndSettings:
        """The front-end part alone (what a Ray ingress replica is given)."""
        return FrontEndSettings(**{f.name: getattr(self, f.name) for f in fields(FrontEndSettings)})

    def _check_workers(self) -> None:
        if self.collage and not self.scnn:
            raise ConfigError("[[collage]] workers are listed but no [[scnn]] workers; list both, or neither")
        if self.scnn and MODES[self.mode].collage and not self.collage:
            raise ConfigError(
                f"mode {self.mode!r} needs a collage worker: add a [[collage]] table (url, model) "
                "or pick a mode without a collage"
            )
        if not self.remote and self.slowdown.workers:
            count = self.scnn_count
            wrong = [i for i in self.slowdown.workers if i >= count]
            if wrong:
                raise _bad(
                    "slowdown.workers",
                    f"names {wrong}, but mode {self.mode!r} runs {count} s-CNN workers (0..{count - 1})",
                    "pick indexes below the worker count",
                )

    @property
    def remote(self) -> bool:
        """True when the workers are listed servers: the launcher starts only the front end."""
        return bool(self.scnn)

    @property
    def k(self) -> int:
        """Requests per group the s-CNN pool is sized for (S*S; S = 3 under ``auto``; parity_k for parm)."""
        if MODES[self.mode].parity:
            return self.parity_k
        side = AUTO_SIZING_GRID if self.grid == AUTO else int(self.grid)
        return side * side

    @property
    def scnn_count(self) -> int:
        """How many s-CNN workers serve: the remote list, the override, or what the mode needs."""
        if self.remote:
            return len(self.scnn)
        if self.backend == "ray" and self.ray.scnn_replicas:
            return self.ray.scnn_replicas
        return self.scnn_workers or MODES[self.mode].scnn_workers(self.k)

    def scnn_model(self) -> Path:
        """The local s-CNN model file, or a ConfigError saying how to get it."""
        return _model_file(self.models_dir, "scnn")

    def collage_models(self) -> dict[int, Path]:
        """The local collage model per grid this config serves (none when the mode has no collage)."""
        if not MODES[self.mode].collage:
            return {}
        if MODES[self.mode].parity:
            return {
                self.parity_k: _model_file(self.models_dir, f"parm-k{self.parity_k}-{self.parity_encoder}")
            }
        if self.grid != AUTO:
            return {int(self.grid): _model_file(self.models_dir, f"collage-{self.grid}x{self.grid}")}
        found = {s: self.models_dir / f"collage-{s}x{s}.onnx" for s in AUTO_GRIDS}
        found = {s: p for s, p in found.items() if p.is_file()}
        if not found:
            raise _bad(
                "grid", f'is "auto" but {self.models_dir} holds no collage-SxS.onnx', "train them first"
            )
        return found

    def with_overrides(self, overrides: Mapping[str, Any]) -> ServeConfig:
        """A copy with flag values applied (None values are ignored: the flag was not given)."""
        return _build({**_flatten(self), **{k: v for k, v in overrides.items() if v is not None}}, "flags")


def _model_file(models_dir: Path, stem: str) -> Path:
    path = models_dir / f"{stem}.onnx"
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist; set `models_dir` (--models-dir) to a folder holding {stem}.onnx, "
            "or train the models with `make models`"
        )
    return path


# --- loading -------------------------------------------------------------------------------------

_TOP = {f.name for f in fields(ServeConfig)} - {"slowdown", "scnn", "collage", "ray"}
_SLOW = {f.name for f in fields(SlowdownSettings)}
_RAY = {f.name for f in fields(RaySettings)}


def load_config(path: Path | str | None = None, overrides: Mapping[str, Any] | None = None) -> ServeConfig:
    """The config of a TOML file (or the defaults), with flag ``overrides`` applied on top.

    Override keys are the file's keys; slowdown keys are ``slowdown.spec``, ``slowdown.seed``
    ...; ``scnn`` / ``collage`` take lists of ``URL#MODEL`` strings or :class:`WorkerEndpoint`.
    """
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        try:
            with path.open("rb") as f:
                data = json.load(f) if path.suffix == ".json" else _flat_from_toml(tomllib.load(f), path)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; see examples/local.toml") from None
        except (OSError, ValueError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
            raise ConfigError(f"config file {path} is not valid TOML or JSON: {exc}") from exc
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given:
        origin = "flags" if path is None else f"{origin} with flags"
    return _build({**data, **given}, origin)


def _flat_from_toml(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The file as flat keys (``slowdown.seed``), relative paths resolved against the file."""
    data: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("slowdown", "ray"):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: `{key}` must be a table: [{key}] ...")
            data.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            data[key] = value
    for key in ("models_dir", "token_file"):
        if isinstance(data.get(key), str):
            data[key] = (path.parent / Path(data[key]).expanduser()).resolve()
    for table in [*(data.get("scnn") or []), *(data.get("collage") or [])]:
        if isinstance(table, dict) and isinstance(table.get("model_file"), str):
            table["model_file"] = (path.parent / Path(table["model_file"]).expanduser()).resolve()
    if isinstance(data.get("slowdown.spec"), str) and data["slowdown.spec"].startswith("trace:"):
        rest = data["slowdown.spec"][len("trace:") :]
        if rest and not Path(rest.split(":")[0]).expanduser().is_absolute():
            data["slowdown.spec"] = f"trace:{(path.parent / rest).resolve()}"
    return data


def _endpoints(value: Any, key: str) -> tuple[WorkerEndpoint, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise ConfigError(f'`{key}` must be an array of tables: [[{key}]] url = "http://..." model = ...')
    out = []
    for item in value:
        if isinstance(item, WorkerEndpoint):
            out.append(item)
        elif isinstance(item, str):
            url, sep, rest = item.partition("#")
            model, _, model_file = rest.partition("@")
            if not sep:
                raise _bad(key, f"has {item!r}", "write each worker as http://HOST:PORT#MODEL[@MODEL_FILE]")
            out.append(WorkerEndpoint(url, model, model_file or None))
        elif isinstance(item, dict):
            extra = set(item) - {"url", "model", "model_file", "contract", *FACT_KEYS}
            if extra or "url" not in item or "model" not in item:
                raise ConfigError(
                    f"each [[{key}]] table takes `url` and `model`, and optionally `model_file`, "
                    f"`contract` and the model's facts ({', '.join(FACT_KEYS)}); got {sorted(item)}"
                )
            facts = {k: item[k] for k in FACT_KEYS if k in item}
            out.append(
                WorkerEndpoint(
                    item["url"], item["model"], item.get("model_file"), item.get("contract"), facts
                )
            )
        else:
            raise _bad(key, f"has {item!r}", "list tables with url and model")
    return tuple(out)


def _build(data: dict[str, Any], origin: str) -> ServeConfig:
    """A validated ServeConfig from flat keys; unknown keys are refused with a suggestion."""
    known = _TOP | {f"slowdown.{k}" for k in _SLOW} | {f"ray.{k}" for k in _RAY} | {"scnn", "collage"}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{origin}: unknown config key `{key}`; {hint}")
    slow = {k.removeprefix("slowdown."): v for k, v in data.items() if k.startswith("slowdown.")}
    ray = {k.removeprefix("ray."): v for k, v in data.items() if k.startswith("ray.")}
    top = {k: v for k, v in data.items() if k in _TOP}
    if isinstance(top.get("models_dir"), str):
        top["models_dir"] = Path(top["models_dir"]).expanduser()
    if isinstance(slow.get("workers"), list):
        slow["workers"] = tuple(slow["workers"])
    try:
        return ServeConfig(
            **top,
            slowdown=SlowdownSettings(**slow),
            ray=RaySettings(**ray),
            scnn=_endpoints(data.get("scnn"), "scnn"),
            collage=_endpoints(data.get("collage"), "collage"),
        )
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from exc
    except TypeError as exc:  # a wrong type that the checks above did not anticipate
        raise ConfigError(f"{origin}: {exc}") from exc


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


def dump_config(config: ServeConfig, path: Path) -> Path:
    """Write ``config`` as JSON in :func:`load_config`'s flat keys: what a launcher hands the
    front end process, so the child reads the very object the launcher built."""
    data = _flatten(config)
    data["scnn"] = [e.table() for e in config.scnn]
    data["collage"] = [e.table() for e in config.collage]
    path.write_text(json.dumps(data, default=str))
    return path


def _flatten(config: ServeConfig) -> dict[str, Any]:
    data = {name: getattr(config, name) for name in _TOP}
    data.update({f"slowdown.{k}": getattr(config.slowdown, k) for k in _SLOW})
    data.update({f"ray.{k}": getattr(config.ray, k) for k in _RAY})
    data["scnn"], data["collage"] = list(config.scnn), list(config.collage)
    return data
