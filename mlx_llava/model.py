"""LLaVA: image -> CLIP features -> projector -> image tokens spliced into the prompt -> Llama."""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .anyres import pack_image_features
from .config import ModelConfig
from .language_model import LanguageModel
from .projector import MultiModalProjector
from .vision import VisionTower


def merge_image_features(
    embeddings: mx.array, image_features: mx.array, image_mask: mx.array
) -> mx.array:
    """Write image features into the image-token positions, in order.

    Args:
        embeddings: token embeddings [B, L, D].
        image_features: projected features [n_images, T, D] or [N, D] (pictures of different
            token counts, concatenated), in prompt order across the batch.
        image_mask: [B, L] bool, True at image tokens; it must hold one position per feature row.

    Returns:
        [B, L, D]. The k-th True position (row-major over the batch) gets feature row k; no host
        synchronisation is needed.
    """
    B, L, D = embeddings.shape
    flat_features = image_features.reshape(-1, D).astype(embeddings.dtype)
    flat_mask = image_mask.reshape(-1)
    order = mx.maximum(mx.cumsum(flat_mask.astype(mx.int32)) - 1, 0)
    gathered = flat_features[order]
    merged = mx.where(flat_mask[:, None], gathered, embeddings.reshape(-1, D))
    return merged.reshape(B, L, D)


def check_image_runs(
    input_ids: mx.array, image_token_index: int, tokens_per_image: Sequence[int]
) -> None:
    """Raise ValueError unless the image tokens are the pictures' tokens in order, each
    picture's in one place.

    Args:
        input_ids: [B, L]; the pictures' tokens follow each other row-major across the batch.
        image_token_index: the id of an image token.
        tokens_per_image: how many tokens each picture has, in order.

    A run of consecutive image tokens (within a row) must end where a picture ends: two pictures
    may touch (`<image><image>`), but no picture's tokens may be split in two places.
    """
    is_image = np.asarray(input_ids) == image_token_index
    runs = []
    for row in is_image.reshape(-1, is_image.shape[-1]):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
        runs += (edges[1::2] - edges[::2]).tolist()
    found, expected = sum(runs), sum(tokens_per_image)
    if found != expected:
        each = set(tokens_per_image)
        each = f" ({each.pop()} each)" if len(each) == 1 else ""
        raise ValueError(
            f"the prompt has {found} image tokens but {len(tokens_per_image)} image(s) need "
            f"{expected}{each}: use one <image> per image"
        )
    picture_ends = np.cumsum(tokens_per_image)
    for end in np.cumsum(runs).tolist():
        k = int(np.searchsorted(picture_ends, end))
        if picture_ends[k] != end:
            raise ValueError(
                f"the {tokens_per_image[k]} image tokens of image {k + 1} are split: they must "
                "follow each other in one place (one <image> per image)"
            )


_LAYER_KEY = re.compile(r"language_model\.model\.layers\.(\d+)\.")


