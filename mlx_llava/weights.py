"""Checkpoint tensors: reading shards, and the one place that maps key layouts to ours.

Our parameter names are the llava-hf hub names with `vision_model.` dropped:
`vision_tower.*` (CLIP or SigLIP), `multi_modal_projector.linear_{1,2}.*`, `image_newline`
(LLaVA-NeXT, OneVision), `vision_resampler.pool.*` (LLaVA-NeXT-Video's conv pooling),
`language_model.model.*`, `language_model.lm_head.weight`. Every other layout is renamed here,
prefix by prefix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx

# (checkpoint prefix, our prefix); the first match wins, so longer prefixes come first.
LLAVA_HF_PREFIXES = [
    # transformers >= 4.52 (`_checkpoint_conversion_mapping`) and transformers 5 save_pretrained
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("model.vision_resampler.", "vision_resampler."),
    ("lm_head.", "language_model.lm_head."),
    # the llava-hf hub layout (transformers < 4.52)
    ("language_model.", "language_model."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("image_newline", "image_newline"),
    ("vision_resampler.", "vision_resampler."),
]

# haotian-liu/LLaVA: LlavaLlamaForCausalLM with the projector inside `model.`.
ORIGINAL_PREFIXES = [
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    (
        "model.mm_projector.",
        "multi_modal_projector.linear_1.",
    ),  # v1: one linear layer W
    (
        "model.vision_tower.vision_tower.vision_model.",
        "vision_tower.",
    ),  # a tower saved inside (LLaVA-1.6 trains it)
    ("model.image_newline", "image_newline"),  # LLaVA-1.6
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
]

# A CLIPModel or CLIPVisionModel checkpoint holding the original models' vision tower.
CLIP_PREFIXES = [
    ("vision_model.", "vision_tower."),
]

# A folder written by this project (convert.py, train.py): our names and MLX layout already.
MLX_PREFIXES = [("", "")]

# A folder written by mlx-vlm (mlx-community's): the module tree of its llava / llava_next,
# MLX layout already, quantized layers as `weight` (uint32) + `scales` + `biases`.
MLX_VLM_PREFIXES = [
    ("vision_tower.vision_model.", "vision_tower."),
    ("language_model.", "language_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("image_newline", "image_newline"),
]

LAYOUTS = {
    "llava_hf": LLAVA_HF_PREFIXES,
    "original": ORIGINAL_PREFIXES,
    "clip": CLIP_PREFIXES,
    "mlx": MLX_PREFIXES,
    "mlx_vlm": MLX_VLM_PREFIXES,
}
# Layouts whose tensors are in MLX's layout already (nothing to transpose).
MLX_LAYOUTS = ("mlx", "mlx_vlm")

# llama.cpp's GGUF names. The language model (convert_legacy_llama.py, convert_hf_to_gguf.py):
# whole-model tensors, then each block's `blk.N.<name>`.
GGUF_NAMES = {
    "token_embd": "language_model.model.embed_tokens",
    "output_norm": "language_model.model.norm",
    "output": "language_model.lm_head",
}
GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
# The mmproj (convert_image_encoder_to_gguf.py): `v.*` the CLIP tower without its last layer and
# post_layernorm, `mm.*` the projector, LLaVA-1.6's newline. It names CLIP's fc1 `ffn_down`.
MMPROJ_NAMES = {
    "v.class_embd": "vision_tower.embeddings.class_embedding",
    "v.patch_embd": "vision_tower.embeddings.patch_embedding",
    "v.position_embd": "vision_tower.embeddings.position_embedding",
    "v.pre_ln": "vision_tower.pre_layrnorm",
    "v.post_ln": "vision_tower.post_layernorm",
    "mm.0": "multi_modal_projector.linear_1",
    "mm.2": "multi_modal_projector.linear_2",
    "model.image_newline": "image_newline",
}
MMPROJ_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
    "ln1": "layer_norm1",
    "ln2": "layer_norm2",
    "ffn_down": "mlp.fc1",
    "ffn_up": "mlp.fc2",
}
# layout -> (block prefix, our block prefix, whole-model names, block names)
GGUF_TABLES = {
    "gguf": ("blk.", "language_model.model.layers.", GGUF_NAMES, GGUF_BLOCK_NAMES),
    "mmproj": ("v.blk.", "vision_tower.encoder.layers.", MMPROJ_NAMES, MMPROJ_BLOCK_NAMES),
}
_LEAVES = ("weight", "bias", "scales", "biases")

# Buffers, the unused CLIP text tower and heads: nothing of LLaVA's.
_DROPPED_SUFFIXES = ("rotary_emb.inv_freq", "position_ids")

PATCH_EMBEDDING = "vision_tower.embeddings.patch_embedding.weight"
CONV_WEIGHTS = (PATCH_EMBEDDING, "vision_resampler.pool.weight")


def to_mlx_key(key: str, layout: str) -> Optional[str]:
    """Our name for a checkpoint key, or None for a tensor LLaVA does not use."""
    if key.endswith(_DROPPED_SUFFIXES):
        return None
    if layout in GGUF_TABLES:
        return _gguf_key(key, *GGUF_TABLES[layout])
    for old, new in LAYOUTS[layout]:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _gguf_key(key: str, block: str, our_block: str, names: dict, block_names: dict):
    stem, _, leaf = key.rpartition(".")
    if leaf not in _LEAVES:  # a parameter without a leaf name (v.class_embd)
        stem, leaf = key, ""
    suffix = f".{leaf}" if leaf else ""
    if stem.startswith(block):
        index, _, name = stem[len(block) :].partition(".")
        return f"{our_block}{index}.{block_names[name]}{suffix}" if name in block_names else None
    return f"{names[stem]}{suffix}" if stem in names else None


def to_mlx_tensor(name: str, value: mx.array, layout: str) -> mx.array:
    """Move a PyTorch-layout tensor to MLX's layout (tensors of MLX folders already are)."""
    if layout not in MLX_LAYOUTS and name in CONV_WEIGHTS and value.ndim == 4:
        # Conv2d weight: PyTorch (out, in, kh, kw) -> MLX (out, kh, kw, in).
        return value.transpose(0, 2, 3, 1)
    return value


