"""Training: answer masks, what each stage trains, resume, output folders and bad data.

Everything runs on a tiny random LLaVA (written by `init_model_folder`) and eight shapes-world
pictures; the step is not compiled here (MLX's CPU compiler spends tens of seconds on a cold
cache), which the trainer does by default.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

from llava_testing.checkpoints import tiny_untrained_config
from llava_testing.tokenizer_builder import build_tokenizer
from mlx_llava import load, load_model, stream_generate
from mlx_llava.conversation import get_template, render
from mlx_llava.data.shapes import generate_dataset
from mlx_llava.train import TrainArgs, init_model_folder, tokenize_conversation, train
from mlx_llava.train import trainer as trainer_module
from mlx_llava.train.stages import set_trainable

ITERS = 6


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer(root / "tokenizer")
    config = tiny_untrained_config(tokenizer)
    return init_model_folder(root / "model", config, root / "tokenizer", seed=0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate_dataset(root, 8, seed=0, min_size=32, max_size=48)
    finetune = json.loads((root / "finetune.json").read_text())
    finetune.append(  # a text-only sample in the mix
        {
            "id": "text-only",
            "conversations": [
                {"from": "human", "value": "What colors are there?"},
                {"from": "gpt", "value": "Red, green, blue and yellow."},
            ],
        }
    )
    (root / "finetune_mixed.json").write_text(json.dumps(finetune))
    return root


def _args(model, data: Path, out: Path, stage: str, **kw) -> TrainArgs:
    defaults = dict(
        iters=ITERS,
        batch_size=4,
        learning_rate=1e-3,
        log_every=1,
        compile=False,
    )
    defaults.update(kw)
    return TrainArgs(model=str(model), data=str(data), output=str(out), stage=stage, **defaults)


def _params(folder: Path) -> dict[str, np.ndarray]:
    model = load_model(folder)
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [e["loss"] for e in lines if "loss" in e]


def assert_same_processor(ours, source) -> None:
    """A written model folder keeps its source's tokenizer, preprocessing and picture padding."""
    prompt = "USER: <image>\nWhat colour is the shape? ASSISTANT: red</s>"
    assert ours.tokenize(prompt) == source.tokenize(prompt)
    assert ours.image_processor.pad_to_square and source.image_processor.pad_to_square
    picture = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    picture = Image.fromarray(picture)
    np.testing.assert_array_equal(ours.image_processor(picture), source.image_processor(picture))


def _changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not np.array_equal(before[k], after[k])}


# The answer mask ---------------------------------------------------------------------------


def test_answer_mask_matches_generation_prompts(tiny_model):
    """Token by token: the trained tokens are exactly what generation would have to produce
    after each `ASSISTANT:` prompt, up to and including `</s>`; nothing else is trained."""
    _, processor = load(tiny_model)
    template = get_template("vicuna_v1")
    messages = [
        ("user", "<image>\nWhat color is the shape?"),
        ("assistant", "red"),
        ("user", "How many shapes are there?"),
        ("assistant", "two"),
    ]
    ids, mask = tokenize_conversation(processor, template, messages)
    full = processor.tokenize(render(template, messages, add_generation_prompt=False))
    assert ids.tolist() == full  # the same ids generation's tokenizer makes
    expected = np.zeros(len(ids), dtype=bool)
    eos = processor.tokenizer.eos_token_id
    for turn in (0, 2):
        prompt = processor.tokenize(render(template, messages[: turn + 1]))
        assert ids[: len(prompt)].tolist() == prompt
        end = len(prompt) + ids[len(prompt) :].tolist().index(eos)
        expected[len(prompt) : end + 1] = True
        answer = processor.tokenizer.decode(ids[len(prompt) : end].tolist())
        assert answer.strip() == messages[turn + 1][1]
    assert mask.tolist() == expected.tolist()
    image_tokens = ids == processor.config.image_token_index
    assert image_tokens.sum() == processor.config.num_image_tokens
    assert not (mask & image_tokens).any()


