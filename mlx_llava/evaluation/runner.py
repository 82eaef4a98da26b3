"""Asking: each question answered greedily, questions about one picture sharing its prefix.

Questions that share a picture (or a video) are asked one after the other with one
`PromptCache` (on one rank when `mlx.launch` runs several), so the picture and the system
prompt are encoded once; a video's frames are read once for its questions, and its questions
are prompted as generate.py prompts them (`<video>` first, then the question).
The LLaVA-1.5 instruction "Answer the question using a single word or phrase." (vqa) or "Answer
with the option's letter from the given choices directly." (scienceqa) goes on a new line after
the question.

A chat's turns are asked in order in one `ChatSession`, as a person chats: each turn's history
holds the model's own earlier answers, not the references. Chat questions get no instruction
unless asked for.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from .. import distributed
from ..chat import ChatSession
from ..generate import generate
from ..image_io import ImageLoadError, load_image
from ..model import Model
from ..processor import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Processor
from ..prompt import PromptCache
from ..video_io import DEFAULT_NUM_FRAMES, VideoLoadError, read_video
from .questions import Question
from .scoring import score, summarize

SINGLE_WORD_SUFFIX = "Answer the question using a single word or phrase."
OPTION_LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."
DEFAULT_MAX_TOKENS = 16
ROUND_UNITS = 4  # pictures (or text-only questions) per rank between two gatherings


def question_prompt(question: Question, fmt: str, suffix: bool = True) -> str:
    """The user's words: the question, then on a new line the format's answer instruction
    (unless `suffix` is False or the question already ends with it)."""
    text = question.text
    instruction = OPTION_LETTER_SUFFIX if fmt == "scienceqa" else SINGLE_WORD_SUFFIX
    if not suffix or text.endswith(instruction):
        return text
    return f"{text}\n{instruction}"


def default_suffix(fmt: str) -> bool:
    """Whether questions of `fmt` get the answer instruction by default: not in chats."""
    return fmt != "chat"


def group_by_image(questions: Sequence[Question]) -> list[tuple[Optional[str], list[Question]]]:
    """(image, its questions) in order of first appearance; text-only questions form one group."""
    groups: dict[Optional[str], list[Question]] = {}
    for q in questions:
        groups.setdefault(q.image, []).append(q)
    return list(groups.items())


def group_by_conversation(questions: Sequence[Question]) -> list[list[Question]]:
    """The questions of each conversation in turn order, conversations in order of first
    appearance."""
    groups: dict = {}
    for q in questions:
        groups.setdefault(q.conversation_id, []).append(q)
    return [sorted(group, key=lambda q: q.turn) for group in groups.values()]


def work_units(questions: Sequence[Question], fmt: str = "vqa") -> list[list[Question]]:
    """The questions in answering order, cut into the units a rank answers together: all the
    questions about one picture or video (they share its prefix), or one text-only question;
    in a chat, the turns of one conversation."""
    if fmt == "chat":
        return group_by_conversation(questions)
    groups: dict[tuple, list[Question]] = {}
    for q in questions:
        groups.setdefault((q.image, q.video), []).append(q)
    units = []
    for media, group in groups.items():
        units.extend([group] if media != (None, None) else [[q] for q in group])
    return units


def check_videos(model: Model, questions: Sequence[Question]) -> None:
    """Raise ValueError when questions are about videos and the model does not see videos."""
    about_videos = sum(q.video is not None for q in questions)
    if about_videos and not model.config.has_video:
        raise ValueError(
            f"{about_videos} question(s) are about videos, but {model.config.model_type} "
            "does not see videos (use a LLaVA-OneVision or LLaVA-NeXT-Video model)"
        )


def answer_questions(
    model: Model,
    processor: Processor,
    questions: Sequence[Question],
    fmt: str,
    image_folder: Union[str, Path],
    suffix: Optional[bool] = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    skip_missing: bool = False,
    model_id: Optional[str] = None,
    group: Optional[distributed.Group] = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> Iterator[dict]:
    """Answer each question greedily, grouped by picture, and score it.

    Under `mlx.launch` the ranks share the work: each round of `ROUND_UNITS` units per rank
    (`work_units`) is split across them, and every rank gets all the records back, in the order
    of one process.

    Args:
        model, processor: from `load`; `processor.format_prompt` applies the template.
        questions: from `read_questions`.
        fmt: "vqa", "scienceqa" or "chat".
        image_folder: the folder the questions' image (and video) paths are relative to.
        suffix: append the format's answer instruction to each question (default:
            `default_suffix(fmt)`).
        max_tokens: the most tokens per answer.
        skip_missing: leave questions whose picture (video) cannot be read out of the scores
            (else they count as wrong).
        model_id: written into each record.
        group: the ranks to share the questions (default: all of `mlx.launch`'s).
        num_frames: frames sampled uniformly over each video.

    Yields:
        One record per question, pictures (or conversations) grouped: {"question_id",
        "prompt", "text", "answer", "category", "image", "correct", ...}, chat turns with
        "conversation_id" and "turn", video questions with "video"; "error" says why a
        question was not asked and "skipped" that it is not scored.

    Raises:
        ValueError: questions about videos for a model that does not see videos.
    """
    check_videos(model, questions)
    group = group or distributed.world()
    suffix = default_suffix(fmt) if suffix is None else suffix
    cache = PromptCache(model)
    ask = partial(
        _answer_unit,
        model,
        processor,
        cache,
        Path(image_folder),
        fmt=fmt,
        suffix=suffix,
        max_tokens=max_tokens,
        skip_missing=skip_missing,
        model_id=model_id,
        num_frames=num_frames,
    )
    units = work_units(questions, fmt)
    step = ROUND_UNITS * group.size()
    for start in range(0, len(units), step):
        mine = distributed.shard(units[start : start + step], group)
        records = [record for unit in mine for record in ask(unit)]
        for rank_records in distributed.gather(records, group):
            yield from rank_records


def _answer_unit(
    model,
    processor,
    cache,
    folder: Path,
    unit: list[Question],
    *,
    fmt,
    suffix,
    max_tokens,
    skip_missing,
    model_id,
    num_frames,
) -> list[dict]:
    """The records of questions about one picture or video (or none), asked with one
    `PromptCache`, or of the turns of one conversation, asked in one `ChatSession`."""
    image, video = unit[0].image, unit[0].video
    picture, frames, error = None, None, None
    try:
        if image is not None:
            picture = load_image(folder / image)
        if video is not None:
            frames = read_video(folder / video, num_frames)
    except (ImageLoadError, VideoLoadError) as e:
        error = str(e)
    chat = None
    if fmt == "chat":
        chat = ChatSession(model, processor, image=picture, video=frames)
    stopped = None  # why a chat cannot go on
    records = []
    for q in unit:
        user = question_prompt(q, fmt, suffix)
        text, question_error = "", error or stopped
        if question_error is None:
            try:
                text = _answer(model, processor, user, picture, frames, chat, cache, max_tokens)
            except ValueError as e:  # e.g. a prompt longer than the model's context
                question_error = stopped = str(e)
        first = q.turn <= 1
        placeholders = (IMAGE_PLACEHOLDER + "\n" if image and first else "") + (
            VIDEO_PLACEHOLDER + "\n" if video and first else ""
        )
        record = {
            "question_id": q.question_id,
            "prompt": placeholders + user,
            "text": text,
            "answer": q.answers[0] if len(q.answers) == 1 else (q.answers or None),
            "category": q.category,
            "image": image,
        }
        if video is not None:
            record["video"] = video
        if chat is not None:
            record.update(conversation_id=q.conversation_id, turn=q.turn)
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
        records.append(record)
    return records


def _answer(model, processor, user, picture, frames, chat, cache, max_tokens) -> str:
    """The greedy answer to `user` (about `frames`, a video's, too): the chat's next turn, or
    a one-turn prompt."""
    if chat is not None:
        return chat.send(user, max_tokens=max_tokens, temperature=0.0).strip()
    if frames is not None:  # as generate.py puts it
        user = f"{VIDEO_PLACEHOLDER}\n{user}"
    prompt = processor.format_prompt(user, num_images=0 if picture is None else 1)
    return generate(
        model,
        processor,
        prompt,
        image=picture,
        video=frames,
        max_tokens=max_tokens,
        temperature=0.0,
        prompt_cache=cache,
    ).strip()


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
