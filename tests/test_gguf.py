"""llama.cpp GGUF pairs and Ollama's store, against the original checkpoint they were made from.

tests/fixtures/data/gguf-v15 was written by llama.cpp's own converters from gguf-src (an original
LLaVA-1.5 checkpoint with a real SentencePiece tokenizer) and its tower orig-spm-clip (bf16 by
convert_hf_to_gguf.py), the Q4_0 and Q4_1 files by the gguf package's reference quantizer;
gguf-kq's k-quants by llama.cpp's llama-quantize; gguf-v16 the same way from gguf-src-next
(LLaVA-1.6) (tests/fixtures/make_gguf_fixtures.py). The reference is the checkpoint with the
GGUF's weights put back (dequantized by the gguf package), loaded from the original format.
"""

import json
import shutil
from hashlib import sha256
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from llava_testing.parity import assert_logits_close, greedy_tokens
from mlx_llava import convert, load
from mlx_llava.cli import generate as generate_cli
from mlx_llava.config import ConfigError

gguf = pytest.importorskip("gguf")
from safetensors.numpy import load_file, save_file  # noqa: E402

DATA = Path(__file__).parent / "fixtures" / "data"
PAIR = DATA / "gguf-v15"
SOURCE, TOWER = DATA / "gguf-src", DATA / "orig-spm-clip"
MMPROJ = PAIR / "mmproj-model-f16.gguf"
IMAGE = DATA / "images" / "a.png"
QUESTION = "What is in the picture?"
# kind: (original checkpoint, language-model GGUF, mmproj, GGML type of its matrices)
PAIRS = {
    "f16": (SOURCE, PAIR / "ggml-model-f16.gguf", MMPROJ, "F16"),
    "bf16": (SOURCE, PAIR / "ggml-model-bf16.gguf", MMPROJ, "BF16"),  # convert_hf_to_gguf.py
    "q8_0": (SOURCE, PAIR / "ggml-model-q8_0.gguf", MMPROJ, "Q8_0"),
    "q4_0": (SOURCE, PAIR / "ggml-model-q4_0.gguf", MMPROJ, "Q4_0"),
    "q4_1": (SOURCE, PAIR / "ggml-model-q4_1.gguf", MMPROJ, "Q4_1"),
    "next-q8_0": (
        DATA / "gguf-src-next",
        DATA / "gguf-v16" / "ggml-model-q8_0.gguf",
        DATA / "gguf-v16" / "mmproj-model-f16.gguf",
        "Q8_0",
    ),
}
NEXT_IMAGE = DATA / "images" / "wide.png"


def text_gguf(kind: str) -> Path:
    return PAIRS[kind][1]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """examples/convert_legacy_llama.py's `permute` (q and k rows for ggml's rope)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def stored(tensor) -> np.ndarray:
    """A GGUF tensor as llama.cpp stored it, dequantized by the gguf package [rows, cols]."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return values.reshape(tuple(int(d) for d in reversed(tensor.shape)))


def as_stored(w: np.ndarray, tensor) -> np.ndarray:
    """`w` through the GGUF tensor's type: quantized and dequantized by the gguf package."""
    qtype = tensor.tensor_type
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)


