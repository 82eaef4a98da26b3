"""Turn a LLaVA checkpoint (llava-hf, or an original haotian-liu release) into an MLX folder.

Tensors stream shard by shard: each is renamed (`weights.to_mlx_key`), moved to MLX layout, cast,
optionally quantized, and written to a temporary folder that is renamed at the end, so a failure
leaves nothing half-written and a 7B model is never held twice in memory.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from .atomic import recover_dir, replace_dir, staging_dir
from .config import ConfigError, ModelConfig, TextConfig, is_original_config
from .conversation import template_for_config
from .gguf import GGUFModel, find_pair, read_pair, write_processor_files
from .hub import resolve_folder
from .model import Model
from .processor import find_processor_file
from .progress import Progress
from .weights import (
    MLX_LAYOUTS,
    ShardWriter,
    dequantized_shards,
    is_mlx_layout,
    iter_shards,
    to_mlx_key,
    to_mlx_tensor,
    weight_files,
)

MAX_SHARD_BYTES = 5 << 30
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
ORIGINAL_IMAGE_TOKEN_INDEX = -200  # haotian-liu/LLaVA's IMAGE_TOKEN_INDEX
# Ours, for original OneVision releases, whose code marks videos with IMAGE_TOKEN_INDEX too.
ORIGINAL_VIDEO_TOKEN_INDEX = -201

# Files that describe the tokenizer and the processor, copied as they are.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "processor_config.json",
    "preprocessor_config.json",
    "generation_config.json",
)


@dataclass
class QuantizeSpec:
    """`nn.quantize` settings; `vision` also quantizes the vision tower and projector."""

    bits: int = 4
    group_size: int = 64
    vision: bool = False


@dataclass
class Source:
    """Where a checkpoint's tensors come from: folders, each with its key layout.

    `quantization` is the config entry of a quantized MLX folder, whose layers are dequantized
    as they are read.
    """

    config: ModelConfig
    folders: list[tuple[Path, str]]
    # The checkpoint's own folder first (tokenizer, templates), then where else the image
    # processor's settings may be (see processor.find_processor_file).
    processor_folders: list[Path] = field(default_factory=list)
    quantization: Optional[dict] = None
    gguf: Optional[GGUFModel] = None  # a GGUF pair's tensors, read already (our names)

    def iter_shards(self, folder: Path, layout: str) -> Iterator[dict[str, mx.array]]:
        shards = iter([self.gguf.weights]) if self.gguf else iter_shards(folder)
        if layout in MLX_LAYOUTS and self.quantization:
            shards = dequantized_shards(shards, self.quantization)
        return shards

    @property
    def is_mlx(self) -> bool:
        """Every tensor is in MLX's layout already: the folder loads as stored, quantized or not."""
        return all(layout in MLX_LAYOUTS for _, layout in self.folders)

    @property
    def total_bytes(self) -> int:
        """The size of the weight files, for progress reports."""
        if self.gguf:
            return sum(v.nbytes for v in self.gguf.weights.values())
        return sum(f.stat().st_size for folder, _ in self.folders for f in weight_files(folder))


def is_mlx_folder(folder: Path) -> bool:
    """Folders written by this project (convert, train) say so in their config.json."""
    try:
        with open(folder / "config.json") as f:
            return "mlx_llava" in json.load(f)
    except (OSError, json.JSONDecodeError):
        return False


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.parent} has no {path.name}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None


def _clip_vision_config(folder: Path) -> dict:
    """The vision part of a CLIPModel / SiglipModel or CLIPVisionModel / SiglipVisionModel
    config (with its `model_type`)."""
    config = read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type in ("clip", "siglip"):
        return {"model_type": f"{model_type}_vision_model", **config.get("vision_config", {})}
    if model_type in ("clip_vision_model", "siglip_vision_model"):
        return config
    raise ConfigError(f"{folder} is not a CLIP or SigLIP checkpoint (model_type '{model_type}')")


def _grid_pinpoints(pinpoints, tile: int) -> Optional[list[list[int]]]:
    """An original config's `image_grid_pinpoints`: a list, the list written as a string, or
    lmms-lab's range of tile grids "(1x1),...,(6x6)" (in tiles of the tower's size)."""
    if not isinstance(pinpoints, str):
        return pinpoints
    grids = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
    if not grids:  # some releases write the list as a string
        return ast.literal_eval(pinpoints)
    (h0, w0), (h1, w1) = [tuple(map(int, g)) for g in (grids[0], grids[-1])]
    return [[h * tile, w * tile] for h in range(h0, h1 + 1) for w in range(w0, w1 + 1)]


