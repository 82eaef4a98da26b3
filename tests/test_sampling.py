"""`SamplingParams`: the one sampling type, valid once made, and its adapters (CLI flags, the
OpenAI and Ollama fields) naming the field that is out of range."""

import math

import pytest

from mlx_llava.cli import generate as generate_cli
from mlx_llava.sampling import SamplingError, SamplingParams


def test_defaults_are_greedy_and_unseeded():
    params = SamplingParams()
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.0, 0.0, 0, 0.0)
    assert params.seed is None and params.stop == () and params.repetition_penalty is None


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_tokens", 0, "max_tokens must be >= 1, got 0"),
        ("max_tokens", 2.5, "max_tokens must be an integer"),
        ("max_tokens", True, "max_tokens must be an integer"),
        ("temperature", -0.1, "temperature must be in [0, 2]"),
        ("temperature", 1e308, "temperature must be in [0, 2]"),
        ("temperature", math.inf, "temperature must be in [0, 2]"),
        ("temperature", math.nan, "temperature must be in [0, 2]"),
        ("temperature", "0.5", "temperature must be a number"),
        ("top_p", 1.5, "top_p must be in [0, 1]"),
        ("min_p", -1, "min_p must be in [0, 1]"),
        ("top_k", -3, "top_k must be >= 0"),
        ("repetition_penalty", 0, "repetition_penalty must be > 0"),
        ("repetition_penalty", -1.0, "repetition_penalty must be > 0, got -1.0"),
        ("repetition_context_size", 0, "repetition_context_size must be in [1, "),
        ("seed", -2, "seed must be in [0, 2**64) or -1 for random"),
        ("seed", 2**64, "seed must be in [0, 2**64) or -1 for random"),
        ("seed", 2**70, "seed must be in [0, 2**64) or -1 for random"),
        ("stop", ["x"] * 17, "stop takes at most 16 strings"),
        ("stop", ["x" * 1001], "stop strings must be at most 1000 characters"),
        ("stop", [1], "stop must be a string or a list of strings"),
    ],
)
def test_every_field_is_range_checked(field, value, message):
    with pytest.raises(SamplingError) as raised:
        SamplingParams(**{field: value})
    assert raised.value.field == field
    assert str(raised.value).startswith(message), str(raised.value)


def test_minus_one_seeds_randomly_and_stop_strings_are_normalized():
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "", "b"]).stop == ("a", "b")


def test_replace_takes_only_the_fields_given():
    defaults = SamplingParams(max_tokens=512, temperature=0.7)
    assert defaults.replace(max_tokens=None, temperature=0.0) == SamplingParams(max_tokens=512)
    with pytest.raises(SamplingError, match="top_k"):
        defaults.replace(top_k=-1)


def test_json_round_trip_for_the_ranks_of_a_pipeline():
    params = SamplingParams(max_tokens=7, temperature=0.5, seed=5, stop=["x", "yz"])
    assert SamplingParams.from_json(params.to_json()) == params


def test_cli_errors_name_the_flag():
    args = generate_cli.build_parser().parse_args(["--top-p", "1.5"])
    with pytest.raises(ValueError, match=r"^--top-p must be in \[0, 1\], got 1.5$"):
        generate_cli.sampling_kwargs(args)


def test_a_batch_of_mixed_settings_samples_each_row_by_its_own():
    """One draw for the whole batch, each row filtered by its own settings: a row whose
    filters leave one token (top-k 1, a tiny top-p, min-p 1) answers as greedy decoding does,
    beside a greedy row and a hot one that does not."""
    from pathlib import Path

    import mlx.core as mx

    from mlx_llava import load, stream_generate
    from mlx_llava.decoding import BatchEngine, make_row
    from mlx_llava.prompt import encode_prompt, prompt_embeddings

    model, processor = load(Path(__file__).parent / "fixtures" / "data" / "hf-hub", "float32")
    prompt = processor.format_prompt("Tell me a story.", num_images=0)
    greedy = [r.token for r in stream_generate(model, processor, prompt, max_tokens=16)]
    settings = [
        SamplingParams(max_tokens=16, temperature=1.0, top_k=1),
        SamplingParams(max_tokens=16),
        SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6),
        SamplingParams(max_tokens=16, temperature=1.0, min_p=1.0),
        SamplingParams(max_tokens=16, temperature=2.0),
    ]
    input_ids, _, _, _ = encode_prompt(model, processor, prompt, [])
    embeddings = prompt_embeddings(model, input_ids, None)
    mx.random.seed(0)
    engine = BatchEngine(model)
    rows = [make_row(model, processor, input_ids[0], params) for params in settings]
    for row in rows:
        engine.add(row, embeddings)
    while engine:
        engine.step()
    assert [row.tokens for row in rows[:4]] == [greedy] * 4
    assert rows[4].tokens != greedy
