"""Chat sessions, several pictures, batched generation, captioning a folder, sampling options.

All on the tiny random checkpoint of conftest.py, in float32, so that greedy answers computed
in different ways (batched or not, with or without a reused KV cache) must agree exactly.
"""

from __future__ import annotations

import io
import json
import sys

import mlx.core as mx
import numpy as np
import pytest

from llava_testing.pictures import make_picture
from mlx_llava import ChatSession, batch_generate, generate, load, stream_generate
from mlx_llava.chat import session_template
from mlx_llava.cli import caption as caption_cli
from mlx_llava.cli import generate as generate_cli
from mlx_llava.conversation import render

QUESTIONS = [
    "What?",
    "Describe the picture in great detail, with its colours, shapes and animals, please.",
    "How many cats are there in the garden near the river?",
]
NON_ASCII = "Qu'est-ce que c'est ? 这是什么？ Ça va 🐈"


@pytest.fixture(scope="module")
def pictures():
    return [make_picture(1), make_picture(2, (25, 45)), make_picture(3, (30, 30))]


@pytest.fixture(scope="module")
def word_model(tiny_checkpoint):
    """The tiny model made to answer in whole ASCII words: the lm_head rows of every other
    token but `</s>` are zeroed. Its answers tokenize back to the ids it generated, as a real
    model's mostly do, so a chat's next turn can reuse the cache up to the end of the answer.
    """
    model, processor = load(tiny_checkpoint, dtype="float32")
    tokenizer = processor.tokenizer
    allowed = [
        i
        for piece, i in tokenizer.get_vocab().items()
        if piece.startswith("\u2581")
        and len(piece) > 2
        and piece[1:].isascii()
        and piece[1:].isalpha()
        and tokenizer.encode(piece[1:], add_special_tokens=False) == [i]
    ]
    assert len(allowed) > 8
    weight = model.language_model.lm_head.weight
    keep = np.zeros(weight.shape[0], dtype=bool)
    keep[allowed + [tokenizer.eos_token_id]] = True
    model.language_model.lm_head.weight = mx.where(mx.array(keep)[:, None], weight, 0)
    return model, processor


def save_pictures(folder, pictures, names=("a.png", "b.jpg", "c.png")):
    paths = []
    for name, picture in zip(names, pictures):
        path = folder / name
        picture.save(path)
        paths.append(path)
    return paths


# Batched generation -------------------------------------------------------------------------


def one_by_one(model, processor, prompts, images, **kwargs) -> list[tuple]:
    """(text, token ids, finish reason) of each prompt alone, from `stream_generate`."""
    out = []
    for prompt, picture in zip(prompts, images):
        pictures = [] if picture is None else picture if isinstance(picture, list) else [picture]
        responses = list(stream_generate(model, processor, prompt, images=pictures, **kwargs))
        text = "".join(r.text for r in responses)
        out.append((text, [r.token for r in responses], responses[-1].finish_reason))
    return out


def batched(model, processor, prompts, images=None, **kwargs) -> list[tuple]:
    """(text, token ids, finish reason) of each prompt from one `batch_generate` call, whose
    plain answers (the text alone) are checked to be the same."""
    results = batch_generate(model, processor, prompts, images, return_results=True, **kwargs)
    texts = batch_generate(model, processor, prompts, images, **kwargs)
    assert texts == [r.text for r in results]
    return [(r.text, r.tokens, r.finish_reason) for r in results]


def test_batch_equals_one_by_one_with_pictures(tiny_model, pictures):
    model, processor = tiny_model
    prompts = [processor.format_prompt(q, 1) for q in QUESTIONS]
    lengths = [len(processor.tokenize(p)) for p in prompts]
    assert max(lengths) - min(lengths) > 10
    expected = one_by_one(model, processor, prompts, pictures, max_tokens=24)
    assert batched(model, processor, prompts, pictures, max_tokens=24) == expected
    assert len({tuple(tokens) for _, tokens, _ in expected}) == 3


