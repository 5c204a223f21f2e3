"""OpenELM (Mehta et al., 2024) in MLX.

A decoder-only transformer whose width changes with depth ("layer-wise
scaling"): layer i has its own number of query heads, key/value heads and FFN
width, interpolated linearly from the first layer to the last. Otherwise it is
a plain pre-norm Llama-style block: RMSNorm, grouped-query attention with
RoPE and RMS-normalised queries and keys, a SwiGLU feed-forward, no biases and
an output layer tied to the token embeddings.

Every norm, the rotary embedding and attention use MLX's fused kernels
(nn.RMSNorm -> mx.fast.rms_norm, nn.RoPE -> mx.fast.rope,
mx.fast.scaled_dot_product_attention). The OpenELM paper measured its own
reference implementation slower than OLMo because of a composed RMSNorm.

Parameter names follow Apple's Hugging Face checkpoints
(transformer.layers.{i}.attn.qkv_proj.weight, ...), so those weights load as-is.
"""

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ConfigError
from . import checks as F

# What attention gets: None (attend to everything), "causal", or an explicit boolean/additive array.
Mask = Union[None, str, mx.array]

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

# The four published sizes, as CoreNet names them. Everything else they share
# (GQA groups, multiplier ranges, vocabulary) is in ModelArgs' defaults.
CORENET_SIZES = {
    "OpenELM-270M": dict(num_transformer_layers=16, model_dim=1280, head_dim=64),
    "OpenELM-450M": dict(num_transformer_layers=20, model_dim=1536, head_dim=64),
    "OpenELM-1_1B": dict(num_transformer_layers=28, model_dim=2048, head_dim=64),
    "OpenELM-3B": dict(num_transformer_layers=36, model_dim=3072, head_dim=128),
}


def make_divisible(value: float, divisor: int) -> int:
    """Round to the nearest multiple of `divisor`, but never more than 10% down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def layerwise_multipliers(first: float, last: float, num_layers: int) -> List[float]:
    """Linear interpolation from the first to the last layer, rounded to 2 decimals."""
    return [round(float(m), 2) for m in np.linspace(first, last, num=num_layers)]


@dataclass
class ModelArgs:
    """The fields of an OpenELM config.json. Per-layer lists are always filled in."""

    vocab_size: int
    model_dim: int
    head_dim: int
    num_transformer_layers: int
    num_query_heads: List[int]
    num_kv_heads: List[int]
    ffn_multipliers: List[float]
    qkv_multipliers: List[float] = field(default_factory=lambda: [0.5, 1.0])
    num_gqa_groups: int = 4
    ffn_dim_divisor: int = 256
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    rope_freq_constant: float = 10000.0
    rope_max_length: int = 4096
    max_context_length: int = 2048
    rms_norm_eps: float = 1e-6
    activation_fn_name: str = "swish"
    normalization_layer_name: str = "rms_norm"
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    model_type: str = "openelm"

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        """Build from a Hugging Face config.json; unknown keys are ignored."""
        F.require_object(config)
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in config]
        if missing:
            raise ConfigError(f"config is missing required field(s): {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in config.items() if k in known})
        args.validate()
        return args

    @classmethod
    def from_corenet_name(cls, name: str) -> "ModelArgs":
        """Build from a CoreNet model name ('OpenELM-270M', ...) with CoreNet's layer-wise scaling rule.

        Query widths interpolate from 0.5x to 1.0x model_dim, rounded to a
        multiple of head_dim * num_gqa_groups; FFN multipliers from 0.5 to 4.0.
        """
        if name not in CORENET_SIZES:
            raise ConfigError(f"unknown OpenELM size {name!r}; expected one of {', '.join(CORENET_SIZES)}")
        size = CORENET_SIZES[name]
        n, dim, head_dim = size["num_transformer_layers"], size["model_dim"], size["head_dim"]
        gqa_groups, qkv_range, ffn_range = 4, (0.5, 1.0), (0.5, 4.0)
        query_dims = [make_divisible(dim * m, head_dim * gqa_groups) for m in layerwise_multipliers(*qkv_range, n)]
        query_heads = [q // head_dim for q in query_dims]
        return cls.from_dict(
            dict(
                vocab_size=32000,
                num_query_heads=query_heads,
                num_kv_heads=[q // gqa_groups for q in query_heads],
                ffn_multipliers=layerwise_multipliers(*ffn_range, n),
                qkv_multipliers=list(qkv_range),
                num_gqa_groups=gqa_groups,
                **size,
            )
        )

    def validate(self) -> None:
        """Reject configs this model cannot be built from, naming the offending field (caps in checks.py)."""
        for name, high in (("vocab_size", F.MAX_VOCAB), ("model_dim", F.MAX_WIDTH), ("head_dim", F.MAX_HEAD_DIM)):
            F.integer(name, getattr(self, name), high)
        F.integer("num_transformer_layers", self.num_transformer_layers, F.MAX_LAYERS)
        F.integer("ffn_dim_divisor", self.ffn_dim_divisor, F.MAX_WIDTH)
        F.integer("num_gqa_groups", self.num_gqa_groups, F.MAX_HEADS)
        F.integer("rope_max_length", self.rope_max_length, F.MAX_POSITIONS)
        F.integer("max_context_length", self.max_context_length, F.MAX_POSITIONS)
        F.number("rope_freq_constant", self.rope_freq_constant, 0, F.MAX_ROPE_BASE, low_open=True)
        F.number("rms_norm_eps", self.rms_norm_eps, 0, 1, low_open=True)
        for name in ("ffn_with_glu", "normalize_qk_projections", "share_input_output_layers"):
            F.boolean(name, getattr(self, name))
        F.token_ids("bos_token_id", self.bos_token_id)
        F.token_ids("eos_token_id", self.eos_token_id)
        self._validate_layers()
        qkv = self.qkv_multipliers
        if not (isinstance(qkv, (list, tuple)) and 1 <= len(qkv) <= 2 and all(F.is_number(m) and 0 < m <= 64 for m in qkv)):
            raise ConfigError(f"qkv_multipliers must be one or two numbers above 0 and at most 64, got {F.shown(qkv)}")
        F.choice("activation_fn_name", self.activation_fn_name, ("swish", "silu"), " (OpenELM uses 'swish')")
        F.choice("normalization_layer_name", self.normalization_layer_name, ("rms_norm",), " (OpenELM uses 'rms_norm')")

    def _validate_layers(self) -> None:
        n = self.num_transformer_layers
        for name in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            F.per_layer(name, getattr(self, name), "num_transformer_layers", n)
        for i, (q, kv, m) in enumerate(zip(self.num_query_heads, self.num_kv_heads, self.ffn_multipliers)):
            heads_ok = F.is_int(q) and F.is_int(kv) and 0 < q <= F.MAX_HEADS and 0 < kv <= F.MAX_HEADS
            if not heads_ok or q % kv:
                raise ConfigError(
                    f"layer {i}: num_query_heads ({F.shown(q)}) must be a positive multiple of num_kv_heads ({F.shown(kv)}), "
                    f"each at most {F.MAX_HEADS}"
                )
            if not (F.is_number(m) and 0 < m <= 64):
                raise ConfigError(f"layer {i}: ffn_multipliers entry must be positive, finite and at most 64, got {F.shown(m)}")

    @property
    def preferred_dtype(self) -> str:
        """float16, except bfloat16 from the 3B size up, whose activations overflow float16."""
        big = CORENET_SIZES["OpenELM-3B"]
        is_3b = self.model_dim >= big["model_dim"] and self.num_transformer_layers >= big["num_transformer_layers"]
        return "bfloat16" if is_3b else "float16"

    def ffn_dim(self, layer: int) -> int:
        return make_divisible(self.ffn_multipliers[layer] * self.model_dim, self.ffn_dim_divisor)

    def to_dict(self) -> dict:
        """The config.json form, with full per-layer lists (what mlx-lm reads too)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


