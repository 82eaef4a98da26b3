"""Constrained decoding against free decoding: time per token of the engine at batch 8.

    python benchmarks/bench_constrained.py                       # mid checkpoint, 32k tokenizer
    python benchmarks/bench_constrained.py --model /tmp/llava-mid --vocab 0 --runs 9

Eight text prompts decode together in one `BatchEngine` (the server's and `batch_generate`'s
core), greedy, once free and once with every row under a JSON schema of a few fields
(llguidance masks, computed while the model runs). Each run times `--steps` decoding steps
while all eight rows are still in the batch (after `--warmup` steps), so both sides time the
same batch size; runs alternate free / constrained (and which goes first). The result is the
ratio constrained / free of the seconds per step (= per token of each row): its median and
spread over the runs, in wall-clock time and in the process's CPU time (all its threads: MLX's
CPU backend and llguidance's included), which a machine shared with other work disturbs less.

Without `--model`, the mid random checkpoint of `make_checkpoint.py` is written to a temporary
folder. Its tokenizer has 384 tokens, which makes llguidance's masks unrealistically cheap:
`--vocab 32000` (the default) swaps in a byte-fallback BPE tokenizer of Llama's size, trained on
random words (`llava_testing.tokenizer_builder`), so that the mask walks a real-sized vocabulary.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlx_llava import load
from mlx_llava.decoding import BatchEngine, make_row
from mlx_llava.prompt import encode_prompt, prompt_embeddings
from mlx_llava.sampling import ResponseFormat, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "colour": {"enum": ["red", "green", "blue", "yellow"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 1000},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
    },
    "required": ["name", "colour", "count", "tags"],
}
QUESTIONS = [
    "Describe the picture.",
    "What colour is the ball?",
    "How many cats are there?",
    "Name the objects you see.",
    "Where was this taken?",
    "Is it day or night?",
    "What is the man holding?",
    "Summarise the scene in JSON.",
]


def with_big_tokenizer(folder: Path, out: Path, vocab: int) -> Path:
    """A copy of `folder` whose tokenizer has `vocab` tokens (random-word BPE, byte fallback),
    `<image>` and `<pad>` behind them as llava-hf has, the config's ids to match."""
    from llava_testing.tokenizer_builder import build_tokenizer

    shutil.copytree(folder, out)
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(60000)]
    corpus = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    tokenizer = build_tokenizer(out, corpus=corpus, vocab_size=vocab)
    config = json.loads((out / "config.json").read_text())
    if vocab + 2 > config["text_config"]["vocab_size"]:
        raise SystemExit(f"--vocab {vocab} is more than the model's {config['text_config']}")
    config["image_token_index"] = tokenizer.convert_tokens_to_ids("<image>")
    config["pad_token_id"] = tokenizer.convert_tokens_to_ids("<pad>")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def time_per_step(model, processor, params: SamplingParams, warmup: int, steps: int):
    """(wall seconds per step over `steps` steps with all 8 rows in the batch, CPU seconds
    per step, steps timed, the rows)."""
    engine = BatchEngine(model)
    rows = []
    for question in QUESTIONS:
        prompt = processor.format_prompt(question, 0)
        input_ids, pixel_values, keys, _ = encode_prompt(model, processor, prompt, [])
        row = make_row(model, processor, input_ids[0], params, keys)
        engine.add(row, prompt_embeddings(model, input_ids, pixel_values, 0))
        rows.append(row)
    for _ in range(warmup):
        engine.step()
    mx.synchronize()
    timed = 0
    tic, cpu = time.perf_counter(), time.process_time()
    while timed < steps and len(engine.rows) == len(rows):
        engine.step()
        timed += 1
    mx.synchronize()
    elapsed, cpu = time.perf_counter() - tic, time.process_time() - cpu
    engine.finish()
    return elapsed / max(timed, 1), cpu / max(timed, 1), timed, rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a checkpoint (default: the mid random one)")
    p.add_argument("--vocab", type=int, default=32000, help="tokenizer size (0: the model's)")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else None
        if folder is None:
            from make_checkpoint import make_checkpoint

            folder = make_checkpoint(Path(tmp) / "mid", "mid")
        if args.vocab:
            folder = with_big_tokenizer(folder, Path(tmp) / "big-vocab", args.vocab)
        model, processor = load(folder, dtype=args.dtype)
        tokens = len(processor.tokenizer)
        vocab = model.config.text_config.vocab_size
        print(f"model {folder.name}: vocab {vocab}, tokenizer {tokens}")

        budget = args.warmup + args.steps + 8
        free = SamplingParams(max_tokens=budget)
        constrained = free.replace(response_format=ResponseFormat.json_schema(SCHEMA))
        time_per_step(model, processor, free, 2, 4)  # compile and warm up both paths
        time_per_step(model, processor, constrained, 2, 4)
        results = []
        for run in range(args.runs):
            order = [("free", free), ("constrained", constrained)]
            measured = {}
            for name, params in order if run % 2 == 0 else order[::-1]:
                measured[name] = time_per_step(model, processor, params, args.warmup, args.steps)
            t_free, c_free, n_free, _ = measured["free"]
            t_json, c_json, n_json, rows = measured["constrained"]
            ratio, cpu_ratio = t_json / t_free, c_json / c_free
            results.append({"free_ms": t_free * 1e3, "constrained_ms": t_json * 1e3,
                            "free_cpu_ms": c_free * 1e3, "constrained_cpu_ms": c_json * 1e3,
                            "steps": [n_free, n_json], "ratio": ratio,
                            "cpu_ratio": cpu_ratio})  # fmt: skip
            print(
                f"run {run}: free {t_free * 1e3:.2f} ms/step ({n_free} steps), constrained "
                f"{t_json * 1e3:.2f} ms/step ({n_json} steps), ratio {ratio:.3f}; CPU time "
                f"{c_free * 1e3:.2f} vs {c_json * 1e3:.2f} ms/step, ratio {cpu_ratio:.3f}",
                flush=True,
            )
        print("a constrained answer:", rows[0].text[:120])

    ratios = [r["ratio"] for r in results]
    cpu_ratios = [r["cpu_ratio"] for r in results]
    summary = {
        "batch": len(QUESTIONS),
        "tokenizer": tokens,
        "runs": len(ratios),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_stdev": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "cpu_ratio_min": min(cpu_ratios),
        "cpu_ratio_max": max(cpu_ratios),
        "free_ms_median": statistics.median(r["free_ms"] for r in results),
        "constrained_ms_median": statistics.median(r["constrained_ms"] for r in results),
        "device": str(mx.default_device()),
        "results": results,
    }
    print(
        f"constrained / free time per token at batch {summary['batch']}: median "
        f"{summary['ratio_median']:.3f} (min {summary['ratio_min']:.3f}, max "
        f"{summary['ratio_max']:.3f}, stdev {summary['ratio_stdev']:.3f}, {len(ratios)} runs); "
        f"CPU time: median {summary['cpu_ratio_median']:.3f} (min {summary['cpu_ratio_min']:.3f}, "
        f"max {summary['cpu_ratio_max']:.3f})"
    )
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
