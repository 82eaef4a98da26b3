"""Make tiny random LLaVA checkpoints with transformers and record the oracle's outputs.

``tests/fixtures/make_fixtures.py [--out tests/fixtures/data]`` runs these builders by hand;
tests/test_oracle_live.py runs them again in a temporary folder. Everything is made offline and
deterministically (seeded torch / numpy, a tokenizer trained on a built-in corpus); nothing is
downloaded. The functions take an ``out_dir`` and have no side effects at import.

Layout of the output folder::

    images/a.png, images/b.png        two small smooth pictures (40x30, 25x45)
    hf-hub/    llava-hf hub layout: language_model.model.*, vision_tower.vision_model.*, ...
    hf-v452/   the same weights, transformers 4.52 names: model.language_model.*, lm_head.weight
    hf-v5/     another model, as transformers 5 save_pretrained writes it
    hf-gqa/    GQA, rope 500000, feature layers [-2, -3], strategy "full", no projector bias
    orig-v15/  haotian-liu LLaVA-1.5 format (mlp2x_gelu, "pad"), .bin shards + index
    orig-v15-clip/  its vision tower as a full CLIPModel (text tower too)
    orig-v1/   haotian-liu v1 format (one linear projector), safetensors
    orig-v1-clip/   its vision tower as a CLIPVisionModel
    orig-spm-v15/   LLaVA-1.5 with the release's real tokenizer files: a SentencePiece
                    tokenizer.model (trained here like Llama's), tokenizer_config.json and
                    special_tokens_map.json as liuhaotian/llava-v1.5-7b's; no tokenizer.json
    orig-spm-v1/    the same for a LLaVA v1 release (its tokenizer_config.json has no add_bos_token)
    orig-spm-clip/  their vision tower, a full CLIPModel carrying CLIP's own tokenizer files
    orig-spm-strings/  tokenizer files only: special tokens as plain strings, an added token

Each checkpoint folder holds ``oracle.npz`` (float32 / int32 arrays) and ``oracle.json`` (the
prompts and facts about the run). The hf-* oracles are transformers' LlavaForConditionalGeneration
and LlavaProcessor loaded from the folder; the orig-* oracles are computed by hand in torch the way
the original repository does it (expand2square, tokenizer_image_token, splice the projected
features into the Llama input embeddings), since transformers has no class for that format. The
orig-spm-* oracles are token ids only: ``tokenizer_image_token`` over transformers 4.31's slow
LlamaTokenizer, and the training ids and targets of the original ``preprocess_v1`` /
``preprocess_plain`` for a set of LLaVA records, transcribed in original_tokenization.py and run
on ``sentencepiece``, and checked against transformers 4.31.0 itself (``--tf431-python``, see
witness_tf431.py).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from llava_testing.checkpoints import llava_next_processor_files, write_processor_files
from llava_testing.original_tokenization import (
    IGNORE_INDEX,
    PROMPTS,
    SPM_VOCAB_SIZE,
    STRINGS_PROMPTS,
    TRAINING_CASES,
    clip_bpe,
    original_ids,
    original_training_cases,
    tokenizer_image_token,
    train_sentencepiece,
    write_clip_tokenizer,
    write_llava_tokenizer,
)
from llava_testing.tokenizer_builder import build_tokenizer, default_corpus, pad_vocab_size
from mlx_llava.conversation import LLAVA_HF_CHAT_TEMPLATE
from mlx_llava.image_processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

ROOT = Path(__file__).resolve().parents[1]  # the checkout (llava_testing is installed editable)
WITNESS_SCRIPT = ROOT / "tests" / "fixtures" / "witness_tf431.py"

IMAGE_SIZES = {"a": (40, 30), "b": (25, 45)}  # (width, height)
IMAGE_SEEDS = {"a": 1, "b": 2}


PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TEXT_PROMPT = "USER: Tell me a story. ASSISTANT:"
TWO_PROMPT = "USER: <image>\n<image>\nCompare the two pictures. ASSISTANT:"
BATCH_PROMPTS = [
    "USER: <image>\nWhat is in the picture? ASSISTANT:",
    "USER: <image>\nDescribe this image in detail. What colour is the big cat? ASSISTANT:",
]
ORIGINAL_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ORIGINAL_PROMPT = ORIGINAL_SYSTEM + " USER: <image>\nWhat is in the picture? ASSISTANT:"
ORIGINAL_IMAGE_TOKEN_INDEX = -200  # IMAGE_TOKEN_INDEX of haotian-liu/LLaVA's constants.py
# 380 BPE tokens + <image> + <pad> = 382, padded to 384: two unused rows, like llava-hf's 62.
TOKENIZER_VOCAB_SIZE = 380
# Greedy fixtures only hold ordinary tokens (no <unk>/<s>/</s>, <image>, <pad> or padding rows,
# which e.g. mlx-lm's SPMStreamingDetokenizer can not map), so a decode of them is well defined.
FIRST_ORDINARY_ID = 3
NUM_GREEDY = 24
NUM_BATCH_GREEDY = 12
EOS_TOKEN_ID = 2

# The specs' seeds are the first that pass `oracle_problems` (greedy decoding far from ties, no
# EOS or special ids, varied tokens) with torch 2.13 CPU; should another torch draw other numbers,
# the search goes on upwards, and the seed used is recorded in each oracle.json.
MIN_MARGIN = 2e-3
# hf-v452 holds hf-hub's weights, so its oracle is hf-hub's; it keeps only these arrays.
V452_ORACLE_KEYS = (
    "pixel_values", "input_ids", "attention_mask", "image_features", "logits", "greedy_tokens",
    "text_input_ids", "text_greedy_tokens",
)  # fmt: skip
MAX_SEED_TRIES = 50

# Sizes are tiny so that the data folder stays < 3 MB; the towers' widths differ (24 vs 32) so
# that a mixed-up dimension fails loudly. Head dims are 8 in both.
VISION = dict(
    hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=3,
    image_size=28, patch_size=7,
)  # fmt: skip
TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=256, rms_norm_eps=1e-5,
)  # fmt: skip

# Each spec: layout ("hub", "v452", "v5"), config style and the model's hyper-parameters.
HF_SPECS: dict[str, dict] = {
    "hf-hub": dict(
        seed=103,
        layout="hub",
        dtype_key="torch_dtype",
        rope=None,  # absent: LlamaConfig's default theta 10000, as in the real hub config
        vision=dict(VISION),
        text=dict(TEXT),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
    ),
    "hf-v5": dict(
        seed=207,
        layout="v5",
        dtype_key="dtype",
        rope={"rope_type": "default", "rope_theta": 10000.0},
        vision=dict(VISION),
        text=dict(TEXT),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
    ),
    "hf-gqa": dict(
        seed=306,
        layout="hub",
        dtype_key="torch_dtype",
        rope={"rope_type": "default", "rope_theta": 500000.0},
        vision=dict(VISION, image_size=32, patch_size=8, hidden_act="gelu"),
        text=dict(TEXT, num_key_value_heads=2),
        vision_feature_layer=[-2, -3],
        vision_feature_select_strategy="full",
        multimodal_projector_bias=False,
    ),
}
# Same weights as hf-hub (same seed, same sizes), 4.52 key names, `dtype`, explicit rope_theta.
HF_SPECS["hf-v452"] = dict(
    copy.deepcopy(HF_SPECS["hf-hub"]), layout="v452", dtype_key="dtype", rope=10000.0
)

ORIG_SPECS: dict[str, dict] = {
    "orig-v15": dict(
        seed=401,
        projector="mlp2x_gelu",
        image_aspect_ratio="pad",
        shards=2,
        clip="full",
        mm_vision_tower="openai/clip-vit-large-patch14-336",
        vision=dict(VISION),
        text=dict(TEXT),
    ),
    "orig-v1": dict(
        seed=500,
        projector="linear",
        image_aspect_ratio=None,  # absent: "square"
        shards=0,  # one model.safetensors
        clip="vision",
        mm_vision_tower="openai/clip-vit-large-patch14",
        vision=dict(VISION, image_size=21, patch_size=7),
        text=dict(TEXT),
    ),
}

# Original releases with their real kind of tokenizer, both beside one tower (SPM_TOWER) that
# carries CLIP's tokenizer files. Smaller still: only ids, conversion and streaming run on them.
SPM_TOWER = "orig-spm-clip"
SPM_VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    image_size=14, patch_size=7,
)  # fmt: skip
SPM_TEXT = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    max_position_embeddings=256, rms_norm_eps=1e-5,
)  # fmt: skip
ORIG_SPM_SPECS: dict[str, dict] = {
    "orig-spm-v15": dict(
        seed=601,
        release="v1.5",
        projector="mlp2x_gelu",
        image_aspect_ratio="pad",
        shards=0,
        clip=None,  # the shared SPM_TOWER
        mm_vision_tower="openai/clip-vit-large-patch14-336",
        vision=dict(SPM_VISION),
        text=dict(SPM_TEXT),
    ),
    "orig-spm-v1": dict(
        seed=602,
        release="v1",
        projector="linear",
        image_aspect_ratio=None,
        shards=0,
        clip=None,
        mm_vision_tower="openai/clip-vit-large-patch14",
        vision=dict(SPM_VISION),
        text=dict(SPM_TEXT),
    ),
}


# --------------------------------------------------------------------------------------------
# Images


def make_image(seed: int, width: int, height: int) -> Image.Image:
    """A deterministic smooth random-colour RGB picture (a few blended sinusoids per channel)."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    x /= max(width - 1, 1)
    y /= max(height - 1, 1)
    channels = []
    for _ in range(3):
        value = rng.uniform(0.2, 0.8) + rng.uniform(-0.3, 0.3) * x + rng.uniform(-0.3, 0.3) * y
        for _ in range(3):
            fx, fy = rng.uniform(0.5, 3.0, size=2)
            phase = rng.uniform(0, 2 * np.pi)
            value += rng.uniform(0.05, 0.25) * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        channels.append(value)
    pixels = np.clip(np.stack(channels, axis=-1) * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels)  # uint8 [H, W, 3]: RGB


