"""ScienceQA's option letters, as LLaVA's `eval_science_qa.py` reads them (used by the question
readers and the scorer alike)."""

from __future__ import annotations

import re
from typing import Optional

OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options


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
