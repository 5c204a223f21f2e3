"""elm-mlx: Apple's OpenELM language models on MLX.

from elm_mlx import load, generate, batch_generate
model, tokenizer = load("path/to/OpenELM-270M-Instruct-mlx")
print(generate(model, tokenizer, "Once upon a time", max_tokens=64))
results = batch_generate(model, tokenizer, ["Once upon a time", "To be"], max_tokens=64)  # decoded together
"""

# Must run before anything imports mlx (see _blas.py).
from ._blas import preload_optimized_blas

BLAS = preload_optimized_blas()

from .batching import BatchEngine, batch_generate  # noqa: E402
from .errors import ElmError  # noqa: E402
from .generation import GenerationResponse, generate, stream_generate  # noqa: E402
from .load import load  # noqa: E402
from .sample import SamplingParams  # noqa: E402

__all__ = [
    "load",
    "generate",
    "stream_generate",
    "batch_generate",
    "BatchEngine",
    "GenerationResponse",
    "SamplingParams",
    "ElmError",
    "BLAS",
]
__version__ = "0.1.0"
