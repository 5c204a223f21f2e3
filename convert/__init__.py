"""PyTorch OpenELM checkpoints (Hugging Face layout, CoreNet .pt) to MLX model directories."""

import elm_mlx  # noqa: F401  (first: picks the BLAS before anything imports mlx)
