"""Checking OneVision and NeXT-Video models against transformers' recorded outputs (the
fixtures of `llava_testing.onevision_oracles`, written under tests/fixtures/data)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from .parity import assert_logits_close

DATA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "data"
PICTURES = {
    "wide": ["wide"],
    "tall": ["tall"],
    "two": ["wide", "tall"],
    "video": [],
    "mixed": ["tall"],
}
PIXEL_ATOL = 1e-5


def oracle(name: str, root: Path = DATA) -> tuple[dict, dict]:
    folder = root / name
    return dict(np.load(folder / "oracle.npz")), json.loads((folder / "oracle.json").read_text())


def model_inputs(processor, meta: dict, arrays: dict, case: str) -> dict:
    """Our processor's outputs for one recorded case (the video given as its uint8 frames)."""
    question = meta["questions"][case]
    images = [Image.open(DATA / "images" / f"{p}.png") for p in PICTURES[case]]
    videos = [arrays["video_frames"]] if "<video>" in question else None
    return processor(meta["template"].format(q=question), images=images or None, videos=videos)


def greedy(model, inputs: dict, n: int) -> list[int]:
    """n greedy tokens, the prompt through `model(**inputs)` once, then one token a step."""
    cache = model.make_cache()
    logits = model(**inputs, cache=cache)[:, -1]
    tokens = []
    for _ in range(n):
        tokens.append(int(mx.argmax(logits, axis=-1).item()))
        logits = model(mx.array([tokens[-1:]]), cache=cache)[:, -1]
    return tokens


def assert_matches_oracle(model, processor, arrays: dict, meta: dict) -> None:
    """Every recorded case: pixels within 1e-5, ids identical, last logits within 1e-4 of the
    largest, the greedy tokens identical."""
    for case in meta["questions"]:
        inputs = model_inputs(processor, meta, arrays, case)
        if f"{case}_pixel_values" in arrays:
            ours = np.array(inputs["pixel_values"]).transpose(0, 3, 1, 2)
            assert ours.shape == arrays[f"{case}_pixel_values"].shape, case
            assert np.abs(ours - arrays[f"{case}_pixel_values"]).max() <= PIXEL_ATOL, case
            assert inputs["image_sizes"] == [tuple(s) for s in arrays[f"{case}_image_sizes"]]
        if f"{case}_pixel_values_videos" in arrays:
            ours = np.array(inputs["pixel_values_videos"]).transpose(0, 1, 4, 2, 3)
            want = arrays[f"{case}_pixel_values_videos"]
            assert ours.shape == want.shape and np.abs(ours - want).max() <= PIXEL_ATOL, case
        np.testing.assert_array_equal(np.array(inputs["input_ids"]), arrays[f"{case}_input_ids"])
        logits = model(**inputs)[0, -1]
        assert_logits_close(np.array(logits), arrays[f"{case}_last_logits"])
        tokens = greedy(model, inputs, meta["greedy_tokens"])
        assert tokens == arrays[f"{case}_greedy_tokens"].tolist(), case
