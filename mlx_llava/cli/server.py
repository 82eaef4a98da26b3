"""server.py / `python -m mlx_llava.server`: serve a model over HTTP (OpenAI and Ollama APIs, a
chat page at /)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Optional

from ..image_processor import DEFAULT_MAX_IMAGE_PIXELS
from . import run_cli
from .args import add_model_args, load_from_args, make_parser

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
API_KEY_ENV = "MLX_LLAVA_API_KEY"


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = make_parser(
        "Serve a LLaVA model: OpenAI /v1/chat/completions, Ollama /api/chat and /api/generate, "
        "and a chat page at /."
    )
    p.prog = prog or p.prog
    add_model_args(p)
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every route but /health and the page "
        f"(default: ${API_KEY_ENV} if set)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="allow browser pages from this origin (repeatable; '*' for any; default: none)",
    )
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) picture URLs")
    p.add_argument(
        "--image-dir", default=None, help="allow local picture paths and file:// URLs inside DIR"
    )
    p.add_argument(
        "--image-timeout", type=float, default=10.0, help="seconds a remote picture may take"
    )
    p.add_argument(
        "--max-image-mb", type=float, default=20.0, help="largest picture file or download, MB"
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="refuse pictures with more pixels, before decoding them (Pillow's decompression-"
        "bomb limit by default)",
    )
    p.add_argument("--max-body-mb", type=float, default=50.0, help="largest request body, MB")
    p.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        default=512,
        help="answer length when a request does not say (capped by the context)",
    )
    p.add_argument("--temp", type=float, default=0.0, help="default temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.0, help="default top-p (0: off)")
    p.add_argument("--top-k", type=int, default=0, help="default top-k (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="default min-p (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--max-batch", type=int, default=8, help="requests generating together")
    p.add_argument(
        "--max-queue",
        type=int,
        default=32,
        help="requests waiting for a place in the batch; more get 503",
    )
    p.add_argument(
        "--prefill-batch-size",
        type=int,
        default=1,
        help="waiting requests that join the batch at one step, their prompts computed together "
        "(1: each request's first token waits only for the prompts queued before it)",
    )
    p.add_argument(
        "--prefill-step-size", type=int, default=2048, help="prompt positions per prefill chunk"
    )
    p.add_argument(
        "--prompt-cache-size",
        type=int,
        default=16,
        help="conversations whose KV cache is kept for their next turn",
    )
    p.add_argument(
        "--prompt-cache-mb",
        type=float,
        default=2048.0,
        help="memory for kept KV caches, MB",
    )
    p.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"]
    )
    return p


def main(argv=None, prog: Optional[str] = None) -> None:
    args = build_parser(prog).parse_args(argv)
    run_cli(lambda: serve(args))


def _check(args: argparse.Namespace) -> None:
    positive = {
        "--port": args.port,
        "--max-tokens": args.max_tokens,
        "--max-batch": args.max_batch,
        "--prefill-batch-size": args.prefill_batch_size,
        "--prefill-step-size": args.prefill_step_size,
        "--image-timeout": args.image_timeout,
        "--max-image-mb": args.max_image_mb,
        "--max-body-mb": args.max_body_mb,
        "--max-image-pixels": args.max_image_pixels,
    }
    for flag, value in positive.items():
        if value <= 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if args.max_queue < 0 or args.prompt_cache_size < 0 or args.prompt_cache_mb < 0:
        raise ValueError("--max-queue, --prompt-cache-size and --prompt-cache-mb must be >= 0")
    if args.image_dir and not os.path.isdir(args.image_dir):
        raise FileNotFoundError(f"--image-dir: no such folder: {args.image_dir}")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(args: argparse.Namespace) -> None:
    """Load the model and serve it until interrupted."""
    _check(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise RuntimeError(
            f"the server needs FastAPI and uvicorn ({e}): pip install 'mlx-llava[server]'"
        ) from e
    from ..server import Sampling, ServerConfig, create_app

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and not api_key:
        print(
            f"warning: listening on {args.host} without --api-key: anyone who can reach this "
            "address can use the model",
            file=sys.stderr,
        )
    model, processor = load_from_args(args)
    config = ServerConfig(
        model_id=args.model,
        api_key=api_key,
        cors_origins=args.cors_origin,
        allow_remote_images=args.allow_remote_images,
        image_dir=args.image_dir,
        image_timeout=args.image_timeout,
        max_image_mb=args.max_image_mb,
        max_image_pixels=args.max_image_pixels,
        max_body_mb=args.max_body_mb,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_prefill=args.prefill_batch_size,
        prompt_cache_size=args.prompt_cache_size,
        prompt_cache_mb=args.prompt_cache_mb,
        prefill_step_size=args.prefill_step_size,
        defaults=Sampling(
            max_tokens=args.max_tokens,
            temperature=args.temp,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
        ),
    )
    app = create_app(model, processor, config)
    print(f"serving {args.model} on http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5
    )


if __name__ == "__main__":
    main()
