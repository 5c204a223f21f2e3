"""Use an optimized BLAS with MLX's Linux CPU wheel.

The `mlx[cpu]` wheel links a slow reference BLAS. Loading an optimized one
with RTLD_GLOBAL *before* mlx is imported makes the dynamic linker resolve
MLX's cblas/lapack calls to it instead (measured on a 2-core x86-64 VM,
OpenELM-270M shape in float32: prefill 2.6 -> 137 tok/s, decoding 2.5 -> 7.4
tok/s). Two routes, tried in this order:

- OpenBLAS from the system: `apt-get install libopenblas0-pthread`;
- Intel MKL from PyPI: `pip install 'elm-mlx[mkl]'`. The `mkl` wheel puts
  libmkl_rt.so.N, whose CBLAS symbols are unprefixed, into <prefix>/lib.

ELM_MLX_BLAS picks: auto (the default), openblas, mkl, or reference (also
0/off/no) to keep the wheel's own.
"""

import ctypes
import os
import site
import sys
from pathlib import Path
from typing import Iterable, List, Optional

OPENBLAS = ("libopenblas.so.0", "libopenblas.so")
OFF = ("0", "off", "no", "reference")
NOTICE = (
    "MLX is using its slow reference BLAS on this CPU; install OpenBLAS (apt-get install libopenblas0-pthread) "
    "or pip install 'elm-mlx[mkl]': float32 prompt processing and training run 9-50x faster with either (measured on 2 x86 cores)"
)

in_use = "not chosen yet"  # what preload_optimized_blas settled, as elm_mlx.BLAS reports it


def mkl_libraries(prefixes: Optional[Iterable[str]] = None) -> List[Path]:
    """libmkl_rt files of the `mkl` wheel: it installs them as data files into <prefix>/lib,
    where prefix is the venv's or interpreter's, or the user base after `pip install --user`."""
    if prefixes is None:
        prefixes = [sys.prefix, sys.exec_prefix, sys.base_prefix, site.getuserbase()]
    found: List[Path] = []
    for prefix in dict.fromkeys(prefixes):
        found += sorted(Path(prefix, "lib").glob("libmkl_rt.so.*"), reverse=True)  # newest soname first
    return found


def candidates(choice: str = "auto", prefixes: Optional[Iterable[str]] = None) -> List[str]:
    """The libraries to try, best first: OpenBLAS by soname (the system's library path), then MKL by file."""
    openblas = list(OPENBLAS) if choice in ("auto", "openblas") else []
    mkl = [str(p) for p in mkl_libraries(prefixes)] if choice in ("auto", "mkl") else []
    return openblas + mkl


def preload_optimized_blas() -> str:
    """Load the first BLAS of `candidates` globally; return a short name of the BLAS MLX will use."""
    global in_use
    in_use = _preload()
    return in_use


def _preload() -> str:
    if sys.platform != "linux":
        return "platform default"
    choice = os.environ.get("ELM_MLX_BLAS", "auto").lower()
    if choice in OFF:
        return "reference (ELM_MLX_BLAS)"
    if "mlx.core" in sys.modules:
        return "reference (mlx imported before elm_mlx)"
    for library in candidates(choice if choice in ("openblas", "mkl") else "auto"):
        try:
            ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return f"{'mkl' if 'mkl' in Path(library).name else 'openblas'} ({library})"
    return "reference (no OpenBLAS or MKL found)"


def slow_blas_notice() -> Optional[str]:
    """One line for a command to print once where MLX computes on this CPU with the wheel's reference BLAS,
    which makes float32 prompt processing and training 9-50x slower than they need be (measured on a 2-core x86-64 VM:
    the demo model and the OpenELM-270M shape); None elsewhere."""
    if sys.platform != "linux" or not in_use.startswith("reference"):
        return None
    import mlx.core as mx

    return NOTICE if mx.default_device() == mx.cpu else None
