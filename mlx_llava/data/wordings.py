"""The ways people ask about a shapes-world picture, and a fixed split of them.

Each question category (colour, shape, count, left/right position, and a description) has
templates whose slots expand to every wording: the subject and its verb ("it is", "the shapes
are", "the object does"), "colour" or "color", where to look ("", " in the picture", ...), what
to count ("shapes", "objects", "things"). A fixed part of the wordings is held out from training
and used only to evaluate:

- every wording of the `HELD_OUT` templates (phrasings the model never saw), and
- one in `COMBINATION_HOLD_OUT` of the wordings of the other templates that have several,
  chosen by a checksum of the wording (seen phrasings with an unseen subject or place).

The pinned wordings (the demo's four original questions and the ones the web page's test asks)
always stay in training. Wordings are compared normalised (`normalize`: lower case, no
punctuation), so a held-out wording never reaches training with other capitals or punctuation.
"""

from __future__ import annotations

import itertools
import random
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache

WORDING_CATEGORIES = ("color", "shape", "count", "position", "describe")
COMBINATION_HOLD_OUT = 6  # one in this many wordings of the training templates is held out
PINNED_SHARE = 0.15  # of the training questions, asked with a pinned wording
LOWER_CASE_SHARE = 0.15  # of the questions, asked with a lower-case first letter
NO_PUNCTUATION_SHARE = 0.15  # of the questions, asked without the final "?" or "."

# A subject, as subject and as object, and its verbs "be" and "do", per number: "one" for a
# lone shape, "many" for several.
SUBJECTS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "one": (
        ("the shape", "the shape", "is", "does"),
        ("it", "it", "is", "does"),
        ("the object", "the object", "is", "does"),
        ("the thing", "the thing", "is", "does"),
        ("this shape", "this shape", "is", "does"),
        ("this object", "this object", "is", "does"),
        ("this", "this", "is", "does"),
    ),
    "many": (
        ("the shapes", "the shapes", "are", "do"),
        ("they", "them", "are", "do"),
        ("the objects", "the objects", "are", "do"),
        ("the things", "the things", "are", "do"),
        ("these shapes", "these shapes", "are", "do"),
        ("these", "these", "are", "do"),
    ),
}
SLOTS: dict[str, tuple[str, ...]] = {
    "colour": ("colour", "color"),
    "where": ("", " in the picture", " in the image", " in this picture", " in this image"),
    "shapes": ("shapes", "objects", "things"),
    "picture": ("picture", "image"),
}

