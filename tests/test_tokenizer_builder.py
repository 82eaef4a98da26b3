"""The offline Llama-like tokenizer builder used by the fixtures and the demo."""

import pytest

from llava_testing.tokenizer_builder import build_tokenizer


@pytest.mark.parametrize("vocab_size", [384, 800])
def test_special_tokens_keep_their_ids(vocab_size):
    # At 800 pieces the default corpus (which spells "</s>" in its chats) used to teach BPE a
    # "</s>" piece: the vocabulary then had a hole and </s> moved to id 512.
    tokenizer = build_tokenizer(None, vocab_size=vocab_size)
    vocab = tokenizer.get_vocab()
    assert sorted(vocab.values()) == list(range(vocab_size + 2))
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [vocab_size, vocab_size + 1]
    ids = tokenizer("USER: <image>\nWhat is it? ASSISTANT: A red circle.</s>")["input_ids"]
    assert ids[0] == 1 and ids.count(vocab_size) == 1 and ids[-1] == 2
    text = "A red circle, naïve ✓ </s>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and ids[-1] == 2
