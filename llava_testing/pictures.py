"""Pictures for tests, drawn from a seed: no files, no downloads."""

from __future__ import annotations

import numpy as np
from PIL import Image


def make_picture(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A smooth random RGB picture (PIL) of `size` (width, height)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)