def write_images(
    out_dir: str | Path, sizes: dict = IMAGE_SIZES, seeds: dict = IMAGE_SEEDS
) -> dict[str, Path]:
    """Writes ``images/{name}.png`` for each of ``sizes`` (``a`` and ``b`` by default); returns
    their paths by name."""
    folder = Path(out_dir) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (width, height) in sizes.items():
        paths[name] = folder / f"{name}.png"
        make_image(seeds[name], width, height).save(paths[name])
    return paths


def load_images(
    out_dir: str | Path, sizes: dict = IMAGE_SIZES, seeds: dict = IMAGE_SEEDS
) -> dict[str, Image.Image]:
    """The fixture images, made on the fly if ``images/`` is not there yet."""
    folder = Path(out_dir) / "images"
    if not all((folder / f"{n}.png").exists() for n in sizes):
        write_images(out_dir, sizes, seeds)
    return {n: Image.open(folder / f"{n}.png").convert("RGB") for n in sizes}


# --------------------------------------------------------------------------------------------
# Weights


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Re-draws every parameter so that the tiny model's outputs are far from degenerate.

    Matrices and embeddings ~ N(0, std); norm weights 1 + 0.1 N(0, 1); biases 0.1 N(0, 1).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("logit_scale"):
                continue
            if name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif param.ndim == 1 and name.endswith("weight"):  # LayerNorm / RMSNorm
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(std * noise)


def save_random_model(model_class, config, spec: dict, out_dir: Path) -> None:
    """A `model_class(config)` in float32 with `randomize_(spec["seed"])` values, written into
    `out_dir` in `spec["layout"]`.

    "v5" is transformers 5's `save_pretrained`, which reverts its load-time renaming and writes
    the hub names except that the vision tower has no `vision_model.` level any more
    (`vision_tower.embeddings.class_embedding`, `vision_tower.pre_layrnorm.weight`, ...;
    LLaVA-NeXT's `image_newline` on top), with config.json in full and a
    generation_config.json. Every other layout is the state dict renamed by `_to_layout`.
    """
    torch.manual_seed(spec["seed"])
    model = model_class(config).to(torch.float32).eval()
    randomize_(model, spec["seed"])
    if spec["layout"] == "v5":
        model.save_pretrained(out_dir)
    else:
        _save_safetensors(
            _to_layout(model.state_dict(), spec["layout"]), out_dir / "model.safetensors"
        )


