"""server.py / `python -m mlx_llava.server`: serve a model over HTTP (OpenAI and Ollama APIs, a
chat page at /), from one process or from the ranks of `mlx.launch ... --pipeline`."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
from typing import Optional

from ..image_processor import DEFAULT_MAX_IMAGE_PIXELS
from ..video_io import DEFAULT_NUM_FRAMES
from . import run_cli
from .args import add_model_args, add_sampling_args, load_from_args, make_parser, sampling_params

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
API_KEY_ENV = "MLX_LLAVA_API_KEY"
GRACEFUL_SHUTDOWN_S = 5  # open streams get this long to finish when the server stops


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
        "--allow-private-image-hosts",
        action="store_true",
        help="with --allow-remote-images, also fetch from loopback, private and link-local "
        "addresses: any client could then reach this machine's and its network's services "
        "(cloud metadata, admin pages) through the server",
    )
    p.add_argument(
        "--image-dir", default=None, help="allow local picture paths and file:// URLs inside DIR"
    )
    p.add_argument(
        "--image-timeout", type=float, default=10.0, help="seconds a remote picture may take"
    )
    p.add_argument(
        "--frames",
        type=int,
        default=DEFAULT_NUM_FRAMES,
        help="frames sampled uniformly over each video of a request "
        f"(default {DEFAULT_NUM_FRAMES})",
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
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a request's headers may take to arrive (then the connection is closed)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a request's body may take, from the end of its headers (then 408)",
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=5.0,
        help="seconds an idle kept-alive connection is kept open",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="open connections at once; more are answered 503",
    )
    requests = p.add_argument_group(
        "sampling",
        "defaults for the requests that leave a setting out (--max-tokens is capped "
        "by the context)",
    )
    add_sampling_args(requests, kv_bits=False, max_tokens=512)
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
        "--pipeline",
        action="store_true",
        help="under mlx.launch: split the language model's layers across the ranks, each "
        "reading only its own weights; rank 0 answers HTTP and the others follow it",
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
        "--max-batch": args.max_batch,
        "--prefill-batch-size": args.prefill_batch_size,
        "--prefill-step-size": args.prefill_step_size,
        "--image-timeout": args.image_timeout,
        "--max-image-mb": args.max_image_mb,
        "--max-body-mb": args.max_body_mb,
        "--max-image-pixels": args.max_image_pixels,
        "--header-timeout": args.header_timeout,
        "--body-timeout": args.body_timeout,
        "--keep-alive-timeout": args.keep_alive_timeout,
        "--max-connections": args.max_connections,
    }
    for flag, value in positive.items():
        if value <= 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if args.max_queue < 0 or args.prompt_cache_size < 0 or args.prompt_cache_mb < 0:
        raise ValueError("--max-queue, --prompt-cache-size and --prompt-cache-mb must be >= 0")
    sampling_params(args)  # the defaults' ranges, named by flag
    if args.frames < 1:
        raise ValueError(f"--frames must be at least 1, got {args.frames}")
    if args.image_dir and not os.path.isdir(args.image_dir):
        raise FileNotFoundError(f"--image-dir: no such folder: {args.image_dir}")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(args: argparse.Namespace) -> None:
    """Load the model and serve it until interrupted (under `mlx.launch --pipeline`: rank 0
    serves, the other ranks follow it until it stops)."""
    from .. import distributed

    _check(args)
    if distributed.size() > 1 and not args.pipeline:
        raise ValueError(
            "under mlx.launch the server needs --pipeline (each rank then holds a part of the "
            "model, and rank 0 answers HTTP)"
        )
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"the server needs FastAPI and uvicorn ({e}): pip install 'mlx-llava[server]'"
        ) from e
    from ..server import ServerConfig, create_app, make_worker
    from ..server.connections import uvicorn_config
    from ..server.lifecycle import Server, follow, prime_cpu_compiler, stop_with_launcher

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and not api_key and distributed.is_main():
        print(
            f"warning: listening on {args.host} without --api-key: anyone who can reach this "
            "address can use the model",
            file=sys.stderr,
        )
    model, processor = load_from_args(args)
    prime_cpu_compiler()
    config = ServerConfig(
        model_id=args.model,
        api_key=api_key,
        cors_origins=args.cors_origin,
        allow_remote_images=args.allow_remote_images,
        allow_private_image_hosts=args.allow_private_image_hosts,
        image_dir=args.image_dir,
        image_timeout=args.image_timeout,
        num_frames=args.frames,
        max_image_mb=args.max_image_mb,
        max_image_pixels=args.max_image_pixels,
        max_body_mb=args.max_body_mb,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        max_connections=args.max_connections,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_prefill=args.prefill_batch_size,
        prompt_cache_size=args.prompt_cache_size,
        prompt_cache_mb=args.prompt_cache_mb,
        prefill_step_size=args.prefill_step_size,
        defaults=sampling_params(args),
    )
    if not distributed.is_main():
        follow(make_worker(model, processor, config))
        return
    app = create_app(model, processor, config)
    worker = app.state.service.worker
    server = Server(
        uvicorn_config(
            app,
            config,
            args.host,
            args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    )

    def stop() -> None:
        server.should_exit = True

    worker.on_failure = stop
    print(f"serving {args.model} on http://{args.host}:{args.port}/", file=sys.stderr)
    if len(worker.ranks) > 1:
        print(f"{len(worker.ranks)} ranks: {ranks_line(worker.ranks)}", file=sys.stderr)
        stop_with_launcher(stop)
        # A signal stops the server gracefully (and the ranks with it): then exit 0, so that
        # mlx.launch reports no failed rank. The server raises the signal again after its
        # shutdown, into these handlers.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
    server.run()
    if worker.failure:
        raise RuntimeError(worker.failure)


def ranks_line(ranks: list[dict]) -> str:
    """`rank 0: layers 16-31; rank 1: layers 0-15, vision tower` from `Worker.ranks`."""
    parts = []
    for r in ranks:
        first, last = r["layers"]
        vision = ", vision tower" if r["vision_tower"] else ""
        parts.append(f"rank {r['rank']}: layers {first}-{last}{vision}")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
