"""Benchmark LLaVA-OneVision against mlx-vlm's `llava_onevision` in one process: time to first
token and decode speed on a picture and on a 16-frame video, and the cost of reading a video.

    python benchmarks/bench_onevision.py [--runs 3] [--max-tokens 64] [--out results.json]

The checkpoint is `make_checkpoint.py --preset ov-mid` (SigLIP 384 px in 14 px patches, Qwen2
with GQA, float32), written to a scratch folder and converted twice from the same llava-hf
folder: by `mlx_llava.convert` for us and by mlx-vlm's own `mlx_vlm convert` for mlx-vlm. Both
libraries answer the same prompt greedily, `--max-tokens` tokens (the random model never emits
`</s>`), from the prompt text and a PIL picture (640 x 480: base tile + a 2 x 2 grid, 5 tower
passes) or the same uint8 frames [16, H, W, 3]: the timed call includes preprocessing, the tower,
the projector and the prefill. Runs are interleaved (ours then theirs, then theirs then ours,
...) so that other load on the machine hits both; a first, untimed run of each warms up.

Reading a video is timed apart: a 60-second clip (`--clip-size`, 30 fps, H.264) written here
with PyAV, 16 and 32 frames sampled over it by `mlx_llava.video_io.read_video` (decoding front to
back), reported against the 16-frame video's time to first token.

Ratios are theirs / ours for times (> 1: we are faster) and ours / theirs for tokens/s; each
is reported as the median of the per-round ratios with its spread (min, max).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from bench import device_name, median, synthetic_image, versions  # a sibling script
from make_checkpoint import make_checkpoint

from mlx_llava import stream_generate
from mlx_llava.convert import convert
from mlx_llava.loader import load
from mlx_llava.video_io import read_video

DEFAULT_RUNS = 3
DEFAULT_MAX_TOKENS = 64
DEFAULT_FRAMES = 16
CLIP_SECONDS = 60
CLIP_FPS = 30
QUESTIONS = {  # (question, pictures the template adds in front)
    "picture": ("What is in the picture? Describe it.", 1),
    "video": ("<video>\nWhat happens in the video? Describe it.", 0),
}


def write_clip(path: Path, seconds: int, size: tuple[int, int], fps: int = CLIP_FPS) -> Path:
    """A synthetic H.264 clip: a smooth picture drifting sideways (every frame differs)."""
    import av

    w, h = size
    base = np.asarray(synthetic_image(0, (2 * w, h)))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(seconds * fps):
            x = (i * 3) % w
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, x : x + w]), "rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def run_stream(tokens_of, tic: float) -> dict:
    """Time to first token, decode tokens/s and the tokens of one answer (`tokens_of` yields
    token ids; `tic` is when the call began)."""
    tokens, first = [], 0.0
    for token in tokens_of:
        if not tokens:
            first = time.perf_counter()
        tokens.append(int(token))
    end = time.perf_counter()
    decode = (len(tokens) - 1) / (end - first) if len(tokens) > 1 else 0.0
    return {"ttft_s": first - tic, "decode_tps": decode, "tokens": tokens}


class Ours:
    name = "mlx-llava"

    def __init__(self, path: Path):
        self.model, self.processor = load(path)

    def prompt(self, question: str, num_images: int) -> str:
        return self.processor.format_prompt(question, num_images)

    def generate(self, prompt: str, media: dict, max_tokens: int) -> dict:
        tic = time.perf_counter()
        stream = stream_generate(self.model, self.processor, prompt, max_tokens=max_tokens, **media)
        return run_stream((r.token for r in stream), tic)


class MlxVlm:
    """mlx-vlm's llava_onevision: its processor called directly and `generate_step` (what its
    `stream_generate` runs), greedy."""

    name = "mlx-vlm"

    def __init__(self, path: Path):
        from mlx_vlm.utils import load as vlm_load

        self.model, self.processor = vlm_load(str(path))

    def generate(self, prompt: str, media: dict, max_tokens: int) -> dict:
        from mlx_vlm.generate.ar import generate_step

        tic = time.perf_counter()
        images = [media["image"]] if "image" in media else None
        videos = [media["video"]] if "video" in media else None
        inputs = dict(self.processor(text=prompt, images=images, videos=videos))
        ids = inputs.pop("input_ids")
        pixels = inputs.pop("pixel_values", None)
        inputs.pop("attention_mask", None)
        steps = generate_step(
            ids, self.model, pixels, None, max_tokens=max_tokens, temperature=0.0, **inputs
        )
        return run_stream((token for token, _ in steps), tic)


def convert_both(hf: Path, scratch: Path) -> tuple[Path, Path]:
    """Our MLX folder and mlx-vlm's, each made by its own converter from the same folder."""
    ours, theirs = scratch / "ov-mid-mlx", scratch / "ov-mid-vlm"
    convert(hf, ours, dtype="float32")
    subprocess.run(
        [sys.executable, "-m", "mlx_vlm", "convert", "--hf-path", str(hf), "--mlx-path",
         str(theirs), "--dtype", "float32"],
        check=True, capture_output=True,
    )  # fmt: skip
    return ours, theirs


