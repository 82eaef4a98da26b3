"""LLaVA: image -> CLIP features -> projector -> image tokens spliced into the prompt -> Llama."""

from __future__ import annotations

import itertools
import re
from typing import Any, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .anyres import pack_image_features
from .config import ModelConfig
from .language_model import LanguageModel
from .projector import MultiModalProjector
from .video_pooling import VideoPooler, halve_bilinear
from .vision import VisionTower

# Videos' pixels: [V, F, H, W, 3], or a list of [F_i, H, W, 3] when their frame counts differ.
VideoPixels = Union[mx.array, Sequence[mx.array]]


def video_frame_counts(pixel_values_videos: Optional[VideoPixels]) -> list[int]:
    """The frame count of each video of `pixel_values_videos` (none: [])."""
    if pixel_values_videos is None:
        return []
    if isinstance(pixel_values_videos, (list, tuple)):
        return [v.shape[0] for v in pixel_values_videos]
    return [pixel_values_videos.shape[1]] * pixel_values_videos.shape[0]


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
    input_ids: mx.array, image_token_index: int, tokens_per_image: Sequence[int], what="image"
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
            f"the prompt has {found} {what} tokens but {len(tokens_per_image)} {what}(s) need "
            f"{expected}{each}: use one <{what}> per {what}"
        )
    picture_ends = np.cumsum(tokens_per_image)
    for end in np.cumsum(runs).tolist():
        k = int(np.searchsorted(picture_ends, end))
        if picture_ends[k] != end:
            raise ValueError(
                f"the {tokens_per_image[k]} {what} tokens of {what} {k + 1} are split: they must "
                f"follow each other in one place (one <{what}> per {what})"
            )


_LAYER_KEY = re.compile(r"language_model\.model\.layers\.(\d+)\.")


