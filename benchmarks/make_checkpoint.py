"""Write a random llava-hf checkpoint offline, for benchmarks.

    python benchmarks/make_checkpoint.py --out /tmp/llava-mid                 # mid, float32
    python benchmarks/make_checkpoint.py --out /tmp/llava-7b --preset 7b      # float16, ~14 GB

The folder looks like a llava-hf hub repo (llava-hf/llava-1.5-7b-hf): `config.json` from
transformers' `LlavaConfig`, safetensors shards with the hub's key names
(`language_model.model.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`), a small
Llama-like tokenizer from `llava_testing.tokenizer_builder` (smaller than the model's
vocabulary, which is fine for timing), `preprocessor_config.json`, `processor_config.json` and
`chat_template.json`.

The config comes from transformers' `LlavaConfig`; names and shapes from our model built lazily
(no memory, no torch); the tensors are drawn with MLX and written shard by shard, so a 7B
checkpoint is never held whole (peak ~ one 2 GB shard). On a GPU build of MLX the draws run on
the GPU.

Values: matrices ~ N(0, 1/fan_in) (so that the outputs depend on the picture and the prompt,
unlike a 0.02-init model's), x0.3 inside the transformer blocks (each layer nudges the residual
stream, as in trained models; tests/test_quantize.py builds its model the same way), norm
weights 1, biases 0.02 N(0, 1).
The lm_head row of `</s>` is zero, so that greedy decoding of this random model never stops early
and every benchmark run decodes exactly `--max-tokens` tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import zlib
from pathlib import Path

import mlx.core as mx

# The checkout's root: `llava_testing` (test and benchmark helpers) is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava_testing.checkpoints import llava_hf_processor_files  # noqa: E402
from llava_testing.tokenizer_builder import build_tokenizer  # noqa: E402

# CLIP ViT-L/14-336 and Llama-2-7B / Vicuna-7B are the real llava-1.5-7b shapes.
PRESETS = {
    "mid": dict(
        vision=dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=4,
            image_size=224,
            patch_size=14,
            projection_dim=256,
        ),
        text=dict(
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=8,
            num_attention_heads=8,
            vocab_size=32064,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
        dtype="float32",
    ),
    "7b": dict(
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
        dtype="float16",
    ),
}
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
MAX_SHARD_BYTES = 2 << 30
EOS_TOKEN_ID = 2


PATCH_EMBEDDING = "vision_tower.embeddings.patch_embedding.weight"


def hub_name(name: str) -> str:
    """Our parameter name -> the llava-hf hub's (only the vision tower differs)."""
    if name.startswith("vision_tower."):
        return "vision_tower.vision_model." + name[len("vision_tower.") :]
    return name


def llava_config(preset: dict, image_token_id: int, pad_id: int, dtype: str):
    """transformers' LlavaConfig for a preset (CLIP tower at `vision_feature_layer` -2)."""
    from transformers import LlavaConfig

    vision = dict(preset["vision"], model_type="clip_vision_model")
    text = dict(preset["text"], model_type="llama", pad_token_id=pad_id)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        pad_token_id=pad_id,
    )
    config.dtype = dtype
    return config


def tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """(hub name, PyTorch-layout shape) of every tensor, read off our model built lazily (no
    memory, and no torch needed: the GPU machines may not have it)."""
    from mlx.utils import tree_flatten

    from mlx_llava.config import ModelConfig
    from mlx_llava.model import Model

    model = Model(ModelConfig.from_dict(config.to_dict()))
    shapes = []
    for name, value in tree_flatten(model.parameters()):
        shape = tuple(value.shape)
        if name == PATCH_EMBEDDING:  # MLX (out, kh, kw, in) -> PyTorch (out, in, kh, kw)
            shape = (shape[0], shape[3], shape[1], shape[2])
        shapes.append((hub_name(name), shape))
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], dtype: mx.Dtype, key: mx.array) -> mx.array:
    """See the module docstring for the distributions."""
    if len(shape) == 1 and name.endswith("bias"):
        return (0.02 * mx.random.normal(shape, key=key)).astype(dtype)
    if len(shape) == 1 and ("norm" in name or "layrnorm" in name):
        return mx.ones(shape, dtype=dtype)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    scale = fan_in**-0.5 * (0.3 if ".layers." in name else 1.0)
    value = mx.random.normal(shape, dtype=dtype, key=key, scale=scale)
    if name == "language_model.lm_head.weight":
        value[EOS_TOKEN_ID] = 0
    return value


def plan_shards(
    shapes: list[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_weights(
    out: Path, shapes: list, dtype: mx.Dtype, seed: int, max_shard_bytes: int = MAX_SHARD_BYTES
) -> int:
    """Draw and write the tensors shard by shard; returns the bytes written."""
    shards = plan_shards(shapes, dtype.size, max_shard_bytes)
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            key = mx.random.key((seed << 32) + zlib.crc32(name.encode()))
            tensors[name] = random_tensor(name, shape, dtype, key)
            weight_map[name] = file
            total += tensors[name].nbytes
        mx.eval(tensors)
        mx.save_safetensors(str(out / file), tensors, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def write_processor_files(out: Path, vision: dict) -> None:
    """preprocessor_config.json, processor_config.json and chat_template.json, as llava-hf's."""
    files = llava_hf_processor_files(vision["image_size"], vision["patch_size"])
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")


def make_checkpoint(
    out: str | Path, preset: str = "mid", dtype: str | None = None, seed: int = 0
) -> Path:
    """Write the random checkpoint of `preset` to `out` (replaced if it exists)."""
    spec = PRESETS[preset]
    dtype = dtype or spec["dtype"]
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tokenizer = build_tokenizer(out)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    pad_id = tokenizer.convert_tokens_to_ids("<pad>")
    assert tokenizer.eos_token_id == EOS_TOKEN_ID
    config = llava_config(spec, image_token_id, pad_id, dtype)
    config.save_pretrained(out)
    write_weights(out, tensor_shapes(config), DTYPES[dtype], seed)
    write_processor_files(out, spec["vision"])
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write a random llava-hf checkpoint (offline).")
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--preset", choices=list(PRESETS), default="mid")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: float32 mid, float16 7b")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tic = time.perf_counter()
    out = make_checkpoint(args.out, args.preset, args.dtype, args.seed)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - tic:.1f} s")


if __name__ == "__main__":
    main()
