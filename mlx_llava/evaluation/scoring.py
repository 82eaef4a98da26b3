"""Scoring answers as LLaVA's eval scripts do, and summarising accuracy per category.

vqa and chat answers are scored by normalised exact match and by whether they contain the
reference answer, chats also per turn; ScienceQA answers by the option letter parsed as
`eval_science_qa.py` does, overall and for questions with and without a picture (the paper's
ScienceQA-IMG figure).
"""

from __future__ import annotations

import unicodedata
from typing import Any, Optional, Sequence

from .options import OPTIONS, parse_option_letter
from .questions import Question

ARTICLES = frozenset({"a", "an", "the"})


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


def _row(records: list[dict], fmt: str) -> dict:
    scored = [r for r in records if r["correct"] is not None]
    n = len(scored)
    correct = sum(bool(r["correct"]) for r in scored)
    row = {"n": n, "correct": correct, "accuracy": 100.0 * correct / n if n else None}
    if fmt != "scienceqa":
        contains = sum(bool(r.get("contains")) for r in scored)
        row["contains"] = contains
        row["contains_accuracy"] = 100.0 * contains / n if n else None
    return row


def summarize(records: Sequence[dict], fmt: str) -> dict:
    """Accuracy overall and per category (in order of appearance), in percent, over the
    scored records.

    vqa and chat rows hold exact-match `correct` / `accuracy` and contains-match `contains` /
    `contains_accuracy`; chat adds `turns`, a row per turn number ("1", "2", ...); scienceqa
    adds the `image` / `no_image` split of the paper and `unparsed`, the scored answers with no
    option letter.
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
    if fmt == "chat":
        turns = sorted({r["turn"] for r in records})
        summary["turns"] = {
            str(t): _row([r for r in records if r["turn"] == t], fmt) for t in turns
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
    if fmt == "chat":
        rows += [(f"turn {t}", row) for t, row in summary["turns"].items()]
    rows.append(("overall", summary["overall"]))
    width = max(8, *(len(name) for name, _ in rows))
    if fmt != "scienceqa":
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
