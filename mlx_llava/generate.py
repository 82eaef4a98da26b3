"""Text generation: prompt + pictures -> streamed answer, on mlx-lm's decoding loop.

The prompt's embeddings (image features spliced in) are handed to mlx-lm's `generate_step`,
which prefills in chunks, keeps the KV cache, samples and pipelines decoding with
`mx.async_eval`. Our adapter computes the lm_head only at the last position, the one read.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Generator, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step, generation_stream, wired_limit
from mlx_lm.models.cache import trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .model import Model
from .processor import ImageInput, Processor


@dataclass
class GenerationResponse:
    """One step of `stream_generate`.

    Attributes:
        text: the new text segment (may be empty while a multi-byte character is incomplete).
        token: the token id generated at this step.
        prompt_tokens: tokens in the prompt, image tokens included.
        prompt_tps: prompt tokens per second (prefill, image encoding included).
        time_to_first_token: seconds from the call to the first token.
        generation_tokens: tokens generated so far.
        generation_tps: decoding speed, tokens per second.
        peak_memory: peak memory so far, in GB.
        finish_reason: None while generating, then "stop" or "length".
    """

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    time_to_first_token: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None


class LastPositionLM:
    """The language model as mlx-lm's `generate_step` calls it, with logits only at the last
    position: `generate_step` reads nothing else, and the lm_head is the widest matmul.
    """

    def __init__(self, model: Model):
        self.model = model

    @property
    def layers(self):
        return self.model.layers

    def __call__(
        self, inputs: mx.array, cache: Optional[list] = None, input_embeddings=None
    ) -> mx.array:
        hidden = self.model.language_model.model(inputs, cache, input_embeddings)
        return self.model.lm_head(hidden[:, -1:])


def make_sampling(
    temperature: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    top_k: int = 0,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
) -> tuple[Any, list]:
    """mlx-lm's sampler and logits processors for these settings (temperature 0 = greedy)."""
    sampler = make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
    )
    return sampler, processors


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


def picture_digests(pixel_values: np.ndarray, tiles: Optional[Sequence[int]] = None) -> list[str]:
    """A digest of each preprocessed picture [n, H, W, 3] (LLaVA-NeXT: of each picture's
    `tiles` consecutive rows): its identity in prompt caches."""
    tiles = [1] * len(pixel_values) if tiles is None else tiles
    starts = np.cumsum([0, *tiles]).tolist()
    return [
        hashlib.sha1(np.ascontiguousarray(pixel_values[a:b]).tobytes()).hexdigest()
        for a, b in zip(starts, starts[1:])
    ]


def preprocess_pictures(
    processor: Processor, images: Sequence[ImageInput]
) -> tuple[Optional[mx.array], list[str], Optional[list]]:
    """Pixel values [n, H, W, 3] (None without pictures; LLaVA-NeXT: every picture's tiles),
    the pictures' digests, and their (height, width) where the model needs them (LLaVA-NeXT;
    else None)."""
    if not images:
        return None, [], None
    pixels, sizes = processor.image_processor.preprocess(list(images))
    tiles = None if sizes is None else [processor.config.image_tiles(s) for s in sizes]
    return mx.array(pixels), picture_digests(pixels, tiles), sizes


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
        self._pictures: tuple = ()
        self._preprocessed: tuple = (None, [], None)

    def pictures(
        self, images: Sequence[ImageInput], processor: Processor
    ) -> tuple[Optional[mx.array], list[str], Optional[list]]:
        """`preprocess_pictures` of `images`: pixel values, digests and image sizes."""
        same = len(images) == len(self._pictures)
        if not (same and all(a is b for a, b in zip(images, self._pictures))):
            self._preprocessed = preprocess_pictures(processor, images)
            self._pictures = tuple(images)
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


def position_keys(input_ids: np.ndarray, digests: Sequence[str], image_token: int) -> list:
    """One hashable key per position of a single prompt: the token id, or (picture digest, k)
    for the k-th token of a picture. Pictures are told apart by their runs of image tokens;
    when placeholders touch (fewer runs than pictures) every image position is keyed by all the
    prompt's digests instead."""
    keys = np.asarray(input_ids).tolist()
    if not digests:
        return keys
    runs = image_runs(keys, image_token)
    if len(runs) == len(digests):
        for (start, end), digest in zip(runs, digests):
            keys[start:end] = [(digest, k) for k in range(end - start)]
        return keys
    whole = tuple(digests)
    image_positions = [i for start, end in runs for i in range(start, end)]
    for k, i in enumerate(image_positions):
        keys[i] = (whole, k)
    return keys


