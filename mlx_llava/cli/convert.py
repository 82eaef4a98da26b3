"""convert.py: a LLaVA checkpoint (llava-hf or original) -> an MLX folder."""

from __future__ import annotations

import argparse

from ..convert import DTYPES, QuantizeSpec, convert
from . import run_cli
from .args import make_parser

DEFAULT_DTYPE = "float16"


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("Convert a LLaVA checkpoint to MLX.")
    p.add_argument(
        "--hf-path",
        required=True,
        help="a llava-hf or original LLaVA folder, a hub repo id, an MLX folder (to convert "
        "again, e.g. quantize), a GGUF language model (with --mmproj), ollama:NAME, or 'demo'",
    )
    p.add_argument("--mlx-path", required=True, help="output folder")
    p.add_argument("--dtype", choices=list(DTYPES), default=DEFAULT_DTYPE)
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the language model")
    p.add_argument("--q-bits", type=int, choices=[2, 3, 4, 6, 8], default=4)
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64)
    p.add_argument(
        "--quantize-vision",
        action="store_true",
        help="quantize the vision tower and projector too",
    )
    p.add_argument(
        "--vision-tower",
        help="CLIP checkpoint for original releases (default: mm_vision_tower)",
    )
    p.add_argument("--mmproj", help="the mmproj GGUF of a GGUF language model --hf-path")
    p.add_argument("--conv-mode", help="record this conversation template in the output")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress line on a terminal")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)

    def command():
        spec = None
        if args.quantize:
            spec = QuantizeSpec(args.q_bits, args.q_group_size, args.quantize_vision)
        if args.conv_mode:
            from ..conversation import get_template

            get_template(args.conv_mode)
        out = convert(
            args.hf_path,
            args.mlx_path,
            dtype=args.dtype,
            quantize=spec,
            vision_tower=args.vision_tower,
            conv_mode=args.conv_mode,
            force=args.force,
            progress=not args.quiet,
            mmproj=args.mmproj,
        )
        print(f"wrote {out}")

    run_cli(command)


if __name__ == "__main__":
    main()