def test_batch_equals_one_by_one_text_only_and_mixed(tiny_model, pictures):
    model, processor = tiny_model
    text_prompts = [processor.format_prompt(q, 0) for q in QUESTIONS]
    expected = one_by_one(model, processor, text_prompts, [None] * 3, max_tokens=20)
    assert batched(model, processor, text_prompts, max_tokens=20) == expected

    two = processor.format_prompt("Compare the two pictures.", 2)
    prompts = [text_prompts[0], two, processor.format_prompt(QUESTIONS[2], 1)]
    images = [None, [pictures[0], pictures[1]], pictures[2]]
    expected = one_by_one(model, processor, prompts, images, max_tokens=20)
    assert batched(model, processor, prompts, images, max_tokens=20) == expected


def test_batch_rows_stop_on_their_own(word_model, pictures):
    """Rows end at EOS at different steps; the others go on unchanged (the batch shrinks)."""
    model, processor = word_model
    prompts = [processor.format_prompt(q, 1) for q in QUESTIONS]
    expected = one_by_one(model, processor, prompts, pictures, max_tokens=40)
    lengths = [len(tokens) for _, tokens, _ in expected]
    assert len(set(lengths)) > 1 and min(lengths) < 40
    assert {reason for _, _, reason in expected} == {"stop", "length"}
    assert batched(model, processor, prompts, pictures, max_tokens=40) == expected


def test_batch_with_repetition_penalty_and_stop_equals_one_by_one(word_model, pictures):
    model, processor = word_model
    prompts = [processor.format_prompt(q, 1) for q in QUESTIONS]
    kwargs = dict(max_tokens=16, repetition_penalty=1.5, repetition_context_size=6)
    full = one_by_one(model, processor, prompts, pictures, **kwargs)
    # Two letters from inside a later word of the second answer: that row stops early.
    text = full[1][0]
    stop = next(w[1:3] for w in text.split()[1:] if len(w) >= 3 and text.find(w[1:3]) > 0)
    expected = one_by_one(model, processor, prompts, pictures, stop=[stop], **kwargs)
    assert expected[1][0] == text[: text.find(stop)] and expected[1][2] == "stop"
    assert len(expected[1][1]) < len(full[1][1])
    assert batched(model, processor, prompts, pictures, stop=[stop], **kwargs) == expected


def test_batch_checks_pictures_per_prompt(tiny_model, pictures):
    model, processor = tiny_model
    one = processor.format_prompt("What?", 1)
    two = processor.format_prompt("What?", 2)
    with pytest.raises(ValueError, match="prompt 1 has 2 <image>"):
        batch_generate(model, processor, [one, two], images=[pictures[0], pictures[1]])
    with pytest.raises(ValueError, match="one entry per prompt"):
        batch_generate(model, processor, [one, two], images=[pictures[0]])
    with pytest.raises(ValueError, match="max_tokens"):
        batch_generate(model, processor, [one], images=[pictures[0]], max_tokens=0)
    assert batch_generate(model, processor, []) == []


# Several pictures ---------------------------------------------------------------------------


def test_two_picture_prompt(tiny_model, pictures):
    model, processor = tiny_model
    prompt = processor.format_prompt("Compare the two pictures.", 2)
    assert prompt.count("<image>") == 2
    inputs = processor(prompt, pictures[:2])
    n_image = int((inputs["input_ids"] == model.config.image_token_index).sum().item())
    assert n_image == 2 * model.config.num_image_tokens
    assert inputs["pixel_values"].shape[0] == 2
    ab = generate(model, processor, prompt, images=pictures[:2], max_tokens=16)
    ba = generate(model, processor, prompt, images=pictures[1::-1], max_tokens=16)
    assert ab and ab != ba  # the order of the pictures matters
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        generate(model, processor, prompt, images=pictures[:1], max_tokens=4)
    with pytest.raises(ValueError, match="placeholder"):
        generate(model, processor, prompt, images=pictures, max_tokens=4)


def test_cli_two_pictures(tiny_model, pictures, tmp_path, monkeypatch, capsys):
    model, processor = tiny_model
    monkeypatch.setattr("mlx_llava.loader.load", lambda *a, **k: tiny_model)
    a, b, _ = save_pictures(tmp_path, pictures)
    argv = ["--image", str(a), "--image", str(b), "-p", "Compare them.", "-m", "8"]
    generate_cli.main(argv)
    prompt = processor.format_prompt("Compare them.", 2)
    expected = generate(model, processor, prompt, images=[str(a), str(b)], max_tokens=8)
    assert capsys.readouterr().out == expected + "\n"


