"""Evaluation question files: LLaVA's VQA question files and ScienceQA, read into `Question`s.

- "vqa": LLaVA's question files (`llava/eval/model_vqa_loader.py`), a JSON list or JSONL of
  ``{"question_id", "image", "text", "answer"?, "category"?}``, such as the shapes world's
  ``qa.json``; a question about a video has ``"video"`` (a file) instead of, or beside,
  ``"image"`` (OneVision, LLaVA-NeXT-Video).
- "scienceqa": the `llava_test_CQM-A.json` conversation file made by LLaVA's
  `scripts/convert_sqa_to_llava.py`, its JSONL variant, or the raw ScienceQA ``problems.json``
  with ``pid_splits.json`` beside it.
- "chat": multi-turn conversations in LLaVA-Instruct format, ``{"id", "image",
  "conversations": [{"from": "human", "value", "category"?}, {"from": "gpt", "value"}, ...]}``
  (such as the shapes world's ``chat_heldout.json``), or ``"video"``: each human turn is a
  question, the gpt turn after it its reference answer; the model answers the turns in order,
  its own answers in the history (see `runner`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..datafiles import DataFileError, read_records, relative_picture
from ..processor import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from .options import OPTIONS, parse_option_letter

FORMATS = ("vqa", "scienceqa", "chat")
DEFAULT_SPLIT = "test"

# A question file that cannot be read or understood (the data-file error of the package).
EvaluationError = DataFileError


@dataclass
class Question:
    """One evaluation question.

    Attributes:
        question_id: the file's id, written back unchanged with the answer.
        text: the question as the user asks it, without `<image>` (`<video>`) or the answer
            instruction.
        image: the picture's path relative to the image folder, or None (text only).
        answers: the accepted answers (vqa), or the correct letter (scienceqa); empty when
            the file has none, and the question is then answered but not scored.
        category: a label to break accuracy down by (vqa category, ScienceQA subject).
        num_choices: the number of options of a multiple-choice question.
        conversation_id: the conversation a chat turn belongs to (None outside chats).
        turn: the turn's number in its conversation, from 1 (0 outside chats).
        video: the video's path relative to the image folder, or None.
    """

    question_id: Any
    text: str
    image: Optional[str] = None
    answers: list[str] = field(default_factory=list)
    category: Optional[str] = None
    num_choices: int = 0
    conversation_id: Any = None
    turn: int = 0
    video: Optional[str] = None


def detect_format(records: Any) -> Optional[str]:
    """The format of a file's contents, "vqa", "scienceqa" or "chat" (conversations of which
    one has more than one question); None if none fits."""
    if isinstance(records, dict):
        first = next(iter(records.values()), None)
        return "scienceqa" if isinstance(first, dict) and "choices" in first else None
    if not isinstance(records, list) or not records or not isinstance(records[0], dict):
        return None
    if "conversations" in records[0]:
        long = any(
            isinstance(r, dict)
            and isinstance(r.get("conversations"), list)
            and len(r["conversations"]) > 2
            for r in records
        )
        return "chat" if long else "scienceqa"
    if "instruction" in records[0]:
        return "scienceqa"
    return "vqa" if "text" in records[0] else None


def read_questions(
    path: Union[str, Path], fmt: Optional[str] = None, split: str = DEFAULT_SPLIT
) -> tuple[str, list[Question]]:
    """Read a question file.

    Args:
        path: a vqa question file, a ScienceQA conversation file, or ScienceQA's problems.json.
        fmt: "vqa" or "scienceqa"; None to tell from the contents.
        split: the `pid_splits.json` split to take from a raw problems.json.

    Returns:
        (format, questions in file order)

    Raises:
        EvaluationError: the file is missing, not JSON, empty or not in the format.
    """
    if fmt is not None and fmt not in FORMATS:
        raise EvaluationError(f"unknown format '{fmt}' (choose from: {', '.join(FORMATS)})")
    path = Path(path)
    records = read_records(path)
    if isinstance(records, dict) and fmt != "scienceqa" and "question_id" in records:
        records = [records]  # a one-line JSONL file
    if isinstance(records, list) and not records:
        raise EvaluationError(f"{path} holds no questions")
    detected = detect_format(records)
    fmt = fmt or detected
    if fmt is None:
        raise EvaluationError(
            f"cannot tell the format of {path}: expected a list of questions with 'text' "
            "(vqa), ScienceQA conversations, ScienceQA's problems.json, or multi-turn "
            "conversations (chat); see --format"
        )
    if fmt == "scienceqa":
        if isinstance(records, dict):
            return fmt, _read_scienceqa_problems(records, path, split)
        return fmt, [
            _read_scienceqa_entry(r, i, path) for i, r in enumerate(_as_list(records, path))
        ]
    if fmt == "chat":
        entries = _as_list(records, path)
        return fmt, [q for i, r in enumerate(entries) for q in _read_chat_entry(r, i, path)]
    return fmt, [_read_vqa_entry(r, i, path) for i, r in enumerate(_as_list(records, path))]


def _as_list(records: Any, path: Path) -> list:
    if not isinstance(records, list):
        raise EvaluationError(f"{path} should hold a list of questions, not a JSON object")
    return records


def _question_text(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise EvaluationError(f"{where}: the question should be a string")
    # The picture (video) goes first, as LLaVA does.
    return text.replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "").strip()


def _image(entry: dict, where: str, key: str = "image") -> Optional[str]:
    """The entry's picture (or with `key` "video", video) path, checked to stay relative."""
    image = entry.get(key)
    if image is not None and not isinstance(image, str):
        raise EvaluationError(f"{where}: '{key}' should be a file name")
    return relative_picture(image, where) if image else None


