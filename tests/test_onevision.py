"""LLaVA-OneVision and LLaVA-NeXT-Video number for number with transformers, on recorded outputs.

tests/fixtures/make_onevision_fixtures.py wrote tiny random checkpoints: ov-hub (SigLIP, Qwen2
with GQA and tied embeddings, llava-hf hub layout), ov-v5 (untied, transformers 5 layout),
nv-hub (CLIP, Llama, average pooling) and nv-v5 (conv pooling), with transformers' outputs on a
wide and a tall picture (their grids downsampled by "anyres_max_1"), both in one prompt, a video
of 8 frames, and a picture with the video. tests/test_oracle_live.py reruns transformers live.
"""

import numpy as np
import pytest
from PIL import Image

from llava_testing.onevision import (
    DATA,
    assert_matches_oracle,
    oracle,
)
from llava_testing.parity import build_with_counts
from mlx_llava import convert, load, stream_generate

CHECKPOINTS = ["ov-hub", "ov-v5", "nv-hub", "nv-v5"]


@pytest.fixture(scope="module", params=CHECKPOINTS)
def checkpoint(request, tmp_path_factory):
    """(name, model, processor) of each checkpoint after conversion to an MLX folder."""
    name = request.param
    out = tmp_path_factory.mktemp(name) / "mlx"
    convert(DATA / name, out, dtype="float32")
    model, processor = load(out)
    return name, model, processor


def cases(name: str) -> list[str]:
    return list(oracle(name)[1]["questions"])


def test_config_reads_the_checkpoints_fields(checkpoint):
    name, model, _ = checkpoint
    config = model.config
    if name.startswith("ov"):
        assert config.model_type == "llava_onevision"
        assert config.vision_config.model_type == "siglip_vision_model"
        assert config.text_config.model_type == "qwen2" and config.text_config.rope_theta == 1e6
        assert config.vision_feature_select_strategy == "full" and config.feature_layers == [-1]
        assert config.max_num_patches == 1
        assert config.text_config.tie_word_embeddings == (name == "ov-hub")
        assert model.language_model.decoder_class.__module__ == "mlx_lm.models.qwen2"
        assert "lm_head" not in model.language_model or name != "ov-hub"
    else:
        assert config.model_type == "llava_next_video"
        assert config.spatial_pool_mode == ("average" if name == "nv-hub" else "conv")
    assert (config.image_token_index, config.video_token_index) == (384, 386)


def test_pixels_ids_logits_and_greedy_tokens_match_transformers(checkpoint):
    name, model, processor = checkpoint
    assert_matches_oracle(model, processor, *oracle(name))


def test_token_counts_are_the_processors(checkpoint):
    """`config.image_tokens` / `video_tokens` give transformers' expansions."""
    name, model, processor = checkpoint
    arrays, meta = oracle(name)
    config = model.config
    for case, counts in meta["tokens"].items():
        sizes = [tuple(s) for s in arrays.get(f"{case}_image_sizes", [])]
        alone = len(sizes) == 1
        assert sum(config.image_tokens(s, alone) for s in sizes) == counts["image"], case
        video = counts["video"] and config.video_tokens(len(arrays["video_frames"]))
        assert video == counts["video"], case


def test_mismatched_tokens_and_videos_are_refused(checkpoint):
    name, model, processor = checkpoint
    arrays, meta = oracle(name)
    frames = arrays["video_frames"]
    with pytest.raises(ValueError, match="1 <video> placeholder"):
        processor("USER: <video>\nHi ASSISTANT:", videos=[frames, frames])
    inputs = processor("USER: <video>\nHi ASSISTANT:", videos=[frames])
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"][:, :4]  # 4 frames, not 8
    with pytest.raises(ValueError, match="video tokens"):
        model(**inputs)


