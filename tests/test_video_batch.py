"""Videos in batches and captioning: `batch_generate(videos=...)` answers as `generate(video=...)`
one by one; `caption.py --video-dir` captions a folder's clips. The clips are written here with
PyAV (`llava_testing.videos.write_clip`)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("av")

from PIL import Image  # noqa: E402

from llava_testing.onevision import oracle  # noqa: E402
from llava_testing.videos import write_clip  # noqa: E402
from mlx_llava import batch_generate, generate, load, stream_generate  # noqa: E402

DATA = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def next_video():
    return load(DATA / "nv-hub", dtype="float32")


def test_batch_generate_with_videos_answers_as_generate_one_by_one(next_video, tmp_path):
    model, processor = next_video
    clips = [write_clip(tmp_path / f"{seed}.mp4", seed) for seed in range(2)]
    ask = "USER: <video>\n{} ASSISTANT:"
    prompts = [ask.format("What happens?"), "USER: Hello there ASSISTANT:", ask.format("Why?")]
    videos = [clips[0], None, clips[1]]
    alone = [generate(model, processor, p, video=v, max_tokens=8) for p, v in zip(prompts, videos)]
    assert alone[0] != generate(model, processor, prompts[0], video=clips[1], max_tokens=8)
    assert batch_generate(model, processor, prompts, videos=videos, max_tokens=8) == alone
    with pytest.raises(ValueError, match="prompt 1 has 0 <video>"):
        batch_generate(model, processor, prompts, videos=[clips[0], clips[1], None])


@pytest.mark.parametrize("name", ["ov-hub", "nv-hub"])
def test_batch_generate_with_videos_of_different_lengths_answers_as_one_by_one(name):
    """Videos of 3, 6 and 8 frames (so as many frames' tokens) in one batch, beside a picture:
    each row's tokens equal its tokens alone."""
    model, processor = load(DATA / name, dtype="float32")
    frames = oracle(name)[0]["video_frames"]  # uint8 [8, H, W, 3]
    ask = "USER: <video>\n{} ASSISTANT:"
    prompts = [ask.format(q) for q in ("What happens?", "Why?", "What happens?")]
    prompts.append("USER: <image>\nWhat is in the picture? ASSISTANT:")
    videos = [frames[:3], frames[::-1][:6], frames, None]
    images = [None, None, None, Image.open(DATA / "images" / "wide.png")]
    alone = [
        [r.token for r in stream_generate(model, processor, p, i, video=v, max_tokens=8)]
        for p, i, v in zip(prompts, images, videos)
    ]
    assert alone[0] != alone[2]  # the frames count
    batch = batch_generate(
        model, processor, prompts, images=images, videos=videos, max_tokens=8, return_results=True
    )
    assert [r.tokens for r in batch] == alone


def test_caption_video_dir_captions_each_clip_skips_broken_ones_and_resumes(
    next_video, tmp_path, monkeypatch, capsys
):
    import json

    from mlx_llava.cli import caption as caption_cli
    from mlx_llava.processor import VIDEO_PLACEHOLDER

    model, processor = next_video
    monkeypatch.setattr("mlx_llava.loader.load", lambda *a, **k: next_video)
    folder = tmp_path / "clips"
    (folder / "sub").mkdir(parents=True)
    write_clip(folder / "a.mp4", 0)
    write_clip(folder / "sub" / "b.mkv", 1)
    write_clip(folder / "c.mov", 2, frames=4)  # fewer frames than sampled: its own batch
    (folder / "broken.webm").write_bytes(b"not a video")
    (folder / "notes.txt").write_text("not a video")
    output = tmp_path / "captions.jsonl"
    argv = ["--video-dir", str(folder), "-o", str(output), "--batch-size", "4", "-m", "6"]
    caption_cli.main(argv)
    assert "warning: skipping broken.webm: cannot read video" in capsys.readouterr().err
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["file"] for r in records] == ["a.mp4", "c.mov", "sub/b.mkv"]
    prompt = processor.format_prompt(VIDEO_PLACEHOLDER + "\n" + "Describe this video.", 0)
    for record in records:
        assert record["prompt"] == "Describe this video."
        alone = generate(model, processor, prompt, video=folder / record["file"], max_tokens=6)
        assert record["answer"] == alone.strip()
    caption_cli.main(argv)  # resuming: nothing left but the broken file
    assert [json.loads(line) for line in output.read_text().splitlines()] == records
    assert "warning: skipping broken.webm" in capsys.readouterr().err
