"""Benchmark evaluation: a question file -> greedy answers -> accuracy, as LLaVA's eval scripts.

Two formats:

- "vqa": LLaVA's question files (`llava/eval/model_vqa_loader.py`), a JSON list or JSONL of
  ``{"question_id", "image", "text", "answer"?, "category"?}``, such as the shapes world's
  ``qa.json``. The LLaVA-1.5 instruction "Answer the question using a single word or phrase."
  goes on a new line after the question; answers are scored by normalised exact match and by
  whether they contain the reference answer.
- "scienceqa": ScienceQA multiple choice as LLaVA-1.5 evaluates it (`model_vqa_science.py
  --single-pred-prompt`, `eval_science_qa.py`): the `llava_test_CQM-A.json` conversation file
  made by `scripts/convert_sqa_to_llava.py` ("Context: ...\\nQuestion: ...\\nOptions: (A) ...
  (B) ..."), its JSONL variant, or the raw ScienceQA ``problems.json`` with ``pid_splits.json``
  beside it. "Answer with the option's letter from the given choices directly." follows the
  question; the letter is parsed from the answer as the original does and scored overall and
  for questions with and without a picture (the paper's ScienceQA-IMG figure).

Questions that share a picture are asked one after the other with one `PromptCache`, so the
picture and the system prompt are encoded once.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from .generate import PromptCache, generate
from .image_processor import ImageLoadError, load_image
from .model import Model
from .processor import IMAGE_PLACEHOLDER, Processor

FORMATS = ("vqa", "scienceqa")
SINGLE_WORD_SUFFIX = "Answer the question using a single word or phrase."
OPTION_LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."
OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options
ARTICLES = frozenset({"a", "an", "the"})
DEFAULT_MAX_TOKENS = 16
DEFAULT_SPLIT = "test"


class EvaluationError(ValueError):
    """A question file that cannot be read or understood."""


@dataclass
class Question:
    """One evaluation question.

    Attributes:
        question_id: the file's id, written back unchanged with the answer.
        text: the question as the user asks it, without `<image>` or the answer instruction.
        image: the picture's path relative to the image folder, or None (text only).
        answers: the accepted answers (vqa), or the correct letter (scienceqa); empty when
            the file has none, and the question is then answered but not scored.
        category: a label to break accuracy down by (vqa category, ScienceQA subject).
        num_choices: the number of options of a multiple-choice question.
    """

    question_id: Any
    text: str
    image: Optional[str] = None
    answers: list[str] = field(default_factory=list)
    category: Optional[str] = None
    num_choices: int = 0


# Scoring ------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lowercase; drop apostrophes, punctuation (to spaces) and the articles a/an/the; collapse
    whitespace. "The Red circle." -> "red circle"."""
    text = str(text).lower().replace("'", "").replace("\u2019", "")
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(w for w in text.split() if w not in ARTICLES)


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the normalised prediction equals one of the normalised answers."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def contains_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the normalised prediction holds one of the normalised answers as whole words
    ("a red one" holds "red"; "reddish" does not)."""
    pred = f" {normalize_answer(prediction)} "
    for answer in answers:
        norm = normalize_answer(answer)
        if (norm and f" {norm} " in pred) or (not norm and not pred.strip()):
            return True
    return False


def parse_option_letter(prediction: str, num_choices: int = len(OPTIONS)) -> Optional[str]:
    """The option letter of an answer, parsed as LLaVA's `eval_science_qa.py` does.

    Accepted: the bare letter ("B"), a letter and ". " first ("B. the moon"), or "The answer is
    B" anywhere. None when nothing matches or the letter is beyond the question's options.
    """
    text = prediction.replace("\n", ". ")
    letter = None
    if text.strip() in OPTIONS:
        letter = text.strip()
    elif len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        letter = text[0]
    elif "The answer is " in text:
        match = re.search(r"The answer is ([A-E])\.", text) or re.search(
            r"The answer is ([A-E])", text
        )
        letter = match.group(1) if match else None
    return letter if letter in OPTIONS[:num_choices] else None


def score(question: Question, text: str, fmt: str) -> dict:
    """The scoring fields of one answer: `correct` (None when unscored) and per format
    `contains` (vqa) or `parsed`, the letter read from the answer (scienceqa)."""
    if fmt == "scienceqa":
        parsed = parse_option_letter(text, question.num_choices or len(OPTIONS))
        correct = (parsed == question.answers[0]) if question.answers else None
        return {"parsed": parsed, "correct": correct}
    if not question.answers:
        return {"correct": None, "contains": None}
    return {
        "correct": exact_match(text, question.answers),
        "contains": contains_match(text, question.answers),
    }


# Reading ------------------------------------------------------------------------------------


def read_records(path: Union[str, Path]) -> Any:
    """The parsed contents of a JSON or JSONL file.

    Raises:
        EvaluationError: the file is missing or is not valid JSON / JSONL.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise EvaluationError(f"data file {what}: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationError(f"cannot read data file {path}: {e}") from e
    if path.suffix != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):  # else several values: JSONL
                raise EvaluationError(
                    f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
                ) from e
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvaluationError(
                    f"{path} line {lineno} is not valid JSON ({e.msg}, column {e.colno})"
                ) from e
    return records


