"""LLaVA-NeXT's "anyres" pictures: a grid of tiles chosen per picture, and what it costs.

A picture is resized to fit the best of `image_grid_pinpoints` (aspect ratio kept, centred on
black), cut into tiles of the tower's size, and seen whole once more, squashed to one tile. The
tiles' features form a grid that is cropped back to the picture's aspect ratio ("unpadded"), with
the learned `image_newline` after each row; the base picture's features come first.

Every size here is a (height, width) pair of Python ints, known on the host before the forward
pass; the arithmetic is transformers' (`select_best_resolution`, `get_patch_output_size`,
`unpad_image`, `LlavaNextProcessor._get_number_of_features`), float operations in its order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import mlx.core as mx
import numpy as np

# LlavaNextConfig's default, the pinpoints of every llava-v1.6 release (336-pixel tiles).
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

Size = tuple[int, int]


def select_best_resolution(image_size: Size, pinpoints: Sequence[Sequence[int]]) -> Size:
    """The pinpoint (height, width) that keeps most of the picture's pixels, the least area
    wasted on ties; the first such in `pinpoints` order."""
    height, width = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = h * w - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


def fit_size(image_size: Size, target: Size) -> Size:
    """The size of the picture resized to fit `target` with its aspect ratio kept (rounded
    up, as transformers' `get_patch_output_size`)."""
    height, width = image_size
    target_height, target_width = target
    scale_w = target_width / width
    scale_h = target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def grid_shape(image_size: Size, pinpoints: Sequence[Sequence[int]], tile: int) -> Size:
    """(rows, cols) of `tile`-pixel tiles that cover the picture's best resolution."""
    height, width = select_best_resolution(image_size, pinpoints)
    return height // tile, width // tile


def unpadded_box(image_size: Size, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a height x width feature grid that the picture covers,
    the centring padding cut off symmetrically (transformers' `unpad_image`)."""
    original_height, original_width = image_size
    if original_width / original_height > width / height:
        new_height = int(round(original_height * (width / original_width), 7))
        padding = (height - new_height) // 2
        return padding, height - padding, 0, width
    new_width = int(round(original_width * (height / original_height), 7))
    padding = (width - new_width) // 2
    return 0, height, padding, width - padding


def downsampled_size(height: int, width: int, side: int, max_num_patches: Optional[int]) -> Size:
    """OneVision's cap on a grid of height x width features: when it exceeds `max_num_patches`
    tiles of side x side by more than 10 % in area, the size it is bilinearly resized to
    (transformers' `int(h // ratio)`); otherwise (and without a cap) the size itself."""
    if max_num_patches is None:
        return height, width
    ratio = math.sqrt(height * width / (max_num_patches * side**2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width


def num_image_tokens(
    image_size: Size,
    pinpoints: Sequence[Sequence[int]],
    tile: int,
    patch: int,
    max_num_patches: Optional[int] = None,
) -> int:
    """Tokens of one picture: the base picture's (tile / patch)^2, plus the unpadded grid of
    its tiles' patches (downsampled past `max_num_patches` tiles) with one newline per row."""
    side = tile // patch
    rows, cols = grid_shape(image_size, pinpoints, tile)
    top, bottom, left, right = unpadded_box(image_size, rows * side, cols * side)
    height, width = downsampled_size(bottom - top, right - left, side, max_num_patches)
    return side * side + height * (width + 1)


def resize_bilinear(x: mx.array, height: int, width: int) -> mx.array:
    """x [..., H, W, D] -> [..., height, width, D], as torch's `interpolate(mode="bilinear",
    align_corners=False)` (no antialiasing); the sampling positions are known on the host."""

    def weights(n_in: int, n_out: int) -> tuple[mx.array, mx.array, mx.array]:
        # float32 arithmetic, as torch's (its weights differ from float64's in the 7th digit).
        scale = np.float32(n_in / n_out)
        src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + 0.5) - 0.5, 0.0)
        low = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        return mx.array(low), mx.array(high), mx.array(src - low)

    low, high, w = weights(x.shape[-3], height)
    w = w[:, None, None].astype(x.dtype)
    x = mx.take(x, low, axis=-3) * (1 - w) + mx.take(x, high, axis=-3) * w
    low, high, w = weights(x.shape[-2], width)
    w = w[:, None].astype(x.dtype)
    return mx.take(x, low, axis=-2) * (1 - w) + mx.take(x, high, axis=-2) * w


def pack_image_features(
    features: mx.array,
    image_sizes: Sequence[Size],
    image_newline: mx.array,
    pinpoints: Sequence[Sequence[int]],
    tile: int,
    max_num_patches: Optional[int] = None,
    tiled: Optional[Sequence[bool]] = None,
) -> mx.array:
    """Each picture's tile features as its sequence of image tokens.

    Args:
        features: projected features [n_tiles, side * side, D], each picture's base tile then
            its grid row by row (a picture not `tiled`: its base tile only), pictures in order.
        image_sizes: (height, width) of each picture.
        image_newline: [D], appended after each row of a picture's grid.
        pinpoints, tile: the model's `image_grid_pinpoints` and tower image size.
        max_num_patches: OneVision's "anyres_max_N": a grid past about N tiles is bilinearly
            downsampled (`downsampled_size`).
        tiled: per picture, whether it was tiled (default all); one that was not gives its
            base features and one newline.

    Returns:
        [total tokens, D]: per picture the base features, then the unpadded grid row by row,
        each row followed by the newline.
    """
    dim = features.shape[-1]
    side = math.isqrt(features.shape[1])
    out, start = [], 0
    for k, size in enumerate(image_sizes):
        if tiled is not None and not tiled[k]:
            out += [features[start], image_newline.astype(features.dtype)[None]]
            start += 1
            continue
        rows, cols = grid_shape(size, pinpoints, tile)
        grid = features[start + 1 : start + 1 + rows * cols]
        # [rows, cols, side, side, D] -> [rows * side, cols * side, D]: one patch grid.
        grid = grid.reshape(rows, cols, side, side, dim).transpose(0, 2, 1, 3, 4)
        grid = grid.reshape(rows * side, cols * side, dim)
        top, bottom, left, right = unpadded_box(size, rows * side, cols * side)
        grid = grid[top:bottom, left:right]
        height, width = downsampled_size(bottom - top, right - left, side, max_num_patches)
        if (height, width) != (bottom - top, right - left):
            grid = resize_bilinear(grid, height, width)
        newline = mx.broadcast_to(image_newline.astype(grid.dtype), (height, 1, dim))
        out += [features[start], mx.concatenate([grid, newline], axis=1).reshape(-1, dim)]
        start += 1 + rows * cols
    return mx.concatenate(out)