def _read_vqa_entry(entry: Any, index: int, path: Path) -> Question:
    where = f"{path} entry {index + 1}"
    if not isinstance(entry, dict):
        raise EvaluationError(f"{where} is not a JSON object")
    if "text" not in entry:
        raise EvaluationError(f"{where} has no 'text' (the question)")
    answer = entry.get("answer", entry.get("answers"))
    if answer is None:
        answers = []
    elif isinstance(answer, (list, tuple)):
        # VQAv2 annotations list {"answer": ...} objects
        answers = [str(a["answer"] if isinstance(a, dict) else a) for a in answer]
    else:
        answers = [str(answer)]
    category = entry.get("category")
    return Question(
        question_id=entry.get("question_id", entry.get("id", index)),
        text=_question_text(entry["text"], where),
        image=_image(entry, where),
        answers=answers,
        category=None if category is None else str(category),
        video=_image(entry, where, "video"),
    )


def _read_chat_entry(entry: Any, index: int, path: Path) -> list[Question]:
    """The questions of one conversation, in turn order."""
    where = f"{path} entry {index + 1}"
    if not isinstance(entry, dict):
        raise EvaluationError(f"{where} is not a JSON object")
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise EvaluationError(f"{where}: 'conversations' should be a list of turns")
    if len(turns) % 2 or any(
        not isinstance(t, dict) or t.get("from") != ("human", "gpt")[i % 2]
        for i, t in enumerate(turns)
    ):
        raise EvaluationError(
            f"{where}: 'conversations' should alternate human and gpt turns, from a human one"
        )
    conversation_id = entry.get("id", index)
    image, video = _image(entry, where), _image(entry, where, "video")
    questions = []
    for n, (question, answer) in enumerate(zip(turns[::2], turns[1::2]), start=1):
        reference = answer.get("value")
        if not isinstance(reference, str):
            raise EvaluationError(f"{where}: turn {n}'s answer should be a string")
        category = question.get("category")
        questions.append(
            Question(
                question_id=f"{conversation_id}-{n}",
                text=_question_text(question.get("value"), where),
                image=image,
                answers=[reference],
                category=None if category is None else str(category),
                conversation_id=conversation_id,
                turn=n,
                video=video,
            )
        )
    return questions


def _count_options(text: str) -> int:
    line = next((s for s in text.splitlines() if s.startswith("Options:")), text)
    return len(re.findall(r"\(([A-E])\)", line)) or len(OPTIONS)


def _read_scienceqa_entry(entry: Any, index: int, path: Path) -> Question:
    """An entry of `llava_test_CQM-A.json` (conversations) or of its JSONL variant."""
    where = f"{path} entry {index + 1}"
    if not isinstance(entry, dict):
        raise EvaluationError(f"{where} is not a JSON object")
    if "conversations" in entry:
        turns = entry["conversations"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
            raise EvaluationError(f"{where}: 'conversations' should be a list of turns")
        question, reference = (
            turns[0].get("value"),
            (turns[1].get("value") if len(turns) > 1 and isinstance(turns[1], dict) else None),
        )
    elif "instruction" in entry:
        question, reference = entry["instruction"], entry.get("output")
    else:
        raise EvaluationError(f"{where} has neither 'conversations' nor 'instruction'")
    text = _question_text(question, where)
    answer = entry.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool):
        answer = OPTIONS[answer] if 0 <= answer < len(OPTIONS) else None
    if answer is None and isinstance(reference, str):
        answer = parse_option_letter(reference)
    return Question(
        question_id=entry.get("id", entry.get("question_id", index)),
        text=text,
        image=_image(entry, where),
        answers=[answer] if answer else [],
        category=entry.get("category"),
        num_choices=_count_options(text),
    )


def scienceqa_prompt(problem: dict) -> str:
    """A ScienceQA problem as LLaVA's CQM-A prompt (`convert_sqa_to_llava_base_prompt.py`,
    no caption): "Context: {hint or N/A}\\nQuestion: {question}\\nOptions: (A) .. (B) .."."""
    context = str(problem.get("hint") or "").strip() or "N/A"
    choices = " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"]))
    text = f"Context: {context}\nQuestion: {problem['question']}\nOptions: {choices}\n"
    return text.replace("  ", " ").strip()


def _read_scienceqa_problems(problems: dict, path: Path, split: str) -> list[Question]:
    """The `split` of a raw problems.json, with pid_splits.json beside it."""
    splits_path = path.parent / "pid_splits.json"
    splits = read_records(splits_path)
    if not isinstance(splits, dict) or split not in splits:
        known = ", ".join(sorted(splits)) if isinstance(splits, dict) else "none"
        raise EvaluationError(f"{splits_path} has no split '{split}' (splits: {known})")
    questions = []
    for pid in splits[split]:
        problem = problems.get(str(pid))
        if not isinstance(problem, dict) or "choices" not in problem:
            raise EvaluationError(f"{path} has no problem '{pid}' of split '{split}'")
        answer = problem.get("answer")
        questions.append(
            Question(
                question_id=str(pid),
                text=scienceqa_prompt(problem),
                image=f"{pid}/{problem['image']}" if problem.get("image") else None,
                answers=[OPTIONS[answer]] if isinstance(answer, int) else [],
                category=problem.get("subject"),
                num_choices=len(problem["choices"]),
            )
        )
    if not questions:
        raise EvaluationError(f"split '{split}' of {splits_path} is empty")
    return questions


def default_image_folder(path: Union[str, Path], fmt: str, split: str = DEFAULT_SPLIT) -> Path:
    """Where pictures are looked up when no folder is given: beside the data file, or in its
    `images/{split}` for ScienceQA (LLaVA's `playground/data/eval/scienceqa` layout)."""
    folder = Path(path).parent
    if fmt == "scienceqa" and (folder / "images" / split).is_dir():
        return folder / "images" / split
    return folder
