"""The front end's settings and the whole deployment's (ServeConfig), validated on creation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from collage_inference.config.common import (
    AUTO,
    AUTO_GRIDS,
    AUTO_SIZING_GRID,
    DEFAULT_MODELS_DIR,
    MAX_GRID,
    bad,
    choice,
    number,
    port_number,
)
from collage_inference.config.workers import BACKENDS, RaySettings, SlowdownSettings, WorkerEndpoint
from collage_inference.errors import ConfigError
from collage_inference.modes import MODES, REISSUE_TARGETS, DecoderPolicy, Mode
from collage_inference.parm import CONCAT_KS, ENCODERS


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
        choice(self.mode, "mode", tuple(MODES))
        if isinstance(self.grid, str) and self.grid != AUTO:
            if not self.grid.isdigit():
                raise bad("grid", f"is {self.grid!r}", f'give the collage side 2..{MAX_GRID} or "auto"')
            object.__setattr__(self, "grid", int(self.grid))
        if self.grid != AUTO and (
            isinstance(self.grid, bool) or not isinstance(self.grid, int) or not 2 <= self.grid <= MAX_GRID
        ):
            raise bad("grid", f"is {self.grid!r}", f'give the collage side 2..{MAX_GRID} or "auto"')
        choice(self.policy, "policy", [p.value for p in DecoderPolicy])
        choice(self.reissue_to, "reissue_to", REISSUE_TARGETS)
        number(self.confident_at, "confident_at", strict=False, high=1.0)  # a probability
        if self.group_timeout is not None:
            number(self.group_timeout, "group_timeout")
        choice(self.parity_encoder, "parity_encoder", ENCODERS)
        if self.parity_k not in CONCAT_KS:  # the shipped parity models; the sum code would take any k
            raise bad("parity_k", f"is {self.parity_k!r}", f"give one of {', '.join(map(str, CONCAT_KS))}")
        number(self.request_timeout, "request_timeout")
        number(self.replicate_timeout, "replicate_timeout")
        number(self.max_pending, "max_pending", integer=True)
        if not isinstance(self.model_name, str) or not self.model_name or "/" in self.model_name:
            raise bad("model_name", f"is {self.model_name!r}", "give a non-empty name without '/'")

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
        choice(self.backend, "backend", BACKENDS)
        if self.backend == "ray" and (self.scnn or self.collage):
            raise ConfigError(
                "backend ray serves the models as Ray Serve deployments; it cannot front listed "
                "[[scnn]] / [[collage]] V2 servers: remove those tables or use backend local"
            )
        number(self.threads, "threads", integer=True)
        number(self.ready_timeout, "ready_timeout")
        if self.scnn_workers is not None:
            number(self.scnn_workers, "scnn_workers", integer=True)
        port_number(self.port, "port")
        if not isinstance(self.host, str) or not self.host or "/" in self.host:
            raise bad("host", f"is {self.host!r}", "give a non-empty name without '/'")
        if not isinstance(self.restart, bool):
            raise bad("restart", f"must be true or false, got {self.restart!r}", "restart = true")
        if not isinstance(self.models_dir, Path):
            object.__setattr__(self, "models_dir", Path(self.models_dir))
        if self.token_file is not None:
            object.__setattr__(self, "token_file", Path(self.token_file).expanduser())
            if not self.token_file.is_file():
                raise bad("token_file", f"{self.token_file} is not a file", "write the shared token in it")
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
                raise bad(
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
            raise bad(
                "grid", f'is "auto" but {self.models_dir} holds no collage-SxS.onnx', "train them first"
            )
        return found

    def with_overrides(self, overrides: Mapping[str, Any]) -> ServeConfig:
        """A copy with flag values applied (None values are ignored: the flag was not given)."""
        from collage_inference.config.loading import build, flatten  # loading builds ServeConfigs

        return build({**flatten(self), **{k: v for k, v in overrides.items() if v is not None}}, "flags")


def _model_file(models_dir: Path, stem: str) -> Path:
    path = models_dir / f"{stem}.onnx"
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist; set `models_dir` (--models-dir) to a folder holding {stem}.onnx, "
            "or train the models with `make models`"
        )
    return path
