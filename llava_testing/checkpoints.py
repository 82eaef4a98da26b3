"""Random llava-hf checkpoints written without torch, for tests and benchmarks.

`write_llava_hf` writes a folder that looks like a llava-hf hub repo (llava-hf/llava-1.5-7b-hf;
with `image_grid_pinpoints`, llava-hf/llava-v1.6-*-hf):
`config.json` from transformers' `LlavaConfig` (a config class: no torch needed), safetensors
shards with the hub's key names (`language_model.model.*`, `language_model.lm_head.weight`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`) in PyTorch's layout, a small Llama-like
tokenizer (`llava_testing.tokenizer_builder`), `preprocessor_config.json`,
`processor_config.json` and `chat_template.json`. transformers' `LlavaForConditionalGeneration`
loads it as it is (tests/test_train_oracle.py does).

Names and shapes come from our model built lazily (no memory); each tensor is drawn with MLX
from a key made of the seed and the tensor's name, so a checkpoint is the same on every machine
and a 7B one is written shard by shard, never held whole (see `RandomInit` for the values).
Such checkpoints are for behaviour tests (batches, chat, quantization) and timing only: expected
values of parity tests come from transformers (tests/fixtures/make_fixtures.py).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_llava.config import ModelConfig, TextConfig, VisionConfig
from mlx_llava.conversation import LLAVA_HF_CHAT_TEMPLATE
from mlx_llava.convert import DTYPES
from mlx_llava.image_processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from mlx_llava.processor import IMAGE_PLACEHOLDER

from .tokenizer_builder import build_tokenizer, pad_vocab_size

MAX_SHARD_BYTES = 2 << 30
PATCH_EMBEDDING = "vision_tower.embeddings.patch_embedding.weight"


@dataclass(frozen=True)
class RandomInit:
    """How the tensors are drawn.

    Matrices (and embeddings) ~ N(0, 1/fan_in), so that the outputs depend on the picture and
    the prompt (a 0.02-init random model's hardly do), times `block_scale` inside the
    transformer blocks: each layer nudges the residual stream, as in trained models, instead of
    replacing it. Norm weights 1 + `norm_noise` N(0, 1), biases `bias_std` N(0, 1). The lm_head
    rows of `silent_tokens` are zero (e.g. `</s>`, so that greedy decoding never stops early).
    """

    block_scale: float = 0.3
    norm_noise: float = 0.1
    bias_std: float = 0.1
    silent_tokens: tuple[int, ...] = ()


def llava_hf_processor_files(
    image_size: int, patch_size: int, select_strategy: str = "default"
) -> dict[str, dict]:
    """The processor files of a llava-hf checkpoint (file name -> JSON content), as
    `LlavaProcessor.save_pretrained` writes them for a CLIP tower of this size; for writing test
    and benchmark checkpoints."""
    return {
        "preprocessor_config.json": {
            "crop_size": {"height": image_size, "width": image_size},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": OPENAI_CLIP_MEAN,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": OPENAI_CLIP_STD,
            "processor_class": "LlavaProcessor",
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": image_size},
        },
        "processor_config.json": {
            "image_token": IMAGE_PLACEHOLDER,
            "num_additional_image_tokens": 1,
            "patch_size": patch_size,
            "processor_class": "LlavaProcessor",
            "vision_feature_select_strategy": select_strategy,
        },
        "chat_template.json": {"chat_template": LLAVA_HF_CHAT_TEMPLATE},
    }


def llava_next_processor_files(
    image_size: int,
    patch_size: int,
    pinpoints: list[list[int]],
    chat_template: str = LLAVA_HF_CHAT_TEMPLATE,
) -> dict[str, dict]:
    """The processor files of a llava-v1.6-*-hf checkpoint (LlavaNextProcessor, its
    LlavaNextImageProcessor tiling along `pinpoints`) for a CLIP tower of this size."""
    files = llava_hf_processor_files(image_size, patch_size)
    preprocessor = dict(
        files["preprocessor_config.json"],
        aspect_ratio_setting="anyres",
        do_pad=True,
        image_grid_pinpoints=pinpoints,
        image_processor_type="LlavaNextImageProcessor",
        processor_class="LlavaNextProcessor",
    )
    return {
        "preprocessor_config.json": dict(sorted(preprocessor.items())),
        "processor_config.json": dict(
            files["processor_config.json"], processor_class="LlavaNextProcessor"
        ),
        "chat_template.json": {"chat_template": chat_template},
    }


def llava_config(
    vision: dict, text: dict, image_token_id: int, pad_id: int, dtype: str = "float32", **fields
):
    """transformers' `LlavaConfig` for these tower sizes (`vision` and `text` hold
    `CLIPVisionConfig` and `LlamaConfig` fields); `fields` are other `LlavaConfig` fields
    (default: feature layer -2, strategy "default", GELU projector, untied embeddings). With
    `image_grid_pinpoints` among them, a `LlavaNextConfig` (LLaVA-NeXT)."""
    from transformers import LlavaConfig, LlavaNextConfig

    fields = {
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
        **fields,
    }
    vision = dict(vision, model_type="clip_vision_model")
    text = dict(text, model_type="llama", pad_token_id=pad_id)
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    full = fields["vision_feature_select_strategy"] == "full"
    config = (LlavaNextConfig if "image_grid_pinpoints" in fields else LlavaConfig)(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=patches + full,
        pad_token_id=pad_id,
        **fields,
    )
    config.dtype = dtype
    return config


def hub_name(name: str) -> str:
    """Our parameter name -> the llava-hf hub's (only the vision tower differs)."""
    if name.startswith("vision_tower."):
        return "vision_tower.vision_model." + name[len("vision_tower.") :]
    return name


def tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """(hub name, PyTorch-layout shape) of every tensor of a `LlavaConfig`'s model, read off our
    model built lazily (no memory, and no torch needed)."""
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


def random_tensor(
    name: str, shape: tuple[int, ...], dtype: mx.Dtype, key: mx.array, init: RandomInit
) -> mx.array:
    """One tensor drawn as `init` says (see `RandomInit`)."""
    if len(shape) == 1 and name.endswith("bias"):
        return (init.bias_std * mx.random.normal(shape, key=key)).astype(dtype)
    if len(shape) == 1 and ("norm" in name or "layrnorm" in name):
        if not init.norm_noise:
            return mx.ones(shape, dtype=dtype)
        return (1.0 + init.norm_noise * mx.random.normal(shape, key=key)).astype(dtype)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    scale = fan_in**-0.5 * (init.block_scale if ".layers." in name else 1.0)
    value = mx.random.normal(shape, dtype=dtype, key=key, scale=scale)
    if name == "language_model.lm_head.weight":
        for token in init.silent_tokens:
            value[token] = 0
    return value


def _plan_shards(
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
    out: Path,
    shapes: list[tuple[str, tuple[int, ...]]],
    dtype: mx.Dtype,
    seed: int,
    init: RandomInit = RandomInit(),
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> int:
    """Draw and write the tensors shard by shard, with the index; returns the bytes written."""
    shards = _plan_shards(shapes, dtype.size, max_shard_bytes)
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            key = mx.random.key((seed << 32) + zlib.crc32(name.encode()))
            tensors[name] = random_tensor(name, shape, dtype, key, init)
            weight_map[name] = file
            total += tensors[name].nbytes
        mx.eval(tensors)
        mx.save_safetensors(str(out / file), tensors, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def write_processor_files(
    out: Path, vision: dict, select_strategy: str = "default", pinpoints=None
) -> None:
    """preprocessor_config.json, processor_config.json and chat_template.json, as llava-hf's
    (LlavaNextProcessor's with `pinpoints`)."""
    if pinpoints:
        files = llava_next_processor_files(vision["image_size"], vision["patch_size"], pinpoints)
    else:
        files = llava_hf_processor_files(
            vision["image_size"], vision["patch_size"], select_strategy
        )
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")


def write_llava_hf(
    out: str | Path,
    vision: dict,
    text: dict,
    seed: int = 0,
    dtype: str = "float32",
    init: RandomInit = RandomInit(),
    max_shard_bytes: int = MAX_SHARD_BYTES,
    **fields,
) -> Path:
    """Write a random llava-hf checkpoint into `out`.

    Args:
        out: the folder (created if absent; files of the same names are replaced).
        vision: `CLIPVisionConfig` fields (sizes at least: hidden_size, intermediate_size,
            num_hidden_layers, num_attention_heads, image_size, patch_size).
        text: `LlamaConfig` fields; `vocab_size` defaults to the tokenizer's size padded to 64.
        seed: seed of the draws.
        dtype: "float32", "float16" or "bfloat16".
        init: how the values are drawn.
        max_shard_bytes: the largest safetensors shard.
        fields: other `LlavaConfig` fields (see `llava_config`); `image_grid_pinpoints` makes it
            a LLaVA-NeXT checkpoint.

    Returns:
        `out`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    pad_id = tokenizer.convert_tokens_to_ids("<pad>")
    text = {"vocab_size": pad_vocab_size(len(tokenizer)), **text}
    config = llava_config(vision, text, image_token_id, pad_id, dtype, **fields)
    config.save_pretrained(out)
    write_weights(out, tensor_shapes(config), DTYPES[dtype], seed, init, max_shard_bytes)
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    write_processor_files(out, vision, config.vision_feature_select_strategy, pinpoints)
    return out


def tiny_llava_hf(
    out: str | Path, seed: int = 0, init: RandomInit = RandomInit(block_scale=1.0), **fields
) -> Path:
    """The tests' tiny random llava-hf checkpoint (float32; behaviour tests only).

    Its blocks are drawn at full scale (`block_scale` 1): attention is sharp enough that the
    answers depend on each picture and on their order.

    CLIP: 3 layers of width 32 on 28 px pictures in 7 px patches (16 patches; with the default
    strategy "full", 17 image tokens from feature layers [-2, -3]). Llama: 2 layers of width 64,
    GQA 4/2 heads, rope theta 5e5, context 256, vocabulary 386 padded to 448.
    """
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=28, patch_size=7,
    )  # fmt: skip
    text = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5},
    )  # fmt: skip
    fields = {"vision_feature_layer": [-2, -3], "vision_feature_select_strategy": "full", **fields}
    return write_llava_hf(out, vision, text, seed=seed, init=init, **fields)


def tiny_untrained_config(
    tokenizer, hidden: int = 64, intermediate: int = 128, layers: int = 2
) -> ModelConfig:
    """The config of the tests' tiny untrained models (for `mlx_llava.train.init_model_folder`):
    a 32-pixel CLIP-style tower of 2 layers in 8-pixel patches, padded to squares, and a Llama
    decoder of `layers` layers of width `hidden`, sized to `tokenizer` (one from
    `tokenizer_builder.build_tokenizer`)."""
    return ModelConfig(
        vision_config=VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=TextConfig(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=4,
            vocab_size=pad_vocab_size(len(tokenizer)),
            max_position_embeddings=256,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        image_aspect_ratio="pad",
    )


def onevision_processor_files(
    image_size: int, patch_size: int, pinpoints: list[list[int]], aspect: str
) -> dict:
    """The processor files of a llava-onevision-*-hf checkpoint (LlavaOnevisionProcessor: its
    image processor tiling along `pinpoints`, its video processor resizing frames to squares,
    SigLIP's mean and std 0.5) for a tower of `image_size` pixels in `patch_size` patches."""
    square = {"height": image_size, "width": image_size}
    common = dict(
        do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=3,
        rescale_factor=1 / 255, size=square, processor_class="LlavaOnevisionProcessor",
    )  # fmt: skip
    return {
        "preprocessor_config.json": dict(
            common,
            do_pad=True,
            image_grid_pinpoints=pinpoints,
            image_processor_type="LlavaOnevisionImageProcessor",
        ),
        "video_preprocessor_config.json": dict(
            common, video_processor_type="LlavaOnevisionVideoProcessor"
        ),
        "processor_config.json": {
            "image_token": IMAGE_PLACEHOLDER,
            "num_image_tokens": (image_size // patch_size) ** 2,
            "processor_class": "LlavaOnevisionProcessor",
            "video_token": "<video>",
            "vision_aspect_ratio": aspect,
            "vision_feature_select_strategy": "full",
        },
        "chat_template.json": {"chat_template": LLAVA_HF_CHAT_TEMPLATE},
    }


def write_onevision_hf(
    out: str | Path,
    vision: dict,
    text: dict,
    seed: int = 0,
    dtype: str = "float32",
    init: RandomInit = RandomInit(),
    max_shard_bytes: int = MAX_SHARD_BYTES,
    **fields,
) -> Path:
    """Write a random llava-onevision-*-hf checkpoint into `out` (`write_llava_hf`'s arguments).

    `vision` holds `SiglipVisionConfig` fields, `text` `Qwen2Config` fields; `fields` other
    `LlavaOnevisionConfig` fields (`image_grid_pinpoints` in tiles; default the releases' 36,
    1 x 1 to 6 x 6, and "anyres_max_9"). The tokenizer is the small Llama-like one with
    `<image>`, `<pad>` and `<video>` added, the chat template llava-hf's "USER: ...
    ASSISTANT:" (a random model: the template only has to be the same for all who time it).
    """
    from transformers import LlavaOnevisionConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(None)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<video>"]})
    tokenizer.save_pretrained(out)
    ids = dict(zip(("image", "pad", "video"), tokenizer.convert_tokens_to_ids(
        [IMAGE_PLACEHOLDER, "<pad>", "<video>"])))  # fmt: skip
    tile = vision["image_size"]
    fields = {
        "image_grid_pinpoints": [[h, w] for h in range(1, 7) for w in range(1, 7)],
        "vision_aspect_ratio": "anyres_max_9",
        **fields,
    }
    fields["image_grid_pinpoints"] = [
        [h * tile, w * tile] for h, w in fields["image_grid_pinpoints"]
    ]
    tied = text.get("tie_word_embeddings", False)
    config = LlavaOnevisionConfig(
        vision_config=dict(vision, model_type="siglip_vision_model", vision_use_head=False),
        text_config=dict(
            {"vocab_size": pad_vocab_size(len(tokenizer))},
            **text,
            model_type="qwen2",
            pad_token_id=ids["pad"],
        ),
        image_token_index=ids["image"],
        video_token_index=ids["video"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=tied,
        pad_token_id=ids["pad"],
        **fields,
    )
    config.dtype = dtype
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    config.save_pretrained(out)
    shapes = tensor_shapes(config)
    if tied:
        shapes = [(n, s) for n, s in shapes if n != "language_model.lm_head.weight"]
    write_weights(out, shapes, DTYPES[dtype], seed, init, max_shard_bytes)
    files = onevision_processor_files(
        tile, vision["patch_size"], config.image_grid_pinpoints, config.vision_aspect_ratio
    )
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")
    return out
