"""Train the bundled demo model from scratch, end to end.

python -m elm_mlx.demo.build --corpus ../shared/corpus/tinyshakespeare.txt --out elm_mlx/demo/OpenELM-Shakespeare

1. A SentencePiece BPE tokenizer (byte fallback, Llama-2 style ids: unk 0, bos 1,
   eos 2) is trained on the first 90% of the corpus; the last 10% is held out.
2. A small layer-wise scaled OpenELM is initialised (GPT-2 style: N(0, 0.02),
   residual output projections scaled by 1/sqrt(2 * layers)).
3. elm_mlx.lora's trainer trains all weights (--fine-tune-type full).
4. The weights are written the way Apple publishes OpenELM: float16
   model.safetensors with the Hugging Face names and "pt" format metadata,
   and an Apple-style config.json. The validation loss in the model card is
   measured on exactly those float16 values.
"""

import io
import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import elm_mlx

from ..cli import ArgumentParser, run_cli
from ..errors import ElmError
from ..files import atomic_directory
from ..load import build_model
from ..lora.data import holdout_start, load_datasets
from ..lora.trainer import TrainingConfig, evaluate, plot_losses, prepare_model, train
from ..models.openelm import layerwise_multipliers, make_divisible
from ..tokenizer import SentencePieceTokenizer

VALID_FRACTION = 0.1

# A 6-layer OpenELM, widths by CoreNet's layer-wise scaling rule: query heads 4 -> 8,
# kv heads 2 -> 4, FFN 0.5x -> 4x model_dim. GQA ratio 2 rather than the family's 4:
# with head_dim 32 that is what lets the head counts vary at this width, and
# on MLX's CPU backend attention (its exp) dominates training time at 16 heads.
SHAPE = dict(num_transformer_layers=6, model_dim=256, head_dim=32, num_gqa_groups=2, vocab_size=2048, ffn_dim_divisor=64)


