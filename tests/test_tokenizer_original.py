"""Original releases tokenized exactly as the original code did, with their real kind of files,
at inference and in training.

The orig-spm-* fixtures ship what liuhaotian/llava-v1.5-7b and a LLaVA v1 release ship: a
SentencePiece tokenizer.model, tokenizer_config.json / special_tokens_map.json naming
LlamaTokenizer, no tokenizer.json, no `<image>` token; their tower (orig-spm-clip) carries CLIP's
own tokenizer files, as openai/clip-vit-large-patch14-336 does. The expected ids are the original
`tokenizer_image_token` over transformers 4.31's slow LlamaTokenizer, and the expected training
ids and targets the original train.py's `preprocess_v1` / `preprocess_plain` over it, computed
by tests/fixtures/make_fixtures.py with sentencepiece and checked there against transformers
4.31.0 itself.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from mlx_llava import convert, load, stream_generate
from mlx_llava.conversation import SeparatorStyle, get_template, render
from mlx_llava.convert import read_source
from mlx_llava.processor import Processor
from mlx_llava.train import TrainArgs
from mlx_llava.train.data import BadSamplePolicy, normalise_messages, prepare_samples
from mlx_llava.train.trainer import Trainer

DATA = Path(__file__).parent / "fixtures" / "data"
TOWER = DATA / "orig-spm-clip"
CHECKPOINTS = ["orig-spm-v15", "orig-spm-v1"]
CLIP_TOKENIZER_FILES = {"vocab.json", "merges.txt"}
LLAVA_TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
IMAGE = DATA / "images" / "a.png"
IGNORE_INDEX = -100
# "</s>" inside a turn splits the original's rounds: preprocess_v1 can mask nothing and its length
# check drops the sample ("tokenization mismatch"); mlx-llava trains the answers.
MISMASKED = {"eos_in_question"}


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


def original_mask(entry: dict, n: int) -> list[bool]:
    """Where the original trains (targets not IGNORE), images expanded to `n` positions; the
    targets before its length check where that check threw them away."""
    labels = entry["labels_before_check"] or entry["labels"]
    out = []
    for label, token in zip(labels, entry["input_ids"]):
        out.extend([label != IGNORE_INDEX] * (n if token == -200 else 1))
    return out


def training_sample(processor: Processor, entry: dict, name: str = "case"):
    """The sample the trainer makes of the entry's record, and the template."""
    template = get_template(entry["template"])
    policy = BadSamplePolicy("stop")
    [sample] = prepare_samples([entry["record"]], processor, template, IMAGE.parent, 4096, policy)
    return sample, template


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


@pytest.mark.parametrize("name", CHECKPOINTS + ["orig-spm-strings"])
def test_each_token_spans_the_text_it_encodes(name):
    """`encode_with_offsets`: the ids of `encode`, each with the characters it encodes; a piece
    SentencePiece aligns to nothing (dummy-prefix "▁", leading bytes of a character) has the
    span of the character it belongs to."""
    from mlx_llava.llama_tokenizer import SlowLlamaTokenizer

    tokenizer = SlowLlamaTokenizer.from_folder(DATA / name)
    texts = list(oracle(DATA / name)["prompts"].values())
    texts += [e["conversation"] for e in oracle(DATA / "orig-spm-v15")["training"].values()]
    texts += [" a  b", "日本 🐱", "x</s> y", "a\u2581b \u2581"]
    for text in texts:
        ids, spans = tokenizer.encode_with_offsets(text)
        assert ids == tokenizer.encode(text) and spans[0] == (0, 0)
        tokens = tokenizer.tokenize(text)
        for i, (token, (a, b)) in enumerate(zip(tokens, spans[1:])):
            assert 0 <= a < b <= len(text) and a >= spans[i][0], (text, token)
            surface = text[a:b]
            if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
                assert int(token[3:5], 16) in surface.encode(), (text, token, surface)
            elif token in tokenizer.special:
                assert surface == token
            elif token == "\u2581" and surface not in " \u2581":  # the dummy prefix
                assert spans[i + 2] == (a, b), (text, surface)
            else:
                assert surface.replace(" ", "\u2581") in (token, token[1:]), (text, token)


