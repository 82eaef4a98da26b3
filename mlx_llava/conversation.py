"""Conversation templates: turn (role, text) messages into LLaVA prompt strings.

Rendering follows ``Conversation.get_prompt`` of the original LLaVA
(haotian-liu/LLaVA ``llava/conversation.py``) byte for byte, plus ``llava_hf``,
which reproduces the chat template shipped with the llava-hf checkpoints.
``answer_mask_spans`` follows the masking of the original ``preprocess_v1`` /
``preprocess_llama_2`` / ``preprocess_mpt`` / ``preprocess_plain``
(``llava/train/train.py``).
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, auto

from .config import is_original_config

IMAGE_TOKEN = "<image>"

# llava-hf/llava-1.5-7b-hf's chat_template.json, verbatim.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


Message = tuple[str, str] | Mapping[str, str]

_ROLE_INDEX = {"user": 0, "human": 0, "assistant": 1, "gpt": 1}


class SeparatorStyle(Enum):
    """The original's separator styles."""

    SINGLE = auto()
    TWO = auto()
    MPT = auto()
    PLAIN = auto()
    LLAMA_2 = auto()


@dataclass(frozen=True)
class Template:
    """A conversation format, with the original ``Conversation`` field names.

    An empty ``system`` is left out together with its separator; that is how
    the llava-hf chat template differs from a TWO-style template (the original
    templates all have a system prompt). Use ``dataclasses.replace`` to change
    the system prompt.
    """

    name: str
    system: str
    roles: tuple[str, str]
    sep_style: SeparatorStyle
    sep: str
    sep2: str | None = None


_VICUNA_SYSTEM = (
    "A chat between a curious {0} and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the {0}'s questions."
)

_TEMPLATES = [
    Template(
        "vicuna_v1",
        _VICUNA_SYSTEM.format("user"),
        ("USER", "ASSISTANT"),
        SeparatorStyle.TWO,
        " ",
        "</s>",
    ),
    Template(
        "llava_v1",
        _VICUNA_SYSTEM.format("human"),
        ("USER", "ASSISTANT"),
        SeparatorStyle.TWO,
        " ",
        "</s>",
    ),
    Template(
        "llava_v0",
        _VICUNA_SYSTEM.format("human"),
        ("Human", "Assistant"),
        SeparatorStyle.SINGLE,
        "###",
    ),
    Template(
        "llava_llama_2",
        "You are a helpful language and vision assistant. "
        "You are able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.",
        ("USER", "ASSISTANT"),
        SeparatorStyle.LLAMA_2,
        "<s>",
        "</s>",
    ),
    # LLaVA-1.6: Mistral-7B's instruction format (llava_llama_2 without a system prompt) and
    # Nous-Hermes-2-Yi-34B's ChatML with a one-line system prompt.
    Template("mistral_instruct", "", ("USER", "ASSISTANT"), SeparatorStyle.LLAMA_2, "", "</s>"),
    Template(
        "chatml_direct",
        "<|im_start|>system\nAnswer the questions.",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        SeparatorStyle.MPT,
        "<|im_end|>",
    ),
    Template(
        "mpt",
        "<|im_start|>system\nA conversation between a user and an LLM-based AI "
        "assistant. The assistant gives helpful and honest answers.",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        SeparatorStyle.MPT,
        "<|im_end|>",
    ),
    Template("plain", "", ("", ""), SeparatorStyle.PLAIN, "\n"),
    # llava-hf chat_template.json: "USER: <image>\n{q} ASSISTANT: {a} USER: ..."
    Template("llava_hf", "", ("USER", "ASSISTANT"), SeparatorStyle.TWO, " ", " "),
]

TEMPLATES: dict[str, Template] = {t.name: t for t in _TEMPLATES}
TEMPLATES["chatml"] = TEMPLATES["mpt"]
TEMPLATES["v1"] = TEMPLATES["vicuna_v1"]
TEMPLATES["mistral_direct"] = TEMPLATES["chatml_direct"]


def get_template(name: str) -> Template:
    """Look up a template by name (or alias)."""
    if name not in TEMPLATES:
        choices = ", ".join(sorted(TEMPLATES))
        raise ValueError(f"unknown conversation template '{name}' (choose from: {choices})")
    return TEMPLATES[name]


