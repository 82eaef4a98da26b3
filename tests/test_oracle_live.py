"""Parity against a live transformers model (runs where torch is installed; CI installs it).

The checkpoints are rebuilt with llava_testing.oracles and transformers runs now, so
a change of behaviour in the installed transformers shows up here, not only in the recorded
fixtures.
"""

import copy
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from llava_testing import oracles  # noqa: E402 - torch first
from mlx_llava import convert, load, stream_generate  # noqa: E402

LOGIT_RTOL = 1e-4
FEATURE_ATOL = 1e-4

SPECS = {
    # The hub's sparse config, rebuilt and run now.
    "hub": oracles.HF_SPECS["hf-hub"],
    # GQA, rope theta 5e5 via rope_parameters, two feature layers, "full", in the v5 layout.
    "gqa-v5": dict(copy.deepcopy(oracles.HF_SPECS["hf-gqa"]), layout="v5", dtype_key="dtype"),
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def live(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    oracles.write_images(root)
    folder = oracles.build_llava_hf(root / "ckpt", SPECS[request.param])
    expected = oracles.oracle_outputs(folder, images_dir=root)
    model, processor = load(convert(folder, root / "mlx", dtype="float32"))
    return model, processor, expected, root


def test_live_logits_and_features(live):
    model, processor, expected, _ = live
    pixels = mx.array(expected["pixel_values"].transpose(0, 2, 3, 1))
    features = model.get_image_features(pixels)
    np.testing.assert_allclose(np.array(features), expected["image_features"], atol=FEATURE_ATOL)
    logits = np.array(model(mx.array(expected["input_ids"]), pixel_values=pixels))
    scale = np.abs(expected["logits"]).max()
    assert np.abs(logits - expected["logits"]).max() <= LOGIT_RTOL * scale


def test_live_greedy_and_preprocessing(live):
    model, processor, expected, root = live
    image = root / "images" / "a.png"
    inputs = processor(oracles.PROMPT, [image])
    np.testing.assert_array_equal(np.array(inputs["input_ids"]), expected["input_ids"])
    np.testing.assert_allclose(
        np.array(inputs["pixel_values"]), expected["pixel_values"].transpose(0, 2, 3, 1), atol=1e-5
    )
    tokens = [
        r.token
        for r in stream_generate(model, processor, oracles.PROMPT, image=image, max_tokens=24)
    ]
    assert tokens == expected["greedy_tokens"].tolist()


@pytest.mark.parametrize("name", ["orig-spm-v15", "orig-spm-v1", "orig-spm-strings"])
def test_live_sentencepiece_fixtures_reproduce(name, tmp_path):
    """Trained again, the tokenizer.model is the committed one, and the transcribed original
    algorithms give the committed ids and training targets (recorded with transformers 4.31's
    agreement)."""
    import json

    data = Path(__file__).parent / "fixtures" / "data" / name
    assert oracles.llama_sentencepiece_model() == (data / "tokenizer.model").read_bytes()
    meta = json.loads((data / "oracle.json").read_text())
    cases = oracles.TRAINING_CASES if "training" in meta else None
    again = oracles.spm_oracle(data, meta["prompts"], None, cases)
    assert again["input_ids"] == meta["input_ids"]
    assert again.get("training") == meta.get("training")
    assert (name == "orig-spm-strings") == (cases is None)


# LLaVA-NeXT ---------------------------------------------------------------------------------

NEXT_SPECS = {
    # Vicuna in the hub layout, rebuilt with another seed than the recorded fixture.
    "next-hub": dict(oracles.NEXT_SPECS["next-hub"], seed=1603),
    # Yi shapes saved by transformers 5 (the recorded one uses 4.52 names).
    "next-yi-v5": dict(oracles.NEXT_SPECS["next-v452"], layout="v5", seed=1809),
    # An original release, converted by transformers' own key map for the oracle.
    "next-orig": dict(oracles.NEXT_ORIG_SPEC, seed=1902),
}


@pytest.fixture(scope="module", params=sorted(NEXT_SPECS))
def live_next(request, tmp_path_factory):
    name, spec = request.param, NEXT_SPECS[request.param]
    root = tmp_path_factory.mktemp(name)
    oracles.write_next_images(root)
    # The seeds are the first whose greedy decoding is far from ties (torch 2.13 CPU); another
    # torch may draw other weights: the search goes on.
    for seed in range(spec["seed"], spec["seed"] + 10):
        if name == "next-orig":
            folder = oracles.build_original_next(root / "ckpt", spec, seed=seed)
            expected = oracles.original_next_oracle_outputs(folder, images_dir=root)
        else:
            folder = oracles.build_llava_next(root / "ckpt", dict(spec, seed=seed))
            expected = oracles.next_oracle_outputs(folder, spec["decoder"], images_dir=root)
        if not oracles.next_oracle_problems(expected, strict=False):
            break
    tower = root / "ckpt-clip" if name == "next-orig" else None
    model, processor = load(convert(folder, root / "mlx", dtype="float32", vision_tower=tower))
    return name, model, processor, expected, root


def test_live_next_features_logits_and_greedy(live_next):
    name, model, processor, expected, root = live_next
    template = oracles.NEXT_TEMPLATES[NEXT_SPECS[name]["decoder"]]
    prompt = template.format(q=oracles.NEXT_QUESTION)
    for picture in oracles.NEXT_IMAGE_SIZES:
        image = root / "images" / f"{picture}.png"
        inputs = processor(prompt, [image])
        pixels = expected[f"{picture}_pixel_values"].transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.array(inputs["pixel_values"]), pixels, atol=1e-5)
        features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        np.testing.assert_allclose(
            np.array(features), expected[f"{picture}_image_features"], atol=FEATURE_ATOL
        )
        logits = np.array(
            model(**{k: inputs[k] for k in ("input_ids", "pixel_values", "image_sizes")})
        )
        reference = expected[f"{picture}_last_logits"]
        ours = logits[0, -1, : logits.shape[-1]]
        reference = reference[: ours.shape[-1]]  # an original's grown rows are not compared
        assert np.abs(ours - reference).max() <= LOGIT_RTOL * np.abs(reference).max()
        tokens = [
            r.token for r in stream_generate(model, processor, prompt, image=image, max_tokens=24)
        ]
        assert tokens == expected[f"{picture}_greedy_tokens"].tolist(), picture


@pytest.mark.parametrize(
    "kind, layout, option",
    [("ov", "v5", True), ("nv", "hub", "max")],
    ids=["onevision-tied-v5", "next-video-max-hub"],
)
def test_live_onevision_and_next_video(kind, layout, option, tmp_path):
    """OneVision (tied, transformers 5 layout) and NeXT-Video (max pooling, hub layout)
    rebuilt and run in transformers now, then checked as tests/test_onevision.py checks the
    recorded ones."""
    from llava_testing.onevision import assert_matches_oracle, oracle
    from llava_testing.onevision_oracles import write_checkpoint

    folder = write_checkpoint(tmp_path / "ckpt", kind, layout, option, 21)
    model, processor = load(convert(folder, tmp_path / "mlx", dtype="float32"))
    assert_matches_oracle(model, processor, *oracle("ckpt", tmp_path))
