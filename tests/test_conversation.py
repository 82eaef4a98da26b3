"""Conversation templates against the original LLaVA and the llava-hf chat template."""

import dataclasses
import json
from pathlib import Path

import pytest

from mlx_llava.conversation import (
    TEMPLATES,
    answer_mask_spans,
    format_prompt,
    get_template,
    render,
    template_for_config,
)

FIXTURES = json.loads(
    (Path(__file__).parent / "fixtures" / "conversations.json").read_text("utf-8")
)
CONVERSATIONS = {k: [tuple(t) for t in v] for k, v in FIXTURES["conversations"].items()}
CASES = [
    (name, conv, ref)
    for name, per_conv in FIXTURES["templates"].items()
    for conv, ref in per_conv.items()
]
IDS = [f"{name}-{conv}" for name, conv, _ in CASES]

QUESTION = "Qu'est-ce que c'est ? 这是什么？"


def test_fixtures_cover_every_template():
    assert {t.name for t in TEMPLATES.values()} == set(FIXTURES["templates"])


@pytest.mark.parametrize("name,conv,ref", CASES, ids=IDS)
def test_generation_prompt_matches_reference(name, conv, ref):
    turns = CONVERSATIONS[conv][:-1]
    if ref["prompt"] is None:
        with pytest.raises(ValueError):
            render(name, turns)
    else:
        assert render(name, turns) == ref["prompt"]


@pytest.mark.parametrize("name,conv,ref", CASES, ids=IDS)
def test_full_conversation_matches_reference(name, conv, ref):
    turns = CONVERSATIONS[conv]
    if ref["full"] is None:
        with pytest.raises(ValueError):
            render(name, turns, add_generation_prompt=False)
    else:
        assert render(name, turns, add_generation_prompt=False) == ref["full"]


@pytest.mark.parametrize("name,conv,ref", CASES, ids=IDS)
def test_answer_spans_match_reference(name, conv, ref):
    if ref["answer_spans"] is None:
        with pytest.raises(ValueError):
            answer_mask_spans(name, CONVERSATIONS[conv])
    else:
        spans = answer_mask_spans(name, CONVERSATIONS[conv])
        assert spans == [tuple(s) for s in ref["answer_spans"]]


def test_message_forms_agree():
    turns = CONVERSATIONS["2_turn"]
    as_dicts = [{"role": r, "content": c} for r, c in turns]
    as_llava = [{"from": {"user": "human"}.get(r, "gpt"), "value": c} for r, c in turns]
    expected = render("vicuna_v1", turns)
    assert render("vicuna_v1", as_dicts) == expected
    assert render(get_template("vicuna_v1"), as_llava) == expected


@pytest.mark.parametrize(
    "messages",
    [[], [("assistant", "hi")], [("user", "a"), ("user", "b")], [("system", "x")]],
)
def test_bad_messages(messages):
    with pytest.raises(ValueError):
        render("vicuna_v1", messages)


def test_unknown_template():
    with pytest.raises(
        ValueError,
        match=r"unknown conversation template 'nope' \(choose from: .*vicuna_v1",
    ):
        get_template("nope")
    with pytest.raises(ValueError, match="unknown conversation template"):
        render("nope", [("user", "hi")])


def test_aliases():
    assert get_template("chatml") is get_template("mpt")
    assert get_template("v1") is get_template("vicuna_v1")


def test_format_prompt_adds_image():
    assert format_prompt("What is this?", "llava_hf") == ("USER: <image>\nWhat is this? ASSISTANT:")
    assert format_prompt("Compare.", "llava_hf", n_images=2) == (
        "USER: <image>\n<image>\nCompare. ASSISTANT:"
    )
    assert format_prompt("Hi", "llava_hf", n_images=0) == "USER: Hi ASSISTANT:"


def test_format_prompt_keeps_user_images():
    q = "Left: <image> right: <image>. Which is bigger?"
    assert format_prompt(q, "llava_hf", n_images=2) == f"USER: {q} ASSISTANT:"
    assert format_prompt("<image>\nDescribe.", "vicuna_v1") == render(
        "vicuna_v1", [("user", "<image>\nDescribe.")]
    )


