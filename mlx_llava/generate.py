"""Text generation: prompt + pictures -> streamed answer.

`stream_generate` prepares the prompt (`prompt.prepare_prompt`: tokens, pictures, the cached
prefix, embeddings with the image features spliced in) and decodes it with the one decoding
core (`decoding.make_row` + a solo `BatchEngine`), in the caller's `PromptCache` when given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Generator, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import wired_limit

from .decoding import BatchEngine, TokenLogprob, kv_quantization, make_row
from .model import Model
from .processor import ImageInput, Processor
from .prompt import PromptCache, image_list, prepare_prompt
from .sampling import ResponseFormat, SamplingParams, sampling_of
from .video_io import DEFAULT_NUM_FRAMES, VideoInput


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
        logprobs: with `logprobs` asked for, the token's log-probability and the top
            alternatives (None for the EOS).
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
    logprobs: Optional[TokenLogprob] = None


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
    json_schema: Optional[Union[dict, str]] = None,
    response_format: Optional[ResponseFormat] = None,
    logprobs: Optional[int] = None,
    prompt_cache: Optional[PromptCache] = None,
    prefill_step_size: int = 2048,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    sampling: Optional[SamplingParams] = None,
    video: Optional[VideoInput] = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> Generator[GenerationResponse, None, None]:
    """Generate an answer for a prompt taken verbatim (see `Processor.format_prompt`).

    Args:
        prompt: the full prompt, one `<image>` placeholder per picture.
        image / images: one picture, or several in placeholder order (PIL image, path or URL).
        max_tokens, temperature, top_p, min_p, top_k, repetition_penalty,
            repetition_context_size, seed, stop: how to answer (see `SamplingParams`; the
            logits processors see the whole prompt, cached part included).
        json_schema: answer JSON that validates against this JSON schema (a dict or JSON
            text; needs llguidance); `response_format`: a `ResponseFormat` instead.
        logprobs: give each token's log-probability and this many top alternatives (0-20).
        prompt_cache: a `PromptCache` kept across calls: the part of the prompt it already holds
            is not computed again.
        prefill_step_size: prompt tokens per prefill chunk.
        kv_bits, kv_group_size, quantized_kv_start: quantize the KV cache as mlx-lm does
            (`kv_group_size` falls back to 32 for heads that 64 does not divide).
        sampling: a `SamplingParams` instead of the keyword settings above.
        video: OneVision / NeXT-Video: a video for the prompt's `<video>` (a file, of which
            `num_frames` frames are read, uint8 frames [T, H, W, 3] or a list of pictures).

    Yields:
        GenerationResponse for each new token; the last one has `finish_reason` set.

    Raises:
        ValueError: a sampling setting out of range (`SamplingError`), placeholders and
            pictures that differ, a prompt longer than the context, an unusable `kv_bits`.
    """
    params = sampling_of(
        sampling,
        json_schema,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        min_p=min_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
        seed=seed,
        stop=stop,
        response_format=response_format,
        logprobs=logprobs,
    )
    quantization = kv_quantization(model, kv_bits, kv_group_size, quantized_kv_start)
    if params.seed is not None:
        mx.random.seed(params.seed)
    tic = time.perf_counter()
    images = image_list(image, images)
    prepared = prepare_prompt(model, processor, prompt, images, prompt_cache, video, num_frames)
    row = make_row(model, processor, prepared.input_ids, params)
    engine = BatchEngine(model, prefill_step_size, solo=True, kv_quantization=quantization)
    engine.add(row, prepared.embeddings, None if prompt_cache is None else prompt_cache.cache)
    prompt_tokens = len(prepared.keys)
    ttft, decode_tic = 0.0, tic
    try:
        # As mlx-lm: the wired limit is restored only after the queued work.
        with wired_limit(model):
            while engine:
                if not engine.step():  # the first token is read a step ahead
                    continue
                n = len(row.tokens)
                if n == 1:
                    ttft = time.perf_counter() - tic
                    decode_tic = time.perf_counter()
                yield _response(row, n, prompt_tokens, ttft, decode_tic)
    finally:
        engine.finish()
        if prompt_cache is not None:
            mx.eval([c.state for c in prompt_cache.cache])
            # The cache holds the prompt and the generated tokens fed back, or less if the
            # prefill was interrupted.
            prompt_cache.keys = (prepared.keys + row.tokens)[: prompt_cache.length]


def _response(row, n, prompt_tokens, ttft, decode_tic) -> GenerationResponse:
    elapsed = max(time.perf_counter() - decode_tic, 1e-9)
    return GenerationResponse(
        text=row.segment,
        token=int(row.tokens[-1]),
        prompt_tokens=prompt_tokens,
        prompt_tps=prompt_tokens / max(ttft, 1e-9),
        time_to_first_token=ttft,
        generation_tokens=n,
        generation_tps=max(n - 1, 0) / elapsed,
        peak_memory=mx.get_peak_memory() / 1e9,
        finish_reason=row.finish_reason,
        logprobs=row.logprobs[-1] if row.logprobs and row.tokens[-1] not in row.eos else None,
    )


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
