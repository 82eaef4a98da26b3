"""Batched generation: several prompts (and their pictures) answered together.

`BatchEngine` is the one decoding loop for many prompts, used by one-shot `batch_generate` and
by the server's continuous batching: rows join between decoding steps and leave at their EOS,
stop string or `max_tokens`, as in mlx-lm's `BatchGenerator`. A joining row brings its prompt's
embeddings (image features spliced in) and, optionally, the KV cache of a prefix it shares with
an earlier prompt; its uncached positions are prefilled right-padded into a new mlx-lm
`BatchKVCache`, which is then merged into the running batch (`extend`; leaving rows are dropped
with `filter`). `BatchKVCache` gives each row its own RoPE offset and masks the padding, so each
row computes what it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import wired_limit
from mlx_lm.models.cache import BatchKVCache, KVCache, TokenBuffer

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


class Row:
    """One prompt being answered in a `BatchEngine`.

    Its text is built as `stream_generate` builds it: EOS ends it without text, ids of the
    padded vocabulary have no text, stop strings cut it.

    Attributes:
        keys: the prompt's position keys (see `generate.position_keys`), for prompt caching.
        tokens: the tokens generated so far.
        text: the answer so far; `segment` is what the last token added to it.
        finish_reason: None while generating, then "stop" or "length".
        cache: when the engine keeps caches, the row's KV cache once it has left the batch (a
            list of mlx-lm `KVCache`, one per layer) and `cache_keys` the keys of its positions.
    """

    def __init__(
        self,
        processor: Processor,
        max_tokens: int,
        sampler: Callable[[mx.array], mx.array],
        logits_processors: Sequence[Callable] = (),
        stop: Sequence[str] = (),
        history: Optional[mx.array] = None,
        keys: Optional[list] = None,
    ):
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        tokenizer = processor.tokenizer
        self.eos = tokenizer.eos_token_ids
        self.known_tokens = len(tokenizer)
        self.detokenizer = tokenizer.detokenizer
        self.stops = StopMatcher([*stop, *processor.stop])  # the model's own stops too
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.logits_processors = list(logits_processors)
        # As in `stream_generate`, logits processors see the prompt (image ids zeroed).
        self.context = TokenBuffer(history if history is not None else [])
        self.keys = keys or []
        self.tokens: list[int] = []
        self.text = ""
        self.segment = ""
        self.finish_reason: Optional[str] = None
        self.cache: Optional[list[Any]] = None
        self.cache_keys: list = []
        self.read_ahead = False  # its token of the last step was handed over already

    def add(self, token: int) -> None:
        """Take the next token: sets `segment` and, when the row is done, `finish_reason`."""
        self.tokens.append(token)
        if token in self.eos:
            return self._finish("stop")
        if token < self.known_tokens:
            self.detokenizer.add_token(token)
        if len(self.tokens) == self.max_tokens:
            return self._finish("length")
        self.segment, hit = self.stops.feed(self.detokenizer.last_segment)
        self.text += self.segment
        if hit:
            self.finish_reason = "stop"

    def _finish(self, reason: str) -> None:
        self.detokenizer.finalize()
        self.segment, hit = self.stops.feed(self.detokenizer.last_segment, final=True)
        self.text += self.segment
        self.finish_reason = "stop" if hit else reason

    @property
    def last_token_known(self) -> bool:
        """True when the token now being computed will be the row's last by count."""
        return len(self.tokens) + 1 >= self.max_tokens