def detect_format(records: Any) -> Optional[str]:
    """The format of a file's contents, "vqa" or "scienceqa"; None if neither fits."""
    if isinstance(records, dict):
        first = next(iter(records.values()), None)
        return "scienceqa" if isinstance(first, dict) and "choices" in first else None
    if not isinstance(records, list) or not records or not isinstance(records[0], dict):
        return None
    if "conversations" in records[0] or "instruction" in records[0]:
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
            "(vqa), ScienceQA conversations, or ScienceQA's problems.json; see --format"
        )
    if fmt == "scienceqa":
        if isinstance(records, dict):
            return fmt, _read_scienceqa_problems(records, path, split)
        return fmt, [
            _read_scienceqa_entry(r, i, path) for i, r in enumerate(_as_list(records, path))
        ]
    return fmt, [_read_vqa_entry(r, i, path) for i, r in enumerate(_as_list(records, path))]


def _as_list(records: Any, path: Path) -> list:
    if not isinstance(records, list):
        raise EvaluationError(f"{path} should hold a list of questions, not a JSON object")
    return records


def _question_text(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise EvaluationError(f"{where}: the question should be a string")
    return text.replace(IMAGE_PLACEHOLDER, "").strip()  # the picture goes first, as LLaVA does


def _image(entry: dict, where: str) -> Optional[str]:
    image = entry.get("image")
    if image is not None and not isinstance(image, str):
        raise EvaluationError(f"{where}: 'image' should be a file name")
    return image or None


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
    )


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
        question, reference = turns[0].get("value"), (
            turns[1].get("value") if len(turns) > 1 and isinstance(turns[1], dict) else None
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


# Asking -------------------------------------------------------------------------------------


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


# Summaries ----------------------------------------------------------------------------------


def _row(records: list[dict], fmt: str) -> dict:
    scored = [r for r in records if r["correct"] is not None]
    n = len(scored)
    correct = sum(bool(r["correct"]) for r in scored)
    row = {"n": n, "correct": correct, "accuracy": 100.0 * correct / n if n else None}
    if fmt == "vqa":
        contains = sum(bool(r.get("contains")) for r in scored)
        row["contains"] = contains
        row["contains_accuracy"] = 100.0 * contains / n if n else None
    return row


def summarize(records: Sequence[dict], fmt: str) -> dict:
    """Accuracy overall and per category (in order of appearance), in percent, over the
    scored records.

    vqa rows hold exact-match `correct` / `accuracy` and contains-match `contains` /
    `contains_accuracy`; scienceqa adds the `image` / `no_image` split of the paper and
    `unparsed`, the scored answers with no option letter.
    """
    records = list(records)
    categories = list(dict.fromkeys(r["category"] for r in records if r.get("category")))
    summary: dict[str, Any] = {
        "format": fmt,
        "questions": len(records),
        "scored": sum(r["correct"] is not None for r in records),
        "errors": sum("error" in r for r in records),
        "skipped": sum(bool(r.get("skipped")) for r in records),
        "overall": _row(records, fmt),
        "categories": {
            c: _row([r for r in records if r.get("category") == c], fmt) for c in categories
        },
    }
    if fmt == "scienceqa":
        summary["image"] = _row([r for r in records if r.get("image")], fmt)
        summary["no_image"] = _row([r for r in records if not r.get("image")], fmt)
        summary["unparsed"] = sum(
            r["correct"] is not None and r.get("parsed") is None for r in records
        )
    return summary


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}%"


def format_summary(summary: dict) -> str:
    """A plain-text table of `summarize`'s result."""
    fmt = summary["format"]
    rows: list[tuple[str, dict]] = list(summary["categories"].items())
    if fmt == "scienceqa":
        rows += [("image", summary["image"]), ("no image", summary["no_image"])]
    rows.append(("overall", summary["overall"]))
    width = max(8, *(len(name) for name, _ in rows))
    if fmt == "vqa":
        lines = [f"{'category':<{width}} {'n':>6} {'exact':>8} {'contains':>9}"]
        for name, row in rows:
            lines.append(
                f"{name:<{width}} {row['n']:>6} {_pct(row['accuracy']):>8} "
                f"{_pct(row['contains_accuracy']):>9}"
            )
    else:
        lines = [f"{'split':<{width}} {'n':>6} {'accuracy':>9}"]
        for name, row in rows:
            lines.append(f"{name:<{width}} {row['n']:>6} {_pct(row['accuracy']):>9}")
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    notes = []
    unscored = summary["questions"] - summary["scored"] - summary["skipped"]
    if unscored:
        notes.append(f"{unscored} question(s) without a reference answer were not scored")
    if summary["skipped"]:
        notes.append(f"{summary['skipped']} question(s) skipped (picture unreadable)")
    failed = summary["errors"] - summary["skipped"]
    if failed:
        notes.append(f"{failed} question(s) could not be asked and count as wrong")
    if summary.get("unparsed"):
        notes.append(f"{summary['unparsed']} answer(s) had no option letter (counted as wrong)")
    return "\n".join(lines + notes)


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
