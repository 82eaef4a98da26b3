"""Shared fixtures: a tiny random llava-hf checkpoint, written offline without torch.

`tiny_checkpoint` is a folder laid out like a llava-hf hub repo (safetensors with the hub's key
names, transformers' `LlavaConfig`, a small Llama-like tokenizer, the processor files), drawn
with MLX from a fixed seed by `llava_testing.checkpoints.tiny_llava_hf`, once per test session;
`tiny_model` is `mlx_llava.load(folder, dtype="float32")` of it. It serves behaviour tests
(batches, chat, sampling, captioning): expected values of parity tests come from transformers.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random llava-hf checkpoint folder (read-only for tests: copy before changing)."""
    from llava_testing.checkpoints import tiny_llava_hf

    return tiny_llava_hf(tmp_path_factory.mktemp("tiny-llava") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """(model, processor) of the tiny checkpoint in float32. Shared: do not change weights."""
    from mlx_llava import load

    return load(tiny_checkpoint, dtype="float32")
