"""Data- and pipeline-parallel figures on local ranks (`mlx.launch`, ring over 127.0.0.1).

    python benchmarks/bench_distributed.py --out benchmarks/results/distributed_cpu.json

Each job runs as one process and as `--ranks` ranks of this machine, alternately, `--repeats`
times; the medians are compared (ratio > 1: the ranks are faster):

- training: optimizer steps/s of train.py, stage 2 from the demo model on shapes-world
  conversations, global batch `--batch-size`, compiled step; the first `WARMUP` iterations
  (compilation) are left out. Steps/s comes from the trainer's own per-iteration tokens/s and
  the tokens of each global batch (recomputed here exactly as the trainer draws them).
- captioning: captions/s of caption.py over `--pictures` shapes-world pictures (demo model,
  batch 8), as its progress line reports it (from the first batch on, model loading excluded).
- pipeline: generate.py --pipeline on the `deep` random checkpoint (make_checkpoint.py: 16
  decoder layers of width 1024 hold 3/4 of its 1.1 GB), converted to an MLX float32 folder:
  prompt and decode tokens/s of rank 0, and every rank's peak memory against one process's.
- server: the server (`--pipeline` on the ranks) answering `--server-requests` questions about
  a picture, one at a time, on the `mid` checkpoint (8 decoder layers of width 512): decode
  tokens/s from its Ollama timings (`eval_count` / `eval_duration`), against one process's
  server and against generate.py --pipeline on the same ranks (the pipeline without the
  server's per-step turn broadcast).

On one machine the ranks share its cores (and its memory bandwidth): the figures show what the
ring costs, not what N Macs gain; docs/distributed.md turns them into estimates for 2 and 4 Macs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from make_checkpoint import make_checkpoint  # a sibling: the script's folder is on sys.path

from llava_testing.launching import free_port_pair

ROOT = Path(__file__).resolve().parents[1]

WARMUP = 2
TRAIN_ITERS = 10
PICTURE = ROOT / "examples" / "red_circle.png"


def run(ranks: int, argv: list[str], stdin: str = "") -> tuple[str, str]:
    """python ARGV as one process (ranks 1) or under mlx.launch; (stdout, stderr)."""
    command = [sys.executable, *argv]
    if ranks > 1:
        launcher = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
        port = str(free_port_pair())
        command = [launcher, "-n", str(ranks), "--backend", "ring", "--starting-port", port]
        command += ["--", sys.executable, *argv]
    done = subprocess.run(command, cwd=ROOT, input=stdin, capture_output=True, text=True)
    if done.returncode or re.search(r"rank \d+ (exited with code [1-9]|was killed)", done.stderr):
        raise RuntimeError(f"{' '.join(argv[:1])} on {ranks} rank(s) failed:\n{done.stderr}")
    return done.stdout, done.stderr


# Training ------------------------------------------------------------------------------------


def batch_tokens(data: Path, batch_size: int, iters: int, seed: int = 0) -> list[int]:
    """Input tokens of each global batch, drawn as the trainer draws them (grad_accum 1)."""
    from mlx_llava import load
    from mlx_llava.conversation import get_template
    from mlx_llava.train.data import BadSamplePolicy, batch_indices, prepare_samples, read_records

    _, processor = load("demo")
    records = read_records(data)
    samples = prepare_samples(
        records, processor, get_template("vicuna_v1"), data.parent, 512, BadSamplePolicy()
    )
    return [
        sum(len(samples[i]) - 1 for i in batch_indices(len(samples), batch_size, seed, k))
        for k in range(iters)
    ]


def train_steps_per_s(ranks: int, data: Path, out: Path, batch_size: int, tokens: list) -> float:
    shutil.rmtree(out, ignore_errors=True)
    argv = ["train.py", "--model", "demo", "--stage", "finetune", "--data", str(data)]
    argv += ["--output", str(out), "--iters", str(TRAIN_ITERS), "--batch-size", str(batch_size)]
    argv += ["--log-every", "1", "--learning-rate", "1e-5"]
    run(ranks, argv)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    seconds = [tokens[e["iter"] - 1] / e["tokens_per_sec"] for e in log if e["iter"] > WARMUP]
    return len(seconds) / sum(seconds)


# Captioning ----------------------------------------------------------------------------------


def captions_per_s(ranks: int, images: Path, out: Path) -> float:
    out.unlink(missing_ok=True)
    argv = ["caption.py", "--model", "demo", "--image-dir", str(images), "--output", str(out)]
    _, err = run(ranks, argv + ["--batch-size", "8", "--max-tokens", "16"])
    rates = re.findall(r"captioned (\d+)/(\d+) \(([\d.]+) images/s", err)
    done, total, rate = rates[-1]
    assert done == total, err
    return float(rate)


# Pipeline ------------------------------------------------------------------------------------

RANK_LINE = re.compile(
    r"rank (\d+): (layers [^,]+(?:, vision tower and projector)?), peak memory ([\d.]+) (KB|MB|GB)"
)
UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9}


def pipeline_figures(ranks: int, model: Path, max_tokens: int) -> dict:
    argv = ["generate.py", "--model", str(model), "--image", str(PICTURE), "--prompt"]
    argv += ["Describe this image.", "--max-tokens", str(max_tokens), "--pipeline", "--verbose"]
    _, err = run(ranks, argv)
    prompt = re.search(r"prompt: (\d+) tokens, ([\d.]+) tokens/s", err)
    decode = re.search(r"generation: (\d+) tokens, ([\d.]+) tokens/s", err)
    memory = {
        int(m[1]): {"holds": m[2], "peak_bytes": float(m[3]) * UNITS[m[4]]}
        for m in RANK_LINE.finditer(err)
    }
    assert len(memory) == ranks and int(decode[1]) == max_tokens, err
    return {
        "prompt_tokens": int(prompt[1]),
        "prompt_tps": float(prompt[2]),
        "decode_tps": float(decode[2]),
        "ranks": memory,
    }


@contextlib.contextmanager
def serving(ranks: int, model: Path, timeout: float = 600.0):
    """The server of `model` as one process (ranks 1) or on `ranks` ranks (--pipeline); its URL.
    Stopped as Ctrl-C would (SIGINT to the launch)."""
    import httpx
    from bench_server import free_port

    port = free_port()
    argv = ["-m", "mlx_llava.server", "--model", str(model), "--port", str(port)]
    argv += ["--log-level", "warning"] + (["--pipeline"] if ranks > 1 else [])
    command = [sys.executable, *argv]
    if ranks > 1:
        launcher = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
        command = [launcher, "-n", str(ranks), "--backend", "ring", "--starting-port"]
        command += [str(free_port_pair()), "--", sys.executable, *argv]
    process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {ranks} rank(s) did not start")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def server_decode_tps(ranks: int, model: Path, max_tokens: int, requests: int) -> list[float]:
    """Decode tokens/s of each of `requests` greedy answers (one at a time, different
    questions about one picture), from the server's own timings."""
    import httpx

    picture = base64.b64encode(PICTURE.read_bytes()).decode()
    speeds = []
    with serving(ranks, model) as url:
        for i in range(requests + 1):  # the first one warms up
            body = {
                "prompt": f"Question {i}: describe this image.",
                "images": [picture],
                "stream": False,
                "options": {"num_predict": max_tokens, "temperature": 0},
            }
            answer = httpx.post(url + "/api/generate", json=body, timeout=600).json()
            assert answer["eval_count"] == max_tokens, answer
            if i:  # (eval_duration runs from the first token: max_tokens - 1 steps)
                speeds.append((answer["eval_count"] - 1) / answer["eval_duration"] * 1e9)
    return speeds


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv=None) -> None:
    import mlx.core as mx

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the results here as JSON")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="global training batch")
    p.add_argument("--pictures", type=int, default=48, help="pictures to caption")
    p.add_argument("--max-tokens", type=int, default=32, help="pipeline decode length")
    p.add_argument("--server-requests", type=int, default=4, help="answers per server run")
    p.add_argument("--jobs", default="train,caption,pipeline,server")
    args = p.parse_args(argv)
    jobs = args.jobs.split(",")
    from mlx_llava.data.shapes import generate_dataset

    results = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "mlx": mx.__version__,
        "ranks": args.ranks,
        "repeats": args.repeats,
        "note": "all ranks on this one machine, sharing its cores",
        "LD_PRELOAD": os.environ.get("LD_PRELOAD", ""),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_dataset(tmp / "shapes", args.pictures, seed=7, min_size=48, max_size=160)
        data, images = tmp / "shapes" / "finetune.json", tmp / "shapes" / "images"
        if "train" in jobs:
            tokens = batch_tokens(data, args.batch_size, TRAIN_ITERS)
            runs = {1: [], args.ranks: []}
            for _ in range(args.repeats):
                for n in runs:
                    runs[n].append(train_steps_per_s(n, data, tmp / "out", args.batch_size, tokens))
                    print(f"train, {n} rank(s): {runs[n][-1]:.3f} steps/s", file=sys.stderr)
            one, many = (statistics.median(runs[n]) for n in runs)
            results["train"] = {
                "batch_size": args.batch_size,
                "tokens_per_step": statistics.mean(tokens[WARMUP:]),
                "steps_per_s": {str(n): runs[n] for n in runs},
                "ratio": many / one,
            }
        if "caption" in jobs:
            runs = {1: [], args.ranks: []}
            for _ in range(args.repeats):
                for n in runs:
                    runs[n].append(captions_per_s(n, images, tmp / "captions.jsonl"))
                    print(f"caption, {n} rank(s): {runs[n][-1]:.2f} captions/s", file=sys.stderr)
            one, many = (statistics.median(runs[n]) for n in runs)
            results["caption"] = {
                "pictures": args.pictures,
                "captions_per_s": {str(n): runs[n] for n in runs},
                "ratio": many / one,
            }
        if "pipeline" in jobs:
            from mlx_llava.convert import convert

            model = convert(make_checkpoint(tmp / "deep-hf", "deep"), tmp / "deep", "float32")
            size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
            runs = {1: [], args.ranks: []}
            for _ in range(args.repeats):
                for n in runs:
                    runs[n].append(pipeline_figures(n, model, args.max_tokens))
                    print(f"pipeline, {n} rank(s): {runs[n][-1]}", file=sys.stderr)
            one, many = runs[1], runs[args.ranks]
            peak_one = statistics.median(r["ranks"][0]["peak_bytes"] for r in one)
            results["pipeline"] = {
                "checkpoint_bytes": size,
                "runs": {str(n): runs[n] for n in runs},
                "decode_ratio": median_of(many, "decode_tps") / median_of(one, "decode_tps"),
                "prompt_ratio": median_of(many, "prompt_tps") / median_of(one, "prompt_tps"),
                "peak_memory_ratio": {
                    str(r): statistics.median(x["ranks"][r]["peak_bytes"] for x in many) / peak_one
                    for r in range(args.ranks)
                },
            }
        if "server" in jobs:
            from mlx_llava.convert import convert

            model = convert(make_checkpoint(tmp / "mid-hf", "mid"), tmp / "mid", "float32")
            n = args.ranks
            runs = {"server 1": [], f"server {n}": [], f"generate.py {n}": []}
            for _ in range(args.repeats):
                for ranks in (1, n):
                    speeds = server_decode_tps(ranks, model, args.max_tokens, args.server_requests)
                    runs[f"server {ranks}"].append(statistics.median(speeds))
                figures = pipeline_figures(n, model, args.max_tokens)
                runs[f"generate.py {n}"].append(figures["decode_tps"])
                print(f"server: { {k: v[-1] for k, v in runs.items()} }", file=sys.stderr)
            medians = {k: statistics.median(v) for k, v in runs.items()}
            results["server"] = {
                "checkpoint": "mid",
                "max_tokens": args.max_tokens,
                "decode_tps": runs,
                "ratio_to_generate_pipeline": medians[f"server {n}"] / medians[f"generate.py {n}"],
                "ratio_to_one_process": medians[f"server {n}"] / medians["server 1"],
            }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
