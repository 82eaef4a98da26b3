"""Reading videos: N frames sampled uniformly over a clip (mp4, mov, webm, mkv, gif), with PyAV.

A file is decoded once, front to back, keeping only the sampled frames, so memory holds N frames
whatever the clip's length; clips longer than `MLX_LLAVA_MAX_VIDEO_SECONDS` (default 1 hour) or
with frames over `MLX_LLAVA_MAX_IMAGE_PIXELS` are refused before decoding. Every failure is one
`VideoLoadError` line naming the file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .image_io import FetchLimits, FetchPolicy, fetch
from .image_processor import DEFAULT_MAX_IMAGE_PIXELS

DEFAULT_NUM_FRAMES = 8
DEFAULT_MAX_VIDEO_SECONDS = 3600.0

# A video file, its frames as uint8 [T, H, W, 3], or a list of pictures.
VideoInput = Union[str, Path, np.ndarray, Sequence[Image.Image]]


class VideoLoadError(ValueError):
    """A video that cannot be read (missing, not a video, too long, too large)."""


def sample_indices(total: int, num_frames: int) -> list[int]:
    """`num_frames` frame indices spread uniformly over `total` frames, first frame first (as
    LLaVA-NeXT-Video's and OneVision's examples sample: `arange(0, total, total / n)`); every
    frame when the clip has no more than `num_frames`."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if total <= num_frames:
        return list(range(total))
    return np.arange(0, total, total / num_frames).astype(int)[:num_frames].tolist()


def _limit(name: str, default: float) -> float:
    value = os.environ.get(name)
    return default if value is None else float(value)


def read_video(path: Union[str, Path], num_frames: int = DEFAULT_NUM_FRAMES) -> np.ndarray:
    """`num_frames` frames of a video file sampled uniformly over the whole clip: uint8
    [T, H, W, 3] (T < num_frames only for shorter clips).

    Raises:
        VideoLoadError: the file is missing, unreadable, has no video stream, or is over the
            length or frame-size limits (one line, naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise VideoLoadError(f"cannot read video {path}: no such file")
    return _decode(str(path), str(path), num_frames)


def decode_video(data: bytes, name: str, num_frames: int = DEFAULT_NUM_FRAMES) -> np.ndarray:
    """`read_video` of an encoded video held in memory (`name` names it in errors)."""
    return _decode(io.BytesIO(data), name, num_frames)


def load_video(
    source: Union[str, Path],
    num_frames: int = DEFAULT_NUM_FRAMES,
    timeout: Optional[float] = None,
    max_bytes: Optional[int] = None,
    policy: Optional[FetchPolicy] = None,
) -> np.ndarray:
    """`read_video` of a path or an http(s) URL, fetched as `image_io.load_image` fetches
    pictures (the same bounds and host policy).

    Raises:
        ImageLoadError: the URL cannot be fetched (see `image_io.fetch`).
        VideoLoadError: the video cannot be read.
    """
    name = str(source)
    if not name.startswith(("http://", "https://")):
        return read_video(name, num_frames)
    limits = FetchLimits.from_env(timeout=timeout, max_bytes=max_bytes)
    return decode_video(fetch(name, limits, policy), name, num_frames)


def count_video_frames(path: Union[str, Path], num_frames: int = DEFAULT_NUM_FRAMES) -> int:
    """How many frames `read_video(path, num_frames)` gives, from the file's header (its
    packets when the header does not count frames), without decoding; the same checks.

    Raises:
        VideoLoadError: as `read_video`.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoLoadError(f"cannot read video {path}: no such file")
    return len(_read(str(path), str(path), num_frames, decode=False))


def _decode(source: Union[str, BinaryIO], name: str, num_frames: int) -> np.ndarray:
    return np.stack(_read(source, name, num_frames, decode=True))


def _read(
    source: Union[str, BinaryIO], name: str, num_frames: int, decode: bool
) -> list[np.ndarray] | list[int]:
    """The sampled frames (`decode`), else only their indices, after the checks."""
    try:
        import av
    except ImportError:
        raise VideoLoadError("reading videos needs PyAV: pip install 'mlx-llava[video]'") from None

    def fail(reason: str) -> VideoLoadError:
        return VideoLoadError(f"cannot read video {name}: {reason}")

    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise fail("no video stream")
            stream = container.streams.video[0]
            seconds = _duration(container, stream)
            max_seconds = _limit("MLX_LLAVA_MAX_VIDEO_SECONDS", DEFAULT_MAX_VIDEO_SECONDS)
            if seconds is not None and seconds > max_seconds:
                raise fail(f"{seconds:.0f} s long, over the {max_seconds:.0f} s limit")
            pixels = stream.codec_context.width * stream.codec_context.height
            max_pixels = _limit("MLX_LLAVA_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)
            if pixels > max_pixels:
                raise fail(f"frames of {pixels} pixels, over the {max_pixels:.0f} limit")
            total = stream.frames or _count_frames(container, stream)
            indices = sample_indices(total, num_frames)
            if not decode:
                frames = indices
            else:
                wanted = set(indices)
                container.seek(0)
                frames = []
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        frames.append(frame.to_ndarray(format="rgb24"))
                    if len(frames) == len(wanted):
                        break
    except VideoLoadError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if not frames:
        raise fail("no frames")
    return frames


def _duration(container, stream) -> float | None:
    """The clip's length in seconds, if the file says."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base
    return None


def _count_frames(container, stream) -> int:
    """Frames of a stream whose header does not count them (webm, some gifs): its packets,
    read without decoding."""
    total = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return total
