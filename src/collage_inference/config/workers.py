"""The settings of the model servers: a listed V2 server (WorkerEndpoint), a local worker
process (WorkerSettings), straggler injection (SlowdownSettings), request bounds (Limits) and
the Ray Serve backend's sizing (RaySettings)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from collage_inference.config.common import COLLAGE_SEED_OFFSET, bad, choice, number, port_number
from collage_inference.errors import ConfigError
from collage_inference.slowdown import KINDS, parse_slowdown

FACT_KEYS = ("kind", "grid", "labels", "image_size", "channels")  # what the front end must know of a model
CONTRACTS = ("image", "tensor")
# Models that serve a group's backup: they straggle as ``slowdown.collage`` says, whatever the s-CNN ranks.
BACKUP_KINDS = ("collage", "parity")


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
            raise bad("slowdown.spec", f"must be a string, got {self.spec!r}", 'e.g. spec = "bimodal"')
        choice(self.kind, "slowdown.kind", KINDS)
        number(self.seed, "slowdown.seed", integer=True, strict=False)
        number(self.onset_rate, "slowdown.onset_rate")
        number(self.period, "slowdown.period")
        if not isinstance(self.collage, bool):
            raise bad("slowdown.collage", f"must be true or false, got {self.collage!r}", "collage = false")
        if not isinstance(self.contention, int | float) or not 0.0 <= self.contention <= 1.0:
            raise bad("slowdown.contention", f"is {self.contention!r}", "give a CPU fraction in [0, 1]")
        if self.workers is not None:
            if isinstance(self.workers, list):
                object.__setattr__(self, "workers", tuple(self.workers))
            if not isinstance(self.workers, tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.workers
            ):
                raise bad("slowdown.workers", f"is {self.workers!r}", "list s-CNN worker indexes: [0, 2]")
        try:  # fail now, not in every worker process
            parse_slowdown(self.spec, self.kind, self.seed, self.onset_rate, self.period)
        except ConfigError as exc:
            raise bad("slowdown.spec", f"is invalid: {exc}", "fix the spec") from exc

    @property
    def active(self) -> bool:
        return self.spec.strip() != "none" or self.contention > 0

    def slows(self, kind: str, index: int) -> bool:
        """Whether worker ``index`` of ``kind`` straggles: an s-CNN as ``workers`` says, a backup
        (a collage or a parity model) as ``collage`` says."""
        if not self.active:
            return False
        if kind in BACKUP_KINDS:
            return self.collage
        return self.workers is None or index in self.workers

    def for_worker(self, kind: str, index: int) -> SlowdownSettings | None:
        """How worker ``index`` of ``kind`` straggles: these settings with its own seed
        (``seed + index``; backup workers ``seed + 1000 + index``), or None if it does not."""
        if not self.slows(kind, index):
            return None
        return replace(self, seed=self.seed + index + (COLLAGE_SEED_OFFSET if kind in BACKUP_KINDS else 0))

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
            raise bad("ray.address", f"is {self.address!r}", 'give "local", "auto" or "ray://HOST:10001"')
        for key in ("num_cpus", "scnn_cpus", "collage_cpus", "ingress_cpus", "target_ongoing_requests"):
            if getattr(self, key) is not None:
                number(getattr(self, key), f"ray.{key}")
        for key in ("collage_replicas", "ingress_replicas", "max_ongoing_requests", "min_replicas",
                    "max_replicas", "scnn_replicas", "object_store_mb"):  # fmt: skip
            if getattr(self, key) is not None:
                number(getattr(self, key), f"ray.{key}", integer=True)
        if not isinstance(self.autoscaling, bool):
            raise bad(
                "ray.autoscaling", f"must be true or false, got {self.autoscaling!r}", "autoscaling = true"
            )
        if self.min_replicas > self.max_replicas:
            raise bad("ray.min_replicas", f"({self.min_replicas}) exceeds max_replicas", "lower it")
        if not isinstance(self.app_name, str) or not self.app_name or "/" in self.app_name:
            raise bad("ray.app_name", f"is {self.app_name!r}", "give a non-empty name without '/'")

    @property
    def owns_cluster(self) -> bool:
        """True when the launcher starts (and later stops) a private Ray instance."""
        return self.address == "local"


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
        number(self.threads, "threads", integer=True)
        number(self.max_queue, "max_queue", integer=True)
        number(self.max_batch, "max_batch", integer=True)
        port_number(self.port, "port")
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
