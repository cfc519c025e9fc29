"""Names, dtypes, shapes and byte sizes of the tensors in safetensors files, read from their headers
with safetensors' own `safe_open` (no tensor data is read): what `winq inspect` reports for GPTQ
folders and checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

from winq.errors import FormatError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_headers(*files) -> dict[str, dict]:
    """{tensor name: {dtype, shape, bytes}} over `files`; FormatError naming a file that is not safetensors."""
    from safetensors import SafetensorError, safe_open

    out = {}
    for file in files:
        try:
            with safe_open(str(file), "np") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    dtype, shape = sl.get_dtype(), list(sl.get_shape())
                    out[k] = {"dtype": dtype, "shape": shape, "bytes": math.prod(shape) * DTYPE_BYTES.get(dtype, 0)}
        except (SafetensorError, OSError, ValueError) as e:
            raise FormatError(f"{Path(file)}: corrupt safetensors file ({e})") from None
    return out
