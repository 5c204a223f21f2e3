"""Throughput and memory benchmarks: OpenELM against OLMo and against mlx-lm."""

import elm_mlx  # noqa: F401  (first: picks the BLAS before anything imports mlx)
