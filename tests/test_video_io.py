"""Reading videos with PyAV: every container LLaVA users have, frames sampled over the whole
clip, bounded, one-line errors; the processor takes files, arrays and lists of pictures alike.
The clips are written here with PyAV."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av")

from mlx_llava import load  # noqa: E402
from mlx_llava.video_io import VideoLoadError, read_video, sample_indices  # noqa: E402

DATA = Path(__file__).parent / "fixtures" / "data"
CODECS = {"mp4": "libx264", "webm": "libvpx", "mkv": "mpeg4", "mov": "mpeg4", "gif": "gif"}
FRAMES = 25  # at 10 frames a second


def write_clip(path: Path, frames: int = FRAMES) -> Path:
    """A 32x24 clip whose frame i is red i * 10 (the rest black)."""
    codec = CODECS[path.suffix[1:]]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height = 32, 24
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for i in range(frames):
            picture = np.zeros((24, 32, 3), np.uint8)
            picture[..., 0] = i * 10
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_frames_are_sampled_uniformly_over_the_whole_clip():
    assert sample_indices(25, 8) == [0, 3, 6, 9, 12, 15, 18, 21]
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]  # a short clip gives every frame
    assert sample_indices(100, 1) == [0]
    with pytest.raises(ValueError):
        sample_indices(10, 0)


@pytest.mark.parametrize("ext", sorted(CODECS))
def test_each_container_gives_the_sampled_frames(ext, tmp_path):
    frames = read_video(write_clip(tmp_path / f"clip.{ext}"), 8)
    assert frames.shape == (8, 24, 32, 3) and frames.dtype == np.uint8
    red = frames[:, 12, 16, 0].astype(int)
    want = np.array(sample_indices(FRAMES, 8)) * 10
    tolerance = 20 if ext == "gif" else 8  # gif's palette, the codecs' loss
    assert np.abs(red - want).max() <= tolerance, red


def test_unreadable_missing_and_over_long_files_fail_in_one_line(tmp_path, monkeypatch):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    for path, reason in [(broken, "broken.mp4"), (tmp_path / "none.mp4", "no such file")]:
        with pytest.raises(VideoLoadError) as error:
            read_video(path)
        assert reason in str(error.value) and "\n" not in str(error.value)
    clip = write_clip(tmp_path / "long.mp4")  # 2.5 s
    monkeypatch.setenv("MLX_LLAVA_MAX_VIDEO_SECONDS", "1")
    with pytest.raises(VideoLoadError, match="over the 1 s limit"):
        read_video(clip)


def test_processor_takes_files_arrays_and_pictures(tmp_path):
    model, processor = load(DATA / "ov-hub", dtype="float32")
    clip = write_clip(tmp_path / "clip.mp4")
    prompt = "USER: <video>\nWhat happens? ASSISTANT:"
    from_file = processor(prompt, videos=[clip], num_frames=4)
    assert from_file["pixel_values_videos"].shape == (1, 4, 35, 35, 3)
    assert from_file["input_ids"].shape[1] > model.config.video_tokens(4)
    frames = read_video(clip, 4)
    from_array = processor(prompt, videos=[frames])
    from_pictures = processor(prompt, videos=[[Image.fromarray(f) for f in frames]])
    for inputs in (from_array, from_pictures):
        np.testing.assert_array_equal(
            np.array(inputs["pixel_values_videos"]), np.array(from_file["pixel_values_videos"])
        )
    logits = model(**from_file)
    assert logits.shape[:2] == from_file["input_ids"].shape


# Generation with a video (and several OneVision pictures) --------------------------------------


@pytest.fixture(scope="module")
def onevision():
    """ov-hub converted in memory (float32), with its recorded oracle."""
    from llava_testing.onevision import oracle

    model, processor = load(DATA / "ov-hub", dtype="float32")
    return model, processor, *oracle("ov-hub")


def _tokens(model, processor, meta, case, **kwargs) -> list[int]:
    from mlx_llava import stream_generate

    prompt = meta["template"].format(q=meta["questions"][case])
    steps = stream_generate(model, processor, prompt, max_tokens=24, **kwargs)
    return [r.token for r in steps]


def test_stream_generate_takes_a_video_and_several_pictures(onevision):
    """transformers' greedy tokens for a video, a picture with the video, and two pictures in
    one prompt (seen whole), through `stream_generate`."""
    model, processor, arrays, meta = onevision
    frames = arrays["video_frames"]
    images = {name: Image.open(DATA / "images" / f"{name}.png") for name in ("wide", "tall")}
    cases = {
        "video": dict(video=frames),
        "mixed": dict(images=[images["tall"]], video=frames),
        "two": dict(images=[images["wide"], images["tall"]]),
    }
    for case, kwargs in cases.items():
        tokens = _tokens(model, processor, meta, case, **kwargs)
        assert tokens == arrays[f"{case}_greedy_tokens"].tolist(), case


def test_a_chat_about_a_video_reuses_its_tokens_and_answers_as_without_cache(onevision):
    """The second turn computes only its own tokens (the video's stay in the cache) and
    answers as a fresh, uncached generation of the whole conversation; another video is not
    mistaken for the cached one."""
    from mlx_llava import ChatSession, generate

    model, processor, arrays, _ = onevision
    frames = arrays["video_frames"]
    chat = ChatSession(model, processor, video=frames)
    chat.send("What happens?", max_tokens=8)
    held = chat.cache.length
    _, prompt = chat.prompt("And then?")
    second = chat.send("And then?", max_tokens=8)
    assert chat.cache.length > held  # the first turn's positions were kept
    assert second == generate(model, processor, prompt, video=frames, max_tokens=8)
    other = np.random.default_rng(0).integers(0, 256, frames.shape, dtype=np.uint8)
    fresh = generate(model, processor, prompt, video=other, max_tokens=8)
    assert fresh != second  # the test can tell the videos apart
    again = ChatSession(model, processor, video=other)
    again.cache = chat.cache  # holds the first video's positions
    again.messages = list(chat.messages[:2])
    assert again.send("And then?", max_tokens=8) == fresh


def test_generate_cli_reads_a_video(tmp_path, capsys):
    from llava_testing.cli import run_main
    from mlx_llava import generate
    from mlx_llava.cli import generate as generate_cli

    model, processor = load(DATA / "ov-hub")
    clip = write_clip(tmp_path / "clip.mp4")
    argv = ["--model", str(DATA / "ov-hub"), "--video", str(clip), "--frames", "4", "-m", "10"]
    code, out, err = run_main(generate_cli.main, argv + ["-p", "What happens?"], capsys)
    assert code == 0, err
    prompt = processor.format_prompt("<video>\nWhat happens?", num_images=0)
    expected = generate(model, processor, prompt, video=read_video(clip, 4), max_tokens=10)
    assert out == expected + "\n"
    code, _, err = run_main(
        generate_cli.main, argv[:2] + ["--video", str(tmp_path / "no.mp4")], capsys
    )
    assert code != 0 and "no such file" in err and len(err.strip().splitlines()) == 1
