"""The one decoding core: a `Row` per answer and the `BatchEngine` step that every caller uses.

`stream_generate` (and so `generate`, `ChatSession`, evaluation), `batch_generate` (and so
captioning) and the server's worker all answer through `make_row` + `BatchEngine`: a row holds
one answer's state (its whole prompt as history for the logits processors, its sampling
settings, stop strings, detokenizer and token budget), and `BatchEngine.step` decodes one token
for every row of the batch. A feature of decoding is added here once.

The engine is mlx-lm's continuous batching: rows join between steps (their uncached prompt
positions prefilled right-padded into a new `BatchKVCache`, merged into the running one) and
leave at their EOS, stop string or budget; `BatchKVCache` gives each row its own RoPE offset
and masks the padding, so each row computes what it would alone. A `solo` engine holds one row
in a plain per-layer cache instead (the caller's, e.g. a `PromptCache`'s, which may be
quantized as mlx-lm does with `kv_bits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import mlx.core as mx
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models.cache import BatchKVCache, KVCache, TokenBuffer

from .model import Model
from .processor import Processor
from .prompt import context_room
from .sampling import BatchSampler, SamplingParams, logits_processors
from .structured import Constraint, apply_masks, fill_masks

KV_BITS = (2, 3, 4, 6, 8)  # what MLX's quantize takes


class LastPositionLM:
    """The language model with logits only at the last position: decoding reads nothing
    else, and the lm_head is the widest matmul."""

    def __init__(self, model: Model):
        self.model = model

    @property
    def layers(self):
        return self.model.layers

    def __call__(
        self, inputs: mx.array, cache: Optional[list] = None, input_embeddings=None
    ) -> mx.array:
        hidden = self.model.language_model(inputs, cache, input_embeddings)
        return self.model.language_model.lm_head(hidden[:, -1:])


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
            (
                k
                for s in self.stops
                for k in range(1, min(len(s), len(self.pending) + 1))
                if self.pending.endswith(s[:k])
            ),
            default=0,
        )
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out, False


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (the log-softmax of its logits,
    before repetition penalties, grammar masks and temperature) and the `top` most likely
    tokens at that position, (token, logprob) best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


class Row:
    """One answer being decoded (made by `make_row`).

    Its text is built token by token: EOS ends it without text, ids of the padded vocabulary
    have no text, stop strings cut it, `max_tokens` bounds it.

    Attributes:
        params: its sampling settings.
        keys: the prompt's position keys (see `prompt.position_keys`), for prompt caching.
        tokens: the tokens generated so far.
        text: the answer so far; `segment` is what the last token added to it.
        finish_reason: None while generating, then "stop" or "length".
        constraint: the grammar its tokens must follow (`params.response_format`), or None.
        logprobs: when `params.logprobs` is set, a `TokenLogprob` per token but the EOS.
        cache: when the engine keeps caches, the row's KV cache once it has left the batch (a
            list of mlx-lm `KVCache`, one per layer) and `cache_keys` the keys of its positions.
    """

    def __init__(
        self,
        processor: Processor,
        params: SamplingParams,
        max_tokens: int,
        history: mx.array,
        keys: Optional[list] = None,
        constraint: Optional[Constraint] = None,
    ):
        tokenizer = processor.tokenizer
        self.eos = tokenizer.eos_token_ids
        self.known_tokens = len(tokenizer)
        self.detokenizer = tokenizer.detokenizer  # a fresh copy
        self.params = params
        self.stops = StopMatcher([*params.stop, *processor.stop])  # the model's own too
        self.max_tokens = max_tokens
        self.logits_processors = logits_processors(params)
        self.constraint = constraint
        self.logprobs: list[TokenLogprob] = []
        self.context = TokenBuffer(history)
        self.keys = keys or []
        self.tokens: list[int] = []
        self.text = ""
        self.segment = ""
        self.finish_reason: Optional[str] = None
        self.cache: Optional[list[Any]] = None
        self.cache_keys: list = []
        self.read_ahead = False  # its token of the last step was handed over already

    def add(self, token: int, logprob: Optional[TokenLogprob] = None) -> None:
        """Take the next token (and its log-probability, when asked for): sets `segment` and,
        when the row is done, `finish_reason`."""
        self.tokens.append(token)
        if self.constraint is not None:
            self.constraint.advance(token)
        if token in self.eos:
            return self._finish("stop")
        if logprob is not None:
            self.logprobs.append(logprob)
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


def make_row(
    model: Model,
    processor: Processor,
    input_ids: mx.array,
    params: SamplingParams,
    keys: Optional[list] = None,
) -> Row:
    """The row that answers a prompt: the one factory, for every caller.

    Args:
        input_ids: token ids [L] of the WHOLE prompt (cached prefix included): the logits
            processors see it all, image and video tokens as 0.
        params: how to answer; its `max_tokens` is capped by the room the context leaves.
        keys: the prompt's position keys, when its KV cache is to be kept.

    Raises:
        ValueError: the prompt leaves no room in the model's context.
    """
    room = context_room(model, input_ids.shape[0])
    history = mx.where(media_mask(model.config, input_ids), 0, input_ids)
    constraint = None
    if params.response_format is not None:
        vocab = model.config.text_config.vocab_size
        constraint = Constraint(processor, vocab, params.response_format)
    return Row(processor, params, min(params.max_tokens, room), history, keys, constraint)


def media_mask(config, input_ids: mx.array) -> mx.array:
    """True at the image (and video) token positions of `input_ids`."""
    mask = input_ids == config.image_token_index
    if getattr(config, "video_token_index", None) is not None:
        mask = mask | (input_ids == config.video_token_index)
    return mask


@dataclass(frozen=True)
class KVQuantization:
    """Quantize a solo engine's KV cache as mlx-lm does (`maybe_quantize_kv_cache`)."""

    bits: int
    group_size: int = 64
    start: int = 0