class Model(nn.Module):
    """LlavaForConditionalGeneration in MLX, and by `model_type` its successors:
    LlavaNextForConditionalGeneration ("llava_next"), LlavaOnevisionForConditionalGeneration
    ("llava_onevision") and LlavaNextVideoForConditionalGeneration ("llava_next_video");
    attribute names follow the llava-hf checkpoints.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision_config)
        if config.model_type == "llava_next_video":
            self.vision_resampler = VideoPooler(config)
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
        self,
        pixel_values: mx.array,
        image_sizes: Optional[Sequence[tuple[int, int]]] = None,
        batch_num_images: Optional[Sequence[int]] = None,
    ) -> mx.array:
        """Projected image features, in one batched tower pass.

        Args:
            pixel_values: [n, H, W, 3]: one picture each (LLaVA-1.5), or each picture's base
                tile then its grid of tiles (the tiled models, as the processor writes them).
            image_sizes: the tiled models only: (height, width) of each picture.
            batch_num_images: the pictures of each prompt (OneVision sees a picture that is
                not alone in its prompt as its base tile only); default one each.

        Returns:
            [n, T, D_text] (LLaVA-1.5), or [image tokens of all pictures, D_text] (tiled).
        """
        features = self.multi_modal_projector(self.vision_features(pixel_values))
        if not self.config.is_next:
            return features
        if image_sizes is None:
            raise ValueError(f"{self.config.model_type} needs each picture's image_sizes")
        tiled = self._tiled(image_sizes, batch_num_images)
        tiles = sum(self.config.image_tiles(s, t) for s, t in zip(image_sizes, tiled))
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
            self.config.max_num_patches,
            tiled,
        )

    def _tiled(
        self, image_sizes: Sequence[tuple[int, int]], batch_num_images: Optional[Sequence[int]]
    ) -> list[bool]:
        """Per picture, whether it is tiled (see `ModelConfig.tiles`)."""
        if batch_num_images is None:
            batch_num_images = [1] * len(image_sizes)
        if sum(batch_num_images) != len(image_sizes):
            raise ValueError(
                f"batch_num_images {list(batch_num_images)} does not count the "
                f"{len(image_sizes)} picture(s)"
            )
        return [self.config.tiles(n == 1) for n in batch_num_images for _ in range(n)]

    def get_video_features(self, pixel_values_videos: VideoPixels) -> mx.array:
        """Projected, pooled features of videos [V, F, H, W, 3] (or a list of [F_i, H, W, 3],
        videos of different lengths), all frames in one tower pass: [V, video tokens, D_text]
        (`config.video_tokens(F)` each; OneVision ends each video with one `image_newline`),
        or [all videos' tokens, D_text] for a list."""
        if isinstance(pixel_values_videos, (list, tuple)):
            frames = [v.shape[0] for v in pixel_values_videos]
            features = self._frame_features(mx.concatenate(list(pixel_values_videos)))
            ends = list(itertools.accumulate(frames))[:-1]
            videos = [self._close_video(f[None]) for f in mx.split(features, ends)]
            return mx.concatenate([v.reshape(-1, v.shape[-1]) for v in videos])
        videos = pixel_values_videos.shape[0]
        frames_first = pixel_values_videos.reshape(-1, *pixel_values_videos.shape[2:])
        features = self._frame_features(frames_first)
        return self._close_video(features.reshape(videos, -1, features.shape[-1]))

    def _frame_features(self, frames: mx.array) -> mx.array:
        """Frames [n, H, W, 3] -> pooled, projected features [n, tokens per frame, D_text]."""
        features = self.vision_features(frames)
        if self.config.model_type == "llava_next_video":
            return self.multi_modal_projector(self.vision_resampler(features))
        return halve_bilinear(self.multi_modal_projector(features))

    def _close_video(self, features: mx.array) -> mx.array:
        """[V, F, T, D] or [V, F * T, D] -> [V, F * T (+ 1: OneVision's newline), D]."""
        features = features.reshape(features.shape[0], -1, features.shape[-1])
        if self.config.model_type != "llava_onevision":
            return features
        newline = self.image_newline.astype(features.dtype)
        newline = mx.broadcast_to(newline, (features.shape[0], 1, newline.shape[-1]))
        return mx.concatenate([features, newline], axis=1)

    def get_input_embeddings(
        self,
        input_ids: mx.array,
        pixel_values: Optional[mx.array] = None,
        image_sizes: Optional[Sequence[tuple[int, int]]] = None,
        pixel_values_videos: Optional[VideoPixels] = None,
        batch_num_images: Optional[Sequence[int]] = None,
    ) -> mx.array:
        """input_ids [B, L] (image positions hold `image_token_index`, video positions
        `video_token_index`) -> embeddings [B, L, D].

        The caller guarantees that the ids hold each picture's and video's tokens, as the
        processor writes them; `check_image_tokens` verifies it. `image_sizes` ((height, width)
        per picture) is needed for the tiled models only.
        """
        image_mask = input_ids == self.config.image_token_index
        placeholders = image_mask
        if self.config.has_video:
            video_mask = input_ids == self.config.video_token_index
            placeholders = placeholders | video_mask
        # A placeholder id may lie outside the vocabulary (original checkpoints): embed a 0.
        embed_tokens = self.language_model.model.embed_tokens
        embeddings = embed_tokens(mx.where(placeholders, 0, input_ids))
        if self.vision_tower is None:  # see `pipeline`
            return embeddings
        if pixel_values is not None:
            features = self.get_image_features(pixel_values, image_sizes, batch_num_images)
            embeddings = merge_image_features(embeddings, features, image_mask)
        if pixel_values_videos is not None:
            features = self.get_video_features(pixel_values_videos)
            embeddings = merge_image_features(embeddings, features, video_mask)
        return embeddings

    def check_image_tokens(
        self,
        input_ids: mx.array,
        num_images: int,
        image_sizes: Optional[Sequence[tuple[int, int]]] = None,
        batch_num_images: Optional[Sequence[int]] = None,
        video_frames: Sequence[int] = (),
    ) -> None:
        """Raise ValueError unless the ids [B, L] hold each picture's and video's tokens in one
        place (`check_image_runs`): `num_images` pictures, of `image_sizes` for the tiled
        models, and videos of `video_frames` frames each."""
        if self.config.is_next and num_images:
            if image_sizes is None or len(image_sizes) != num_images:
                raise ValueError(
                    f"{self.config.model_type} needs one (height, width) in image_sizes per picture"
                )
            tiled = self._tiled(image_sizes, batch_num_images)
            counts = [self.config.image_tokens(s, t) for s, t in zip(image_sizes, tiled)]
        else:
            counts = [self.config.num_image_tokens] * num_images
        check_image_runs(input_ids, self.config.image_token_index, counts)
        if self.config.has_video:
            counts = [self.config.video_tokens(f) for f in video_frames]
            check_image_runs(input_ids, self.config.video_token_index, counts, "video")
        elif video_frames:
            raise ValueError(f"{self.config.model_type} does not see videos")

    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: Optional[mx.array] = None,
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
        image_sizes: Optional[Sequence[tuple[int, int]]] = None,
        pixel_values_videos: Optional[VideoPixels] = None,
        batch_num_images: Optional[Sequence[int]] = None,
        attention_mask: Optional[mx.array] = None,
    ) -> mx.array:
        """Logits [B, L, vocab] for input_ids [B, L], optional pixel_values [n, H, W, 3] (with
        `image_sizes`, (height, width) per picture, for the tiled models; `batch_num_images`
        per prompt for OneVision), and videos `pixel_values_videos` [V, F, H, W, 3] (a list of
        [F_i, H, W, 3] for videos of different lengths): the
        processor's outputs, as keywords.

        `attention_mask` is accepted as the processor gives it, all ones: a left-padded batch
        needs a KV cache that knows its padding (`batch.py`).
        """
        if attention_mask is not None and not bool(mx.all(attention_mask)):
            raise ValueError("a left-padded batch needs the batch engine (batch_generate)")
        if input_embeddings is None:
            n_images = 0 if pixel_values is None else pixel_values.shape[0]
            if self.config.is_next and pixel_values is not None:
                if image_sizes is None:
                    raise ValueError(f"{self.config.model_type} needs image_sizes for its pictures")
                n_images = len(image_sizes)
            frames = video_frame_counts(pixel_values_videos)
            self.check_image_tokens(input_ids, n_images, image_sizes, batch_num_images, frames)
            input_embeddings = self.get_input_embeddings(
                input_ids, pixel_values, image_sizes, pixel_values_videos, batch_num_images
            )
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
