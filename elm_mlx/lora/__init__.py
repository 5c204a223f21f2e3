"""Fine-tuning: LoRA, DoRA, QLoRA (LoRA on a quantized base) and full training.

`python -m elm_mlx.lora` trains, `python -m elm_mlx.generate --adapter-path`
uses the result, `python -m elm_mlx.fuse` merges it into a model directory.
"""

from .adapters import apply_adapters
from .layers import DoRALinear, LoRALinear, add_adapters, fuse_adapters
from .trainer import TrainingConfig, prepare_model, train

__all__ = ["apply_adapters", "add_adapters", "fuse_adapters", "DoRALinear", "LoRALinear", "TrainingConfig", "prepare_model", "train"]