# Templates per category. {it} / {them}, {is}, {does}: the subject (as subject / as object) and
# its verbs; {colour}, {where}, {shapes}, {picture}: the SLOTS. A template with a subject fits
# pictures of its number; one without fits any; "one|" keeps a template to the singular.
TRAIN: dict[str, tuple[str, ...]] = {
    "color": (
        "What {colour} {is} {it}{where}?",
        "What is the {colour} of {them}{where}?",
        "What {colour}?",
        "{colour}?",
        "Name the {colour} of {them}{where}.",
        "Tell me the {colour} of {them}{where}.",
        "What {colour} {does} {it} have?",
        "What's the {colour} of {them}{where}?",
        "Please tell me the {colour}.",
        "{is} {it} red, green, blue or yellow?",
        "What {colour} do you see{where}?",
        "Identify the {colour} of {them}.",
        "The {colour} of {them}?",
        "In what {colour} {is} {it} drawn?",
        "What hue {is} {it}{where}?",
        "Which shade {is} {it}?",
        "Can you tell me the {colour} of {them}?",
        "Give the {colour} of {them}{where}.",
        "Would you tell me the {colour}?",
    ),
    "shape": (
        "What shape {is} {it}{where}?",
        "What shape is{where}?",
        "What shape?",
        "Shape?",
        "What kind of shape {is} {it}{where}?",
        "What is the shape of {them}{where}?",
        "Name the shape{where}.",
        "one|Is {it} a circle, a square or a triangle?",
        "What shape do you see{where}?",
        "Which form {does} {it} have?",
        "Identify the shape.",
        "Circle, square or triangle?",
        "What geometric shape {is} {it}?",
        "Please name the shape.",
        "Tell me what shape {it} {is}.",
        "What shape is shown{where}?",
    ),
    "count": (
        "How many shapes are there{where}?",
        "How many?",
        "How many {shapes}?",
        "How many {shapes} are there{where}?",
        "How many {shapes} do you see{where}?",
        "Count the {shapes}{where}.",
        "What is the number of {shapes}{where}?",
        "Number of {shapes}?",
        "Count them.",
        "How many {shapes} are in the {picture}?",
        "Tell me how many {shapes} there are.",
        "One, two or three?",
        "Please count the {shapes}.",
        "How many {shapes} are drawn{where}?",
        "Can you count the {shapes}?",
    ),
    "position": (
        "Is {it} on the left or on the right{where}?",
        "Left or right?",
        "Where is {it}{where}?",
        "Is {it} on the left or right side?",
        "Is {it} to the left or to the right{where}?",
        "Which side?",
        "Is {it} left or right?",
        "Is {it} on the right or on the left?",
        "Which side of the {picture} is {it} on?",
        "Is {it} in the left half or the right half?",
        "Tell me which side {it} {is} on.",
        "Please say left or right.",
        "Where is {it} placed?",
    ),
    "describe": (
        "Describe the {picture}.",
        "What is in the {picture}?",
        "What do you see?",
        "Describe what you see.",
        "Tell me what is in the {picture}.",
        "What does the {picture} show?",
        "What can you see?",
        "Describe this {picture}.",
        "Tell me about the {picture}.",
        "What's in the {picture}?",
        "Give a description of the {picture}.",
        "What is shown{where}?",
    ),
}
HELD_OUT: dict[str, tuple[str, ...]] = {
    "color": (
        "Which {colour} {is} {it}{where}?",
        "Name the {colour}.",
        "What {colour} would you say {it} {is}?",
        "{it} {is} what {colour}?",
    ),
    "shape": (
        "Which shape {is} {it}{where}?",
        "What type of shape {is} {it}?",
        "Tell me the shape of {them}.",
        "What shape can you see{where}?",
    ),
    "count": (
        "How many {shapes} can you see{where}?",
        "Count the shapes, please.",
        "Give the number of {shapes}.",
        "How many {shapes} are shown?",
    ),
    "position": (
        "On which side of the {picture} is {it}?",
        "Which side is {it} on{where}?",
        "Left side or right side?",
        "Which half of the {picture} is {it} in?",
    ),
    "describe": ("Describe it.", "What can you see in the {picture}?"),
}
# The demo's original questions and those the web page's test asks: always trained on.
PINNED: dict[str, tuple[str, ...]] = {
    "color": ("What color is the shape?", "What colour is the shape?"),
    "shape": ("What shape is this?", "What shape is in the picture?"),
    "count": ("How many shapes are there?",),
    "position": ("Is the shape on the left or on the right?",),
    "describe": ("Describe the image.",),
}


@dataclass(frozen=True)
class Wording:
    """One way to ask: `text` fits pictures of `number` "one" or "many" shapes, or "any";
    `template` is where it comes from (the text itself for a pinned wording)."""

    category: str
    text: str
    number: str = "any"
    template: str = ""

    def fits(self, num_shapes: int) -> bool:
        """Whether the wording suits a picture of `num_shapes` shapes."""
        return self.number == "any" or (self.number == "one") == (num_shapes == 1)


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: the form wordings are compared in."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def expand(template: str, category: str) -> list[Wording]:
    """Every wording of a template: each subject (for the numbers it fits) times the SLOTS.

    The shape category leaves out subjects that say "shape" ("What shape is the shape?").
    """
    numbers: tuple[str, ...] = ("one", "many")
    if template.startswith("one|") or category == "position":  # a side: of a lone shape
        numbers, template = ("one",), template.removeprefix("one|")
    names = [n for n in SLOTS if "{" + n + "}" in template]
    if "{it}" not in template and "{them}" not in template:
        numbers = ("any",)
    out = []
    for number in numbers:
        subjects = SUBJECTS.get(number, (("", "", "", ""),))
        if category == "shape":
            subjects = tuple(s for s in subjects if "shape" not in s[0])
        for (it, them, is_, does), values in itertools.product(
            subjects, itertools.product(*(SLOTS[n] for n in names))
        ):
            slots = {"it": it, "them": them, "is": is_, "does": does}
            text = template.format(**slots, **dict(zip(names, values)))
            out.append(Wording(category, text[0].upper() + text[1:], number, template))
    return out


