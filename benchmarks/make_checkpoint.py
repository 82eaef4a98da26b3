"""Write a random llava-hf checkpoint offline, for benchmarks.

    python benchmarks/make_checkpoint.py --out /tmp/llava-mid                 # mid, float32
    python benchmarks/make_checkpoint.py --out /tmp/llava-7b --preset 7b      # float16, ~14 GB
    python benchmarks/make_checkpoint.py --out /tmp/llava-deep --preset deep  # float32, 1.1 GB
    python benchmarks/make_checkpoint.py --out /tmp/next-mid --next           # LLaVA-NeXT
    python benchmarks/make_checkpoint.py --out /tmp/ov-mid --preset ov-mid    # LLaVA-OneVision

The folder looks like a llava-hf hub repo (llava-hf/llava-1.5-7b-hf): `config.json` from
transformers' `LlavaConfig`, safetensors shards with the hub's key names
(`language_model.model.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`), a small
Llama-like tokenizer from `llava_testing.tokenizer_builder` (smaller than the model's
vocabulary, which is fine for timing), `preprocessor_config.json`, `processor_config.json` and
`chat_template.json`. With `--next` it is a llava-v1.6-*-hf repo instead: transformers'
`LlavaNextConfig` with the releases' pinpoints scaled to the tower's tiles (336 -> 224 px for
mid: a 640x480 picture is a 2 x 2 grid, 5 tower passes), `image_newline`, and a
LlavaNextProcessor's files.

The `ov-mid` preset is a llava-onevision-qwen2-*-hf repo instead (`write_onevision_hf`):
transformers' `LlavaOnevisionConfig` with a SigLIP tower of the releases' geometry (384 px
tiles in 14 px patches: 729 features a tile, 196 a video frame after pooling), the releases' 36
pinpoints and "anyres_max_9", a Qwen2 decoder with GQA (4 query, 2 key-value heads; biased
q/k/v; rope theta 1e6) and a LlavaOnevisionProcessor's files; only the widths and depths are
cut (tower 128 wide, 4 layers; decoder 256 wide, 4 layers), so that a 16-frame video (11,664
tower positions, 3,137 prompt positions) runs in seconds on a 2-core CPU.

The writer is `llava_testing.checkpoints.write_llava_hf` (no torch: the config comes from
transformers' `LlavaConfig`, names and shapes from our model built lazily, the tensors are drawn
with MLX and written shard by shard, so a 7B checkpoint is never held whole: peak ~ one 2 GB
shard). On a GPU build of MLX the draws run on the GPU.

Values: matrices ~ N(0, 1/fan_in) (so that the outputs depend on the picture and the prompt,
unlike a 0.02-init model's), x0.3 inside the transformer blocks (each layer nudges the residual
stream, as in trained models; the tests' checkpoints are drawn the same way), norm weights 1,
biases 0.02 N(0, 1). The lm_head row of `</s>` is zero, so that greedy decoding of this random
model never stops early and every benchmark run decodes exactly `--max-tokens` tokens.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from llava_testing.checkpoints import RandomInit, write_llava_hf, write_onevision_hf
from mlx_llava.anyres import DEFAULT_PINPOINTS
from mlx_llava.convert import DTYPES

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
# mid's tower before a deeper, wider Llama whose decoder layers hold 3/4 of the weights: the
# pipeline-parallel benchmark splits these layers across ranks (benchmarks/bench_distributed.py).
PRESETS["deep"] = dict(
    vision=PRESETS["mid"]["vision"],
    text=dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    dtype="float32",
)
# SigLIP so400m's geometry (384 px, patch 14, "gelu_pytorch_tanh") and Qwen2's layout at mid widths.
PRESETS["ov-mid"] = dict(
    vision=dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=2,
        image_size=384,
        patch_size=14,
    ),
    text=dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32064,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
    dtype="float32",
    onevision=True,
)
EOS_TOKEN_ID = 2
# Norm weights 1, biases 0.02 N(0, 1), and the lm_head row of </s> zero (see the module docstring).
INIT = RandomInit(norm_noise=0.0, bias_std=0.02, silent_tokens=(EOS_TOKEN_ID,))


def next_pinpoints(tile: int) -> list[list[int]]:
    """The llava-v1.6 releases' pinpoints (in 336-pixel tiles), for tiles of `tile` pixels."""
    return [[h // 336 * tile, w // 336 * tile] for h, w in DEFAULT_PINPOINTS]


def make_checkpoint(
    out: str | Path,
    preset: str = "mid",
    dtype: str | None = None,
    seed: int = 0,
    llava_next: bool = False,
) -> Path:
    """Write the random checkpoint of `preset` to `out` (replaced if it exists); LLaVA-NeXT's
    with `llava_next`."""
    spec = PRESETS[preset]
    dtype = dtype or spec["dtype"]
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if spec.get("onevision"):
        write_onevision_hf(out, spec["vision"], spec["text"], seed=seed, dtype=dtype, init=INIT)
        return out
    fields = {}
    if llava_next:
        fields["image_grid_pinpoints"] = next_pinpoints(spec["vision"]["image_size"])
    write_llava_hf(out, spec["vision"], spec["text"], seed=seed, dtype=dtype, init=INIT, **fields)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write a random llava-hf checkpoint (offline).")
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--preset", choices=list(PRESETS), default="mid")
    p.add_argument(
        "--dtype", choices=list(DTYPES), help="default: float32 mid, deep and ov-mid, float16 7b"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--next", action="store_true", help="LLaVA-NeXT (llava_next, anyres tiles)")
    args = p.parse_args(argv)
    tic = time.perf_counter()
    out = make_checkpoint(args.out, args.preset, args.dtype, args.seed, args.next)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - tic:.1f} s")


if __name__ == "__main__":
    main()
