"""Benchmark evaluation, as LLaVA's eval scripts: a question file -> greedy answers -> accuracy.

`questions` reads the formats (LLaVA's VQA question files, ScienceQA, multi-turn chats),
`runner` asks the model, `scoring` scores the answers and summarises them per category.
"""

from .options import OPTIONS, parse_option_letter
from .questions import (
    DEFAULT_SPLIT,
    FORMATS,
    EvaluationError,
    Question,
    default_image_folder,
    detect_format,
    read_questions,
    scienceqa_prompt,
)
from .runner import (
    DEFAULT_MAX_TOKENS,
    OPTION_LETTER_SUFFIX,
    SINGLE_WORD_SUFFIX,
    answer_questions,
    default_suffix,
    evaluate,
    group_by_conversation,
    group_by_image,
    question_prompt,
)
from .scoring import (
    contains_match,
    exact_match,
    format_summary,
    normalize_answer,
    score,
    summarize,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_SPLIT",
    "FORMATS",
    "OPTIONS",
    "OPTION_LETTER_SUFFIX",
    "SINGLE_WORD_SUFFIX",
    "EvaluationError",
    "Question",
    "answer_questions",
    "default_suffix",
    "contains_match",
    "default_image_folder",
    "detect_format",
    "evaluate",
    "exact_match",
    "format_summary",
    "group_by_conversation",
    "group_by_image",
    "normalize_answer",
    "parse_option_letter",
    "question_prompt",
    "read_questions",
    "scienceqa_prompt",
    "score",
    "summarize",
]
