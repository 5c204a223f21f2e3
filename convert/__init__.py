"""PyTorch OpenELM checkpoints (Hugging Face layout, CoreNet .pt) to MLX model directories."""