# Sampling -----------------------------------------------------------------------------------

SAMPLING = dict(
    temperature=0.9,
    top_p=0.95,
    min_p=0.02,
    top_k=100,
    repetition_penalty=1.1,
    repetition_context_size=8,
    max_tokens=12,
)


def test_seed_makes_sampling_reproducible(tiny_model, pictures):
    model, processor = tiny_model
    prompt = processor.format_prompt("Tell me a story.", 1)

    def sample(seed, **kwargs):
        return generate(model, processor, prompt, image=pictures[0], seed=seed, **kwargs)

    assert sample(7, temperature=1.0, max_tokens=16) == sample(7, temperature=1.0, max_tokens=16)
    assert len({sample(s, temperature=1.0, max_tokens=16) for s in range(4)}) > 1
    assert sample(3, **SAMPLING) == sample(3, **SAMPLING)

    prompts = [prompt, processor.format_prompt(QUESTIONS[1], 1)]

    def batch(seed):
        images = pictures[:2]
        return batch_generate(model, processor, prompts, images=images, seed=seed, **SAMPLING)

    assert batch(5) == batch(5)
    assert len({tuple(batch(s)) for s in range(4)}) > 1
    # A batch of one draws the same random numbers as `generate`.
    one = batch_generate(model, processor, [prompt], images=[pictures[0]], seed=3, **SAMPLING)
    assert one == [sample(3, **SAMPLING)]

    def chat(seed):
        session = ChatSession(model, processor, image=pictures[0])
        return [session.send(q, seed=seed, **SAMPLING) for q in QUESTIONS[:2]]

    assert chat(11) == chat(11)


def test_cli_sampling_flags_reach_generation():
    args = generate_cli.build_parser().parse_args(
        "--temp 0.7 --top-p 0.9 --min-p 0.05 --top-k 40 --repetition-penalty 1.2 "
        "--repetition-context-size 12 --seed 3 --max-tokens 9 --stop END --stop ###".split()
    )
    assert generate_cli.sampling_kwargs(args) == dict(
        max_tokens=9,
        temperature=0.7,
        top_p=0.9,
        min_p=0.05,
        top_k=40,
        repetition_penalty=1.2,
        repetition_context_size=12,
        seed=3,
        stop=["END", "###"],
        kv_bits=None,
    )
    caption_args = caption_cli.build_parser().parse_args(
        "--image-dir d --output o.jsonl --temp 0.5 --top-k 3 --seed 1 -m 4".split()
    )
    assert generate_cli.sampling_kwargs(caption_args)["top_k"] == 3


@pytest.mark.parametrize("how", ["generate", "batch", "chat"])
def test_stop_strings_cut_the_text(word_model, pictures, how):
    model, processor = word_model
    prompt = processor.format_prompt(QUESTIONS[2], 1)
    full = generate(model, processor, prompt, image=pictures[0], max_tokens=30)
    # Two letters from inside a later word: the stop string lies inside a streamed segment.
    stop = next(w[1:3] for w in full.split()[1:] if len(w) >= 3 and full.find(w[1:3]) > 0)
    cut = full[: full.find(stop)]
    assert cut.strip()
    if how == "generate":
        text = generate(model, processor, prompt, image=pictures[0], max_tokens=30, stop=[stop])
    elif how == "batch":
        texts = batch_generate(
            model, processor, [prompt, prompt], images=pictures[:1] * 2, max_tokens=30, stop=[stop]
        )
        assert texts[0] == texts[1]
        text = texts[0]
    else:
        session = ChatSession(model, processor, image=pictures[0])
        text = session.send(QUESTIONS[2], max_tokens=30, stop=[stop])
    assert text == cut


def test_non_ascii_prompt_round_trips(tiny_model, pictures):
    model, processor = tiny_model
    prompt = processor.format_prompt(NON_ASCII, 1)
    ids = processor.tokenize(prompt)
    assert NON_ASCII in processor.decode(ids)
    assert processor.tokenizer.unk_token_id not in ids  # byte fallback: no character is lost
    session = ChatSession(model, processor, image=pictures[0])
    answer = session.send(NON_ASCII, max_tokens=4)
    assert session.messages[0] == ("user", "<image>\n" + NON_ASCII)
    assert NON_ASCII in session.prompt("?")[1]
    # The chat sent the same tokens as the formatted prompt: the same answer.
    assert generate(model, processor, prompt, image=pictures[0], max_tokens=4) == answer
    english = generate(
        model, processor, processor.format_prompt("What is it?", 1), image=pictures[0]
    )
    assert answer != english[: len(answer)]  # the question's bytes reached the model


