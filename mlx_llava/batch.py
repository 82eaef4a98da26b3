"""Batched generation: several prompts (and their pictures) answered together.

The prompts are left-padded to one length and share one forward pass per step. mlx-lm's
`BatchKVCache(left_padding=...)` gives each row its own RoPE offset (the first real token of
every row is position 0) and masks the padding, so each row computes what it would alone; a row
leaves the batch at its EOS, stop string or `max_tokens`, as in mlx-lm's `BatchGenerator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import wired_limit
from mlx_lm.models.cache import BatchKVCache

from .generate import LastPositionLM, StopMatcher, context_room, make_sampling
from .model import Model
from .processor import IMAGE_PLACEHOLDER, ImageInput, Processor

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


@dataclass
class BatchResult:
    """One prompt's answer from `batch_generate(..., return_results=True)`.

    Attributes:
        text: the answer, as `generate` returns it.
        tokens: the generated token ids, as `stream_generate` yields them (the last one is the
            EOS or the token that completed a stop string when the answer ended there).
        prompt_tokens: tokens in the prompt, image tokens included (padding excluded).
        finish_reason: "stop" (EOS or a stop string) or "length" (`max_tokens`).
    """

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: Optional[str] = None


class _Row:
    """The answer of one row as `stream_generate` builds it: EOS ends it without text, ids of
    the padded vocabulary have no text, stop strings cut it."""

    def __init__(self, processor: Processor, stop: Sequence[str], max_tokens: int, prompt: int):
        tokenizer = processor.tokenizer
        self.eos = tokenizer.eos_token_ids
        self.known_tokens = len(tokenizer)
        self.detokenizer = tokenizer.detokenizer
        self.stops = StopMatcher(stop)
        self.max_tokens = max_tokens
        self.result = BatchResult(prompt_tokens=prompt)

    def add(self, token: int) -> bool:
        """Take the next token; True when the row is finished."""
        self.result.tokens.append(token)
        if token in self.eos:
            return self._finish("stop")
        if token < self.known_tokens:
            self.detokenizer.add_token(token)
        if len(self.result.tokens) == self.max_tokens:
            return self._finish("length")
        text, hit = self.stops.feed(self.detokenizer.last_segment)
        self.result.text += text
        if hit:
            self.result.finish_reason = "stop"
        return hit

    def _finish(self, reason: str) -> bool:
        self.detokenizer.finalize()
        text, hit = self.stops.feed(self.detokenizer.last_segment, final=True)
        self.result.text += text
        self.result.finish_reason = "stop" if hit else reason
        return True


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
    prefill_step_size: int = 2048,
    kv_bits: Optional[int] = None,
    return_results: bool = False,
) -> Union[list[str], list[BatchResult]]:
    """Answer several prompts together; greedy answers equal `generate`'s one by one.

    Args:
        prompts: full prompts, taken verbatim (see `Processor.format_prompt`), any lengths.
        images: one entry per prompt: None (text only), a picture, or a list of pictures in
            the order of that prompt's `<image>` placeholders.
        max_tokens: the most tokens to generate per prompt (> 0).
        temperature, top_p, min_p, top_k, repetition_penalty, repetition_context_size, seed,
            stop: as for `stream_generate`; the sampler draws all rows at once.
        prefill_step_size: prompt positions per prefill chunk.
        kv_bits: not supported (a batched KV cache is not quantized); must be None.
        return_results: return a `BatchResult` per prompt (text, token ids, prompt size,
            finish reason) instead of the text alone.

    Returns:
        The answers (or their `BatchResult`s), in prompt order.

    Raises:
        ValueError: a prompt's placeholders differ from its pictures, a prompt exceeds the
            model's context, or `max_tokens` is not positive.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if kv_bits is not None:
        raise ValueError("batched generation does not quantize the KV cache: leave kv_bits unset")
    prompts = list(prompts)
    if not prompts:
        return []
    per_prompt = _images_per_prompt(prompts, images)
    flat_images = [img for entry in per_prompt for img in entry]
    if seed is not None:
        mx.random.seed(seed)

    inputs = processor(prompts, flat_images or None)
    input_ids, pixel_values = inputs["input_ids"], inputs["pixel_values"]
    lengths = inputs["attention_mask"].sum(axis=1).tolist()
    for i, n in enumerate(lengths):
        context_room(model, n, f"prompt {i}")
    width = input_ids.shape[1]
    left_padding = [width - n for n in lengths]
    embeddings = model.get_input_embeddings(input_ids, pixel_values)

    sampler, processors = make_sampling(
        temperature, top_p, min_p, top_k, repetition_penalty, repetition_context_size
    )
    # As in `stream_generate`, logits processors see the prompt with image ids zeroed.
    history = mx.where(input_ids == model.config.image_token_index, 0, input_ids)
    contexts = [history[i, p:] for i, p in enumerate(left_padding)] if processors else []

    lm = LastPositionLM(model)
    cache = [BatchKVCache(left_padding) for _ in model.layers]
    active = list(range(len(prompts)))

    def sample(logits: mx.array, tokens: Optional[mx.array]) -> mx.array:
        """Logits [b, 1, V] -> next tokens [b]; `tokens` [b] were just fed (None at prefill)."""
        logits = logits[:, -1, :]
        if processors:
            rows = []
            for pos, row in enumerate(active):
                if tokens is not None:
                    contexts[row] = mx.concatenate([contexts[row], tokens[pos : pos + 1]])
                row_logits = logits[pos : pos + 1]
                for processor_fn in processors:
                    row_logits = processor_fn(contexts[row], row_logits)
                rows.append(row_logits)
            logits = mx.concatenate(rows, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs)

    rows = [_Row(processor, stop or [], max_tokens, n) for n in lengths]
    with wired_limit(model):
        # Prefill all but the last position in chunks, then read logits at the last one, as
        # mlx-lm's `generate_step` does for a single prompt.
        start = 0
        while width - start > 1:
            end = min(start + prefill_step_size, width - 1)
            model.language_model.model(
                input_ids[:, start:end], cache, input_embeddings=embeddings[:, start:end]
            )
            mx.eval([c.state for c in cache])
            start = end
        y = sample(lm(input_ids[:, -1:], cache, input_embeddings=embeddings[:, -1:]), None)
        mx.async_eval(y)

        step = 0
        while active:
            step += 1
            next_y = None
            if step < max_tokens:
                next_y = sample(lm(y[:, None], cache), y)
                mx.async_eval(next_y)
            tokens = y.tolist()
            keep = [pos for pos, row in enumerate(active) if not rows[row].add(tokens[pos])]
            if len(keep) < len(active):
                active = [active[pos] for pos in keep]
                if active and next_y is not None:
                    for c in cache:
                        c.filter(keep)
                    next_y = next_y[mx.array(keep)]
            y = next_y
    if return_results:
        return [row.result for row in rows]
    return [row.result.text for row in rows]