def original_model_config(
    config: dict, vision_config: dict, conv_mode: Optional[str] = None
) -> ModelConfig:
    """A ModelConfig for an original LLaVA checkpoint (LLaVA v1, v1.5 or v1.6, or an lmms-lab
    OneVision release: Qwen2, SigLIP, "anyres_max_N") and its vision tower's config."""
    if config.get("mm_use_im_start_end"):
        raise ConfigError(
            "checkpoints trained with mm_use_im_start_end (<im_start>/<im_end> around the image) "
            "are not supported"
        )
    projector = config.get("mm_projector_type", "linear")
    if projector not in ("linear", "mlp2x_gelu"):
        raise ConfigError(f"unknown projector type '{projector}' (linear, mlp2x_gelu)")
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConfigError(
            f"mm_vision_select_feature '{select}' is not supported (patch, cls_patch)"
        )
    aspect = config.get("image_aspect_ratio") or "square"
    onevision = aspect.startswith("anyres_max_")
    if aspect not in ("pad", "square", "anyres") and not onevision:
        raise ConfigError(
            f"image_aspect_ratio '{aspect}' is not supported (pad, square, anyres, anyres_max_N)"
        )
    merge = config.get("mm_patch_merge_type", "flat")
    if aspect.startswith("anyres") and merge != "spatial_unpad":
        raise ConfigError(
            f"mm_patch_merge_type '{merge}' is not supported with anyres (spatial_unpad)"
        )
    vision_hidden = vision_config.get("hidden_size", 1024)
    if config.get("mm_hidden_size", vision_hidden) != vision_hidden:
        raise ConfigError(
            f"vision tower mismatch: its hidden size is {vision_hidden} but the checkpoint's "
            f"mm_hidden_size is {config['mm_hidden_size']}"
        )
    text_fields = set(TextConfig.__dataclass_fields__)
    text_config = {k: v for k, v in config.items() if k in text_fields}
    is_mistral = config.get("model_type") == "llava_mistral"  # LlavaMistralForCausalLM
    is_qwen = config.get("model_type") == "llava_qwen" or "LlavaQwenForCausalLM" in (
        config.get("architectures") or []
    )
    text_config["model_type"] = "qwen2" if is_qwen else "mistral" if is_mistral else "llama"
    tile = vision_config.get("image_size", 336)
    pinpoints = _grid_pinpoints(config.get("image_grid_pinpoints"), tile)
    layer = config.get("mm_vision_select_layer", -2)
    strategy = "default" if select == "patch" else "full"
    if vision_config.get("model_type") == "siglip_vision_model":
        # lmms-lab's SigLIP tower drops its last layer and its head and returns the last
        # hidden states left (no CLS): llava-hf's 26-layer tower at layer -1, "full".
        layers = vision_config.get("num_hidden_layers", 27) - 1
        vision_config = dict(vision_config, num_hidden_layers=layers, vision_use_head=False)
        layer, strategy = -1, "full"
    model_type = "llava_onevision" if onevision else "llava_next" if aspect == "anyres" else "llava"
    return ModelConfig(
        vision_config=vision_config,
        text_config=TextConfig.from_dict(text_config),
        model_type=model_type,
        image_grid_pinpoints=pinpoints if aspect.startswith("anyres") else None,
        image_token_index=ORIGINAL_IMAGE_TOKEN_INDEX,
        video_token_index=ORIGINAL_VIDEO_TOKEN_INDEX if onevision else None,
        vision_aspect_ratio=aspect if onevision else None,
        projector_type=projector,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
        image_aspect_ratio="anyres" if onevision else aspect,
        conv_mode=conv_mode or template_for_config(config, None),
        pad_token_id=config.get("pad_token_id"),
    )


