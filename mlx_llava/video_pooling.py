"""A video frame's features, pooled to fewer tokens.

OneVision interpolates each frame's projected feature grid bilinearly to half its side, rounded
up (27 x 27 -> 14 x 14, `apply_pooling`); LLaVA-NeXT-Video pools the tower's features before
the projector (`LlavaNextVideoPooler`: average, max, or a strided convolution).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .anyres import resize_bilinear
from .config import ModelConfig


def _grid(features: mx.array) -> mx.array:
    """[n, side * side, D] -> [n, side, side, D]."""
    n, tokens, dim = features.shape
    side = math.isqrt(tokens)
    return features.reshape(n, side, side, dim)


def halve_bilinear(features: mx.array) -> mx.array:
    """OneVision: frames' features [n, side * side, D] -> [n, ceil(side / 2)^2, D]."""
    grid = _grid(features)
    side = math.ceil(grid.shape[1] / 2)
    return resize_bilinear(grid, side, side).reshape(grid.shape[0], side * side, -1)


class VideoPooler(nn.Module):
    """LLaVA-NeXT-Video's `vision_resampler`: tower features [n, side * side, D] ->
    [n, (side / stride)^2, D]; only the "conv" mode has weights (`pool.weight`, `pool.bias`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        stride, dim = config.spatial_pool_stride, config.vision_config.hidden_size
        if config.spatial_pool_mode == "average":
            self.pool = nn.AvgPool2d(stride, stride)
        elif config.spatial_pool_mode == "max":
            self.pool = nn.MaxPool2d(stride, stride)
        else:
            self.pool = nn.Conv2d(dim, dim, kernel_size=stride, stride=stride)

    def __call__(self, features: mx.array) -> mx.array:
        pooled = self.pool(_grid(features))
        return pooled.reshape(pooled.shape[0], -1, pooled.shape[-1])
