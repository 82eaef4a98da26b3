"""mlx_llava.gguf's reader of GGUF files (the gguf package's memory map, one tensor or chunk at a
time) against MLX's own: `mx.load(path, format="gguf", return_metadata=True)` is the reference
for the metadata and for every tensor type it reads right (F32, F16, I32, Q4_0, Q4_1, Q8_0),
bit for bit. BF16 (which `mx.load` makes float16) and the k-quants (which it dequantizes to
float16, Q4_K wrongly) are checked against the gguf package in test_gguf.py.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from mlx_llava.gguf import gguf_metadata, read_gguf, read_tensor, tensor_types  # noqa: E402

DATA = Path(__file__).parent / "fixtures" / "data"
FILES = sorted(DATA.glob("gguf-*/*.gguf"))
MLX_READS_RIGHT = {"F32", "F16", "I8", "I16", "I32", "Q4_0", "Q4_1", "Q8_0"}
KQUANTS = {"Q2_K", "Q4_K", "Q6_K"}


def assert_bit_identical(ours: mx.array, theirs: mx.array, name: str) -> None:
    assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape), name
    assert np.array(ours).tobytes() == np.array(theirs).tobytes(), name


def assert_metadata_equal(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert type(ours[key]) is type(value), key
        if isinstance(value, mx.array):
            assert_bit_identical(ours[key], value, key)
        else:
            assert ours[key] == value, key


def assert_reads_as_mx_load(path: Path) -> int:
    """read_gguf(path) against mx.load, and each quantized tensor again in chunks of 3 rows
    (a ragged last chunk); returns the number of tensors compared."""
    reference, reference_meta = mx.load(str(path), format="gguf", return_metadata=True)
    tensors, meta = read_gguf(path)
    assert_metadata_equal(meta, reference_meta)
    kinds = tensor_types(path)
    stems = [name[: -len(".weight")] for name, kind in kinds.items() if kind in KQUANTS]
    assert set(tensors) == set(reference) | {
        f"{s}.{k}" for s in stems for k in ("scales", "biases")
    }
    compared = 0
    for t in gguf.GGUFReader(path).tensors:
        if kinds[t.name] not in MLX_READS_RIGHT:
            continue
        chunked = read_tensor(t, chunk=3 * int(t.shape[0]))
        assert set(chunked) <= set(reference)
        for key in chunked:
            assert_bit_identical(tensors[key], reference[key], key)
            assert_bit_identical(chunked[key], reference[key], f"{key} (chunks of 3 rows)")
        compared += 1
    return compared


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fixture_files_read_as_mx_load_reads_them(path):
    kinds = set(tensor_types(path).values())
    if kinds - MLX_READS_RIGHT - KQUANTS - {"BF16"}:  # Q5_K_M: neither reads it
        with pytest.raises(RuntimeError, match="gguf_tensor_to_f16"):
            mx.load(str(path), format="gguf")
        with pytest.raises(ValueError, match="which MLX cannot read"):
            read_gguf(path)
        return
    assert assert_reads_as_mx_load(path) > 0


def test_the_fixtures_hold_every_type_mx_load_reads_right():
    kinds = set().union(*(tensor_types(p).values() for p in FILES))
    assert {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"} <= kinds


def random_blocks(rng, qtype, shape: tuple[int, ...]) -> np.ndarray:
    """Random bytes of `qtype` blocks for a tensor of `shape` (MLX order), every fp16 field
    finite: huge ones (whose -8d or -128d is inf), subnormal ones, zeros."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (*shape[:-1], shape[-1] // block, size), dtype=np.uint8)
    halves = 2 if qtype == gguf.GGMLQuantizationType.Q4_1 else 1  # d (and m) lead the block
    fp16 = data[..., : 2 * halves].view(np.uint16)
    fp16[(fp16 & 0x7C00) == 0x7C00] ^= 0x4000  # an exponent of all ones is inf or NaN
    first = data.reshape(-1, size)[:3, :2]  # zero, the smallest subnormal, the largest fp16
    first[:] = np.array([0x0000, 0x0001, 0x7BFF], np.uint16)[: len(first), None].view(np.uint8)
    return data.reshape(*shape[:-1], shape[-1] // block * size)


def write_every_kind(path: Path, float64: bool = False) -> None:
    """A GGUF file of random Q4_0 / Q4_1 / Q8_0 blocks (1-, 2- and 3-D), F16 / F32 / I32
    tensors, and a metadata value (and array) of every GGUF type, float64 only if asked (MLX
    0.32's `mx.load` crashes on one)."""
    rng = np.random.default_rng(0)
    T, V = gguf.GGMLQuantizationType, gguf.GGUFValueType
    writer = gguf.GGUFWriter(path, "llama")
    scalars = {
        V.UINT8: 200, V.INT8: -100, V.UINT16: 60000, V.INT16: -30000, V.UINT32: 4_000_000_000,
        V.INT32: -2_000_000_000, V.UINT64: 2**63 + 5, V.INT64: -(2**62), V.FLOAT32: 1e-5,
        V.BOOL: True, V.STRING: "llama ü", **({V.FLOAT64: 0.1} if float64 else {}),
    }  # fmt: skip
    for kind, value in scalars.items():
        writer.add_key_value(f"test.{kind.name.lower()}", value, kind)
        writer.add_key_value(f"test.{kind.name.lower()}s", [value] * 3, V.ARRAY, sub_type=kind)
    for qtype in (T.Q4_0, T.Q4_1, T.Q8_0):
        for shape in [(64,), (40, 96), (2, 5, 64)]:
            name = f"{qtype.name}.{len(shape)}d.weight"
            writer.add_tensor(name, random_blocks(rng, qtype, shape), raw_dtype=qtype)
    writer.add_tensor("f16.weight", rng.standard_normal((7, 33)).astype(np.float16))
    writer.add_tensor("f32.weight", rng.standard_normal((3, 5, 2)).astype(np.float32))
    writer.add_tensor("i32.weight", rng.integers(-9, 9, (11,), dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_random_blocks_and_every_metadata_type_read_as_mx_load(tmp_path):
    path = tmp_path / "every-kind.gguf"
    write_every_kind(path)
    assert assert_reads_as_mx_load(path) == 12
    assert gguf_metadata(gguf.GGUFReader(path))["test.strings"] == ["llama ü"] * 3
    biases = read_gguf(path)[0]["Q4_0.2d.biases"]
    assert np.isinf(np.array(biases)).any()  # -8 x 65504 is past fp16, in mx.load's too


def test_float64_metadata_is_float32(tmp_path):
    """As MLX's gguf.cpp converts it (`array(val->float64, float32)`)."""
    path = tmp_path / "float64.gguf"
    write_every_kind(path, float64=True)
    meta = gguf_metadata(gguf.GGUFReader(path))
    for value in (meta["test.float64"], meta["test.float64s"]):
        assert value.dtype == mx.float32
        np.testing.assert_array_equal(np.array(value), np.float32(0.1))
    assert meta["test.float64s"].shape == (3,)


@pytest.mark.parametrize("chunks", [1, 16])
def test_a_tensor_holds_its_arrays_and_one_chunk(tmp_path, chunks):
    """Read in chunks, a tensor's arrays are written in place: MLX's peak while reading it is
    the result plus a chunk, not twice the result; and once read, the result is all it holds
    (no array keeping the span of a strided view of the file)."""
    path = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    rng = np.random.default_rng(1)
    for qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1):
        blocks = random_blocks(rng, qtype, (1024, 1024))
        writer.add_tensor(f"{qtype.name}.weight", blocks, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for tensor in gguf.GGUFReader(path).tensors:
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        out = read_tensor(tensor, chunk=(1 << 20) // chunks)
        held = sum(v.nbytes for v in out.values())
        # (a few bytes of slack: MLX may keep a small array of its own from another test)
        assert held <= mx.get_active_memory() - before <= held + held // 64, tensor.name
        assert mx.get_peak_memory() - before <= held + 2 * held // chunks, tensor.name
        del out