def test_plain_mask_covers_the_caption_and_newline(tiny_model):
    _, processor = load(tiny_model)
    messages = [("user", "<image>\nDescribe the image."), ("assistant", "A red circle.")]
    ids, mask = tokenize_conversation(processor, get_template("plain"), messages)
    n = processor.config.num_image_tokens
    assert ids[0] == processor.tokenizer.bos_token_id
    assert (ids[1 : 1 + n] == processor.config.image_token_index).all()
    assert not mask[: 1 + n].any() and mask[1 + n :].all()
    caption = processor.tokenizer.decode(ids[1 + n :].tolist())
    assert caption.strip() == "A red circle." and caption.endswith("\n")


# The stages ---------------------------------------------------------------------------------


def test_pretrain_trains_only_the_projector(tiny_model, shapes, tmp_path):
    out = train(_args(tiny_model, shapes / "pretrain.json", tmp_path / "out", "pretrain"))
    losses = _losses(out)
    assert len(losses) == ITERS and losses[-1] < losses[0]
    changed = _changed(_params(tiny_model), _params(out))
    projector = {k for k in _params(tiny_model) if k.startswith("multi_modal_projector.")}
    assert changed == projector
    assert json.loads((out / "config.json").read_text())["conv_mode"] == "plain"


def test_finetune_leaves_the_vision_tower(tiny_model, shapes, tmp_path):
    out = train(_args(tiny_model, shapes / "finetune_mixed.json", tmp_path / "out", "finetune"))
    losses = _losses(out)
    assert losses[-1] < losses[0]
    before = _params(tiny_model)
    changed = _changed(before, _params(out))
    assert not any(k.startswith("vision_tower.") for k in changed)
    assert any(k.startswith("multi_modal_projector.") for k in changed)
    assert any(k.startswith("language_model.model.layers.") for k in changed)
    assert "language_model.lm_head.weight" in changed
    assert json.loads((out / "config.json").read_text())["conv_mode"] == "vicuna_v1"

    # The output is a model folder that load() and generation take as they are: the source's
    # tokenizer and preprocessing, the training template, the trained weights.
    model, processor = load(out)
    assert_same_processor(processor, load(tiny_model)[1])
    prompt = processor.format_prompt("What shape is this?")
    assert prompt.startswith("A chat between") and prompt.endswith("ASSISTANT:")
    picture = shapes / "images" / "000000.png"
    tokens = [
        r.token for r in stream_generate(model, processor, prompt, image=picture, max_tokens=4)
    ]
    inputs = processor(prompt, [picture])
    ids = inputs["input_ids"]
    for token in tokens:  # each greedy token is the argmax of the trained model's full forward
        assert token == mx.argmax(model(ids, inputs["pixel_values"])[0, -1]).item()
        ids = mx.concatenate([ids, mx.array([[token]])], axis=1)


def test_finetune_lora_fuses_into_plain_weights(tiny_model, shapes, tmp_path):
    args = _args(
        tiny_model, shapes / "finetune.json", tmp_path / "out", "finetune", lora=True, iters=3
    )
    out = train(args)
    after = _params(out)  # plain layer names: the adapters are fused
    changed = _changed(_params(tiny_model), after)
    assert any(k.startswith("language_model.model.layers.") for k in changed)
    assert not any(k.startswith("vision_tower.") for k in changed)
    assert "language_model.model.embed_tokens.weight" not in changed

    # The fused model computes what the source model with the trained adapters (mlx-lm's
    # LoRALinear, restored from the final checkpoint) computes.
    adapted = load_model(tiny_model)
    set_trainable(adapted, args)
    trained = mx.load(str(out / "checkpoint" / "trainable.safetensors"))
    assert any(k.endswith("lora_b") for k in trained)
    adapted.load_weights(list(trained.items()), strict=False)
    ids = mx.array([load(tiny_model)[1].tokenize("USER: What colour is it? ASSISTANT: red</s>")])
    expected = adapted(ids)
    assert np.abs(np.array(load_model(tiny_model)(ids) - expected)).max() > 1e-3  # it learned
    np.testing.assert_allclose(np.array(load_model(out)(ids)), np.array(expected), atol=1e-5)


