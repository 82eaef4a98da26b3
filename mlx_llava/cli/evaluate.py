"""evaluate.py: answer a question file greedily and report accuracy (vqa, ScienceQA or chat)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, TextIO

from ..evaluation import DEFAULT_MAX_TOKENS, DEFAULT_SPLIT, FORMATS
from ..progress import Progress
from ..video_io import DEFAULT_NUM_FRAMES
from . import run_cli
from .args import add_model_args, load_from_args, make_parser


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(
        "Evaluate a LLaVA model on a question file: greedy answers, accuracy per "
        "category (vqa), ScienceQA multiple-choice accuracy with the image split, or "
        "accuracy per category and per turn of multi-turn conversations (chat)."
    )
    add_model_args(p)
    p.add_argument(
        "--data",
        required=True,
        help="questions: a JSON list / JSONL of {question_id, image, text, answer, category} "
        "(or 'video' for a video file), LLaVA's ScienceQA llava_test_CQM-A.json, ScienceQA's "
        "problems.json, or LLaVA-format conversations {id, image, conversations: [human, gpt, "
        "human, gpt, ...]} (chat)",
    )
    p.add_argument(
        "--image-folder",
        default=None,
        help="folder the image and video paths are relative to (default: the data file's "
        "folder, or its images/SPLIT for ScienceQA)",
    )
    p.add_argument(
        "--frames",
        type=int,
        default=DEFAULT_NUM_FRAMES,
        help="frames sampled uniformly over each video (OneVision, LLaVA-NeXT-Video; default 8)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="default: from the file (conversations with more than one question: chat)",
    )
    p.add_argument(
        "--split",
        default=DEFAULT_SPLIT,
        help="pid_splits.json split, for a raw ScienceQA problems.json",
    )
    p.add_argument("--output", "-o", default=None, help="write the answers here as JSONL")
    p.add_argument(
        "--single-word-suffix",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="append the answer instruction to each question: 'Answer the question using a "
        "single word or phrase.' (vqa, chat) or 'Answer with the option's letter from the "
        "given choices directly.' (scienceqa) (default: on, off for chat, where the questions "
        "are asked as a person types them)",
    )
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="only the first N questions (chat: conversations)",
    )
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave questions whose picture or video cannot be read out of the scores "
        "(default: they count as wrong)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    run_cli(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    """Answer, score and summarise; under `mlx.launch` the ranks share the questions and
    rank 0 alone writes the answers and prints the summary."""
    from .. import distributed
    from ..evaluation import (
        answer_questions,
        default_image_folder,
        format_summary,
        read_questions,
        summarize,
    )

    if args.max_tokens <= 0:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    if args.frames < 1:
        raise ValueError(f"--frames must be at least 1, got {args.frames}")
    fmt, questions = read_questions(args.data, args.format, args.split)
    if fmt == "chat" and args.limit is not None:
        kept = set(list(dict.fromkeys(q.conversation_id for q in questions))[: args.limit])
        questions = [q for q in questions if q.conversation_id in kept]
    else:
        questions = questions[: args.limit]
    folder = Path(args.image_folder or default_image_folder(args.data, fmt, args.split))
    if any(q.image or q.video for q in questions) and not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    main = distributed.is_main()
    out: Optional[TextIO] = None
    if args.output and main:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        out = open(args.output, "w", encoding="utf-8")
    try:
        model, processor = load_from_args(args)
        progress = Progress(len(questions), "[evaluate]", "q", enabled=main)
        records = []
        answers = answer_questions(
            model,
            processor,
            questions,
            fmt,
            folder,
            suffix=args.single_word_suffix,
            max_tokens=args.max_tokens,
            skip_missing=args.skip_missing,
            model_id=str(args.model),
            num_frames=args.frames,
        )
        for record in answers:
            records.append(record)
            if "error" in record and main:
                outcome = "skipped" if record.get("skipped") else "counted as wrong"
                progress.message(
                    f"warning: question {record['question_id']}: {record['error']} ({outcome})"
                )
            if out is not None:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
            progress.update(len(records))
        progress.close()
    finally:
        if out is not None:
            out.close()
    if not main:
        return
    summary = summarize(records, fmt)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    if args.output:
        print(f"answers: {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
