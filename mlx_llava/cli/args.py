"""Flags shared by the command-line tools: the model, sampling, and `--help` with defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..decoding import KV_BITS
from ..loader import DEFAULT_MODEL
from ..sampling import ResponseFormat, SamplingError, SamplingParams

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


def add_sampling_args(
    p: argparse.ArgumentParser, kv_bits: bool = True, max_tokens: int = DEFAULT_MAX_TOKENS
) -> None:
    """The sampling flags (one per `SamplingParams` field) shared by generate.py, its chat
    mode, captioning and the server (whose values are the defaults of requests)."""
    p.add_argument(
        "--max-tokens", "-m", type=int, default=max_tokens, help="the most tokens to answer"
    )
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p sampling (0: off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="(default: off)")
    p.add_argument(
        "--repetition-context-size", type=int, default=20, help="tokens the penalty looks back on"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: unseeded)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    if kv_bits:
        p.add_argument(
            "--kv-bits",
            type=int,
            default=None,
            help="quantize the KV cache to 2, 3, 4, 6 or 8 bits (default: off)",
        )


def add_structured_args(p: argparse.ArgumentParser) -> None:
    """--json and --json-schema: answers constrained to JSON (llguidance)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="answer a JSON object")
    group.add_argument(
        "--json-schema",
        default=None,
        metavar="FILE",
        help="answer JSON that validates against the JSON schema in FILE",
    )


def response_format(args: argparse.Namespace) -> "ResponseFormat | None":
    """The response format of --json / --json-schema (checked when the params are made).

    Raises:
        ValueError: the schema file cannot be read or is not JSON, naming the flag.
    """
    path = getattr(args, "json_schema", None)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                schema = json.load(f)
        except OSError as e:
            raise ValueError(f"--json-schema cannot read {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise ValueError(f"--json-schema {path} is not JSON: {e}") from None
        return ResponseFormat.json_schema(schema)
    return ResponseFormat.json_object() if getattr(args, "json", False) else None


# SamplingParams field -> (flag, argparse attribute)
SAMPLING_FLAGS = {
    "max_tokens": ("--max-tokens", "max_tokens"),
    "temperature": ("--temp", "temp"),
    "top_p": ("--top-p", "top_p"),
    "min_p": ("--min-p", "min_p"),
    "top_k": ("--top-k", "top_k"),
    "repetition_penalty": ("--repetition-penalty", "repetition_penalty"),
    "repetition_context_size": ("--repetition-context-size", "repetition_context_size"),
    "seed": ("--seed", "seed"),
    "stop": ("--stop", "stop"),
}


def sampling_params(args: argparse.Namespace, **defaults) -> SamplingParams:
    """The sampling flags a command has, as a `SamplingParams` (over `defaults`).

    Raises:
        ValueError: a value out of range, naming its flag.
    """
    fields = {
        f: getattr(args, attr) for f, (_, attr) in SAMPLING_FLAGS.items() if hasattr(args, attr)
    }
    fields["response_format"] = response_format(args)
    try:
        return SamplingParams(**{**defaults, **fields})
    except SamplingError as e:
        if e.field == "response_format":
            flag = "--json-schema" if getattr(args, "json_schema", None) else "--json"
        else:
            flag = SAMPLING_FLAGS[e.field][0]
        raise ValueError(f"{flag} {e.reason}") from None


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `stream_generate` / `batch_generate` for the sampling flags
    (checked: a value out of range is a ValueError naming its flag)."""
    out = dataclasses.asdict(sampling_params(args))
    out["stop"] = list(out["stop"])
    for name in ("response_format", "logprobs"):  # no flag of these set: not passed on
        if out[name] is None:
            del out[name]
    if hasattr(args, "kv_bits"):
        if args.kv_bits is not None and args.kv_bits not in KV_BITS:
            raise ValueError(
                f"--kv-bits must be one of {', '.join(map(str, KV_BITS))}, got {args.kv_bits}"
            )
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