def test_train_vision_and_grad_checkpoint(tiny_model, shapes, tmp_path):
    plain = train(
        _args(
            tiny_model,
            shapes / "finetune.json",
            tmp_path / "a",
            "finetune",
            iters=2,
            train_vision=True,
        )
    )
    ckpt = train(
        _args(
            tiny_model,
            shapes / "finetune.json",
            tmp_path / "b",
            "finetune",
            iters=2,
            train_vision=True,
            grad_checkpoint=True,
        )
    )
    np.testing.assert_allclose(_losses(plain), _losses(ckpt), rtol=1e-5)
    changed = _changed(_params(tiny_model), _params(ckpt))
    assert any(k.startswith("vision_tower.") for k in changed)


def test_resume_continues_exactly(tiny_model, shapes, tmp_path, monkeypatch):
    kw = dict(iters=4, save_every=2, grad_accum=2, batch_size=2)
    data = shapes / "finetune.json"
    whole = train(_args(tiny_model, data, tmp_path / "whole", "finetune", **kw))

    save = trainer_module.save_checkpoint

    def crash_after_first_save(folder, model, optimizer, state):
        save(folder, model, optimizer, state)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(trainer_module, "save_checkpoint", crash_after_first_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_args(tiny_model, data, tmp_path / "split", "finetune", **kw))
    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    with pytest.raises(FileExistsError, match="--resume"):
        train(_args(tiny_model, data, tmp_path / "split", "finetune", **kw))
    with pytest.raises(ValueError, match="--batch-size"):
        train(
            _args(
                tiny_model,
                data,
                tmp_path / "split",
                "finetune",
                resume=True,
                **{**kw, "batch_size": 4},
            )
        )
    split = train(_args(tiny_model, data, tmp_path / "split", "finetune", resume=True, **kw))

    assert _losses(split) == _losses(whole) and len(_losses(whole)) == 4
    a, b = _params(whole), _params(split)
    assert not _changed(a, b)


# Bad data -------------------------------------------------------------------------------------


def _bad_records(shapes: Path) -> list:
    good = json.loads((shapes / "finetune.json").read_text())
    return good + [
        {
            "id": "missing-image",
            "image": "images/nope.png",
            "conversations": good[0]["conversations"],
        },
        {"id": "malformed", "image": good[0]["image"], "conversations": [{"from": "human"}]},
        {
            "id": "no-answer",
            "image": good[0]["image"],
            "conversations": [{"from": "human", "value": "<image>\nHi"}],
        },
        {
            "id": "too-long",
            "image": good[0]["image"],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat?"},
                {"from": "gpt", "value": "red " * 300},
            ],
        },
    ]


def test_bad_samples_are_skipped_with_a_warning(tiny_model, shapes, tmp_path, capsys):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(_bad_records(shapes)))
    train(_args(tiny_model, data, tmp_path / "out", "finetune", iters=1, image_folder=str(shapes)))
    err = capsys.readouterr().err
    for name in ("missing-image", "malformed", "no-answer", "too-long"):
        line = next(x for x in err.splitlines() if f"'{name}'" in x)
        assert line.startswith("warning: skipping entry")
    assert "image file not found" in err and "too long" in err
    assert "train: 8 samples (4 skipped)" in err


def test_bad_sample_stops_the_cli(tiny_model, shapes, tmp_path, capsys):
    from mlx_llava.cli.train import main

    data = tmp_path / "bad.json"
    data.write_text(json.dumps(_bad_records(shapes)))
    argv = [
        "--model",
        str(tiny_model),
        "--data",
        str(data),
        "--image-folder",
        str(shapes),
        "--stage",
        "finetune",
        "--output",
        str(tmp_path / "out"),
        "--iters",
        "1",
        "--on-bad-sample",
        "stop",
        "--no-compile",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: entry 'missing-image': image file not found: {shapes / 'images' / 'nope.png'}"
    ]


def test_pretrain_rejects_text_only_and_multi_turn(tiny_model, shapes, tmp_path, capsys):
    records = json.loads((shapes / "finetune_mixed.json").read_text())
    data = tmp_path / "pre.json"
    data.write_text(json.dumps(records))
    train(_args(tiny_model, data, tmp_path / "out", "pretrain", iters=1, image_folder=str(shapes)))
    err = capsys.readouterr().err
    assert "entry 'text-only': stage-1 (plain) samples need an image" in err


