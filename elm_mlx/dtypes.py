"""The weight dtypes a model can be converted to, by the names the CLIs take.

Its own module so that both the loader (elm_mlx.load) and the converter
(convert.pipeline) can import it without importing each other.
"""

import mlx.core as mx

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
