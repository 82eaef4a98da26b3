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


def build_with_counts(config_file, expected: dict):
    """The Model of a real checkpoint's config.json, built lazily (nothing is evaluated), after
    checking its parameter counts against transformers' (`expected`: total, vision_tower,
    multi_modal_projector)."""
    import json
    from pathlib import Path

    from mlx.utils import tree_flatten

    from mlx_llava import Model, ModelConfig

    def count(module) -> int:
        return sum(v.size for _, v in tree_flatten(module.parameters()))

    raw = json.loads(Path(config_file).read_text())
    before = mx.get_active_memory()
    model = Model(ModelConfig.from_dict(raw))
    assert count(model) == expected["total"]
    assert count(model.vision_tower) == expected["vision_tower"]
    assert count(model.multi_modal_projector) == expected["multi_modal_projector"]
    assert mx.get_active_memory() - before < 1 << 20  # nothing was evaluated
    return model
