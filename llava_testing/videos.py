"""Video clips for tests, written with PyAV from a seed: no downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def clip_frames(seed: int, frames: int, size: tuple[int, int] = (32, 24)) -> np.ndarray:
    """uint8 [frames, height, width, 3]: each frame its own coarse random blocks of 4 x 4
    pixels (`size` is (width, height)), which codecs keep apart and models see differ."""
    rng = np.random.default_rng(seed)
    width, height = size
    blocks = rng.integers(0, 256, (frames, -(-height // 4), -(-width // 4), 3), dtype=np.uint8)
    return blocks.repeat(4, axis=1).repeat(4, axis=2)[:, :height, :width]


def write_clip(
    path: str | Path, seed: int = 0, frames: int = 12, size: tuple[int, int] = (32, 24)
) -> Path:
    """An mp4 (mpeg4) clip of `clip_frames(seed, frames, size)` at 10 frames a second."""
    import av

    path = Path(path)
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for picture in clip_frames(seed, frames, size):
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
