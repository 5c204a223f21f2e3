"""The weight dtypes a model can be converted to, by the names the CLIs take.

Its own module so that both the loader (elm_mlx.load) and the converter
(convert.pipeline) can import it without importing each other.
"""

from typing import Tuple

import mlx.core as mx

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_dtype(gpu_dtype: str) -> Tuple[str, str]:
    """The dtype to convert to when none is named, and why in a few words.

    It follows the device the model will run on, taken to be MLX's default
    device here. On the CPU half precision is slow, so float32: the demo model
    generated 222 tok/s in float32 against 93 in float16, and 167 tok/s in 4-bit
    with float32 scales against 7 with float16 scales (2-core x86-64 VM,
    OpenBLAS). On the GPU the model's own half precision, `gpu_dtype`: float16,
    or bfloat16 where float16 overflows (3B).
    """
    if mx.default_device() == mx.cpu:
        return "float32", "MLX runs on the CPU here"
    return gpu_dtype, "MLX runs on the GPU here"
