"""A fresh, randomly initialised LLaVA written as an MLX model folder (the start of a demo model).

The weights are initialised as transformers does (`initializer_range` 0.02): matrices and
embeddings ~ N(0, 0.02), biases 0, norm scales 1. Optionally the vision tower's position table
starts from 2-D sine-cosine embeddings (MAE's), which a tower trained from nothing needs to learn
where things are within a few thousand steps; with N(0, 0.02) positions it did not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..config import ModelConfig
from ..convert import DTYPES, MAX_SHARD_BYTES, PROCESSOR_FILES
from ..image_processor import CLIPImageProcessor
from ..model import Model
from ..weights import save_shards

INITIALIZER_RANGE = 0.02
NORM_NAMES = ("norm", "layrnorm", "layer_norm")


def init_weights(model: Model, std: float = INITIALIZER_RANGE) -> None:
    """Re-initialise every parameter in place from MLX's global random state."""
    new = []
    for name, p in tree_flatten(model.parameters()):
        leaf = name.rsplit(".", 1)[-1]
        module = name.rsplit(".", 2)[-2] if name.count(".") else ""
        if leaf == "bias":
            new.append((name, mx.zeros_like(p)))
        elif p.ndim == 1 and any(n in module for n in NORM_NAMES):
            new.append((name, mx.ones_like(p)))
        else:
            new.append((name, std * mx.random.normal(p.shape, dtype=p.dtype)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def sincos_position_embedding(num_positions: int, dim: int) -> mx.array:
    """2-D sine-cosine embeddings [num_positions, dim] for a CLS slot then a square patch grid.

    As MAE's `get_2d_sincos_pos_embed`: the first half of the channels encodes the row, the
    second the column, each as sin / cos at frequencies 1 / 10000^(k / (dim / 4)); CLS gets 0.
    """
    side = round((num_positions - 1) ** 0.5)
    if side * side != num_positions - 1 or dim % 4:
        raise ValueError("sine-cosine positions need a square grid and a width divisible by 4")
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")

    def embed(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.ravel(), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([embed(rows), embed(cols)], axis=1)
    table = np.concatenate([np.zeros((1, dim)), table])
    return mx.array(table.astype(np.float32))


def default_image_processor(config: ModelConfig) -> CLIPImageProcessor:
    """CLIP preprocessing at the tower's resolution (pad to square if the config says so)."""
    side = config.vision_config.image_size
    return CLIPImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        pad_to_square=config.image_aspect_ratio == "pad",
    )


def _check_tokenizer(config: ModelConfig, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but vocab_size is "
            f"{config.text_config.vocab_size}"
        )
    image_id = tokenizer.get_vocab().get("<image>")
    if image_id is not None and image_id != config.image_token_index:
        raise ValueError(
            f"<image> is token {image_id} but image_token_index is {config.image_token_index}"
        )


def init_model_folder(
    out: Union[str, Path],
    config: ModelConfig,
    tokenizer_dir: Union[str, Path],
    image_processor: Optional[CLIPImageProcessor] = None,
    seed: int = 0,
    dtype: str = "float32",
    sincos_positions: bool = False,
) -> Path:
    """Write a randomly initialised model as an MLX folder that `load` and `train` take.

    Args:
        out: the folder to write (created; existing files of the same names are replaced).
        config: the model's configuration; its `image_token_index` must be the tokenizer's
            `<image>` id when the tokenizer has one.
        tokenizer_dir: a folder with the tokenizer files (e.g. from `build_tokenizer`).
        image_processor: the preprocessing to record (default: CLIP's at the tower's size).
        seed: seed of the initialisation.
        dtype: "float32", "float16" or "bfloat16".
        sincos_positions: start the vision tower's position table from 2-D sine-cosine
            embeddings instead of N(0, 0.02).

    Returns:
        The folder.
    """
    out, tokenizer_dir = Path(out), Path(tokenizer_dir)
    _check_tokenizer(config, tokenizer_dir)
    mx.random.seed(seed)
    model = Model(config)
    init_weights(model)
    if sincos_positions:
        table = model.vision_tower.embeddings.position_embedding
        table.weight = sincos_position_embedding(*table.weight.shape)
    weights = {k: v.astype(DTYPES[dtype]) for k, v in tree_flatten(model.parameters())}
    out.mkdir(parents=True, exist_ok=True)
    save_shards(out, weights, MAX_SHARD_BYTES)
    for name in PROCESSOR_FILES:
        if (tokenizer_dir / name).exists() and name != "preprocessor_config.json":
            shutil.copy(tokenizer_dir / name, out / name)
    processor = image_processor or default_image_processor(config)
    with open(out / "preprocessor_config.json", "w") as f:
        json.dump(processor.to_dict(), f, indent=2)
    with open(out / "config.json", "w") as f:
        json.dump({**config.to_dict(), "mlx_llava": {"format": 1}}, f, indent=2)
    return out
