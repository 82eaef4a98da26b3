"""`load`: a model name -> (Model, Processor), as mlx-lm loads its models."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from . import distributed
from .atomic import recover_dir
from .config import ModelConfig
from .convert import DTYPES, convert, converted_tensors, is_mlx_folder, read_source
from .gguf import find_pair, read_pair
from .hub import cache_dir, is_repo_id, resolve_folder
from .model import Model
from .processor import Processor
from .weights import iter_shards, rename_quantization, to_mlx_key

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"


def resolve_model(name: Union[str, Path], dtype: str = "float16") -> Path:
    """The folder for `name`: "demo", a local folder, or a hub id converted once into the cache."""
    if is_repo_id(str(name)):
        cached = cache_dir() / f"{str(name).replace('/', '--')}-{dtype}"
        recover_dir(cached)
        if is_mlx_folder(cached):
            return cached
        folder = resolve_folder(name)
        if read_source(folder).is_mlx:  # mlx-community's MLX folders load from the hub's cache
            return folder
        convert(folder, cached, dtype=dtype, force=cached.exists())
        return cached
    if str(name) != "demo":
        recover_dir(Path(name).expanduser())  # a conversion killed while it replaced the folder
    return resolve_folder(name)


class TypedQuantizedEmbedding(nn.QuantizedEmbedding):
    """`nn.QuantizedEmbedding` whose rows come back in the model's float type.

    `mx.dequantize` returns bfloat16 for the fp modes (mxfp4, nvfp4, mxfp8: their scales are
    uint8), so a float32 or float16 model would take its prompt in bfloat16 and round its
    image features to bfloat16 where they join the text (2.8e-3 of the largest logit).
    """

    def __init__(self, embedding: nn.QuantizedEmbedding, dtype: mx.Dtype):
        super().__init__(
            embedding.num_embeddings, embedding.dims, embedding.group_size, embedding.bits,
            embedding.mode,
        )  # fmt: skip
        self.dtype = dtype

    def __call__(self, x: mx.array) -> mx.array:
        return mx.dequantize(
            self["weight"][x],
            scales=self["scales"][x],
            biases=self["biases"][x] if "biases" in self else None,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            dtype=self.dtype,
        )


def _apply_quantization(model: Model, config: ModelConfig, weights: dict) -> None:
    """Swap in quantized layers where the weights hold `scales` (mlx-lm's convention)."""
    quant = config.quantization
    if not quant:
        return

    def predicate(path: str, module: nn.Module):
        if path in quant:
            return quant[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(
        model,
        group_size=quant["group_size"],
        bits=quant["bits"],
        mode=quant.get("mode", "affine"),
        class_predicate=predicate,
    )
    floats = (v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating))
    dtype = next(floats, mx.float32)
    typed = [
        (path, TypedQuantizedEmbedding(module, dtype))
        for path, module in model.named_modules()
        if isinstance(module, nn.QuantizedEmbedding) and module.mode != "affine"
    ]  # lazy: the random weights these are made with are replaced before any evaluation
    if typed:
        model.update_modules(tree_unflatten(typed))


def read_model(folder: Path, dtype: Optional[str]) -> tuple[ModelConfig, dict, list[Path]]:
    """Config, weights in our layout, and the folders holding the processor files.

    MLX folders (this project's, mlx-vlm's) load as stored, quantized layers kept quantized;
    other layouts are converted in memory.
    """
    source = read_source(folder)
    if not source.is_mlx:
        weights = dict(converted_tensors(source, DTYPES[dtype or "float16"]))
        return source.config, weights, source.processor_folders
    config = source.config
    weights = {}
    for path, layout in source.folders:
        config.quantization = rename_quantization(source.quantization, layout)
        for shard in iter_shards(path):
            for key, value in shard.items():
                name = to_mlx_key(key, layout)
                if name is None:
                    continue
                if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
                    value = value.astype(DTYPES[dtype])
                weights[name] = value
    return config, weights, source.processor_folders


def build_model(
    config: ModelConfig,
    weights: dict,
    lazy: bool = False,
    pipeline: Optional[mx.distributed.Group] = None,
) -> Model:
    """A Model holding `weights` (our names), quantized where they say so; loading is strict.

    With a `pipeline` group the model keeps only this rank's part (`Model.pipeline`) and only
    those tensors are read: `mx.load` maps safetensors lazily, the others are never touched.
    """
    model = Model(config)
    if pipeline is not None:
        model.pipeline(pipeline)
        weights = {k: v for k, v in weights.items() if model.holds(k)}
    weights = model.sanitize(weights)
    _apply_quantization(model, config, weights)
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def load_model(folder: Union[str, Path], dtype: Optional[str] = None, lazy: bool = False) -> Model:
    """The model of a folder: MLX folders load as stored (cast to `dtype` if given); llava-hf
    and original checkpoints are converted in memory (to `dtype`, float16 by default).
    """
    config, weights, _ = read_model(Path(folder), dtype)
    return build_model(config, weights, lazy)


def load(
    path_or_repo: Union[str, Path] = DEFAULT_MODEL,
    dtype: Optional[str] = None,
    pad_to_square: Optional[bool] = None,
    conv_mode: Optional[str] = None,
    lazy: bool = False,
    pipeline: bool = False,
    mmproj: Optional[Union[str, Path]] = None,
) -> tuple[Model, Processor]:
    """Load a LLaVA model and its processor.

    Args:
        path_or_repo: an MLX folder (this project's or mlx-vlm's), a llava-hf or original LLaVA
            folder (converted in memory), a hub repo id (downloaded and converted once, then
            cached), "demo", a llama.cpp GGUF language model (with `mmproj`), a folder holding
            one GGUF pair, or "ollama:NAME" (a model in Ollama's store).
        mmproj: the mmproj GGUF (CLIP tower and projector) of a GGUF language model.
        dtype: cast the floating-point weights ("float16", "bfloat16", "float32").
        pad_to_square: pad pictures to a square with the mean colour before preprocessing, as
            the original LLaVA-1.5 did; the default follows the checkpoint.
        conv_mode: the conversation template `Processor.format_prompt` uses.
        lazy: leave the weights unevaluated until first use.
        pipeline: split the language model's decoder layers across the ranks of `mlx.launch`
            (`Model.pipeline`); each rank reads only its own tensors. Every rank then runs the
            same generation, and rank 0 has the answer.

    Returns:
        (model, processor)
    """
    pair = find_pair(path_or_repo, mmproj)
    if pair is not None:
        text, tower, ollama = pair
        gguf = read_pair(text, tower, DTYPES[dtype] if dtype else None, ollama and ollama.template)
        config, weights = gguf.config, gguf.weights
    else:
        folder = resolve_model(path_or_repo, dtype or "float16")
        config, weights, processor_folders = read_model(folder, dtype)
    if conv_mode:
        config.conv_mode = conv_mode
    group = distributed.world() if pipeline else None
    model = build_model(config, weights, lazy, group)
    if group is not None:
        distributed.barrier(group)  # as mlx-lm's sharded_load: every rank's weights are in
        # One random state on every rank: unseeded sampling then picks the same tokens on all.
        mx.random.seed(distributed.broadcast(random.getrandbits(62), group))
    if pair is not None:
        processor = Processor.from_gguf(gguf, pad_to_square=pad_to_square)
        processor.stop = ollama.stop if ollama else []
        processor.system = ollama.system if ollama else None
    else:
        processor = Processor.from_pretrained(processor_folders, config, pad_to_square)
    return model, processor
