"""The two model families: the s-CNN (one image, one label) and the collage-CNN (one collage,
one label per cell, plus ``empty``).

Both are built from a small frozen config that is saved inside every checkpoint, so a model
rebuilds itself from its file alone (see :mod:`collage_inference.training.checkpoint`).

The collage-CNN must be cheap, which is the point of the technique: one pass over a whole
collage costs at most one s-CNN pass. It therefore uses depthwise-separable blocks (MobileNet
style) over small tiles, while the s-CNN spends its budget on full-width residual blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from collage_inference.errors import ConfigError
from collage_inference.modelspec import ModelConfig


def resnet_config(depth: int, num_classes: int, in_channels: int = 3, image_size: int = 224) -> ModelConfig:
    """The ResNet-18 or ResNet-34 shape, for larger images."""
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
    if depth not in blocks:
        raise ConfigError(f"resnet depth must be 18 or 34, got {depth}")
    return ModelConfig(
        "scnn",
        num_classes,
        in_channels,
        image_size,
        stem="imagenet",
        stem_width=64,
        widths=(64, 128, 256, 512),
        blocks=blocks[depth],
        strides=(1, 2, 2, 2),
        mean=(0.5,) * in_channels,
        std=(0.25,) * in_channels,
    )


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convs and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), conv_bn(cout, cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class SeparableBlock(nn.Module):
    """Depthwise 3x3 then pointwise 1x1, with a residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, cin, 3, stride, groups=cin),
            nn.ReLU(inplace=True),
            conv_bn(cin, cout, 1),
            nn.ReLU(inplace=True),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


def _stem(config: ModelConfig) -> nn.Sequential:
    if config.stem == "imagenet":
        return nn.Sequential(
            nn.Conv2d(config.in_channels, config.stem_width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(config.stem_width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
    return nn.Sequential(conv_bn(config.in_channels, config.stem_width), nn.ReLU(inplace=True))


def _stages(config: ModelConfig, block: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = config.stem_width
    for width, count, stride in zip(config.widths, config.blocks, config.strides, strict=True):
        for i in range(count):
            layers.append(block(cin, width, stride if i == 0 else 1))
            cin = width
    return nn.Sequential(*layers)


class Normalize(nn.Module):
    """Pixels in [0, 1] to zero-mean unit-variance, so exported models take raw pixels."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SingleImageCNN(nn.Module):
    """s-CNN: residual CNN, (B, C, H, W) pixels in [0, 1] -> (B, num_classes) logits. A ParM
    parity model has the same architecture (and outputs a sum of logits)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.normalize = Normalize(config.mean, config.std)
        self.features = nn.Sequential(_stem(config), _stages(config, BasicBlock))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(config.dropout),
            nn.Linear(config.widths[-1], config.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


class CollageCNN(nn.Module):
    """collage-CNN: fully convolutional, (B, C, S*t, S*t) pixels in [0, 1] -> (B, S*S, C+1) logits.

    The feature map is pooled to S x S, so output position (row, col) sees cell row * S + col;
    a 1x1 conv then scores every cell at once. The last class is ``empty``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        reduction = 1
        for s in config.strides:
            reduction *= s
        if config.image_size % reduction:
            raise ConfigError(
                f"tile size {config.image_size} must be a multiple of the total stride {reduction} "
                "so that every cell maps to whole feature-map positions"
            )
        self.normalize = Normalize(config.mean, config.std)
        self.features = nn.Sequential(_stem(config), _stages(config, SeparableBlock))
        self.pool = nn.AdaptiveAvgPool2d(config.grid)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Conv2d(config.widths[-1], config.outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.dropout(self.pool(self.features(self.normalize(x)))))  # (B, C+1, S, S)
        return y.flatten(2).transpose(1, 2)  # (B, S*S, C+1), row-major cells


def build_model(config: ModelConfig) -> nn.Module:
    """The model a config describes, with fresh weights."""
    return CollageCNN(config) if config.kind == "collage" else SingleImageCNN(config)


@dataclass(frozen=True)
class ModelCost:
    """Compute cost of one forward pass over one input (one image or one whole collage)."""

    flops: int
    params: int
    per_layer: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def model_cost(model: nn.Module, config: ModelConfig) -> ModelCost:
    """Count FLOPs (2 x multiply-adds of conv and linear layers) for one input, by tracing."""
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                macs = output.numel() * (module.in_channels // module.groups) * kh * kw
            else:
                macs = output.numel() * module.in_features
            counts[name] = 2 * macs

        return record

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, config.in_channels, config.input_size, config.input_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(sum(counts.values()), params, counts)
