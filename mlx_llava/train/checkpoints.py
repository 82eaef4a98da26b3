"""What a training run writes: resumable checkpoints and the finished model folder."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..atomic import replace_dir, staging_dir
from ..config import ModelConfig
from ..convert import MAX_SHARD_BYTES, PROCESSOR_FILES
from ..model import Model
from ..processor import find_processor_file
from ..weights import save_shards
from .args import RESUME_KEYS, TrainArgs

MODEL_STAGING = "model"  # out/.model.new: the finished model's files before they move in


def save_checkpoint(folder: Path, model: Model, optimizer, state: dict) -> None:
    """Trainable weights, optimizer state and the loop's state; the previous checkpoint is
    replaced by renames (`atomic.replace_dir`), so a crash at any moment leaves one of them."""
    tmp = staging_dir(folder)
    mx.save_safetensors(
        str(tmp / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f, indent=2)
    replace_dir(tmp, folder)


def load_checkpoint(folder: Path, model: Model, optimizer, args: TrainArgs) -> dict:
    """Restore what `save_checkpoint` wrote into a model set up the same way; the loop's state."""
    try:
        with open(folder / "state.json") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"nothing to resume: {folder} has no checkpoint") from None
    for key in RESUME_KEYS:
        # A key the checkpoint's version did not have yet was at its default.
        saved, now = state["args"].get(key, getattr(TrainArgs, key, None)), asdict(args).get(key)
        if saved != now:
            flag = "--" + key.replace("_", "-")
            raise ValueError(
                f"cannot resume: the checkpoint was made with {flag} {saved}, not {now}"
            )
    weights = mx.load(str(folder / "trainable.safetensors"))
    expected = {k for k, _ in tree_flatten(model.trainable_parameters())}
    if set(weights) != expected:
        raise ValueError(
            "cannot resume: the checkpoint's trainable weights do not match the model's"
        )
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
    return state


def save_model(
    out: Path,
    model: Model,
    config: ModelConfig,
    processor_folders: list[Path],
    dtype: mx.Dtype,
) -> None:
    """Write an MLX model folder (weights, config.json, tokenizer and processor files) into
    `out`, which may hold other files (the log, the checkpoint).

    The files are written into a staging folder first, then renamed into `out` one by one with
    config.json last: a crash leaves either no model (no config.json) or a whole one.
    """
    out.mkdir(parents=True, exist_ok=True)
    staged = staging_dir(out / MODEL_STAGING)
    weights = {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in tree_flatten(model.parameters())
    }
    save_shards(staged, weights, MAX_SHARD_BYTES)
    for name in PROCESSOR_FILES:
        source = find_processor_file(processor_folders, name)
        if source is not None:
            shutil.copy(source, staged / name)
    with open(staged / "config.json", "w") as f:
        json.dump({**config.to_dict(), "mlx_llava": {"format": 1}}, f, indent=2)
    (out / "config.json").unlink(missing_ok=True)  # the old model is gone from here on
    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    files = sorted(staged.iterdir(), key=lambda p: p.name == "config.json")
    for path in files:
        os.replace(path, out / path.name)
    staged.rmdir()