def test_init_model_folder_sincos_positions(tiny_model, tmp_path):
    config = load_model(tiny_model).config
    out = init_model_folder(tmp_path / "m", config, tiny_model, sincos_positions=True)
    table = np.array(load_model(out).vision_tower.embeddings.position_embedding.weight)
    assert table.shape == (17, 32) and not table[0].any()
    side = 4
    cols = table[1:, 16:].reshape(side, side, 16)  # the column half repeats down each column
    assert np.allclose(cols, cols[:1])
    rows = table[1:, :16].reshape(side, side, 16)
    assert np.allclose(rows, rows[:, :1])


def test_init_model_folder_checks_the_image_token(tiny_model, tmp_path):
    config = load_model(tiny_model).config
    config.image_token_index += 1
    with pytest.raises(ValueError, match="image_token_index"):
        init_model_folder(tmp_path / "x", config, tiny_model)
    assert not (tmp_path / "x").exists()


# The demo tower's pre-training on shapes-world labels ----------------------------------------


def test_shapes_tower_labels_match_the_preprocessed_picture():
    # Patch labels are computed on a label picture; check them against the picture itself as
    # CLIPImageProcessor pads it (64 px pictures: no resampling, so colours are exact).
    import random

    from mlx_llava.data.shapes import COLORS, KINDS, draw_scene
    from mlx_llava.image_processor import CLIPImageProcessor
    from mlx_llava.train.shapes_tower import PATCH_COVERAGE, patch_labels, picture_labels

    processor = CLIPImageProcessor(size=64, crop_size=64, pad_to_square=True, do_normalize=False)
    rng = random.Random(3)
    for i in range(20):
        width, height = (64, rng.randint(43, 64)) if i % 2 else (rng.randint(43, 64), 64)
        picture, shapes = draw_scene(rng, width, height)
        pixels = np.rint(processor(picture)[0] * 255).astype(int)
        labels = patch_labels(shapes, width, height, side=64, patch=8)
        x0, y0 = (64 - width) // 2, (64 - height) // 2  # where the picture sits in the square
        ys, xs = np.mgrid[:64, :64]
        expected = np.zeros(64, dtype=int)
        for shape in shapes:  # shapes never overlap; same-coloured ones are told apart by box
            reach = shape.size / 2 + 1
            mask = (pixels == COLORS[shape.color]).all(-1)
            mask &= (abs(xs - x0 - shape.cx) <= reach) & (abs(ys - y0 - shape.cy) <= reach)
            covered = mask.reshape(8, 8, 8, 8).sum((1, 3)).ravel()
            expected[covered >= PATCH_COVERAGE * 64] = 1 + KINDS.index(shape.kind)
        assert np.array_equal(labels, expected), (i, labels, expected)
        assert (labels > 0).any()

        ordered = sorted(shapes, key=lambda s: s.cx)
        got = picture_labels(shapes, width)
        assert got[0] == len(shapes) - 1
        assert [KINDS[k] for k in got[2:7:2][: len(shapes)]] == [s.kind for s in ordered]
        assert [list(COLORS)[c] for c in got[1:7:2][: len(shapes)]] == [s.color for s in ordered]
        assert got[1 + 2 * len(shapes) : 7] == [-1] * (6 - 2 * len(shapes))
        side = got[7]
        if len(shapes) == 1:
            assert side == int(shapes[0].cx >= width / 2)
        else:
            assert side == -1


def test_shapes_tower_trains_only_the_tower(tiny_model, tmp_path):
    from mlx_llava.train.shapes_tower import TowerArgs, pretrain_tower

    out = tmp_path / "tower"
    args = TowerArgs(
        model=str(tiny_model), output=str(out), iters=4, batch_size=4, warmup=2,
        log_every=2, val_pictures=8, min_size=32, max_size=64,
    )  # fmt: skip
    scores = pretrain_tower(args)
    assert set(scores) >= {"count", "side", "patch"}
    before = dict(tree_flatten(load_model(tiny_model).parameters()))
    after = dict(tree_flatten(load_model(out).parameters()))
    assert before.keys() == after.keys()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    tower = {k for k in before if k.startswith("vision_tower.")}
    assert changed and changed <= tower
    # every layer up to the selected one learns (the last layer is the demo's feature layer)
    assert any(k.startswith("vision_tower.encoder.layers.1.") for k in changed)
    assert_same_processor(load(out)[1], load(tiny_model)[1])


