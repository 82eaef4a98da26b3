"""LLaVA-NeXT (1.6) number for number with transformers, on the recorded oracle outputs.

tests/fixtures/make_fixtures.py wrote tiny random LlavaNext checkpoints (tiles of 28 px) in each
layout: next-hub (llava-hf hub, Vicuna), next-v5 (transformers 5 save_pretrained, Mistral),
next-v452 (transformers 4.52 names, Yi-34B shapes) and next-orig (an original liuhaotian v1.6
release, Mistral, the tower inside, its CLIP beside it), with transformers'
LlavaNextForConditionalGeneration / LlavaNextProcessor outputs on four pictures: wide, tall, a
large square and one smaller than a tile. tests/test_oracle_live.py reruns transformers live.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from llava_testing.cli import run_main
from llava_testing.parity import assert_logits_close, build_with_counts
from mlx_llava import PromptCache, batch_generate, convert, load, stream_generate
from mlx_llava.prompt import prepare_prompt

DATA = Path(__file__).parent / "fixtures" / "data"
PICTURES = ("wide", "tall", "square", "small")
IMAGES = {name: DATA / "images" / f"{name}.png" for name in PICTURES}
CHECKPOINTS = ["next-hub", "next-v5", "next-v452", "next-orig"]
CONV_MODES = {"vicuna": "vicuna_v1", "mistral": "mistral_instruct", "yi": "chatml_direct"}

PIXEL_ATOL = 1e-5
FEATURE_ATOL = 1e-4


def oracle(name: str) -> tuple[dict, dict]:
    folder = DATA / name
    arrays = dict(np.load(folder / "oracle.npz"))
    meta = json.loads((folder / "oracle.json").read_text())
    if meta.get("pixel_values_of"):  # the same preprocessing: its pixels are next-hub's
        hub = np.load(DATA / meta["pixel_values_of"] / "oracle.npz")
        arrays.update({k: hub[k] for k in hub if k.endswith("_pixel_values")})
    return arrays, meta


def oracle_ids(ids: np.ndarray, meta: dict) -> np.ndarray:
    """The oracle's ids in our numbering (an original's image token is -200 here)."""
    if "oracle_image_token_id" in meta:
        ids = np.where(ids == meta["oracle_image_token_id"], meta["image_token_index"], ids)
    return ids


def vocab(logits: np.ndarray, meta: dict) -> np.ndarray:
    """transformers grew an original's vocabulary by <image> and <pad>: compare the rest."""
    n = meta.get("oracle_vocab_size")
    return logits if n is None else logits[..., : logits.shape[-1] - (n - 380)]


def greedy(model, processor, prompt, images, n, **kwargs) -> list[int]:
    steps = stream_generate(model, processor, prompt, images=images, max_tokens=n, **kwargs)
    return [r.token for r in steps]


@pytest.fixture(scope="module", params=CHECKPOINTS)
def next_model(request, tmp_path_factory):
    """(name, model, processor) of each NeXT checkpoint after conversion to an MLX folder."""
    name = request.param
    tower = DATA / f"{name}-clip" if name == "next-orig" else None
    out = tmp_path_factory.mktemp(name) / "mlx"
    convert(DATA / name, out, dtype="float32", vision_tower=tower)
    model, processor = load(out)
    return name, model, processor


def prompt_for(meta: dict, question: str) -> str:
    return meta["template"].format(q=question)


def test_config_and_template_come_from_the_checkpoint(next_model):
    name, model, processor = next_model
    _, meta = oracle(name)
    config = model.config
    assert config.is_next and config.image_aspect_ratio == "anyres"
    assert config.conv_mode == CONV_MODES[meta["decoder"]]
    assert config.text_config.model_type == ("mistral" if meta["decoder"] == "mistral" else "llama")
    # The template renders the question exactly as the oracle's prompt.
    assert processor.format_prompt("What is in the picture?") == prompt_for(meta, meta["question"])