def _to_layout(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Renames transformers 5's in-memory LLaVA names to a checkpoint layout.

    In memory (transformers 5.x): ``model.language_model.*``, ``model.vision_tower.embeddings.*``
    (CLIPVisionModel no longer has a ``vision_model`` level), ``model.multi_modal_projector.*``,
    ``lm_head.weight``.
    """
    out = {}
    for key, value in state.items():
        if layout == "hub":
            key = key.replace("model.language_model.", "language_model.model.", 1)
            key = key.replace("lm_head.", "language_model.lm_head.", 1)
            key = key.replace("model.vision_tower.", "vision_tower.vision_model.", 1)
            key = key.replace("model.multi_modal_projector.", "multi_modal_projector.", 1)
            key = key.replace("model.image_newline", "image_newline", 1)  # LLaVA-NeXT
        elif layout == "v452":
            key = key.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1)
        else:
            raise ValueError(f"unknown layout {layout!r}")
        out[key] = value.detach().clone().contiguous()
    return out


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: state[k] for k in sorted(state)}, str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------
# llava-hf checkpoints


def _sparse_llava_config(spec: dict, vocab_size: int, image_token_id: int, pad_id: int) -> dict:
    """A config.json in the style of llava-hf/llava-1.5-7b-hf's: only what is needed.

    Sizes must be listed (LlamaConfig's defaults are 7B sizes); hidden_act and rope_theta are
    omitted (defaults silu / 10000) unless the spec sets rope; the vision tower has no hidden_act
    (CLIPVisionConfig's default quick_gelu) unless the spec sets one.
    """
    dtype_key = spec["dtype_key"]
    vision, text = dict(spec["vision"]), dict(spec["text"])
    text_config = {
        "_name_or_path": "tiny-random-vicuna",
        "architectures": ["LlamaForCausalLM"],
        **{k: text.pop(k) for k in sorted(text)},
        "model_type": "llama",
        dtype_key: "float32",
        "vocab_size": vocab_size,
    }
    rope = spec["rope"]
    if isinstance(rope, dict):
        text_config["rope_parameters"] = dict(rope)
    elif rope is not None:
        text_config["rope_theta"] = float(rope)
    vision_config = {
        **{k: vision[k] for k in sorted(vision)},
        "model_type": "clip_vision_model",
        "projection_dim": 16,
        "vocab_size": 32000,  # a leftover field that llava-hf's config carries
    }
    num_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_seq_length": num_patches
        + (1 if spec["vision_feature_select_strategy"] == "full" else 0),
        "image_token_index": image_token_id,
        "model_type": "llava",
        "pad_token_id": pad_id,
        "projector_hidden_act": "gelu",
        "text_config": text_config,
        "tie_word_embeddings": False,
        dtype_key: "float32",
        "transformers_version": "4.52.0" if spec["layout"] == "v452" else "4.36.0.dev0",
        "vision_config": vision_config,
        "vision_feature_layer": spec["vision_feature_layer"],
        "vision_feature_select_strategy": spec["vision_feature_select_strategy"],
        "vocab_size": vocab_size,
    }
    if not spec["multimodal_projector_bias"]:
        config["multimodal_projector_bias"] = False
    return config


def _write_json(path: Path, obj, sort_keys: bool = False) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n")


def _llava_config_from_spec(spec: dict, vocab_size: int, image_token_id: int, pad_id: int):
    from transformers import LlavaConfig

    text = dict(spec["text"], model_type="llama", vocab_size=vocab_size, pad_token_id=pad_id)
    if isinstance(spec["rope"], dict):
        text["rope_parameters"] = dict(spec["rope"])
    elif spec["rope"] is not None:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(spec["rope"])}
    vision = dict(spec["vision"], model_type="clip_vision_model")
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2
        + (1 if spec["vision_feature_select_strategy"] == "full" else 0),
        vision_feature_layer=spec["vision_feature_layer"],
        vision_feature_select_strategy=spec["vision_feature_select_strategy"],
        multimodal_projector_bias=spec["multimodal_projector_bias"],
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def build_llava_hf(out_dir: str | Path, spec: dict) -> Path:
    """Writes a tiny random llava-hf checkpoint folder, exactly like a hub repo.

    Args:
        out_dir: the checkpoint folder to (re)create.
        spec: one of ``HF_SPECS`` (``seed``, ``layout``, ``dtype_key``, ``rope``, ``vision``,
            ``text``, ``vision_feature_layer``, ``vision_feature_select_strategy``,
            ``multimodal_projector_bias``).

    Returns:
        The folder: config.json, model.safetensors, tokenizer files, preprocessor_config.json,
        processor_config.json, chat_template.json (and generation_config.json for "v5").
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    tokenizer = build_tokenizer(out_dir, vocab_size=TOKENIZER_VOCAB_SIZE, image_token=True)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    pad_id = tokenizer.convert_tokens_to_ids("<pad>")
    vocab_size = pad_vocab_size(len(tokenizer))

    if spec["layout"] == "v5":
        config = _llava_config_from_spec(spec, vocab_size, image_token_id, pad_id)
    else:
        _write_json(
            out_dir / "config.json",
            _sparse_llava_config(spec, vocab_size, image_token_id, pad_id),
            sort_keys=True,
        )
        config = LlavaConfig.from_pretrained(out_dir)

    save_random_model(LlavaForConditionalGeneration, config, spec, out_dir)
    write_processor_files(out_dir, spec["vision"], spec["vision_feature_select_strategy"])
    return out_dir


# --------------------------------------------------------------------------------------------
# Oracle for llava-hf checkpoints


def _np(t: torch.Tensor, dtype=np.float32) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype)


def _greedy_margins(logits: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> np.ndarray:
    """Top-1 minus top-2 raw logit at each generated step, NaN where argmax != chosen token."""
    steps = torch.stack(logits, dim=1)  # [B, T, V]
    top2 = steps.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    agrees = steps.argmax(-1) == tokens
    return _np(torch.where(agrees, margin, torch.full_like(margin, float("nan"))))


def _generate(model, inputs: dict, num_tokens: int, pad_id: int):
    out = model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=num_tokens,
        min_new_tokens=num_tokens,  # EOS can not end it early (and is checked never to be argmax)
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=pad_id,
        temperature=None,
        top_p=None,
        top_k=None,
        return_dict_in_generate=True,
        output_logits=True,
    )
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    return new, _greedy_margins(out.logits, new)


def oracle_outputs(model_dir: str | Path, images_dir: str | Path | None = None) -> dict:
    """Runs transformers on a llava-hf folder and records its outputs.

    Args:
        model_dir: a folder written by :func:`build_llava_hf`.
        images_dir: the folder holding ``images/``; the parent of ``model_dir`` by default.

    Returns:
        ``{name: np.ndarray}`` (float32 / int32): pixel_values [1, 3, S, S], input_ids [1, L],
        attention_mask [1, L], vision_hidden_states [layers + 1, 1, P, D], image_features
        [1, N, H], logits [1, L, V], greedy_tokens [24]; text_input_ids, text_logits,
        text_greedy_tokens; two_pixel_values [2, 3, S, S], two_input_ids, two_logits;
        batch_input_ids / batch_attention_mask [2, L'] (left padded),
        batch_greedy_tokens [2, 12]; and ``_margins``: {name: top1 - top2 per greedy step} (not
        saved in the npz).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir = Path(model_dir)
    images = load_images(images_dir if images_dir is not None else model_dir.parent)
    model = LlavaForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    pad_id = processor.tokenizer.pad_token_id
    out: dict[str, np.ndarray] = {}
    margins: dict[str, np.ndarray] = {}
    with torch.no_grad():
        inputs = processor(images=[images["a"]], text=PROMPT, return_tensors="pt")
        out["pixel_values"] = _np(inputs["pixel_values"])
        out["input_ids"] = _np(inputs["input_ids"], np.int32)
        out["attention_mask"] = _np(inputs["attention_mask"], np.int32)
        vision = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        out["vision_hidden_states"] = _np(torch.stack(vision.hidden_states))
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        out["image_features"] = _np(torch.stack(list(features)))
        out["logits"] = _np(model(**inputs).logits)
        tokens, margins["greedy_tokens"] = _generate(model, inputs, NUM_GREEDY, pad_id)
        out["greedy_tokens"] = _np(tokens[0], np.int32)

        inputs = processor(text=TEXT_PROMPT, return_tensors="pt")
        out["text_input_ids"] = _np(inputs["input_ids"], np.int32)
        out["text_logits"] = _np(model(**inputs).logits)
        tokens, margins["text_greedy_tokens"] = _generate(model, inputs, NUM_GREEDY, pad_id)
        out["text_greedy_tokens"] = _np(tokens[0], np.int32)

        inputs = processor(images=[images["a"], images["b"]], text=TWO_PROMPT, return_tensors="pt")
        out["two_pixel_values"] = _np(inputs["pixel_values"])
        out["two_input_ids"] = _np(inputs["input_ids"], np.int32)
        out["two_logits"] = _np(model(**inputs).logits)

        inputs = processor(
            images=[images["a"], images["b"]],
            text=BATCH_PROMPTS,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        assert torch.equal(inputs["pixel_values"], torch.from_numpy(out["two_pixel_values"]))
        out["batch_input_ids"] = _np(inputs["input_ids"], np.int32)
        out["batch_attention_mask"] = _np(inputs["attention_mask"], np.int32)
        tokens, margins["batch_greedy_tokens"] = _generate(model, inputs, NUM_BATCH_GREEDY, pad_id)
        out["batch_greedy_tokens"] = _np(tokens, np.int32)
    out["_margins"] = margins
    return out


def oracle_problems(oracle: dict) -> list[str]:
    """Why an oracle would make a poor fixture (near-tie greedy steps, EOS, degenerate output)."""
    problems = []
    for name, margin in oracle["_margins"].items():
        if np.isnan(margin).any():
            problems.append(f"{name}: a logits processor changed the greedy choice")
        elif margin.min() < MIN_MARGIN:
            problems.append(f"{name}: top-2 margin {margin.min():.2e} < {MIN_MARGIN}")
    for name in ("greedy_tokens", "text_greedy_tokens", "batch_greedy_tokens"):
        tokens = oracle[name]
        if (tokens == EOS_TOKEN_ID).any():
            problems.append(f"{name}: contains EOS")
        if ((tokens < FIRST_ORDINARY_ID) | (tokens >= TOKENIZER_VOCAB_SIZE)).any():
            problems.append(f"{name}: a special, added or padding-row id")
        for row in tokens.reshape(-1, tokens.shape[-1]):
            if len(set(row.tolist())) < 4:
                problems.append(f"{name}: degenerate {row.tolist()}")
    for name in ("logits", "text_logits", "two_logits"):
        if len(np.unique(oracle[name][0].argmax(-1))) < 4:
            problems.append(f"{name}: argmax hardly varies across positions")
    return problems


def save_oracle(model_dir: str | Path, oracle: dict, info: dict) -> None:
    """Writes ``oracle.npz`` (arrays) and ``oracle.json`` (prompts, facts, margins)."""
    model_dir = Path(model_dir)
    arrays = {k: v for k, v in oracle.items() if not k.startswith("_")}
    np.savez_compressed(model_dir / "oracle.npz", **arrays)
    margins = {k: float(np.nanmin(v)) for k, v in oracle.get("_margins", {}).items()}
    _write_json(model_dir / "oracle.json", {**info, "min_greedy_margins": margins})


# --------------------------------------------------------------------------------------------
# Original haotian-liu checkpoints


def _clip_vision_config(vision: dict):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**vision, projection_dim=16)


def _tiny_clip_text_config(vocab_size: int = 64) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip


def _write_clip(out_dir: Path, spec: dict, seed: int, text_vocab_size: int = 64) -> None:
    """The separate vision tower: a full CLIPModel ("full") or a CLIPVisionModel ("vision").

    Keys are the hub's: ``vision_model.*`` (+ ``text_model.*``, ``visual_projection.weight``,
    ``text_projection.weight``, ``logit_scale`` for the full model), with the
    ``vision_model.embeddings.position_ids`` buffer that old checkpoints carry. The
    preprocessor_config.json is in openai's old style (int ``size`` / ``crop_size``).
    """
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    vision = dict(spec["vision"])
    vision.setdefault("hidden_act", "quick_gelu")
    torch.manual_seed(seed)
    if spec["clip"] == "full":
        config = CLIPConfig(
            text_config=_tiny_clip_text_config(text_vocab_size),
            vision_config=vision,
            projection_dim=16,
        )
        model = CLIPModel(config).eval()
        randomize_(model, seed)
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        prefix = "vision_model."
        config_dict = config.to_dict()
        config_dict["architectures"] = ["CLIPModel"]
    else:
        config = _clip_vision_config(vision)
        model = CLIPVisionModel(config).eval()
        randomize_(model, seed)
        state = {
            "vision_model." + k: v
            for k, v in model.state_dict().items()
            if not k.endswith("position_ids")
        }
        prefix = "vision_model."
        config_dict = config.to_dict()
        config_dict["architectures"] = ["CLIPVisionModel"]
    num_positions = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    state[prefix + "embeddings.position_ids"] = torch.arange(num_positions)[None]
    for key in ("transformers_version", "dtype", "torch_dtype"):
        config_dict.pop(key, None)
    config_dict["torch_dtype"] = "float32"
    _write_json(out_dir / "config.json", config_dict, sort_keys=True)
    _save_safetensors({k: v.contiguous() for k, v in state.items()}, out_dir / "model.safetensors")
    size = vision["image_size"]
    _write_json(
        out_dir / "preprocessor_config.json",
        {
            "crop_size": size,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": OPENAI_CLIP_MEAN,
            "image_std": OPENAI_CLIP_STD,
            "resample": 3,
            "size": size,
        },
    )


def _load_clip_vision(clip_dir: Path):
    """The CLIPVisionModel held in a clip folder written by :func:`_write_clip`."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModel

    config = json.loads((clip_dir / "config.json").read_text())
    if config.get("model_type") == "clip":
        vision_config = CLIPConfig.from_dict(config).vision_config
    else:
        vision_config = CLIPVisionConfig.from_dict(config)
    model = CLIPVisionModel(vision_config).eval()
    state = load_file(str(clip_dir / "model.safetensors"))
    state = {
        k[len("vision_model.") :]: v
        for k, v in state.items()
        if k.startswith("vision_model.") and not k.endswith("position_ids")
    }
    model.load_state_dict(state, strict=False)
    missing = set(model.state_dict()) - set(state) - {"embeddings.position_ids"}
    assert not missing, missing
    return model


def _original_config(spec: dict, vocab_size: int) -> dict:
    """config.json of a haotian-liu checkpoint (Llama fields at the top level, mm_* fields)."""
    text = spec["text"]
    config = {
        "_name_or_path": "./checkpoints/tiny-vicuna",
        "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": text["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": text["intermediate_size"],
        "max_length": text["max_position_embeddings"],
        "max_position_embeddings": text["max_position_embeddings"],
        "mm_hidden_size": spec["vision"]["hidden_size"],
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": spec["mm_vision_tower"],
        "model_type": "llava",
        "num_attention_heads": text["num_attention_heads"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_key_value_heads": text.get("num_key_value_heads", text["num_attention_heads"]),
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": text["rms_norm_eps"],
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": vocab_size,
    }
    if spec["projector"] != "linear":
        config["mm_projector_type"] = spec["projector"]
    if spec["image_aspect_ratio"] is not None:
        config["image_aspect_ratio"] = spec["image_aspect_ratio"]
    return dict(sorted(config.items()))


def _original_llama(spec: dict, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    text = spec["text"]
    config = LlamaConfig(
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_attention_heads=text["num_attention_heads"],
        num_hidden_layers=text["num_hidden_layers"],
        num_key_value_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
        max_position_embeddings=text["max_position_embeddings"],
        rms_norm_eps=text["rms_norm_eps"],
        vocab_size=vocab_size,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


class _Projector(torch.nn.Module):
    """The original mm_projector: ``nn.Linear`` (v1) or ``Sequential(Linear, GELU, Linear)``."""

    def __init__(self, kind: str, mm_hidden: int, hidden: int):
        super().__init__()
        if kind == "linear":
            self.mm_projector = torch.nn.Linear(mm_hidden, hidden)
        elif kind == "mlp2x_gelu":
            self.mm_projector = torch.nn.Sequential(
                torch.nn.Linear(mm_hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)
            )
        else:
            raise ValueError(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mm_projector(x)


def build_original(out_dir: str | Path, spec: dict, seed: int | None = None) -> Path:
    """Writes a tiny haotian-liu-format LLaVA checkpoint and its separate CLIP folder.

    Args:
        out_dir: the checkpoint folder (e.g. ``data/orig-v15``); the tower goes to
            ``<out_dir>-clip`` unless the spec's ``clip`` is None (no tower written).
        spec: one of ``ORIG_SPECS`` or ``ORIG_SPM_SPECS`` (``release``: the SentencePiece
            tokenizer files of that release instead of a tokenizer.json).
        seed: overrides ``spec["seed"]``.

    Returns:
        The checkpoint folder.
    """
    out_dir = Path(out_dir)
    clip_dir = out_dir.with_name(out_dir.name + "-clip")
    seed = spec["seed"] if seed is None else seed
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    if spec.get("release"):
        write_llava_tokenizer(out_dir, spec["release"], llama_sentencepiece_model())
        vocab_size = SPM_VOCAB_SIZE
    else:
        tokenizer = build_tokenizer(out_dir, vocab_size=TOKENIZER_VOCAB_SIZE, image_token=False)
        vocab_size = len(tokenizer)
    _write_json(out_dir / "config.json", _original_config(spec, vocab_size))
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 4096},
    )
    if spec["clip"] is not None:
        _write_clip(clip_dir, spec, seed + 1)

    torch.manual_seed(seed)
    llama = _original_llama(spec, vocab_size).eval()
    randomize_(llama, seed)
    projector = _Projector(
        spec["projector"], spec["vision"]["hidden_size"], spec["text"]["hidden_size"]
    )
    randomize_(projector, seed + 2)
    state = {k: v for k, v in llama.state_dict().items() if "rotary_emb" not in k}
    state.update({"model." + k: v for k, v in projector.state_dict().items()})
    head_dim = spec["text"]["hidden_size"] // spec["text"]["num_attention_heads"]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    for i in range(spec["text"]["num_hidden_layers"]):  # buffers that old checkpoints carry
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}

    if spec["shards"]:
        keys = sorted(state, key=_original_key_order)
        num = spec["shards"]
        per = -(-len(keys) // num)
        weight_map = {}
        for i in range(num):
            name = f"pytorch_model-{i + 1:05d}-of-{num:05d}.bin"
            shard = {k: state[k] for k in keys[i * per : (i + 1) * per]}
            torch.save(shard, out_dir / name)
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        _write_json(
            out_dir / "pytorch_model.bin.index.json",
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )
    else:
        _save_safetensors(state, out_dir / "model.safetensors")
    return out_dir


def _original_key_order(key: str) -> tuple:
    """Orders keys as the original shards do: embeddings, layers by index, norm, head, projector."""
    parts = key.split(".")
    if key.startswith("model.embed_tokens"):
        return (0, 0, key)
    if key.startswith("model.layers."):
        return (1, int(parts[2]), key)
    if key.startswith("model.norm"):
        return (2, 0, key)
    if key.startswith("lm_head"):
        return (3, 0, key)
    return (4, 0, key)


def _load_original_state(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "pytorch_model.bin.index.json"
    if index.exists():
        state = {}
        for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(torch.load(model_dir / name, map_location="cpu", weights_only=True))
        return state
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """haotian-liu/LLaVA's llava/mm_utils.py expand2square, verbatim in behaviour."""
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


def original_oracle_outputs(model_dir: str | Path, images_dir: str | Path | None = None) -> dict:
    """The original LLaVA's outputs on a haotian-liu folder, computed by hand in torch.

    Pixels: expand2square with the mean colour when ``image_aspect_ratio`` is "pad", then the
    CLIP folder's CLIPImageProcessor. Ids: :func:`tokenizer_image_token` of the vicuna_v1 prompt,
    the image as -200. Features: CLIP hidden_states[-2] without CLS -> mm_projector. Logits: Llama
    over the embeddings with the features spliced in place of the -200 (the expanded sequence).

    Returns:
        ``{name: np.ndarray}``: pixel_values [1, 3, S, S], input_ids [1, L] (with -200),
        vision_hidden_states [layers + 1, 1, P, D], image_features [1, N, H],
        logits [1, L - 1 + N, V], greedy_tokens [24]; and ``_margins``.
    """
    from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

    model_dir = Path(model_dir)
    clip_dir = model_dir.with_name(model_dir.name + "-clip")
    images = load_images(images_dir if images_dir is not None else model_dir.parent)
    config = json.loads((model_dir / "config.json").read_text())
    # Not AutoTokenizer: it would parse config.json, whose model_type "llava" is HF's LlavaConfig.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    vision = _load_clip_vision(clip_dir)

    spec = {
        "text": {
            "hidden_size": config["hidden_size"],
            "intermediate_size": config["intermediate_size"],
            "num_attention_heads": config["num_attention_heads"],
            "num_hidden_layers": config["num_hidden_layers"],
            "num_key_value_heads": config["num_key_value_heads"],
            "max_position_embeddings": config["max_position_embeddings"],
            "rms_norm_eps": config["rms_norm_eps"],
        }
    }
    llama = _original_llama(spec, config["vocab_size"]).eval()
    kind = config.get("mm_projector_type", "linear")
    projector = _Projector(kind, config["mm_hidden_size"], config["hidden_size"]).eval()
    state = _load_original_state(model_dir)
    proj_state = {k[len("model.") :]: v for k, v in state.items() if ".mm_projector" in k}
    projector.load_state_dict(proj_state, strict=True)
    llama_state = {
        k: v for k, v in state.items() if ".mm_projector" not in k and "rotary_emb" not in k
    }
    llama.load_state_dict(llama_state, strict=True)

    image = images["a"]
    if config.get("image_aspect_ratio", "square") == "pad":
        image = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    input_ids = tokenizer_image_token(ORIGINAL_PROMPT, tokenizer, ORIGINAL_IMAGE_TOKEN_INDEX)

    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        hidden = vision(pixel_values, output_hidden_states=True).hidden_states
        selected = hidden[config["mm_vision_select_layer"]]
        if config.get("mm_vision_select_feature", "patch") == "patch":
            selected = selected[:, 1:]
        features = projector(selected)  # [1, N, H]

        embed = llama.get_input_embeddings()
        split = input_ids.index(ORIGINAL_IMAGE_TOKEN_INDEX)
        before = embed(torch.tensor([input_ids[:split]]))
        after = embed(torch.tensor([input_ids[split + 1 :]]))
        embeds = torch.cat([before, features, after], dim=1)
        logits = llama(inputs_embeds=embeds).logits
        tokens, margins = [], []
        step_logits = logits[0, -1]
        for _ in range(NUM_GREEDY):  # a full forward each step: slow, obviously right
            top2 = step_logits.topk(2).values
            margins.append(float(top2[0] - top2[1]))
            token = int(step_logits.argmax())
            tokens.append(token)
            embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
            step_logits = llama(inputs_embeds=embeds).logits[0, -1]

    out["pixel_values"] = _np(pixel_values)
    out["input_ids"] = np.array([input_ids], dtype=np.int32)
    out["vision_hidden_states"] = _np(torch.stack(hidden))
    out["image_features"] = _np(features)
    out["logits"] = _np(logits)
    out["greedy_tokens"] = np.array(tokens, dtype=np.int32)
    out["_margins"] = {"greedy_tokens": np.array(margins, dtype=np.float32)}
    return out


def original_oracle_problems(oracle: dict) -> list[str]:
    problems = []
    margin = oracle["_margins"]["greedy_tokens"]
    if margin.min() < MIN_MARGIN:
        problems.append(f"greedy_tokens: top-2 margin {margin.min():.2e} < {MIN_MARGIN}")
    tokens = oracle["greedy_tokens"]
    if (tokens == EOS_TOKEN_ID).any():
        problems.append("greedy_tokens: contains EOS")
    if ((tokens < FIRST_ORDINARY_ID) | (tokens >= TOKENIZER_VOCAB_SIZE)).any():
        problems.append("greedy_tokens: a special id")
    if len(set(tokens.tolist())) < 4:
        problems.append(f"greedy_tokens: degenerate {tokens.tolist()}")
    if len(np.unique(oracle["logits"][0].argmax(-1))) < 4:
        problems.append("logits: argmax hardly varies across positions")
    return problems


# --------------------------------------------------------------------------------------------
# Original releases with their SentencePiece tokenizer


@functools.lru_cache(maxsize=1)
def llama_sentencepiece_model() -> bytes:
    """The fixtures' tokenizer.model: trained on the built-in corpus, as Llama's was."""
    return train_sentencepiece(default_corpus(), SPM_VOCAB_SIZE)


def write_spm_tower(out_dir: str | Path, seed: int = 600) -> Path:
    """``<out_dir>/orig-spm-clip``: a full CLIPModel with CLIP's own tokenizer files beside its
    weights and preprocessor_config.json, as openai/clip-vit-large-patch14-336 on the hub."""
    folder = Path(out_dir) / SPM_TOWER
    corpus = default_corpus()
    spec = {"clip": "full", "vision": dict(SPM_VISION)}
    _write_clip(folder, spec, seed, text_vocab_size=len(clip_bpe(corpus)[0]))
    write_clip_tokenizer(folder, corpus)
    return folder


def witness_ids(
    folder: Path, python: str, prompts: dict[str, str], cases: dict | None = None
) -> dict:
    """transformers 4.31.0's ids for `prompts` and training data for the `cases`
    (witness_tf431.py run by `python`, an environment without this checkout installed: it
    finds `llava_testing.original_tokenization` through PYTHONPATH)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file, cases_file = Path(tmp) / "prompts.json", Path(tmp) / "cases.json"
        prompts_file.write_text(json.dumps(prompts))
        cases_file.write_text(json.dumps(cases or {}))
        run = subprocess.run(
            [python, str(WITNESS_SCRIPT), str(folder), str(prompts_file), str(cases_file)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
    return json.loads(run.stdout)


def _training_entry(template: str, record: dict, result: dict) -> dict:
    """One training case as recorded: the targets before the original's length check only
    where that check threw them away."""
    before = result["labels_before_check"] if result["mismatch"] else None
    return {"template": template, "record": record, **result, "labels_before_check": before}


def spm_oracle(
    folder: Path, prompts: dict[str, str], witness_python: str | None, cases: dict | None = None
) -> dict:
    """The original ids of `prompts` with the folder's tokenizer, the original training data of
    the `cases`, and the 4.31 witness of both."""
    import sentencepiece

    ids = original_ids(folder, prompts)
    training = original_training_cases(folder, cases) if cases else {}
    witness = None
    if witness_python:
        witness = witness_ids(folder, witness_python, prompts, cases)
        if witness["ids"] != ids:
            bad = [k for k in ids if witness["ids"][k] != ids[k]]
            raise RuntimeError(f"{folder.name}: transformers 4.31 disagrees on {bad}")
        if witness["training"] != training:
            bad = [k for k in training if witness["training"][k] != training[k]]
            raise RuntimeError(f"{folder.name}: transformers 4.31 disagrees on training {bad}")
        witness = {**witness["versions"], "agrees": True}
    else:
        print(f"{folder.name}: no transformers 4.31 witness (--tf431-python): recorded as null")
    oracle = {
        "image_token_index": ORIGINAL_IMAGE_TOKEN_INDEX,
        "ids_from": "original_tokenization.py: tokenizer_image_token over transformers 4.31's "
        "slow LlamaTokenizer, transcribed, on sentencepiece " + sentencepiece.__version__,
        "transformers_4_31_witness": witness,
        "prompts": prompts,
        "input_ids": ids,
    }
    if cases:
        oracle["training_from"] = (
            "original_tokenization.py: the LLaVA-1.5 release's preprocess_multimodal + "
            "preprocess_v1 / preprocess_plain, transcribed, over the same tokenizer; labels "
            f"{IGNORE_INDEX} are not trained; labels_before_check: the targets that the "
            "length check ('tokenization mismatch') replaced by IGNORE"
        )
        oracle["training"] = {
            name: _training_entry(*cases[name], result) for name, result in training.items()
        }
    return oracle


def make_spm_originals(out_dir: str | Path, witness_python: str | None) -> None:
    """The orig-spm-* checkpoints with their oracle.json (the original ids of every prompt, the
    original training ids and targets of every training case), their shared tower, and
    orig-spm-strings (tokenizer files only: plain-string special tokens and an added token)."""
    out_dir = Path(out_dir)
    write_spm_tower(out_dir)
    for name, spec in ORIG_SPM_SPECS.items():
        model_dir = build_original(out_dir / name, spec)
        info = {"checkpoint": name, "release": spec["release"], "seed": spec["seed"]}
        info.update(clip_dir=SPM_TOWER, eos_token_id=EOS_TOKEN_ID)
        oracle = spm_oracle(model_dir, PROMPTS, witness_python, TRAINING_CASES)
        _write_json(model_dir / "oracle.json", {**info, **oracle})
    folder = out_dir / "orig-spm-strings"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_llava_tokenizer(folder, "strings", llama_sentencepiece_model())
    oracle = spm_oracle(folder, STRINGS_PROMPTS, witness_python)
    _write_json(folder / "oracle.json", {"checkpoint": folder.name, **oracle})


# --------------------------------------------------------------------------------------------
# LLaVA-NeXT (1.6) checkpoints
#
# Tiles of 28 px (patch 7: 4 x 4 patches per tile) on the pinpoints of the llava-v1.6 releases
# scaled from 336 to 28 px, so that a picture costs 2-5 tower passes of the tiny tower. The four
# pictures are wide, tall, a large square and one smaller than a tile (upscaled, and unpadded by
# an odd number of columns); the oracle is transformers' LlavaNextForConditionalGeneration and
# LlavaNextProcessor (PIL backend).

NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
NEXT_IMAGE_SIZES = {"wide": (80, 30), "tall": (30, 80), "square": (90, 90), "small": (20, 15)}
NEXT_IMAGE_SEEDS = {"wide": 11, "tall": 12, "square": 13, "small": 14}
NEXT_QUESTION = "<image>\nWhat is in the picture?"
NEXT_FOUR_QUESTION = "<image>\n" * 4 + "Compare the four pictures."
NEXT_BATCH_QUESTIONS = [  # one per picture, in NEXT_IMAGE_SIZES order: different lengths
    "<image>\nWhat is in the picture?",
    "<image>\nDescribe this image in detail.",
    "<image>\nWhat colour is the big cat?",
    "<image>\nHow many dogs are there? Tell me a story.",
]
# The generation prompts of the releases' conversation templates (vicuna_v1, mistral_instruct,
# chatml_direct), as the original conversation.py renders one user turn.
NEXT_TEMPLATES = {
    "vicuna": ORIGINAL_SYSTEM + " USER: {q} ASSISTANT:",
    "mistral": "[INST] {q} [/INST]",
    "yi": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n{q}<|im_end|>"
    "<|im_start|>assistant\n",
}
# Chat templates shaped like the llava-hf releases' (the converter only looks for ChatML in them).
NEXT_CHAT_TEMPLATES = {
    "vicuna": LLAVA_HF_CHAT_TEMPLATE,
    "mistral": (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\n' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] }}{% endfor %}{{ ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'][0]['text'] + '</s> ' }}{% endif %}{% endfor %}"
    ),
    "yi": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\n' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] }}{% endfor %}{{ '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
# The three decoders of the releases in miniature: Vicuna (Llama), Mistral (grouped-query
# attention, rope theta 1e6, no sliding window), Yi-34B (Llama shapes with GQA, rope theta 5e6).
NEXT_TEXT = dict(TEXT, max_position_embeddings=1024)  # four pictures take ~260 tokens
NEXT_DECODERS = {
    "vicuna": dict(
        model_type="llama", name="lmsys/vicuna-7b-v1.5", text=dict(NEXT_TEXT), rope=None
    ),
    "mistral": dict(
        model_type="mistral",
        name="mistralai/Mistral-7B-Instruct-v0.2",
        text=dict(NEXT_TEXT, num_key_value_heads=2, sliding_window=None),
        rope=1e6,
    ),
    "yi": dict(
        model_type="llama",
        name="NousResearch/Nous-Hermes-2-Yi-34B",
        text=dict(NEXT_TEXT, num_key_value_heads=2),
        rope=5e6,
    ),
}
NEXT_SPECS: dict[str, dict] = {
    # llava-v1.6-vicuna-7b-hf's layout and sparse config: image_newline at the top level.
    "next-hub": dict(seed=601, layout="hub", decoder="vicuna", dtype_key="torch_dtype"),
    # llava-v1.6-mistral-7b-hf as transformers 5 save_pretrained writes it.
    "next-v5": dict(seed=701, layout="v5", decoder="mistral", dtype_key="dtype"),
    # llava-v1.6-34b-hf with transformers 4.52 names: model.image_newline, model.language_model.*
    "next-v452": dict(seed=801, layout="v452", decoder="yi", dtype_key="dtype"),
}
# liuhaotian/llava-v1.6-mistral-7b: LlavaMistralForCausalLM with the (trained) tower inside.
NEXT_ORIG_SPEC = dict(seed=901, decoder="mistral", clip="vision", vision=dict(VISION))
NEXT_LOGITS_STRIDE = 16  # logits of every 16th image position of the four-picture prompt


def write_next_images(out_dir: str | Path) -> dict[str, Path]:
    """Writes ``images/{wide,tall,square,small}.png``; returns their paths by name."""
    return write_images(out_dir, NEXT_IMAGE_SIZES, NEXT_IMAGE_SEEDS)


def load_next_images(out_dir: str | Path) -> dict[str, Image.Image]:
    return load_images(out_dir, NEXT_IMAGE_SIZES, NEXT_IMAGE_SEEDS)


def _next_text_config(decoder: dict, vocab_size: int, pad_id: int) -> dict:
    text = dict(decoder["text"], model_type=decoder["model_type"], vocab_size=vocab_size)
    text["pad_token_id"] = pad_id
    if decoder["rope"] is not None:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(decoder["rope"])}
    return text


def _next_processor_files(decoder: str) -> dict[str, dict]:
    """The processor files of a llava-v1.6-*-hf repo, for the tiny tower (LlavaNextProcessor)."""
    return llava_next_processor_files(
        VISION["image_size"], VISION["patch_size"], NEXT_PINPOINTS, NEXT_CHAT_TEMPLATES[decoder]
    )


def _sparse_next_config(spec: dict, vocab_size: int, image_token_id: int, pad_id: int) -> dict:
    """config.json in the style of the llava-v1.6-*-hf repos: LlavaNextConfig's fields, the text
    config's non-default fields only (see tests/fixtures/llava-v1.6-*-hf.config.json)."""
    decoder = NEXT_DECODERS[spec["decoder"]]
    base = dict(
        spec,
        vision=dict(VISION),
        text=dict(decoder["text"]),
        rope=decoder["rope"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
    )
    config = _sparse_llava_config(base, vocab_size, image_token_id, pad_id)
    config["architectures"] = ["LlavaNextForConditionalGeneration"]
    config["model_type"] = "llava_next"
    config["image_grid_pinpoints"] = NEXT_PINPOINTS
    config["use_image_newline_parameter"] = True
    config["transformers_version"] = "4.52.0" if spec["layout"] == "v452" else "4.39.0.dev0"
    text = config["text_config"]
    text["_name_or_path"] = decoder["name"]
    text["model_type"] = decoder["model_type"]
    text["architectures"] = [
        "MistralForCausalLM" if decoder["model_type"] == "mistral" else "LlamaForCausalLM"
    ]
    text["pad_token_id"] = pad_id
    config["text_config"] = dict(sorted(text.items()))
    return dict(sorted(config.items()))


def build_llava_next(out_dir: str | Path, spec: dict) -> Path:
    """Writes a tiny random llava-hf LLaVA-NeXT checkpoint folder, like a llava-v1.6-*-hf repo.

    Args:
        out_dir: the checkpoint folder to (re)create.
        spec: one of ``NEXT_SPECS`` (``seed``, ``layout`` "hub" / "v452" / "v5", ``decoder``).
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    tokenizer = build_tokenizer(out_dir, vocab_size=TOKENIZER_VOCAB_SIZE, image_token=True)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    pad_id = tokenizer.convert_tokens_to_ids("<pad>")
    vocab_size = pad_vocab_size(len(tokenizer))
    if spec["layout"] == "v5":
        config = LlavaNextConfig(
            vision_config=dict(VISION, model_type="clip_vision_model"),
            text_config=_next_text_config(NEXT_DECODERS[spec["decoder"]], vocab_size, pad_id),
            image_grid_pinpoints=NEXT_PINPOINTS,
            image_token_index=image_token_id,
            tie_word_embeddings=False,
        )
    else:
        _write_json(
            out_dir / "config.json",
            _sparse_next_config(spec, vocab_size, image_token_id, pad_id),
        )
        config = LlavaNextConfig.from_pretrained(out_dir)
    save_random_model(LlavaNextForConditionalGeneration, config, spec, out_dir)
    for name, obj in _next_processor_files(spec["decoder"]).items():
        _write_json(out_dir / name, obj)
    return out_dir


def _next_positions(input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """The recorded positions of a long prompt: from its first image token on, every text
    position and every 16th image one (the later positions see all the pictures before)."""
    is_image = input_ids == image_token_id
    image_rank = np.cumsum(is_image) - 1
    keep = (~is_image | (image_rank % NEXT_LOGITS_STRIDE == 0)) & (image_rank >= 0)
    return np.flatnonzero(keep).astype(np.int32)


def _next_oracle(model, encode, template: str, images: dict, pad_id: int, image_id: int) -> dict:
    """transformers' outputs on the NeXT prompts; ``encode(prompts, pictures)`` -> model inputs.

    Per picture name N: N_pixel_values [tiles, 3, S, S], N_image_sizes [1, 2], N_input_ids,
    N_image_features [tokens, H] (packed, newlines included), N_last_logits [V],
    N_greedy_tokens [24]; four_input_ids, four_positions, four_logits [positions, V],
    four_greedy_tokens [12]; batch_input_ids / batch_attention_mask [4, L] (left padded),
    batch_greedy_tokens [4, 12]; and ``_margins``.
    """
    out: dict[str, np.ndarray] = {}
    margins: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, picture in images.items():
            inputs = encode([template.format(q=NEXT_QUESTION)], [picture])
            out[f"{name}_pixel_values"] = _np(inputs["pixel_values"][0])
            out[f"{name}_image_sizes"] = _np(inputs["image_sizes"], np.int32)
            out[f"{name}_input_ids"] = _np(inputs["input_ids"], np.int32)
            features = model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
            ).pooler_output
            out[f"{name}_image_features"] = _np(features[0])
            out[f"{name}_last_logits"] = _np(model(**inputs).logits[0, -1])
            tokens, margins[f"{name}_greedy_tokens"] = _generate(model, inputs, NUM_GREEDY, pad_id)
            out[f"{name}_greedy_tokens"] = _np(tokens[0], np.int32)

        inputs = encode([template.format(q=NEXT_FOUR_QUESTION)], list(images.values()))
        ids = _np(inputs["input_ids"], np.int32)
        out["four_input_ids"] = ids
        out["four_positions"] = _next_positions(ids[0], image_id)
        out["four_logits"] = _np(model(**inputs).logits[0])[out["four_positions"]]
        tokens, margins["four_greedy_tokens"] = _generate(model, inputs, NUM_BATCH_GREEDY, pad_id)
        out["four_greedy_tokens"] = _np(tokens[0], np.int32)

        prompts = [template.format(q=q) for q in NEXT_BATCH_QUESTIONS]
        inputs = encode(prompts, list(images.values()))
        out["batch_input_ids"] = _np(inputs["input_ids"], np.int32)
        out["batch_attention_mask"] = _np(inputs["attention_mask"], np.int32)
        tokens, margins["batch_greedy_tokens"] = _generate(model, inputs, NUM_BATCH_GREEDY, pad_id)
        out["batch_greedy_tokens"] = _np(tokens, np.int32)
    out["_margins"] = margins
    return out


def next_oracle_outputs(
    model_dir: str | Path, decoder: str, images_dir: str | Path | None = None
) -> dict:
    """Runs transformers' LlavaNextForConditionalGeneration and LlavaNextProcessor on a folder
    written by :func:`build_llava_next` with this decoder (a ``NEXT_DECODERS`` key; its
    prompt template is used); see :func:`_next_oracle` for the arrays."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model_dir = Path(model_dir)
    images = load_next_images(images_dir if images_dir is not None else model_dir.parent)
    model = LlavaNextForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    assert type(processor.image_processor).__name__ == "LlavaNextImageProcessorPil"

    def encode(prompts, pictures):
        return processor(
            images=pictures, text=prompts, padding=True, padding_side="left", return_tensors="pt"
        )

    image_id = model.config.image_token_index
    pad_id = processor.tokenizer.pad_token_id
    return _next_oracle(model, encode, NEXT_TEMPLATES[decoder], images, pad_id, image_id)


def next_oracle_problems(oracle: dict, strict: bool = True) -> list[str]:
    """Why a NeXT oracle would make a poor fixture (as `oracle_problems`); not `strict`, only
    what would make greedy decoding ambiguous (near ties, EOS)."""
    problems = []
    for name, margin in oracle["_margins"].items():
        if np.isnan(margin).any():
            problems.append(f"{name}: a logits processor changed the greedy choice")
        elif margin.min() < MIN_MARGIN:
            problems.append(f"{name}: top-2 margin {margin.min():.2e} < {MIN_MARGIN}")
        tokens = oracle[name]
        if (tokens == EOS_TOKEN_ID).any():
            problems.append(f"{name}: contains EOS")
        if not strict:
            continue
        if ((tokens < FIRST_ORDINARY_ID) | (tokens >= TOKENIZER_VOCAB_SIZE)).any():
            problems.append(f"{name}: a special, added or padding-row id")
        for row in tokens.reshape(-1, tokens.shape[-1]):
            if len(set(row.tolist())) < 4:
                problems.append(f"{name}: degenerate {row.tolist()}")
    return problems


def _next_info(name: str, spec: dict, seed: int, oracle: dict) -> dict:
    import transformers

    decoder = NEXT_DECODERS[spec["decoder"]]
    return {
        "checkpoint": name,
        "layout": spec.get("layout", "original"),
        "decoder": spec["decoder"],
        "decoder_name": decoder["name"],
        "seed": seed,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "image_processor_class": "LlavaNextImageProcessorPil",
        "eos_token_id": EOS_TOKEN_ID,
        "pictures": list(NEXT_IMAGE_SIZES),
        "image_tokens": {n: int(oracle[f"{n}_image_features"].shape[0]) for n in NEXT_IMAGE_SIZES},
        "template": NEXT_TEMPLATES[spec["decoder"]],
        "question": NEXT_QUESTION,
        "four_question": NEXT_FOUR_QUESTION,
        "batch_questions": NEXT_BATCH_QUESTIONS,
        "batch_padding_side": "left",
        "generation": {
            "do_sample": False,
            "min_new_tokens": "= max_new_tokens",
            "greedy_tokens": NUM_GREEDY,
            "batch_greedy_tokens": NUM_BATCH_GREEDY,
        },
    }


# Only next-hub keeps the pictures' pixel values: the preprocessing of the others is the same
# (same preprocessor settings, checked when the fixtures are made).
NEXT_SHARED_KEYS = tuple(f"{n}_pixel_values" for n in NEXT_IMAGE_SIZES)


def make_next(out_dir: Path, name: str, spec: dict, verbose: bool = True) -> int:
    """Builds one llava-hf NeXT checkpoint, searching seeds for a good oracle; returns the seed."""
    for attempt in range(MAX_SEED_TRIES):
        seed = spec["seed"] + attempt
        model_dir = build_llava_next(out_dir / name, dict(spec, seed=seed))
        oracle = next_oracle_outputs(model_dir, spec["decoder"], out_dir)
        problems = next_oracle_problems(oracle)
        if not problems:
            info = _next_info(name, spec, seed, oracle)
            if name != "next-hub":
                _drop_shared_pixels(oracle, out_dir / "next-hub", info)
            save_oracle(model_dir, oracle, info)
            return seed
        if verbose:
            print(f"{name}: seed {seed} rejected: {'; '.join(problems)}")
    raise RuntimeError(f"{name}: no seed in {MAX_SEED_TRIES} tries gave a usable oracle")


def _drop_shared_pixels(oracle: dict, hub_dir: Path, info: dict) -> None:
    hub = np.load(hub_dir / "oracle.npz")
    for key in NEXT_SHARED_KEYS:
        np.testing.assert_array_equal(oracle.pop(key), hub[key], err_msg=key)
    info["pixel_values_of"] = hub_dir.name


# --------------------------------------------------------------------------------------------
# An original LLaVA-1.6 release (haotian-liu/LLaVA, LlavaMistralForCausalLM)

# transformers' convert_llava_next_weights_to_hf.py (huggingface/transformers, commit 9426c8c):
# the original names -> llava-hf's, each replacement applied in turn, verbatim.
HF_NEXT_KEYS_TO_MODIFY_MAPPING = {
    "model.vision_tower.": "",
    "model.mm_projector": "multi_modal_projector",
    "model": "model.model",
    "vision_model.model": "vision_model",
    "lm_head": "language_model.lm_head",
    "model.model": "language_model.model",
    "multi_modal_projector.0": "multi_modal_projector.linear_1",
    "multi_modal_projector.2": "multi_modal_projector.linear_2",
    "language_model.model.image_newline": "image_newline",
}


def hf_next_key(key: str) -> str:
    """convert_state_dict_to_hf's renaming of one original key (transcribed)."""
    for key_to_modify, new_key in HF_NEXT_KEYS_TO_MODIFY_MAPPING.items():
        if key_to_modify in key:
            key = key.replace(key_to_modify, new_key)
    return key


def _original_next_config(spec: dict, vocab_size: int) -> dict:
    """config.json of liuhaotian/llava-v1.6-mistral-7b in miniature: Mistral's fields at the
    top level, the mm_* fields, anyres with spatial_unpad, the tower trained."""
    decoder = NEXT_DECODERS[spec["decoder"]]
    config = _original_config(dict(spec, projector="mlp2x_gelu", image_aspect_ratio="anyres",
                                   mm_vision_tower="openai/clip-vit-large-patch14-336",
                                   text=decoder["text"]), vocab_size)  # fmt: skip
    config.update(
        _name_or_path="./checkpoints/llava-v1.6-mistral-7b",
        architectures=["LlavaMistralForCausalLM"],
        model_type="llava_mistral",
        image_grid_pinpoints=NEXT_PINPOINTS,
        mm_patch_merge_type="spatial_unpad",
        mm_vision_tower_lr=2e-6,
        rope_theta=float(decoder["rope"]),
        sliding_window=None,
        tokenizer_model_max_length=NEXT_TEXT["max_position_embeddings"],
        unfreeze_mm_vision_tower=True,
        use_mm_proj=True,
    )
    return dict(sorted(config.items()))


def build_original_next(out_dir: str | Path, spec: dict, seed: int | None = None) -> Path:
    """Writes a tiny original LLaVA-1.6 checkpoint: two safetensors shards with an index, the
    vision tower inside (``model.vision_tower.vision_tower.vision_model.*``),
    ``model.image_newline``; and in ``<out_dir>-clip`` the CLIP named by ``mm_vision_tower``, with
    other weights: only its config and preprocessor settings count."""
    from transformers import CLIPVisionModel, MistralConfig, MistralForCausalLM

    out_dir = Path(out_dir)
    clip_dir = out_dir.with_name(out_dir.name + "-clip")
    seed = spec["seed"] if seed is None else seed
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    tokenizer = build_tokenizer(out_dir, vocab_size=TOKENIZER_VOCAB_SIZE, image_token=False)
    vocab_size = len(tokenizer)
    _write_json(out_dir / "config.json", _original_next_config(spec, vocab_size))
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 4096},
    )
    _write_clip(clip_dir, spec, seed + 1)

    decoder = NEXT_DECODERS[spec["decoder"]]
    torch.manual_seed(seed)
    text = dict(decoder["text"])
    rope = {"rope_type": "default", "rope_theta": float(decoder["rope"])}
    llm_config = MistralConfig(
        **text, vocab_size=vocab_size, rope_parameters=rope, tie_word_embeddings=False
    )
    llm = MistralForCausalLM(llm_config).eval()
    randomize_(llm, seed)
    projector = _Projector("mlp2x_gelu", spec["vision"]["hidden_size"], text["hidden_size"])
    randomize_(projector, seed + 2)
    tower = CLIPVisionModel(_clip_vision_config(dict(spec["vision"], hidden_act="quick_gelu")))
    randomize_(tower, seed + 3)
    state = dict(llm.state_dict())
    state.update({"model." + k: v for k, v in projector.state_dict().items()})
    state.update(  # the original's CLIPVisionTower wraps a CLIPVisionModel (`vision_model.*`)
        {
            "model.vision_tower.vision_tower.vision_model." + k: v
            for k, v in tower.state_dict().items()
            if not k.endswith("position_ids")
        }
    )
    gen = torch.Generator().manual_seed(seed + 4)
    state["model.image_newline"] = 0.2 * torch.randn(text["hidden_size"], generator=gen)
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    keys = sorted(state, key=_original_key_order)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        _save_safetensors({k: state[k] for k in part}, out_dir / name)
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    _write_json(
        out_dir / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )
    return out_dir


def original_next_oracle_outputs(model_dir: str | Path, images_dir: str | Path | None = None):
    """transformers' LlavaNextForConditionalGeneration on an original LLaVA-1.6 folder, converted
    the way transformers' convert_llava_next_weights_to_hf.py does it.

    The weights are renamed with its mapping; the config is LlavaNextConfig with the text config
    from the original's fields, the vision config of its CLIP, the original's pinpoints (the
    script takes LlavaNextImageProcessor's default, the releases' value) and the vocabulary
    grown by <image> and <pad> to a multiple of 64 (the new rows zero here; the script samples
    them: their logits are not compared). The ids are the original `tokenizer_image_token`'s
    with each image placeholder expanded to the picture's feature count (``<image>`` = the
    first new row); ``N_input_ids`` keep the original -200.
    """
    from safetensors.torch import load_file
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        PreTrainedTokenizerFast,
    )

    model_dir = Path(model_dir)
    clip_dir = model_dir.with_name(model_dir.name + "-clip")
    images = load_next_images(images_dir if images_dir is not None else model_dir.parent)
    original = json.loads((model_dir / "config.json").read_text())
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(model_dir / shard)))
    state = {hf_next_key(k): v for k, v in state.items() if not k.endswith(".inv_freq")}
    vocab_size = original["vocab_size"]
    image_id, padded = vocab_size, pad_vocab_size(vocab_size + 2)
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        state[key] = torch.cat([state[key], torch.zeros(padded - vocab_size, state[key].shape[1])])

    decoder = NEXT_DECODERS["mistral"]  # llava_mistral
    text = dict(decoder["text"], model_type="mistral", vocab_size=padded)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": original["rope_theta"]}
    text["rms_norm_eps"] = original["rms_norm_eps"]
    clip = json.loads((clip_dir / "config.json").read_text())
    vision = clip.get("vision_config", clip) if clip.get("model_type") == "clip" else clip
    vision = {k: vision[k] for k in VISION}
    config = LlavaNextConfig(
        vision_config=dict(vision, model_type="clip_vision_model", hidden_act="quick_gelu"),
        text_config=text,
        image_grid_pinpoints=original["image_grid_pinpoints"],
        image_token_index=image_id,
        tie_word_embeddings=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        _save_safetensors(state, Path(tmp) / "model.safetensors")
        config.save_pretrained(tmp)
        model = LlavaNextForConditionalGeneration.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    preprocessor = json.loads((clip_dir / "preprocessor_config.json").read_text())
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": preprocessor["size"]},
        crop_size={"height": preprocessor["crop_size"], "width": preprocessor["crop_size"]},
        image_grid_pinpoints=original["image_grid_pinpoints"],
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)

    def encode(prompts, pictures):
        pixels = image_processor(pictures, return_tensors="pt")
        with torch.no_grad():
            features = model.get_image_features(**pixels).pooler_output
        ids, picture = [], 0
        for prompt in prompts:
            row = []
            for t in tokenizer_image_token(prompt, tokenizer, ORIGINAL_IMAGE_TOKEN_INDEX):
                if t == ORIGINAL_IMAGE_TOKEN_INDEX:
                    row += [image_id] * features[picture].shape[0]
                    picture += 1
                else:
                    row.append(t)
            ids.append(row)
        width = max(len(r) for r in ids)
        input_ids = torch.tensor([[0] * (width - len(r)) + r for r in ids])  # <unk> pads
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "pixel_values": pixels["pixel_values"],
            "image_sizes": pixels["image_sizes"],
        }

    out = _next_oracle(model, encode, NEXT_TEMPLATES["mistral"], images, 0, image_id)
    for name in images:  # as the original tokenizes it: one -200 per picture
        prompt = NEXT_TEMPLATES["mistral"].format(q=NEXT_QUESTION)
        ids = tokenizer_image_token(prompt, tokenizer, ORIGINAL_IMAGE_TOKEN_INDEX)
        out[f"{name}_input_ids"] = np.array([ids], dtype=np.int32)
    return out


