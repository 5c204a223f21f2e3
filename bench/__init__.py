"""Throughput and memory benchmarks: OpenELM against OLMo and against mlx-lm."""

import elm_mlx  # noqa: F401  (first: picks the BLAS before anything imports mlx)


def output_dir(out, kind: str, force: bool):
    """Where a bench writes its results: `out`, or bench-results/<kind-><time>; checked before any measuring
    (refused if it exists without --force, or cannot be written)."""
    from datetime import datetime
    from pathlib import Path

    from elm_mlx.cli import check_output_path
    from elm_mlx.errors import ElmError

    out = out or Path("bench-results") / f"{kind + '-' if kind else ''}{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not force:
        raise ElmError(f"{out} already exists; pass --force to replace it")
    check_output_path(out, "--out")
    return out
