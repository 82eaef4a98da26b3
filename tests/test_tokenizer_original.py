"""Original releases tokenized exactly as the original code did, with their real kind of files.

The orig-spm-* fixtures ship what liuhaotian/llava-v1.5-7b and a LLaVA v1 release ship: a
SentencePiece tokenizer.model, tokenizer_config.json / special_tokens_map.json naming
LlamaTokenizer, no tokenizer.json, no `<image>` token; their tower (orig-spm-clip) carries CLIP's
own tokenizer files, as openai/clip-vit-large-patch14-336 does. The expected ids are the original
`tokenizer_image_token` over transformers 4.31's slow LlamaTokenizer, computed by
tests/fixtures/make_fixtures.py with sentencepiece and checked there against transformers 4.31.0
itself.
"""

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from mlx_llava import convert, load, stream_generate
from mlx_llava.convert import read_source
from mlx_llava.processor import Processor

DATA = Path(__file__).parent / "fixtures" / "data"
TOWER = DATA / "orig-spm-clip"
CHECKPOINTS = ["orig-spm-v15", "orig-spm-v1"]
CLIP_TOKENIZER_FILES = {"vocab.json", "merges.txt"}
LLAVA_TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
IMAGE = DATA / "images" / "a.png"


def oracle(folder: Path) -> dict:
    return json.loads((folder / "oracle.json").read_text())


def expanded(ids: list[int], image_id: int, n: int) -> list[int]:
    """The original ids with each image (-200) expanded to the picture's `n` token positions."""
    out = []
    for t in ids:
        out.extend([image_id] * n if t == -200 else [t])
    return out


def assert_original_ids(processor: Processor, meta: dict) -> None:
    config = processor.config
    for name, prompt in meta["prompts"].items():
        expected = expanded(
            meta["input_ids"][name], config.image_token_index, config.num_image_tokens
        )
        assert processor.tokenize(prompt) == expected, name
        batch = processor(prompt, [IMAGE] * prompt.count("<image>"))
        assert batch["input_ids"].tolist() == [expected], name


def direct_folder(name: str, root: Path) -> Path:
    """The checkpoint as downloaded, its config naming the tower by a local path."""
    folder = root / name
    shutil.copytree(DATA / name, folder)
    config = json.loads((folder / "config.json").read_text())
    config["mm_vision_tower"] = str(TOWER)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module", params=CHECKPOINTS)
def converted(request, tmp_path_factory):
    """(name, converted folder, model, processor) with the CLIP tower beside the checkpoint."""
    name = request.param
    out = convert(DATA / name, tmp_path_factory.mktemp(name) / "mlx", vision_tower=TOWER)
    model, processor = load(out, dtype="float32")
    return name, out, model, processor


def test_the_fixtures_ids_have_two_witnesses():
    for name in CHECKPOINTS + ["orig-spm-strings"]:
        witness = oracle(DATA / name)["transformers_4_31_witness"]
        assert witness["transformers"] == "4.31.0" and witness["agrees"] is True, name


