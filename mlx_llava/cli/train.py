"""train.py: the two LLaVA training stages (pretrain: projector; finetune: projector + LLM)."""

from __future__ import annotations

import argparse

from ..video_io import DEFAULT_NUM_FRAMES
from . import run_cli
from .args import DTYPE_CHOICES, make_parser

DEFAULT_BATCH_SIZE = 8
DEFAULT_LORA_RANK = 8
DEFAULT_LORA_SCALE = 2.0
DEFAULT_WARMUP_RATIO = 0.03
DEFAULT_LOG_EVERY = 10
DEFAULT_VAL_EVERY = 200


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(
        "Train LLaVA on MLX: stage 1 (--stage pretrain) aligns the projector on "
        "image-caption pairs; stage 2 (--stage finetune) tunes the projector and the language "
        "model on conversations. The output folder is a model that load() and generate.py take."
    )
    p.add_argument("--model", required=True, help="MLX folder, llava-hf folder, hub repo id, demo")
    p.add_argument("--data", required=True, help="LLaVA JSON (or JSONL) training records")
    p.add_argument(
        "--image-folder",
        default=None,
        help="root of the 'image' paths (default: the data file's folder)",
    )
    p.add_argument(
        "--video-folder",
        default=None,
        help="root of the 'video' paths (default: the image folder)",
    )
    p.add_argument(
        "--frames",
        type=int,
        default=DEFAULT_NUM_FRAMES,
        help="frames sampled uniformly over each video (default 8)",
    )
    p.add_argument("--stage", choices=["pretrain", "finetune"], required=True)
    p.add_argument("--output", required=True, help="output model folder")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--iters", type=int, default=None, help="optimizer steps")
    length.add_argument(
        "--epochs", type=float, default=None, help="passes over the data (default 1)"
    )
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="peak learning rate (default 1e-3 pretrain, 2e-5 finetune, 2e-4 LoRA)",
    )
    p.add_argument("--warmup-ratio", type=float, default=DEFAULT_WARMUP_RATIO)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 turns clipping off")
    p.add_argument("--lora", action="store_true", help="finetune LoRA adapters (fused at save)")
    p.add_argument("--lora-rank", type=int, default=DEFAULT_LORA_RANK)
    p.add_argument("--lora-scale", type=float, default=DEFAULT_LORA_SCALE, help="alpha / rank")
    p.add_argument("--train-vision", action="store_true", help="also train the vision tower")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute activations")
    p.add_argument(
        "--conv-mode",
        default=None,
        help="finetune template (default: the model's, else vicuna_v1; OneVision: chatml)",
    )
    p.add_argument("--max-length", type=int, default=None, help="longest sample in tokens")
    p.add_argument("--on-bad-sample", choices=["skip", "stop"], default="skip")
    p.add_argument("--val-data", default=None, help="LLaVA JSON for the validation loss")
    p.add_argument("--val-every", type=int, default=DEFAULT_VAL_EVERY)
    p.add_argument("--val-batches", type=int, default=0, help="0: the whole validation set")
    p.add_argument("--log-every", type=int, default=DEFAULT_LOG_EVERY)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="saved weights (default: the input model's)",
    )
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="do not mx.compile the training step",
    )
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    run_cli(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    from ..train import TrainArgs, train

    train(TrainArgs(**vars(args)))


if __name__ == "__main__":
    main()
