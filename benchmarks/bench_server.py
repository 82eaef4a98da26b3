"""Serving benchmark: mlx-llava's server against mlx-vlm's, same checkpoint, same machine.

    python benchmarks/make_checkpoint.py --out /tmp/llava-mid                # ~5 s, 254 MB
    python -m venv /tmp/vlm && /tmp/vlm/bin/pip install mlx-vlm "mlx[cpu]"   # a venv of its own
    python benchmarks/bench_server.py --model /tmp/llava-mid --vlm-python /tmp/vlm/bin/python

Both servers run as processes on 127.0.0.1 with the same llava-hf folder (float32, greedy,
the same `max_tokens`), and are driven alternately (interleaved runs, the order swapped each
run) by the same load:

- **load**: `--clients` (8) clients stream at once, each a conversation about a picture of its
  own (sizes and colours vary): turn 1 is the picture and a question, turn 2 resends the
  conversation with the answer and a follow-up. Reported: aggregate tokens/s (completion
  tokens of all requests / wall time of the load), time to first token (TTFT: request sent ->
  first content chunk) p50 and p95 over all requests, and per turn.
- **chat**: one client alone, `--chat-pictures` conversations: turn-2 TTFT / turn-1 TTFT, the
  cost of a follow-up when the server keeps the conversation's KV cache.
- **shared** (`--scenario shared`, instead of load and chat): `--clients` clients at once ask
  two questions each, one after the other, about `--pictures` (4) new pictures shared among
  them (client i about picture i mod 4): what apps that turn pictures into data do. Reported as
  for the load: aggregate tokens/s and TTFT p50 / p95.

Every run uses new pictures, so nothing is cached across runs. Results: a table on stdout and
`--out` JSON (per run, medians, ranges and our/their ratios).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx
from bench import synthetic_image  # a sibling: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is in the picture?",
    "Describe the colours of this image in detail.",
    "Is the picture bright or dark?",
    "What could this pattern be used for? Answer briefly.",
    "Which colour covers most of the picture?",
    "Describe this image.",
    "Is there any text in the image?",
    "What is unusual about this picture?",
]
FOLLOW_UP = "Tell me more about it."
SIZES = [(640, 480), (480, 640), (800, 600), (512, 512), (1024, 768), (300, 400), (720, 540)]


@dataclass
class Server:
    name: str
    command: list[str]
    port: int
    env: dict = field(default_factory=dict)
    process: Optional[subprocess.Popen] = None
    log: Optional[Path] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path, timeout: float) -> None:
        self.log = log_dir / f"{self.name}.log"
        out = open(self.log, "wb")
        self.process = subprocess.Popen(
            self.command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start in {timeout} s: see {self.log}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


def text_head_copy(src: Path, dst: Path) -> Path:
    """A copy of a random checkpoint whose lm_head rows are zero for every id the tokenizer
    cannot spell (the padded vocabulary, `<image>`, `<pad>`, `<s>`, `<unk>`; make_checkpoint
    already zeroes `</s>`): its greedy answers are then text, as a trained model's, so that
    both servers stream content chunks (a random model over 32064 ids with a 386-piece tokenizer
    answers in ids that have no text). The decoding cost is unchanged."""
    import shutil

    import mlx.core as mx
    from transformers import AutoTokenizer

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    tokenizer = AutoTokenizer.from_pretrained(src)
    specials = set(tokenizer.all_special_ids)
    spelled = [i for i in tokenizer.get_vocab().values() if i not in specials]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    name = next(k for k in index["weight_map"] if k.endswith("lm_head.weight"))
    shard = dst / index["weight_map"][name]
    tensors = mx.load(str(shard))
    keep = mx.zeros((tensors[name].shape[0], 1), dtype=mx.bool_)
    keep[mx.array(spelled)] = True
    tensors[name] = mx.where(keep, tensors[name], 0)
    mx.save_safetensors(str(shard), tensors, metadata={"format": "pt"})
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(seed: int) -> str:
    buffer = io.BytesIO()
    synthetic_image(seed, SIZES[seed % len(SIZES)]).save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Result:
    ttft: float  # seconds to the first content chunk
    total: float  # seconds to the end of the stream
    tokens: int  # completion tokens (the usage chunk's count)
    text: str
    start: float
    end: float


def stream(server: Server, model: str, messages: list, max_tokens: int) -> Result:
    """One streamed chat completion."""
    body = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    start = time.perf_counter()
    ttft, text, tokens, chunks = None, "", None, 0
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=900) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{server.name}: {r.status_code} {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens")
            for choice in chunk.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    chunks += 1
                    text += delta
                    if ttft is None:
                        ttft = time.perf_counter() - start
    end = time.perf_counter()
    if ttft is None:
        raise RuntimeError(f"{server.name}: an empty answer")
    return Result(ttft, end - start, tokens if tokens is not None else chunks, text, start, end)


def conversation(server, model, picture: str, question: str, max_tokens: int) -> list[Result]:
    """Turn 1 (picture + question), then turn 2 (the conversation + a follow-up)."""
    first = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": picture}},
                {"type": "text", "text": question},
            ],
        }
    ]
    one = stream(server, model, first, max_tokens)
    second = first + [
        {"role": "assistant", "content": one.text},
        {"role": "user", "content": FOLLOW_UP},
    ]
    return [one, stream(server, model, second, max_tokens)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def run_clients(clients: int, client) -> list[list[Result]]:
    """`client(i)` -> its results, for `clients` clients started together at a barrier."""
    results: list[list[Result]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = client(i)
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            errors.append(f"client {i}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3600)
    if errors:
        raise RuntimeError("; ".join(errors))
    return results


def load_figures(results: list[list[Result]]) -> dict:
    """Aggregate tokens/s over the wall time of all requests, TTFT p50 and p95."""
    done = [r for rs in results for r in rs]
    wall = max(r.end for r in done) - min(r.start for r in done)
    ttfts = [r.ttft for r in done]
    tokens = sum(r.tokens for r in done)
    return {
        "requests": len(done),
        "completion_tokens": tokens,
        "wall_s": wall,
        "aggregate_tps": tokens / wall,
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95),
    }


def run_load(server: Server, model: str, clients: int, seed: int, max_tokens: int) -> dict:
    """`clients` conversations at once; aggregate tokens/s and TTFT percentiles."""

    def client(i: int) -> list[Result]:
        question = QUESTIONS[i % len(QUESTIONS)]
        return conversation(server, model, data_url(seed + i), question, max_tokens)

    results = run_clients(clients, client)
    return load_figures(results) | {
        "turn1_ttft_p50_s": percentile([pair[0].ttft for pair in results], 0.5),
        "turn2_ttft_p50_s": percentile([pair[1].ttft for pair in results], 0.5),
    }


def run_shared(
    server: Server, model: str, clients: int, pictures: int, seed: int, max_tokens: int
) -> dict:
    """`clients` clients at once, each asking two questions about one of `pictures` pictures."""
    urls = [data_url(seed + k) for k in range(pictures)]

    def client(i: int) -> list[Result]:
        answers = []
        for q in range(2):
            question = QUESTIONS[(i + 3 * q) % len(QUESTIONS)]
            message = {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": urls[i % pictures]}},
                    {"type": "text", "text": question},
                ],
            }
            answers.append(stream(server, model, [message], max_tokens))
        return answers

    return load_figures(run_clients(clients, client))


def run_chat(server: Server, model: str, pictures: int, seed: int, max_tokens: int) -> dict:
    """One client alone: turn-2 TTFT / turn-1 TTFT over a few conversations."""
    first, second = [], []
    for i in range(pictures):
        one, two = conversation(server, model, data_url(seed + i), QUESTIONS[i], max_tokens)
        first.append(one.ttft)
        second.append(two.ttft)
    return {
        "turn1_ttft_s": statistics.median(first),
        "turn2_ttft_s": statistics.median(second),
        "turn2_over_turn1": statistics.median(b / a for a, b in zip(first, second)),
    }


def summarize(runs: list[dict], names: list[str]) -> dict:
    """Medians and ranges per server, and ours/theirs ratios (> 1: ours is better)."""
    out: dict = {}
    for name in names:
        rows = [r[name] for r in runs if name in r]
        keys = [k for k, v in rows[0]["load"].items() if isinstance(v, float)]
        out[name] = {f"load.{k}": statistics.median(r["load"][k] for r in rows) for k in keys} | {
            f"chat.{k}": statistics.median(r["chat"][k] for r in rows) for k in rows[0]["chat"]
        }
    if len(names) == 2:
        ours, theirs = names
        ratios = {
            "aggregate_tps": lambda r: r[ours]["load"]["aggregate_tps"]
            / r[theirs]["load"]["aggregate_tps"],
            "ttft_p95": lambda r: r[theirs]["load"]["ttft_p95_s"] / r[ours]["load"]["ttft_p95_s"],
            "ttft_p50": lambda r: r[theirs]["load"]["ttft_p50_s"] / r[ours]["load"]["ttft_p50_s"],
        }
        both = [r for r in runs if ours in r and theirs in r]
        out["ratios"] = {
            k: {
                "median": statistics.median(f(r) for r in both),
                "min": min(f(r) for r in both),
                "max": max(f(r) for r in both),
            }
            for k, f in ratios.items()
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="a llava-hf folder both servers can load")
    p.add_argument("--vlm-python", default=None, help="python of a venv with mlx-vlm installed")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--chat-pictures", type=int, default=3)
    p.add_argument("--scenario", choices=["conversations", "shared"], default="conversations")
    p.add_argument("--pictures", type=int, default=4, help="shared: pictures among the clients")
    p.add_argument("--ours-flags", default="", help="extra flags for our server")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args()

    log_dir = Path(tempfile.mkdtemp(prefix="bench-server-"))
    model = str(text_head_copy(Path(args.model).resolve(), log_dir / "model"))
    ours = Server(
        "mlx-llava",
        [sys.executable, "-m", "mlx_llava.server", "--model", model, "--dtype", "float32"]
        + ["--port", "0", "--max-batch", str(args.clients), "--log-level", "warning"]
        + args.ours_flags.split(),
        0,
    )
    servers = [ours]
    if args.vlm_python:
        servers.append(
            Server(
                "mlx-vlm",
                [args.vlm_python, "-m", "mlx_vlm.server", "--model", model, "--host", "127.0.0.1"]
                + ["--port", "0", "--log-level", "WARNING"],
                0,
            )
        )
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": vars(args),
        "runs": [],
    }
    try:
        for server in servers:
            server.port = free_port()
            server.command[server.command.index("--port") + 1] = str(server.port)
            server.start(log_dir, args.startup_timeout)
            stream(server, model, [{"role": "user", "content": "Hello"}], 4)  # warm up
            conversation(server, model, data_url(10_000), QUESTIONS[0], 4)
            print(f"{server.name} is up on {server.url}", file=sys.stderr)
        for run in range(args.runs):
            order = servers if run % 2 == 0 else servers[::-1]
            results = {}
            for server in order:
                seed = 1000 * (run + 1)
                tic = time.perf_counter()
                if args.scenario == "shared":
                    load = run_shared(
                        server, model, args.clients, args.pictures, seed, args.max_tokens
                    )
                    chat = {}
                else:
                    load = run_load(server, model, args.clients, seed, args.max_tokens)
                    chat = run_chat(server, model, args.chat_pictures, seed + 500, args.max_tokens)
                results[server.name] = {"load": load, "chat": chat}
                turns = f", chat turn 2/1 {chat['turn2_over_turn1']:.3f}" if chat else ""
                print(
                    f"run {run + 1} {server.name}: {load['aggregate_tps']:.2f} tok/s, TTFT p50 "
                    f"{load['ttft_p50_s']:.2f} s p95 {load['ttft_p95_s']:.2f} s{turns} "
                    f"({time.perf_counter() - tic:.0f} s)",
                    file=sys.stderr,
                )
            report["runs"].append(results)
            report["summary"] = summarize(report["runs"], [s.name for s in servers])
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        for server in servers:
            server.stop()
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
