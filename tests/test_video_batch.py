"""Videos in batches and captioning: `batch_generate(videos=...)` answers as `generate(video=...)`
one by one; `caption.py --video-dir` captions a folder's clips. The clips are written here with
PyAV (`test_server_video.write_clip`)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("av")

from test_server_video import write_clip  # noqa: E402

from mlx_llava import batch_generate, generate, load  # noqa: E402

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