def make_original_next(out_dir: Path, name: str, spec: dict, verbose: bool = True) -> int:
    """Builds the original LLaVA-1.6 checkpoint (+ its CLIP folder) and its oracle."""
    for attempt in range(MAX_SEED_TRIES):
        seed = spec["seed"] + attempt
        model_dir = build_original_next(out_dir / name, spec, seed=seed)
        oracle = original_next_oracle_outputs(model_dir, out_dir)
        problems = next_oracle_problems(oracle)
        if not problems:
            info = dict(
                _next_info(name, spec, seed, oracle),
                clip_dir=name + "-clip",
                image_token_index=ORIGINAL_IMAGE_TOKEN_INDEX,
                oracle_image_token_id=TOKENIZER_VOCAB_SIZE,
                oracle_vocab_size=int(oracle["wide_last_logits"].shape[-1]),
            )
            _drop_shared_pixels(oracle, out_dir / "next-hub", info)
            save_oracle(model_dir, oracle, info)
            return seed
        if verbose:
            print(f"{name}: seed {seed} rejected: {'; '.join(problems)}")
    raise RuntimeError(f"{name}: no seed in {MAX_SEED_TRIES} tries gave a usable oracle")


# --------------------------------------------------------------------------------------------
# Main


def _hf_info(name: str, spec: dict, seed: int, model_dir: Path) -> dict:
    import transformers
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    tok = processor.tokenizer
    return {
        "checkpoint": name,
        "layout": spec["layout"],
        "seed": seed,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "image_processor_class": type(processor.image_processor).__name__,
        "image_token_id": tok.convert_tokens_to_ids("<image>"),
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": EOS_TOKEN_ID,
        # The batch's images are a and b, i.e. its pixels are two_pixel_values.
        "images": {"pixel_values": ["a"], "two_pixel_values": ["a", "b"], "batch": ["a", "b"]},
        "prompt": PROMPT,
        "text_prompt": TEXT_PROMPT,
        "two_prompt": TWO_PROMPT,
        "batch_prompts": BATCH_PROMPTS,
        "batch_padding_side": "left",
        "generation": {
            "do_sample": False,
            "min_new_tokens": "= max_new_tokens",
            "greedy_tokens": NUM_GREEDY,
            "batch_greedy_tokens": NUM_BATCH_GREEDY,
        },
    }


