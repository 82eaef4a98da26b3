"""GGUF files for tests and fixtures, written with the gguf package (llama.cpp's gguf-py)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np


def _copy(src: Path, dst: Path, file_type, tensor: Callable) -> None:
    """`src`'s keys (its file type replaced) and each tensor as `tensor(reader_tensor)` gives
    it: an array, or (bytes, GGML type)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = file_type if name == "general.file_type" else field.contents()
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        data = tensor(t)
        if isinstance(data, tuple):
            writer.add_tensor(t.name, data[0], raw_dtype=data[1])
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def requantize(src: Path, dst: Path, qtype) -> None:
    """Copy a GGUF, quantizing its 2-D tensors to `qtype` with gguf's reference quantizer."""
    import gguf

    def tensor(t):
        data = np.asarray(t.data)
        if data.ndim != 2:
            return data
        return gguf.quants.quantize(data.astype(np.float32), qtype), qtype

    _copy(src, dst, gguf.LlamaFileType[f"MOSTLY_{qtype.name}"], tensor)


def dequantize_copy(src: Path, dst: Path, dtype=np.float32) -> None:
    """Copy a GGUF with every tensor dequantized by gguf's reference dequantizer, as `dtype`."""
    import gguf

    def tensor(t):
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        return values.reshape(tuple(int(d) for d in reversed(t.shape))).astype(dtype)

    file_type = gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16
    _copy(src, dst, file_type, tensor)