def kv_quantization(
    model: Model, kv_bits: Optional[int], group_size: int = 64, start: int = 0
) -> Optional[KVQuantization]:
    """The KV-cache quantization for `kv_bits` (None: none), with `group_size` when it
    divides the attention heads' size, else the largest of 64 and 32 that does.

    Raises:
        ValueError: `kv_bits` is not one of 2, 3, 4, 6, 8, or the heads are too small to
            quantize (a size that 32 does not divide).
    """
    if kv_bits is None:
        return None
    if kv_bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))}, got {kv_bits}")
    head_dim = model.config.text_config.head_dim
    for size in (group_size, 64, 32):
        if head_dim % size == 0:
            return KVQuantization(kv_bits, size, start)
    raise ValueError(
        f"this model's attention heads are {head_dim} wide: too small a size to quantize the "
        "KV cache (MLX quantizes groups of 32 or 64 values); leave the KV cache unquantized"
    )


class BatchEngine:
    """Continuous batching over one model: `add` rows at any time, `step` decodes one token
    for every row in the batch.

    Each `step` first prefills the rows added since the last one (all but their last
    position, in chunks of `prefill_step_size`), merges them into the running batch, then runs
    one forward pass for the whole batch: the last prompt position of the new rows and the
    token sampled last step for the others. Decoding is pipelined as in mlx-lm: the tokens
    of step n are read while step n + 1 is computed.

    Args:
        keep_caches: a row that leaves keeps its KV cache (`Row.cache`).
        solo: one row only, decoded in the cache it brings (or a new plain one) rather than a
            `BatchKVCache`; `kv_quantization` quantizes that cache as mlx-lm does.
    """

    def __init__(
        self,
        model: Model,
        prefill_step_size: int = 2048,
        keep_caches: bool = False,
        solo: bool = False,
        kv_quantization: Optional[KVQuantization] = None,
    ):
        if kv_quantization is not None and not solo:
            raise ValueError("a batched KV cache is not quantized: leave kv_bits unset")
        self.model = model
        self.lm = LastPositionLM(model)
        self.prefill_step_size = prefill_step_size
        self.keep_caches = keep_caches
        self.solo = solo
        self.kv_quantization = kv_quantization
        self.rows: list[Row] = []  # in the batch, in cache order
        self.cache: Optional[list] = None
        self.y: Optional[mx.array] = None  # [len(rows)] sampled last step, not read yet
        self.y_logprobs: Optional[_Logprobs] = None  # theirs, for the rows that asked
        self.waiting: list[tuple[Row, mx.array, Optional[list]]] = []
        self.sampler: Optional[BatchSampler] = None  # for `rows`, made when they change
        self.joined: list[Row] = []  # the rows that joined at the last step

    def __len__(self) -> int:
        return len(self.rows) + len(self.waiting)

    def add(self, row: Row, embeddings: mx.array, cache: Optional[list] = None) -> None:
        """Queue a row to join the batch at the next step.

        Args:
            row: the row (see `make_row`).
            embeddings: [L', D] of the prompt positions not in `cache` (L' >= 1).
            cache: per-layer mlx-lm `KVCache`s holding the prompt's first positions, or None.
                A solo engine decodes in this very cache (it grows with the answer).
        """
        if embeddings.shape[0] < 1:
            raise ValueError("a row needs at least one prompt position to compute")
        if self.solo and len(self):
            raise ValueError("a solo engine holds one row")
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
        self.joined = [row for row, _ in joining]
        read = [r for r in self.rows if not r.read_ahead]
        for r in self.rows:
            r.read_ahead = False
        if read and len(read) == len(self.rows) and not joining:
            if all(r.last_token_known for r in read):
                # Every row ends with the token being read: no need to compute another step.
                self._read(read, None)
                return read
        next_y, next_logprobs = self._forward(joining, read)
        if joining:
            # The joining rows' first tokens now rather than a step later (that step may be
            # another request's prefill): their time to first token is their own prefill.
            first = next_y[len(self.rows) - len(joining) :].tolist()
            found = next_logprobs.read() if next_logprobs is not None else {}
            for (row, _), token in zip(joining, first):
                row.add(token, _token_logprob(row, token, found))
                row.read_ahead = True
            read = read + [row for row, _ in joining]
        self.y, self.y_logprobs = next_y, next_logprobs
        done = [i for i, r in enumerate(self.rows) if r.finish_reason is not None]
        if done:
            self._drop(done)
        return read

    def row_cache(self, row: Row) -> list:
        """A copy of `row`'s KV cache as it stands, one mlx-lm `KVCache` per layer: right
        after the row joined, its whole prompt."""
        i = self.rows.index(row)
        cache = [c.extract(i) for c in self.cache]
        mx.eval([c.state for c in cache])
        return cache

    def finish(self) -> None:
        """Wait for the step computed ahead (nothing of it may still run, nor, split across
        ranks, still talk to them, when the caller goes on)."""
        mx.synchronize()

    def _read(self, rows: list[Row], next_y: Optional[mx.array]) -> None:
        """Hand `rows` their token of the previous step (`self.y`, in batch order)."""
        if not rows:
            return
        tokens = self.y.tolist()
        found = self.y_logprobs.read() if self.y_logprobs is not None else {}
        position = {id(r): i for i, r in enumerate(self.rows)}
        for row in rows:
            token = tokens[position[id(row)]]
            row.add(token, _token_logprob(row, token, found))
        if next_y is None:
            self.y, self.y_logprobs = None, None
            self._drop([i for i, r in enumerate(self.rows) if r.finish_reason is not None])

    def _prefill(self) -> list[tuple[Row, mx.array]]:
        """Compute the waiting rows' positions but their last into the batch's cache; return
        (row, last position embedding [1, D]) for each."""
        if self.solo:
            return self._prefill_solo()
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
            self._prefill_chunks(x, cache)
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

    def _prefill_solo(self) -> list[tuple[Row, mx.array]]:
        (row, embeddings, cache), = self.waiting  # fmt: skip
        self.waiting = []
        self.cache = cache if cache is not None else self.model.make_cache()
        if embeddings.shape[0] > 1:
            self._prefill_chunks(embeddings[None, :-1], self.cache)
            mx.clear_cache()
        return [(row, embeddings[-1:])]

    def _prefill_chunks(self, x: mx.array, cache: list) -> None:
        """Positions x [B, L, D] into `cache`, `prefill_step_size` at a time."""
        for start in range(0, x.shape[1], self.prefill_step_size):
            chunk = x[:, start : start + self.prefill_step_size]
            self.model.language_model(None, cache, input_embeddings=chunk)
            self._quantize_cache()
            mx.eval([c.state for c in cache])

    def _quantize_cache(self) -> None:
        q = self.kv_quantization
        if q is not None:
            maybe_quantize_kv_cache(self.cache, q.start, q.group_size, q.bits)

    def _forward(
        self, joining: list[tuple[Row, mx.array]], read: list[Row]
    ) -> tuple[mx.array, Optional["_Logprobs"]]:
        """One step for every row (the read rows first, then the joining ones): the next
        tokens (and their log-probabilities, for the rows that asked). `read` get their tokens
        of the last step meanwhile: while this step computes, or, when a row has a grammar,
        before the draw (its mask needs its last token; it is computed while the model runs)."""
        inputs, fed = [], None
        if self.rows:
            fed = self.y
            inputs.append(self.model.language_model.model.embed_tokens(fed)[:, None])
        if joining:
            inputs.append(mx.stack([e for _, e in joining]))
            self.rows = self.rows + [row for row, _ in joining]
            self.sampler = None
        x = inputs[0] if len(inputs) == 1 else mx.concatenate(inputs)
        logits = self.lm(None, self.cache, input_embeddings=x)[:, -1]
        self._quantize_cache()
        if any(r.constraint is not None for r in self.rows):
            mx.async_eval(logits)
            self._read(read, logits)
            read = []
        next_y, logprobs = self._sample(logits, fed)
        mx.async_eval(next_y, *(logprobs.arrays() if logprobs is not None else ()))
        self._read(read, next_y)
        return next_y, logprobs

    def _sample(
        self, logits: mx.array, fed: Optional[mx.array]
    ) -> tuple[mx.array, Optional["_Logprobs"]]:
        """Logits [B, V] -> tokens [B] (and the log-probabilities of the rows that asked);
        `fed` [b] are the tokens just fed for the first b rows (each row's history grows by its
        own). The logits processors, then the grammar masks, shape what the sampler draws
        from; log-probabilities are the model's own (the logits as computed)."""
        model_logits = logits
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
        if any(r.constraint is not None for r in self.rows):
            masks = fill_masks([r.constraint for r in self.rows], logits.shape[-1])
            logits = apply_masks(logits, masks)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.sampler is None:
            vocab = logits.shape[-1]
            self.sampler = BatchSampler([r.params for r in self.rows], vocab)
        tokens = self.sampler(logprobs)
        return tokens, _Logprobs.of(self.rows, model_logits, tokens)

    def _drop(self, indices: list[int]) -> None:
        """Take rows out of the batch (their caches kept first, if wanted)."""
        if self.keep_caches:
            for i in indices:
                row = self.rows[i]
                row.cache = self.cache if self.solo else [c.extract(i) for c in self.cache]
                row.cache_keys = (row.keys + row.tokens)[: row.cache[0].offset]
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        self.rows = [self.rows[i] for i in keep]
        self.sampler = None
        if not keep:
            self.cache, self.y, self.y_logprobs = None, None, None
            return
        for c in self.cache:
            c.filter(keep)
        if self.y is not None:
            self.y = self.y[mx.array(keep)]


