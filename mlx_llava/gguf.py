"""llama.cpp GGUF files: a LLaVA pair (the language model's GGUF and its mmproj, the CLIP tower
and projector) read into our config, weights and tokenizer.

The gguf package's reader maps the file; each tensor is converted from the map into MLX, one
tensor (or chunk of rows) at a time, so that loading holds the weights and one chunk at most.
Q4_0, Q4_1 and Q8_0 become MLX affine (group 32) with the same values, exactly as `mx.load`
gives them, and stay so in memory; f16 / bf16 / f32 as stored. Keys are renamed in `weights.py`
(layouts "gguf" and "mmproj"); llama.cpp's permutation of the q and k rows for its rope is undone
here, on the rows of the quantized tensors, so no float copy of a weight is ever made.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import numpy as np

from .config import ConfigError, ModelConfig, TextConfig, VisionConfig
from .llama_tokenizer import SlowLlamaTokenizer
from .ollama_store import OllamaModel, find_model, is_ollama_name
from .weights import to_mlx_key, to_mlx_tensor

GGUF_GROUP_SIZE = 32  # every block quantization MLX reads: 32 weights per scale
# Tensors read as stored (BF16 from its bits: `mx.load` made it float16).
STORED_TYPES = {"F32", "F16", "BF16", "I8", "I16", "I32"}
# Blocks that are MLX affine groups as they are (bits): scale d, bias -8d (Q4_0), m (Q4_1) or
# -128d (Q8_0), the fp16 scales and biases `mx.load` gives.
AFFINE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
# k-quants, held as MLX affine at these bits: Q4_K with its own values, Q2_K and Q6_K
# dequantized by gguf's reference code and quantized again. As `mx.load` (which reads no Q3_K,
# Q5_K, Q8_K nor IQ types) they are the only k-quants accepted: Q3_K_* and Q5_K_* are refused.
REQUANTIZED_BITS = {"Q2_K": 4, "Q4_K": 4, "Q6_K": 8}
READABLE_TYPES = STORED_TYPES | set(AFFINE_BITS) | set(REQUANTIZED_BITS)
CHUNK_WEIGHTS = 1 << 20  # quantized tensors are converted this many weights at a time
ORIGINAL_IMAGE_TOKEN_INDEX = -200  # the original LLaVA's: llama.cpp GGUFs have no <image> token
# llava-v1.5's tokenizer_config.json: bos / eos / unk strip nothing, `legacy: false`.
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>")


@dataclass
class GGUFModel:
    """What a GGUF pair holds, in our terms.

    `image_settings` are a preprocessor_config.json's (size, crop, mean, std); `stop` the stop
    strings an Ollama store adds.
    """

    config: ModelConfig
    weights: dict[str, mx.array]
    text_path: Path
    text_metadata: dict
    image_settings: dict
    stop: list[str] = field(default_factory=list)


def _gguf_package():
    try:
        import gguf
    except ImportError:
        raise RuntimeError(
            "reading GGUF files needs the gguf package (pip install 'mlx-llava[gguf]')"
        ) from None
    return gguf


def tensor_types(path: Path) -> dict[str, str]:
    """Each tensor's GGML type name (`Q4_0`, `F16`, `Q6_K`, ...), from the file's header."""
    reader = _gguf_package().GGUFReader(path)
    return {t.name: t.tensor_type.name for t in reader.tensors}


def architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file ("llama" for a language model, "clip" for an
    mmproj), read from its header."""
    reader = _gguf_package().GGUFReader(path)
    field_ = reader.fields.get("general.architecture")
    return field_.contents() if field_ is not None else ""