class BatchEngine:
    """Continuous batching over one model: `add` rows at any time, `step` decodes one token
    for every row in the batch.

    Each `step` first prefills the rows added since the last one (all but their last
    position, in chunks of `prefill_step_size`), merges them into the running batch, then runs
    one forward pass for the whole batch: the last prompt position of the new rows and the
    token sampled last step for the others. Decoding is pipelined as in mlx-lm: the tokens
    of step n are read while step n + 1 is computed.
    """

    def __init__(self, model: Model, prefill_step_size: int = 2048, keep_caches: bool = False):
        self.model = model
        self.lm = LastPositionLM(model)
        self.prefill_step_size = prefill_step_size
        self.keep_caches = keep_caches
        self.rows: list[Row] = []  # in the batch, in cache order
        self.cache: Optional[list[BatchKVCache]] = None
        self.y: Optional[mx.array] = None  # [len(rows)] sampled last step, not read yet
        self.waiting: list[tuple[Row, mx.array, Optional[list]]] = []

    def __len__(self) -> int:
        return len(self.rows) + len(self.waiting)

    def add(self, row: Row, embeddings: mx.array, cache: Optional[list] = None) -> None:
        """Queue a row to join the batch at the next step.

        Args:
            row: the row (its sampling, stop strings and history).
            embeddings: [L', D] of the prompt positions not in `cache` (L' >= 1).
            cache: per-layer mlx-lm `KVCache`s holding the prompt's first positions, or None.
        """
        if embeddings.shape[0] < 1:
            raise ValueError("a row needs at least one prompt position to compute")
        self.waiting.append((row, embeddings, cache))

    def remove(self, row: Row) -> None:
        """Take a row out (a cancelled request); its cache is kept in `row.cache` if wanted."""
        self.waiting = [w for w in self.waiting if w[0] is not row]
        if row in self.rows:
            self._drop([self.rows.index(row)])

    def step(self) -> list[Row]:
        """One decoding step. Returns the rows that got a token (read `segment` and
        `finish_reason`); finished rows have left the batch."""
        joining = self._prefill() if self.waiting else []
        read = [r for r in self.rows if not r.read_ahead]
        for r in self.rows:
            r.read_ahead = False
        if read and len(read) == len(self.rows) and not joining:
            if all(r.last_token_known for r in read):
                # Every row ends with the token being read: no need to compute another step.
                self._read(read, None)
                return read
        next_y = self._forward(joining)
        self._read(read, next_y)
        if joining:
            # The joining rows' first tokens now rather than a step later (that step may be
            # another request's prefill): their time to first token is their own prefill.
            first = next_y[len(self.rows) - len(joining) :].tolist()
            for (row, _), token in zip(joining, first):
                row.add(token)
                row.read_ahead = True
            read = read + [row for row, _ in joining]
        self.y = next_y
        done = [i for i, r in enumerate(self.rows) if r.finish_reason is not None]
        if done:
            self._drop(done)
        return read

    def _read(self, rows: list[Row], next_y: Optional[mx.array]) -> None:
        """Hand `rows` their token of the previous step (`self.y`, in batch order)."""
        if not rows:
            return
        tokens = self.y.tolist()
        position = {id(r): i for i, r in enumerate(self.rows)}
        for row in rows:
            row.add(tokens[position[id(row)]])
        if next_y is None:
            self.y = None
            self._drop([i for i, r in enumerate(self.rows) if r.finish_reason is not None])

    def _prefill(self) -> list[tuple[Row, mx.array]]:
        """Compute the waiting rows' positions but their last into a new batch cache, merged
        into the running one; return (row, last position embedding [1, D]) for each."""
        waiting, self.waiting = self.waiting, []
        layers = len(self.model.layers)
        caches = [c if c is not None else [KVCache() for _ in range(layers)] for _, _, c in waiting]
        cache = [BatchKVCache.merge([c[i] for c in caches]) for i in range(layers)]
        heads = [e[:-1] for _, e, _ in waiting]
        width = max(h.shape[0] for h in heads)
        if width > 0:
            padding = [width - h.shape[0] for h in heads]
            x = mx.stack([mx.pad(h, [(0, p), (0, 0)]) for h, p in zip(heads, padding)])
            for c in cache:
                c.prepare(right_padding=padding)
            for start in range(0, width, self.prefill_step_size):
                chunk = x[:, start : start + self.prefill_step_size]
                self.model.language_model.model(None, cache, input_embeddings=chunk)
                mx.eval([c.state for c in cache])
            for c in cache:  # the right padding becomes left padding
                c.finalize()
            mx.eval([c.state for c in cache])
            mx.clear_cache()
        if self.cache is None:
            self.cache = cache
        else:
            for mine, theirs in zip(self.cache, cache):
                mine.extend(theirs)
        return [(row, e[-1:]) for row, e, _ in waiting]

    def _forward(self, joining: list[tuple[Row, mx.array]]) -> mx.array:
        """One step for every row (the read rows first, then the joining ones): next tokens."""
        inputs, fed = [], None
        if self.rows:
            fed = self.y
            inputs.append(self.model.language_model.model.embed_tokens(fed)[:, None])
        if joining:
            inputs.append(mx.stack([e for _, e in joining]))
            self.rows = self.rows + [row for row, _ in joining]
        x = inputs[0] if len(inputs) == 1 else mx.concatenate(inputs)
        logits = self.lm(None, self.cache, input_embeddings=x)[:, -1]
        next_y = self._sample(logits, fed)
        mx.async_eval(next_y)
        return next_y

    def _sample(self, logits: mx.array, fed: Optional[mx.array]) -> mx.array:
        """Logits [B, V] -> tokens [B]; `fed` [b] are the tokens just fed for the first b rows."""
        if any(r.logits_processors for r in self.rows):
            rows = []
            for i, r in enumerate(self.rows):
                row_logits = logits[i : i + 1]
                if r.logits_processors:
                    if fed is not None and i < fed.shape[0]:
                        context = r.context.update_and_fetch(fed[i : i + 1])
                    else:
                        context = r.context.tokens
                    for processor_fn in r.logits_processors:
                        row_logits = processor_fn(context, row_logits)
                rows.append(row_logits)
            logits = mx.concatenate(rows, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampler = self.rows[0].sampler
        if all(r.sampler is sampler for r in self.rows):
            return sampler(logprobs)  # one call draws for the whole batch
        return mx.concatenate([r.sampler(logprobs[i : i + 1]) for i, r in enumerate(self.rows)])

    def _drop(self, indices: list[int]) -> None:
        """Take rows out of the batch (their caches kept first, if wanted)."""
        if self.keep_caches:
            for i in indices:
                row = self.rows[i]
                row.cache = [c.extract(i) for c in self.cache]
                row.cache_keys = (row.keys + row.tokens)[: row.cache[0].offset]
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.y = None, None
            return
        for c in self.cache:
            c.filter(keep)
        if self.y is not None:
            self.y = self.y[mx.array(keep)]


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
    # One vision pass for every picture of the batch.
    embeddings = model.get_input_embeddings(input_ids, pixel_values, inputs["image_sizes"])
    history = mx.where(input_ids == model.config.image_token_index, 0, input_ids)

    sampler, processors = make_sampling(
        temperature, top_p, min_p, top_k, repetition_penalty, repetition_context_size
    )
    engine = BatchEngine(model, prefill_step_size)
    rows = []
    for i, n in enumerate(lengths):
        row = Row(processor, max_tokens, sampler, processors, stop or [], history[i, width - n :])
        engine.add(row, embeddings[i, width - n :])
        rows.append(row)
    with wired_limit(model):
        while engine:
            engine.step()
    if not return_results:
        return [row.text for row in rows]
    return [
        BatchResult(row.text, row.tokens, n, row.finish_reason) for row, n in zip(rows, lengths)
    ]
