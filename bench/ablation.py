"""The normalisation ablation: the same model with composed (naive) norms instead of MLX's fused kernels.

The naive forms do what a straightforward implementation does (and what the
OpenELM paper measured): upcast, square, mean, rsqrt and multiply as separate
operations, each a pass over memory.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map


class NaiveRMSNorm(nn.Module):
    def __init__(self, weight: mx.array, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        x32 = x.astype(mx.float32)
        normed = x32 * mx.rsqrt(mx.mean(mx.square(x32), axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.weight


class NaiveLayerNorm(nn.Module):
    """Non-parametric LayerNorm (OLMo's) from separate mean, variance, rsqrt and multiply."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        x32 = x.astype(mx.float32)
        centred = x32 - mx.mean(x32, axis=-1, keepdims=True)
        variance = mx.mean(mx.square(centred), axis=-1, keepdims=True)
        return (centred * mx.rsqrt(variance + self.eps)).astype(x.dtype)


def _naive(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.RMSNorm):
        return NaiveRMSNorm(module.weight, module.eps)
    if isinstance(module, nn.LayerNorm):
        if "weight" in module or "bias" in module:
            raise ValueError("the naive LayerNorm covers OLMo's non-parametric form only")
        return NaiveLayerNorm(module.eps)
    return module


def use_naive_norms(model: nn.Module) -> int:
    """Swap every fused RMSNorm/LayerNorm in `model` for its composed form; returns how many."""
    before = sum(isinstance(m, (nn.RMSNorm, nn.LayerNorm)) for _, m in model.named_modules())
    model.update_modules(tree_map(_naive, model.leaf_modules(), is_leaf=lambda x: isinstance(x, nn.Module)))
    return before