def rename_quantization(quantization: Optional[dict], layout: str) -> Optional[dict]:
    """A `quantization` config entry with its per-module overrides under our module names."""
    if not quantization:
        return quantization
    out = {}
    for key, value in quantization.items():
        if isinstance(value, (dict, bool)):  # a module path: its own settings, or False
            key = to_mlx_key(f"{key}.weight", layout)
            if key is None:
                continue
            key = key[: -len(".weight")]
        out[key] = value
    return out


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor dtypes, shapes, `__metadata__`), read
    without touching the tensors."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 2 <= size <= 100 << 20:
            raise ValueError(f"{path} is not a safetensors file")
        return json.loads(f.read(size))


def is_mlx_layout(folder: Path, config: dict) -> bool:
    """Whether a llava-hf-style folder holds MLX tensors (mlx-vlm, mlx-community), judged by what
    it holds: safetensors metadata `format: mlx`, a `quantization` entry, or a patch embedding
    stored (out, kh, kw, in) rather than PyTorch's (out, in, kh, kw)."""
    if config.get("quantization"):
        return True
    channels = (config.get("vision_config") or {}).get("num_channels", 3)
    for path in sorted(folder.glob("*.safetensors")):
        header = safetensors_header(path)
        if (header.get("__metadata__") or {}).get("format") == "mlx":
            return True
        for key, info in header.items():
            shape = info.get("shape", []) if isinstance(info, dict) else []
            if key.endswith("patch_embedding.weight") and len(shape) == 4:
                return shape[3] == channels and shape[1] != channels
    return False


