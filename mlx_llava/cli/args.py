"""Flags shared by the command-line tools: the model, sampling, and `--help` with defaults."""

from __future__ import annotations

import argparse

from ..loader import DEFAULT_MODEL

DEFAULT_MAX_TOKENS = 256
DTYPE_CHOICES = ["float16", "bfloat16", "float32"]


def _shows_default(action: argparse.Action) -> bool:
    """Whether `--help` should add `(default: ...)`: flags that take a value and have one."""
    return (
        action.option_strings != []
        and action.nargs != 0  # store_true / store_false: the flag's name says it
        and not any(action.default is empty for empty in (None, False, argparse.SUPPRESS))
        and action.default != []
        and "default" not in (action.help or "")
    )


class HelpFormatter(argparse.HelpFormatter):
    """`--help` shows each flag's default, unless it is empty or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not _shows_default(action):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose `--help` lists every flag's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if not action.help and _shows_default(action):
            action.help = "(default: %(default)s)"
        return action


def make_parser(description: str) -> argparse.ArgumentParser:
    return ArgumentParser(description=description)


def add_model_args(p: argparse.ArgumentParser, default_model: bool = True) -> None:
    """--model, --mmproj, --dtype, --pad-to-square, --conv-mode."""
    if default_model:
        p.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help="MLX folder (this project's or mlx-vlm's), llava-hf or original LLaVA folder, "
            "hub repo id, a llama.cpp GGUF (with --mmproj) or a folder holding a GGUF pair, "
            "ollama:NAME, or 'demo' (the bundled toy model) (default: "
            f"{DEFAULT_MODEL}, downloaded (~14 GB) and converted into ~/.cache/mlx_llava on "
            "first use)",
        )
    else:
        p.add_argument(
            "--model",
            required=True,
            help="MLX folder, llava-hf or original LLaVA folder, hub repo id, GGUF, "
            "ollama:NAME, or 'demo'",
        )
    p.add_argument(
        "--mmproj",
        default=None,
        help="the mmproj GGUF (CLIP tower and projector) of a GGUF language model --model",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="cast the weights (default: as stored; float16 for checkpoints converted on load)",
    )
    p.add_argument(
        "--pad-to-square",
        action="store_true",
        default=None,
        help="pad pictures to a square with the mean colour first, as the original LLaVA-1.5 "
        "(default: as the checkpoint was trained)",
    )
    p.add_argument(
        "--conv-mode",
        default=None,
        help="conversation template (default: the checkpoint's, else llava-hf's)",
    )


def add_sampling_args(p: argparse.ArgumentParser, kv_bits: bool = True) -> None:
    """The sampling flags shared by generate.py, its chat mode and captioning."""
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p sampling (0: off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="(default: off)")
    p.add_argument("--repetition-context-size", type=int, default=20)
    p.add_argument("--seed", type=int, default=None, help="random seed (default: unseeded)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    if kv_bits:
        p.add_argument(
            "--kv-bits", type=int, default=None, help="quantize the KV cache, e.g. 8 (default: off)"
        )


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `stream_generate` / `batch_generate` for the sampling flags."""
    if args.max_tokens <= 0:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    out = dict(
        max_tokens=args.max_tokens,
        temperature=args.temp,
        top_p=args.top_p,
        min_p=args.min_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size,
        seed=args.seed,
        stop=args.stop,
    )
    if hasattr(args, "kv_bits"):
        out["kv_bits"] = args.kv_bits
    return out


def load_from_args(args: argparse.Namespace):
    """(model, processor) for the model flags (and `--pipeline`, where a command has it)."""
    from ..loader import load

    return load(
        args.model,
        dtype=args.dtype,
        pad_to_square=args.pad_to_square,
        conv_mode=args.conv_mode,
        pipeline=getattr(args, "pipeline", False),
        mmproj=args.mmproj,
    )
