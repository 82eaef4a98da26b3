"""Video clips for tests, written with PyAV from a seed: frames of noise, no downloads."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

CODECS = {".webm": "libvpx"}  # VP8, which browsers play; else MPEG-4 part 2
MIME_TYPES = {".webm": "video/webm", ".mov": "video/quicktime", ".mkv": "video/x-matroska"}


def write_clip(
    path: Path, seed: int = 0, frames: int = 8, size: int | tuple[int, int] = 32
) -> Path:
    """A clip of `frames` frames of noise at 10 frames/s, `size` pixels square or (width,
    height), its codec chosen by the file's suffix (`CODECS`)."""
    import av

    rng = np.random.default_rng(seed)
    width, height = (size, size) if isinstance(size, int) else size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODECS.get(path.suffix, "mpeg4"), rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            picture = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_url(path: Path) -> str:
    """A clip as a data URL (its MIME type by suffix, `video/mp4` by default)."""
    mime = MIME_TYPES.get(path.suffix, "video/mp4")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def video_turn(text: str, url: str) -> dict:
    """An OpenAI user message with a `video_url` part before the text."""
    parts = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": text}]
    return {"role": "user", "content": parts}
