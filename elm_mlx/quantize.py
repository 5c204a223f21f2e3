"""Weight quantization: uniform, or a layer-wise recipe made for OpenELM's shape.

MLX's affine quantization stores each group of `group_size` weights as
`bits`-bit integers plus one scale and one bias in the model's dtype, so a
weight costs bits + 32 / group_size bits with float16 scales. The result is
recorded in config.json's `quantization` block, with per-layer entries where a
recipe departs from the default, which is the form elm_mlx.load (and mlx-lm)
read back.
"""

import re
from typing import Callable, Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import ElmError

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)

_LAYER = re.compile(r"\.layers\.(\d+)\.")

Params = Dict[str, int]
Recipe = Callable[[str, int, int], Optional[Params]]


def _openelm_mixed_4_6(path: str, layer: int, num_layers: int) -> Optional[Params]:
    """4-bit, with 6 bits where OpenELM is most fragile and cheapest to protect.

    - The tied embedding is also the output layer: its errors hit every logit.
    - Layer-wise scaling makes the first layers the narrowest (fewest heads,
      smallest FFN), so they hold few bytes; the first and last eighth of the
      stack, where errors compound or land directly on the output, get 6 bits.
    - FFN down-projections (proj_2) of the first half get 6 bits: their inputs
      are SwiGLU products, where activation outliers usually concentrate.
    """
    six = {"bits": 6}
    if layer < 0:  # not inside a transformer layer: embeddings / lm_head
        return six
    edge = max(1, num_layers // 8)
    if layer < edge or layer >= num_layers - edge:
        return six
    if path.endswith("ffn.proj_2") and layer < num_layers // 2:
        return six
    return None


RECIPES: Dict[str, Recipe] = {"mixed-4-6": _openelm_mixed_4_6}


def check_options(bits: int, group_size: int, recipe: Optional[str]) -> None:
    if bits not in BITS:
        raise ElmError(f"--q-bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ElmError(f"--q-group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if recipe is not None and recipe not in RECIPES:
        raise ElmError(f"unknown --q-recipe {recipe!r}; available: {', '.join(RECIPES)}")


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 64, recipe: Optional[str] = None) -> dict:
    """Quantize `model` in place; return the config.json `quantization` block."""
    check_options(bits, group_size, recipe)
    num_layers = len(model.layers)
    config: Dict[str, Union[int, dict]] = {"group_size": group_size, "bits": bits}
    skipped = []

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        if module.weight.shape[-1] % group_size:
            skipped.append(path)
            return False
        params = None
        if recipe is not None:
            match = _LAYER.search(path)
            params = RECIPES[recipe](path, int(match.group(1)) if match else -1, num_layers)
        if params is None:
            return True
        params = {"group_size": group_size, "bits": bits, **params}
        config[path] = params
        return params

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    if skipped:
        raise ElmError(f"cannot quantize with group size {group_size}: {skipped[0]} has an input size not divisible by it")
    return config


def bits_per_weight(model: nn.Module) -> float:
    """Average stored bits per original weight, scales and biases included (norms excluded)."""
    stored_bits = weights = 0
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weights += module.weight.size * 32 // module.bits
            stored_bits += sum(p.nbytes * 8 for _, p in tree_flatten(module.parameters()))
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            weights += module.weight.size
            stored_bits += module.weight.nbytes * 8
    return stored_bits / max(weights, 1)


def dense_weight(layer: nn.Module) -> mx.array:
    """The float weight a linear or embedding layer stands for, quantized or not."""
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        weight = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits, mode=layer.mode)
        return weight.astype(layer.scales.dtype)
    return layer.weight


def dequantize_model(model: nn.Module) -> None:
    """Replace every quantized layer by the float layer it stands for, in place."""
    replacements = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weight = dense_weight(module)
            if isinstance(module, nn.QuantizedLinear):
                layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
                layer.update({"weight": weight, **({"bias": module.bias} if "bias" in module else {})})
            else:
                layer = nn.Embedding(*weight.shape)
                layer.weight = weight
            replacements.append((path, layer))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