def _expand_all(templates: tuple[str, ...], category: str) -> list[Wording]:
    return [w for t in templates for w in expand(t, category)]


@lru_cache(maxsize=None)
def wording_split() -> dict[str, dict[str, tuple[Wording, ...]]]:
    """The fixed split: ``{"train": {category: wordings}, "held_out": {category: wordings}}``.

    No wording of one side has the normalised text of a wording of the other side.
    """
    split: dict[str, dict[str, tuple[Wording, ...]]] = {"train": {}, "held_out": {}}
    for category in WORDING_CATEGORIES:
        pinned = {normalize(t) for t in PINNED[category]}
        held = _expand_all(HELD_OUT[category], category)
        trained = []
        for template in TRAIN[category]:
            expanded = expand(template, category)
            trained += expanded
            if len(expanded) > 1:  # a phrasing with one wording is trained on as it is
                held += [w for w in expanded if _checksum(w.text) % COMBINATION_HOLD_OUT == 0]
        held_texts = {normalize(w.text) for w in held} - pinned
        pinned_wordings = [Wording(category, t, "any", t) for t in PINNED[category]]
        split["train"][category] = _unique(
            [w for w in pinned_wordings + trained if normalize(w.text) not in held_texts]
        )
        split["held_out"][category] = _unique([w for w in held if normalize(w.text) in held_texts])
    return split


def _checksum(text: str) -> int:
    return zlib.crc32(normalize(text).encode())


def _unique(wordings: list[Wording]) -> tuple[Wording, ...]:
    """First of each (normalised text, number)."""
    seen, out = set(), []
    for w in wordings:
        key = (normalize(w.text), w.number)
        if key not in seen:
            seen.add(key)
            out.append(w)
    return tuple(out)


def wordings(category: str, held_out: bool, num_shapes: int) -> tuple[Wording, ...]:
    """The training (or held-out) wordings of `category` that suit `num_shapes` shapes."""
    side = wording_split()["held_out" if held_out else "train"][category]
    return tuple(w for w in side if w.fits(num_shapes))


@lru_cache(maxsize=None)
def _by_template(category: str, held_out: bool, num_shapes: int) -> tuple[tuple[Wording, ...]]:
    groups: dict[str, list[Wording]] = {}
    for w in wordings(category, held_out, num_shapes):
        groups.setdefault(w.template, []).append(w)
    return tuple(tuple(g) for g in groups.values())


def ask(rng: random.Random, category: str, num_shapes: int, held_out: bool = False) -> str:
    """A random wording of `category` that suits a picture of `num_shapes` shapes.

    A template is drawn uniformly, then one of its wordings, so that short forms are asked as
    often as long ones; in training a pinned wording `PINNED_SHARE` of the time. As people
    type, the first letter is sometimes lower case and the final punctuation missing.
    """
    if not held_out and rng.random() < PINNED_SHARE:
        text = rng.choice(PINNED[category])
    else:
        text = rng.choice(rng.choice(_by_template(category, held_out, num_shapes))).text
    if rng.random() < LOWER_CASE_SHARE:
        text = text[0].lower() + text[1:]
    if rng.random() < NO_PUNCTUATION_SHARE:
        text = text.rstrip(".?")
    return text
