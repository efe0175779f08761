"""What describes a model, without PyTorch: its architecture config and its metadata.

Importable by serving code that never loads torch (workers on ONNX Runtime, the front end),
and saved inside every checkpoint and ONNX file so a model rebuilds itself from its file alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from collage_inference import __version__
from collage_inference.errors import ConfigError

KINDS = ("scnn", "collage", "parity")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's architecture.

    kind: ``scnn``, ``collage`` or ``parity`` (a ParM parity model: the s-CNN's architecture
    answering one parity query of ``parity_k`` images coded by ``encoder``). image_size is the
    s-CNN input side, or the collage *tile* side (the collage is grid * tile_size pixels wide).
    widths/blocks/strides describe the stages; stem ``small`` is a 3x3 conv for small images,
    ``imagenet`` the 7x7/2 conv and max-pool of ResNet-18/34.
    """

    kind: str
    num_classes: int
    in_channels: int = 1
    image_size: int = 28
    grid: int = 1
    stem: str = "small"
    stem_width: int = 32
    widths: tuple[int, ...] = (32, 64, 128)
    blocks: tuple[int, ...] = (1, 1, 1)
    strides: tuple[int, ...] = (2, 2, 2)
    dropout: float = 0.0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    parity_k: int = 0  # parity models: images per parity query
    encoder: str = ""  # parity models: ``concat`` or ``sum`` (see collage_inference.parm)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"model kind must be one of {KINDS}, got {self.kind!r}")
        if not (len(self.widths) == len(self.blocks) == len(self.strides)) or not self.widths:
            raise ConfigError("widths, blocks and strides need one entry per stage")
        if self.kind != "collage" and self.grid != 1:
            raise ConfigError(f"a {self.kind} model has grid 1")
        if self.kind == "parity":
            from collage_inference.errors import GeometryError
            from collage_inference.parm import check_code

            try:
                check_code(self.parity_k, self.encoder)
            except GeometryError as exc:
                raise ConfigError(str(exc)) from None
        elif self.parity_k or self.encoder:
            raise ConfigError("parity_k and encoder describe parity models only")
        if self.kind == "collage" and not 1 <= self.grid <= 8:
            raise ConfigError(f"collage grid must be between 1 and 8, got {self.grid}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ConfigError(f"mean and std need {self.in_channels} values, one per input channel")
        if self.stem not in ("small", "imagenet"):
            raise ConfigError(f"stem must be 'small' or 'imagenet', got {self.stem!r}")

    @property
    def input_size(self) -> int:
        """Side of the model's input image in pixels (the whole collage for collage models)."""
        return self.image_size * self.grid

    @property
    def outputs(self) -> int:
        """Classes per prediction: collage models add ``empty`` as the last class."""
        return self.num_classes + (1 if self.kind == "collage" else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        for key in ("widths", "blocks", "strides", "mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass(frozen=True)
class ModelMeta:
    """What a served or evaluated model needs to know about itself (normalisation is in the config)."""

    name: str
    config: ModelConfig
    class_names: tuple[str, ...]
    dataset: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    code_version: str = __version__
    sizing: str = ""  # how the architecture's size was chosen (a collage model's FLOPs budget)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def grid(self) -> int:
        return self.config.grid

    @property
    def labels(self) -> tuple[str, ...]:
        """Names of every output class: collage models end with ``empty``."""
        return self.class_names + (("empty",) if self.kind == "collage" else ())

    def facts(self) -> dict[str, Any]:
        """What a front end must know to use the model, under the keys every model server
        publishes (and a front end's worker table may declare)."""
        cfg = self.config
        facts: dict[str, Any] = {
            "kind": self.kind,
            "grid": self.grid,
            "labels": list(self.labels),
            "image_size": cfg.image_size,
            "input_size": cfg.input_size,
            "channels": cfg.in_channels,
        }
        if self.kind == "parity":
            facts |= {"parity_k": cfg.parity_k, "encoder": cfg.encoder}
        return facts

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMeta:
        data = dict(data)
        data["config"] = ModelConfig.from_dict(data["config"])
        data["class_names"] = tuple(data["class_names"])
        return cls(**data)