def test_preprocessing_and_token_expansion(next_model):
    name, model, processor = next_model
    arrays, meta = oracle(name)
    for picture in PICTURES:
        inputs = processor(prompt_for(meta, meta["question"]), [IMAGES[picture]])
        expected = oracle_ids(arrays[f"{picture}_input_ids"], meta)
        if name == "next-orig":  # the original's one -200, expanded to the picture's tokens
            count = meta["image_tokens"][picture]
            expected = np.array([[t for i in expected[0] for t in ([i] * count if i < 0 else [i])]])
        np.testing.assert_array_equal(np.array(inputs["input_ids"]), expected, err_msg=picture)
        assert inputs["image_sizes"] == [tuple(arrays[f"{picture}_image_sizes"][0].tolist())]
        assert model.config.image_tokens(inputs["image_sizes"][0]) == meta["image_tokens"][picture]
        pixels = arrays[f"{picture}_pixel_values"].transpose(0, 2, 3, 1)
        np.testing.assert_allclose(
            np.array(inputs["pixel_values"]), pixels, atol=PIXEL_ATOL, rtol=0, err_msg=picture
        )


def test_image_features_unpadded_with_newlines(next_model):
    """Base features, then the unpadded grid with image_newline after each row."""
    name, model, _ = next_model
    arrays, _ = oracle(name)
    for picture in PICTURES:
        pixels = mx.array(arrays[f"{picture}_pixel_values"].transpose(0, 2, 3, 1))
        sizes = [tuple(arrays[f"{picture}_image_sizes"][0].tolist())]
        features = model.get_image_features(pixels, sizes)
        np.testing.assert_allclose(
            np.array(features),
            arrays[f"{picture}_image_features"],
            atol=FEATURE_ATOL,
            rtol=0,
            err_msg=picture,
        )


def test_logits_of_four_pictures_in_one_prompt(next_model):
    name, model, processor = next_model
    arrays, meta = oracle(name)
    inputs = processor(prompt_for(meta, meta["four_question"]), [IMAGES[p] for p in PICTURES])
    np.testing.assert_array_equal(
        np.array(inputs["input_ids"]), oracle_ids(arrays["four_input_ids"], meta)
    )
    logits = model(
        inputs["input_ids"], pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
    )
    ours = np.array(logits[0])[arrays["four_positions"]]
    assert_logits_close(ours, vocab(arrays["four_logits"], meta))


def test_greedy_generation_is_token_identical(next_model):
    name, model, processor = next_model
    arrays, meta = oracle(name)
    for picture in PICTURES:
        prompt = prompt_for(meta, meta["question"])
        inputs = processor(prompt, [IMAGES[picture]])
        logits = model(**{k: inputs[k] for k in ("input_ids", "pixel_values", "image_sizes")})
        assert_logits_close(np.array(logits[0, -1]), vocab(arrays[f"{picture}_last_logits"], meta))
        tokens = greedy(model, processor, prompt, [IMAGES[picture]], 24)
        assert tokens == arrays[f"{picture}_greedy_tokens"].tolist(), picture
    four = greedy(
        model, processor, prompt_for(meta, meta["four_question"]), list(IMAGES.values()), 12
    )
    assert four == arrays["four_greedy_tokens"].tolist()


def test_batch_of_different_picture_sizes(next_model):
    """Left-padded ids as transformers'; batched greedy ids equal transformers' batch and ours
    one prompt at a time (rows of different image token counts in one batch)."""
    name, model, processor = next_model
    arrays, meta = oracle(name)
    prompts = [prompt_for(meta, q) for q in meta["batch_questions"]]
    images = [IMAGES[p] for p in PICTURES]
    batch = processor(prompts, images)
    np.testing.assert_array_equal(
        np.array(batch["input_ids"]), oracle_ids(arrays["batch_input_ids"], meta)
    )
    np.testing.assert_array_equal(np.array(batch["attention_mask"]), arrays["batch_attention_mask"])
    results = batch_generate(
        model, processor, prompts, images=images, max_tokens=12, return_results=True
    )
    batched = [r.tokens for r in results]
    singles = [greedy(model, processor, p, [i], 12) for p, i in zip(prompts, images)]
    assert batched == singles == arrays["batch_greedy_tokens"].tolist()