def read_gguf(path: Path, dtype: Optional[mx.Dtype] = None) -> tuple[dict[str, mx.array], dict]:
    """Tensors (quantized ones as `weight`, `scales`, `biases`) and metadata of a GGUF file.

    The gguf package's reader maps the file; `read_tensor` converts its tensors one by one,
    each evaluated before the next is read, so that no more than one chunk of a tensor is held
    besides the weights. k-quants become MLX affine (`REQUANTIZED_BITS`), with a one-line note;
    their scales and biases in `dtype` (float16 if None, as the other GGUF types' are).

    Returns:
        (tensors, metadata): the metadata as `mx.load(path, format="gguf",
        return_metadata=True)` gives it (`gguf_metadata`).

    Raises:
        ValueError: not a GGUF file, or tensors of a type MLX cannot hold.
    """
    try:
        reader = _gguf_package().GGUFReader(path)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path.name}: not a readable GGUF file ({e})") from None
    kinds = {t.tensor_type.name for t in reader.tensors}
    unreadable = sorted(kinds - READABLE_TYPES)
    if unreadable:
        raise ValueError(
            f"{path.name} holds {', '.join(unreadable)} tensors, which MLX cannot read: use a "
            "Q4_0, Q4_1, Q8_0, Q4_K_M, Q6_K or f16 GGUF of the model"
        )
    tensors: dict[str, mx.array] = {}
    for t in reader.tensors:
        tensors.update(read_tensor(t, dtype or mx.float16))
    requantized = sorted(kinds & set(REQUANTIZED_BITS))
    if requantized:
        notes = ", ".join(
            f"{t} -> {REQUANTIZED_BITS[t]}-bit"
            + (" (the same values)" if t == "Q4_K" else " (re-quantized)")
            for t in requantized
        )
        print(f"note: {path.name}: k-quants held as MLX affine: {notes}", file=sys.stderr)
    return tensors, gguf_metadata(reader)


def gguf_metadata(reader) -> dict:
    """The key-value metadata of a gguf `GGUFReader`, as `mx.load(..., return_metadata=True)`
    gives it: a string as `str`, an array of strings as a list, a number or bool as an MLX
    array (0-d, or 1-d for an array) of its GGUF type, float64 as float32 (MLX has none); the
    reader's own `GGUF.*` fields left out. (`mx.load` refuses nested arrays; they are flattened.)
    """
    value_type = _gguf_package().GGUFValueType
    meta: dict = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        kind = f.types[0]
        if kind == value_type.ARRAY:  # the element type, even of an empty array
            kind = value_type(int(f.parts[0][0])) if len(f.types) == 1 else f.types[-1]
        if kind == value_type.STRING:  # a str, or a list of them
            meta[name] = f.contents()
            continue
        if f.types[0] == value_type.ARRAY:
            dtype = reader.gguf_scalar_to_np[kind]
            values = np.concatenate([f.parts[i] for i in f.data]) if f.data else np.zeros(0, dtype)
        else:
            values = f.parts[f.data[0]].reshape(())
        meta[name] = mx.array(values.astype(np.float32) if values.dtype == np.float64 else values)
    return meta


