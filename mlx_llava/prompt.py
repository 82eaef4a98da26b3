"""The prompt pipeline: a prompt and its pictures -> token ids, pixels, position keys and the
embeddings the language model is fed (image features spliced in), and the `PromptCache` that
lets a prompt which begins like the last one compute only the rest.

Everything up to `EncodedPrompt` runs on the host without MLX (`encode_on_host`), so that a
server can tokenize and preprocess on other threads than the model's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import trim_prompt_cache

from .model import Model, merge_image_features
from .processor import IMAGE_PLACEHOLDER, ImageInput, Processor
from .video_io import DEFAULT_NUM_FRAMES, VideoInput


def image_list(image, images) -> list:
    """The pictures of a call that takes `image=` or `images=`, as a list."""
    if image is not None and images is not None:
        raise ValueError("pass either image or images, not both")
    if images is not None:
        return list(images)
    return [] if image is None else [image]


def context_room(model: Model, length: int, what: str = "the prompt") -> int:
    """Positions the model's context (`max_position_embeddings`) leaves after `length` tokens.

    Raises:
        ValueError: none are left, so not even one token could be answered.
    """
    limit = model.config.text_config.max_position_embeddings
    if length >= limit:
        raise ValueError(
            f"{what} is {length} tokens (image tokens included) but the model's context is "
            f"{limit}: no room for an answer"
        )
    return limit - length


def image_digests(pixel_values: np.ndarray, tiles: Optional[Sequence[int]] = None) -> list[str]:
    """A digest of each preprocessed picture [n, H, W, 3] (LLaVA-NeXT: of each picture's
    `tiles` consecutive rows): its identity in prompt caches."""
    tiles = [1] * len(pixel_values) if tiles is None else tiles
    starts = np.cumsum([0, *tiles]).tolist()
    return [
        hashlib.sha1(np.ascontiguousarray(pixel_values[a:b]).tobytes()).hexdigest()
        for a, b in zip(starts, starts[1:])
    ]


def preprocess_images(
    processor: Processor, images: Sequence[ImageInput]
) -> tuple[Optional[mx.array], list[str], Optional[list]]:
    """Pixel values [n, H, W, 3] (None without pictures; LLaVA-NeXT: every picture's tiles),
    the pictures' digests, and their (height, width) where the model needs them (LLaVA-NeXT;
    else None)."""
    pixels, digests, sizes = _preprocess_on_host(processor, images)
    return (None if pixels is None else mx.array(pixels)), digests, sizes


def _preprocess_on_host(
    processor: Processor, images: Sequence[ImageInput]
) -> tuple[Optional[np.ndarray], list[str], Optional[list]]:
    if not images:
        return None, [], None
    pixels, sizes = processor.image_processor.preprocess(list(images))
    tiles = None if sizes is None else [processor.config.image_tiles(s) for s in sizes]
    return pixels, image_digests(pixels, tiles), sizes


@dataclass
class EncodedPrompt:
    """A prompt tokenized and its pictures preprocessed, on the host (nothing of MLX): what a
    thread other than the model's can prepare.

    Attributes:
        input_ids: the token ids [L] (each `<image>` expanded).
        pixel_values: float32 [n, H, W, 3] (LLaVA-NeXT: every picture's tiles), or None.
        digests: the pictures' digests (see `image_digests`).
        image_sizes: the pictures' (height, width) for LLaVA-NeXT, else None.
        video_pixels: the videos' preprocessed frames [V, F, H, W, 3] float32 (OneVision,
            LLaVA-NeXT-Video), or None.
        video_digests: the videos' digests (their identity in prompt caches).
    """

    input_ids: list[int]
    pixel_values: Optional[np.ndarray]
    digests: list[str]
    image_sizes: Optional[list[tuple[int, int]]]
    video_pixels: Optional[np.ndarray] = None
    video_digests: list[str] = field(default_factory=list)


def encode_on_host(
    model: Model,
    processor: Processor,
    prompt: str,
    images: Sequence[ImageInput],
    max_chars: Optional[int] = None,
    videos: Sequence[VideoInput] = (),
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> EncodedPrompt:
    """Tokenize a prompt and preprocess its pictures and videos without touching MLX.

    Args:
        max_chars: refuse longer prompts before tokenizing them (bounded work).
        videos: the videos of the prompt's `<video>` placeholders (see `Processor.__call__`).

    Raises:
        ValueError: the prompt is longer than `max_chars`, its placeholders and pictures (or
            videos) differ in number, the model does not see videos, or the prompt leaves no
            room in the model's context (see `context_room`).
    """
    if max_chars is not None and len(prompt) > max_chars:
        raise ValueError(
            f"the prompt is {len(prompt):,} characters, more than the limit of {max_chars:,}"
        )
    found = prompt.count(IMAGE_PLACEHOLDER)
    if found != len(images):
        raise ValueError(
            f"the prompt has {found} <image> placeholder(s) but {len(images)} image(s) were given"
        )
    pixels, digests, sizes = _preprocess_on_host(processor, images)
    frames = processor.video_frames(videos, num_frames)
    if len({f.shape for f in frames}) > 1:
        raise ValueError("the videos of one prompt need the same number of frames")
    lengths = [len(f) for f in frames]
    input_ids = processor.tokenize(prompt, image_sizes=sizes, video_frames=lengths)
    context_room(model, len(input_ids))
    sizes = None if sizes is None else [tuple(s) for s in sizes]
    video_pixels = np.stack(frames) if frames else None
    video_digests = image_digests(video_pixels) if frames else []
    return EncodedPrompt(input_ids, pixels, digests, sizes, video_pixels, video_digests)


class PromptCache:
    """A KV cache that remembers what it holds, so a prompt that begins the same way computes
    only the rest: the picture and system prompt are encoded once for many questions, and a
    chat turn costs only its new tokens.

    Positions are compared by token id, and image tokens by a digest of their picture's
    pixels; the cache is rewound (mlx-lm's `trim`) to the longest common prefix. The pictures of
    the last call are remembered too: the same picture objects again (a chat's next turn) are
    not preprocessed and hashed again, so pass new objects for pictures changed in place.
    """

    def __init__(self, model: Model):
        self.cache = model.make_cache()
        self.keys: list = []
        self._images: tuple = ()
        self._preprocessed: tuple = (None, [], None)

    def preprocessed(
        self, images: Sequence[ImageInput], processor: Processor
    ) -> tuple[Optional[mx.array], list[str], Optional[list]]:
        """`preprocess_images` of `images`: pixel values, digests and image sizes."""
        same = len(images) == len(self._images)
        if not (same and all(a is b for a, b in zip(images, self._images))):
            self._preprocessed = preprocess_images(processor, images)
            self._images = tuple(images)
        return self._preprocessed

    @property
    def length(self) -> int:
        return self.cache[0].offset

    def reusable(self, keys: list) -> int:
        """How many leading positions of `keys` the cache already holds."""
        n = 0
        for a, b in zip(self.keys, keys):
            if a != b:
                break
            n += 1
        return n

    def rewind(self, length: int) -> None:
        trim_prompt_cache(self.cache, self.length - length)
        self.keys = self.keys[:length]


def image_runs(ids: Sequence[int], image_token: int) -> list[tuple[int, int]]:
    """[start, end) of each run of image tokens in one prompt's ids: a run per picture (its
    length is that picture's token count) when no two placeholders touch."""
    runs, start = [], None
    for i, t in enumerate(list(ids) + [None]):
        if t == image_token and start is None:
            start = i
        elif t != image_token and start is not None:
            runs.append((start, i))
            start = None
    return runs


def position_keys(
    input_ids: np.ndarray,
    digests: Sequence[str],
    image_token: int,
    video_digests: Sequence[str] = (),
    video_token: Optional[int] = None,
) -> list:
    """One hashable key per position of a single prompt: the token id, or (picture digest, k)
    for the k-th token of a picture. Pictures are told apart by their runs of image tokens;
    when placeholders touch (fewer runs than pictures) every image position is keyed by all the
    prompt's digests instead. Videos' positions are keyed likewise by `video_digests`."""
    ids = np.asarray(input_ids).tolist()
    keys = list(ids)
    _key_runs(keys, ids, digests, image_token)
    _key_runs(keys, ids, video_digests, video_token)
    return keys


def _key_runs(keys: list, ids: list, digests: Sequence[str], token: Optional[int]) -> None:
    """Key the positions of `token` in `keys` by `digests` (see `position_keys`)."""
    if not digests:
        return
    runs = image_runs(ids, token)
    if len(runs) == len(digests):
        for (start, end), digest in zip(runs, digests):
            keys[start:end] = [(digest, k) for k in range(end - start)]
        return
    whole = tuple(digests)
    image_positions = [i for start, end in runs for i in range(start, end)]
    for k, i in enumerate(image_positions):
        keys[i] = (whole, k)


def encode_prompt(
    model: Model,
    processor: Processor,
    prompt: str,
    images: Sequence[ImageInput],
    preprocessed: Optional[tuple[Optional[mx.array], list[str], Optional[list]]] = None,
    keyed: bool = True,
) -> tuple[mx.array, Optional[mx.array], list, Optional[list]]:
    """Tokenize a prompt and preprocess its pictures.

    Args:
        preprocessed: `(pixel_values, digests, image_sizes)` of `images` already computed (see
            `preprocess_images`), or None to compute them here.
        keyed: compute position keys (else the keys are the token ids and pictures are not
            hashed).

    Returns:
        input_ids [1, L] (each `<image>` expanded), pixel_values [n, H, W, 3] or None, one
        key per position (see `position_keys`), and the pictures' (height, width) for
        LLaVA-NeXT (else None): pass them on to `prompt_embeddings`.

    Raises:
        ValueError: placeholders and pictures differ in number, or the prompt leaves no room
            in the model's context for an answer (see `context_room`).
    """
    if preprocessed is None and keyed:
        preprocessed = preprocess_images(processor, images)
    pixel_values, digests, sizes = preprocessed or (None, [], None)
    inputs = processor(prompt, list(images) or None, pixel_values=pixel_values, image_sizes=sizes)
    input_ids = inputs["input_ids"]
    context_room(model, input_ids.shape[1])
    ids = np.asarray(input_ids[0])
    keys = position_keys(ids, digests, model.config.image_token_index) if keyed else ids.tolist()
    return input_ids, inputs["pixel_values"], keys, inputs["image_sizes"]


def prompt_embeddings(
    model: Model,
    input_ids: mx.array,
    pixel_values: Optional[mx.array],
    start: int = 0,
    image_sizes: Optional[Sequence[tuple[int, int]]] = None,
) -> mx.array:
    """Embeddings [L - start, D] of positions `start:` of one prompt, input_ids [1, L]
    (`image_sizes`: LLaVA-NeXT's, from `encode_prompt`).

    Only the pictures whose tokens lie after `start` go through the vision tower: a picture
    already in a cached prefix is not encoded again.
    """
    return embed_prompts(model, [UncachedPrompt(input_ids, pixel_values, start, image_sizes)])[0]


@dataclass
class UncachedPrompt:
    """What of one prompt is still to be embedded: input_ids [1, L], its pixel values (or
    None), the positions already cached (`start`) and LLaVA-NeXT's picture sizes."""

    input_ids: mx.array
    pixel_values: Optional[mx.array] = None
    start: int = 0
    image_sizes: Optional[Sequence[tuple[int, int]]] = None
    video_pixels: Optional[mx.array] = None

    def new_pictures(self, model: Model) -> Optional[tuple[mx.array, Optional[list]]]:
        """(pixels, sizes) of the pictures whose tokens all lie after `start`, when those are
        exactly the ones the new positions need; None when a picture straddles `start` or
        placeholders touch (then the whole prompt is embedded and cut)."""
        image_token = model.config.image_token_index
        runs = image_runs(np.asarray(self.input_ids[0]).tolist(), image_token)
        sizes = self.image_sizes
        pictures = self.pixel_values.shape[0] if sizes is None else len(sizes)
        if len(runs) != pictures or any(s < self.start < e for s, e in runs):
            return None
        first = sum(e <= self.start for _, e in runs)  # pictures wholly before `start`
        if sizes is None:
            return self.pixel_values[first:], None
        tiles = sum(model.config.image_tiles(s) for s in sizes[:first])  # LLaVA-NeXT's tiles
        return self.pixel_values[tiles:], list(sizes[first:])


def embed_prompts(model: Model, prompts: Sequence[UncachedPrompt]) -> list[mx.array]:
    """`prompt_embeddings` of several prompts (each [L_i - start_i, D]), the pictures they
    still need encoded together in one batched tower call (requests that join a batch at one
    step); a prompt whose new positions hold a video is embedded whole, and cut."""
    image_token = model.config.image_token_index
    out: list[Optional[mx.array]] = [None] * len(prompts)
    batched = []  # (index, new ids, pixels, sizes)
    for i, p in enumerate(prompts):
        new_ids = p.input_ids[:, p.start :]
        if p.video_pixels is not None and model.config.video_token_index in new_ids.tolist()[0]:
            whole = model.get_input_embeddings(
                p.input_ids, p.pixel_values, p.image_sizes, p.video_pixels
            )
            out[i] = whole[0, p.start :]
            continue
        if p.pixel_values is None or image_token not in np.asarray(new_ids).tolist()[0]:
            out[i] = model.get_input_embeddings(new_ids)[0]
            continue
        part = p.new_pictures(model)
        if part is None:
            whole = model.get_input_embeddings(p.input_ids, p.pixel_values, p.image_sizes)
            out[i] = whole[0, p.start :]
            continue
        batched.append((i, new_ids, *part))
    if len(batched) == 1:
        i, new_ids, pixels, sizes = batched[0]
        out[i] = model.get_input_embeddings(new_ids, pixels, sizes)[0]
    elif batched:
        _embed_together(model, batched, out)
    return out


def _embed_together(model: Model, batched: list, out: list) -> None:
    """Embed prompts whose new pictures all go through the tower in one call: the features
    (one row per image token, in order) are cut by each prompt's count of image tokens."""
    pixels = mx.concatenate([b[2] for b in batched])
    tiled = batched[0][3] is not None
    sizes = [s for b in batched for s in b[3]] if tiled else None
    features = None
    if model.vision_tower is not None:  # (a pipeline rank without the tower: see `pipeline`)
        features = model.get_image_features(pixels, sizes)
        features = features.reshape(-1, features.shape[-1])
    image_token = model.config.image_token_index
    offset = 0
    for i, new_ids, _, _ in batched:
        count = np.asarray(new_ids).tolist()[0].count(image_token)
        embeddings = model.get_input_embeddings(new_ids)
        if features is not None:
            mask = new_ids == image_token
            own = features[offset : offset + count]
            embeddings = merge_image_features(embeddings, own, mask)
        offset += count
        out[i] = embeddings[0]


@dataclass
class PreparedPrompt:
    """What generation feeds the model for one prompt.

    Attributes:
        input_ids: token ids [L] of the whole prompt (each `<image>` expanded).
        embeddings: [L - start, D] of the positions after the cached prefix.
        keys: one key per position of the whole prompt (see `position_keys`; without a
            prompt cache, simply the token ids).
        start: positions already in the prompt cache (0 without one).
    """

    input_ids: mx.array
    embeddings: mx.array
    keys: list
    start: int = 0


def prepare_prompt(
    model: Model,
    processor: Processor,
    prompt: str,
    images: Sequence[ImageInput],
    prompt_cache: Optional[PromptCache] = None,
    video: Optional[VideoInput] = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> PreparedPrompt:
    """Tokenize, preprocess, rewind `prompt_cache` to the longest prefix it holds (at least
    one position short of the whole prompt: its logits are needed) and embed the rest."""
    if video is not None or (model.config.model_type == "llava_onevision" and len(images) > 1):
        return _prepare_media_prompt(
            model, processor, prompt, images, prompt_cache, video, num_frames
        )
    preprocessed = None if prompt_cache is None else prompt_cache.preprocessed(images, processor)
    input_ids, pixel_values, keys, image_sizes = encode_prompt(
        model, processor, prompt, images, preprocessed, keyed=prompt_cache is not None
    )
    start = 0
    if prompt_cache is not None:
        start = min(prompt_cache.reusable(keys), len(keys) - 1)
        prompt_cache.rewind(start)
    embeddings = prompt_embeddings(model, input_ids, pixel_values, start, image_sizes)
    return PreparedPrompt(input_ids[0], embeddings, keys, start)


def _prepare_media_prompt(
    model: Model,
    processor: Processor,
    prompt: str,
    images: Sequence[ImageInput],
    prompt_cache: Optional[PromptCache],
    video: Optional[VideoInput],
    num_frames: int,
) -> PreparedPrompt:
    """`prepare_prompt` for a prompt with a video, or with several OneVision pictures (each
    seen whole): the processor's inputs as the model takes them. Picture and video positions
    are keyed by one digest of all the prompt's pixels, so that a changed picture or video is
    computed again from the first of them; a cached prefix that holds them all is reused."""
    videos = None if video is None else [video]
    inputs = processor(prompt, list(images) or None, videos=videos, num_frames=num_frames)
    input_ids = inputs["input_ids"]
    context_room(model, input_ids.shape[1])
    config = model.config
    ids = np.asarray(input_ids[0])
    media = (ids == config.image_token_index) | (ids == config.video_token_index)
    keys = ids.tolist()
    start = 0
    if prompt_cache is not None:
        pixels = [inputs.get(k) for k in ("pixel_values", "pixel_values_videos")]
        digest = hashlib.sha1(b"".join(np.array(p).tobytes() for p in pixels if p is not None))
        for k, i in enumerate(np.flatnonzero(media).tolist()):
            keys[i] = (digest.hexdigest(), k)
        start = min(prompt_cache.reusable(keys), len(keys) - 1)  # logits need a new position
        prompt_cache.rewind(start)
    if media[start:].any():
        embeddings = model.get_input_embeddings(
            input_ids,
            inputs["pixel_values"],
            inputs["image_sizes"],
            inputs.get("pixel_values_videos"),
            inputs.get("batch_num_images"),
        )[0, start:]
    else:  # the pictures and the video are in the cached prefix: text only
        embeddings = model.get_input_embeddings(input_ids[:, start:])[0]
    return PreparedPrompt(input_ids[0], embeddings, keys, start)
