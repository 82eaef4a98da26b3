"""server.py / `python -m mlx_llava.server`: serve a model over HTTP (OpenAI and Ollama APIs, a
chat page at /), from one process or from the ranks of `mlx.launch ... --pipeline`."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import stat
import sys
import threading
import time
from typing import Callable, Optional

from ..image_processor import DEFAULT_MAX_IMAGE_PIXELS
from . import run_cli
from .args import add_model_args, load_from_args, make_parser

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
API_KEY_ENV = "MLX_LLAVA_API_KEY"
GRACEFUL_SHUTDOWN_S = 5  # open streams get this long to finish when the server stops
FOLLOWER_GRACE_S = 15.0  # a signalled rank other than 0 waits this long for rank 0 to stop it


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
        import uvicorn
    except ImportError as e:
        raise RuntimeError(
            f"the server needs FastAPI and uvicorn ({e}): pip install 'mlx-llava[server]'"
        ) from e
    from ..server import Sampling, ServerConfig, create_app, make_worker
    from ..server.signals import Server

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and not api_key and distributed.is_main():
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
    if not distributed.is_main():
        follow(make_worker(model, processor, config))
        return
    app = create_app(model, processor, config)
    worker = app.state.service.worker
    server = Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
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


def follow(worker) -> None:
    """A rank other than 0: run the worker's turns until rank 0 closes them.

    Ctrl-C reaches every rank of a launch: rank 0 then stops serving (letting open answers
    finish) and closes the pipeline. A signalled follower therefore goes on until rank 0 closes
    it, or leaves by itself FOLLOWER_GRACE_S later.
    """
    signalled: list[float] = []

    def note(*_) -> None:
        signalled.append(time.monotonic())

    worker.start()
    handlers = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not worker.wait(0.2):
            if signalled and time.monotonic() - signalled[0] > FOLLOWER_GRACE_S:
                from ..distributed import rank_prefix

                print(
                    f"{rank_prefix()}error: rank 0 did not stop the pipeline within "
                    f"{FOLLOWER_GRACE_S:g} s of the signal",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)  # the worker thread may be waiting inside a collective
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if worker.failure:
        raise RuntimeError(worker.failure)


def stop_with_launcher(stop: Callable[[], None]) -> None:
    """Call `stop` when mlx.launch goes away (e.g. SIGTERM on it, which ends it alone).

    mlx.launch hands each rank a pipe as its stdin and closes it only when it exits, so the
    end of stdin means the launcher is gone; nobody reads stdout and stderr any more either.
    """
    try:
        watched = "MLX_RANK" in os.environ and stat.S_ISFIFO(os.fstat(0).st_mode)
    except OSError:
        watched = False
    if not watched:
        return

    def watch() -> None:
        try:
            while os.read(0, 1 << 16):
                pass  # what is typed into the launcher is forwarded to every rank
        except OSError:
            return
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        stop()

    threading.Thread(target=watch, name="mlx-llava-launcher-watch", daemon=True).start()


if __name__ == "__main__":
    main()