# Chat ---------------------------------------------------------------------------------------


def record_rewinds(session) -> list:
    """The lengths the session's cache is rewound to: what each turn reuses."""
    calls, rewind = [], session.cache.rewind

    def recording(length):
        calls.append(length)
        rewind(length)

    session.cache.rewind = recording
    return calls


def test_chat_turns_reuse_the_cache_and_match_generate(word_model, pictures):
    model, processor = word_model
    session = ChatSession(model, processor, image=pictures[0])
    reused = record_rewinds(session)
    first = processor.format_prompt(QUESTIONS[0], 1)
    assert session.prompt(QUESTIONS[0])[1] == first

    responses = list(session.stream(QUESTIONS[0], max_tokens=12))
    answer = "".join(r.text for r in responses)
    assert answer == generate(model, processor, first, image=pictures[0], max_tokens=12)
    prompt_tokens, answer_tokens = responses[-1].prompt_tokens, responses[-1].generation_tokens
    assert prompt_tokens == len(processor.tokenize(first))
    assert session.cache.length == prompt_tokens + answer_tokens
    assert session.messages == [("user", "<image>\n" + QUESTIONS[0]), ("assistant", answer)]

    assert session.prompt(QUESTIONS[1])[1] == f"{first} {answer}</s>USER: {QUESTIONS[1]} ASSISTANT:"
    for question in QUESTIONS[1:]:
        held = session.cache.length
        messages, prompt = session.prompt(question)
        assert prompt == render(session.template, messages)
        responses = list(session.stream(question, max_tokens=12))
        assert reused[-1] == held  # the whole previous turn was reused: only new tokens ran
        assert responses[-1].prompt_tokens == len(processor.tokenize(prompt))
        expected = generate(model, processor, prompt, image=pictures[0], max_tokens=12)
        assert "".join(r.text for r in responses) == expected
    assert [role for role, _ in session.messages] == ["user", "assistant"] * 3


def test_chat_set_image_and_clear(word_model, pictures):
    model, processor = word_model
    session = ChatSession(model, processor, image=pictures[0])
    session.send("What is in the picture?", max_tokens=6)
    session.send("And then?", max_tokens=6)
    reused = record_rewinds(session)

    session.clear()
    assert session.messages == []
    prompt = processor.format_prompt("What colour is it?", 1)
    answer = session.send("What colour is it?", max_tokens=6)
    assert answer == generate(model, processor, prompt, image=pictures[0], max_tokens=6)
    image_end = len(processor.tokenize(prompt.split("<image>")[0] + "<image>"))
    assert reused[-1] >= image_end  # the picture's tokens are not computed again

    session.set_image(pictures[1])
    assert session.messages == []
    answer = session.send("What colour is it?", max_tokens=6)
    assert answer == generate(model, processor, prompt, image=pictures[1], max_tokens=6)
    assert reused[-1] < image_end  # a new picture: its tokens are computed

    session.set_image(None)
    answer = session.send("Hello", max_tokens=6)
    text_prompt = processor.format_prompt("Hello", 0)
    assert "<image>" not in session.messages[0][1]
    assert answer == generate(model, processor, text_prompt, max_tokens=6)


def test_chat_preprocesses_its_pictures_once(word_model, pictures, monkeypatch):
    model, processor = word_model
    calls = []
    image_processor = processor.image_processor
    original = type(image_processor).__call__

    def counting(self, images):
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(type(image_processor), "__call__", counting)
    session = ChatSession(model, processor, images=pictures[:2])
    session.send("What?", max_tokens=4)
    session.send("And then?", max_tokens=4)
    session.clear()
    session.send("What colour is it?", max_tokens=4)
    assert calls == [2]  # one preprocessing of both pictures for three turns
    session.set_image(pictures[2])
    answer = session.send("What?", max_tokens=4)
    assert calls == [2, 1]
    monkeypatch.undo()
    prompt = processor.format_prompt("What?", 1)
    assert answer == generate(model, processor, prompt, image=pictures[2], max_tokens=4)


