"""Build small Llama-like tokenizers offline, for tests and tiny checkpoints.

The tokenizer mirrors the structure of Llama-2's ``tokenizer.json`` (the one llava-hf and the
original LLaVA releases ship): a BPE model over "▁"-marked words with byte fallback, so that any
text, including non-ASCII, round-trips through encode/decode; the special tokens ``<unk>`` = 0,
``<s>`` = 1, ``</s>`` = 2, then the 256 byte tokens ``<0x00>`` .. ``<0xFF>``, then the learned
pieces; a post-processor that prepends ``<s>``; and the SentencePiece-style decoder that mlx-lm
recognises for its streaming ``SPMStreamingDetokenizer``. With ``image_token`` the llava-hf extras
``<image>`` and ``<pad>`` follow the BPE vocabulary as added special tokens (like 32000 / 32001).
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

DEFAULT_VOCAB_SIZE = 384
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
SPIECE_UNDERLINE = "\u2581"
MODEL_MAX_LENGTH = 1_000_000

_COLOURS = "red green blue yellow orange purple pink brown black white grey golden".split()
_SHAPES = "circle square triangle star line dot stripe cloud heart ring box wave".split()
_ANIMALS = "cat dog bird fish horse cow sheep duck rabbit fox bear lion".split()
_THINGS = "tree house car boat ball cup chair table sky sun moon flower road river".split()
_PLACES = "garden park street kitchen beach field forest room city lake".split()
_SIZES = "small big large tiny huge little round long short bright dark".split()
_VERBS = "sits runs stands jumps sleeps plays looks walks flies swims".split()
_QUESTIONS = (
    "What is in the picture?",
    "What is in the image?",
    "Describe the picture.",
    "Describe this image in detail.",
    "What colour is the {thing}?",
    "How many {animal}s are there?",
    "Where is the {animal}?",
    "Is there a {thing} in the picture?",
    "What shape is the {shape}?",
    "Compare the two pictures.",
    "Tell me a story.",
    "What is the {animal} doing?",
    "Answer the question using a single word or phrase.",
)
_TEMPLATES = (
    "The picture shows a {size} {colour} {animal} in the {place}.",
    "A {colour} {shape} is next to a {size} {thing}.",
    "There are {n} {animal}s and {m} {thing}s.",
    "The {animal} {verb} near the {colour} {thing}.",
    "In the image, a {size} {animal} {verb} by the {place}.",
    "It is a {colour} {thing} with a {shape} on it!",
    "Yes, there is a {thing}; it is {colour}.",
    "No. The {thing} is {size} and {colour}.",
    "The {shape} is {colour}, the {thing} is {size}.",
    "I see {n} {colour} {shape}s: {m} are {size}.",
    "Once upon a time, a {animal} lived in a {place}.",
    "({n}) {colour} - {shape} / {thing} = {m}?",
    "\"{animal}\" and '{thing}' at {n}:{m}{m}.",
)
_CHAT = (
    "USER: <image>\n{q} ASSISTANT: {a}</s>",
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {q} ASSISTANT: {a}",
    "USER: {q}\nASSISTANT: {a}",
)


def default_corpus(num_sentences: int = 400, seed: int = 0) -> list[str]:
    """A deterministic English corpus about pictures, colours, shapes, animals and chats.

    Args:
        num_sentences: how many sentences to generate.
        seed: seed of the generator.

    Returns:
        The sentences; the same for the same arguments on every machine.
    """
    rng = random.Random(seed)

    def fill(template: str) -> str:
        return template.format(
            colour=rng.choice(_COLOURS),
            shape=rng.choice(_SHAPES),
            animal=rng.choice(_ANIMALS),
            thing=rng.choice(_THINGS),
            place=rng.choice(_PLACES),
            size=rng.choice(_SIZES),
            verb=rng.choice(_VERBS),
            n=rng.randrange(10),
            m=rng.randrange(100),
        )

    corpus = []
    for i in range(num_sentences):
        if i % 4 == 3:
            question = fill(rng.choice(_QUESTIONS))
            answer = fill(rng.choice(_TEMPLATES))
            corpus.append(rng.choice(_CHAT).format(q=question, a=answer))
        else:
            sentence = fill(rng.choice(_TEMPLATES))
            corpus.append(sentence.capitalize() if i % 7 == 0 else sentence)
    corpus.append("0 1 2 3 4 5 6 7 8 9 10 100 . , ; : ! ? ' \" ( ) [ ] - + = / * % # @ & _")
    return corpus


def pad_vocab_size(size: int, multiple: int = 64) -> int:
    """Rounds a vocabulary size up to a multiple (llava-hf pads 32002 to 32064)."""
    return -(-size // multiple) * multiple


def _train_pieces(
    corpus: list[str], num_pieces: int, limit_alphabet: int | None
) -> tuple[list[str], list[list[str]]]:
    """Trains BPE on "▁"-marked words; returns the learned pieces in order and the merges."""
    corpus = [SPIECE_UNDERLINE + s.replace(" ", SPIECE_UNDERLINE) for s in corpus]
    # As in Llama, control characters are never pieces: "\n" is always <0x0A>.
    corpus = ["".join(SPIECE_UNDERLINE if ch < " " else ch for ch in s) for s in corpus]
    if limit_alphabet is not None:
        # The trainer's own limit_alphabet breaks frequency ties at random; choose here instead
        # (most frequent first, ties by code point) and blank the other characters out.
        counts = Counter(itertools.chain.from_iterable(corpus))
        counts[SPIECE_UNDERLINE] += 1 << 30
        ranked = sorted(counts, key=lambda ch: (-counts[ch], ch))
        keep = set(ranked[:limit_alphabet])
        corpus = ["".join(ch if ch in keep else SPIECE_UNDERLINE for ch in s) for s in corpus]
    tokenizer = Tokenizer(models.BPE())
    # Word boundaries only during training, so that no merge crosses a "▁" (as in SentencePiece).
    tokenizer.pre_tokenizer = pre_tokenizers.Split(SPIECE_UNDERLINE, behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=num_pieces, show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].__getitem__)
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
    return pieces, merges


def _blank_special_tokens(text: str) -> str:
    """The text with every special token spelled in it replaced by a space."""
    for token in SPECIAL_TOKENS:
        text = text.replace(token, " ")
    return text


def build_tokenizer(
    out_dir: str | Path | None,
    corpus: list[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    image_token: bool = True,
    limit_alphabet: int | None = 50,
) -> PreTrainedTokenizerFast:
    """Trains a small Llama-2-like byte-fallback BPE tokenizer and saves it.

    Args:
        out_dir: folder to ``save_pretrained`` into (``tokenizer.json``, ``tokenizer_config.json``,
            ``special_tokens_map.json``); ``None`` to only return it.
        corpus: training sentences; :func:`default_corpus` when ``None``.
        vocab_size: size of the BPE vocabulary (specials + 256 bytes + learned pieces), like
            Llama's 32000; must be more than 259 plus the alphabet (at most ``limit_alphabet``).
        image_token: append ``<image>`` (id ``vocab_size``) and ``<pad>`` (``vocab_size + 1``) as
            added special tokens, as llava-hf does; otherwise pad is ``<unk>`` as in the original
            LLaVA releases.
        limit_alphabet: keep only this many most frequent characters as pieces (the rest go
            through byte fallback), which leaves more of the small vocabulary for merges.

    Returns:
        The tokenizer; ``tok("hi")`` starts with ``<s>``, ``add_special_tokens=False`` does not.
    """
    corpus = default_corpus() if corpus is None else list(corpus)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    num_pieces = vocab_size - len(SPECIAL_TOKENS) - len(byte_tokens)
    pieces, merges = _train_pieces(corpus, num_pieces, limit_alphabet)
    if set(pieces) & set(SPECIAL_TOKENS):
        # The corpus spells a special token (e.g. "</s>" in a chat) often enough for BPE to learn
        # it as a piece; as in SentencePiece, special tokens are never pieces: learn without them.
        corpus = [_blank_special_tokens(s) for s in corpus]
        pieces, merges = _train_pieces(corpus, num_pieces, limit_alphabet)
    if len(pieces) != num_pieces:
        raise ValueError(
            f"vocab_size {vocab_size} gives room for {num_pieces} pieces, the corpus gave "
            f"{len(pieces)}: use a different vocab_size or a larger corpus"
        )
    vocab = {tok: i for i, tok in enumerate(itertools.chain(SPECIAL_TOKENS, byte_tokens, pieces))}

    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[tuple(m) for m in merges],
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    # Llama-2's (legacy) normalizer: a "▁" before every text segment, spaces become "▁".
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Prepend(SPIECE_UNDERLINE),
            normalizers.Replace(" ", SPIECE_UNDERLINE),
        ]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_UNDERLINE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    # A bos-prepending post-processor exactly as Llama-2's tokenizer.json spells it.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    extra = {}
    if image_token:
        tokenizer.add_special_tokens([IMAGE_TOKEN, PAD_TOKEN])
        extra["pad_token"] = PAD_TOKEN
    else:
        extra["pad_token"] = "<unk>"

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        **extra,
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(out_dir)
        # transformers 5 writes "TokenizersBackend", which transformers 4 does not know; both read
        # "PreTrainedTokenizerFast" as "use tokenizer.json as it is". A "LlamaTokenizer" class would
        # make transformers 5 rebuild the normalizer (non-legacy Metaspace) and change the ids.
        config_path = out_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        special = {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": extra["pad_token"],
        }
        # transformers 5 no longer writes this file; hub repos (and older readers) have it.
        path = out_dir / "special_tokens_map.json"
        if not path.exists():
            path.write_text(json.dumps(special, indent=2) + "\n")
    return fast
