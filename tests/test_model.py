"""Model structure without an oracle: sizes, config defaults, the merge, the KV cache."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_llava import Model, ModelConfig
from mlx_llava.config import ConfigError
from mlx_llava.model import check_image_runs, merge_image_features

FIXTURES = Path(__file__).parent / "fixtures"


def real_config() -> dict:
    return json.loads((FIXTURES / "llava-1.5-7b-hf.config.json").read_text())


def count(module) -> int:
    return sum(v.size for _, v in tree_flatten(module.parameters()))


def test_llava_1_5_7b_parameter_count_lazily():
    before = mx.get_active_memory()
    model = Model(ModelConfig.from_dict(real_config()))
    assert count(model) == 7_063_427_072
    assert count(model.vision_tower) == 303_507_456
    assert count(model.multi_modal_projector) == 20_979_712
    # Nothing was evaluated: building the 7B model allocates (almost) nothing.
    assert mx.get_active_memory() - before < 1 << 20


def test_sparse_config_takes_library_defaults():
    config = ModelConfig.from_dict(real_config())
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (4096, 11008, 32)
    assert text.num_key_value_heads == 32 and text.rope_theta == 10000.0
    assert text.rms_norm_eps == 1e-5 and text.vocab_size == 32064
    assert vision.hidden_act == "quick_gelu" and vision.layer_norm_eps == 1e-5
    assert config.num_image_tokens == 576


def test_rope_parameters_and_image_token_id_spellings():
    raw = real_config()
    raw["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    raw["image_token_id"] = raw.pop("image_token_index")
    config = ModelConfig.from_dict(raw)
    assert config.text_config.rope_theta == 500000.0 and config.text_config.rope_scaling is None
    assert config.image_token_index == 32000


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "qwen2_vl"}, "not a LLaVA checkpoint"),
        ({"mm_vision_tower": "openai/clip"}, "original haotian-liu"),
        ({"vision_feature_select_strategy": "cls"}, "must be 'default' or 'full'"),
        ({"vision_feature_layer": -40}, "out of range"),
    ],
)
def test_bad_configs_say_why(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**real_config(), **change})


def test_merge_writes_features_in_order_across_the_batch():
    rng = np.random.default_rng(0)
    B, L, D, T = 2, 9, 4, 3
    embeddings = rng.standard_normal((B, L, D)).astype(np.float32)
    mask = np.zeros((B, L), bool)
    mask[0, 1:4] = True  # image 0
    mask[1, 2:5] = True  # image 1
    mask[1, 6:9] = True  # image 2
    features = rng.standard_normal((3, T, D)).astype(np.float32)
    expected = embeddings.copy()
    expected[mask] = features.reshape(-1, D)
    merged = merge_image_features(mx.array(embeddings), mx.array(features), mx.array(mask))
    np.testing.assert_array_equal(np.array(merged), expected)


def tiny_config(**changes) -> ModelConfig:
    raw = {
        "vision_config": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=28,
            patch_size=7,
        ),
        "text_config": dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=128,
        ),
        "image_token_index": 100,
    }
    raw.update(changes)
    return ModelConfig.from_dict(raw)


def test_kv_cached_decoding_equals_full_forward():
    mx.random.seed(0)
    model = Model(tiny_config())
    T = model.config.num_image_tokens
    ids = mx.array([[1, 5, *([100] * T), 7, 8, 9, 10, 11]])
    pixels = mx.random.normal((1, 28, 28, 3))
    full = model(ids, pixel_values=pixels)
    cache = model.make_cache()
    embeddings = model.get_input_embeddings(ids, pixels)
    split = ids.shape[1] - 4
    steps = [model(ids[:, :split], cache=cache, input_embeddings=embeddings[:, :split])]
    for i in range(split, ids.shape[1]):
        steps.append(
            model(ids[:, i : i + 1], cache=cache, input_embeddings=embeddings[:, i : i + 1])
        )
    cached = mx.concatenate(steps, axis=1)
    np.testing.assert_allclose(np.array(cached), np.array(full), atol=1e-4, rtol=1e-4)


def test_image_token_count_mismatch_is_an_error():
    model = Model(tiny_config())
    ids = mx.array([[1, 100, 100, 7]])
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, pixel_values=mx.zeros((1, 28, 28, 3)))


def test_image_tokens_split_in_two_places_are_refused():
    model = Model(tiny_config())
    T = model.config.num_image_tokens
    pixels = mx.zeros((2, 28, 28, 3))
    split = mx.array([[1, *([100] * 10), 5, *([100] * (T - 10)), 7, *([100] * T)]])
    with pytest.raises(ValueError, match=f"the {T} image tokens of image 1 are split"):
        model(split, pixel_values=pixels)
    second_split = mx.array([[1, *([100] * T), 5, *([100] * 3), 6, *([100] * (T - 3))]])
    with pytest.raises(ValueError, match="image 2 are split"):
        model(second_split, pixel_values=pixels)
    # Two pictures may touch (`<image><image>`): the run ends where the second one ends.
    assert model(mx.array([[1, *([100] * 2 * T), 7]]), pixel_values=pixels).shape[1] == 2 * T + 2
    # In a batch the pictures follow each other row by row; a row's end ends a run.
    rows = mx.array([[1, *([100] * T), 7], [1, 5, *([100] * T)]])
    assert model(rows, pixel_values=pixels).shape[:2] == (2, T + 2)
    across_rows = mx.array([[1, 5, 6, *([100] * (T - 3))], [*([100] * 3), *([7] * (T - 3))]])
    with pytest.raises(ValueError, match="image 1 are split"):
        model(across_rows, pixel_values=pixels[:1])


def test_image_runs_follow_per_picture_counts():
    ids = mx.array([[0, 9, 9, 9, 0, 9, 9, 9, 9, 9, 0]])
    check_image_runs(ids, 9, [3, 5])
    check_image_runs(mx.array([[0, *[9] * 8, 0]]), 9, [3, 5])  # touching pictures
    with pytest.raises(ValueError, match="the 5 image tokens of image 1 are split"):
        check_image_runs(ids, 9, [5, 3])
    with pytest.raises(ValueError, match="has 8 image tokens but 2 image.s. need 9: use one"):
        check_image_runs(ids, 9, [4, 5])
    check_image_runs(mx.array([[1, 2, 3]]), 9, [])


def test_vision_tower_runs_only_the_layers_it_needs():
    model = Model(tiny_config())
    cls = type(model.vision_tower.encoder.layers[0])
    calls = []
    original = cls.__call__

    def spy(self, x):
        calls.append(self)
        return original(self, x)

    cls.__call__ = spy
    try:
        mx.eval(model.get_image_features(mx.zeros((1, 28, 28, 3))))
    finally:
        cls.__call__ = original
    assert len(calls) == 2  # hidden state -2 of 3 layers is the output of layer 2