def test_the_tower_carries_clip_tokenizer_files():
    """What made the tower's tokenizer win: a CLIPTokenizer beside the CLIP weights."""
    assert CLIP_TOKENIZER_FILES <= {p.name for p in TOWER.iterdir()}
    assert json.loads((TOWER / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "CLIPTokenizer"
    )


def test_converted_checkpoints_give_the_original_ids(converted):
    name, _, _, processor = converted
    assert processor.original_tokenizer is not None
    assert_original_ids(processor, oracle(DATA / name))


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_directly_loaded_checkpoints_give_the_original_ids(name, tmp_path):
    _, processor = load(direct_folder(name, tmp_path), dtype="float32")
    assert_original_ids(processor, oracle(DATA / name))


def test_converted_folder_holds_the_llava_tokenizer_not_clips(converted):
    name, out, _, _ = converted
    files = {p.name for p in out.iterdir()}
    assert not files & CLIP_TOKENIZER_FILES
    for file in LLAVA_TOKENIZER_FILES:
        assert (out / file).read_bytes() == (DATA / name / file).read_bytes(), file
    # The image processor's settings are the tower's.
    assert (out / "preprocessor_config.json").read_bytes() == (
        TOWER / "preprocessor_config.json"
    ).read_bytes()


def test_release_defaults(converted):
    """v1.5 says add_bos_token and legacy: false; v1 says neither (4.31: BOS, legacy)."""
    name, _, _, processor = converted
    tokenizer = processor.original_tokenizer
    assert tokenizer.add_bos_token and not tokenizer.add_eos_token
    assert bool(tokenizer.legacy) == (name == "orig-spm-v1")
    assert processor.tokenize("Hi")[0] == tokenizer.bos_token_id == 1
    assert processor.tokenize("Hi", add_bos=False)[0] != 1


def test_plain_string_special_tokens_and_added_tokens():
    """Plain-string special tokens strip the spaces beside them; an added token has its own id."""
    folder = DATA / "orig-spm-strings"
    meta = oracle(folder)
    config = read_source(DATA / "orig-spm-v1", TOWER).config
    processor = Processor.from_pretrained(folder, config)
    assert_original_ids(processor, meta)


def test_decoding_and_streaming_match_sentencepiece(converted):
    """Ids decode to what SentencePiece itself decodes, whole or streamed token by token."""
    name, out, _, processor = converted
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for text in ["A small red cat.", "Qu'est-ce que c'est ? Ça coûte 5 €. 日本の猫\n12  ok"]:
        ids = sp.encode(text)
        assert processor.decode(ids) == sp.decode(ids) == text
        detokenizer = processor.tokenizer.detokenizer
        detokenizer.reset()
        for i in ids:
            detokenizer.add_token(i)
        detokenizer.finalize()
        assert detokenizer.text == text
    assert processor.tokenizer.eos_token_ids == {oracle(DATA / name)["eos_token_id"]}


def test_generation_runs_and_streams_text(converted):
    """The random model's answer is mostly raw bytes (not UTF-8): the streamed text is checked
    for being text, the detokenizer on real text above."""
    name, _, model, processor = converted
    prompt = oracle(DATA / name)["prompts"]["vicuna_v1"]
    responses = list(stream_generate(model, processor, prompt, image=IMAGE, max_tokens=8))
    assert 1 <= len(responses) <= 8 and responses[-1].finish_reason in ("stop", "length")
    assert all(isinstance(r.text, str) for r in responses)
    assert all(0 <= r.token < model.config.text_config.vocab_size for r in responses)
    assert responses[0].prompt_tokens == len(processor.tokenize(prompt))


def test_llava_hf_folder_with_only_tokenizer_model(tmp_path):
    """A llava-hf folder saved with a slow tokenizer (tokenizer.model, added_tokens.json with
    <image>, no tokenizer.json) is tokenized by transformers itself, llava-hf's oracle."""
    from transformers import AutoTokenizer

    from mlx_llava.config import ModelConfig

    shutil.copy(DATA / "orig-spm-v15" / "tokenizer.model", tmp_path / "tokenizer.model")
    vocab = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).vocab_size()
    added = {"<image>": vocab, "<pad>": vocab + 1}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "pad_token": "<pad>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf_config = json.loads((DATA / "hf-hub" / "config.json").read_text())
    model_config = ModelConfig.from_dict({**hf_config, "image_token_index": vocab})
    processor = Processor.from_pretrained(tmp_path, model_config)
    assert processor.image_token_in_vocab and processor.original_tokenizer is None
    reference = AutoTokenizer.from_pretrained(tmp_path)
    for prompt in oracle(DATA / "orig-spm-v15")["prompts"].values():
        ids = reference(prompt).input_ids
        assert processor.tokenize(prompt) == expanded(
            [-200 if t == vocab else t for t in ids], vocab, model_config.num_image_tokens
        )