def weight_files(folder: Path) -> list[Path]:
    """The weight shards of a checkpoint folder: safetensors first, else PyTorch .bin."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(folder.glob("pytorch_model*.bin"))
    return files


def _load_torch_file(path: Path) -> dict[str, mx.array]:
    try:
        import torch
    except ImportError:
        raise RuntimeError(
            f"{path.name} is a PyTorch checkpoint: reading it needs torch "
            "(pip install 'mlx-llava[torch]'), or convert it to safetensors first"
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for k, v in state.items():
        if v.dtype == torch.bfloat16:
            out[k] = mx.array(v.float().numpy()).astype(mx.bfloat16)
        else:
            out[k] = mx.array(v.numpy())
    return out


def load_file(path: Path) -> dict[str, mx.array]:
    """All tensors of one shard (safetensors through mx.load, .bin through torch weights-only)."""
    if path.suffix == ".bin":
        return _load_torch_file(path)
    return mx.load(str(path))


def iter_shards(folder: Path) -> Iterator[dict[str, mx.array]]:
    """Yield each shard's tensors in turn, so that a 7B model is never held twice."""
    files = weight_files(folder)
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors or pytorch_model*.bin) in {folder}")
    for path in files:
        yield load_file(path)


def dequantized_shards(
    shards: Iterator[dict[str, mx.array]], quantization: dict
) -> Iterator[dict[str, mx.array]]:
    """The shards of a quantized MLX folder with each quantized layer's `weight`, `scales` and
    `biases` replaced by its floating-point `weight` (a layer split across two shards is held
    back until its parts have all been read).

    Args:
        quantization: the folder's config `quantization` entry (mlx-lm's: `group_size`, `bits`,
            `mode`, and per-layer overrides).
    """
    pending: dict[str, dict[str, mx.array]] = {}
    for shard in shards:
        out = {}
        for key, value in shard.items():
            module, _, leaf = key.rpartition(".")
            # A quantized weight is packed into uint32; its scales may be in the next shard.
            is_part = leaf in ("scales", "biases") or (
                leaf == "weight" and (value.dtype == mx.uint32 or f"{module}.scales" in shard)
            )
            if not is_part:
                out[key] = value
                continue
            parts = pending.setdefault(module, {})
            parts[leaf] = value
            mode = _layer_setting(quantization, module, "mode", "affine")
            needed = {"weight", "scales"} | ({"biases"} if mode == "affine" else set())
            if needed <= set(parts):
                del pending[module]
                out[f"{module}.weight"] = mx.dequantize(
                    parts["weight"],
                    parts["scales"],
                    parts.get("biases"),
                    group_size=_layer_setting(quantization, module, "group_size", 64),
                    bits=_layer_setting(quantization, module, "bits", 4),
                    mode=mode,
                )
        yield out
    if pending:
        raise ValueError(f"quantized layer '{next(iter(pending))}' lacks some of its tensors")


def _layer_setting(quantization: dict, module: str, key: str, default):
    layer = quantization.get(module)
    if isinstance(layer, dict) and key in layer:
        return layer[key]
    return quantization.get(key, default)


def load_weights(folder: Path) -> dict[str, mx.array]:
    """Every tensor of a folder's shards, as stored."""
    weights = {}
    for shard in iter_shards(folder):
        weights.update(shard)
    return weights


def save_shards(folder: Path, weights: dict[str, mx.array], max_shard_bytes: int) -> None:
    """Write `weights` as safetensors shards of at most `max_shard_bytes`, with an index."""
    writer = ShardWriter(folder, max_shard_bytes)
    for k, v in weights.items():
        writer.add(k, v)
    writer.close()


class ShardWriter:
    """Accumulates tensors and writes `model-0000k.safetensors` shards plus the index."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.written: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, value: mx.array) -> None:
        if self.pending and self.pending_bytes + value.nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[name] = value
        self.pending_bytes += value.nbytes
        self.total_bytes += value.nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        index = len(self.written)
        mx.save_safetensors(
            str(self.folder / f"_shard_{index}.safetensors"),
            self.pending,
            metadata={"format": "mlx"},
        )
        self.written.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.written)
        weight_map = {}
        for i, names in enumerate(self.written):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"_shard_{i}.safetensors").rename(self.folder / name)
            weight_map.update({k: name for k in names})
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        with open(self.folder / "model.safetensors.index.json", "w") as f:
            json.dump(index, f, indent=2)