class Attention(nn.Module):
    """Grouped-query attention with this layer's own head counts."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.head_dim = args.head_dim
        self.n_heads = args.num_query_heads[layer]
        self.n_kv_heads = args.num_kv_heads[layer]
        self.scale = args.head_dim**-0.5

        # One matmul for queries, keys and values, as in the checkpoints.
        qkv_dim = (self.n_heads + 2 * self.n_kv_heads) * args.head_dim
        self.qkv_proj = nn.Linear(args.model_dim, qkv_dim, bias=False)
        self.out_proj = nn.Linear(self.n_heads * args.head_dim, args.model_dim, bias=False)
        if args.normalize_qk_projections:
            self.q_norm = nn.RMSNorm(args.head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(args.head_dim, eps=args.rms_norm_eps)
        self.rope = nn.RoPE(args.head_dim, traditional=False, base=args.rope_freq_constant)

    def __call__(self, x: mx.array, mask: Mask, cache: Optional[Any]) -> mx.array:
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3)
        q, k, v = mx.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)

        # A batched cache gives one offset per sequence (see elm_mlx.cache.BatchKVCache).
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)

        # The fused kernel handles GQA itself: no repeated copy of k and v.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FeedForward(nn.Module):
    """SwiGLU (or a plain SiLU MLP when ffn_with_glu is false) of this layer's width."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        hidden = args.ffn_dim(layer)
        self.with_glu = args.ffn_with_glu
        self.proj_1 = nn.Linear(args.model_dim, 2 * hidden if self.with_glu else hidden, bias=False)
        self.proj_2 = nn.Linear(hidden, args.model_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.proj_1(x)
        if self.with_glu:
            gate, up = mx.split(h, 2, axis=-1)
            return self.proj_2(nn.silu(gate) * up)
        return self.proj_2(nn.silu(h))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.attn = Attention(args, layer)
        self.ffn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.ffn = FeedForward(args, layer)

    def __call__(self, x: mx.array, mask: Mask, cache: Optional[Any]) -> mx.array:
        h = x + self.attn(self.attn_norm(x), mask, cache)
        return h + self.ffn(self.ffn_norm(h))


class OpenELMModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.token_embeddings = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_transformer_layers)]
        self.norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: Optional[Sequence[Any]], mask: Mask = None) -> mx.array:
        h = self.token_embeddings(tokens)
        if mask is None:
            # A single new token may attend to everything cached: no mask at all.
            # Longer inputs use the kernel's causal mode, aligned to the cache's end.
            mask = "causal" if h.shape[1] > 1 else None
        for layer, layer_cache in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, mask, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    """OpenELM for causal LM: token ids (B, L) -> next-token logits (B, L, vocab).

    `mask` (a boolean or additive array broadcast to (B, heads, L, keys)) is
    for batches of sequences of different lengths; without it, inputs are
    causal and every row attends to all of its cache.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.transformer = OpenELMModel(args)
        if not args.share_input_output_layers:
            self.lm_head = nn.Linear(args.model_dim, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: Optional[Sequence[Any]] = None, mask: Optional[mx.array] = None) -> mx.array:
        h = self.transformer(tokens, cache, mask)
        if self.args.share_input_output_layers:
            return self.transformer.token_embeddings.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list:
        return self.transformer.layers

    def sanitize(self, weights: dict) -> dict:
        """Drop what checkpoints may carry but this model does not own (e.g. a tied lm_head copy)."""
        if self.args.share_input_output_layers:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return {k: v for k, v in weights.items() if "rotary" not in k and "pos_embedding" not in k}