# Training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_training_samples_have_the_original_ids_and_masks(name):
    """Each record, rendered and tokenized as the trainer does it, gives the original's
    conversation, its ids (= the processor's inference ids of that text) and its targets."""
    meta = oracle(DATA / name)
    config = read_source(DATA / name, TOWER).config
    processor = Processor.from_pretrained(DATA / name, config)
    image_id, n = config.image_token_index, config.num_image_tokens
    assert len(meta["training"]) >= 10
    for case, entry in meta["training"].items():
        sample, template = training_sample(processor, entry, case)
        plain = template.sep_style is SeparatorStyle.PLAIN
        messages = normalise_messages(entry["record"], case, plain)
        text = render(template, messages, add_generation_prompt=False)
        assert text == entry["conversation"], case
        expected = expanded(entry["input_ids"], image_id, n)
        assert sample.ids.tolist() == expected == processor.tokenize(text), case
        if case not in MISMASKED:
            assert sample.mask.tolist() == original_mask(entry, n), case


def test_the_original_drops_v15_multi_turn_samples_for_an_unk():
    """4.31 with v1.5's `legacy: false` turns the "▁USER" after "</s>" into the piece "USER"
    (<unk> in this vocabulary), and preprocess_v1 counts <unk> as padding (pad = unk): its
    arithmetic masked these samples right, its length check then threw the masks away. The
    trainer keeps them (their masks are compared above)."""
    meta = oracle(DATA / "orig-spm-v15")
    unk = spm.SentencePieceProcessor(model_file=str(DATA / "orig-spm-v15" / "tokenizer.model"))
    unk = unk.unk_id()
    dropped = {c: e for c, e in meta["training"].items() if e["mismatch"] and c not in MISMASKED}
    assert set(dropped) == {"multi_turn", "text_only"}
    for entry in dropped.values():
        ids = entry["input_ids"]
        assert entry["mismatch"] == [len(ids), len(ids) - ids.count(unk)] and unk in ids
        assert set(entry["labels"]) == {IGNORE_INDEX}
    assert not any(e["mismatch"] for c, e in oracle(DATA / "orig-spm-v1")["training"].items()
                   if c not in MISMASKED)  # fmt: skip


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_eos_inside_a_question_still_trains_the_answer(name):
    """Where the original masks nothing (a "</s>" in the question), the trainer trains what
    generation has to produce after the prompt: the answer up to and including its </s>."""
    meta = oracle(DATA / name)
    entry = meta["training"]["eos_in_question"]
    assert entry["mismatch"] and set(entry["labels"]) == {IGNORE_INDEX}
    config = read_source(DATA / name, TOWER).config
    processor = Processor.from_pretrained(DATA / name, config)
    sample, template = training_sample(processor, entry)
    messages = normalise_messages(entry["record"], "case", plain=False)
    prompt = processor.tokenize(render(template, messages[:1]))
    ids = sample.ids.tolist()
    assert ids[: len(prompt)] == prompt and ids[-1] == meta["eos_token_id"]
    assert sample.mask.tolist() == [False] * len(prompt) + [True] * (len(ids) - len(prompt))
    assert processor.decode(ids[len(prompt) :]) == "It ends a turn."  # "▁It": a leading space


def test_both_stages_train_from_a_converted_original(converted, tmp_path):
    """A converted original trains stage 1 then stage 2 on the original's ids and masks, and
    the folder each stage writes still tokenizes as the original at inference."""
    name, out, _, _ = converted
    meta = oracle(DATA / name)
    cases = {c: e for c, e in meta["training"].items() if c not in MISMASKED}
    model = out
    for stage, template in (("pretrain", "plain"), ("finetune", "vicuna_v1")):
        chosen = {c: e for c, e in cases.items() if e["template"] == template}
        data = tmp_path / f"{stage}.json"
        data.write_text(json.dumps([dict(e["record"], id=c) for c, e in chosen.items()]))
        args = TrainArgs(
            model=str(model),
            data=str(data),
            output=str(tmp_path / stage),
            stage=stage,
            image_folder=str(IMAGE.parent),
            iters=2,
            batch_size=2,
            log_every=1,
            compile=False,
        )
        trainer = Trainer(args)
        config = trainer.config
        assert trainer.template.name == template
        assert trainer.processor.original_tokenizer is not None
        assert [s.id for s in trainer.samples] == list(chosen)
        for sample, entry in zip(trainer.samples, chosen.values()):
            ids = expanded(entry["input_ids"], config.image_token_index, config.num_image_tokens)
            assert sample.ids.tolist() == ids, sample.id
            assert sample.mask.tolist() == original_mask(entry, config.num_image_tokens)
        model = trainer.run()
        log = [json.loads(line) for line in (model / "train_log.jsonl").read_text().splitlines()]
        assert len(log) == 2 and all(0 < e["loss"] < 100 for e in log)
        _, processor = load(model, dtype="float32")
        assert processor.original_tokenizer is not None
        assert_original_ids(processor, meta)
        for file in LLAVA_TOKENIZER_FILES:
            assert (model / file).read_bytes() == (DATA / name / file).read_bytes(), file
