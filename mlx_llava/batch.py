"""Batched generation: several prompts (and their pictures and videos) answered together.

`batch_generate` encodes every prompt's pictures in one vision pass and decodes all rows with
the one decoding core (`decoding.make_row` + `BatchEngine`, as the server's continuous
batching does): prompts of any length are prefilled together, right-padded, and each row
computes what it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import wired_limit

from .decoding import BatchEngine, make_row
from .model import Model
from .processor import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, ImageInput, Processor
from .prompt import context_room
from .sampling import ResponseFormat, SamplingParams, sampling_of
from .video_io import DEFAULT_NUM_FRAMES, VideoInput

PromptImages = Optional[Union[ImageInput, Sequence[ImageInput]]]


def _images_per_prompt(
    prompts: Sequence[str], images: Optional[Sequence[PromptImages]]
) -> list[list[ImageInput]]:
    """One list of pictures per prompt, checked against its `<image>` placeholders."""
    if images is None:
        images = [None] * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(
            f"images must hold one entry per prompt: {len(prompts)} prompt(s), "
            f"{len(images)} entries"
        )
    out = []
    for i, (prompt, entry) in enumerate(zip(prompts, images)):
        if entry is None:
            entry = []
        elif not isinstance(entry, (list, tuple)):
            entry = [entry]
        found = prompt.count(IMAGE_PLACEHOLDER)
        if found != len(entry):
            raise ValueError(
                f"prompt {i} has {found} <image> placeholder(s) but {len(entry)} image(s) "
                "were given for it"
            )
        out.append(list(entry))
    return out


def _videos_of(
    prompts: Sequence[str], videos: Optional[Sequence[Optional[VideoInput]]]
) -> list[VideoInput]:
    """The prompts' videos in order (one entry per prompt, None for none), checked against
    each prompt's `<video>`."""
    if videos is None:
        return []
    if len(videos) != len(prompts):
        raise ValueError(
            f"videos must hold one entry per prompt: {len(prompts)} prompt(s), "
            f"{len(videos)} entries"
        )
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        found, given = prompt.count(VIDEO_PLACEHOLDER), int(video is not None)
        if found != given:
            raise ValueError(
                f"prompt {i} has {found} <video> placeholder(s) but {given} video(s) were given "
                "for it"
            )
    return [v for v in videos if v is not None]


@dataclass
class BatchResult:
    """One prompt's answer from `batch_generate(..., return_results=True)`.

    Attributes:
        text: the answer, as `generate` returns it.
        tokens: the generated token ids, as `stream_generate` yields them (the last one is the
            EOS or the token that completed a stop string when the answer ended there).
        prompt_tokens: tokens in the prompt, image tokens included (padding excluded).
        finish_reason: "stop" (EOS or a stop string) or "length" (`max_tokens`).
        logprobs: with `logprobs` asked for, a `TokenLogprob` per token but the EOS.
    """

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: Optional[str] = None
    logprobs: list = field(default_factory=list)


def batch_generate(
    model: Model,
    processor: Processor,
    prompts: Sequence[str],
    images: Optional[Sequence[PromptImages]] = None,
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
    prefill_step_size: int = 2048,
    kv_bits: Optional[int] = None,
    return_results: bool = False,
    sampling: Optional[SamplingParams] = None,
    videos: Optional[Sequence[Optional[VideoInput]]] = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> Union[list[str], list[BatchResult]]:
    """Answer several prompts together; greedy answers equal `generate`'s one by one.

    Args:
        prompts: full prompts, taken verbatim (see `Processor.format_prompt`), any lengths.
        images: one entry per prompt: None (text only), a picture, or a list of pictures in
            the order of that prompt's `<image>` placeholders.
        max_tokens: the most tokens to generate per prompt (> 0).
        temperature, top_p, min_p, top_k, repetition_penalty, repetition_context_size, seed,
            stop, json_schema, response_format, logprobs: as for `stream_generate`; the
            sampler draws all rows at once.
        prefill_step_size: prompt positions per prefill chunk.
        kv_bits: not supported (a batched KV cache is not quantized); must be None.
        return_results: return a `BatchResult` per prompt (text, token ids, prompt size,
            finish reason) instead of the text alone.
        sampling: a `SamplingParams` instead of the keyword settings.
        videos: OneVision / NeXT-Video: one entry per prompt, None or the video of its
            `<video>` (as for `generate`; videos of different lengths may share a batch).
        num_frames: frames read from each video file.

    Returns:
        The answers (or their `BatchResult`s), in prompt order.

    Raises:
        ValueError: a prompt's placeholders differ from its pictures or video, a prompt exceeds
            the model's context, or `max_tokens` is not positive.
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
    if kv_bits is not None:
        raise ValueError("batched generation does not quantize the KV cache: leave kv_bits unset")
    prompts = list(prompts)
    if not prompts:
        return []
    per_prompt = _images_per_prompt(prompts, images)
    flat_images = [img for entry in per_prompt for img in entry]
    if params.seed is not None:
        mx.random.seed(params.seed)

    inputs = processor(
        prompts, flat_images or None, videos=_videos_of(prompts, videos), num_frames=num_frames
    )
    input_ids, pixel_values = inputs["input_ids"], inputs["pixel_values"]
    lengths = inputs["attention_mask"].sum(axis=1).tolist()
    for i, n in enumerate(lengths):
        context_room(model, n, f"prompt {i}")
    width = input_ids.shape[1]
    # One vision pass for every picture of the batch, one for every video.
    embeddings = model.get_input_embeddings(
        input_ids,
        pixel_values,
        inputs["image_sizes"],
        inputs.get("pixel_values_videos"),
        inputs.get("batch_num_images"),
    )
    engine = BatchEngine(model, prefill_step_size)
    rows = []
    for i, n in enumerate(lengths):
        row = make_row(model, processor, input_ids[i, width - n :], params)
        engine.add(row, embeddings[i, width - n :])
        rows.append(row)
    with wired_limit(model):
        while engine:
            engine.step()
    engine.finish()
    if not return_results:
        return [row.text for row in rows]
    return [
        BatchResult(row.text, row.tokens, n, row.finish_reason, row.logprobs)
        for row, n in zip(rows, lengths)
    ]
