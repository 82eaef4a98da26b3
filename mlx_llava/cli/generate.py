"""generate.py: ask a LLaVA model about pictures; the answer streams to stdout."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Optional

from . import run_cli
from .args import (
    add_model_args,
    add_sampling_args,
    add_structured_args,
    load_from_args,
    make_parser,
    sampling_kwargs,
)

DEFAULT_PROMPT = "Describe this image."


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("Ask a LLaVA model about pictures.")
    add_model_args(p)
    p.add_argument("--image", action="append", default=[], help="path or URL (repeatable)")
    p.add_argument("--video", default=None, help="a video file (OneVision, LLaVA-NeXT-Video; PyAV)")
    p.add_argument(
        "--frames", type=int, default=8, help="frames sampled uniformly over --video (default 8)"
    )
    p.add_argument(
        "--prompt", "-p", default=None, help=f"the question (default: '{DEFAULT_PROMPT}')"
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="chat: one question per line from stdin; /image PATH, /clear, /exit",
    )
    p.add_argument(
        "--image-dir", default=None, help="caption every picture of this folder (see caption.py)"
    )
    p.add_argument(
        "--output", "-o", default=None, help="JSONL file for --image-dir (default: stdout)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="pictures per batch for --image-dir")
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="under mlx.launch: split the language model's layers across the ranks, each "
        "reading only its own weights (rank 0 prints the answer)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="timings and memory on stderr (with --pipeline: each rank's layers and memory)",
    )
    add_sampling_args(p)
    add_structured_args(p)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    run_cli(lambda: run(args))


def print_stats(response) -> None:
    print(
        f"prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens/s, "
        f"time to first token {response.time_to_first_token:.3f} s\n"
        f"generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.1f} tokens/s\n"
        f"peak memory: {response.peak_memory:.3f} GB",
        file=sys.stderr,
    )


def run(args: argparse.Namespace) -> None:
    import mlx.core as mx

    from .. import distributed
    from ..image_processor import load_image
    from ..progress import format_bytes

    if args.chat and args.image_dir:
        raise ValueError("--chat and --image-dir do not go together")
    if args.pipeline and args.image_dir:
        raise ValueError(
            "--pipeline does not caption folders: run caption.py under mlx.launch, which "
            "splits the pictures across the ranks"
        )
    if distributed.size() > 1 and not (args.pipeline or args.image_dir):
        raise ValueError(
            "under mlx.launch generate.py needs --pipeline (or --image-dir, which splits the "
            "pictures across the ranks)"
        )
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError(
            "--prompt is empty: ask a question (or leave --prompt out to get a description)"
        )
    sampling = sampling_kwargs(args)
    if args.pipeline and sampling.get("kv_bits") is not None:
        raise ValueError("--kv-bits does not go with --pipeline")
    images = [load_image(i) for i in args.image]
    if args.frames < 1:
        raise ValueError(f"--frames must be at least 1, got {args.frames}")
    if args.video and args.image_dir:
        raise ValueError("--video and --image-dir do not go together")
    video = None
    if args.video:
        from ..video_io import read_video

        video = read_video(args.video, args.frames)  # fails in one line, before loading
    model, processor = load_from_args(args)
    asks_for_picture = "<image>" in (args.prompt or "")
    if not (images or args.image_dir or asks_for_picture) and distributed.is_main():
        print(
            "note: no --image: the model answers from the text alone",
            file=sys.stderr,
            flush=True,
        )
    if args.image_dir:
        from .caption import caption_with_args

        caption_with_args(args, model, processor)
        return
    # Every rank of a pipeline runs the whole conversation; rank 0 alone shows it.
    with _quiet(not distributed.is_main()):
        answer(model, processor, args, images, sampling, video)
    if args.pipeline and args.verbose:
        print(
            f"rank {distributed.rank()}: {model.pipeline_stage()}, peak memory "
            f"{format_bytes(mx.get_peak_memory())}",
            file=sys.stderr,
            flush=True,
        )


@contextlib.contextmanager
def _quiet(quiet: bool):
    """Send stdout and stderr to /dev/null while `quiet` (the ranks other than 0)."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as null:
        with contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            yield


