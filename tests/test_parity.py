"""Number-for-number parity with transformers, stage by stage, on the recorded oracle outputs.

The fixtures under tests/fixtures/data were written by tests/fixtures/make_fixtures.py with
transformers' LlavaForConditionalGeneration (float32); tests/test_oracle_live.py repeats the
comparison against a live transformers model when torch is installed.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from llava_testing.parity import FEATURE_ATOL, PIXEL_ATOL, assert_logits_close, greedy_tokens, nhwc
from mlx_llava import PromptCache, convert, load
from mlx_llava.prompt import prepare_prompt

DATA = Path(__file__).parent / "fixtures" / "data"
IMAGES = {name: DATA / "images" / f"{name}.png" for name in ("a", "b")}
HF_CHECKPOINTS = ["hf-hub", "hf-v452", "hf-v5", "hf-gqa"]


def oracle(name: str) -> tuple[dict, dict]:
    folder = DATA / name
    arrays = dict(np.load(folder / "oracle.npz"))
    meta = json.loads((folder / "oracle.json").read_text())
    if meta.get("same_weights_as"):  # the oracle of the twin with the same weights applies
        arrays = {**dict(np.load(DATA / meta["same_weights_as"] / "oracle.npz")), **arrays}
        meta = {**json.loads((DATA / meta["same_weights_as"] / "oracle.json").read_text()), **meta}
    return arrays, meta


@pytest.fixture(scope="module", params=HF_CHECKPOINTS)
def hf(request, tmp_path_factory):
    """(name, model, processor) loaded from the llava-hf folder after conversion to MLX."""
    name = request.param
    out = convert(DATA / name, tmp_path_factory.mktemp(name) / "mlx", dtype="float32")
    model, processor = load(out)
    return name, model, processor


def test_in_memory_load_equals_converted_folder(hf):
    name, model, _ = hf
    direct, _ = load(DATA / name, dtype="float32")
    from mlx.utils import tree_flatten

    ours = dict(tree_flatten(model.parameters()))
    for key, value in tree_flatten(direct.parameters()):
        np.testing.assert_array_equal(np.array(value), np.array(ours[key]), err_msg=key)


def test_preprocessing_and_token_expansion(hf):
    name, _, processor = hf
    arrays, meta = oracle(name)
    inputs = processor(meta["prompt"], [IMAGES["a"]])
    np.testing.assert_array_equal(np.array(inputs["input_ids"]), arrays["input_ids"])
    expected = arrays["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.array(inputs["pixel_values"]), expected, atol=PIXEL_ATOL, rtol=0)


def test_vision_features_and_projector(hf):
    name, model, _ = hf
    arrays, _ = oracle(name)
    pixels = nhwc(arrays["pixel_values"])
    n_states = arrays["vision_hidden_states"].shape[0]
    states = model.vision_tower(pixels, list(range(n_states)))
    for i, state in enumerate(states):
        np.testing.assert_allclose(
            np.array(state), arrays["vision_hidden_states"][i], atol=FEATURE_ATOL, rtol=0
        )
    features = model.get_image_features(pixels)
    np.testing.assert_allclose(
        np.array(features), arrays["image_features"], atol=FEATURE_ATOL, rtol=0
    )


def test_full_logits(hf):
    name, model, _ = hf
    arrays, _ = oracle(name)
    logits = model(mx.array(arrays["input_ids"]), pixel_values=nhwc(arrays["pixel_values"]))
    assert_logits_close(logits, arrays["logits"])


def test_greedy_generation_is_token_identical(hf):
    name, model, processor = hf
    arrays, meta = oracle(name)
    tokens = greedy_tokens(model, processor, meta["prompt"], [IMAGES["a"]], 24)
    assert tokens == arrays["greedy_tokens"].tolist()


def test_text_only_prompt(hf):
    name, model, processor = hf
    arrays, meta = oracle(name)
    inputs = processor(meta["text_prompt"])
    assert inputs["pixel_values"] is None
    np.testing.assert_array_equal(np.array(inputs["input_ids"]), arrays["text_input_ids"])
    assert_logits_close(model(inputs["input_ids"]), arrays["text_logits"])
    tokens = greedy_tokens(model, processor, meta["text_prompt"], [], 24)
    assert tokens == arrays["text_greedy_tokens"].tolist()


def test_two_images_in_one_prompt(hf):
    name, model, processor = hf
    arrays, meta = oracle(name)
    images = [IMAGES[k] for k in meta["images"]["two_pixel_values"]]
    inputs = processor(meta["two_prompt"], images)
    np.testing.assert_array_equal(np.array(inputs["input_ids"]), arrays["two_input_ids"])
    logits = model(inputs["input_ids"], pixel_values=inputs["pixel_values"])
    assert_logits_close(logits, arrays["two_logits"])


def test_batch_inputs_are_left_padded_like_transformers(hf):
    name, model, processor = hf
    arrays, meta = oracle(name)
    prompts = meta["batch_prompts"]
    images = [IMAGES[k] for k in meta["images"]["batch"]]
    batch = processor(prompts, images)
    np.testing.assert_array_equal(np.array(batch["input_ids"]), arrays["batch_input_ids"])
    np.testing.assert_array_equal(np.array(batch["attention_mask"]), arrays["batch_attention_mask"])


def test_kv_cached_generation_equals_full_forward(hf):
    """Greedy tokens from the cached decoding loop equal argmax of full forwards."""
    name, model, processor = hf
    _, meta = oracle(name)
    inputs = processor(meta["prompt"], [IMAGES["a"]])
    ids = inputs["input_ids"]
    expected = []
    for _ in range(8):
        logits = model(ids, pixel_values=inputs["pixel_values"])
        expected.append(int(mx.argmax(logits[0, -1]).item()))
        ids = mx.concatenate([ids, mx.array([[expected[-1]]])], axis=1)
    assert greedy_tokens(model, processor, meta["prompt"], [IMAGES["a"]], 8) == expected


def test_prompt_cache_reuse_gives_the_same_answers(hf):
    name, model, processor = hf
    arrays, meta = oracle(name)
    cache = PromptCache(model)
    first = greedy_tokens(model, processor, meta["prompt"], [IMAGES["a"]], 24, prompt_cache=cache)
    prefix = len(processor.tokenize(meta["prompt"])) - 1
    again = greedy_tokens(model, processor, meta["prompt"], [IMAGES["a"]], 24, prompt_cache=cache)
    assert first == again == arrays["greedy_tokens"].tolist()
    # The second call computed only the last prompt position.
    prepared = prepare_prompt(model, processor, meta["prompt"], [IMAGES["a"]], cache)
    assert prepared.embeddings.shape[0] == 1 and cache.length == prefix


@pytest.mark.parametrize("name, clip", [("orig-v15", "orig-v15-clip"), ("orig-v1", "orig-v1-clip")])
def test_original_checkpoints(name, clip, tmp_path):
    if name == "orig-v15":
        pytest.importorskip("torch")  # its .bin shards are read with torch's weights-only loader
    arrays, meta = oracle(name)
    out = convert(DATA / name, tmp_path / "mlx", dtype="float32", vision_tower=DATA / clip)
    model, processor = load(out)
    config = model.config
    assert config.image_token_index == -200
    assert config.image_aspect_ratio == meta.get("image_aspect_ratio", "square")
    assert config.conv_mode == ("vicuna_v1" if name == "orig-v15" else "llava_v1")
    # The original's tokenizer_image_token ids, with its one -200 expanded to the image's tokens.
    inputs = processor(meta["prompt"], [IMAGES[meta["image"]]])
    expected_ids = []
    for t in arrays["input_ids"][0].tolist():
        expected_ids.extend([t] * config.num_image_tokens if t == -200 else [t])
    assert np.array(inputs["input_ids"])[0].tolist() == expected_ids
    expected_pixels = arrays["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.array(inputs["pixel_values"]), expected_pixels, atol=PIXEL_ATOL)
    features = model.get_image_features(inputs["pixel_values"])
    np.testing.assert_allclose(np.array(features), arrays["image_features"], atol=FEATURE_ATOL)
    logits = model(inputs["input_ids"], pixel_values=inputs["pixel_values"])
    assert_logits_close(logits, arrays["logits"])
    tokens = greedy_tokens(model, processor, meta["prompt"], [IMAGES[meta["image"]]], 24)
    assert tokens == arrays["greedy_tokens"].tolist()


def test_pad_to_square_option_for_llava_hf_checkpoints():
    """`pad_to_square=True` preprocesses as transformers' LlavaImageProcessor with `do_pad`
    (the original LLaVA-1.5's expand2square) does with the checkpoint's settings."""
    from PIL import Image

    hf_llava = pytest.importorskip("transformers.models.llava.image_processing_pil_llava")
    _, plain = load(DATA / "hf-hub", dtype="float32")
    _, padded = load(DATA / "hf-hub", dtype="float32", pad_to_square=True)
    image = Image.open(IMAGES["a"]).convert("RGB")
    reference = hf_llava.LlavaImageProcessorPil.from_pretrained(DATA / "hf-hub", do_pad=True)
    expected = reference(image, return_tensors="np")["pixel_values"]
    expected = np.asarray(expected).transpose(0, 2, 3, 1)
    ours = padded.image_processor([image])
    np.testing.assert_allclose(ours, expected, atol=PIXEL_ATOL, rtol=0)
    assert np.abs(plain.image_processor([image]) - expected).max() > 0.1


def test_batch_generate_matches_transformers_batched_greedy(hf):
    """transformers' left-padded batched greedy token ids equal ours: `batch_generate`'s and
    each row's alone. (The random tokens are mostly raw bytes that decode to runs of U+FFFD,
    so text could not tell two answers apart: ids are compared.)"""
    from mlx_llava import batch_generate

    name, model, processor = hf
    arrays, meta = oracle(name)
    prompts = meta["batch_prompts"]
    images = [IMAGES[k] for k in meta["images"]["batch"]]
    expected = arrays["batch_greedy_tokens"].tolist()
    for prompt, image, row in zip(prompts, images, expected):
        assert greedy_tokens(model, processor, prompt, [image], 12) == row
    results = batch_generate(
        model, processor, prompts, images=images, max_tokens=12, return_results=True
    )
    assert [r.tokens for r in results] == expected
    assert [r.finish_reason for r in results] == ["length", "length"]
    lengths = arrays["batch_attention_mask"].sum(axis=1).tolist()
    assert [r.prompt_tokens for r in results] == lengths
    texts = batch_generate(model, processor, prompts, images=images, max_tokens=12)
    assert texts == [r.text for r in results]