def bench_media(libs, prompts: dict, media: dict, args) -> dict:
    """Interleaved runs of one case; per library the runs, per round the ratios."""
    for lib in libs:  # warm-up: kernel builds, lazy imports
        lib.generate(prompts[lib.name], media, 2)
    runs = {lib.name: [] for lib in libs}
    for r in range(args.runs):
        for lib in libs if r % 2 == 0 else libs[::-1]:
            runs[lib.name].append(lib.generate(prompts[lib.name], media, args.max_tokens))
    ours, theirs = runs["mlx-llava"], runs["mlx-vlm"]
    ttft = [t["ttft_s"] / o["ttft_s"] for o, t in zip(ours, theirs)]
    decode = [o["decode_tps"] / t["decode_tps"] for o, t in zip(ours, theirs)]
    return {
        "same_tokens": all(o["tokens"] == t["tokens"] for o, t in zip(ours, theirs)),
        "generated_tokens": len(ours[0]["tokens"]),
        "ratios": {
            "ttft": spread(ttft),
            "decode_tps": spread(decode),
        },
        "runs": {
            name: [{k: v for k, v in g.items() if k != "tokens"} for g in gs]
            for name, gs in runs.items()
        },
    }


def spread(values: list[float]) -> dict:
    return {"median": median(values), "min": min(values), "max": max(values), "runs": values}


def bench_reading(clip: Path, runs: int, video_ttft: float) -> dict:
    """Decoding + sampling 16 and 32 frames of the clip, against the video's TTFT (ours)."""
    out = {}
    for frames in (DEFAULT_FRAMES, 32):
        seconds = []
        for _ in range(runs):
            tic = time.perf_counter()
            read_video(clip, frames)
            seconds.append(time.perf_counter() - tic)
        out[f"read_{frames}_frames_s"] = median(seconds)
        out[f"read_{frames}_frames_share_of_video_ttft"] = median(seconds) / video_ttft
    return out


def run_benchmark(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        hf = make_checkpoint(scratch / "ov-mid", "ov-mid")
        ours_path, vlm_path = convert_both(hf, scratch)
        w, h = (int(v) for v in args.clip_size.split("x"))
        tic = time.perf_counter()
        clip = write_clip(scratch / "clip.mp4", CLIP_SECONDS, (w, h))
        print(f"wrote a {CLIP_SECONDS} s {w}x{h} clip in {time.perf_counter() - tic:.0f} s")
        frames = read_video(clip, args.frames)
        libs = [Ours(ours_path), MlxVlm(vlm_path)]
        prompt = libs[0].prompt
        report = {
            "benchmark": "bench_onevision",
            "device": device_name(),
            "versions": versions(),
            "checkpoint": "make_checkpoint.py --preset ov-mid (float32)",
            "mlx_vlm_folder": "converted by mlx-vlm's own `mlx_vlm convert` from the same "
            "llava-hf folder",
            "runs": args.runs,
            "max_tokens": args.max_tokens,
            "ratio_notes": "ttft: theirs / ours (> 1: we are faster); decode_tps: ours / theirs",
        }
        cases = {
            "picture": {"image": synthetic_image(1, (640, 480))},
            "video": {"video": frames},
        }
        for case, media in cases.items():
            prompts = {lib.name: prompt(*QUESTIONS[case]) for lib in libs}
            result = bench_media(libs, prompts, media, args)
            result["prompt"] = prompts["mlx-llava"]
            if case == "video":
                result["frames"] = int(frames.shape[0])
                result["frame_size"] = list(frames.shape[1:3])
            report[case] = result
            print(case, json.dumps(result["ratios"]), "same tokens:", result["same_tokens"])
        video_ttft = median([r["ttft_s"] for r in report["video"]["runs"]["mlx-llava"]])
        report["reading"] = {
            "clip": f"{CLIP_SECONDS} s, {w}x{h}, {CLIP_FPS} fps, H.264",
            **bench_reading(clip, args.runs, video_ttft),
        }
        print("reading", json.dumps(report["reading"]))
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="OneVision: mlx-llava against mlx-vlm.")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    p.add_argument("--clip-size", default="640x480", help="WxH of the 60-second clip")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)
    report = run_benchmark(args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    mx.clear_cache()


if __name__ == "__main__":
    main()
