"""Tolerances and comparisons of parity tests against the reference (transformers) outputs."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_llava import stream_generate

PIXEL_ATOL = 1e-5  # preprocessing is bit-exact in practice
FEATURE_ATOL = 1e-4  # vision hidden states and projected features, float32
LOGIT_RTOL = 1e-4  # max |ours - theirs| <= LOGIT_RTOL * max |theirs|


def assert_logits_close(ours, theirs) -> None:
    """`ours` within LOGIT_RTOL of `theirs`, relative to the largest of `theirs`."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    scale = np.abs(theirs).max()
    diff = np.abs(ours - theirs).max()
    assert diff <= LOGIT_RTOL * scale, f"max diff {diff:.3g} > {LOGIT_RTOL} x {scale:.3g}"


def nhwc(pixels: np.ndarray) -> mx.array:
    return mx.array(pixels.transpose(0, 2, 3, 1))


def greedy_tokens(model, processor, prompt, images, n, **kwargs) -> list[int]:
    out = [
        r.token
        for r in stream_generate(
            model, processor, prompt, images=images, max_tokens=n, temperature=0.0, **kwargs
        )
    ]
    return out
