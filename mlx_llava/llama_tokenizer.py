"""The tokenizer the original LLaVA code ran: transformers 4.31's slow SentencePiece LlamaTokenizer.

The haotian-liu releases ship a SentencePiece `tokenizer.model` and a `tokenizer_config.json`
naming `LlamaTokenizer` (no tokenizer.json); the original code loads it with `use_fast=False`
under transformers 4.31 and tokenizes each chunk between `<image>`s on its own. transformers 5
converts the same files into a different tokenizer (no BOS without `add_bos_token`, one dummy
prefix fewer on a chunk that starts with a space, other text after `</s>`), so encoding is done
here, as 4.31 did it:

- special tokens (`<s>`, `</s>`, `<unk>`, added tokens) are cut out of the text first; the text
  around one is stripped of spaces where the token says so (`lstrip`/`rstrip` of an AddedToken;
  both sides for a token given as a plain string in special_tokens_map.json or added_tokens.json);
- each piece of text in between is encoded by SentencePiece (dummy prefix included); with
  `legacy: false` the text is first given one "▁" and later pieces lose the dummy prefix's "▁";
- BOS in front when `add_bos_token` (default true), EOS behind when `add_eos_token`.

Special tokens are taken to be in the vocabulary or in added_tokens.json, as in every release
(4.31 would have appended any other one behind the vocabulary).

Each token also gets the characters of the text it encodes (`encode_with_offsets`, for training's
answer mask), from SentencePiece's own alignment.

Decoding and streaming stay with mlx-lm's TokenizerWrapper: ids decode the same either way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

import sentencepiece as spm

SPIECE_UNDERLINE = "\u2581"
# PreTrainedTokenizerBase's order, which decides which of two same tokens counts.
SPECIAL_TOKEN_ATTRIBUTES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
    "additional_special_tokens",
)  # fmt: skip
DEFAULT_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
STRIP_BOTH = (True, True)  # 4.31 strips around a no-split token that is a plain string

Span = tuple[int, int]  # [start, end) characters of the text


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _special_tokens(config: dict, special_map: dict) -> list[tuple[str, str, Optional[tuple]]]:
    """(attribute, content, (lstrip, rstrip) or None for a plain string) of every special token.

    LlamaTokenizer.__init__ turns its own string tokens (bos, eos, unk, pad) into AddedTokens
    that strip nothing; special_tokens_map.json then replaces any of them, strings staying
    strings.
    """
    tokens = []
    for attr in SPECIAL_TOKEN_ATTRIBUTES:
        own = attr not in special_map
        value = config.get(attr, DEFAULT_SPECIAL_TOKENS.get(attr)) if own else special_map[attr]
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and "content" in item:
                strip = (bool(item.get("lstrip")), bool(item.get("rstrip")))
                tokens.append((attr, item["content"], strip))
            elif isinstance(item, str):
                wrapped = own and attr != "additional_special_tokens"
                tokens.append((attr, item, (False, False) if wrapped else None))
    return tokens


def is_slow_llama_folder(folder: Union[str, Path]) -> bool:
    """A folder whose tokenizer the original code loaded as the slow LlamaTokenizer."""
    folder = Path(folder)
    if not (folder / "tokenizer.model").exists():
        return False
    name = _read_json(folder / "tokenizer_config.json").get("tokenizer_class") or ""
    return name.removesuffix("Fast") == "LlamaTokenizer"


class SlowLlamaTokenizer:
    """Encodes text exactly as transformers 4.31's `LlamaTokenizer(use_fast=False)`.

    Args:
        model_file: the SentencePiece `tokenizer.model` (or its serialized bytes).
        special: no-split tokens -> (lstrip, rstrip) applied to the text beside them.
        added: tokens outside the SentencePiece vocabulary -> their ids.
        add_bos_token, add_eos_token, legacy: as in tokenizer_config.json (4.31's defaults).
    """

    def __init__(
        self,
        model_file: Union[str, Path, bytes],
        special: dict[str, tuple[bool, bool]],
        added: Optional[dict[str, int]] = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        legacy: Optional[bool] = True,
    ):
        if isinstance(model_file, bytes):
            self.sp = spm.SentencePieceProcessor(model_proto=model_file)
        else:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.special = dict(special)
        self.added = dict(added or {})
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.legacy = legacy
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        # Longest first: the trie 4.31 splits with matches the longest token at a position.
        tokens = sorted(self.special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None

    @classmethod
    def from_folder(cls, folder: Union[str, Path]) -> "SlowLlamaTokenizer":
        """Read `tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json` and
        `added_tokens.json` as 4.31's `from_pretrained` did."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        special = _special_tokens(config, _read_json(folder / "special_tokens_map.json"))
        added = {str(k): int(v) for k, v in _read_json(folder / "added_tokens.json").items()}
        flags: dict[str, tuple[bool, bool]] = {}
        for _, content, strip in special:  # AddedTokens: the first of a content counts
            if strip is not None:
                flags.setdefault(content, strip)
        for content in [c for _, c, _ in special] + list(added):
            flags.setdefault(content, STRIP_BOTH)
        tokenizer = cls(
            folder / "tokenizer.model",
            flags,
            added,
            add_bos_token=config.get("add_bos_token", True),
            add_eos_token=config.get("add_eos_token", False),
            legacy=config.get("legacy", True),  # 4.31: null means not legacy
        )
        names = {attr: content for attr, content, _ in reversed(special)}
        tokenizer.bos_token_id = tokenizer.token_id(names.get("bos_token"))
        tokenizer.eos_token_id = tokenizer.token_id(names.get("eos_token"))
        return tokenizer

    def token_id(self, token: Optional[str]) -> Optional[int]:
        """The id of a token string (an unknown piece is `<unk>`'s id, as in SentencePiece)."""
        if token is None:
            return None
        return self.added[token] if token in self.added else self.sp.piece_to_id(token)

    def _encode_text(self, text: str, start: int) -> list[tuple[str, Span]]:
        """SentencePiece pieces of text between special tokens (4.31's `_tokenize`), each with
        the span it encodes, `start` being where `text` begins.

        A piece that SentencePiece aligns to no character (the dummy prefix's "▁", the leading
        bytes of a byte-fallback character) gets the span of the character it belongs to.
        """
        is_first = not self.legacy and text.startswith(SPIECE_UNDERLINE)
        if is_first:
            text, start = text[1:], start + 1
        encoded = self.sp.encode(text, out_type="offset_mapping")
        pieces, next_span = [], None
        for piece, (a, b) in reversed(list(zip(encoded["pieces"], encoded["offsets"]))):
            span = (start + a, start + b) if b > a or next_span is None else next_span
            pieces.append((piece, span))
            next_span = span
        pieces.reverse()
        if self.legacy or is_first or text.startswith(" ") or not pieces:
            return pieces
        (first, span), rest = pieces[0], pieces[1:]
        if first.startswith(SPIECE_UNDERLINE):  # later chunks lose the dummy prefix
            return ([(first[1:], span)] if len(first) > 1 else []) + rest
        return pieces

    def tokenize_with_offsets(self, text: str) -> list[tuple[str, Span]]:
        """Token strings of `text`, without BOS/EOS, each with its character span in `text`."""
        shift = 0
        if not self.legacy:  # 4.31 puts one "▁" in front and makes the text's "▁"s spaces
            text, shift = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), 1
        parts = self._split.split(text) if self._split else [text]  # odd indices: tokens
        starts = [0]
        for part in parts[:-1]:
            starts.append(starts[-1] + len(part))
        for i in range(1, len(parts), 2):
            lstrip, rstrip = self.special[parts[i]]
            if rstrip and parts[i + 1]:
                stripped = parts[i + 1].lstrip()
                starts[i + 1] += len(parts[i + 1]) - len(stripped)
                parts[i + 1] = stripped
            if lstrip and parts[i - 1]:
                parts[i - 1] = parts[i - 1].rstrip()
        tokens: list[tuple[str, Span]] = []
        for i, (part, start) in enumerate(zip(parts, starts)):
            if part and i % 2:
                tokens.append((part, (start, start + len(part))))
            elif part:
                tokens.extend(self._encode_text(part, start))
        return [(t, (a - shift, b - shift)) for t, (a, b) in tokens]

    def tokenize(self, text: str) -> list[str]:
        """Token strings of `text`, without BOS/EOS."""
        return [token for token, _ in self.tokenize_with_offsets(text)]

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = True
    ) -> tuple[list[int], list[Span]]:
        """Token ids of `text` as `encode` makes them, and each one's character span in `text`
        (BOS and EOS: empty spans at the start and the end)."""
        tokens = self.tokenize_with_offsets(text)
        ids = [self.token_id(t) for t, _ in tokens]
        spans = [span for _, span in tokens]
        if add_special_tokens and self.add_bos_token:
            ids, spans = [self.bos_token_id] + ids, [(0, 0)] + spans
        if add_special_tokens and self.add_eos_token:
            ids, spans = ids + [self.eos_token_id], spans + [(len(text), len(text))]
        return ids, spans

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, as `tokenizer(text).input_ids` under 4.31."""
        return self.encode_with_offsets(text, add_special_tokens)[0]