class Model(nn.Module):
    """LlavaForConditionalGeneration (and, for `model_type` "llava_next",
    LlavaNextForConditionalGeneration) in MLX; attribute names follow the llava-hf checkpoints.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config)
        if config.is_next:
            # LLaVA-NeXT's learned token after each row of a picture's tile grid.
            self.image_newline = mx.zeros((config.text_config.hidden_size,))
        self.language_model = LanguageModel(config.text_config.to_mlx_lm_args())

    @property
    def layers(self):
        """The decoder layers (mlx-lm's cache helpers size the KV cache from these)."""
        return self.language_model.layers

    def vision_features(self, pixel_values: mx.array) -> mx.array:
        """pixel_values [n, H, W, 3] -> the selected tower features [n, T, D_vision * layers]."""
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        states = self.vision_tower(pixel_values.astype(dtype), self.config.feature_layers)
        if self.config.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]
        return states[0] if len(states) == 1 else mx.concatenate(states, axis=-1)

    def get_image_features(
        self, pixel_values: mx.array, image_sizes: Optional[Sequence[tuple[int, int]]] = None
    ) -> mx.array:
        """Projected image features, in one batched tower pass.

        Args:
            pixel_values: [n, H, W, 3]: one picture each (LLaVA-1.5), or each picture's base
                tile then its grid of tiles (LLaVA-NeXT, as the processor writes them).
            image_sizes: LLaVA-NeXT only: (height, width) of each picture.

        Returns:
            [n, T, D_text] (LLaVA-1.5), or [image tokens of all pictures, D_text] (LLaVA-NeXT).
        """
        features = self.multi_modal_projector(self.vision_features(pixel_values))
        if not self.config.is_next:
            return features
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs each picture's image_sizes to place its tiles")
        tiles = sum(self.config.image_tiles(s) for s in image_sizes)
        if tiles != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values hold {pixel_values.shape[0]} tiles but the {len(image_sizes)} "
                f"picture size(s) need {tiles}"
            )
        return pack_image_features(
            features,
            image_sizes,
            self.image_newline,
            self.config.image_grid_pinpoints,
            self.config.vision_config.image_size,
        )

    def get_input_embeddings(
        self,
        input_ids: mx.array,
        pixel_values: Optional[mx.array] = None,
        image_sizes: Optional[Sequence[tuple[int, int]]] = None,
    ) -> mx.array:
        """input_ids [B, L] (image positions hold `image_token_index`) -> embeddings [B, L, D].

        The caller guarantees that the ids hold each picture's image tokens, as the processor
        writes them (`config.image_tokens(size)` per picture); `check_image_tokens` verifies it.
        `image_sizes` ((height, width) per picture) is needed for LLaVA-NeXT only.
        """
        image_mask = input_ids == self.config.image_token_index
        # The placeholder id may lie outside the vocabulary (original checkpoints): embed a 0.
        embed_tokens = self.language_model.model.embed_tokens
        embeddings = embed_tokens(mx.where(image_mask, 0, input_ids))
        if pixel_values is None or self.vision_tower is None:  # see `pipeline`
            return embeddings
        features = self.get_image_features(pixel_values, image_sizes)
        return merge_image_features(embeddings, features, image_mask)

    def check_image_tokens(
        self,
        input_ids: mx.array,
        num_images: int,
        image_sizes: Optional[Sequence[tuple[int, int]]] = None,
    ) -> None:
        """Raise ValueError unless the ids [B, L] hold each image's tokens in one place
        (`check_image_runs`): `num_images` pictures, of `image_sizes` for LLaVA-NeXT."""
        if self.config.is_next and num_images:
            if image_sizes is None or len(image_sizes) != num_images:
                raise ValueError("LLaVA-NeXT needs one (height, width) in image_sizes per picture")
            counts = [self.config.image_tokens(s) for s in image_sizes]
        else:
            counts = [self.config.num_image_tokens] * num_images
        check_image_runs(input_ids, self.config.image_token_index, counts)

    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: Optional[mx.array] = None,
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
        image_sizes: Optional[Sequence[tuple[int, int]]] = None,
    ) -> mx.array:
        """Logits [B, L, vocab] for input_ids [B, L] and optional pixel_values [n, H, W, 3]
        (with `image_sizes`, (height, width) per picture, for LLaVA-NeXT)."""
        if input_embeddings is None:
            n_images = 0 if pixel_values is None else pixel_values.shape[0]
            if self.config.is_next and pixel_values is not None:
                if image_sizes is None:
                    raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values")
                n_images = len(image_sizes)
            self.check_image_tokens(input_ids, n_images, image_sizes)
            input_embeddings = self.get_input_embeddings(input_ids, pixel_values, image_sizes)
        hidden = self.language_model(input_ids, cache, input_embeddings)
        return self.language_model.lm_head(hidden)

    def make_cache(self) -> list[Any]:
        return self.language_model.make_cache()

    def pipeline(self, group: mx.distributed.Group) -> None:
        """Split the decoder layers across the ranks of `group` (`LanguageModel`: rank 0 holds
        the last layers). The vision tower and projector stay on the rank of the first layers
        (the last rank), which builds the prompt's embeddings; the other ranks drop them."""
        layers = self.config.text_config.num_hidden_layers
        if group.size() > layers:
            raise ValueError(f"{group.size()} ranks cannot share {layers} decoder layers")
        self.language_model.pipeline(group)
        if group.rank() != group.size() - 1:
            for name in [k for k in self if k != "language_model"]:
                setattr(self, name, None)

    def holds(self, name: str) -> bool:
        """Whether this rank keeps the weight `name` (every weight, unless pipelined)."""
        if not name.startswith("language_model."):
            return self.vision_tower is not None
        layer = _LAYER_KEY.match(name)
        return layer is None or int(layer[1]) in self.language_model.layer_range

    def pipeline_stage(self) -> str:
        """What this rank holds, e.g. `layers 0-15 of 32, vision tower and projector`."""
        held = self.language_model.layer_range
        total = self.config.text_config.num_hidden_layers
        vision = ", vision tower and projector" if self.vision_tower is not None else ""
        return f"layers {held.start}-{held.stop - 1} of {total}{vision}"

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop buffers that checkpoints carry but the model does not hold."""
        return {
            k: v
            for k, v in weights.items()
            if not k.endswith(("rotary_emb.inv_freq", "position_ids"))
            and not (self.config.text_config.tie_word_embeddings and k.endswith("lm_head.weight"))
        }
