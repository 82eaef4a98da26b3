"""Asking: each question answered greedily, questions about one picture sharing its prefix.

Questions that share a picture are asked one after the other with one `PromptCache`, so the
picture and the system prompt are encoded once. The LLaVA-1.5 instruction "Answer the question
using a single word or phrase." (vqa) or "Answer with the option's letter from the given choices
directly." (scienceqa) goes on a new line after the question.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from ..generate import PromptCache, generate
from ..image_processor import ImageLoadError, load_image
from ..model import Model
from ..processor import IMAGE_PLACEHOLDER, Processor
from .questions import Question
from .scoring import score, summarize

SINGLE_WORD_SUFFIX = "Answer the question using a single word or phrase."
OPTION_LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."
DEFAULT_MAX_TOKENS = 16


def question_prompt(question: Question, fmt: str, suffix: bool = True) -> str:
    """The user's words: the question, then on a new line the format's answer instruction
    (unless `suffix` is False or the question already ends with it)."""
    text = question.text
    instruction = OPTION_LETTER_SUFFIX if fmt == "scienceqa" else SINGLE_WORD_SUFFIX
    if not suffix or text.endswith(instruction):
        return text
    return f"{text}\n{instruction}"


def group_by_image(questions: Sequence[Question]) -> list[tuple[Optional[str], list[Question]]]:
    """(image, its questions) in order of first appearance; text-only questions form one group."""
    groups: dict[Optional[str], list[Question]] = {}
    for q in questions:
        groups.setdefault(q.image, []).append(q)
    return list(groups.items())


def answer_questions(
    model: Model,
    processor: Processor,
    questions: Sequence[Question],
    fmt: str,
    image_folder: Union[str, Path],
    suffix: bool = True,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    skip_missing: bool = False,
    model_id: Optional[str] = None,
) -> Iterator[dict]:
    """Answer each question greedily, grouped by picture, and score it.

    Args:
        model, processor: from `load`; `processor.format_prompt` applies the template.
        questions: from `read_questions`.
        fmt: "vqa" or "scienceqa".
        image_folder: the folder the questions' image paths are relative to.
        suffix: append the format's answer instruction to each question.
        max_tokens: the most tokens per answer.
        skip_missing: leave questions whose picture cannot be read out of the scores (else
            they count as wrong).
        model_id: written into each record.

    Yields:
        One record per question, pictures grouped: {"question_id", "prompt", "text",
        "answer", "category", "correct", ...}; "error" says why a question was not asked and
        "skipped" that it is not scored.
    """
    cache = PromptCache(model)
    folder = Path(image_folder)
    for image, group in group_by_image(questions):
        picture, error = None, None
        if image is not None:
            try:
                picture = load_image(folder / image)
            except ImageLoadError as e:
                error = str(e)
        for q in group:
            user = question_prompt(q, fmt, suffix)
            text, question_error = "", error
            if error is None:
                prompt = processor.format_prompt(user, num_images=0 if picture is None else 1)
                try:
                    text = generate(
                        model,
                        processor,
                        prompt,
                        image=picture,
                        max_tokens=max_tokens,
                        temperature=0.0,
                        prompt_cache=cache,
                    ).strip()
                except ValueError as e:  # e.g. a prompt longer than the model's context
                    question_error = str(e)
            record = {
                "question_id": q.question_id,
                "prompt": (IMAGE_PLACEHOLDER + "\n" if image else "") + user,
                "text": text,
                "answer": q.answers[0] if len(q.answers) == 1 else (q.answers or None),
                "category": q.category,
                "image": image,
            }
            record.update(score(q, text, fmt))
            if model_id is not None:
                record["model_id"] = model_id
            if question_error is not None:
                record["error"] = question_error
                if skip_missing and error is not None:
                    record["correct"] = None
                    record["skipped"] = True
                else:
                    record["correct"] = False if q.answers else None
            yield record


def evaluate(
    model: Model,
    processor: Processor,
    questions: Sequence[Question],
    fmt: str,
    image_folder: Union[str, Path],
    **kwargs,
) -> tuple[list[dict], dict]:
    """All records and their summary; keyword arguments as for `answer_questions`."""
    records = list(answer_questions(model, processor, questions, fmt, image_folder, **kwargs))
    return records, summarize(records, fmt)