def _turns(messages: Sequence[Message]) -> list[tuple[int, str | None]]:
    """(role index, text) pairs, checked to alternate user/assistant from the user."""
    turns = []
    for i, m in enumerate(messages):
        if isinstance(m, Mapping):
            role, text = m.get("role", m.get("from")), m.get("content", m.get("value"))
        else:
            role, text = m
        who = _ROLE_INDEX.get(role)
        if who is None:
            raise ValueError(f"unknown role {role!r} (use 'user' or 'assistant')")
        if who != i % 2:
            raise ValueError("messages must alternate user/assistant, starting with user")
        turns.append((who, text))
    if not turns:
        raise ValueError("a conversation needs at least one user message")
    return turns


def _wrap(t: Template, i: int, who: int) -> tuple[str, str]:
    """The text the original puts before and after message ``i``."""
    role = t.roles[who]
    if t.sep_style is SeparatorStyle.LLAMA_2:
        if who == 1:
            return " ", " " + t.sep2
        if i == 0:  # the original lstrips sep off the first [INST]
            system = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n" if t.system else ""
            return f"[INST] {system}", " [/INST]"
        return t.sep + "[INST] ", " [/INST]"
    if t.sep_style is SeparatorStyle.MPT:
        return role, t.sep
    end = t.sep2 if t.sep_style is SeparatorStyle.TWO and who == 1 else t.sep
    return role + ": ", end


def _open_turn(t: Template, who: int) -> str:
    """The original's rendering of an empty (to be generated) message."""
    if t.sep_style is SeparatorStyle.LLAMA_2:
        return ""
    if t.sep_style is SeparatorStyle.MPT:
        return t.roles[who]
    return t.roles[who] + ":"


def _plain_segments(t: Template, turns: list) -> list[tuple[str, bool]]:
    """PLAIN holds one (image, caption) pair.

    A prompt renders as ``get_prompt`` does (``"<image>\\n{q}\\n"``); with a
    caption it renders as ``preprocess_plain`` trains: the user turn is replaced
    by a bare ``<image>`` and the caption ends with ``sep``. (The original
    ``get_prompt`` fails on a captioned pair, since PLAIN has no ``sep2``.)
    """
    if len(turns) > 2:
        raise ValueError("the plain template holds a single (image, caption) pair")
    question = turns[0][1] or ""
    caption = turns[1][1] if len(turns) == 2 else None
    if not caption:
        return [(t.system + question + t.sep if question else t.system, False)]
    if IMAGE_TOKEN not in question:
        raise ValueError("plain (stage-1) training pairs need an <image> in the user turn")
    return [(t.system + IMAGE_TOKEN, False), (caption + t.sep, True)]


