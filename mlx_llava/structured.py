"""Structured output with llguidance: a response format's grammar and a row's constraint.

A `ResponseFormat` (a field of `SamplingParams`) is compiled once into an llguidance grammar
(`grammar`, cached by its text). A row that has one gets a `Constraint` (`decoding.make_row`):
llguidance's matcher over the tokenizer, advanced with each token the row takes; before each
draw the engine asks every constrained row of the batch for its token mask (`fill_masks`, in
llguidance's threads) and `apply_masks` sets the forbidden logits to -inf. Free rows get a mask
that allows every token, so their logits are unchanged.

llguidance is an optional dependency (`pip install 'mlx-llava[structured]'`); without it a
response format is refused when the `SamplingParams` is made, with that advice.
"""

from __future__ import annotations

import functools
import re
import weakref
from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np

from .sampling import ResponseFormat

INSTALL_HINT = "needs llguidance for structured output: pip install 'mlx-llava[structured]'"
# Compact JSON, one space after separators as models write it; no free whitespace (a model
# could otherwise pad an answer with newlines until its budget runs out).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = '{"type":"object"}'


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return llguidance


@functools.lru_cache(maxsize=256)
def grammar(fmt: ResponseFormat) -> str:
    """The llguidance grammar of a response format.

    Raises:
        ValueError: llguidance is not installed, or cannot take the schema: the message is a
            predicate for the field's name ("is not a schema llguidance can take: <reason>").
    """
    llg = _llguidance()
    schema = ANY_OBJECT if fmt.kind == "json_object" else fmt.schema
    try:
        text = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise ValueError(f"is not a schema llguidance can take: {e}") from None
    error = llg.LLMatcher.validate_grammar(text)
    if error:
        raise ValueError(f"is not a schema llguidance can take: {error.strip()}")
    return text


_tokenizers: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def llg_tokenizer(processor, vocab_size: int):
    """llguidance's view of the processor's tokenizer, built once per processor (it walks the
    whole vocabulary). `vocab_size` is the width of the logits (ids beyond the tokenizer's
    have no text and are never allowed)."""
    cached = _tokenizers.get(processor)
    if cached is None or cached[0] != vocab_size:
        import llguidance.hf

        wrapper = processor.tokenizer
        fast = getattr(wrapper, "_tokenizer", wrapper)
        eos = sorted(wrapper.eos_token_ids)
        cached = (vocab_size, llguidance.hf.from_tokenizer(fast, n_vocab=vocab_size, eos_token=eos))
        _tokenizers[processor] = cached
    return cached[1]


class Constraint:
    """One row's grammar: llguidance's matcher, advanced with each token the row takes.

    A matcher that has stopped (its JSON is complete) allows only EOS; one in error (a token
    it refused, which the mask prevents) allows only EOS too, so the row ends.
    """

    def __init__(self, processor, vocab_size: int, fmt: ResponseFormat):
        llg = _llguidance()
        tokenizer = llg_tokenizer(processor, vocab_size)
        self.matcher = llg.LLMatcher(tokenizer, grammar(fmt))
        if self.matcher.is_error():
            raise ValueError(f"response_format is not usable: {self.matcher.get_error()}")
        self.eos = sorted(processor.tokenizer.eos_token_ids)

    def advance(self, token: int) -> None:
        """Take the row's next token (a refused one leaves the matcher in error)."""
        if not self.matcher.is_error():
            self.matcher.consume_token(token)

    @property
    def failed(self) -> bool:
        return self.matcher.is_error()


@functools.lru_cache(maxsize=1)
def _executor():
    """llguidance's thread pool for the masks of several rows."""
    return _llguidance().LLExecutor()


def fill_masks(constraints: Sequence[Optional[Constraint]], vocab_size: int) -> np.ndarray:
    """The packed token masks [B, ceil(V / 32)] (int32, bit t of a row: token t allowed) of a
    batch's rows: each constrained row's from its matcher (in llguidance's threads), every
    token for the others (None)."""
    import llguidance.numpy

    bitmask = np.full(((len(constraints)), (vocab_size + 31) // 32), -1, dtype=np.int32)
    matchers = []
    for i, c in enumerate(constraints):
        if c is None:
            continue
        if c.failed:
            bitmask[i] = 0
            for t in c.eos:
                bitmask.view(np.uint32)[i, t // 32] |= np.uint32(1 << (t % 32))
        else:
            matchers.append((c.matcher, i))
    if len(matchers) == 1:
        llguidance.numpy.fill_next_token_bitmask(matchers[0][0], bitmask, matchers[0][1])
    elif matchers:
        llguidance.numpy.fill_next_token_bitmask_par(_executor(), matchers, bitmask)
    return bitmask


def apply_masks(logits: mx.array, bitmask: np.ndarray) -> mx.array:
    """Logits [B, V] with the tokens the packed `bitmask` [B, W] forbids set to -inf (the
    bits unpacked on the device: 4 bytes a row per 32 tokens cross over, not a float each)."""
    batch, vocab = logits.shape
    bits = (mx.array(bitmask)[:, :, None] >> mx.arange(32, dtype=mx.int32)) & 1
    allowed = bits.reshape(batch, -1)[:, :vocab].astype(mx.bool_)
    return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes a token stands for (SentencePiece: "▁" is a space, `<0xNN>` one byte; byte-
    level BPE: its bytes decoded), for log-probabilities' `bytes`."""
    fast = getattr(tokenizer, "_tokenizer", tokenizer)
    piece = fast.convert_ids_to_tokens(int(token))
    if piece is None:
        return b""
    match = _BYTE_TOKEN.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    byte_decoder = _byte_decoder() if _is_byte_level(tokenizer) else None
    if byte_decoder is not None and all(c in byte_decoder for c in piece):
        return bytes(byte_decoder[c] for c in piece)
    return piece.replace("\u2581", " ").encode("utf-8")


def _is_byte_level(tokenizer) -> bool:
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    return isinstance(getattr(tokenizer, "_detokenizer", None), BPEStreamingDetokenizer)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict:
    from mlx_lm.tokenizer_utils import _byte_decoder as decoder

    return decoder()


def token_text(data: bytes) -> str:
    """A token's bytes as text (an incomplete UTF-8 sequence as replacement characters)."""
    return data.decode("utf-8", errors="replace")
