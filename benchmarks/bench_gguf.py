"""A Q4_0 GGUF pair: peak memory against its files' size, and decode speed against the same
model converted by this project to 4-bit (same process, interleaved runs).

    python benchmarks/bench_gguf.py [--hidden 1024 --layers 8 --vocab 32000] [--runs 3]
        [--llama-quantize build/bin/llama-quantize] [--computed-only]

The language model GGUF is written here with the gguf package (random weights quantized by its
reference Q4_0 quantizer, the fixtures' SentencePiece vocabulary, `llama.*` metadata as
llama.cpp writes it); the mmproj is the fixtures' tiny tower with a projector of the model's
width. Memory is measured in a fresh process: MLX's peak after `load` and after a short
generation, against the two files' bytes, and explained (`layout_bytes`); with
`--llama-quantize` also for llama.cpp's own Q4_0 of the same weights (its output tensor Q6_K, as
llama-quantize makes it in every Q4_0 file whose width divides by 256). `--computed-only`
prints the layout of the real LLaVA-1.5-7B Q4_0 pair.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAIR = ROOT / "tests" / "fixtures" / "data" / "gguf-v15"
IMAGE = ROOT / "tests" / "fixtures" / "data" / "images" / "a.png"


def write_text_gguf(
    path: Path, hidden: int, layers: int, ffn: int, vocab: int, heads: int, f32: bool = False
):
    """A random Llama language model GGUF, every matrix Q4_0 (or F32), with the fixtures'
    vocabulary."""
    import gguf

    source = gguf.GGUFReader(PAIR / "ggml-model-f16.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for name, field in source.fields.items():
        if name.startswith("tokenizer.") or name == "general.name":
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if f32 else gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_vocab_size(vocab)
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    rng = np.random.default_rng(0)
    q4 = gguf.GGMLQuantizationType.Q4_0

    def matrix(name: str, rows: int, cols: int, scale: float = 1.0):
        w = rng.standard_normal((rows, cols), dtype=np.float32) * (scale / np.sqrt(cols))
        if f32:  # the same weights as the Q4_0 file's
            writer.add_tensor(name, gguf.quants.dequantize(gguf.quants.quantize(w, q4), q4))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, q4), raw_dtype=q4)

    matrix("token_embd.weight", vocab, hidden, np.sqrt(hidden))
    for i in range(layers):
        for part, rows, cols in [
            ("attn_q", hidden, hidden), ("attn_k", hidden, hidden), ("attn_v", hidden, hidden),
            ("attn_output", hidden, hidden), ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden),
            ("ffn_down", hidden, ffn),
        ]:  # fmt: skip
            matrix(f"blk.{i}.{part}.weight", rows, cols, 0.3)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    matrix("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_mmproj(path: Path, hidden: int) -> None:
    """The fixtures' mmproj (a tiny CLIP tower) with a projector into `hidden` (random, f16)."""
    import gguf

    source = gguf.GGUFReader(PAIR / "mmproj-model-f16.gguf")
    writer = gguf.GGUFWriter(path, "clip")
    for name, field in source.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    rng = np.random.default_rng(1)
    for tensor in source.tensors:
        data = np.asarray(tensor.data)
        if tensor.name.startswith("mm."):
            rows = hidden
            cols = data.shape[-1] if tensor.name == "mm.0.weight" else hidden
            shape = (rows, cols) if data.ndim == 2 else (rows,)
            data = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(data.dtype)
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def measure_memory(text: Path, mmproj: Path) -> dict:
    """In this (fresh) process: MLX's peak after load, and after 16 generated tokens."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_llava import load, stream_generate

    model, processor = load(text, mmproj=mmproj)
    after_load = mx.get_peak_memory()
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    prompt = processor.format_prompt("Describe the picture.")
    for _ in stream_generate(model, processor, prompt, image=IMAGE, max_tokens=16):
        pass
    files = text.stat().st_size + mmproj.stat().st_size
    layout = layout_bytes(gguf_tensors(text) + gguf_tensors(mmproj))
    return {
        "files_bytes": files,
        "tensor_bytes_in_files": layout["file"],
        "weights_bytes_in_mlx": weights,
        "weights_bytes_computed": layout["mlx"],
        "peak_after_load_bytes": after_load,
        "peak_after_generate_bytes": mx.get_peak_memory(),
        "load_ratio": after_load / files,
        "layout_ratio": weights / files,  # what MLX's layout alone makes of the files
        "load_overhead_bytes": after_load - weights,  # anything else at the peak
        "generate_ratio": mx.get_peak_memory() / files,
    }


def memory_of(text: Path) -> dict:
    """`measure_memory` of `text` and the mmproj beside it, in a fresh process."""
    child = [sys.executable, __file__, "--memory-of", str(text)]
    return json.loads(subprocess.run(child, check=True, capture_output=True).stdout)


def gguf_tensors(path: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, GGML type, shape) of each tensor of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    return [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors]


def layout_bytes(tensors: list[tuple[str, str, tuple[int, ...]]]) -> dict[str, float]:
    """Bytes of `tensors` in a GGUF file and as mlx-llava holds them after loading.

    In the file each type takes its GGML block size (Q4_0: 18 bytes a block of 32, one fp16
    delta; Q6_K: 210 bytes a block of 256). MLX's affine layout keeps a uint32-packed block of
    32 and an fp16 scale and bias each: 4 more bytes a block, so Q4_0 becomes 20 bytes (10/9 of
    the file), Q8_0 36 (18/17), Q4_1 (an fp16 delta and min) stays 20. k-quants become affine
    too (`gguf.REQUANTIZED_BITS`: Q4_K 4-bit, 20 bytes; Q6_K 8-bit, 36 bytes). Floats stay as
    stored. Each tensor is read from the file's memory map into its final arrays one chunk of
    rows (`gguf.CHUNK_WEIGHTS` weights) at a time, so the load peak is the weights plus the
    larger of two transients: one chunk (its affine bytes, and for Q2_K / Q6_K its weights
    dequantized to float32 before they are quantized again), and the q or k matrix whose rows
    are un-permuted after reading (held twice for a moment).
    """
    import gguf

    from mlx_llava.gguf import CHUNK_WEIGHTS, GGUF_GROUP_SIZE, REQUANTIZED_BITS

    out = {"file": 0.0, "mlx": 0.0, "largest_chunk": 0.0, "largest_q_k": 0.0}
    for name, kind, shape in tensors:
        n = int(np.prod(shape))
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        out["file"] += n // block * size
        bits = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8, **REQUANTIZED_BITS}.get(kind)
        if bits is None:
            held = n * size
        else:
            held = n // GGUF_GROUP_SIZE * (4 * bits + 4)
            cols = shape[0]  # GGML order: the row length first
            chunk = min(n, max(1, CHUNK_WEIGHTS // cols) * cols)
            floats = 4 * chunk if kind in ("Q2_K", "Q6_K") else 0
            out["largest_chunk"] = max(out["largest_chunk"], held * chunk / n + floats)
        out["mlx"] += held
        if name.endswith(("attn_q.weight", "attn_k.weight")) and not name.startswith("v."):
            out["largest_q_k"] = max(out["largest_q_k"], held)
    out["peak"] = out["mlx"] + max(out["largest_chunk"], out["largest_q_k"])
    return out


def llava_7b_q4_0_tensors() -> list[tuple[str, str, tuple[int, ...]]]:
    """The tensors of LLaVA-1.5-7B's Q4_0 pair as llama.cpp writes it: `llama-quantize ... Q4_0`
    keeps every matrix Q4_0 except `output.weight`, which it makes Q6_K (llama-quant.cpp: the
    output tensor of a 256-divisible width gets Q6_K unless the type is Q8_0); norms F32. The
    mmproj (`convert_image_encoder_to_gguf.py`, f16): CLIP ViT-L/14-336 without its last layer,
    matrices and the patch/position embeddings F16, biases and norms F32."""
    hidden, ffn, layers, vocab = 4096, 11008, 32, 32000
    text = [
        ("token_embd.weight", "Q4_0", (vocab, hidden)),
        ("output.weight", "Q6_K", (vocab, hidden)),
    ]
    text += [("output_norm.weight", "F32", (hidden,))]
    for i in range(layers):
        for part, shape in [
            ("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden)),
            ("attn_v", (hidden, hidden)), ("attn_output", (hidden, hidden)),
            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn)),
        ]:  # fmt: skip
            text.append((f"blk.{i}.{part}.weight", "Q4_0", shape))
        text += [(f"blk.{i}.{n}.weight", "F32", (hidden,)) for n in ("attn_norm", "ffn_norm")]
    width, mlp, tower_layers, positions = 1024, 4096, 23, 577
    vision = [
        ("v.patch_embd.weight", "F16", (width, 3, 14, 14)), ("v.class_embd", "F32", (width,)),
        ("v.position_embd.weight", "F16", (positions, width)),
        ("v.pre_ln.weight", "F32", (width,)), ("v.pre_ln.bias", "F32", (width,)),
        ("mm.0.weight", "F16", (hidden, width)), ("mm.0.bias", "F32", (hidden,)),
        ("mm.2.weight", "F16", (hidden, hidden)), ("mm.2.bias", "F32", (hidden,)),
    ]  # fmt: skip
    for i in range(tower_layers):
        for part, shape in [
            ("attn_q", (width, width)), ("attn_k", (width, width)), ("attn_v", (width, width)),
            ("attn_out", (width, width)), ("ffn_down", (mlp, width)), ("ffn_up", (width, mlp)),
        ]:  # fmt: skip
            vision.append((f"v.blk.{i}.{part}.weight", "F16", shape))
            vision.append((f"v.blk.{i}.{part}.bias", "F32", shape[:1]))
        for norm in ("ln1", "ln2"):
            vision += [(f"v.blk.{i}.{norm}.{k}", "F32", (width,)) for k in ("weight", "bias")]
    return text + vision


def computed_7b() -> dict:
    """`layout_bytes` of the real LLaVA-1.5-7B Q4_0 + f16 mmproj pair (tensor bytes only: the
    files' headers and vocabulary add about 1 MB)."""
    layout = layout_bytes(llava_7b_q4_0_tensors())
    return {
        **layout,
        "layout_ratio": layout["mlx"] / layout["file"],
        "load_peak_ratio": layout["peak"] / layout["file"],
    }


def decode_tps(model, processor, tokens: int) -> float:
    from mlx_llava import stream_generate

    prompt = processor.format_prompt("Describe the picture.")
    steps = list(stream_generate(model, processor, prompt, image=IMAGE, max_tokens=tokens))
    return steps[-1].generation_tps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--dtype",
        default="float32",
        help="of the scales and floats while decoding (float32: MLX's fast CPU quantized matmul)",
    )
    p.add_argument("--memory-of", type=Path, help=argparse.SUPPRESS)  # the child process
    p.add_argument("--computed-only", action="store_true", help="only the 7B pair's layout")
    p.add_argument("--llama-quantize", type=Path, help="also measure llama.cpp's own Q4_0 file")
    args = p.parse_args()
    if args.computed_only:
        print(json.dumps(computed_7b(), indent=2))
        return
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args.memory_of.with_name("mmproj.gguf"))))
        return
    from mlx_llava import QuantizeSpec, convert, load

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "ggml-model-q4_0.gguf"
        write_text_gguf(text, args.hidden, args.layers, args.ffn, args.vocab, args.heads)
        mmproj = Path(tmp) / "mmproj.gguf"
        write_mmproj(mmproj, args.hidden)
        memory = memory_of(text)
        if args.llama_quantize:  # llama.cpp's own Q4_0: its output tensor Q6_K
            real = Path(tmp) / "llama-quantize" / "ggml-model-q4_0.gguf"
            real.parent.mkdir()
            f32 = real.with_name("f32.gguf")
            write_text_gguf(f32, args.hidden, args.layers, args.ffn, args.vocab, args.heads, True)
            quantize = [str(args.llama_quantize), str(f32), str(real), "Q4_0"]
            subprocess.run(quantize, check=True, capture_output=True)
            f32.unlink()
            write_mmproj(real.with_name("mmproj.gguf"), args.hidden)
            memory_real = memory_of(real)
            layout = layout_bytes(gguf_tensors(real) + gguf_tensors(real.with_name("mmproj.gguf")))
            memory_real["types"] = sorted({kind for _, kind, _ in gguf_tensors(real)})
            memory_real["peak_computed_bytes"] = layout["peak"]
            memory_real["load_ratio_computed"] = layout["peak"] / memory_real["files_bytes"]
        q4 = QuantizeSpec(4, 64)
        ours = convert(text, Path(tmp) / "q4", args.dtype, q4, mmproj=mmproj, progress=False)
        models = {
            "gguf": load(text, mmproj=mmproj, dtype=args.dtype),
            "converted": load(ours, dtype=args.dtype),
        }
        tps: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.runs):
            for name, (model, processor) in models.items():
                tps[name].append(decode_tps(model, processor, args.tokens))
    gguf_tps, ours_tps = statistics.median(tps["gguf"]), statistics.median(tps["converted"])
    result = {
        "sizes": vars(args) | {"memory_of": None, "llama_quantize": bool(args.llama_quantize)},
        "memory": memory,
        "memory_llama_quantize_q4_0": memory_real if args.llama_quantize else None,
        "computed_llava_1_5_7b_q4_0": computed_7b(),
        "decode_tps": tps,
        "decode_ratio_gguf_vs_converted_4bit": gguf_tps / ours_tps,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