def demo_config() -> dict:
    n, dim, head_dim, groups = (SHAPE[k] for k in ("num_transformer_layers", "model_dim", "head_dim", "num_gqa_groups"))
    query_dims = [make_divisible(dim * m, head_dim * groups) for m in layerwise_multipliers(0.5, 1.0, n)]
    query_heads = [q // head_dim for q in query_dims]
    return {
        # What Apple's config.json files carry (transformers' custom-code model).
        "architectures": ["OpenELMForCausalLM"],
        "model_type": "openelm",
        "torch_dtype": "float16",
        **SHAPE,
        "num_query_heads": query_heads,
        "num_kv_heads": [q // groups for q in query_heads],
        "ffn_multipliers": layerwise_multipliers(0.5, 4.0, n),
        "qkv_multipliers": [0.5, 1.0],
        "ffn_with_glu": True,
        "normalize_qk_projections": True,
        "share_input_output_layers": True,
        "rope_freq_constant": 10000,
        "rope_max_length": 4096,
        "max_context_length": 512,
        "activation_fn_name": "swish",
        "normalization_layer_name": "rms_norm",
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def train_tokenizer(train_text: str, vocab_size: int) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_text.split("\n")),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,  # newlines and anything unseen become byte tokens
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return out.getvalue()


def initial_weights(config: dict, seed: int) -> dict:
    """N(0, 0.02) for matrices, residual projections (out_proj, proj_2) scaled down by depth; norms at 1."""
    rng = np.random.default_rng(seed)
    std = config["initializer_range"]
    residual_std = std / math.sqrt(2 * config["num_transformer_layers"])
    weights = {}
    for name, p in tree_flatten(build_model(config).parameters()):
        if name.endswith("norm.weight"):
            value = np.ones(p.shape, np.float32)
        else:
            scale = residual_std if name.endswith(("out_proj.weight", "proj_2.weight")) else std
            value = (rng.standard_normal(p.shape) * scale).astype(np.float32)
        weights[name] = mx.array(value)
    return weights


def write_hf_checkpoint(directory: Path, config: dict, weights: dict) -> None:
    """model.safetensors as transformers writes it: float16, 'pt' format metadata, Apple's names."""
    from safetensors.numpy import save_file

    arrays = {k: np.array(v.astype(mx.float16)) for k, v in weights.items()}
    save_file(arrays, str(directory / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(directory / "model.safetensors", 0o644)  # save_file makes it private; it ships in the package
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def model_card(config: dict, facts: dict) -> str:
    params = facts["parameters"]
    return f"""# OpenELM-Shakespeare (elm-mlx demo model)

A {params / 1e6:.1f}M-parameter OpenELM trained from scratch by elm-mlx's own trainer, bundled so that
`python -m elm_mlx.generate --prompt "ROMEO:"` works offline on a fresh machine. It writes Shakespeare-like
text; it knows nothing else. For real work use Apple's models, e.g. `--model apple/OpenELM-270M-Instruct`.

- architecture: OpenELM, {config["num_transformer_layers"]} layers, model_dim {config["model_dim"]}, head_dim {config["head_dim"]},
  query heads {config["num_query_heads"]}, kv heads {config["num_kv_heads"]},
  FFN multipliers {config["ffn_multipliers"]} (layer-wise scaling), tied embeddings
- parameters: {params:,}; weights float16 ({facts["weights_bytes"] / 1e6:.1f} MB), Hugging Face layout and names
- tokenizer: SentencePiece BPE, {config["vocab_size"]} pieces, byte fallback, trained on the training split
- data: tinyshakespeare ({facts["corpus_chars"]:,} characters, public domain); the last 10% (cut at a line break) is held out
  for validation; {facts["train_tokens"]:,} training tokens, {facts["valid_tokens"]:,} validation tokens
- training: {facts["iters"]} steps of {facts["batch_size"]} x {facts["max_seq_length"]} tokens (about {facts["epochs"]:.1f} epochs),
  AdamW lr {facts["learning_rate"]}, warmup {facts["warmup"]}, cosine decay, weight decay {facts["weight_decay"]}, seed {facts["seed"]},
  {facts["minutes"]:.0f} minutes on {facts["machine"]}
- validation loss of these float16 weights (evaluated in float32, windows of {facts["max_seq_length"]} tokens):
  **{facts["valid_loss"]:.4f}** nats/token, perplexity **{math.exp(facts["valid_loss"]):.2f}**
  ({facts["valid_loss"] * facts["valid_tokens"] / facts["valid_chars"] / math.log(2):.3f} bits per character)

Reproduce: `python -m elm_mlx.demo.build --corpus ../shared/corpus/tinyshakespeare.txt --out DIR`.
Made with elm-mlx {elm_mlx.__version__}.
"""


def build(
    corpus: Path, out: Path, iters: int, batch_size: int, max_seq_length: int, learning_rate: float, seed: int, force: bool, work: Path
) -> dict:
    start = time.perf_counter()
    text = corpus.read_text(encoding="utf-8")
    config = demo_config()
    work.mkdir(parents=True, exist_ok=True)
    cut = holdout_start(text, VALID_FRACTION)  # the same split load_datasets makes below
    tokenizer_bytes = train_tokenizer(text[:cut], config["vocab_size"])
    (work / "tokenizer.model").write_bytes(tokenizer_bytes)
    tokenizer = SentencePieceTokenizer(work / "tokenizer.model")
    datasets = load_datasets(str(corpus), tokenizer, max_seq_length, valid_fraction=VALID_FRACTION)

    model = build_model(config)
    model.load_weights(list(initial_weights(config, seed).items()))
    training = TrainingConfig(
        fine_tune_type="full",
        batch_size=batch_size,
        iters=iters,
        learning_rate=learning_rate,
        warmup=max(1, iters // 20),
        min_lr_ratio=0.1,
        weight_decay=0.1,
        grad_clip=1.0,
        max_seq_length=max_seq_length,
        seed=seed,
        report_every=25,
        eval_every=max(1, iters // 10),
        val_batches=0,
        save_every=max(1, iters // 10),
    )
    prepare_model(model, training)
    state = train(model, datasets, training, work / "run", {"title": "OpenELM-Shakespeare (demo), full training"}, resume=False)

    # What ships is float16: measure the validation loss of exactly those values.
    weights = {k: v.astype(mx.float16).astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    model.load_weights(list(weights.items()))
    model.eval()
    valid_loss = evaluate(model, datasets["valid"], batch_size)
    train_tokens = sum(len(e.tokens) - 1 for e in datasets["train"].examples)
    facts = dict(
        parameters=sum(v.size for v in weights.values()),
        weights_bytes=2 * sum(v.size for v in weights.values()),
        corpus_chars=len(text),
        valid_chars=len(text) - cut,
        train_tokens=train_tokens,
        valid_tokens=sum(len(e.tokens) - 1 for e in datasets["valid"].examples),
        iters=iters,
        batch_size=batch_size,
        max_seq_length=max_seq_length,
        epochs=iters * batch_size * max_seq_length / train_tokens,
        learning_rate=learning_rate,
        warmup=training.warmup,
        weight_decay=training.weight_decay,
        seed=seed,
        minutes=(time.perf_counter() - start) / 60,
        machine=f"{platform.system()} {platform.machine()}, {mx.default_device()}, mlx {mx.__version__}",
        valid_loss=valid_loss,
        training=asdict(training),
        val_curve=state.val_losses,
    )
    with atomic_directory(out, force) as staging:
        write_hf_checkpoint(staging, config, weights)
        (staging / "tokenizer.model").write_bytes(tokenizer_bytes)
        (staging / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                    "add_bos_token": True,
                    "legacy": True,
                },
                indent=2,
            )
        )
        (staging / "README.md").write_text(model_card(config, facts))
        (staging / "training.json").write_text(json.dumps(facts, indent=2))
        plot_losses(state, staging / "loss.png", "OpenELM-Shakespeare demo: full training from scratch")
    return facts


def main(argv: Optional[List[str]] = None) -> None:
    p = ArgumentParser(prog="python -m elm_mlx.demo.build", description="Train the bundled demo OpenELM from scratch.")
    p.add_argument("--corpus", type=Path, default=Path("../shared/corpus/tinyshakespeare.txt"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "OpenELM-Shakespeare")
    p.add_argument("--work", type=Path, default=Path("demo-build"), help="scratch directory (tokenizer, checkpoints)")
    p.add_argument("--iters", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=1.5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    if not args.corpus.is_file():
        raise ElmError(f"corpus {args.corpus} not found")
    facts = build(
        args.corpus, args.out, args.iters, args.batch_size, args.max_seq_length, args.learning_rate, args.seed, args.force, args.work
    )
    print(
        f"wrote {args.out}: validation loss {facts['valid_loss']:.4f} (ppl {math.exp(facts['valid_loss']):.2f}) in {facts['minutes']:.0f} min"
    )


if __name__ == "__main__":
    run_cli(main)
