"""Shapes world: a synthetic visual-QA dataset for training a tiny demo LLaVA.

Each picture shows 1-3 non-overlapping filled shapes on a light background.
``generate_dataset`` writes the pictures to ``DIR/images`` and, beside them:

- ``pretrain.json``: one caption per picture, LLaVA-558K pretraining format;
- ``finetune.json``: a conversation per picture, LLaVA-Instruct format: 1-4 questions of mixed
  categories asked in the training wordings (`mlx_llava.data.wordings`), one-word answers, now
  and then a request for a description answered by the caption;
- ``qa.json``: every applicable question in the four original wordings (``QUESTION_TEXT``),
  one per entry, for evaluation;
- ``qa_heldout.json``: every applicable question once more, each in a held-out wording;
- ``chat_heldout.json``: a three-turn conversation per picture in held-out wordings, each
  question turn labelled with its ``category`` (``evaluate.py --format chat``);
- ``captions_heldout.json``: a request for a description per picture, held-out wordings, the
  caption as answer;
- with a validation fraction, the same files with ``_val`` for the last pictures generated.

Held-out wordings never appear in ``pretrain.json`` or ``finetune.json``.

Usage::

    python -m mlx_llava.data.shapes --out DIR --n N [--seed S]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from PIL import Image, ImageDraw

from .wordings import ask

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
KINDS = ("circle", "square", "triangle")
NUMBER_WORDS = ("one", "two", "three")
CATEGORIES = ("color", "shape", "count", "position")
IMAGE_TOKEN = "<image>"
CAPTION_PROMPT = "Describe the image."
QUESTION_TEXT: dict[str, str] = {
    "color": "What color is the shape?",
    "shape": "What shape is this?",
    "count": "How many shapes are there?",
    "position": "Is the shape on the left or on the right?",
}

DEFAULT_SEED = 0
DEFAULT_MIN_SIZE = 64
DEFAULT_MAX_SIZE = 256
DEFAULT_VAL_FRACTION = 0.0
DEFAULT_REPEAT_SHARE = 0.0

MIN_PICTURE_SIZE = 32
MAX_ASPECT = 1.5
BACKGROUND_RANGE = (215, 250)  # each channel of the background
SHAPE_SIZE_RANGE = (0.15, 0.30)  # fraction of the shorter picture side
SHAPE_COUNT_WEIGHTS = (2, 1, 1)  # for 1, 2, 3 shapes: half the pictures single-shape
CENTER_MARGIN = 0.1  # a lone shape's centre stays this fraction of the width off the middle
GAP = 2  # free pixels between shapes and along the border
ORDER_GAP = 4  # pixels between shape centres along x, so left-to-right order is clear
PLACEMENT_TRIES = 100  # candidate shapes per layout before starting it again
TURNS_RANGE = (1, 4)  # question turns per finetuning conversation
DESCRIBE_SHARE = 0.2  # of the finetuning conversations, with a request for a description
EVAL_CHAT_TURNS = 3
FILES = ("pretrain", "finetune", "qa", "qa_heldout", "chat_heldout", "captions_heldout")
PROGRESS_EVERY = 1000  # pictures between progress lines, at least


@dataclass(frozen=True)
class Shape:
    """A filled shape; ``size`` is the side of its square bounding box, in pixels."""

    kind: str
    color: str
    cx: float
    cy: float
    size: float

    def apart_from(self, other: Shape) -> bool:
        """Whether the boxes are ``GAP`` apart and the centres ``ORDER_GAP`` along x."""
        dx, dy = abs(self.cx - other.cx), abs(self.cy - other.cy)
        reach = (self.size + other.size) / 2 + GAP
        return dx >= ORDER_GAP and (dx >= reach or dy >= reach)


def picture_size(rng: random.Random, min_size: int, max_size: int) -> tuple[int, int]:
    """Random ``(width, height)`` in ``[min_size, max_size]``, aspect ratio <= 1.5."""
    width = rng.randint(min_size, max_size)
    low = max(min_size, math.ceil(width / MAX_ASPECT))
    high = min(max_size, math.floor(width * MAX_ASPECT))
    return width, rng.randint(low, high)


def draw_scene(
    rng: random.Random, width: int, height: int, repeat_share: float = 0.0
) -> tuple[Image.Image, list[Shape]]:
    """Draw 1-3 random non-overlapping shapes on a light grey or cream background.

    Args:
        rng: the only source of randomness, so equal states give equal scenes.
        width, height: picture size in pixels, each at least ``MIN_PICTURE_SIZE``.
        repeat_share: the chance that a shape after the first takes the colour and kind of
            one placed before it (beyond the 1 in 12 of chance), so that repeated shapes
            ("two blue squares") are common; 0 draws every shape independently.

    Returns:
        The RGB picture and its shapes in placement order.
    """
    count = rng.choices((1, 2, 3), weights=SHAPE_COUNT_WEIGHTS)[0]
    shapes = _place_shapes(rng, count, width, height, repeat_share)
    level = rng.randint(*BACKGROUND_RANGE)
    warmth = rng.randint(0, level - BACKGROUND_RANGE[0])  # 0: grey, most: cream
    background = (level, level - warmth // 3, level - warmth)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        draw_shape(draw, shape)
    return image, shapes


def _place_shapes(
    rng: random.Random, count: int, width: int, height: int, repeat_share: float
) -> list[Shape]:
    """Rejection-sample ``count`` shapes inside the picture and apart from each other."""
    short = min(width, height)
    while True:
        shapes: list[Shape] = []
        for _ in range(PLACEMENT_TRIES):
            size = rng.uniform(*SHAPE_SIZE_RANGE) * short
            reach = size / 2 + GAP
            shape = Shape(
                kind=rng.choice(KINDS),
                color=rng.choice(list(COLORS)),
                cx=rng.uniform(reach, width - 1 - reach),
                cy=rng.uniform(reach, height - 1 - reach),
                size=size,
            )
            if repeat_share and shapes and rng.random() < repeat_share:
                twin = rng.choice(shapes)
                shape = dataclasses.replace(shape, kind=twin.kind, color=twin.color)
            if count == 1 and abs(shape.cx - width / 2) < CENTER_MARGIN * width:
                continue
            if all(shape.apart_from(other) for other in shapes):
                shapes.append(shape)
            if len(shapes) == count:
                return shapes


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill=None) -> None:
    """Fill one shape (in its colour unless `fill` is given); a triangle points up and sits
    centred in its box."""
    half = shape.size / 2
    x0, y0, x1, y1 = shape.cx - half, shape.cy - half, shape.cx + half, shape.cy + half
    fill = COLORS[shape.color] if fill is None else fill
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        rise = shape.size * math.sqrt(3) / 4  # half the height of an equilateral
        apex = (shape.cx, shape.cy - rise)
        draw.polygon([apex, (x1, shape.cy + rise), (x0, shape.cy + rise)], fill=fill)


def caption(shapes: list[Shape]) -> str:
    """Describe the shapes left to right, equal ones grouped.

    For example "A red circle." or "Two green circles and a red square.".
    """
    groups: dict[tuple[str, str], int] = {}
    for shape in sorted(shapes, key=lambda s: s.cx):
        key = (shape.color, shape.kind)
        groups[key] = groups.get(key, 0) + 1
    phrases = [
        f"a {color} {kind}" if n == 1 else f"{NUMBER_WORDS[n - 1]} {color} {kind}s"
        for (color, kind), n in groups.items()
    ]
    text = phrases[-1]
    if len(phrases) > 1:
        text = ", ".join(phrases[:-1]) + " and " + text
    return text[0].upper() + text[1:] + "."


def answers(shapes: list[Shape], width: int) -> dict[str, str]:
    """The one-word answer of each question category that applies to these shapes.

    Colour and shape apply when all shapes share them, position only to a lone shape (its
    centre against the middle of a picture ``width`` wide); count always. In ``CATEGORIES``
    order.
    """
    colors = {shape.color for shape in shapes}
    kinds = {shape.kind for shape in shapes}
    found: dict[str, str] = {}
    if len(colors) == 1:
        found["color"] = colors.pop()
    if len(kinds) == 1:
        found["shape"] = kinds.pop()
    found["count"] = NUMBER_WORDS[len(shapes) - 1]
    if len(shapes) == 1:
        found["position"] = "left" if shapes[0].cx < width / 2 else "right"
    return found


def questions(shapes: list[Shape], width: int) -> list[tuple[str, str, str]]:
    """Every applicable question in its original wording (``QUESTION_TEXT``).

    Returns:
        ``(category, question, answer)`` triples in ``CATEGORIES`` order.
    """
    return [(c, QUESTION_TEXT[c], a) for c, a in answers(shapes, width).items()]


def pretrain_record(image_id: str, image: str, shapes: list[Shape]) -> dict:
    """A LLaVA-558K style captioning record."""
    return {
        "id": image_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}"},
            {"from": "gpt", "value": caption(shapes)},
        ],
    }


def _turns(
    rng: random.Random, shapes: list[Shape], width: int, categories: list[str], held_out: bool
) -> list[dict]:
    """Human/gpt turns asking `categories` in order, no wording twice; the first turn carries
    the picture, every question its ``category``."""
    truth = {**answers(shapes, width), "describe": caption(shapes)}
    conversations, asked = [], set()
    for turn, category in enumerate(categories):
        for _ in range(PLACEMENT_TRIES):
            question = ask(rng, category, len(shapes), held_out)
            if question not in asked:
                break
        asked.add(question)
        prefix = f"{IMAGE_TOKEN}\n" if turn == 0 else ""
        conversations.append({"from": "human", "value": prefix + question, "category": category})
        conversations.append({"from": "gpt", "value": truth[category]})
    return conversations


def _categories(rng: random.Random, applicable: list[str], n: int) -> list[str]:
    """`n` categories: the applicable ones in random order, then random repeats."""
    chosen = rng.sample(applicable, min(n, len(applicable)))
    return chosen + [rng.choice(applicable) for _ in range(n - len(chosen))]


def finetune_record(
    rng: random.Random, image_id: str, image: str, shapes: list[Shape], width: int
) -> dict:
    """A LLaVA-Instruct style record in training wordings: 1-4 questions of the applicable
    categories (one may be asked twice), and in ``DESCRIBE_SHARE`` of the records a request for
    a description."""
    applicable = list(answers(shapes, width))
    turns = min(rng.randint(*TURNS_RANGE), len(applicable) + 1)  # at most one repeat
    categories = _categories(rng, applicable, turns)
    if rng.random() < DESCRIBE_SHARE:
        categories.insert(rng.randint(0, len(categories)), "describe")
    turns = _turns(rng, shapes, width, categories, held_out=False)
    for t in turns:
        t.pop("category", None)
    return {"id": image_id, "image": image, "conversations": turns}


def chat_record(
    rng: random.Random, image_id: str, image: str, shapes: list[Shape], width: int
) -> dict:
    """A three-turn evaluation conversation in held-out wordings (categories repeat when fewer
    than three apply); each human turn says its ``category``."""
    categories = _categories(rng, list(answers(shapes, width)), EVAL_CHAT_TURNS)
    turns = _turns(rng, shapes, width, categories, held_out=True)
    return {"id": image_id, "image": image, "conversations": turns}


def qa_records(image_id: str, image: str, qa: list[tuple[str, str, str]]) -> list[dict]:
    """Evaluation entries, one question each."""
    return [
        {
            "question_id": f"{image_id}-{category}",
            "image": image,
            "text": question,
            "answer": answer,
            "category": category,
        }
        for category, question, answer in qa
    ]


def heldout_qa(
    rng: random.Random, shapes: list[Shape], width: int, categories: list[str]
) -> list[tuple[str, str, str]]:
    """`(category, question, answer)` for `categories` (``"describe"``: the caption), each in a
    held-out wording."""
    truth = {**answers(shapes, width), "describe": caption(shapes)}
    return [(c, ask(rng, c, len(shapes), held_out=True), truth[c]) for c in categories]


def generate_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = DEFAULT_SEED,
    min_size: int = DEFAULT_MIN_SIZE,
    max_size: int = DEFAULT_MAX_SIZE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    repeat_share: float = DEFAULT_REPEAT_SHARE,
    verbose: bool = False,
) -> dict[str, int]:
    """Write ``n`` pictures and their annotation files to ``out_dir``.

    The output depends only on the arguments: the same seed gives the same files byte for
    byte, and the same pictures whatever the wordings (the text has its own random stream).
    The last ``round(n * val_fraction)`` pictures go to the ``*_val.json`` files, written
    only when there are any. ``repeat_share`` as for `draw_scene`.

    Returns:
        Counts: ``images`` (all pictures), ``val`` (those for validation), and the
        ``qa.json`` plus ``qa_val.json`` entries of each category in ``CATEGORIES``.

    Raises:
        ValueError: for ``n < 1``, sizes out of order or below
            ``MIN_PICTURE_SIZE``, or ``val_fraction`` or ``repeat_share`` outside
            ``[0, 1)``.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not MIN_PICTURE_SIZE <= min_size <= max_size:
        raise ValueError(
            f"need {MIN_PICTURE_SIZE} <= min_size <= max_size, "
            f"got min_size={min_size}, max_size={max_size}"
        )
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0 <= repeat_share < 1:
        raise ValueError(f"repeat_share must be in [0, 1), got {repeat_share}")

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    text_rng = random.Random(f"text-{seed}")
    files: dict[str, list[list[dict]]] = {name: [] for name in FILES}
    counts = dict.fromkeys(CATEGORIES, 0)
    for i in range(n):
        width, height = picture_size(rng, min_size, max_size)
        picture, shapes = draw_scene(rng, width, height, repeat_share)
        image_id = f"{i:06d}"
        image = f"images/{image_id}.png"
        picture.save(out / image)
        items = questions(shapes, width)
        applicable = [category for category, _, _ in items]
        files["pretrain"].append([pretrain_record(image_id, image, shapes)])
        files["finetune"].append([finetune_record(text_rng, image_id, image, shapes, width)])
        files["qa"].append(qa_records(image_id, image, items))
        heldout = heldout_qa(text_rng, shapes, width, applicable)
        files["qa_heldout"].append(qa_records(image_id, image, heldout))
        files["chat_heldout"].append([chat_record(text_rng, image_id, image, shapes, width)])
        described = heldout_qa(text_rng, shapes, width, ["describe"])
        files["captions_heldout"].append(qa_records(image_id, image, described))
        for category in applicable:
            counts[category] += 1
        if verbose and (i + 1) % max(PROGRESS_EVERY, n // 10) == 0 and i + 1 < n:
            print(f"[shapes] {i + 1}/{n} images", flush=True)

    n_val = round(n * val_fraction)
    splits = [("", slice(0, n - n_val))]
    if n_val:
        splits.append(("_val", slice(n - n_val, n)))
    for suffix, part in splits:
        for name, records in files.items():
            _write_json(out / f"{name}{suffix}.json", [r for rs in records[part] for r in rs])
    return {"images": n, "val": n_val, **counts}


def _write_json(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(records, f, indent=2)
        f.write("\n")


class _ArgumentParser(argparse.ArgumentParser):
    """Reports a bad command line in one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> None:
    parser = _ArgumentParser(
        prog="python -m mlx_llava.data.shapes",
        description="Generate the Shapes world visual-QA dataset.",
    )
    parser.add_argument("--out", required=True, help="Output folder.")
    parser.add_argument("--n", type=int, required=True, help="Number of pictures.")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="Random seed.")
    parser.add_argument("--min-size", type=int, default=DEFAULT_MIN_SIZE, help="Smallest side.")
    parser.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, help="Largest side.")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help="Fraction of pictures held out into the *_val.json files.",
    )
    parser.add_argument(
        "--repeat-share",
        type=float,
        default=DEFAULT_REPEAT_SHARE,
        help="Chance that a shape after the first repeats the colour and kind of an earlier "
        "one (more captions like 'Two blue squares.').",
    )
    args = parser.parse_args(argv)
    try:
        counts = generate_dataset(
            args.out,
            args.n,
            seed=args.seed,
            min_size=args.min_size,
            max_size=args.max_size,
            val_fraction=args.val_fraction,
            repeat_share=args.repeat_share,
            verbose=True,
        )
    except ValueError as e:
        parser.error(str(e))
    questions_line = ", ".join(f"{c} {counts[c]}" for c in CATEGORIES)
    val = f", the last {counts['val']} for validation" if counts["val"] else ""
    print(
        f"[shapes] wrote {counts['images']} pictures{val} to {args.out} "
        f"(questions: {questions_line})"
    )


if __name__ == "__main__":
    main()
