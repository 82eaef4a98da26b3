"""generate.py: ask a LLaVA model about pictures; the answer streams to stdout."""

from __future__ import annotations

import argparse
import sys

from ..loader import DEFAULT_MODEL, load
from . import run_cli

DEFAULT_PROMPT = "Describe this image."
DEFAULT_MAX_TOKENS = 256


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags shared by generate.py, its chat mode and captioning."""
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--repetition-context-size", type=int, default=20)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--kv-bits", type=int, default=None, help="quantize the KV cache (e.g. 8)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    if args.max_tokens <= 0:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temp,
        top_p=args.top_p,
        min_p=args.min_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size,
        seed=args.seed,
        stop=args.stop,
        kv_bits=args.kv_bits,
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="MLX folder, llava-hf or original LLaVA folder, hub repo id, or 'demo'",
    )
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    p.add_argument(
        "--pad-to-square",
        action="store_true",
        default=None,
        help="pad pictures to a square with the mean colour first (as the original LLaVA-1.5)",
    )
    p.add_argument("--conv-mode", default=None, help="conversation template (default: model's)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Ask a LLaVA model about pictures.")
    add_model_args(p)
    p.add_argument("--image", action="append", default=[], help="path or URL (repeatable)")
    p.add_argument("--prompt", "-p", default=None, help=f"the question ('{DEFAULT_PROMPT}')")
    p.add_argument("--verbose", action="store_true", help="timings and memory on stderr")
    add_sampling_args(p)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    run_cli(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    from ..generate import stream_generate
    from ..image_processor import load_image

    sampling = sampling_kwargs(args)
    images = [load_image(i) for i in args.image]
    model, processor = load(
        args.model,
        dtype=args.dtype,
        pad_to_square=args.pad_to_square,
        conv_mode=args.conv_mode,
    )
    prompt = processor.format_prompt(args.prompt or DEFAULT_PROMPT, num_images=len(images))
    response = None
    for response in stream_generate(model, processor, prompt, images=images, **sampling):
        print(response.text, end="", flush=True)
    print()
    if args.verbose and response is not None:
        print(
            f"prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens/s, "
            f"time to first token {response.time_to_first_token:.3f} s\n"
            f"generation: {response.generation_tokens} tokens, "
            f"{response.generation_tps:.1f} tokens/s\n"
            f"peak memory: {response.peak_memory:.3f} GB",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