def read_tensor(
    tensor, dtype: mx.Dtype = mx.float16, chunk: int = CHUNK_WEIGHTS
) -> dict[str, mx.array]:
    """One tensor of a gguf `GGUFReader` in MLX, evaluated.

    A stored type as `{name: array}` (shape as MLX orders it, the reverse of GGML's); a block
    type as its MLX affine `name` (uint32 [..., cols * bits / 32]), `stem.scales` and
    `stem.biases` ([..., cols / 32]; float16 for Q4_0 / Q4_1 / Q8_0 as in the file, `dtype` for
    k-quants). A quantized tensor is converted `chunk` weights (whole rows) at a time from the
    file's map into arrays allocated once: no more than one chunk is held besides them.
    """
    kind = tensor.tensor_type.name
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if kind in STORED_TYPES:
        data = np.asarray(tensor.data)
        value = (
            mx.array(data.view(np.uint16)).view(mx.bfloat16) if kind == "BF16" else mx.array(data)
        )
        value = value.reshape(shape)
        mx.eval(value)
        return {tensor.name: value}
    scale_type = mx.float16 if kind in AFFINE_BITS else dtype
    cols = shape[-1]
    rows = tensor.n_elements // cols
    data = np.asarray(tensor.data).reshape(rows, -1)
    step = max(1, chunk // cols)
    out: list[mx.array] = []
    for start in range(0, rows, step):
        part = _rows_as_affine(data[start : start + step], tensor.tensor_type, cols, scale_type)
        if step >= rows:
            out = list(part)
            break
        if not out:  # written in place: each update donates the array to the next
            out = [mx.zeros((rows, p.shape[1]), p.dtype) for p in part]
        for o, p in zip(out, part):
            o[start : start + step] = p
        del part, p  # freed once written
        mx.eval(out)
    stem = tensor.name[: -len(".weight")]
    w, scales, biases = (a.reshape(*shape[:-1], a.shape[-1]) for a in out)
    return {tensor.name: w, f"{stem}.scales": scales, f"{stem}.biases": biases}


def _rows_as_affine(data: np.ndarray, qtype, cols: int, dtype: mx.Dtype) -> tuple:
    """Rows of a quantized tensor's bytes [rows, bytes a row] as MLX affine (weight, scales,
    biases in `dtype`), evaluated (their floats freed)."""
    kind, rows = qtype.name, data.shape[0]
    if kind in AFFINE_BITS:
        block_bytes = _gguf_package().GGML_QUANT_SIZES[qtype][1]
        blocks = _AFFINE_BLOCKS[kind](data.reshape(-1, block_bytes))
        out = tuple(a.reshape(rows, -1) for a in blocks)
    elif kind == "Q4_K":
        out = q4_k_as_affine(data, (rows, cols))
    else:
        values = _gguf_package().quants.dequantize(data, qtype)
        values = mx.array(values.reshape(rows, cols))
        out = mx.quantize(values, group_size=GGUF_GROUP_SIZE, bits=REQUANTIZED_BITS[kind])
    out = tuple(a if a.dtype in (mx.uint32, dtype) else a.astype(dtype) for a in out)
    mx.eval(out)
    return out


def _nibble_table() -> np.ndarray:
    """Two quant bytes of a Q4_0 / Q4_1 block, as a little-endian uint16 -> the two bytes MLX's
    4-bit packing holds for them (uint16).

    llama.cpp's block stores weight j in the low nibble of byte j and weight j + 16 in its
    high nibble (j < 16); MLX packs weight i into nibble i (the first in the low bits). Bytes
    2b and 2b + 1 of a block (weights 2b, 2b + 1 low; 2b + 16, 2b + 17 high) give MLX's byte b
    (low nibbles) and byte 8 + b (high nibbles): the low and high byte of the result.
    """
    p = np.arange(1 << 16, dtype=np.uint32)
    low = (p & 0x0F) | ((p >> 4) & 0xF0)
    high = ((p >> 4) & 0x0F) | ((p >> 8) & 0xF0)
    return (low | (high << 8)).astype(np.uint16)


_NIBBLES = _nibble_table()


def _q4_quants(pairs: np.ndarray) -> mx.array:
    """The 16 quant bytes of Q4 blocks, as uint16 pairs [n, 8] -> MLX's 4-bit words [n, 4]."""
    packed = _NIBBLES.take(pairs)  # [n, b]: MLX's byte b low, byte 8 + b high
    low = packed.astype(np.uint8).view(np.uint64)  # MLX's bytes 0..7 of each block
    high = (packed >> 8).astype(np.uint8).view(np.uint64)  # 8..15
    return mx.array(np.concatenate([low, high], axis=1).view(np.uint32))


def _q4_0(blocks: np.ndarray) -> tuple[mx.array, ...]:
    """Q4_0 blocks [n, 18] (fp16 d, 16 bytes of quants): d * (q - 8) -> (words, d, -8d)."""
    words = blocks.view(np.uint16)
    return _q4_quants(words[:, 1:]), *_scale_and_bias(words[:, :1], -8)


def _q4_1(blocks: np.ndarray) -> tuple[mx.array, ...]:
    """Q4_1 blocks [n, 20] (fp16 d and m, 16 bytes of quants): d * q + m -> (words, d, m)."""
    words = blocks.view(np.uint16)
    d, m = (_contiguous(words[:, i : i + 1].view(np.float16)) for i in (0, 1))
    return _q4_quants(words[:, 2:]), d, m


def _q8_0(blocks: np.ndarray) -> tuple[mx.array, ...]:
    """Q8_0 blocks [n, 34] (fp16 d, 32 int8 quants): d * q -> (q + 128 as uint8 packed 4 to a
    word, d, -128d)."""
    words = mx.array((blocks[:, 2:] ^ 0x80).view(np.uint32))
    return words, *_scale_and_bias(blocks[:, :2].view(np.uint16), -128)


def _scale_and_bias(d: np.ndarray, factor: int) -> tuple[mx.array, mx.array]:
    """fp16 deltas (their bits [n, 1]) -> (d, factor * d): the fp16 product mx.load computes
    (exact, inf past 65504), looked up in a table of every fp16 (faster than fp16 arithmetic)."""
    products = _FP16_PRODUCTS.get(factor)
    if products is None:
        every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
        with np.errstate(over="ignore", invalid="ignore"):
            products = _FP16_PRODUCTS[factor] = (every * np.float16(factor)).view(np.uint16)
    return _contiguous(d.view(np.float16)), mx.array(products.take(d).view(np.float16))


def _contiguous(column: np.ndarray) -> mx.array:
    """A strided numpy view (a field of each block) as an MLX array of its own elements (from
    a strided view `mx.array` would keep the whole span it covers)."""
    return mx.array(np.ascontiguousarray(column))


_FP16_PRODUCTS: dict[int, np.ndarray] = {}
_AFFINE_BLOCKS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0}