def test_shapes_tower_needs_padded_pictures(tiny_model, tmp_path, capsys):
    from mlx_llava.train.shapes_tower import main

    config = json.loads((tiny_model / "config.json").read_text())
    folder = tmp_path / "square"
    folder.mkdir()
    for f in tiny_model.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_text(json.dumps({**config, "image_aspect_ratio": "square"}))
    with pytest.raises(SystemExit) as e:
        main(["--model", str(folder), "--output", str(tmp_path / "out"), "--iters", "1"])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip().startswith("error: the shapes tower needs")
    assert not (tmp_path / "out").exists()


# OneVision: pictures and videos (LLaVA-Video-178K records) ----------------------------------

OV_HUB = Path(__file__).parent / "fixtures" / "data" / "ov-hub"
VIDEO_FRAMES = 4  # --frames


@pytest.fixture(scope="module")
def ov_model(tmp_path_factory) -> Path:
    from mlx_llava import convert

    return convert(OV_HUB, tmp_path_factory.mktemp("ov") / "mlx", dtype="float32")


@pytest.fixture(scope="module")
def video_data(tmp_path_factory) -> Path:
    """Two long clips, a clip shorter than --frames, a picture and LLaVA-Video-178K records
    (the video marked by <video>, by <image> as in LLaVA-Video's own data, or not at all)."""
    pytest.importorskip("av")
    from llava_testing.pictures import make_picture
    from llava_testing.videos import write_clip

    root = tmp_path_factory.mktemp("videos")
    (root / "clips").mkdir()
    write_clip(root / "clips" / "a.mp4", seed=0, frames=12)
    write_clip(root / "clips" / "b.mp4", seed=1, frames=9)
    write_clip(root / "clips" / "short.mp4", seed=2, frames=3)
    make_picture(3, (40, 30)).save(root / "p.png")

    def record(id, question, answer, **media):
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        return {"id": id, **media, "conversations": turns}

    records = [
        record("v-a", "<video>\nWhat happens?", "It gets brighter.", video="clips/a.mp4"),
        record("p", "<image>\nWhat is this?", "A blurry picture.", image="p.png"),
        record("v-short", "<image>\nDescribe the clip.", "A short clip.", video="clips/short.mp4"),
        record("t", "Say hello.", "Hello."),
        record("v-b", "How does it end?", "Bright.", video="clips/b.mp4"),
    ]
    (root / "train.json").write_text(json.dumps(records))
    return root


def _ov_samples(ov_model, video_data, records=None):
    from mlx_llava.train.data import BadSamplePolicy, prepare_samples, read_records

    _, processor = load(ov_model)
    records = records or read_records(video_data / "train.json")
    policy = BadSamplePolicy("stop")
    template = get_template("chatml")
    samples = prepare_samples(
        records, processor, template, video_data, 4096, policy, num_frames=VIDEO_FRAMES
    )
    return processor, template, samples


def test_video_records_hold_their_videos_tokens(ov_model, video_data):
    """Each video sample holds `video_tokens(frames)` video tokens where its placeholder was
    (`<video>`, `<image>` or none: the front of the first turn), the ids generation's
    tokenizer makes, and trains on its answer alone."""
    from mlx_llava.train.data import normalise_messages

    processor, template, samples = _ov_samples(ov_model, video_data)
    config = processor.config
    frames = {s.id: s.video_frames for s in samples}
    assert frames == {"v-a": 4, "p": 0, "v-short": 3, "t": 0, "v-b": 4}
    records = json.loads((video_data / "train.json").read_text())
    for sample, record in zip(samples, records):
        messages = normalise_messages(record, sample.id, plain=False)
        video_tokens = int((sample.ids == config.video_token_index).sum())
        if sample.video is None:
            assert video_tokens == 0 and "<video>" not in messages[0][1]
            continue
        assert messages[0][1].startswith("<video>\n") and "<image>" not in messages[0][1]
        assert video_tokens == config.video_tokens(sample.video_frames)
        text = render(template, messages, add_generation_prompt=False)
        assert sample.ids.tolist() == processor.tokenize(text, video_frames=[sample.video_frames])
        prompt = processor.tokenize(
            render(template, messages[:1]), video_frames=[frames[sample.id]]
        )
        assert not sample.mask[: len(prompt)].any() and sample.mask[len(prompt) :].all()