def test_prompt_cache_keeps_each_pictures_tokens(hub_folder):
    """Two pictures of different token counts: a second question computes its own tokens only,
    and the answers stay the oracle's (next-hub; the cache logic is the same for every layout)."""
    model, processor = load(hub_folder)
    arrays, meta = oracle("next-hub")
    cache = PromptCache(model)
    prompt = prompt_for(meta, meta["question"])
    for picture in ("wide", "small"):
        tokens = greedy(model, processor, prompt, [IMAGES[picture]], 24, prompt_cache=cache)
        assert tokens == arrays[f"{picture}_greedy_tokens"].tolist()
    again = greedy(model, processor, prompt, [IMAGES["small"]], 24, prompt_cache=cache)
    assert again == arrays["small_greedy_tokens"].tolist()
    prepared = prepare_prompt(model, processor, prompt, [IMAGES["small"]], cache)
    assert prepared.embeddings.shape[0] == 1
    assert len(prepared.keys) == arrays["small_input_ids"].shape[1]
    # The keys name each picture's own positions: (its digest, 0..n-1) for each of two pictures.
    two = prompt_for(meta, "<image>\n<image>\nCompare.")
    keys = prepare_prompt(model, processor, two, [IMAGES["wide"], IMAGES["small"]], cache).keys
    image_keys = [k for k in keys if isinstance(k, tuple)]
    counts = [meta["image_tokens"][p] for p in ("wide", "small")]
    assert [k[1] for k in image_keys] == [*range(counts[0]), *range(counts[1])]
    assert (
        len({k[0] for k in image_keys[: counts[0]]} | {k[0] for k in image_keys[counts[0] :]}) == 2
    )


def test_original_release_uses_the_tower_inside(tmp_path):
    """LLaVA-1.6 trains its tower: the checkpoint's copy wins over mm_vision_tower's weights."""
    from mlx.utils import tree_flatten

    from mlx_llava.weights import load_weights

    out = convert(DATA / "next-orig", tmp_path / "mlx", vision_tower=DATA / "next-orig-clip")
    clip = load_weights(DATA / "next-orig-clip")
    model, _ = load(out, dtype="float32")
    ours = dict(tree_flatten(model.parameters()))
    key = "vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    assert not np.allclose(np.array(ours[key]), np.array(clip["vision_model." + key[13:]]))
    assert model.config.conv_mode == "mistral_instruct"
    assert model.config.image_token_index == -200


# Everything that works for 1.5 works for 1.6 -----------------------------------------------


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory) -> Path:
    """next-hub converted to a float32 MLX folder."""
    return convert(DATA / "next-hub", tmp_path_factory.mktemp("next-mlx") / "mlx", dtype="float32")


@pytest.fixture(scope="module")
def anyres_data(tmp_path_factory) -> Path:
    """Shapes-world pictures of 32-90 px: different tile grids and token counts."""
    from mlx_llava.data.shapes import generate_dataset

    root = tmp_path_factory.mktemp("anyres-data")
    generate_dataset(root, 6, seed=3, min_size=32, max_size=90)
    return root


def test_training_with_anyres_samples(hub_folder, anyres_data, tmp_path):
    """Both stages run on pictures of different sizes; each sample holds its own picture's
    token count, and the answers are what is trained."""
    from mlx_llava.conversation import get_template
    from mlx_llava.train import TrainArgs, train
    from mlx_llava.train.data import BadSamplePolicy, make_batch, prepare_samples, read_records

    _, processor = load(hub_folder)
    records = read_records(anyres_data / "finetune.json")
    samples = prepare_samples(
        records, processor, get_template("vicuna_v1"), anyres_data, 1024, BadSamplePolicy("stop")
    )
    counts = set()
    for sample in samples:
        image_tokens = int((sample.ids == processor.config.image_token_index).sum())
        assert image_tokens == processor.config.image_tokens(sample.image_size)
        counts.add(image_tokens)
    assert len(counts) > 2  # the pictures make different grids
    batch = make_batch(samples[:3], processor, BadSamplePolicy("stop"))
    assert batch.image_sizes == [s.image_size for s in samples[:3]]
    tiles = sum(processor.config.image_tiles(s) for s in batch.image_sizes)
    assert batch.pixel_values.shape[0] == tiles
    for stage, data in (("pretrain", "pretrain.json"), ("finetune", "finetune.json")):
        args = TrainArgs(
            model=str(hub_folder),
            data=str(anyres_data / data),
            output=str(tmp_path / stage),
            stage=stage,
            iters=2,
            batch_size=3,
            learning_rate=1e-3,
            compile=False,
            max_length=1024,
        )
        out = train(args)
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert all(np.isfinite(e["loss"]) for e in log if "loss" in e)
        model, _ = load(out)
        assert model.config.is_next