def test_chat_with_two_pictures_and_a_system_prompt(word_model, pictures):
    model, processor = word_model
    session = ChatSession(model, processor, images=pictures[:2], system="Be brief.")
    _, prompt = session.prompt("Compare them.")
    assert prompt == "Be brief. USER: <image>\n<image>\nCompare them. ASSISTANT:"
    answer = session.send("Compare them.", max_tokens=6)
    assert answer == generate(model, processor, prompt, images=pictures[:2], max_tokens=6)


def test_chat_template_choice(tiny_model):
    model, processor = tiny_model
    assert session_template(processor).sep2 == "</s>"
    assert session_template(processor, "vicuna_v1").name == "vicuna_v1"
    session = ChatSession(model, processor, conv_mode="llava_v1")
    assert session.prompt("Hi")[1].startswith("A chat between a curious human")


def test_chat_context_overflow_is_a_clear_error(word_model, pictures):
    model, processor = word_model
    session = ChatSession(model, processor, image=pictures[0])
    session.send("Hi", max_tokens=4)
    before = list(session.messages)
    long_question = " ".join(["describe the colours and the shapes"] * 40)
    with pytest.raises(ValueError, match=r"conversation is \d+ tokens.*context is 256.*/clear"):
        session.send(long_question)
    assert session.messages == before
    # An answer stops where the context ends.
    session.clear()
    words = 1
    while len(processor.tokenize(session.prompt(" ".join(["cat"] * words))[1])) < 236:
        words += 1
    response = list(session.stream(" ".join(["cat"] * words), max_tokens=500))[-1]
    assert response.prompt_tokens + response.generation_tokens <= 256


def test_chat_interrupted_answer_is_kept(word_model, pictures):
    model, processor = word_model
    session = ChatSession(model, processor, image=pictures[0])
    responses = session.stream(QUESTIONS[1], max_tokens=20)
    partial = ""
    for n, response in enumerate(responses, start=1):
        partial += response.text
        if n == 3:
            break
    responses.close()
    assert session.messages[-1] == ("assistant", partial.strip())
    assert len(session.cache.keys) == session.cache.length
    _, prompt = session.prompt("And?")
    answer = session.send("And?", max_tokens=8)
    assert answer == generate(model, processor, prompt, image=pictures[0], max_tokens=8)


# Chat CLI -----------------------------------------------------------------------------------


def run_chat_cli(monkeypatch, capsys, argv, lines):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    generate_cli.main(["--chat", *argv])
    return capsys.readouterr()


def test_cli_chat_from_a_pipe(word_model, pictures, tmp_path, monkeypatch, capsys):
    model, processor = word_model
    monkeypatch.setattr("mlx_llava.loader.load", lambda *a, **k: word_model)
    a, b, _ = save_pictures(tmp_path, pictures)
    lines = [
        "What is in the picture?",
        "",
        "What colour is it?",
        f"/image {b}",
        "And this one?",
        "/clear",
        NON_ASCII,
        "/image /no/such/file.png",
        "/bogus",
        "/exit",
        "never asked",
    ]
    out = run_chat_cli(monkeypatch, capsys, ["--image", str(a), "-m", "8"], lines)

    session = ChatSession(model, processor, image=str(a))
    expected = [session.send(lines[0], max_tokens=8), session.send(lines[2], max_tokens=8)]
    session.set_image(str(b))
    expected.append(session.send(lines[4], max_tokens=8))
    session.clear()
    expected.append(session.send(NON_ASCII, max_tokens=8))
    assert out.out == "".join(answer + "\n" for answer in expected)
    assert ">>" not in out.out  # no prompt marker without a terminal
    assert f"new conversation about {b}" in out.err
    assert "error: cannot read image '/no/such/file.png'" in out.err
    assert "unknown command /bogus" in out.err


def test_cli_chat_ends_at_eof_and_takes_a_first_prompt(tiny_checkpoint, monkeypatch, capsys):
    """End to end from the checkpoint folder: -p is the first question, EOF ends."""
    out = run_chat_cli(
        monkeypatch,
        capsys,
        ["--model", str(tiny_checkpoint), "--dtype", "float32", "-p", "Hi", "-m", "3"],
        ["Tell me a story."],
    )
    model, processor = load(tiny_checkpoint, dtype="float32")
    session = ChatSession(model, processor)
    expected = (
        session.send("Hi", max_tokens=3) + "\n" + session.send("Tell me a story.", max_tokens=3)
    )
    assert out.out == expected + "\n"


