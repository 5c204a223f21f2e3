"""LoRA and DoRA adapters around a model's linear layers (float or quantized).

LoRA (Hu et al., 2021) adds a trainable low-rank update to a frozen layer:
    y = W x + s * B A x,    A: rank x in, B: out x rank, s = alpha / rank.
B starts at zero, so an adapted model computes exactly what the base model
does until training moves it.

DoRA (Liu et al., 2024) also learns each output row's magnitude m:
    y = m / ||W + s B A||_row * (W + s B A) x
with m initialised to ||W||_row, again the base model at step 0. The row
norm is treated as a constant in the backward pass, as the paper suggests
to save memory.

When the frozen layer is quantized (QLoRA, Dettmers et al., 2023) it stays
quantized; only A, B (and m) are float.
"""

import math
from typing import Iterable, List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import ElmError
from ..quantize import dense_weight

# The linear layers of an OpenELM block, by the name they have in the checkpoints.
OPENELM_KEYS = ("qkv_proj", "out_proj", "proj_1", "proj_2")


def _shape(layer: nn.Module):
    """(output dims, input dims) of a float or quantized linear layer."""
    out_dims, in_dims = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        in_dims = in_dims * 32 // layer.bits
    return out_dims, in_dims


def _dense_like(layer: nn.Module, weight: mx.array, dequantize: bool) -> nn.Module:
    """A linear layer holding `weight`, quantized again like `layer` unless told otherwise."""
    out_dims, in_dims = weight.shape
    dtype = layer.scales.dtype if isinstance(layer, nn.QuantizedLinear) else layer.weight.dtype
    dense = nn.Linear(in_dims, out_dims, bias=False)
    dense.weight = weight.astype(dtype)
    if isinstance(layer, nn.QuantizedLinear) and not dequantize:
        return nn.QuantizedLinear.from_linear(dense, layer.group_size, layer.bits, mode=layer.mode)
    return dense


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        out_dims, in_dims = _shape(base)
        self.base = base
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def delta(self) -> mx.array:
        """The (out, in) weight update this adapter stands for."""
        return self.scale * (self.lora_a @ self.lora_b).T

    def __call__(self, x: mx.array) -> mx.array:
        update = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return self.base(x) + (self.scale * update).astype(x.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = dense_weight(self.base)
        return _dense_like(self.base, weight + self.delta().astype(weight.dtype), dequantize)


class DoRALinear(LoRALinear):
    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        self.magnitude = mx.linalg.norm(dense_weight(base).astype(mx.float32), axis=1)

    def _adapted_weight(self) -> mx.array:
        return dense_weight(self.base).astype(mx.float32) + self.delta()

    def __call__(self, x: mx.array) -> mx.array:
        norm = mx.stop_gradient(mx.linalg.norm(self._adapted_weight(), axis=1))
        y = self.base(x) + self.scale * ((self.dropout(x) @ self.lora_a) @ self.lora_b)
        return ((self.magnitude / norm) * y).astype(x.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = self._adapted_weight()
        weight = (self.magnitude / mx.linalg.norm(weight, axis=1))[:, None] * weight
        return _dense_like(self.base, weight, dequantize)


ADAPTERS = {"lora": LoRALinear, "dora": DoRALinear}


def add_adapters(
    model: nn.Module,
    kind: str = "lora",
    num_layers: Optional[int] = None,
    keys: Iterable[str] = OPENELM_KEYS,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> List[str]:
    """Wrap the `keys` linear layers of the last `num_layers` blocks (all when None); return their paths.

    Call after model.freeze(): the new A, B (and m) are the only trainable weights.
    """
    if kind not in ADAPTERS:
        raise ElmError(f"unknown adapter type {kind!r}; expected one of {', '.join(ADAPTERS)}")
    if rank < 1:
        raise ElmError(f"--rank must be >= 1, got {rank}")
    if not 0 <= dropout < 1:
        raise ElmError(f"--dropout must be in [0, 1), got {dropout}")
    layers = model.layers
    num_layers = len(layers) if num_layers is None or num_layers < 0 else num_layers
    if num_layers > len(layers):
        raise ElmError(f"--num-layers is {num_layers} but the model has {len(layers)} layers")
    keys = set(keys)
    adapter = ADAPTERS[kind]
    wrapped = []
    first = len(layers) - num_layers
    for i, block in enumerate(layers[first:], start=first):
        replacements = []
        for path, module in block.named_modules():
            if path.split(".")[-1] in keys and isinstance(module, (nn.Linear, nn.QuantizedLinear)):
                replacements.append((path, adapter(module, rank=rank, alpha=alpha, dropout=dropout)))
                wrapped.append(f"layers.{i}.{path}")
        block.update_modules(_nest(replacements))
    if not wrapped:
        raise ElmError(f"no linear layer named {', '.join(sorted(keys))} found to adapt")
    return wrapped


def fuse_adapters(model: nn.Module, dequantize: bool = False) -> int:
    """Merge every adapter into its layer in place; return how many were fused."""
    fused = [(path, module.fuse(dequantize)) for path, module in model.named_modules() if isinstance(module, LoRALinear)]
    if fused:
        model.update_modules(_nest(fused))
    return len(fused)


def _nest(pairs):
    """[("attn.qkv_proj", m)] -> {"attn": {"qkv_proj": m}}, the form update_modules takes (lists by index)."""
    from mlx.utils import tree_unflatten

    return tree_unflatten(pairs)