class _Logprobs:
    """The log-probabilities of a step's tokens for the rows that asked (`params.logprobs`),
    computed on the device with the tokens and read with them: the model's log-softmax in
    float32, the drawn token's value and the k best tokens (k: the most any row asked for)."""

    def __init__(self, rows: list[Row], chosen: mx.array, top_ids, top_values):
        self.rows = rows
        self.chosen, self.top_ids, self.top_values = chosen, top_ids, top_values
        self._found: Optional[dict] = None

    @classmethod
    def of(cls, rows: list[Row], logits: mx.array, tokens: mx.array) -> Optional["_Logprobs"]:
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not wanted:
            return None
        index = mx.array(wanted)
        x = logits[index].astype(mx.float32)
        x = x - mx.logsumexp(x, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(x, tokens[index][:, None], axis=-1)[:, 0]
        k = max(rows[i].params.logprobs for i in wanted)
        top_ids = top_values = None
        if k:
            top_ids = mx.argpartition(-x, k - 1, axis=-1)[:, :k]
            top_values = mx.take_along_axis(x, top_ids, axis=-1)
            order = mx.argsort(-top_values, axis=-1)
            top_ids = mx.take_along_axis(top_ids, order, axis=-1)
            top_values = mx.take_along_axis(top_values, order, axis=-1)
        return cls([rows[i] for i in wanted], chosen, top_ids, top_values)

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.chosen, self.top_ids, self.top_values) if a is not None]

    def read(self) -> dict[int, tuple[float, list[tuple[int, float]]]]:
        """id(row) -> (its token's logprob, its top alternatives), read once."""
        if self._found is None:
            chosen = self.chosen.tolist()
            ids = self.top_ids.tolist() if self.top_ids is not None else [[]] * len(chosen)
            values = self.top_values.tolist() if self.top_values is not None else ids
            self._found = {
                id(row): (lp, list(zip(i, v))[: row.params.logprobs])
                for row, lp, i, v in zip(self.rows, chosen, ids, values)
            }
        return self._found


def _token_logprob(row: Row, token: int, found: dict) -> Optional[TokenLogprob]:
    entry = found.get(id(row))
    return None if entry is None else TokenLogprob(token, entry[0], entry[1])