def answer(
    model, processor, args: argparse.Namespace, images: list, sampling: dict, video=None
) -> None:
    """Stream the answer to `--prompt`, or chat with `--chat` (about `video`'s frames too)."""
    from ..generate import stream_generate
    from ..processor import VIDEO_PLACEHOLDER

    if args.chat:
        from ..chat import ChatSession

        session = ChatSession(model, processor, images=images, video=video)
        chat(session, sampling, args.prompt, args.verbose)
        return
    question = args.prompt or DEFAULT_PROMPT
    if video is not None and VIDEO_PLACEHOLDER not in question:
        question = f"{VIDEO_PLACEHOLDER}\n{question}"
    prompt = processor.format_prompt(question, num_images=len(images))
    response = None
    steps = stream_generate(model, processor, prompt, images=images, video=video, **sampling)
    for response in steps:
        print(response.text, end="", flush=True)
    print()
    if args.verbose and response is not None:
        print_stats(response)


CHAT_PROMPT = ">> "
CHAT_HELP = (
    "Type a question and press Enter. /image PATH: talk about another picture (a new "
    "conversation; /image alone: none); /clear: start over; /exit or Ctrl-D: quit; Ctrl-C stops "
    "an answer."
)


def _enable_line_editing() -> None:
    try:
        import readline  # noqa: F401 - importing it gives input() editing and history
    except ImportError:
        pass


def chat(session, sampling: dict, first: Optional[str] = None, verbose: bool = False) -> None:
    """The interactive loop of `--chat`: questions from stdin, answers streamed to stdout.

    On a terminal there is a prompt marker, line editing and history; from a pipe each line is
    a question. Errors of one turn (a bad picture, a conversation longer than the context) are
    reported on stderr and the session goes on.
    """
    tty = sys.stdin.isatty()
    if tty:
        _enable_line_editing()
        print(CHAT_HELP, file=sys.stderr)
    pending = [first] if first else []
    while True:
        if pending:
            line = pending.pop()
        else:
            try:
                line = input(CHAT_PROMPT if tty else "")
            except EOFError:
                if tty:
                    print()
                return
            except KeyboardInterrupt:
                print("\n(/exit or Ctrl-D quits)", file=sys.stderr)
                continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line):
                return
            continue
        try:
            _answer(session, line, sampling, verbose)
        except BrokenPipeError:
            raise
        except Exception as e:  # noqa: BLE001 - one turn fails, the session goes on
            print(f"error: {str(e).strip() or type(e).__name__}", file=sys.stderr)


def _command(session, line: str) -> bool:
    """Run a /command; False ends the session."""
    name, _, rest = line.partition(" ")
    rest = rest.strip().strip("\"'")
    if name in ("/exit", "/quit"):
        return False
    if name == "/clear":
        session.clear()
        print("(new conversation)", file=sys.stderr)
    elif name == "/image":
        try:
            session.set_image(rest or None)
        except Exception as e:  # noqa: BLE001 - a bad path must not end the session
            print(f"error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
            return True
        about = f"about {rest}" if rest else "without a picture"
        print(f"(new conversation {about})", file=sys.stderr)
    elif name == "/help":
        print(CHAT_HELP, file=sys.stderr)
    else:
        print(f"unknown command {name}: {CHAT_HELP}", file=sys.stderr)
    return True


def _answer(session, question: str, sampling: dict, verbose: bool) -> None:
    """Stream one answer; Ctrl-C stops the answer, not the session."""
    response = None
    try:
        responses = session.stream(question, **sampling)
    except KeyboardInterrupt:
        print(" [interrupted]", file=sys.stderr, flush=True)
        return
    try:
        for response in responses:
            print(response.text, end="", flush=True)
    except KeyboardInterrupt:
        print(" [interrupted]", end="", file=sys.stderr, flush=True)
    finally:
        responses.close()
        print(flush=True)
    if verbose and response is not None:
        print_stats(response)


if __name__ == "__main__":
    main()