def read_source(
    hf_path: Union[str, Path],
    vision_tower: Optional[Union[str, Path]] = None,
    conv_mode: Optional[str] = None,
    mmproj: Optional[Union[str, Path]] = None,
) -> Source:
    """Find the config, the weight folders and the processor files of a checkpoint: a llava-hf
    or original checkpoint, an MLX folder (to convert again: re-quantize, change dtype), or a
    GGUF pair (`mmproj` beside a GGUF language model, a folder holding a pair, "ollama:NAME")."""
    pair = find_pair(hf_path, mmproj)
    if pair is not None:
        text, tower, ollama = pair
        # float32 scales: a layer dequantized at float16 would round its products.
        model = read_pair(text, tower, mx.float32, ollama.template if ollama else None)
        quantization, model.config.quantization = model.config.quantization, None
        if conv_mode:
            model.config.conv_mode = conv_mode
        return Source(model.config, [(text, "mlx")], [], quantization, gguf=model)
    folder = resolve_folder(hf_path)
    config = read_json(folder / "config.json")
    if is_mlx_folder(folder):
        model_config = ModelConfig.from_dict(config)
        quantization, model_config.quantization = model_config.quantization, None
        if conv_mode:
            model_config.conv_mode = conv_mode
        return Source(model_config, [(folder, "mlx")], [folder], quantization)
    if is_original_config(config):
        tower_name = vision_tower or config.get("mm_vision_tower")
        if not tower_name:
            raise ConfigError("the checkpoint names no vision tower: pass --vision-tower")
        tower = resolve_folder(tower_name)
        model_config = original_model_config(config, _clip_vision_config(tower), conv_mode)
        folders = [(folder, "original"), (tower, "clip")]
        if not model_config.vision_config.is_clip:  # lmms-lab: the trained tower is inside
            folders = folders[:1]
        return Source(
            model_config,
            folders=folders,
            processor_folders=[folder, tower],  # the tower gives preprocessor_config.json only
        )
    if config.get("model_type") != "llava" and "vision_config" not in config:
        raise ConfigError(
            f"{hf_path} is not a LLaVA checkpoint (model_type '{config.get('model_type')}')"
        )
    model_config = ModelConfig.from_dict(config)
    if conv_mode:
        model_config.conv_mode = conv_mode
    elif model_config.is_next and not model_config.conv_mode:
        # LLaVA-1.6 chats in its decoder's format (vicuna_v1, mistral_instruct, chatml_direct).
        model_config.conv_mode = template_for_config(config, _chat_template(folder))
    if is_mlx_layout(folder, config):  # mlx-vlm / mlx-community: the llava-hf config, MLX tensors
        quantization, model_config.quantization = model_config.quantization, None
        return Source(model_config, [(folder, "mlx_vlm")], [folder], quantization)
    return Source(model_config, folders=[(folder, "llava_hf")], processor_folders=[folder])


def _chat_template(folder: Path) -> Optional[str]:
    """The Jinja chat template a llava-hf folder ships, if any (read as text: only searched)."""
    for name in ("chat_template.json", "chat_template.jinja", "tokenizer_config.json"):
        if (folder / name).exists():
            text = (folder / name).read_text(encoding="utf-8", errors="replace")
            if "chat_template" in text or name.endswith(".jinja"):
                return text
    return None


def quantized_paths(model: Model, spec: QuantizeSpec) -> dict[str, bool]:
    """Module paths to quantize, and those that must stay unquantized (width vs group size)."""
    paths = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized"):
            continue
        if not spec.vision and not path.startswith("language_model."):
            continue
        # The patch convolution, and the position table that CLIP slices rather than calls.
        if path.startswith("vision_tower.embeddings."):
            continue
        paths[path] = module.weight.shape[-1] % spec.group_size == 0
    return paths


def _quantization_entry(spec: QuantizeSpec, paths: dict[str, bool]) -> dict:
    """mlx-lm's `quantization` config: global settings, plus `path: false` for skipped layers."""
    entry: dict = {"group_size": spec.group_size, "bits": spec.bits, "mode": "affine"}
    entry.update({p: False for p, ok in paths.items() if not ok})
    return entry


