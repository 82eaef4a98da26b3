"""Image preprocessing (CLIP's, and LLaVA-NeXT's tiles), bit-exact with transformers' PIL
backend; pictures are read by `image_io`."""

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from .anyres import DEFAULT_PINPOINTS, fit_size, select_best_resolution
from .config import ModelConfig

# Fetching and decoding live in image_io; these names stay importable from here.
from .image_io import (  # noqa: F401 - re-exported
    DEFAULT_MAX_IMAGE_PIXELS,
    FetchLimits,
    ImageLoadError,
    ImageSource,
    decode_image,
    load_image,
)

MAX_ASPECT_RATIO = 200  # longest side / shortest side, as Qwen2-VL's processor bounds it
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


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
    # Not a preprocessor_config.json key: the most pixels preprocessing may allocate for one
    # picture (after padding and resizing), checked before it allocates any.
    max_pixels: int = field(default_factory=lambda: FetchLimits.from_env().max_pixels, repr=False)

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
        settings = {k: v for k, v in asdict(self).items() if k != "max_pixels"}
        return {"image_processor_type": "CLIPImageProcessor", **settings}

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        if "height" in self.size:
            return self.size["width"], self.size["height"]
        # As transformers' get_resize_output_image_size: truncated, not rounded.
        short, long = min(width, height), max(width, height)
        new_short = self.size["shortest_edge"]
        new_long = int(new_short * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def working_pixels(self, width: int, height: int) -> int:
        """The largest picture, in pixels, that preprocessing makes of a width x height one."""
        if self.pad_to_square:
            width = height = max(width, height)
        pixels = width * height
        if self.do_resize:
            resized_width, resized_height = self._resized_size(width, height)
            pixels = max(pixels, resized_width * resized_height)
        return pixels

    def check_size(self, width: int, height: int) -> None:
        """Refuse a picture whose preprocessing would allocate more than `max_pixels` pixels,
        or whose sides differ by more than `MAX_ASPECT_RATIO` times.

        Raises:
            ImageLoadError: with the picture's size and the bound it breaks.
        """
        if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise ImageLoadError(
                f"a picture of {width} x {height} pixels is too elongated: its sides may differ "
                f"at most {MAX_ASPECT_RATIO} times"
            )
        pixels = self.working_pixels(width, height)
        if pixels > self.max_pixels:
            raise ImageLoadError(
                f"a picture of {width} x {height} pixels becomes {pixels:,} pixels when "
                f"{'padded and ' if self.pad_to_square else ''}resized, more than the limit of "
                f"{self.max_pixels:,}"
            )

    def load(self, source: ImageSource) -> Image.Image:
        """Load and convert one image (and pad it to a square if `pad_to_square`), its size
        checked first (`check_size`)."""
        img = load_image(source)
        self.check_size(*img.size)
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

    def working_pixels(self, width: int, height: int) -> int:
        """The largest picture preprocessing makes: the canvas of the best resolution, the
        base picture, or the picture itself."""
        best_height, best_width = select_best_resolution((height, width), self.image_grid_pinpoints)
        base_width, base_height = self._base_size()
        return max(width * height, best_width * best_height, base_width * base_height)

    def _base_size(self) -> tuple[int, int]:
        """(width, height) of the whole picture squashed, the first tile."""
        if "shortest_edge" in self.size:
            return (self.size["shortest_edge"],) * 2
        return self.size["width"], self.size["height"]

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
        return [img.resize(self._base_size(), resample=self.resample)] + grid

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
