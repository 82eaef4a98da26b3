"""Benchmark mlx-llava: load, preprocessing, vision, prefill, decode, memory, and the features
that reuse work (prefix cache, chat, batching); optionally against mlx-vlm in the same process.

    python benchmarks/make_checkpoint.py --out /tmp/llava-mid
    mlx-llava-convert --hf-path /tmp/llava-mid --mlx-path /tmp/llava-mid-mlx --dtype float32
    python benchmarks/bench.py --model /tmp/llava-mid-mlx --compare mlx-vlm --quality

Every number is the median of `--runs` runs; with `--compare mlx-vlm` the two libraries run
interleaved (ours then theirs, then theirs then ours, ...) on the same weights, prompt and
picture, and the ratios are ours / theirs (for times: theirs / ours, so > 1 means we are faster;
see `RATIO_NOTES`). Greedy decoding of the random checkpoints never emits `</s>` (make_checkpoint
zeroes its lm_head row), so every run decodes exactly `--max-tokens` tokens.

Memory: both models live in one process, so peaks are reported as the growth of MLX's active
memory during a phase (`mx.reset_peak_memory` before it, `mx.get_peak_memory` - active memory at
its start after it): the weights a load adds, the working set (activations, KV cache) a
generation adds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map
from PIL import Image

from mlx_llava import PromptCache, stream_generate
from mlx_llava.convert import DTYPES, quantized_paths
from mlx_llava.loader import is_mlx_folder, load

DEFAULT_RUNS = 3
DEFAULT_MAX_TOKENS = 64
ANSWER_TOKENS = 8  # short answers for the prefix-reuse and chat sections (VQA style)
BATCH_SIZE = 8
SECTIONS = ("single", "bandwidth", "kvbits", "prefix", "chat", "batch", "tiles", "quality")
DEFAULT_SECTIONS = "single,bandwidth,kvbits,prefix,chat,batch"
QUESTION = "What is in the picture?"
QUESTIONS = (
    "What is in the picture? Answer the question using a single word or phrase.",
    "What colour is the sky? Answer the question using a single word or phrase.",
    "How many animals are there? Answer the question using a single word or phrase.",
    "Is there a tree in the picture? Answer the question using a single word or phrase.",
    "Where is the dog? Answer the question using a single word or phrase.",
)
CAPTION = "Describe the picture in one sentence."
FILLER = " Please look closely at the colours, the shapes, the animals and the background."
RATIO_NOTES = {
    "speed": "ours / theirs for rates (tokens/s); theirs / ours for times: > 1 = we are faster",
    "memory": "ours / theirs: < 1 = we use less",
}


# ---------------------------------------------------------------------------------------------
# Helpers


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def synthetic_image(seed: int = 0, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A deterministic smooth picture (blended sinusoids), so the benchmark runs offline."""
    rng = np.random.RandomState(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = x / w, y / h
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 6.3)
        channels.append(0.5 + 0.4 * np.sin(2 * np.pi * (fx * x + fy * y) + phase))
    pixels = (np.stack(channels, axis=-1) * 255).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


@contextmanager
def memory_growth(out: dict, key: str):
    """Record in `out[key]` how far MLX's active memory rose above its level at the start."""
    mx.synchronize()
    gc.collect()
    mx.clear_cache()
    start = mx.get_active_memory()
    mx.reset_peak_memory()
    yield
    mx.synchronize()
    out[key] = max(mx.get_peak_memory() - start, 0)


def timed(fn: Callable[..., Any], *args) -> tuple[Any, float]:
    """fn(*args) and its wall time, its result evaluated."""
    tic = time.perf_counter()
    result = fn(*args)
    if isinstance(result, (mx.array, list, tuple, dict)):
        mx.eval(result)
    return result, time.perf_counter() - tic