def _segments(t: Template, turns: list) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_answer_or_its_end) pieces."""
    if t.sep_style is SeparatorStyle.PLAIN:
        return _plain_segments(t, turns)
    if t.sep_style is SeparatorStyle.LLAMA_2 or not t.system:
        out = []
    else:
        out = [(t.system + t.sep, False)]
    for i, (who, text) in enumerate(turns):
        if not text:  # like the original's `if message:`, "" is an open turn
            out.append((_open_turn(t, who), False))
            continue
        before, after = _wrap(t, i, who)
        if who == 0:
            out.append((before + text + after, False))
        else:
            out += [(before, False), (text + after, True)]
    return out


def _conversation(messages: Sequence[Message], add_generation_prompt: bool) -> list:
    turns = _turns(messages)
    if add_generation_prompt and turns[-1][0] == 0:
        turns.append((1, None))
    return turns


def render(
    template: Template | str,
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
) -> str:
    """Render a conversation like the original ``Conversation.get_prompt``.

    Args:
        template: A ``Template`` or its name.
        messages: ``(role, text)`` pairs or ``{"role", "content"}`` dicts
            (``{"from", "value"}`` with human/gpt as in LLaVA-Instruct also
            works), alternating user/assistant and starting with the user. Put
            ``<image>`` in the text where the image goes.
        add_generation_prompt: When the conversation ends with a user message,
            open the assistant turn (the original's trailing ``None`` message).

    Returns:
        The prompt string.
    """
    if isinstance(template, str):
        template = get_template(template)
    turns = _conversation(messages, add_generation_prompt)
    return "".join(text for text, _ in _segments(template, turns))


def format_prompt(question: str, template: Template | str, n_images: int = 1) -> str:
    """A one-turn generation prompt for ``question``, as the original CLI builds it.

    If the question has no ``<image>``, ``"<image>\\n" * n_images`` goes in front
    (``run_llava.py``); a question with any ``<image>`` is left as written. With
    ``plain`` the result is ``"<image>\\n{question}\\n"``.
    """
    if IMAGE_TOKEN not in question:
        question = (IMAGE_TOKEN + "\n") * n_images + question
    return render(template, [("user", question)])


def template_for_config(config: Mapping, tokenizer_chat_template: str | None = None) -> str:
    """Pick a template name for a checkpoint.

    In order: an explicit ``conv_mode`` in the config; ``llava_llama_2`` /
    ``mpt`` when ``_name_or_path`` (or ``model_type``) says llama-2 / mpt, as
    the original CLI guesses. LLaVA-1.6 (``llava_next``, or an original with
    ``image_aspect_ratio: anyres``) as its releases were trained:
    ``mistral_instruct`` for a Mistral decoder, ``chatml_direct`` for the
    Yi-34B one (a ChatML tokenizer, or "yi" / "34b" in a name), else
    ``vicuna_v1``. For original-format configs (``mm_*`` keys), ``vicuna_v1``
    for v1.5 (``mlp2x_gelu`` projector, the eval scripts' choice) else
    ``llava_v1``; ``chatml`` when the tokenizer's
    chat template uses ``<|im_start|>``; otherwise ``llava_hf``.
    """
    if config.get("conv_mode"):
        get_template(config["conv_mode"])  # fail early on a typo
        return config["conv_mode"]
    text = config.get("text_config") or {}
    name = " ".join(
        str(c.get(k, "")) for c in (config, text) for k in ("_name_or_path", "model_type")
    ).lower()
    if "llama-2" in name or "llama_2" in name:
        return "llava_llama_2"
    if "mpt" in name:
        return "mpt"
    if config.get("model_type") == "llava_next" or config.get("image_aspect_ratio") == "anyres":
        if "mistral" in name:
            return "mistral_instruct"
        chatml = template_for_jinja(tokenizer_chat_template) == "chatml"
        if chatml or re.search(r"\byi\b|34b", name):
            return "chatml_direct"
        return "vicuna_v1"
    if is_original_config(config):
        is_v15 = config.get("mm_projector_type") == "mlp2x_gelu"
        return "vicuna_v1" if is_v15 else "llava_v1"
    return template_for_jinja(tokenizer_chat_template)


def template_for_jinja(chat_template: str | None) -> str:
    """The template that renders like a checkpoint's Jinja chat template: ``chatml`` when it
    speaks ``<|im_start|>``, else ``llava_hf``."""
    return "chatml" if chat_template and "<|im_start|>" in chat_template else "llava_hf"


def answer_mask_spans(
    template: Template | str, messages: Sequence[Message]
) -> list[tuple[int, int]]:
    """Character spans of ``render(template, messages, False)`` to train on.

    Each span is an assistant answer plus the end-of-turn text the original
    keeps unmasked: ``sep2`` (``"</s>"``) for TWO, ``" </s>"`` for LLAMA_2,
    ``"<|im_end|>"`` for MPT, ``"\\n"`` for PLAIN, and for ``llava_hf`` the
    trailing space, exactly its ``{% generation %}`` block. Everything else is
    IGNORE. The space after ``ASSISTANT:`` is outside the span; with a
    SentencePiece tokenizer it joins the answer's first token.

    Returns:
        ``[(start, end), ...]`` half-open, in order.
    """
    if isinstance(template, str):
        template = get_template(template)
    if template.sep_style is SeparatorStyle.SINGLE:
        raise ValueError(
            f"{template.name}: the original trains SINGLE-style templates with a "
            "different layout than get_prompt; no answer mask"
        )
    spans, pos = [], 0
    for text, is_answer in _segments(template, _turns(messages)):
        if is_answer:
            spans.append((pos, pos + len(text)))
        pos += len(text)
    return spans
