"""caption.py: caption every picture of a folder into a JSONL file, in batches, resumably."""

from __future__ import annotations

import argparse
import os

from ..caption import DEFAULT_BATCH_SIZE, DEFAULT_CAPTION_PROMPT, DEFAULT_VIDEO_PROMPT
from ..video_io import DEFAULT_NUM_FRAMES
from . import run_cli
from .args import (
    add_model_args,
    add_sampling_args,
    add_structured_args,
    load_from_args,
    make_parser,
    sampling_kwargs,
)


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("Caption every picture (or video) of a folder into a JSONL file (resumable).")
    add_model_args(p)
    folder = p.add_mutually_exclusive_group(required=True)
    folder.add_argument("--image-dir", help="folder of pictures (walked recursively)")
    folder.add_argument(
        "--video-dir",
        help="folder of videos (mp4, mov, webm, mkv, gif; walked recursively): OneVision, "
        "LLaVA-NeXT-Video",
    )
    p.add_argument(
        "--frames", type=int, default=DEFAULT_NUM_FRAMES, help="frames sampled from each video"
    )
    p.add_argument("--output", "-o", required=True, help="JSONL file to append to ('-': stdout)")
    p.add_argument("--prompt", "-p", default=None, help="the question asked")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_sampling_args(p, kv_bits=False)
    add_structured_args(p)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    run_cli(lambda: run(args))


def caption_with_args(args: argparse.Namespace, model, processor) -> int:
    """Caption `args.image_dir` into `args.output` (`--image-dir` of caption.py and
    generate.py); the number of captions written."""
    from ..caption import caption_folder
    from ..distributed import main_print

    sampling = sampling_kwargs(args)
    if sampling.pop("kv_bits", None) is not None:
        raise ValueError("--kv-bits is not supported when captioning in batches")
    video_dir = getattr(args, "video_dir", None)
    default = DEFAULT_VIDEO_PROMPT if video_dir else DEFAULT_CAPTION_PROMPT
    n = caption_folder(
        model,
        processor,
        video_dir or args.image_dir,
        args.output,
        prompt=args.prompt or default,
        batch_size=args.batch_size,
        progress=not getattr(args, "quiet", False),
        videos=bool(video_dir),
        num_frames=getattr(args, "frames", DEFAULT_NUM_FRAMES),
        **sampling,
    )
    if args.output not in (None, "-"):
        main_print(f"wrote {n} caption(s) to {args.output}")
    return n


def run(args: argparse.Namespace) -> None:
    sampling_kwargs(args)  # bad flags fail before the model loads
    if args.frames < 1:
        raise ValueError(f"--frames must be at least 1, got {args.frames}")
    folder = args.video_dir or args.image_dir
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no such folder: {folder}")
    model, processor = load_from_args(args)
    caption_with_args(args, model, processor)


if __name__ == "__main__":
    main()
