"""elm-mlx: Apple's OpenELM language models on MLX.

    from elm_mlx import load, generate
    model, tokenizer = load("path/to/OpenELM-270M-Instruct-mlx")
    print(generate(model, tokenizer, "Once upon a time", max_tokens=64))
"""

import importlib

# Must run before anything imports mlx (see _blas.py).
from ._blas import preload_optimized_blas

BLAS = preload_optimized_blas()

# The public API, imported on first use so that `python -m elm_mlx.generate`
# does not import its own module twice.
_EXPORTS = {
    "load": ".load",
    "generate": ".generate",
    "stream_generate": ".generate",
    "GenerationResponse": ".generate",
    "SamplingParams": ".sample",
    "ElmError": ".errors",
}
__all__ = [*_EXPORTS, "BLAS"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