def test_a_batch_mixes_pictures_and_videos_of_different_lengths(ov_model, video_data):
    """One batch of every kind: its loss is the token-weighted mean of the samples' own."""
    from mlx_llava.train.data import BadSamplePolicy, make_batch
    from mlx_llava.train.stages import loss_fn

    processor, _, samples = _ov_samples(ov_model, video_data)
    model, _ = load(ov_model)
    policy = BadSamplePolicy("stop")
    batch = make_batch(samples, processor, policy)
    # runs of equal frame count, in sample order: [a], [short], [b]
    assert [v.shape[:2] for v in batch.videos] == [(1, 4), (1, 3), (1, 4)]
    loss, count = loss_fn(model, *batch.loss_inputs)
    total, n = 0.0, 0
    for sample in samples:
        one = make_batch([sample], processor, policy)
        loss_i, count_i = loss_fn(model, *one.loss_inputs)
        total, n = total + loss_i.item() * count_i.item(), n + count_i.item()
    assert count.item() == n
    assert abs(loss.item() - total / n) < 1e-5 * total / n


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_onevision_learns_from_pictures_and_videos(ov_model, video_data, tmp_path, lora):
    args = _args(
        ov_model,
        video_data / "train.json",
        tmp_path / "out",
        "finetune",
        iters=10,
        batch_size=5,
        learning_rate=3e-3,
        lora=lora,
        frames=VIDEO_FRAMES,
    )
    out = train(args)
    losses = _losses(out)
    assert losses[-1] < 0.85 * losses[0], losses
    model, processor = load(out)
    assert model.config.conv_mode == "mpt"  # chatml, OneVision's default
    assert not any("lora" in k for k, _ in tree_flatten(model.parameters()))
    answer = "".join(
        r.text
        for r in stream_generate(
            model,
            processor,
            processor.format_prompt("<video>\nWhat happens?", num_images=0),
            video=video_data / "clips" / "a.mp4",
            num_frames=VIDEO_FRAMES,
            max_tokens=3,
        )
    )
    assert isinstance(answer, str)


def test_missing_or_unreadable_video_is_one_line(ov_model, video_data, tmp_path, capsys):
    from mlx_llava.cli.train import main

    (video_data / "clips" / "broken.mp4").write_bytes(b"not a video")
    records = json.loads((video_data / "train.json").read_text())
    turns = records[0]["conversations"]
    bad = [
        {"id": "gone", "video": "clips/gone.mp4", "conversations": turns},
        {"id": "broken", "video": "clips/broken.mp4", "conversations": turns},
        {"id": "both", "video": "clips/a.mp4", "image": "p.png", "conversations": turns},
    ]
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(bad[:1] + records))
    argv = ["--model", str(ov_model), "--data", str(data), "--image-folder", str(video_data)]
    argv += ["--stage", "finetune", "--iters", "1", "--no-compile", "--frames", "4"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--output", str(tmp_path / "out"), "--on-bad-sample", "stop"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    gone = video_data / "clips" / "gone.mp4"
    assert err == [f"error: entry 'gone': cannot read video {gone}: no such file"]

    data.write_text(json.dumps(bad + records))
    main(argv + ["--output", str(tmp_path / "out2"), "--batch-size", "2"])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("warning: skipping")]
    assert len(lines) == 3 and "Traceback" not in err
    assert f"entry 'broken': cannot read video {video_data / 'clips' / 'broken.mp4'}" in lines[1]
    assert "entry 'both': an entry has one picture or one video, not both" in lines[2]
    assert "train: 5 samples (3 skipped)" in err


def test_video_records_need_a_model_that_sees_videos(tiny_model, video_data, tmp_path, capsys):
    data = tmp_path / "v.json"
    records = json.loads((video_data / "train.json").read_text())
    data.write_text(json.dumps(records))
    train(
        _args(
            tiny_model,
            data,
            tmp_path / "out",
            "finetune",
            iters=1,
            batch_size=2,
            image_folder=str(video_data),
        )
    )
    err = capsys.readouterr().err
    assert "entry 'v-a': has a video, but llava does not see videos" in err
    assert "train: 2 samples (3 skipped)" in err
