"""OLMo (Groeneveld et al., 2024), the transformers-native `model_type: "olmo"` form, in MLX.

Our point of comparison for OpenELM: the same kind of decoder (pre-norm,
RoPE, SwiGLU, no biases) with uniform width, full multi-head attention and a
non-parametric LayerNorm (no gain, no bias, eps 1e-5). `clip_qkv`, when set,
clamps queries, keys and values before RoPE.

Parameter names follow the Hugging Face checkpoints (allenai/OLMo-1B-hf):
model.embed_tokens, model.layers.{i}.self_attn.{q,k,v,o}_proj,
model.layers.{i}.mlp.{gate,up,down}_proj, lm_head when untied.
"""

from dataclasses import MISSING, dataclass, fields
from typing import Any, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError
from . import checks as F

# None (attend to everything), "causal", or an explicit boolean/additive array (batches of unequal lengths).
Mask = Union[None, str, mx.array]


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: Optional[int] = None
    rope_theta: float = 10000.0
    clip_qkv: Optional[float] = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = 50279
    model_type: str = "olmo"

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        F.require_object(config)
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [name for name in required if name not in config]
        if missing:
            raise ConfigError(f"config is missing required field(s): {', '.join(missing)}")
        config = dict(config)
        if isinstance(config.get("rope_parameters"), dict):  # transformers >= 5 nests rope_theta
            config.setdefault("rope_theta", config["rope_parameters"].get("rope_theta", 10000.0))
        known = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in config.items() if k in known})
        if args.num_key_value_heads is None:
            args.num_key_value_heads = args.num_attention_heads
        args.validate()
        return args

    def validate(self) -> None:
        """Reject configs this model cannot be built from, naming the offending field (caps in checks.py)."""
        F.integer("vocab_size", self.vocab_size, F.MAX_VOCAB)
        F.integer("hidden_size", self.hidden_size, F.MAX_WIDTH)
        F.integer("intermediate_size", self.intermediate_size, F.MAX_FFN_WIDTH)
        F.integer("num_hidden_layers", self.num_hidden_layers, F.MAX_LAYERS)
        F.integer("num_attention_heads", self.num_attention_heads, F.MAX_HEADS)
        F.integer("num_key_value_heads", self.num_key_value_heads, F.MAX_HEADS)
        F.integer("max_position_embeddings", self.max_position_embeddings, F.MAX_POSITIONS)
        F.number("rope_theta", self.rope_theta, 0, F.MAX_ROPE_BASE, low_open=True)
        F.number("layer_norm_eps", self.layer_norm_eps, 0, 1, low_open=True)
        if self.clip_qkv is not None:
            F.number("clip_qkv", self.clip_qkv, 0, 1e30, low_open=True)
        F.boolean("attention_bias", self.attention_bias)
        F.boolean("tie_word_embeddings", self.tie_word_embeddings)
        F.token_ids("bos_token_id", self.bos_token_id)
        F.token_ids("eos_token_id", self.eos_token_id)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.attention_bias:
            raise ConfigError("attention_bias is not supported (OLMo has no biases)")
        F.choice("hidden_act", self.hidden_act, ("silu",), " (OLMo uses 'silu')")

    @property
    def preferred_dtype(self) -> str:
        return "bfloat16"  # OLMo was trained in bfloat16 mixed precision

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.scale = self.head_dim**-0.5
        self.clip_qkv = args.clip_qkv
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, mask: Mask, cache: Optional[Any]) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.clip_qkv is not None:
            q, k, v = (mx.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def layer_norm(args: ModelArgs) -> nn.LayerNorm:
    """OLMo's LayerNorm has no parameters; affine=False uses mx.fast.layer_norm without gain or bias."""
    return nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps, affine=False)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = layer_norm(args)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = layer_norm(args)
        self.mlp = MLP(args)

    def __call__(self, x: mx.array, mask: Mask, cache: Optional[Any]) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class OlmoModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = layer_norm(args)

    def __call__(self, tokens: mx.array, cache: Optional[Sequence[Any]], mask: Mask = None) -> mx.array:
        h = self.embed_tokens(tokens)
        if mask is None:
            mask = "causal" if h.shape[1] > 1 else None
        for layer, layer_cache in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, mask, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    """OLMo for causal LM: token ids (B, L) -> next-token logits (B, L, vocab); `mask` as in OpenELM's Model."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = OlmoModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: Optional[Sequence[Any]] = None, mask: Optional[mx.array] = None) -> mx.array:
        h = self.model(tokens, cache, mask)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list:
        return self.model.layers

    def sanitize(self, weights: dict) -> dict:
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return {k: v for k, v in weights.items() if "rotary_emb" not in k}
