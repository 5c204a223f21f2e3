"""elm-mlx: Apple's OpenELM language models on MLX.

from elm_mlx import load, generate, batch_generate
model, tokenizer = load("path/to/OpenELM-270M-Instruct-mlx")
print(generate(model, tokenizer, "Once upon a time", max_tokens=64))
results = batch_generate(model, tokenizer, ["Once upon a time", "To be"], max_tokens=64)  # decoded together
"""

import sys
import types

# Must run before anything imports mlx (see _blas.py).
from ._blas import preload_optimized_blas  # noqa: E402

BLAS = preload_optimized_blas()

from .batching import BatchEngine, batch_generate  # noqa: E402
from .constrain import Constraint  # noqa: E402
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
    "Constraint",
    "ElmError",
    "BLAS",
]
__version__ = "0.1.0"


class _Package(types.ModuleType):
    """Importing the command-line module elm_mlx.generate (as `elm-mlx generate` does) would make Python set
    the package attribute `generate` to that module, replacing the function; keep the function."""

    def __setattr__(self, name, value):
        if name == "generate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