def test_format_prompt_plain():
    assert format_prompt("Describe.", "plain") == "<image>\nDescribe.\n"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_format_prompt_non_ascii_round_trips(name):
    prompt = format_prompt(QUESTION, name)
    assert QUESTION in prompt
    assert QUESTION.encode("utf-8") in prompt.encode("utf-8")


def test_format_prompt_matches_fixture():
    ref = FIXTURES["templates"]["vicuna_v1"]["1_turn"]["prompt"]
    assert format_prompt("What is shown in this picture?", "vicuna_v1") == ref


def test_system_prompt_override():
    # An empty system drops the leading separator: vicuna_v1 without a system is
    # the multi-turn format the llava-hf model card documents.
    t = dataclasses.replace(get_template("vicuna_v1"), system="")
    assert render(t, CONVERSATIONS["2_turn"][:-1]) == (
        "USER: <image>\nWhat is shown in this picture? ASSISTANT: "
        "A ginger cat asleep on a red sofa.</s>USER: " + QUESTION + " ASSISTANT:"
    )
    t = dataclasses.replace(get_template("llava_hf"), system="Be brief.")
    assert render(t, [("user", "Hi")]) == "Be brief. USER: Hi ASSISTANT:"


@pytest.mark.parametrize(
    "config,chat_template,expected",
    [
        ({"conv_mode": "mpt", "mm_vision_tower": "x"}, None, "mpt"),
        (
            {"mm_vision_tower": "clip", "mm_projector_type": "mlp2x_gelu"},
            None,
            "vicuna_v1",
        ),
        ({"mm_hidden_size": 1024, "mm_projector_type": "linear"}, None, "llava_v1"),
        ({"mm_hidden_size": 1024}, None, "llava_v1"),
        (
            {
                "_name_or_path": "liuhaotian/llava-llama-2-13b-chat",
                "mm_hidden_size": 1024,
            },
            None,
            "llava_llama_2",
        ),
        (
            {"_name_or_path": "llava_llama_2_7b", "mm_vision_tower": "clip"},
            None,
            "llava_llama_2",
        ),
        (
            {"_name_or_path": "LLaVA-Lightning-MPT-7B", "mm_hidden_size": 1024},
            None,
            "mpt",
        ),
        ({"model_type": "llava_mpt"}, None, "mpt"),
        (
            {"model_type": "llava", "vision_config": {}, "text_config": {}},
            None,
            "llava_hf",
        ),
        ({"model_type": "llava"}, "{{ '<|im_start|>' }}", "chatml"),
        ({}, None, "llava_hf"),
    ],
)
def test_template_for_config(config, chat_template, expected):
    assert template_for_config(config, chat_template) == expected
    get_template(expected)


def test_template_for_config_rejects_unknown_conv_mode():
    with pytest.raises(ValueError, match="unknown conversation template"):
        template_for_config({"conv_mode": "vicuna_v9"}, None)


def _answers(messages):
    return [text for role, text in messages if role == "assistant"]


def _spanned(name, messages):
    text = render(name, messages, add_generation_prompt=False)
    return "".join(text[a:b] for a, b in answer_mask_spans(name, messages))


def test_answer_spans_vicuna_v1_two_turns():
    msgs = CONVERSATIONS["2_turn"]
    assert _spanned("vicuna_v1", msgs) == "".join(a + "</s>" for a in _answers(msgs))


def test_answer_spans_llava_hf_two_turns():
    # The llava-hf chat template ends an answer with " ", not "</s>": its
    # {% generation %} block is `content['text'] + ' '`.
    msgs = CONVERSATIONS["2_turn"]
    assert _spanned("llava_hf", msgs) == "".join(a + " " for a in _answers(msgs))


def test_answer_spans_plain():
    msgs = [
        ("user", "<image>\nDescribe the image briefly."),
        ("assistant", "A red bus."),
    ]
    assert render("plain", msgs, add_generation_prompt=False) == "<image>A red bus.\n"
    assert _spanned("plain", msgs) == "A red bus.\n"


def test_answer_spans_ignore_generation_prompt_flag():
    msgs = CONVERSATIONS["3_turn"][:-1]
    spans = answer_mask_spans("vicuna_v1", msgs)
    assert len(spans) == 2
    assert render("vicuna_v1", msgs, add_generation_prompt=False).endswith("Is it daytime? ")