def encode_prompt(
    model: Model,
    processor: Processor,
    prompt: str,
    images: Sequence[ImageInput],
    pictures: Optional[tuple[Optional[mx.array], list[str], Optional[list]]] = None,
    keyed: bool = True,
) -> tuple[mx.array, Optional[mx.array], list, Optional[list]]:
    """Tokenize a prompt and preprocess its pictures.

    Args:
        pictures: `(pixel_values, digests, image_sizes)` of `images` already computed (see
            `preprocess_pictures`), or None to compute them here.
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
    if pictures is None and keyed:
        pictures = preprocess_pictures(processor, images)
    pixel_values, digests, sizes = pictures if pictures is not None else (None, [], None)
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
    new_ids = input_ids[:, start:]
    image_token = model.config.image_token_index
    if pixel_values is None or not bool((new_ids == image_token).any()):
        return model.get_input_embeddings(new_ids)[0]
    runs = image_runs(np.asarray(input_ids[0]).tolist(), image_token)
    pictures = pixel_values.shape[0] if image_sizes is None else len(image_sizes)
    if len(runs) == pictures and not any(s < start < e for s, e in runs):
        first = sum(e <= start for _, e in runs)  # pictures wholly before `start`
        if image_sizes is not None:  # LLaVA-NeXT: the first pictures' tiles
            tiles = sum(model.config.image_tiles(s) for s in image_sizes[:first])
            pixels, sizes = pixel_values[tiles:], image_sizes[first:]
        else:
            pixels, sizes = pixel_values[first:], None
        return model.get_input_embeddings(new_ids, pixels, sizes)[0]
    return model.get_input_embeddings(input_ids, pixel_values, image_sizes)[0, start:]


def prepare_prompt(
    model: Model,
    processor: Processor,
    prompt: str,
    images: Sequence[ImageInput],
    prompt_cache: Optional[PromptCache] = None,
) -> tuple[mx.array, mx.array, list]:
    """What generation feeds the model after the cached prefix.

    Returns:
        token ids [L'] of the uncached positions (image ids zeroed, for logits processors),
        their embeddings [L', D], and the keys of the whole prompt (see `position_keys`;
        without a `prompt_cache`, simply the token ids).
    """
    pictures = None if prompt_cache is None else prompt_cache.pictures(images, processor)
    input_ids, pixel_values, keys, image_sizes = encode_prompt(
        model, processor, prompt, images, pictures, keyed=prompt_cache is not None
    )
    start = 0
    if prompt_cache is not None:
        start = min(prompt_cache.reusable(keys), len(keys) - 1)  # logits need a new position
        prompt_cache.rewind(start)
    embeddings = prompt_embeddings(model, input_ids, pixel_values, start, image_sizes)
    new_ids = input_ids[0, start:]
    return mx.where(new_ids == model.config.image_token_index, 0, new_ids), embeddings, keys


def stream_generate(
    model: Model,
    processor: Processor,
    prompt: str,
    image: Optional[ImageInput] = None,
    images: Optional[Sequence[ImageInput]] = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    top_k: int = 0,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
    seed: Optional[int] = None,
    stop: Optional[Sequence[str]] = None,
    prompt_cache: Optional[PromptCache] = None,
    prefill_step_size: int = 2048,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
) -> Generator[GenerationResponse, None, None]:
    """Generate an answer for a prompt taken verbatim (see `Processor.format_prompt`).

    Args:
        prompt: the full prompt, one `<image>` placeholder per picture.
        image / images: one picture, or several in placeholder order (PIL image, path or URL).
        max_tokens: the most tokens to generate (> 0).
        temperature, top_p, min_p, top_k: sampling (temperature 0 is greedy).
        repetition_penalty, repetition_context_size: mlx-lm's repetition penalty.
        seed: seed MLX's random generator first, for reproducible sampling.
        stop: strings that end the answer (not included in it).
        prompt_cache: a `PromptCache` kept across calls: the part of the prompt it already holds
            is not computed again.
        prefill_step_size: prompt tokens per prefill chunk.
        kv_bits, kv_group_size, quantized_kv_start: quantize the KV cache as mlx-lm does.

    Yields:
        GenerationResponse for each new token; the last one has `finish_reason` set.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if seed is not None:
        mx.random.seed(seed)
    tic = time.perf_counter()
    history, embeddings, keys = prepare_prompt(
        model, processor, prompt, image_list(image, images), prompt_cache
    )
    sampler, processors = make_sampling(
        temperature, top_p, min_p, top_k, repetition_penalty, repetition_context_size
    )
    tokenizer = processor.tokenizer
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    steps = generate_step(
        history,
        LastPositionLM(model),
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors,
        prompt_cache=None if prompt_cache is None else prompt_cache.cache,
        prefill_step_size=prefill_step_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
        input_embeddings=embeddings,
    )
    stops = StopMatcher([*(stop or []), *processor.stop])
    known_tokens = len(tokenizer)
    prompt_tokens = len(keys)
    generated: list[int] = []
    try:
        # As mlx-lm: the wired limit is restored only after the generation stream's queued work.
        with wired_limit(model, [generation_stream]):
            n, finish, hit, ttft, decode_tic = 0, "length", False, 0.0, tic
            for n, (token, _) in enumerate(steps, start=1):
                generated.append(token)
                if n == 1:
                    ttft = time.perf_counter() - tic
                    decode_tic = time.perf_counter()
                if token in tokenizer.eos_token_ids:
                    finish = "stop"
                    break
                if token < known_tokens:  # ids of the padded vocabulary have no text
                    detokenizer.add_token(token)
                if n == max_tokens:
                    break
                text, hit = stops.feed(detokenizer.last_segment)
                if hit:
                    finish = "stop"
                    break
                yield _response(text, token, n, prompt_tokens, ttft, decode_tic)
            text = text if hit else ""  # with a stop string: the text before it
            if not hit:
                detokenizer.finalize()
                text, hit = stops.feed(detokenizer.last_segment, final=True)
                finish = "stop" if hit else finish
            yield _response(text, token, n, prompt_tokens, ttft, decode_tic, finish)
    finally:
        steps.close()
        # mlx-lm's loop queues a step ahead: let it finish, so that nothing of this answer is
        # still running (nor, split across ranks, still talking to them) when the caller goes on.
        mx.synchronize(generation_stream)
        if prompt_cache is not None:
            mx.eval([c.state for c in prompt_cache.cache])
            # The cache holds the prompt and the generated tokens fed back, or less if the
            # prefill was interrupted.
            prompt_cache.keys = (keys + generated)[: prompt_cache.length]


def _response(text, token, n, prompt_tokens, ttft, decode_tic, finish=None) -> GenerationResponse:
    elapsed = max(time.perf_counter() - decode_tic, 1e-9)
    return GenerationResponse(
        text=text,
        token=int(token),
        prompt_tokens=prompt_tokens,
        prompt_tps=prompt_tokens / max(ttft, 1e-9),
        time_to_first_token=ttft,
        generation_tokens=n,
        generation_tps=max(n - 1, 0) / elapsed,
        peak_memory=mx.get_peak_memory() / 1e9,
        finish_reason=finish,
    )


class StopMatcher:
    """Holds back text that could be the start of a stop string; cuts at the first match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, segment: str, final: bool = False) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was found."""
        self.pending += segment
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        cut = min(
            (i for i in (self.pending.find(s) for s in self.stops) if i >= 0),
            default=-1,
        )
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        if final:
            out, self.pending = self.pending, ""
            return out, False
        keep = max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])),
            default=0,
        )
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out, False


def generate(
    model: Model,
    processor: Processor,
    prompt: str,
    image: Optional[ImageInput] = None,
    images: Optional[Sequence[ImageInput]] = None,
    verbose: bool = False,
    **kwargs,
) -> str:
    """The whole answer as a string; keyword arguments as for `stream_generate`."""
    text = ""
    for response in stream_generate(model, processor, prompt, image, images, **kwargs):
        text += response.text
        if verbose:
            print(response.text, end="", flush=True)
    if verbose:
        print()
    return text