def make_hf(out_dir: Path, name: str, spec: dict, verbose: bool = True) -> int:
    """Builds one llava-hf checkpoint, searching seeds for a good oracle; returns the seed."""
    for attempt in range(MAX_SEED_TRIES):
        seed = spec["seed"] + attempt
        model_dir = build_llava_hf(out_dir / name, dict(spec, seed=seed))
        oracle = oracle_outputs(model_dir, out_dir)
        problems = oracle_problems(oracle)
        if not problems:
            save_oracle(model_dir, oracle, _hf_info(name, spec, seed, model_dir))
            return seed
        if verbose:
            print(f"{name}: seed {seed} rejected: {'; '.join(problems)}")
    raise RuntimeError(f"{name}: no seed in {MAX_SEED_TRIES} tries gave a usable oracle")


def make_original(out_dir: Path, name: str, spec: dict, verbose: bool = True) -> int:
    """Builds one haotian-liu checkpoint (+ its CLIP folder) and its oracle; returns the seed."""
    for attempt in range(MAX_SEED_TRIES):
        seed = spec["seed"] + attempt
        model_dir = build_original(out_dir / name, spec, seed=seed)
        oracle = original_oracle_outputs(model_dir, out_dir)
        problems = original_oracle_problems(oracle)
        if not problems:
            import transformers

            info = {
                "checkpoint": name,
                "seed": seed,
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
                "clip_dir": name + "-clip",
                "image": "a",
                "image_aspect_ratio": spec["image_aspect_ratio"] or "square",
                "prompt": ORIGINAL_PROMPT,
                "image_token_index": ORIGINAL_IMAGE_TOKEN_INDEX,
                "eos_token_id": EOS_TOKEN_ID,
                "greedy": "argmax of a full forward each step, nothing suppressed",
            }
            save_oracle(model_dir, oracle, info)
            return seed
        if verbose:
            print(f"{name}: seed {seed} rejected: {'; '.join(problems)}")
    raise RuntimeError(f"{name}: no seed in {MAX_SEED_TRIES} tries gave a usable oracle")