def q4_k_as_affine(data: np.ndarray, shape: tuple[int, int]) -> tuple[mx.array, ...]:
    """A Q4_K tensor [rows, cols] as MLX affine 4-bit, group 32, with the same values.

    A Q4_K block holds 256 weights in 8 sub-blocks of 32, each `d * sc * q - dmin * m` (q in
    0..15, 6-bit sc and m, fp16 d and dmin): an affine group of 32 with scale `d * sc` and bias
    `-dmin * m`. Unpacked as gguf's reference code does; the quants packed 8 to a uint32, the
    first in the low bits, as `mx.quantize` packs them. The values are exact while the scales
    stay float32; float16 scales round `d * sc` (an fp16 times a 6-bit integer) to 11 bits.

    Returns:
        (weight uint32 [rows, cols / 8], scales, biases float32 [rows, cols / 32])
    """
    rows, cols = shape
    blocks = np.asarray(data).reshape(-1, 144)  # 2 + 2 + 12 + 128 bytes a block
    n = blocks.shape[0]
    d = blocks[:, 0:2].view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].view(np.float16).astype(np.float32)
    sc, m = _gguf_package().quants.Q4_K.get_scale_min(blocks[:, 4:16])
    # 4 chunks of 32 bytes: the low nibbles are sub-block 2j, the high ones sub-block 2j + 1.
    q = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (q & 0x0F).astype(np.uint32).reshape(rows, cols // 8, 8)
    packed = np.bitwise_or.reduce(q << (4 * np.arange(8, dtype=np.uint32)), axis=-1)
    scales = (d * sc.astype(np.float32)).reshape(rows, cols // GGUF_GROUP_SIZE)
    biases = -(dmin * m.astype(np.float32)).reshape(rows, cols // GGUF_GROUP_SIZE)
    return mx.array(packed), mx.array(scales), mx.array(biases)


def _value(meta: dict, key: str, default=None):
    """A metadata value as a Python scalar, list or string."""
    if key not in meta:
        return default
    value = meta[key]
    if not isinstance(value, mx.array):
        return value
    if value.dtype == mx.float32:  # 1e-05, not 9.999999747378752e-06: the shortest float32 text
        floats = [float(str(np.float32(v))) for v in np.array(value).reshape(-1)]
        return floats[0] if value.ndim == 0 else floats
    return value.item() if value.ndim == 0 else value.tolist()


def text_config(meta: dict) -> TextConfig:
    """The decoder's config from a language-model GGUF's `llama.*` metadata."""
    arch = _value(meta, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"a '{arch}' GGUF is not a LLaVA language model (llama)")

    def get(key, default=None):
        return _value(meta, f"llama.{key}", default)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    return TextConfig(
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length", hidden // heads),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=get("rope.freq_base", 10000.0),
        max_position_embeddings=get("context_length", 2048),
        vocab_size=get("vocab_size", len(tokens)),
    )


def mmproj_settings(meta: dict) -> tuple[dict, dict]:
    """ModelConfig fields and image-processor settings from an mmproj's `clip.*` metadata.

    llama.cpp keeps the tower up to the feature layer: its last layer is the one LLaVA reads
    (the original's -2), unless `clip.vision.feature_layer` names hidden states.
    """
    if _value(meta, "general.architecture") != "clip" or not _value(
        meta, "clip.has_llava_projector", False
    ):
        raise ConfigError("not a LLaVA mmproj GGUF (general.architecture clip with a projector)")
    projector = _value(meta, "clip.projector_type", "mlp")
    if projector != "mlp":
        raise ConfigError(f"mmproj projector type '{projector}' is not supported (mlp)")

    def get(key, default=None):
        return _value(meta, f"clip.vision.{key}", default)

    vision = VisionConfig(
        hidden_size=get("embedding_length"),
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=get("attention.head_count"),
        image_size=get("image_size"),
        patch_size=get("patch_size"),
        layer_norm_eps=get("attention.layer_norm_epsilon", 1e-5),
        hidden_act="gelu" if _value(meta, "clip.use_gelu", False) else "quick_gelu",
    )
    feature = get("feature_layer")
    fields: dict = dict(
        vision_config=vision,
        vision_feature_layer=(feature if len(feature) > 1 else feature[0]) if feature else -1,
        projector_type="mlp2x_gelu",
    )
    flat = get("image_grid_pinpoints")
    if flat:  # LLaVA-1.6: anyres tiles, spatial_unpad with image_newline
        merge = get("mm_patch_merge_type", "spatial_unpad")
        if merge != "spatial_unpad":
            raise ConfigError(f"mm_patch_merge_type '{merge}' is not supported (spatial_unpad)")
        pairs = [[int(flat[i]), int(flat[i + 1])] for i in range(0, len(flat), 2)]
        fields.update(model_type="llava_next", image_grid_pinpoints=pairs)
    else:  # LLaVA-1.5: pictures padded to a square, as llama.cpp's clip does
        fields.update(image_aspect_ratio="pad")
    side = vision.image_size
    image = {"size": {"shortest_edge": side}, "crop_size": side}
    if "clip.vision.image_mean" in meta:
        image.update(image_mean=get("image_mean"), image_std=get("image_std"))
    return fields, image


def conv_mode_for(meta: dict, template: Optional[str] = None) -> str:
    """The conversation template: from an Ollama template or the GGUF's chat template when
    they speak Mistral's or ChatML's format, else Vicuna's (LLaVA-1.5 and 1.6-vicuna)."""
    text = template or _value(meta, "tokenizer.chat_template", "") or ""
    if "[INST]" in text:
        return "mistral_instruct"
    if "<|im_start|>" in text:
        return "chatml_direct"
    return "vicuna_v1"


def unpermute_rows(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's q/k permutation for ggml's rope, which stores each head's rows as
    `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)`. Works on any row-wise
    tensor: a weight, packed quantized weight, its scales and biases [rows, cols]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _layer_bits(weight: mx.array, scales: mx.array) -> int:
    """Bits of an MLX affine layer of group 32 (uint32 words per group of scales)."""
    return weight.shape[-1] * 32 // (scales.shape[-1] * GGUF_GROUP_SIZE)


def _renamed(tensors: dict, layout: str) -> dict[str, mx.array]:
    """`tensors` under our names (emptied as it goes: each tensor is held once)."""
    out = {}
    for key in list(tensors):
        value = tensors.pop(key)
        name = to_mlx_key(key, layout)
        if name is not None:
            out[name] = to_mlx_tensor(name, value, layout)
    return out


def read_pair(
    text_path: Union[str, Path],
    mmproj_path: Union[str, Path],
    dtype: Optional[mx.Dtype] = None,
    template: Optional[str] = None,
) -> GGUFModel:
    """A LLaVA model from a llama.cpp GGUF pair: config, weights in our names (quantized layers
    as `weight` / `scales` / `biases`), and the image processor's settings.

    Args:
        text_path: the language model (`ggml-model-q4_0.gguf`).
        mmproj_path: the CLIP tower and projector (`mmproj-model-f16.gguf`).
        dtype: cast the floating-point tensors (scales included); None keeps them as stored.
        template: an Ollama template, which decides the conversation format.
    """
    text_path, mmproj_path = Path(text_path), Path(mmproj_path)
    text, text_meta = read_gguf(text_path, dtype)
    mmproj, mmproj_meta = read_gguf(mmproj_path)
    fields, image = mmproj_settings(mmproj_meta)
    text_cfg = text_config(text_meta)
    text_cfg.tie_word_embeddings = "output.weight" not in text
    config = ModelConfig(
        text_config=text_cfg,
        image_token_index=ORIGINAL_IMAGE_TOKEN_INDEX,
        conv_mode=conv_mode_for(text_meta, template),
        pad_token_id=_value(text_meta, "tokenizer.ggml.padding_token_id"),
        **fields,
    )
    weights = {**_renamed(text, "gguf"), **_renamed(mmproj, "mmproj")}
    del text, mmproj
    heads = {"q_proj": text_cfg.num_attention_heads, "k_proj": text_cfg.num_key_value_heads}
    for name in list(weights):
        parts = name.split(".")
        if name.startswith("language_model.") and parts[-2] in heads:
            # One at a time, so that a layer's old rows are freed before the next is copied.
            weights[name] = unpermute_rows(weights[name], heads[parts[-2]])
            mx.eval(weights[name])
    # The mmproj drops post_layernorm (unused by LLaVA); the tower keeps one for loading.
    width = config.vision_config.hidden_size
    weights.setdefault("vision_tower.post_layernorm.weight", mx.ones((width,)))
    weights.setdefault("vision_tower.post_layernorm.bias", mx.zeros((width,)))
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    config.quantization = quantization_entry(weights)
    return GGUFModel(config, weights, text_path, text_meta, image)


def quantization_entry(weights: dict[str, mx.array]) -> Optional[dict]:
    """mlx-lm's `quantization` config for the quantized layers: group 32, each layer's bits."""
    layers = {
        name[: -len(".scales")]: {
            "group_size": GGUF_GROUP_SIZE,
            "bits": _layer_bits(weights[name[: -len("scales")] + "weight"], value),
        }
        for name, value in weights.items()
        if name.endswith(".scales")
    }
    if not layers:
        return None
    bits = max(layer["bits"] for layer in layers.values())
    return {"group_size": GGUF_GROUP_SIZE, "bits": bits, "mode": "affine", **layers}


def spm_model_proto(meta: dict) -> bytes:
    """The SentencePiece model a Llama GGUF was converted from (`tokenizer.ggml.tokens`,
    `scores`, `token_type`, as llama.cpp's converter copied them from tokenizer.model), with
    Llama's normalizer: no rewriting, a dummy prefix (`tokenizer.ggml.add_space_prefix`)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    tokens = _value(meta, "tokenizer.ggml.tokens")
    scores = _value(meta, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = _value(meta, "tokenizer.ggml.token_type") or [1] * len(tokens)
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, score, kind  # GGUF numbers types as SPM
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.byte_fallback = 6 in types
    trainer.unk_id = _value(meta, "tokenizer.ggml.unknown_token_id", 0)
    trainer.bos_id = _value(meta, "tokenizer.ggml.bos_token_id", 1)
    trainer.eos_id = _value(meta, "tokenizer.ggml.eos_token_id", 2)
    trainer.pad_id = -1
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(_value(meta, "tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def original_tokenizer(meta: dict) -> Optional[SlowLlamaTokenizer]:
    """The original code's tokenizer (transformers 4.31's slow LlamaTokenizer over the release's
    tokenizer.model) for a SentencePiece GGUF; None for other vocabularies."""
    if _value(meta, "tokenizer.ggml.model") != "llama":
        return None
    return SlowLlamaTokenizer(
        spm_model_proto(meta),
        {token: (False, False) for token in SPECIAL_TOKENS},
        add_bos_token=bool(_value(meta, "tokenizer.ggml.add_bos_token", True)),
        add_eos_token=bool(_value(meta, "tokenizer.ggml.add_eos_token", False)),
        legacy=False,
    )


def write_tokenizer_files(meta: dict, out: Path) -> None:
    """Tokenizer files of a GGUF's vocabulary in `out`. A SentencePiece (Llama) vocabulary
    becomes the release's tokenizer.model, rebuilt (`spm_model_proto`), with a
    tokenizer_config.json as llava-v1.5's (slow LlamaTokenizer, `legacy: false`); any other is
    saved from transformers' GGUF support (which needs torch)."""
    if _value(meta, "tokenizer.ggml.model") != "llama":
        raise ValueError("only the GGUF's own file can describe a non-SentencePiece vocabulary")
    tokens = _value(meta, "tokenizer.ggml.tokens")

    def token(key: str, default: int) -> str:
        return tokens[_value(meta, f"tokenizer.ggml.{key}_token_id", default)]

    (out / "tokenizer.model").write_bytes(spm_model_proto(meta))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": token("bos", 1),
        "eos_token": token("eos", 2),
        "unk_token": token("unknown", 0),
        "add_bos_token": bool(_value(meta, "tokenizer.ggml.add_bos_token", True)),
        "add_eos_token": bool(_value(meta, "tokenizer.ggml.add_eos_token", False)),
        "legacy": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def load_hf_tokenizer(model: GGUFModel):
    """mlx-lm's TokenizerWrapper over transformers' tokenizer of the GGUF's vocabulary: built
    from the rebuilt tokenizer.model for SentencePiece vocabularies (no torch needed), else by
    transformers' GGUF support."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if _value(model.text_metadata, "tokenizer.ggml.model") == "llama":
            write_tokenizer_files(model.text_metadata, Path(tmp))
        else:
            from transformers import AutoTokenizer

            _gguf_package()
            path = model.text_path
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            tokenizer.save_pretrained(tmp)
        return load_tokenizer(Path(tmp))


def find_pair(
    name: Union[str, Path], mmproj: Optional[Union[str, Path]] = None
) -> Optional[tuple[Path, Path, Optional[OllamaModel]]]:
    """(language model, mmproj, Ollama model or None) when `name` is a GGUF pair: a GGUF file
    (with `mmproj`), a folder holding one pair and no config.json, or "ollama:NAME"; else None.
    """
    if is_ollama_name(str(name)):
        found = find_model(str(name))
        arch = architecture(found.model)
        if arch != "llama":
            raise ConfigError(f"Ollama model '{found.name}' is a '{arch}' model, not LLaVA")
        return found.model, found.projector, found
    path = Path(name).expanduser()
    if path.is_file() and (path.suffix == ".gguf" or mmproj is not None):
        if mmproj is None:
            raise ConfigError(
                f"{path.name} is a GGUF language model: pass its mmproj (the CLIP tower and "
                "projector) too, e.g. --mmproj mmproj-model-f16.gguf"
            )
        if not Path(mmproj).expanduser().is_file():
            raise FileNotFoundError(f"mmproj file '{mmproj}' not found")
        return path, Path(mmproj).expanduser(), None
    if path.is_dir() and not (path / "config.json").exists():
        kinds: dict[str, list[Path]] = {}
        for file in sorted(path.glob("*.gguf")):
            kinds.setdefault(architecture(file), []).append(file)
        if kinds:
            text, towers = kinds.get("llama", []), kinds.get("clip", [])
            if len(text) != 1 or len(towers) != 1:
                raise ConfigError(
                    f"{path} should hold one GGUF language model (llama) and one mmproj (clip), "
                    f"found {len(text)} and {len(towers)}"
                )
            return text[0], towers[0], None
    return None


def write_processor_files(model: GGUFModel, out: Path) -> None:
    """Tokenizer and image-processor files for a folder converted from a GGUF pair (see
    `write_tokenizer_files`): the folder encodes as the original code did."""
    meta = model.text_metadata
    if _value(meta, "tokenizer.ggml.model") == "llama":
        write_tokenizer_files(meta, out)
    else:
        load_hf_tokenizer(model)._tokenizer.save_pretrained(out)
    settings = {"image_processor_type": "CLIPImageProcessor", **model.image_settings}
    (out / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))
