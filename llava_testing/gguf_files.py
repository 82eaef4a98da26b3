"""GGUF files for tests and fixtures, written with the gguf package (llama.cpp's gguf-py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def requantize(src: Path, dst: Path, qtype) -> None:
    """Copy a GGUF, quantizing its 2-D tensors to `qtype` with gguf's reference quantizer."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if name == "general.file_type":
            value = gguf.LlamaFileType[f"MOSTLY_{qtype.name}"]
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if data.ndim == 2:
            data = gguf.quants.quantize(data.astype(np.float32), qtype)
            writer.add_tensor(tensor.name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