def make_all(out_dir: str | Path, verbose: bool = True, witness_python: str | None = None) -> None:
    """Writes every fixture under ``out_dir`` (see the module docstring)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_images(out_dir)
    seeds = {}
    for name in ("hf-hub", "hf-v5", "hf-gqa"):
        seeds[name] = make_hf(out_dir, name, HF_SPECS[name], verbose)
    # hf-v452 holds hf-hub's weights: same spec and the seed hf-hub ended up with.
    spec = dict(HF_SPECS["hf-v452"], seed=seeds["hf-hub"])
    model_dir = build_llava_hf(out_dir / "hf-v452", spec)
    oracle = oracle_outputs(model_dir, out_dir)
    hub = np.load(out_dir / "hf-hub" / "oracle.npz")
    for key, value in hub.items():  # transformers loads both layouts to the same model
        np.testing.assert_array_equal(oracle[key], value, err_msg=f"hf-v452 vs hf-hub: {key}")
    # Only a subset is kept (the data folder must stay small): the rest is hf-hub's.
    oracle = {k: oracle[k] for k in V452_ORACLE_KEYS}
    info = dict(_hf_info("hf-v452", spec, spec["seed"], model_dir), same_weights_as="hf-hub")
    save_oracle(model_dir, oracle, info)
    for name, spec in ORIG_SPECS.items():
        seeds[name] = make_original(out_dir, name, spec, verbose)
    make_spm_originals(out_dir, witness_python)
    make_all_next(out_dir, verbose)


def make_all_next(out_dir: str | Path, verbose: bool = True) -> None:
    """Writes the LLaVA-NeXT fixtures under ``out_dir`` (next-hub first: the others' pixels are
    its)."""
    out_dir = Path(out_dir)
    write_next_images(out_dir)
    for name, spec in NEXT_SPECS.items():
        make_next(out_dir, name, spec, verbose)
    make_original_next(out_dir, "next-orig", NEXT_ORIG_SPEC, verbose)


def folder_sizes(out_dir: str | Path) -> dict[str, int]:
    """Bytes under each top-level entry of ``out_dir``."""
    out_dir = Path(out_dir)
    sizes = {}
    for entry in sorted(out_dir.iterdir()):
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        sizes[entry.name] = sum(p.stat().st_size for p in files)
    return sizes