# The real releases' configs (tests/fixtures/count_parameters.py: transformers' models built on
# the meta device from each tests/fixtures/<name>.config.json; where each comes from: its
# docstring).
REAL_COUNTS = {
    "llava-onevision-qwen2-0.5b-ov-hf": dict(
        total=893_675_552, vision_tower=397_747_744, multi_modal_projector=1_836_800
    ),
    "llava-onevision-qwen2-7b-ov-hf": dict(
        total=8_030_807_584, vision_tower=397_747_744, multi_modal_projector=16_980_992
    ),
    "LLaVA-NeXT-Video-7B-hf": dict(
        total=7_063_431_168, vision_tower=303_507_456, multi_modal_projector=20_979_712
    ),
}
# The releases' vocabularies: llava-hf's conversion (transformers'
# convert_llava_onevision_weights_to_hf.py) adds <image> and <video> to Qwen2-0.5B's 151936 /
# Qwen2-7B's 152064 entries and pads to a multiple of 64: `resize_token_embeddings(vocab + 2,
# pad_to_multiple_of=64)`; NeXT-Video keeps llava-v1.6-vicuna's 32064.
REAL_VOCAB = {
    "llava-onevision-qwen2-0.5b-ov-hf": 152_000,
    "llava-onevision-qwen2-7b-ov-hf": 152_128,
    "LLaVA-NeXT-Video-7B-hf": 32_064,
}


@pytest.mark.parametrize("name", REAL_COUNTS)
def test_real_configs_build_lazily_with_transformers_parameter_counts(name):
    model = build_with_counts(DATA.parent / f"{name}.config.json", REAL_COUNTS[name])
    config = model.config
    assert config.text_config.vocab_size == REAL_VOCAB[name]
    assert model.language_model.model.embed_tokens.weight.shape[0] == REAL_VOCAB[name]
    assert max(config.image_token_index, config.video_token_index) < REAL_VOCAB[name]
    if name.startswith("llava-onevision"):
        assert config.num_image_tokens == 729 and config.video_tokens(8) == 8 * 196 + 1
        assert len(config.image_grid_pinpoints) == 36 and config.max_num_patches == 9
        assert config.image_tokens((384, 384), alone=False) == 730
    else:
        assert config.video_tokens(8) == 8 * 144 and config.image_tokens((560, 560)) == 2928


def test_an_original_lmms_lab_release_reads_as_its_llava_hf_conversion(tmp_path):
    """ov-orig holds ov-hub's weights as lmms-lab saves a OneVision release (Qwen2, the SigLIP
    tower inside without its last layer, "(1x1),...,(3x3)" pinpoints, no <image> or <video> in
    the tokenizer): converted, it gives transformers' outputs recorded for ov-hub."""
    folder = DATA / "ov-orig"
    tower = DATA / "ov-orig-siglip"
    model, processor = load(convert(folder, tmp_path / "mlx", dtype="float32", vision_tower=tower))
    config = model.config
    assert (config.model_type, config.text_config.model_type) == ("llava_onevision", "qwen2")
    assert config.vision_config.num_hidden_layers == 2 and config.feature_layers == [-1]
    assert len(config.image_grid_pinpoints) == 9
    assert (config.image_token_index, config.video_token_index) == (-200, -201)
    arrays, meta = oracle("ov-hub")
    for case in meta["questions"]:  # the prompt is split at <image> and <video>: our ids
        ids = arrays[f"{case}_input_ids"]
        arrays[f"{case}_input_ids"] = np.where(ids == 384, -200, np.where(ids == 386, -201, ids))
    assert_matches_oracle(model, processor, arrays, meta)


def test_random_onevision_checkpoints_for_benchmarks_load_and_answer(tmp_path):
    """`write_onevision_hf` (benchmarks/make_checkpoint.py --preset ov-mid) writes a folder that
    transformers reads as a LlavaOnevisionConfig and that answers a picture and a video with
    the processor's token counts (28-px tiles of 14-px patches: 4 features, 1 a frame)."""
    from transformers import AutoConfig

    from llava_testing.checkpoints import write_onevision_hf

    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=14,
    )  # fmt: skip
    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    folder = write_onevision_hf(tmp_path / "ov", vision, text)
    assert type(AutoConfig.from_pretrained(folder)).__name__ == "LlavaOnevisionConfig"
    model, processor = load(folder)
    assert model.config.num_image_tokens == 4 and model.config.video_tokens(3) == 3 * 1 + 1
    frames = np.zeros((3, 40, 60, 3), np.uint8)
    video = processor(processor.format_prompt("<video>\nHi", 0), videos=[frames])
    assert int((video["input_ids"] == model.config.video_token_index).sum()) == 4
    picture = Image.new("RGB", (60, 40))
    answer = stream_generate(model, processor, processor.format_prompt("Hi"), picture, max_tokens=3)
    assert len(list(answer)) == 3