def versions() -> dict:
    out = {}
    for name in ("mlx", "mlx-lm", "mlx-vlm", "mlx-llava", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_name() -> str:
    device = mx.default_device()
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    name = info.get("device_name") or platform.processor() or platform.machine()
    return f"{device.type.name if hasattr(device.type, 'name') else device} ({name})"


def weight_bytes(params) -> int:
    return sum(v.nbytes for _, v in tree_flatten(params))


def make_prompt(processor, question: str, prompt_len: Optional[int], image=None) -> str:
    """The checkpoint's prompt for `question`, padded with filler text up to `prompt_len`
    tokens (image tokens included, `image`'s for LLaVA-NeXT) when given."""
    prompt = processor.format_prompt(question)
    if prompt_len:
        text = question
        sizes = None if image is None else [(image.height, image.width)]
        while len(processor.tokenize(prompt, image_sizes=sizes)) < prompt_len:
            text += FILLER
            prompt = processor.format_prompt(text)
    return prompt


# ---------------------------------------------------------------------------------------------
# The two libraries behind one interface


@dataclass
class GenerationRun:
    tokens: list[int]
    prompt_tokens: int
    ttft: float  # seconds from the call (prompt text + PIL picture) to the first token
    decode_tps: float  # tokens after the first / their time
    total: float


@dataclass
class Library:
    """What the benchmark asks of a library; `Ours` and `MlxVlm` implement it."""

    name: str
    path: Path
    dtype: Optional[str]
    model: Any = None
    processor: Any = None

    def unload(self) -> None:
        self.model = self.processor = None
        gc.collect()
        mx.clear_cache()


class Ours(Library):
    def load(self) -> None:
        self.model, self.processor = load(self.path, dtype=self.dtype)

    def preprocess(self, prompt: str, image) -> dict:
        return self.processor(prompt, [image])

    def encode(self, inputs: dict) -> mx.array:
        return self.model.get_input_embeddings(
            inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"]
        )

    def generate(self, prompt: str, image, max_tokens: int, **kwargs) -> GenerationRun:
        tokens, first, prompt_tokens = [], 0.0, 0
        tic = time.perf_counter()
        for r in stream_generate(
            self.model, self.processor, prompt, image=image, max_tokens=max_tokens, **kwargs
        ):
            if not tokens:
                first = time.perf_counter()
                prompt_tokens = r.prompt_tokens
            tokens.append(r.token)
        end = time.perf_counter()
        return _run(tokens, prompt_tokens, tic, first, end)


class MlxVlm(Library):
    """mlx-vlm's llava (or llava_next) model: its forward with `mask=None` through
    `mlx_vlm.generate.ar.generate_step`, and its processor called directly
    (`mlx_vlm.utils.prepare_inputs` passes `padding=`, which transformers 5's image processor
    rejects)."""

    def load(self) -> None:
        from mlx_vlm.utils import load as vlm_load

        self.model, self.processor = vlm_load(str(self.path))
        if self.dtype:
            dtype = DTYPES[self.dtype]
            self.model.update(
                tree_map(
                    lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v,
                    self.model.parameters(),
                )
            )
            mx.eval(self.model.parameters())

    def preprocess(self, prompt: str, image) -> dict:
        return self.processor(text=prompt, images=[image])

    def encode(self, inputs: dict) -> mx.array:
        ids = mx.array(np.asarray(inputs["input_ids"]))
        pixels = mx.array(np.asarray(inputs["pixel_values"]))
        return self.model.get_input_embeddings(ids, pixels).inputs_embeds

    def logits(self, prompt: str, image) -> mx.array:
        """Logits [positions, vocab] of the prompt as this library runs it."""
        inputs = self.preprocess(prompt, image)
        embeddings = self.encode(inputs)
        ids = mx.array(np.asarray(inputs["input_ids"]))
        return self.model.language_model(ids, inputs_embeds=embeddings).logits[0]

    def generate(self, prompt: str, image, max_tokens: int) -> GenerationRun:
        from mlx_vlm.generate.ar import generate_step

        tokens, first = [], 0.0
        tic = time.perf_counter()
        inputs = self.preprocess(prompt, image)
        ids = mx.array(np.asarray(inputs["input_ids"]))
        pixels = mx.array(np.asarray(inputs["pixel_values"]))
        steps = generate_step(ids, self.model, pixels, None, max_tokens=max_tokens, temperature=0.0)
        for token, _ in steps:
            if not tokens:
                first = time.perf_counter()
            tokens.append(int(token))
        end = time.perf_counter()
        return _run(tokens, ids.shape[1], tic, first, end)


def _run(tokens, prompt_tokens, tic, first, end) -> GenerationRun:
    decode = (len(tokens) - 1) / (end - first) if len(tokens) > 1 and end > first else 0.0
    return GenerationRun(tokens, prompt_tokens, first - tic, decode, end - tic)


def mlx_vlm_folder(path: Path, scratch: Path) -> tuple[Path, str]:
    """A folder mlx-vlm can load holding the same weights as `path`, and how it was made.

    Our MLX folders name the vision tower `vision_tower.*`; mlx-vlm's llava wants
    `vision_tower.vision_model.*` (the hub's name). The copy renames those keys and nothing
    else: same tensors, same dtypes, same quantization.
    """
    if not is_mlx_folder(path):
        return path, "mlx-vlm loads the llava-hf source folder itself (same weights)"
    out = scratch / "mlx-vlm"
    out.mkdir()
    for f in path.iterdir():
        if f.suffix == ".safetensors":
            tensors = {_vlm_key(k): v for k, v in mx.load(str(f)).items()}
            mx.save_safetensors(str(out / f.name), tensors, metadata={"format": "mlx"})
        elif f.name == "model.safetensors.index.json":
            index = json.loads(f.read_text())
            index["weight_map"] = {_vlm_key(k): v for k, v in index["weight_map"].items()}
            (out / f.name).write_text(json.dumps(index))
        elif f.name == "config.json":
            config = json.loads(f.read_text())
            for key in ("quantization", "quantization_config"):
                if key in config:
                    config[key] = {_vlm_key(k): v for k, v in config[key].items()}
            (out / f.name).write_text(json.dumps(config))
        elif f.is_file():
            shutil.copy(f, out / f.name)
    return out, (
        "mlx-vlm cannot load our MLX folder (it wants vision_tower.vision_model.* keys): it "
        "loads a copy of it with those keys renamed (same tensors, dtypes and quantization)"
    )


def _vlm_key(key: str) -> str:
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key[len("vision_tower.") :]
    return key


# ---------------------------------------------------------------------------------------------
# Sections


def bench_single(libs: list[Library], args, image, prompt_of) -> dict:
    """Load, preprocessing, vision encode, TTFT / prefill / decode, memory; interleaved."""
    results = {lib.name: {k: [] for k in SINGLE_KEYS} for lib in libs}
    tokens = {}
    for lib in libs[1:]:  # an untimed first load (lazy imports), as ours had for the prompt
        lib.load()
        lib.unload()
    for run in range(args.runs):
        order = libs if run % 2 == 0 else libs[::-1]
        for lib in order:
            r = results[lib.name]
            mem: dict = {}
            if run < args.load_runs or lib.model is None:
                lib.unload()
                with memory_growth(mem, "load"):
                    _, seconds = timed(lib.load)
                r["load_s"].append(seconds)
                r["weights_bytes"].append(mem["load"])
            prompt = prompt_of(lib)
            if run == 0:  # warm-up: first-call costs (kernel builds, lazy imports)
                lib.generate(prompt, image, 2)
            pre = [timed(lib.preprocess, prompt, image)[1] for _ in range(5)]
            r["preprocess_s"].append(median(pre))
            inputs = lib.preprocess(prompt, image)
            r["vision_encode_s"].append(timed(lib.encode, inputs)[1])
            with memory_growth(mem, "generate"):
                g = lib.generate(prompt, image, args.max_tokens)
            r["ttft_s"].append(g.ttft)
            r["prefill_tps"].append(g.prompt_tokens / g.ttft)
            r["decode_tps"].append(g.decode_tps)
            r["generate_peak_bytes"].append(mem["generate"])
            r["prompt_tokens"].append(g.prompt_tokens)
            r["generated_tokens"].append(len(g.tokens))
            tokens[lib.name] = g.tokens
    out = {name: {k: median(v) for k, v in r.items()} for name, r in results.items()}
    if len(libs) == 2:
        a, b = (lib.name for lib in libs)
        out["same_tokens"] = tokens[a] == tokens[b]
    return out


SINGLE_KEYS = (
    "load_s",
    "weights_bytes",
    "preprocess_s",
    "vision_encode_s",
    "ttft_s",
    "prefill_tps",
    "decode_tps",
    "generate_peak_bytes",
    "prompt_tokens",
    "generated_tokens",
)
# (key, "time" or "rate" or "memory"): how ratios are formed.
RATIO_KEYS = (
    ("load_s", "time"),
    ("preprocess_s", "time"),
    ("vision_encode_s", "time"),
    ("ttft_s", "time"),
    ("prefill_tps", "rate"),
    ("decode_tps", "rate"),
    ("weights_bytes", "memory"),
    ("generate_peak_bytes", "memory"),
)


def ratios(ours: dict, theirs: dict) -> dict:
    out = {}
    for key, kind in RATIO_KEYS:
        a, b = ours.get(key), theirs.get(key)
        if not a or not b:
            continue
        out[key] = b / a if kind == "time" else a / b
    return out


def per_token_bytes(model) -> int:
    """Bytes of weights one decoding step reads: every language-model weight except the token
    embedding table (one row of it is read; with tied embeddings it is the lm_head, read whole)."""
    lm = model.language_model
    total = weight_bytes(lm.parameters())
    if not lm.args.tie_word_embeddings:
        total -= weight_bytes(lm.model.embed_tokens.parameters())
    return total


MATVEC_COLS = 4096
MATVEC_ROWS = 16384  # 64 M elements per matrix: a 7B step's 13 GB as ~100 matrices (CUDA
# kernels index arrays with 32-bit ints, and one 6.6 G-element matrix fails there)


def matvec_weights(nbytes: int, dtype: mx.Dtype) -> list[mx.array]:
    """Matrices [<= MATVEC_ROWS, MATVEC_COLS] of `dtype` holding `nbytes` in all."""
    rows = max(nbytes // (MATVEC_COLS * dtype.size), 1)
    sizes = [MATVEC_ROWS] * (rows // MATVEC_ROWS) + (
        [rows % MATVEC_ROWS] if rows % MATVEC_ROWS else []
    )
    weights = []
    for n in sizes:
        weights.append(mx.random.normal((n, MATVEC_COLS), dtype=dtype))
        mx.eval(weights[-1])
    return weights


def mlx_lm_decode(model, ids: mx.array, max_tokens: int, cache: list) -> float:
    """mlx-lm's own `generate_step` on the bare language model (text ids, as long as the
    prompt; `cache` holds all but the last): decode tokens/s, for reference."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import trim_prompt_cache

    trim_prompt_cache(cache, cache[0].offset - (ids.size - 1))
    stamps = []
    for _ in generate_step(
        ids[-1:], model.language_model, max_tokens=max_tokens, prompt_cache=cache
    ):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def bench_bandwidth(lib: Ours, prompt: str, image, args) -> dict:
    """Decode speed against a plain matrix-vector product over as many bytes as a decoding step
    reads, the two timed alternately (so that a busy machine slows both alike); and mlx-lm's
    own decoding loop on the same language model, to tell our overheads from MLX's.

    The product is written `x @ W.T` with x [1, K], as `nn.Linear` computes it: MLX's CPU
    backend runs `W @ x` with a 1-D x on a slower path (~1.3 vs ~4.4 GB/s here), which would
    flatter us. Decoding reuses the prompt through a `PromptCache` (one position recomputed),
    so each sample costs about `--max-tokens` decoding steps at the prompt's context length.
    """
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    model = lib.model
    nbytes = per_token_bytes(model)
    dtype = next(
        v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)
    )
    weights = matvec_weights(nbytes, dtype)
    x = mx.random.normal((1, MATVEC_COLS), dtype=dtype)

    def matvec():
        return [x @ w.T for w in weights]

    for _ in range(2):
        mx.eval(matvec())
    cache = PromptCache(model)
    lib.generate(prompt, image, 2, prompt_cache=cache)
    ids = mx.array(lib.processor.tokenize(prompt, image_sizes=[(image.height, image.width)]))
    ids = mx.where(ids == model.config.image_token_index, 0, ids)
    lm_cache = make_prompt_cache(model.language_model)
    for _ in generate_step(ids, model.language_model, max_tokens=1, prompt_cache=lm_cache):
        pass
    seconds, decode, fraction, reference = [], [], [], []
    for _ in range(max(args.runs, 3)):
        seconds.append(median([timed(matvec)[1] for _ in range(5)]))
        decode.append(lib.generate(prompt, image, args.max_tokens, prompt_cache=cache).decode_tps)
        fraction.append(decode[-1] * seconds[-1])
        reference.append(mlx_lm_decode(model, ids, args.max_tokens, lm_cache))
    return {
        "bytes_per_token": nbytes,
        "matvec_s": median(seconds),
        "measured_bandwidth_gbs": nbytes / median(seconds) / 1e9,
        "bound_tps": 1.0 / median(seconds),
        "decode_tps": median(decode),
        "fraction_of_bound": median(fraction),
        "mlx_lm_decode_tps": median(reference),
        "decode_vs_mlx_lm": median(decode) / median(reference),
    }


def bench_prefix(lib: Ours, image, runs: int) -> dict:
    """5 questions about one picture: one shared PromptCache vs each from scratch."""
    model, processor = lib.model, lib.processor
    prompts = [processor.format_prompt(q) for q in QUESTIONS]
    scratch, cached, scratch_ttft, cached_ttft = [], [], [], []
    for run in range(runs):
        for mode in ("scratch", "cached") if run % 2 == 0 else ("cached", "scratch"):
            cache = PromptCache(model) if mode == "cached" else None
            ttfts, tic = [], time.perf_counter()
            for prompt in prompts:
                responses = list(
                    stream_generate(
                        model,
                        processor,
                        prompt,
                        image=image,
                        max_tokens=ANSWER_TOKENS,
                        prompt_cache=cache,
                    )
                )
                ttfts.append(responses[0].time_to_first_token)
            total = time.perf_counter() - tic
            (cached if cache else scratch).append(total)
            (cached_ttft if cache else scratch_ttft).append(sum(ttfts))
    ids = [processor.tokenize(p, image_sizes=[(image.height, image.width)]) for p in prompts]
    shared = [len(os.path.commonprefix([a, b])) for a, b in zip(ids, ids[1:])]
    return {
        "questions": len(prompts),
        "answer_tokens": ANSWER_TOKENS,
        "prompt_tokens": median([len(i) for i in ids]),
        "reused_tokens": median(shared),  # per question after the first
        "new_tokens": median([len(i) - n for i, n in zip(ids[1:], shared)]),
        "scratch_s": median(scratch),
        "cached_s": median(cached),
        "speedup": median(scratch) / median(cached),
        "ttft_speedup": median(scratch_ttft) / median(cached_ttft),
    }


def bench_kv_bits(lib: Ours, prompt: str, image, args, runs: int, bits: int = 8) -> dict:
    """Generation with mlx-lm's quantized KV cache (`kv_bits`) vs the float cache."""
    out: dict = {"plain": [], "quantized": []}
    memory: dict = {"plain": [], "quantized": []}
    tokens = {}
    for run in range(runs):
        for mode in ("plain", "quantized") if run % 2 == 0 else ("quantized", "plain"):
            kwargs = {"kv_bits": bits} if mode == "quantized" else {}
            mem: dict = {}
            with memory_growth(mem, "generate"):
                g = lib.generate(prompt, image, args.max_tokens, **kwargs)
            out[mode].append(g)
            memory[mode].append(mem["generate"])
            tokens[mode] = g.tokens
    same = sum(a == b for a, b in zip(tokens["plain"], tokens["quantized"]))
    return {
        "kv_bits": bits,
        "ttft_s": median([g.ttft for g in out["quantized"]]),
        "decode_tps": median([g.decode_tps for g in out["quantized"]]),
        "plain_decode_tps": median([g.decode_tps for g in out["plain"]]),
        "decode_ratio": median([g.decode_tps for g in out["quantized"]])
        / median([g.decode_tps for g in out["plain"]]),
        "working_set_bytes": median(memory["quantized"]),
        "plain_working_set_bytes": median(memory["plain"]),
        "same_greedy_tokens": f"{same}/{len(tokens['plain'])}",
    }


def bench_chat(lib: Ours, image, runs: int) -> dict:
    """Second-turn TTFT / first-turn TTFT in one conversation about a picture."""
    model, processor = lib.model, lib.processor
    try:
        from mlx_llava.chat import ChatSession
    except ImportError:  # before chat.py existed: the same through PromptCache
        ChatSession = None
    first, second = [], []
    for _ in range(runs):
        if ChatSession is not None:
            chat = ChatSession(model, processor, image=image)
            r1 = list(chat.stream(QUESTIONS[0], max_tokens=ANSWER_TOKENS))
            r2 = list(chat.stream(QUESTIONS[1], max_tokens=ANSWER_TOKENS))
        else:
            cache = PromptCache(model)
            p1 = processor.format_prompt(QUESTIONS[0])
            kwargs = dict(image=image, max_tokens=ANSWER_TOKENS, prompt_cache=cache)
            r1 = list(stream_generate(model, processor, p1, **kwargs))
            answer = "".join(r.text for r in r1).strip()
            p2 = f"{p1} {answer}</s>USER: {QUESTIONS[1]} ASSISTANT:"
            r2 = list(stream_generate(model, processor, p2, **kwargs))
        first.append(r1[0].time_to_first_token)
        second.append(r2[0].time_to_first_token)
    return {
        "via": "ChatSession" if ChatSession is not None else "PromptCache",
        "image_tokens": model.config.image_tokens((image.height, image.width)),
        "first_turn_ttft_s": median(first),
        "second_turn_ttft_s": median(second),
        "ratio": median(second) / median(first),
    }


@contextmanager
def token_clock(stamps: list):
    """Timestamp every token the decoding core hands to its rows (`decoding.Row.add`), to
    split batch_generate's time into prefill and decoding."""
    from mlx_llava.decoding import Row

    original = Row.add

    def add(self, token, *args, **kwargs):
        stamps.append(time.perf_counter())
        return original(self, token, *args, **kwargs)

    Row.add = add
    try:
        yield True
    finally:
        Row.add = original


def bench_batch(lib: Ours, args, runs: int) -> dict:
    """8 captions: batch_generate vs one by one (stream_generate), decode rate and end to end."""
    try:
        from mlx_llava.batch import batch_generate
    except ImportError:
        return {"skipped": "mlx_llava.batch is not there yet"}
    model, processor = lib.model, lib.processor
    images = [synthetic_image(seed) for seed in range(BATCH_SIZE)]
    prompts = [processor.format_prompt(CAPTION)] * BATCH_SIZE
    m = args.max_tokens
    single_total, single_decode, batch_total, batch_decode = [], [], [], []
    for run in range(runs):
        for mode in ("single", "batch") if run % 2 == 0 else ("batch", "single"):
            if mode == "single":
                tic, tokens, decode_time = time.perf_counter(), 0, 0.0
                for prompt, image in zip(prompts, images):
                    g = lib.generate(prompt, image, m)
                    tokens += len(g.tokens) - 1
                    decode_time += g.total - g.ttft
                single_total.append(time.perf_counter() - tic)
                single_decode.append(tokens / decode_time)
                continue
            stamps: list = []
            with token_clock(stamps) as clocked:
                tic = time.perf_counter()
                batch_generate(model, processor, prompts, images=images, max_tokens=m)
                batch_total.append(time.perf_counter() - tic)
            if clocked and len(stamps) > BATCH_SIZE:
                # The first BATCH_SIZE stamps are the first tokens (end of prefill).
                decode_tokens = len(stamps) - BATCH_SIZE
                batch_decode.append(decode_tokens / (stamps[-1] - stamps[BATCH_SIZE - 1]))
    out = {
        "batch_size": BATCH_SIZE,
        "max_tokens": m,
        "one_by_one_s": median(single_total),
        "batch_s": median(batch_total),
        "end_to_end_speedup": median(single_total) / median(batch_total),
        "one_by_one_decode_tps": median(single_decode),
    }
    if batch_decode:
        out["batch_decode_tps"] = median(batch_decode)
        out["decode_speedup"] = median(batch_decode) / median(single_decode)
    return out


TILE_PICTURES = ((640, 480), (1000, 300), (300, 300))  # (w, h): 2x2, 1x3, 2x2 upscaled grids


def single_tile_view(lib: Ours):
    """The same weights seeing a picture LLaVA-1.5's way: one square tile (the CLIP resize and
    centre crop), no grid, no image_newline; (model, processor)."""
    import dataclasses

    from mlx_llava.image_processor import CLIPImageProcessor
    from mlx_llava.model import Model
    from mlx_llava.processor import Processor

    config = dataclasses.replace(
        lib.model.config, model_type="llava", image_grid_pinpoints=None, image_aspect_ratio=None
    )
    model = Model(config)
    weights = [(k, v) for k, v in tree_flatten(lib.model.parameters()) if k != "image_newline"]
    model.load_weights(weights, strict=True)
    side = config.vision_config.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size=side)
    processor = Processor(lib.processor.tokenizer, image_processor, config)
    return model, processor


def bench_tiles(lib: Ours, prompt: str, runs: int) -> dict:
    """What a LLaVA-NeXT picture's tiles cost: image tokens, tower passes, vision encode time
    (tower + projector + packing + merge) and time to first token, for pictures that make
    different grids, against the same weights seeing one square tile (LLaVA-1.5's way)."""
    if not lib.model.config.is_next:
        return {"skipped": "not a LLaVA-NeXT checkpoint"}
    views = {"anyres": (lib.model, lib.processor), "one_tile": single_tile_view(lib)}
    out = {}
    for width, height in TILE_PICTURES:
        image = synthetic_image(1, (width, height))
        timings = {name: {"encode": [], "ttft": []} for name in views}
        for run in range(runs + 1):  # the first run warms up
            for name in views if run % 2 == 0 else list(views)[::-1]:
                model, processor = views[name]
                inputs = processor(prompt, [image])
                args = (inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"])
                encode = timed(model.get_input_embeddings, *args)[1]
                steps = stream_generate(model, processor, prompt, image=image, max_tokens=1)
                ttft = next(iter(steps)).time_to_first_token
                if run:
                    timings[name]["encode"].append(encode)
                    timings[name]["ttft"].append(ttft)
        config = lib.model.config
        row = {
            "image_tokens": config.image_tokens((height, width)),
            "tower_passes": config.image_tiles((height, width)),
            "one_tile_image_tokens": config.num_image_tokens,
        }
        for name in views:
            row[f"{name}_encode_s"] = median(timings[name]["encode"])
            row[f"{name}_ttft_s"] = median(timings[name]["ttft"])
        row["encode_cost"] = row["anyres_encode_s"] / row["one_tile_encode_s"]
        row["ttft_cost"] = row["anyres_ttft_s"] / row["one_tile_ttft_s"]
        out[f"{width}x{height}"] = row
    return out


def bench_reference(libs: list[Library], prompt: str, image, path: str, max_tokens: int) -> dict:
    """Each library's last-position logits and greedy tokens against transformers' (recorded by
    benchmarks/reference_outputs.py on the same checkpoint, prompt and picture)."""
    reference = np.load(path)
    if str(reference["prompt"]) != prompt:
        return {"skipped": "the reference was recorded for another prompt"}
    expected = reference["last_logits"].astype(np.float32)
    tokens = reference["greedy_tokens"].tolist()[:max_tokens]
    out = {"reference_positions": int(reference["positions"])}
    for lib in libs:
        if isinstance(lib, Ours):
            inputs = lib.preprocess(prompt, image)
            logits = lib.model(
                inputs["input_ids"], inputs["pixel_values"], image_sizes=inputs["image_sizes"]
            )[0]
        else:
            logits = lib.logits(prompt, image)
        last = np.array(logits[-1].astype(mx.float32))
        greedy = lib.generate(prompt, image, len(tokens)).tokens
        same = next((i for i, (a, b) in enumerate(zip(greedy, tokens)) if a != b), len(tokens))
        out[lib.name] = {
            "positions": int(logits.shape[0]),
            "last_logits_max_diff": float(np.abs(last - expected).max()),
            "last_logits_max_diff_rel": float(
                np.abs(last - expected).max() / np.abs(expected).max()
            ),
            "last_argmax_same": bool(last.argmax() == expected.argmax()),
            "greedy_tokens_same_prefix": f"{same}/{len(tokens)}",
        }
    return out


def quantize_like_convert(model, bits: int, group_size: int = 64):
    """Quantize a float model in memory as `convert -q` does (float16 weights, then
    `mx.quantize`), keeping float32 scales and activations (exact casts; fast on CPU)."""
    from mlx_llava.convert import QuantizeSpec

    paths = quantized_paths(model, QuantizeSpec(bits, group_size))
    for path, module in model.named_modules():
        if paths.get(path):
            module.weight = module.weight.astype(mx.float16).astype(mx.float32)
    nn.quantize(model, group_size, bits, class_predicate=lambda p, m: paths.get(p, False))
    mx.eval(model.parameters())
    return model


def bench_quality(path: Path, prompt: str, image) -> dict:
    """Argmax agreement and KL(float32 || quantized) over every position of a prompt with a
    picture, at 8 and 4 bits (language model only, group 64, as `convert -q`)."""
    model, processor = load(path, dtype="float32")
    if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        return {"skipped": "the model is already quantized: pass a float checkpoint"}
    inputs = processor(prompt, [image])

    def log_probs(m):
        logits = m(inputs["input_ids"], inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        logits = logits.astype(mx.float32)[0]
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    ref = log_probs(model)
    mx.eval(ref)
    out = {"positions": int(ref.shape[0])}
    for bits in (8, 4):
        quantized, _ = load(path, dtype="float32")
        lp = log_probs(quantize_like_convert(quantized, bits))
        agree = (ref.argmax(-1) == lp.argmax(-1)).astype(mx.float32).mean().item()
        kl = (mx.exp(ref) * (ref - lp)).sum(-1).mean().item()
        out[f"{bits}bit"] = {"argmax_agreement": agree, "kl": kl}
        del quantized
    return out


# ---------------------------------------------------------------------------------------------
# Report


def model_facts(lib: Ours, image) -> dict:
    model = lib.model
    params = tree_flatten(model.parameters())
    quantized = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    dtypes = sorted({str(v.dtype).replace("mlx.core.", "") for _, v in params})
    return {
        "path": str(lib.path),
        "weight_bytes": weight_bytes(model.parameters()),
        "dtypes": dtypes,
        "quantized": quantized,
        "quantization": model.config.quantization,
        "model_type": model.config.model_type,
        "image_tokens": model.config.image_tokens((image.height, image.width)),
        "tower_passes": model.config.image_tiles((image.height, image.width)),
        "vision_layers": model.config.vision_config.num_hidden_layers,
        "text_layers": model.config.text_config.num_hidden_layers,
        "text_hidden": model.config.text_config.hidden_size,
        "vocab_size": model.config.text_config.vocab_size,
    }


def fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if unit == "MB":
        return f"{value / 1e6:.1f} MB"
    if unit == "ms":
        return f"{value * 1e3:.1f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


SINGLE_ROWS = (
    ("load_s", "load", "s"),
    ("weights_bytes", "weights resident (memory growth)", "MB"),
    ("preprocess_s", "image preprocessing + tokenization", "ms"),
    ("vision_encode_s", "vision encode (CLIP + projector + merge)", "ms"),
    ("ttft_s", "time to first token", "s"),
    ("prefill_tps", "prefill tokens/s (prompt tokens / TTFT)", ""),
    ("decode_tps", "decode tokens/s", ""),
    ("generate_peak_bytes", "generation working set (peak growth)", "MB"),
)


def print_report(report: dict) -> None:
    print(f"device: {report['device']}   versions: {report['versions']}")
    facts = report["model"]
    print(
        f"model: {facts['path']}  {facts['weight_bytes'] / 1e6:.0f} MB {facts['dtypes']}  "
        f"quantized={facts['quantized']}  image tokens={facts['image_tokens']}"
    )
    for note in report["notes"]:
        print(f"note: {note}")
    single = report.get("single")
    if single:
        names = [n for n in single if isinstance(single[n], dict)]
        ratio = report.get("ratios", {})
        header = f"{'':44s}" + "".join(f"{n:>16s}" for n in names)
        print(f"\nsingle stream, median of {report['runs']} runs, {report['max_tokens']} tokens")
        print(header + ("   ratio (>1: ours better)" if ratio else ""))
        for key, label, unit in SINGLE_ROWS:
            row = f"{label:44s}" + "".join(f"{fmt(single[n].get(key), unit):>16s}" for n in names)
            if key in ratio:
                row += f"   {ratio[key] if 'bytes' not in key else 1 / ratio[key]:.2f}x"
            print(row)
        print(f"prompt tokens: {single[names[0]]['prompt_tokens']:.0f}")
        if "same_tokens" in single:
            print(f"same greedy tokens from both: {single['same_tokens']}")
    sections = ("reference", "bandwidth", "kv_bits", "prefix_reuse", "chat", "batch", "tiles")
    for section in sections + ("quality",):
        if section in report:
            print(f"\n{section}: " + json.dumps(report[section], default=float))


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark mlx-llava (optionally against mlx-vlm).")
    p.add_argument("--model", required=True, help="MLX folder (or a llava-hf folder)")
    p.add_argument("--image", help="picture file (default: a synthetic 640x480 picture)")
    p.add_argument("--compare", choices=["mlx-vlm"], help="measure mlx-vlm too, interleaved")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="also write the JSON object to this file")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--prompt-len", type=int, help="pad the prompt to this many tokens")
    p.add_argument("--dtype", choices=list(DTYPES), help="cast the weights (both libraries)")
    p.add_argument(
        "--sections",
        default=DEFAULT_SECTIONS,
        help=f"comma-separated, from: {', '.join(SECTIONS)} (default: {DEFAULT_SECTIONS})",
    )
    p.add_argument("--quality", action="store_true", help="add the 'quality' section")
    p.add_argument(
        "--match-positions",
        action="store_true",
        help="pad our prompt to as many positions as mlx-vlm prefills (its llava_next)",
    )
    p.add_argument(
        "--reference",
        help="transformers' outputs (benchmarks/reference_outputs.py) to compare both libraries to",
    )
    p.add_argument(
        "--load-runs",
        type=int,
        help="how many runs reload the model to time loading (default: --runs)",
    )
    p.add_argument(
        "--extra-runs",
        type=int,
        help="runs for the prefix / chat / batch sections (default: --runs)",
    )
    return p


def save(report: dict, path: str) -> None:
    Path(path).write_text(json.dumps(report, default=float, indent=2) + "\n")


def run_benchmark(args) -> dict:
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if args.quality:
        sections.add("quality")
    unknown = sections - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)} (choose from {SECTIONS})")
    image = Image.open(args.image).convert("RGB") if args.image else synthetic_image()
    path = Path(args.model)
    ours = Ours("mlx-llava", path, args.dtype)
    libs: list[Library] = [ours]
    notes = []
    scratch = Path(tempfile.mkdtemp(prefix="llava-bench-"))
    try:
        if args.compare == "mlx-vlm":
            vlm_path, note = mlx_vlm_folder(path, scratch)
            notes.append(note)
            notes.append(MlxVlm.__doc__.split("\n\n")[0].replace("\n", " ").strip())
            libs.append(MlxVlm("mlx-vlm", vlm_path, args.dtype))
        ours.load()
        prompt = make_prompt(ours.processor, QUESTION, args.prompt_len, image)
        prompt_of = {}
        if args.match_positions and len(libs) == 2:
            # mlx-vlm's llava_next prefills more positions than the prompt's tokens: pad our
            # prompt with filler text to as many, so that both do as much work.
            theirs = libs[1]
            theirs.load()
            positions = theirs.encode(theirs.preprocess(prompt, image)).shape[1]
            theirs.unload()
            prompt_of[ours.name] = make_prompt(ours.processor, QUESTION, positions, image)
            notes.append(
                f"--match-positions: mlx-vlm prefills {positions} positions for the prompt; ours "
                "is padded with filler text to as many"
            )
        report: dict = {
            "device": device_name(),
            "versions": versions(),
            "model": model_facts(ours, image),
            "runs": args.runs,
            "max_tokens": args.max_tokens,
            "prompt": prompt,
            "notes": notes,
        }
        extra_runs = args.extra_runs or args.runs

        if args.reference:
            for lib in libs[1:]:
                lib.load()
            report["reference"] = bench_reference(
                libs, prompt, image, args.reference, args.max_tokens
            )
            for lib in libs[1:]:
                lib.unload()

        def single():
            out = bench_single(libs, args, image, lambda lib: prompt_of.get(lib.name, prompt))
            if len(libs) == 2:
                report["ratios"] = ratios(out[libs[0].name], out[libs[1].name])
                report["ratio_notes"] = RATIO_NOTES
            for lib in libs[1:]:
                lib.unload()
            return out

        def quality():
            ours.unload()
            return bench_quality(path, prompt, image)

        steps = {
            "single": ("single", single),
            "bandwidth": ("bandwidth", lambda: bench_bandwidth(ours, prompt, image, args)),
            "kvbits": ("kv_bits", lambda: bench_kv_bits(ours, prompt, image, args, extra_runs)),
            "prefix": ("prefix_reuse", lambda: bench_prefix(ours, image, extra_runs)),
            "chat": ("chat", lambda: bench_chat(ours, image, extra_runs)),
            "batch": ("batch", lambda: bench_batch(ours, args, extra_runs)),
            "tiles": ("tiles", lambda: bench_tiles(ours, prompt, extra_runs)),
            "quality": ("quality", quality),
        }
        for section in SECTIONS:  # in this order; each saved as soon as it is measured
            if section not in sections:
                continue
            key, fn = steps[section]
            if ours.model is None and section != "quality":
                ours.load()
            try:
                report[key] = fn()
            except Exception as e:  # report what failed, keep the other sections
                report[key] = {"error": f"{type(e).__name__}: {e}"}
            if args.out:
                save(report, args.out)
        report["peak_memory_bytes"] = mx.get_peak_memory()
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.load_runs is None:
        args.load_runs = args.runs
    report = run_benchmark(args)
    if args.out:
        save(report, args.out)
    if args.json:
        print(json.dumps(report, default=float))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
