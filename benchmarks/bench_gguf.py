"""A Q4_0 GGUF pair: peak memory against its files' size, and decode speed against the same
model converted by this project to 4-bit (same process, interleaved runs).

    python benchmarks/bench_gguf.py [--hidden 1024 --layers 8 --vocab 32000] [--runs 3]

The language model GGUF is written here with the gguf package (random weights quantized by its
reference Q4_0 quantizer, the fixtures' SentencePiece vocabulary, `llama.*` metadata as
llama.cpp writes it); the mmproj is the fixtures' tiny tower with a projector of the model's
width. Memory is measured in a fresh process: MLX's peak after `load` and after a short
generation, against the two files' bytes.
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


def write_text_gguf(path: Path, hidden: int, layers: int, ffn: int, vocab: int, heads: int):
    """A random Llama language model GGUF, every matrix Q4_0, with the fixtures' vocabulary."""
    import gguf

    source = gguf.GGUFReader(PAIR / "ggml-model-f16.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for name, field in source.fields.items():
        if name.startswith("tokenizer.") or name == "general.name":
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
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

    from mlx_llava import load, stream_generate

    model, processor = load(text, mmproj=mmproj)
    after_load = mx.get_peak_memory()
    prompt = processor.format_prompt("Describe the picture.")
    for _ in stream_generate(model, processor, prompt, image=IMAGE, max_tokens=16):
        pass
    files = text.stat().st_size + mmproj.stat().st_size
    return {
        "files_bytes": files,
        "peak_after_load_bytes": after_load,
        "peak_after_generate_bytes": mx.get_peak_memory(),
        "load_ratio": after_load / files,
        "generate_ratio": mx.get_peak_memory() / files,
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
    args = p.parse_args()
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args.memory_of.with_name("mmproj.gguf"))))
        return
    from mlx_llava import QuantizeSpec, convert, load

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "ggml-model-q4_0.gguf"
        write_text_gguf(text, args.hidden, args.layers, args.ffn, args.vocab, args.heads)
        mmproj = Path(tmp) / "mmproj.gguf"
        write_mmproj(mmproj, args.hidden)
        child = [sys.executable, __file__, "--memory-of", str(text)]
        memory = json.loads(subprocess.run(child, check=True, capture_output=True).stdout)
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
        "sizes": vars(args) | {"memory_of": None},
        "memory": memory,
        "decode_tps": tps,
        "decode_ratio_gguf_vs_converted_4bit": gguf_tps / ours_tps,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