class _InterruptedSession:
    """Answers "a b c" to every question, but Ctrl-C hits during the answer to "stop"."""

    def __init__(self):
        self.asked = []

    def stream(self, text, **sampling):
        self.asked.append(text)

        def responses():
            for word in ("a ", "b ", "c"):
                yield type("R", (), {"text": word})()
                if text == "stop":
                    raise KeyboardInterrupt

        return responses()


def test_cli_chat_ctrl_c_stops_the_answer_not_the_session(monkeypatch, capsys):
    session = _InterruptedSession()
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nstop\nlast\n"))
    generate_cli.chat(session, {})
    out = capsys.readouterr()
    assert session.asked == ["first", "stop", "last"]
    assert out.out == "a b c\na \na b c\n"
    assert "[interrupted]" in out.err


# Captioning a folder ------------------------------------------------------------------------


def make_folder(root, pictures):
    (root / "sub").mkdir(parents=True)
    save_pictures(root, pictures[:2], ("a.png", "b.JPG"))
    save_pictures(root / "sub", pictures[2:], ("c.webp",))
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (root / "notes.txt").write_text("not a picture")
    return ["a.png", "b.JPG", "sub/c.webp"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_caption_folder_skips_broken_files_and_resumes(
    tiny_model, pictures, tmp_path, monkeypatch, capsys
):
    model, processor = tiny_model
    monkeypatch.setattr("mlx_llava.loader.load", lambda *a, **k: tiny_model)
    folder = tmp_path / "pictures"
    names = make_folder(folder, pictures)
    output = tmp_path / "captions.jsonl"
    argv = ["--image-dir", str(folder), "--output", str(output), "--batch-size", "2", "-m", "6"]

    caption_cli.main(argv)
    err = capsys.readouterr().err
    assert "warning: skipping broken.jpg: cannot read image" in err
    assert "captioned 3/4" in err
    records = read_jsonl(output)
    assert [r["file"] for r in records] == names
    prompt = processor.format_prompt(caption_cli.DEFAULT_CAPTION_PROMPT, 1)
    for record in records:
        assert record["prompt"] == caption_cli.DEFAULT_CAPTION_PROMPT
        picture = str(folder / record["file"])
        expected = generate(model, processor, prompt, image=picture, max_tokens=6)
        assert record["answer"] == expected.strip()

    caption_cli.main(argv)  # resuming: nothing left but the broken file
    assert read_jsonl(output) == records
    assert "warning: skipping broken.jpg" in capsys.readouterr().err

    # A run cut short: the last record lost, the one before it half written.
    lines = output.read_text("utf-8").splitlines(keepends=True)
    output.write_text(lines[0] + lines[1][:10], "utf-8")
    caption_cli.main(argv)
    assert read_jsonl_lenient(output) == records


def read_jsonl_lenient(path):
    out = []
    for line in path.read_text("utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_generate_image_dir_delegates_and_keeps_non_ascii(
    tiny_model, pictures, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr("mlx_llava.loader.load", lambda *a, **k: tiny_model)
    monkeypatch.setattr(
        "mlx_llava.batch.batch_generate",
        lambda model, processor, prompts, **kwargs: [
            f"{NON_ASCII} {i}" for i in range(len(prompts))
        ],
    )
    folder = tmp_path / "pictures"
    names = make_folder(folder, pictures)
    output = tmp_path / "out.jsonl"
    argv = ["--image-dir", str(folder), "--output", str(output), "-p", NON_ASCII]
    generate_cli.main(argv)
    records = read_jsonl(output)
    assert [r["file"] for r in records] == names
    assert all(
        r["prompt"] == NON_ASCII and r["answer"] == f"{NON_ASCII} {i}"
        for i, r in enumerate(records)
    )
    assert NON_ASCII in output.read_text("utf-8")  # written as UTF-8, not \\u escapes

    generate_cli.main(["--image-dir", str(folder), "-p", "Hi"])  # no --output: JSONL to stdout
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in printed] == names