def test_training_loss_equals_transformers(hub_folder, anyres_data):
    """The training loss of a batch of anyres samples is transformers' LlavaNext loss."""
    torch = pytest.importorskip("torch")
    from transformers import LlavaNextForConditionalGeneration

    from mlx_llava.conversation import get_template
    from mlx_llava.train.data import BadSamplePolicy, make_batch, prepare_samples, read_records
    from mlx_llava.train.stages import loss_fn

    model, processor = load(hub_folder)
    records = read_records(anyres_data / "finetune.json")[:2]
    samples = prepare_samples(
        records, processor, get_template("vicuna_v1"), anyres_data, 1024, BadSamplePolicy("stop")
    )
    ours = []
    for sample in samples:  # one at a time: transformers' loss is a mean over the batch
        batch = make_batch([sample], processor, BadSamplePolicy("stop"))
        loss, _ = loss_fn(model, *batch.loss_inputs)
        ours.append(loss.item())
    reference = LlavaNextForConditionalGeneration.from_pretrained(
        DATA / "next-hub", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    theirs = []
    for sample in samples:
        pixels, sizes = processor.image_processor.preprocess(sample.image)
        labels = np.where(sample.mask, sample.ids, -100)
        with torch.no_grad():
            out = reference(
                input_ids=torch.tensor(sample.ids[None].astype(np.int64)),
                pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)[None]),
                image_sizes=torch.tensor(sizes),
                labels=torch.tensor(labels[None].astype(np.int64)),
            )
        theirs.append(out.loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_quantized_conversion_runs_and_agrees(tmp_path):
    """8-bit NeXT folders load and mostly agree with float32; image_newline stays float."""
    from mlx_llava import QuantizeSpec

    spec = QuantizeSpec(bits=8, group_size=32)
    out = convert(DATA / "next-v5", tmp_path / "q8", dtype="float32", quantize=spec)
    model, processor = load(out)
    full, _ = load(DATA / "next-v5", dtype="float32")
    assert "scales" in model.language_model.model.layers[0].self_attn.q_proj
    assert model.image_newline.dtype == mx.float32
    _, meta = oracle("next-v5")
    inputs = processor(prompt_for(meta, meta["question"]), [IMAGES["square"]])
    args = {k: inputs[k] for k in ("input_ids", "pixel_values", "image_sizes")}
    agree = (mx.argmax(model(**args), -1) == mx.argmax(full(**args), -1)).mean().item()
    assert agree > 0.9


def test_chat_caption_and_evaluation_with_anyres(hub_folder, anyres_data, tmp_path, monkeypatch):
    from mlx_llava import ChatSession, generate
    from mlx_llava.caption import caption_folder
    from mlx_llava.evaluation import answer_questions, read_questions

    model, processor = load(hub_folder)
    picture = IMAGES["wide"]
    calls = []
    encode = model.get_image_features

    def counting(pixel_values, image_sizes=None, *rest):
        calls.append(image_sizes)
        return encode(pixel_values, image_sizes, *rest)

    monkeypatch.setattr(model, "get_image_features", counting)
    chat = ChatSession(model, processor, image=picture)
    first = chat.send("What is in the picture?", max_tokens=5)
    chat.send("And the colour?", max_tokens=5)
    assert calls == [[(30, 80)]]  # the second turn found the picture in the cache
    prompt = processor.format_prompt("What is in the picture?")
    assert first == generate(model, processor, prompt, image=picture, max_tokens=5)

    out = tmp_path / "captions.jsonl"
    assert caption_folder(model, processor, DATA / "images", out, max_tokens=4, progress=False)
    files = [json.loads(line)["file"] for line in out.read_text().splitlines()]
    assert {f"{p}.png" for p in PICTURES} <= set(files)

    fmt, questions = read_questions(anyres_data / "qa.json")
    records = list(
        answer_questions(model, processor, questions[:4], fmt, anyres_data, max_tokens=3)
    )
    assert len(records) == 4 and not any("error" in r for r in records)


# The real releases' configs ----------------------------------------------------------------

# tests/fixtures/count_parameters.py: transformers' LlavaNextForConditionalGeneration built on the
# meta device from each tests/fixtures/<name>.config.json (where each comes from: its docstring).
REAL_COUNTS = {
    "llava-v1.6-vicuna-7b-hf": dict(
        total=7_063_431_168, vision_tower=303_507_456, multi_modal_projector=20_979_712
    ),
    "llava-v1.6-mistral-7b-hf": dict(
        total=7_566_747_648, vision_tower=303_507_456, multi_modal_projector=20_979_712
    ),
    "llava-v1.6-34b-hf": dict(
        total=34_752_083_968, vision_tower=303_507_456, multi_modal_projector=58_734_592
    ),
}
REAL_TEMPLATES = {
    "llava-v1.6-vicuna-7b-hf": "vicuna_v1",
    "llava-v1.6-mistral-7b-hf": "mistral_instruct",
    "llava-v1.6-34b-hf": "chatml_direct",
}


@pytest.mark.parametrize("name", REAL_COUNTS)
def test_real_configs_build_lazily_with_transformers_parameter_counts(name):
    from mlx_llava.conversation import template_for_config

    config_file = DATA.parent / f"{name}.config.json"
    model = build_with_counts(config_file, REAL_COUNTS[name])
    assert model.image_newline.size == model.config.text_config.hidden_size
    assert template_for_config(json.loads(config_file.read_text())) == REAL_TEMPLATES[name]
    config = model.config
    assert config.image_tokens((560, 560)) == 2928 and config.image_tiles((560, 560)) == 5
    if "mistral" in name:
        text = config.text_config
        assert (text.model_type, text.num_key_value_heads, text.rope_theta) == ("mistral", 8, 1e6)
        assert text.max_position_embeddings == 32768 and text.sliding_window is None


def test_mistral_window_and_converted_config_round_trip():
    from mlx_llava.config import ModelConfig, TextConfig

    sparse = {"model_type": "mistral", "max_position_embeddings": 32768}
    # Absent, MistralConfig's 4096-position window applies: beyond it attention would differ.
    assert TextConfig.from_dict(sparse).max_position_embeddings == 4096
    assert TextConfig.from_dict({**sparse, "sliding_window": None}).max_position_embeddings == 32768
    raw = json.loads((DATA.parent / "llava-v1.6-mistral-7b-hf.config.json").read_text())
    config = ModelConfig.from_dict(raw)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["architectures"] == ["LlavaNextForConditionalGeneration"]


# Command lines -------------------------------------------------------------------------------


def test_generate_cli_with_pictures_of_different_sizes(capsys, monkeypatch):
    import io
    import sys

    from mlx_llava.cli import generate as generate_cli

    argv = ["--model", str(DATA / "next-v5"), "--dtype", "float32", "-m", "4"]
    pictures = ["--image", str(IMAGES["wide"]), "--image", str(IMAGES["tall"])]
    code, out, err = run_main(generate_cli.main, argv + pictures + ["-p", "Compare."], capsys)
    assert code == 0 and out.strip(), err
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\nAnd now?\n/exit\n"))
    code, out, err = run_main(generate_cli.main, argv + pictures[:2] + ["--chat"], capsys)
    assert code == 0 and out.strip() and "error" not in err, err
    code, _, err = run_main(generate_cli.main, argv + pictures + ["--pad-to-square"], capsys)
    assert code == 1 and err.strip().splitlines() == [
        "error: pad to square does not apply to LLaVA-NeXT: it tiles each picture"
    ]


def test_conv_mode_overrides_the_checkpoints(tmp_path, capsys):
    from mlx_llava.cli import convert as convert_cli

    _, processor = load(DATA / "next-v5", dtype="float32", conv_mode="vicuna_v1")
    assert processor.format_prompt("Hi?").endswith("USER: <image>\nHi? ASSISTANT:")
    out = tmp_path / "mlx"
    argv = ["--hf-path", str(DATA / "next-v5"), "--mlx-path", str(out), "--conv-mode", "chatml"]
    assert run_main(convert_cli.main, argv, capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["conv_mode"] == "chatml"


def test_original_release_with_an_unsupported_merge_says_so(tmp_path, capsys):
    import shutil

    from mlx_llava.cli import convert as convert_cli

    folder = tmp_path / "orig"
    shutil.copytree(DATA / "next-orig", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mm_patch_merge_type": "flat"}))
    argv = ["--hf-path", str(folder), "--mlx-path", str(tmp_path / "out")]
    code, _, err = run_main(
        convert_cli.main, argv + ["--vision-tower", str(DATA / "next-orig-clip")], capsys
    )
    assert code == 1 and err.strip().splitlines() == [
        "error: mm_patch_merge_type 'flat' is not supported with anyres (spatial_unpad)"
    ]
    assert not (tmp_path / "out").exists()


def test_training_counts_a_turned_pictures_upright_size(tmp_path):
    """A JPEG stored sideways with an EXIF orientation is seen upright: its tokens are counted
    from the upright size, which preprocessing then finds."""
    from PIL import Image

    from mlx_llava.image_processor import load_image
    from mlx_llava.train.data import _check_image

    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees
    path = tmp_path / "turned.jpg"
    Image.new("RGB", (90, 30), (200, 30, 30)).save(path, exif=exif)
    upright = load_image(path)
    assert _check_image(path, "entry") == (upright.height, upright.width) == (90, 30)


# The server ------------------------------------------------------------------------------------


def test_server_answers_pictures_of_different_sizes():
    """The OpenAI route on a NeXT checkpoint: each answer is `generate`'s, alone, several at
    once in one batch (rows of different image token counts joining it), and in a second turn
    continued from the prompt cache."""
    from concurrent.futures import ThreadPoolExecutor

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from llava_testing.serving import WorkerGate, data_url, serving, user
    from mlx_llava import generate

    model, processor = load(DATA / "next-v5", dtype="float32")

    def expected(question, pictures, n):
        prompt = processor.format_prompt(question, len(pictures))
        return generate(model, processor, prompt, images=[str(p) for p in pictures], max_tokens=n)

    requests = [
        ("What is this?", [IMAGES["wide"]], 10),
        ("Describe it in detail.", [IMAGES["small"]], 14),
        ("Compare them.", [IMAGES["tall"], IMAGES["square"]], 12),
        ("Hello!", [], 8),
    ]
    with serving((model, processor), model_id="next") as server:

        def ask(request):
            question, pictures, n = request
            body = {"messages": [user(question, *map(data_url, pictures))], "max_tokens": n}
            response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        one_at_a_time = [ask(r) for r in requests]
        assert one_at_a_time == [expected(*r) for r in requests]
        server.worker.prompt_cache.trim_to(n_sequences=0)
        # The worker waits at the first request's admission until all of them are submitted.
        with ThreadPoolExecutor(len(requests)) as pool, WorkerGate(server.worker) as gate:
            gate.hold("admitted")
            answers = [pool.submit(ask, r) for r in requests]
            gate.wait_held()
            gate.wait(lambda: gate.submitted == len(requests))
            gate.release()
            assert [a.result(timeout=120) for a in answers] == one_at_a_time
        assert max(rows for rows, _ in gate.steps) > 2  # they shared the batch
        # A second turn about the wide picture: its prefix comes from the cache.
        turns = [
            user("What is this?", data_url(IMAGES["wide"])),
            {"role": "assistant", "content": one_at_a_time[0]},
            user("And the colour?"),
        ]
        body = {"messages": turns, "max_tokens": 6}
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        chat = ChatSessionFor(model, processor, IMAGES["wide"], one_at_a_time[0])
        assert response.json()["choices"][0]["message"]["content"] == chat.send(
            "And the colour?", max_tokens=6
        )
        # The picture's tokens and the first turn were not computed again.
        assert usage["prompt_tokens_details"]["cached_tokens"] > meta_tokens("wide")


def ChatSessionFor(model, processor, picture, first_answer):
    """A ChatSession whose first turn was "What is this?" about `picture`, answered so."""
    from mlx_llava import ChatSession

    chat = ChatSession(model, processor, image=picture)
    chat.messages = [("user", "<image>\nWhat is this?"), ("assistant", first_answer.strip())]
    return chat


def meta_tokens(picture: str) -> int:
    return oracle("next-v5")[1]["image_tokens"][picture]


def test_prompt_embeddings_encode_only_the_uncached_pictures_tiles(hub_folder, monkeypatch):
    """Two pictures of different sizes, the first in a cached prefix: only the second one's
    tiles go through the tower, and the embeddings are those of the whole prompt."""
    from mlx_llava.prompt import encode_prompt, image_runs, prompt_embeddings

    model, processor = load(hub_folder)
    _, meta = oracle("next-hub")
    prompt = prompt_for(meta, "<image>\nFirst.\n<image>\nSecond.")
    pictures = [IMAGES["square"], IMAGES["small"]]
    input_ids, pixel_values, _, sizes = encode_prompt(model, processor, prompt, pictures)
    runs = image_runs(input_ids[0].tolist(), model.config.image_token_index)
    start = runs[0][1] + 1
    expected = model.get_input_embeddings(input_ids, pixel_values, sizes)[0, start:]
    encoded = []
    features = model.get_image_features

    def spy(pixels, image_sizes=None, *rest):
        encoded.append((pixels.shape[0], image_sizes))
        return features(pixels, image_sizes, *rest)

    monkeypatch.setattr(model, "get_image_features", spy)
    ours = prompt_embeddings(model, input_ids, pixel_values, start, sizes)
    assert encoded == [(model.config.image_tiles(sizes[1]), [sizes[1]])]  # the small one's 3
    np.testing.assert_allclose(np.array(ours), np.array(expected), atol=1e-5)


def test_prompts_joining_together_encode_their_tiles_in_one_tower_call(hub_folder, monkeypatch):
    """Three prompts with pictures of different sizes (one of them half cached): one tower call
    for every tile still needed, and each prompt's embeddings are the ones it gets alone."""
    from mlx_llava.prompt import UncachedPrompt, embed_prompts, encode_prompt, image_runs

    model, processor = load(hub_folder)
    _, meta = oracle("next-hub")
    cases = [
        ("<image>\nFirst.\n<image>\nSecond.", [IMAGES["square"], IMAGES["small"]]),
        ("<image>\nWhat is it?", [IMAGES["wide"]]),
        ("<image>\nAnd this?", [IMAGES["tall"]]),
    ]
    prompts, expected = [], []
    for i, (text, pictures) in enumerate(cases):
        input_ids, pixel_values, _, sizes = encode_prompt(
            model, processor, prompt_for(meta, text), pictures
        )
        runs = image_runs(input_ids[0].tolist(), model.config.image_token_index)
        start = runs[0][1] + 1 if i == 0 else 0  # the first prompt's first picture is cached
        prompts.append(UncachedPrompt(input_ids, pixel_values, start, sizes))
        expected.append(model.get_input_embeddings(input_ids, pixel_values, sizes)[0, start:])
    encoded = []
    features = model.get_image_features

    def spy(pixels, image_sizes=None, *rest):
        encoded.append(pixels.shape[0])
        return features(pixels, image_sizes, *rest)

    monkeypatch.setattr(model, "get_image_features", spy)
    ours = embed_prompts(model, prompts)
    tiles = [model.config.image_tiles(p.image_sizes[-1]) for p in prompts]
    assert encoded == [sum(tiles)]
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