def convert(
    hf_path: Union[str, Path],
    mlx_path: Union[str, Path],
    dtype: str = "float16",
    quantize: Optional[QuantizeSpec] = None,
    vision_tower: Optional[Union[str, Path]] = None,
    conv_mode: Optional[str] = None,
    force: bool = False,
    progress: bool = True,
    mmproj: Optional[Union[str, Path]] = None,
) -> Path:
    """Convert a checkpoint into an MLX folder at `mlx_path` and return that path.

    Args:
        hf_path: a local folder, a hub repo id (llava-hf layouts or an original release),
            "demo", or an MLX folder (converted again: another dtype, quantized or not).
        mlx_path: the output folder; it must not exist unless `force`.
        dtype: "float16", "bfloat16" or "float32" for the floating-point tensors.
        quantize: quantize the language model (and with `vision`, the rest) as mlx-lm does.
        vision_tower: the CLIP checkpoint for original releases (else their `mm_vision_tower`).
        conv_mode: record a conversation template other than the checkpoint's default.
        force: replace an existing output folder (by renames, once the new one is complete).
        progress: show the bytes converted on a terminal's stderr.
        mmproj: the mmproj GGUF of a GGUF language model `hf_path`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}' (choose from: {', '.join(DTYPES)})")
    mlx_path = Path(mlx_path)
    recover_dir(mlx_path)  # a conversion killed while it swapped folders
    if mlx_path.exists() and not force:
        raise FileExistsError(f"{mlx_path} already exists: choose another path or pass --force")
    source = read_source(hf_path, vision_tower, conv_mode, mmproj)
    staged = staging_dir(mlx_path)
    try:
        _write(source, staged, DTYPES[dtype], quantize, progress)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    # The old folder (with --force) is replaced by renames: a crash leaves the old or the new.
    return replace_dir(staged, mlx_path)


def converted_tensors(
    source: Source,
    dtype: mx.Dtype,
    quantize: Optional[QuantizeSpec] = None,
    progress: Optional[Progress] = None,
) -> Iterator[tuple[str, mx.array]]:
    """Yield (our name, tensor) for every weight of `source`, checked against the config.

    Raises:
        ConfigError: a tensor the config does not expect, a wrong shape, or a missing tensor.
    """
    model = Model(source.config)  # lazily initialised: only names and shapes are read
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    quantized = quantized_paths(model, quantize) if quantize else {}
    seen = set()
    done = 0
    for folder, layout in source.folders:
        for shard in source.iter_shards(folder, layout):
            for key, value in shard.items():
                done += value.nbytes
                if progress is not None:
                    progress.update(min(done, progress.total))
                name = to_mlx_key(key, layout)
                if name is None or (name not in expected and name.endswith("lm_head.weight")):
                    continue
                if name in seen:  # a tower inside the checkpoint (LLaVA-1.6) beats the CLIP's
                    continue
                if name not in expected:
                    raise ConfigError(f"unexpected tensor '{key}' in {folder}: not a LLaVA weight")
                value = to_mlx_tensor(name, value, layout)
                if tuple(value.shape) != tuple(expected[name]):
                    raise ConfigError(
                        f"tensor '{key}' has shape {tuple(value.shape)} but the config expects "
                        f"{tuple(expected[name])}"
                    )
                if mx.issubdtype(value.dtype, mx.floating):
                    value = value.astype(dtype)
                seen.add(name)
                module = name.rsplit(".", 1)[0]
                if quantized.get(module) and name.endswith(".weight"):
                    q, scales, biases = mx.quantize(
                        value, group_size=quantize.group_size, bits=quantize.bits
                    )
                    yield name, q
                    yield f"{module}.scales", scales
                    yield f"{module}.biases", biases
                else:
                    yield name, value
            del shard
    missing = sorted(set(expected) - seen)
    if missing:
        raise ConfigError(
            f"the checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. '{missing[0]}'"
        )


def _write(
    source: Source, out: Path, dtype: mx.Dtype, quantize: Optional[QuantizeSpec], progress: bool
) -> None:
    meter = Progress(source.total_bytes, "converted", "bytes", terminal_only=True, enabled=progress)
    writer = ShardWriter(out, MAX_SHARD_BYTES)
    for name, value in converted_tensors(source, dtype, quantize, meter):
        writer.add(name, value)
    writer.close()
    meter.update(meter.total)
    meter.close()
    out_config = source.config.to_dict()
    if quantize:
        model = Model(source.config)
        out_config["quantization"] = _quantization_entry(quantize, quantized_paths(model, quantize))
        out_config["quantization_config"] = out_config["quantization"]  # as mlx-lm writes it
    out_config["mlx_llava"] = {"format": 1}
    if source.gguf:
        write_processor_files(source.gguf, out)
    for name in PROCESSOR_FILES:
        path = find_processor_file(source.processor_folders, name)
        if path is not None:
            shutil.copy(path, out / name)
    with open(out / "config.json", "w") as f:
        json.dump(out_config, f, indent=2)