def reference_checkpoint(kind: str, out: Path) -> tuple[Path, Path]:
    """The original checkpoint and its tower with the pair's weights put back, in the original
    format.

    Each original tensor W becomes its GGUF tensor dequantized. Quantization works on rows, so
    for q and k (whose rows llama.cpp permutes) that is W through the same quantizer: asserted
    against the file, tensor by tensor.
    """
    source, text_file, mmproj_file, matrix_type = PAIRS[kind]
    config = json.loads((source / "config.json").read_text())
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    text = {t.name: t for t in gguf.GGUFReader(text_file).tensors}
    state = load_file(source / "model.safetensors")
    for key, w in state.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None or name not in text:  # projector, tower, newline (mmproj), rope buffers
            continue
        tensor = text[name]
        assert tensor.tensor_type.name == (matrix_type if w.ndim == 2 else "F32"), name
        state[key] = as_stored(w, tensor)
        head = next((n for k, n in heads.items() if f".{k}." in key), None)
        expected = llama_cpp_permute(state[key], head) if head else state[key]
        np.testing.assert_array_equal(stored(tensor), expected, err_msg=name)
    # convert_image_encoder_to_gguf.py: every matrix (and the patch kernel) f16, the rest f32.
    mmproj = gguf.GGUFReader(mmproj_file).tensors
    assert {t.tensor_type.name for t in mmproj if len(t.shape) >= 2} == {"F16"}
    assert {t.tensor_type.name for t in mmproj if len(t.shape) == 1} == {"F32"}
    vision = ("model.mm_projector.", "model.vision_tower.")  # LLaVA-1.6 ships its tower inside
    for key in [k for k in state if k.startswith(vision) and state[k].ndim >= 2]:
        state[key] = state[key].astype(np.float16).astype(np.float32)
    tower = load_file(TOWER / "model.safetensors")
    for key, w in tower.items():
        if key.startswith("vision_model.") and w.ndim >= 2:
            tower[key] = w.astype(np.float16).astype(np.float32)
    ref, ref_tower = out / "ref", out / "ref-clip"
    shutil.copytree(source, ref)
    shutil.copytree(TOWER, ref_tower)
    save_file(state, ref / "model.safetensors", metadata={"format": "pt"})
    save_file(tower, ref_tower / "model.safetensors", metadata={"format": "pt"})
    return ref, ref_tower


