"""Image loading and preprocessing (CLIP's, and LLaVA-NeXT's tiles), bit-exact with
transformers' PIL backend."""

import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from io import BytesIO
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .anyres import DEFAULT_PINPOINTS, fit_size, select_best_resolution
from .config import ModelConfig

ImageSource = Image.Image | str | Path

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
DEFAULT_FETCH_TIMEOUT = 60.0  # seconds for a whole download
DEFAULT_MAX_IMAGE_BYTES = 50_000_000
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS
READ_CHUNK = 1 << 16


class ImageLoadError(ValueError):
    """An image that cannot be fetched, read or decoded."""


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImageLoadError(f"{name} must be a number, got '{value}'") from None
    if number <= 0:
        raise ImageLoadError(f"{name} must be positive, got '{value}'")
    return number


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on reading one picture.

    Attributes:
        timeout: seconds for a whole http(s) download, connection included
            (MLX_LLAVA_FETCH_TIMEOUT, default 60).
        max_bytes: the largest download (MLX_LLAVA_MAX_IMAGE_MB, default 50 MB).
        max_pixels: the largest picture, width x height, checked before decoding so that a
            small file cannot unpack into gigabytes (MLX_LLAVA_MAX_IMAGE_PIXELS, default
            Pillow's decompression-bomb limit of 89,478,485).
    """

    timeout: float = DEFAULT_FETCH_TIMEOUT
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def from_env(cls, **overrides) -> "FetchLimits":
        """The limits the environment sets, then `overrides` that are not None."""
        limits = cls(
            timeout=_env_number("MLX_LLAVA_FETCH_TIMEOUT", DEFAULT_FETCH_TIMEOUT),
            max_bytes=int(
                _env_number("MLX_LLAVA_MAX_IMAGE_MB", DEFAULT_MAX_IMAGE_BYTES / 1e6) * 1e6
            ),
            max_pixels=int(_env_number("MLX_LLAVA_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)),
        )
        return replace(limits, **{k: v for k, v in overrides.items() if v is not None})


def _size(n: int) -> str:
    return f"{n / 1e6:g} MB" if n >= 1e6 else f"{n} bytes"


def _fetch(url: str, limits: FetchLimits) -> bytes:
    """Download `url` within `limits.timeout` seconds in all and `limits.max_bytes` bytes."""
    deadline = time.monotonic() + limits.timeout

    def fail(reason: str) -> ImageLoadError:
        return ImageLoadError(f"cannot fetch image URL '{url}': {reason}")

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise fail(f"took longer than {limits.timeout:g} s")
        return left

    request = urllib.request.Request(url, headers={"User-Agent": "mlx-llava"})
    try:
        with urllib.request.urlopen(request, timeout=remaining()) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                raise fail(
                    f"{_size(int(declared))}, more than the limit of {_size(limits.max_bytes)}"
                )
            # Each read waits at most until the deadline (the socket's timeout is per call).
            sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
            chunks, total = [], 0
            while True:
                left = remaining()
                if sock is not None:
                    sock.settimeout(left)
                chunk = (
                    response.read1(READ_CHUNK)
                    if hasattr(response, "read1")
                    else response.read(READ_CHUNK)
                )
                if not chunk:
                    break
                total += len(chunk)
                if total > limits.max_bytes:
                    raise fail(f"more than the limit of {_size(limits.max_bytes)}")
                chunks.append(chunk)
            return b"".join(chunks)
    except ImageLoadError:
        raise
    except (TimeoutError, socket.timeout):
        raise fail(f"took longer than {limits.timeout:g} s") from None
    except Exception as e:  # noqa: BLE001 - DNS, refused connections, HTTP errors: one message
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise fail(f"took longer than {limits.timeout:g} s") from None
        raise fail(str(reason)) from None


def _read_error(name: str, e: Exception) -> ImageLoadError:
    if isinstance(e, FileNotFoundError):
        reason = "file not found"
    elif isinstance(e, IsADirectoryError):
        reason = "is a directory"
    elif isinstance(e, PermissionError):
        reason = "permission denied"
    elif isinstance(e, UnidentifiedImageError):
        reason = "not an image"
    else:
        reason = f"invalid image data ({e})"
    return ImageLoadError(f"cannot read image '{name}': {reason}")


def load_image(
    source: ImageSource,
    timeout: float | None = None,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
) -> Image.Image:
    """Load an image from a PIL image, a file path or an http(s) URL.

    Files and URLs are fully decoded and turned upright by their EXIF orientation; a PIL
    image is returned as is. The mode is kept: convert with `to_rgb`.

    Args:
        source: a PIL image, a path, or an http(s) URL.
        timeout, max_bytes, max_pixels: the bounds of `FetchLimits` (None: the environment's,
            else the defaults: 60 s and 50 MB for a download, Pillow's pixel limit).

    Raises:
        ImageLoadError: the source cannot be fetched, read or decoded, or is over a bound.
    """
    if isinstance(source, Image.Image):
        return source
    limits = FetchLimits.from_env(timeout=timeout, max_bytes=max_bytes, max_pixels=max_pixels)
    name = str(source)
    if name.startswith(("http://", "https://")):
        data = _fetch(name, limits)
    else:
        try:
            data = Path(name).read_bytes()
        except OSError as e:
            raise _read_error(name, e) from e
    return decode_image(data, name, limits.max_pixels)


def decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an encoded picture (PNG, JPEG, ...) whose size is at most `max_pixels`.

    Raises:
        ImageLoadError: not a picture, damaged, or larger than `max_pixels` (`name` says which).
    """
    try:
        img = Image.open(BytesIO(data))
    except Image.DecompressionBombError as e:
        raise _bomb_error(name, str(e), max_pixels) from None
    except Exception as e:  # PIL raises many types: OSError, SyntaxError, ...
        raise _read_error(name, e) from e
    width, height = img.size
    if width * height > max_pixels:
        raise _bomb_error(name, f"{width} x {height} pixels", max_pixels)
    try:
        img.load()
        return ImageOps.exif_transpose(img)
    # PIL raises many types here: OSError, SyntaxError, zlib.error, struct.error...
    except Exception as e:
        raise _read_error(name, e) from e


def _bomb_error(name: str, size: str, max_pixels: int) -> ImageLoadError:
    return ImageLoadError(
        f"cannot read image '{name}': {size} is more than the limit of {max_pixels:,} pixels "
        "(a decompression bomb?)"
    )


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto white.

    Same rule as transformers' `convert_to_rgb`: images with an "A" band or a
    `transparency` entry go through RGBA and are alpha-composited on white; every other
    mode (L, 1, I;16, I, F, CMYK, YCbCr, ...) uses PIL's own `convert("RGB")`.
    """
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def expand2square(img: Image.Image, background_color: tuple[int, int, int]) -> Image.Image:
    """Pad to a square of side max(w, h), centring the image, as original LLaVA does."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background_color)
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


def _size_dict(size: int | dict[str, int], square: bool) -> dict[str, int]:
    """An int is the shortest edge for `size` and a square for `crop_size`."""
    if isinstance(size, int):
        return {"height": size, "width": size} if square else {"shortest_edge": size}
    if set(size) in ({"shortest_edge"}, {"height", "width"}):
        return dict(size)
    raise ValueError(f"unsupported size {size}: use an int, shortest_edge or height/width")


@dataclass
class CLIPImageProcessor:
    """CLIP preprocessing with the fields of `preprocessor_config.json`.

    `pad_to_square` (not a transformers key) first applies `expand2square` with the
    mean colour, as original LLaVA checkpoints with `image_aspect_ratio: "pad"` expect.
    `size` and `crop_size` may also be given as ints, as old configs do.
    """

    do_resize: bool = True
    size: dict[str, int] = field(default_factory=lambda: {"shortest_edge": 336})
    resample: int = 3  # PIL bicubic
    do_center_crop: bool = True
    crop_size: dict[str, int] = field(default_factory=lambda: {"height": 336, "width": 336})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    do_convert_rgb: bool = True
    pad_to_square: bool = False

    def __post_init__(self):
        self.size = _size_dict(self.size, square=False)
        self.crop_size = _size_dict(self.crop_size, square=True)

    @property
    def pad_color(self) -> tuple[int, ...]:
        """The mean colour as 0-255 integers, as the original LLaVA pads: (122, 116, 104)."""
        return tuple(int(x * 255) for x in self.image_mean)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPImageProcessor":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CLIPImageProcessor":
        """Read `folder/preprocessor_config.json`."""
        with open(Path(folder) / "preprocessor_config.json") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """The config to save; `image_processor_type` lets transformers read it too."""
        return {"image_processor_type": "CLIPImageProcessor", **asdict(self)}

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        if "height" in self.size:
            return self.size["width"], self.size["height"]
        # As transformers' get_resize_output_image_size: truncated, not rounded.
        short, long = min(width, height), max(width, height)
        new_short = self.size["shortest_edge"]
        new_long = int(new_short * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def load(self, source: ImageSource) -> Image.Image:
        """Load and convert one image (and pad it to a square if `pad_to_square`)."""
        img = load_image(source)
        if self.do_convert_rgb:
            img = to_rgb(img)
        elif img.mode != "RGB":
            raise ValueError(f"image mode is {img.mode}, not RGB: set do_convert_rgb")
        if self.pad_to_square:
            img = expand2square(img, self.pad_color)
        return img

    def resize_and_crop(self, img: Image.Image) -> np.ndarray:
        """Resize (shortest edge) and center-crop a loaded image: uint8 [H, W, 3]."""
        if self.do_resize:
            img = img.resize(self._resized_size(*img.size), resample=self.resample)
        if self.do_center_crop:
            # Floor offsets; out-of-bounds parts of the box are zero, which is exactly
            # transformers' padding of images smaller than the crop.
            w, h = img.size
            cw, ch = self.crop_size["width"], self.crop_size["height"]
            left, top = (w - cw) // 2, (h - ch) // 2
            img = img.crop((left, top, left + cw, top + ch))
        return np.asarray(img)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """uint8 [n, H, W, 3] -> rescaled and normalized float32 [n, H, W, 3]."""
        # Same dtypes and operation order as transformers, so the result is bit-exact.
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            x = (x - mean) / std
        return x

    def preprocess(
        self, images: ImageSource | Sequence[ImageSource]
    ) -> tuple[np.ndarray, Optional[list[tuple[int, int]]]]:
        """Pixel values [n, H, W, 3] float32, and the pictures' (height, width) where the model
        needs them (None here: a CLIP picture is one square whatever its size)."""
        return self(images), None

    def preprocess_frames(self, frames: np.ndarray | Sequence[Image.Image]) -> np.ndarray:
        """A video's frames (uint8 [T, H, W, 3], or pictures) -> [T, H, W, 3] float32, each
        frame resized and cropped as a picture is (no tiles, no padding to a square)."""
        pictures = [
            Image.fromarray(np.asarray(f, dtype=np.uint8)) if isinstance(f, np.ndarray) else f
            for f in frames
        ]
        if not pictures:
            raise ValueError("a video needs at least one frame")
        return self.normalize(np.stack([self.resize_and_crop(to_rgb(p)) for p in pictures]))

    def __call__(self, images: ImageSource | Sequence[ImageSource]) -> np.ndarray:
        """Preprocess one image or a list of images (PIL images, paths or URLs).

        Returns:
            float32 array of shape [n, H, W, 3] (channels last).
        """
        if isinstance(images, (Image.Image, str, Path)):
            images = [images]
        return self.normalize(np.stack([self.resize_and_crop(self.load(i)) for i in images]))


@dataclass
class LlavaNextImageProcessor(CLIPImageProcessor):
    """LLaVA-NeXT's "anyres" preprocessing (`LlavaNextImageProcessor`, PIL backend).

    Each picture is resized to fit the best of `image_grid_pinpoints` (aspect ratio kept),
    centred on black, cut row by row into `crop_size` tiles, and preceded by the whole picture
    squashed to `size`; every tile then goes through the CLIP steps. A batch's tiles are
    concatenated (transformers pads each picture's tile count instead; `do_pad` is kept for its
    config only).
    """

    image_grid_pinpoints: list[list[int]] = field(
        default_factory=lambda: [list(p) for p in DEFAULT_PINPOINTS]
    )
    do_pad: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "image_processor_type": "LlavaNextImageProcessor"}

    def tiles(self, img: Image.Image) -> list[Image.Image]:
        """The base picture, then the tiles of its best resolution, row by row."""
        best_height, best_width = select_best_resolution(
            (img.height, img.width), self.image_grid_pinpoints
        )
        height, width = fit_size((img.height, img.width), (best_height, best_width))
        canvas = Image.new(img.mode, (best_width, best_height), 0)
        resized = img.resize((width, height), resample=self.resample)
        canvas.paste(resized, ((best_width - width) // 2, (best_height - height) // 2))
        tile = self.crop_size["height"]
        grid = [
            canvas.crop((left, top, left + tile, top + tile))
            for top in range(0, best_height, tile)
            for left in range(0, best_width, tile)
        ]
        if "shortest_edge" in self.size:
            side = (self.size["shortest_edge"],) * 2
        else:
            side = (self.size["width"], self.size["height"])
        return [img.resize(side, resample=self.resample)] + grid

    def preprocess(
        self, images: ImageSource | Sequence[ImageSource]
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Every picture's tiles [n_tiles, H, W, 3] float32 (pictures in order, each its base
        picture then its grid) and the pictures' (height, width)."""
        if isinstance(images, (Image.Image, str, Path)):
            images = [images]
        pictures = [self.load(i) for i in images]
        tiles = [self.resize_and_crop(t) for p in pictures for t in self.tiles(p)]
        return self.normalize(np.stack(tiles)), [(p.height, p.width) for p in pictures]

    def __call__(self, images: ImageSource | Sequence[ImageSource]) -> np.ndarray:
        """Every picture's tiles [n_tiles, H, W, 3] float32 (see `preprocess`)."""
        return self.preprocess(images)[0]


@dataclass
class LlavaOnevisionImageProcessor(LlavaNextImageProcessor):
    """OneVision's preprocessing (`LlavaOnevisionImageProcessor`, PIL backend): LLaVA-NeXT's
    tiles, squashed to `size` (384 x 384) without a crop. A picture that shares its prompt with
    others is padded to a square with the mean colour and seen whole (one tile), as
    transformers does when a sample holds several pictures (`batch_num_images`)."""

    size: dict[str, int] = field(default_factory=lambda: {"height": 384, "width": 384})
    do_center_crop: bool = False
    crop_size: Optional[dict[str, int]] = None

    def __post_init__(self):
        self.do_center_crop = bool(self.do_center_crop)
        if self.crop_size is None:  # the tiles are `size`, as transformers' `patch_size`
            side = self.size.get("height") or self.size.get("shortest_edge")
            self.crop_size = {"height": side, "width": side}
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "image_processor_type": "LlavaOnevisionImageProcessor"}

    def preprocess(
        self, images: ImageSource | Sequence[ImageSource], alone: Optional[Sequence[bool]] = None
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Every picture's tiles [n_tiles, H, W, 3] float32 (each picture's base picture and
        grid, or only itself padded to a square where `alone` is False) and the pictures'
        (height, width)."""
        if isinstance(images, (Image.Image, str, Path)):
            images = [images]
        pictures = [self.load(i) for i in images]
        alone = [True] * len(pictures) if alone is None else list(alone)
        tiles = [
            self.resize_and_crop(t)
            for p, one in zip(pictures, alone)
            for t in (self.tiles(p) if one else [expand2square(p, self.pad_color)])
        ]
        return self.normalize(np.stack(tiles)), [(p.height, p.width) for p in pictures]


def image_processor_from_dict(d: dict[str, Any], config: ModelConfig) -> CLIPImageProcessor:
    """The image processor a model needs (OneVision's or LLaVA-NeXT's tiles, or CLIP's), with
    the settings of a `preprocessor_config.json`; the tiled models tile along the model's own
    pinpoints."""
    if config.model_type == "llava_onevision":
        return LlavaOnevisionImageProcessor.from_dict(
            {**d, "image_grid_pinpoints": config.image_grid_pinpoints}
        )
    if config.is_next:
        return LlavaNextImageProcessor.from_dict(
            {**d, "image_grid_pinpoints": config.image_grid_pinpoints}
        )
    return CLIPImageProcessor.from_dict(d)