@pytest.fixture(scope="module", params=list(PAIRS))
def pair(request, tmp_path_factory):
    """(kind, GGUF model, its processor, reference model, reference processor)."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"gguf-{kind}")
    ref, ref_tower = reference_checkpoint(kind, tmp)
    reference = load(convert(ref, tmp / "mlx", dtype="float32", vision_tower=ref_tower))
    model, processor = load(text_gguf(kind), mmproj=PAIRS[kind][2], dtype="float32")
    return (kind, model, processor, *reference)


def test_config_and_template(pair):
    kind, model, processor, reference, _ = pair
    ours, theirs = model.config, reference.config
    assert ours.text_config == theirs.text_config
    assert ours.vision_config.num_hidden_layers == theirs.vision_config.num_hidden_layers - 1
    assert ours.image_token_index == -200 and ours.conv_mode == "vicuna_v1"
    assert (ours.model_type, ours.image_aspect_ratio) == (
        theirs.model_type,
        theirs.image_aspect_ratio,
    )
    assert ours.image_grid_pinpoints == theirs.image_grid_pinpoints
    assert processor.format_prompt(QUESTION) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
        f"{QUESTION} ASSISTANT:"
    )


def test_token_ids_are_the_original_codes(pair):
    """The GGUF's own vocabulary encodes every prompt as the original release's tokenizer_image_
    token did (orig-spm-v15's oracle, the same tokenizer.model)."""
    _, _, processor, _, _ = pair
    assert (SOURCE / "tokenizer.model").read_bytes() == (
        DATA / "orig-spm-v15" / "tokenizer.model"
    ).read_bytes()
    oracle = json.loads((DATA / "orig-spm-v15" / "oracle.json").read_text())
    for name, prompt in oracle["prompts"].items():
        assert processor._encode(prompt, True, False)[0] == oracle["input_ids"][name], name


def test_quantized_files_stay_quantized(pair):
    kind, model, _, _, _ = pair
    lm = model.language_model
    layers = [lm.model.embed_tokens, lm.lm_head, lm.model.layers[0].self_attn.k_proj]
    if kind in ("f16", "bf16"):
        assert not any(hasattr(layer, "scales") for layer in layers)
        return
    bits = int(kind.split("-")[-1][1])
    for layer in layers:
        assert isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        assert (layer.bits, layer.group_size) == (bits, 32)


def test_logits_and_greedy_tokens_match_the_reference(pair):
    kind, model, processor, reference, ref_processor = pair
    prompt = processor.format_prompt(QUESTION)
    image = NEXT_IMAGE if model.config.is_next else IMAGE
    inputs = processor(prompt, [image])
    expected = ref_processor(prompt, [image])
    np.testing.assert_array_equal(np.array(inputs["input_ids"]), np.array(expected["input_ids"]))
    np.testing.assert_allclose(
        np.array(inputs["pixel_values"]), np.array(expected["pixel_values"]), atol=1e-6
    )
    assert inputs["image_sizes"] == expected["image_sizes"]
    pictures = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    logits = model(inputs["input_ids"], **pictures)
    assert_logits_close(logits, reference(inputs["input_ids"], **pictures))
    tokens = greedy_tokens(model, processor, prompt, [image], 24)
    assert tokens == greedy_tokens(reference, ref_processor, prompt, [image], 24)


def test_convert_gguf_to_an_mlx_folder(tmp_path):
    model, processor = load(text_gguf("q8_0"), mmproj=MMPROJ, dtype="float32")
    out = convert(text_gguf("q8_0"), tmp_path / "mlx", dtype="float32", mmproj=MMPROJ)
    converted, converted_processor = load(out)
    prompt = processor.format_prompt(QUESTION)
    inputs = processor(prompt, [IMAGE])
    again = converted_processor(prompt, [IMAGE])
    np.testing.assert_array_equal(np.array(inputs["input_ids"]), np.array(again["input_ids"]))
    ours = converted(inputs["input_ids"], pixel_values=inputs["pixel_values"])
    assert_logits_close(ours, model(inputs["input_ids"], pixel_values=inputs["pixel_values"]))


def test_a_folder_holding_one_pair(tmp_path):
    folder = tmp_path / "pair"
    folder.mkdir()
    for file in (text_gguf("q4_0"), MMPROJ):
        shutil.copy(file, folder / file.name)
    model, _ = load(folder, dtype="float32")
    assert model.language_model.lm_head.bits == 4


def make_store(root: Path, name: str, tag: str, layers: dict[str, bytes]) -> None:
    """An Ollama store as `ollama pull` leaves it: blobs named by digest, and a manifest."""
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    entries = []
    for kind, data in layers.items():
        digest = "sha256:" + sha256(data).hexdigest()
        (root / "blobs" / digest.replace(":", "-")).write_bytes(data)
        media = f"application/vnd.ollama.image.{kind}"
        entries.append({"mediaType": media, "digest": digest, "size": len(data)})
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": entries}))


OLLAMA_TEMPLATE = "[INST] {{ if .System }}{{ .System }} {{ end }}{{ .Prompt }} [/INST]"


def test_ollama_store(tmp_path, monkeypatch, capsys):
    store = tmp_path / "models"
    files = {"model": text_gguf("q4_0").read_bytes(), "projector": MMPROJ.read_bytes()}
    params = json.dumps({"stop": ["[INST]", "</s>"]}).encode()
    make_store(store, "llava", "latest", files)
    make_store(
        store,
        "llava",
        "7b-v1.6-mistral-q4_0",
        {**files, "template": OLLAMA_TEMPLATE.encode(), "params": params},
    )
    make_store(store, "llava", "no-projector", {"model": files["model"]})
    make_store(
        store, "clip", "latest", {"model": files["projector"], "projector": files["projector"]}
    )
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    model, processor = load("ollama:llava", dtype="float32")
    direct, _ = load(text_gguf("q4_0"), mmproj=MMPROJ, dtype="float32")
    ids = processor(processor.format_prompt(QUESTION), [IMAGE])
    assert_logits_close(
        model(ids["input_ids"], pixel_values=ids["pixel_values"]),
        direct(ids["input_ids"], pixel_values=ids["pixel_values"]),
    )
    assert processor.config.conv_mode == "vicuna_v1" and processor.stop == []
    assert processor.system is None  # no system layer: the template's own
    assert processor.format_prompt(QUESTION).startswith("A chat between a curious user")
    _, tagged = load("ollama:llava:7b-v1.6-mistral-q4_0", dtype="float32")
    assert tagged.config.conv_mode == "mistral_instruct"
    assert tagged.stop == ["[INST]", "</s>"]
    assert tagged.format_prompt("Hi").startswith("[INST] <image>\nHi [/INST]")
    errors = {
        "ollama:llava:missing": "not found",
        "ollama:llava:no-projector": "no projector layer",
        "ollama:clip": "not LLaVA",
    }
    for name, fragment in errors.items():
        with pytest.raises((FileNotFoundError, ConfigError), match=fragment):
            load(name)
        with pytest.raises(SystemExit) as exit_:
            generate_cli.main(["--model", name, "--image", str(IMAGE), "-p", "Hi"])
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and fragment in err and len(err.strip().splitlines()) == 1


def test_generate_cli_with_a_pair(capsys):
    argv = ["--model", str(text_gguf("q8_0")), "--mmproj", str(MMPROJ), "--image", str(IMAGE)]
    generate_cli.main([*argv, "-p", QUESTION, "-m", "4", "--dtype", "float32"])
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit) as exit_:
        generate_cli.main(["--model", str(text_gguf("q8_0")), "--image", str(IMAGE)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "--mmproj" in err and len(err.strip().splitlines()) == 1


def test_unreadable_types_are_refused_in_one_line(tmp_path):
    """MLX reads Q4_0, Q4_1 and Q8_0 only: a Q5_0 file is refused by name, not half-read."""
    from llava_testing.gguf_files import requantize

    q5 = tmp_path / "ggml-model-q5_0.gguf"
    requantize(text_gguf("f16"), q5, gguf.GGMLQuantizationType.Q5_0)
    with pytest.raises(ValueError, match="Q5_0 tensors, which MLX cannot read"):
        load(q5, mmproj=MMPROJ)


def test_ollama_system_layer_is_the_default_system_prompt(tmp_path, monkeypatch):
    """An Ollama model's SYSTEM (its `system` layer) fills the template's system prompt, as
    Ollama's `.System` does, until a request brings its own system message. It is rendered
    where and as the conversation template puts a system prompt (for the Mistral template the
    original LLaVA's `<<SYS>>` block, where Ollama's own template would write it bare)."""
    from mlx_llava.chat import ChatSession
    from mlx_llava.server.messages import Message, render_conversation

    system = "You describe pictures in one short sentence."
    files = {"model": text_gguf("q4_0").read_bytes(), "projector": MMPROJ.read_bytes()}
    store = tmp_path / "models"
    make_store(store, "llava", "v15", {**files, "system": system.encode()})
    make_store(
        store,
        "llava",
        "mistral",
        {**files, "system": system.encode(), "template": OLLAMA_TEMPLATE.encode()},
    )
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    model, processor = load("ollama:llava:v15", dtype="float32")
    assert processor.system == system
    expected = f"{system} USER: <image>\n{QUESTION} ASSISTANT:"  # vicuna_v1's rendering
    assert processor.format_prompt(QUESTION) == expected
    assert ChatSession(model, processor, image=IMAGE).prompt(QUESTION)[1] == expected
    prompt, _ = render_conversation(processor, [Message("user", QUESTION, [IMAGE])])
    assert prompt == expected
    own = [Message("system", "Be brief."), Message("user", QUESTION, [IMAGE])]
    assert render_conversation(processor, own)[0].startswith("Be brief. USER: <image>\n")
    _, mistral = load("ollama:llava:mistral", dtype="float32")
    assert (
        mistral.format_prompt("Hi") == f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n<image>\nHi [/INST]"
    )


def test_bf16_stays_bf16_without_a_dtype():
    from mlx_llava.gguf import read_pair

    weights = read_pair(text_gguf("bf16"), MMPROJ).weights
    assert weights["language_model.model.layers.0.self_attn.q_proj.weight"].dtype == mx.bfloat16
    assert weights["language_model.lm_head.weight"].dtype == mx.bfloat16


KQ = DATA / "gguf-kq"  # llama-quantize's Q4_K_M and Q5_K_M of a 256-wide model
KQ_MMPROJ = KQ / "mmproj-model-f16.gguf"
KQ_TEXT = KQ / "ggml-model-Q4_K_M.gguf"


def kquant_layers(path: Path) -> dict[str, tuple[str, int]]:
    """Our module path -> (GGML type, MLX bits) of each k-quant matrix of a GGUF."""
    from mlx_llava.gguf import REQUANTIZED_BITS, tensor_types
    from mlx_llava.weights import to_mlx_key

    return {
        to_mlx_key(name, "gguf")[: -len(".weight")]: (kind, REQUANTIZED_BITS[kind])
        for name, kind in tensor_types(path).items()
        if kind in REQUANTIZED_BITS
    }


@pytest.fixture(scope="module")
def kquant(tmp_path_factory):
    """(model, processor, the note printed, reference model).

    The reference is the file with every tensor dequantized by the gguf package (float32, keys
    copied), loaded as a float model; its Q6_K layers then quantized as MLX quantizes a float
    layer (`nn.quantize`, 8 bits, group 32), as the loader must (MLX has no 6-bit layout of
    Q6_K's 16-weight sub-blocks). Q4_K layers stay float: the loader keeps their values.
    """
    import contextlib
    import io

    from llava_testing.gguf_files import dequantize_copy

    twin = tmp_path_factory.mktemp("kq") / "ggml-model-f32.gguf"
    dequantize_copy(KQ_TEXT, twin)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        model, processor = load(KQ_TEXT, mmproj=KQ_MMPROJ, dtype="float32")
    reference, _ = load(twin, mmproj=KQ_MMPROJ, dtype="float32")
    requantized = {path for path, (kind, _) in kquant_layers(KQ_TEXT).items() if kind == "Q6_K"}
    nn.quantize(reference, group_size=32, bits=8, class_predicate=lambda p, _: p in requantized)
    return model, processor, err.getvalue(), reference


def test_kquants_are_held_quantized_with_a_one_line_note(kquant):
    from mlx_llava.gguf import tensor_types

    model, _, note, reference = kquant
    assert set(tensor_types(KQ_TEXT).values()) == {"Q4_K", "Q6_K", "F32"}  # Q4_K_M's mix
    assert note.strip() == (
        "note: ggml-model-Q4_K_M.gguf: k-quants held as MLX affine: "
        "Q4_K -> 4-bit (the same values), Q6_K -> 8-bit (re-quantized)"
    )
    layers = kquant_layers(KQ_TEXT)
    assert {kind for kind, _ in layers.values()} == {"Q4_K", "Q6_K"}
    floats = dict(tree_flatten(reference.parameters()))
    for path, module in model.named_modules():
        if path not in layers:
            continue
        kind, bits = layers[path]
        assert (module.bits, module.group_size) == (bits, 32), path
        if kind == "Q4_K":  # exactly the values gguf's reference dequantizer gives
            values = mx.dequantize(module.weight, module.scales, module.biases, 32, 4)
            np.testing.assert_array_equal(np.array(values), np.array(floats[f"{path}.weight"]))


def test_kquant_logits_and_greedy_tokens_match_the_dequantized_file(kquant):
    model, processor, _, reference = kquant
    prompt = processor.format_prompt(QUESTION)
    inputs = processor(prompt, [IMAGE])
    pictures = dict(pixel_values=inputs["pixel_values"])
    assert_logits_close(
        model(inputs["input_ids"], **pictures), reference(inputs["input_ids"], **pictures)
    )
    tokens = greedy_tokens(model, processor, prompt, [IMAGE], 24)
    assert tokens == greedy_tokens(reference, processor, prompt, [IMAGE], 24)


def test_kquants_mlx_cannot_read_are_refused_in_one_line(capsys):
    """Q5_K_M (Q5_K and Q6_K tensors, llama-quantize's): MLX reads no Q5_K."""
    text = KQ / "ggml-model-Q5_K_M.gguf"
    with pytest.raises(ValueError, match="Q5_K tensors, which MLX cannot read"):
        load(text, mmproj=KQ_MMPROJ)
    with pytest.raises(SystemExit) as exit_:
        generate_cli.main(["--model", str(text), "--mmproj", str(KQ_MMPROJ), "-p", "Hi"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Q5_K" in err and len(err.strip().splitlines()) == 1
