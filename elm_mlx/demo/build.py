"""Train the bundled demo model from scratch, end to end.

python -m elm_mlx.demo.build                 writes ./OpenELM-Shakespeare (about an hour on 2 CPU cores)
python -m elm_mlx.demo.build --draft         writes ./OpenELM-Shakespeare-draft, its 1M-parameter draft model

0. The corpus is tinyshakespeare, downloaded once into elm-mlx's cache and
   checked by its SHA-256 (or any UTF-8 .txt given with --corpus).
1. A SentencePiece BPE tokenizer (byte fallback, Llama-2 style ids: unk 0, bos 1,
   eos 2) is trained on the first 90% of the corpus; the last 10% is held out.
2. A small layer-wise scaled OpenELM is initialised (GPT-2 style: N(0, 0.02),
   residual output projections scaled by 1/sqrt(2 * layers)).
3. elm_mlx.lora's trainer trains all weights (--fine-tune-type full),
   validating on a fixed sample of the held-out set as it goes.
4. The weights are written the way Apple publishes OpenELM: float16
   model.safetensors with the Hugging Face names and "pt" format metadata,
   and an Apple-style config.json. The validation loss in the model card is
   measured on exactly those float16 values, over the whole held-out set.

--draft trains the small draft model for speculative decoding instead: a
2-layer OpenELM of the same family on the same corpus with the same trainer,
and no tokenizer of its own: it copies the bundled demo model's tokenizer.model
byte for byte, since a draft must propose exactly the target's token ids.

Every option and output path is checked before any of this starts, and the
bundled models are replaced only when --replace-bundled asks for it.
"""

import hashlib
import http.client
import io
import json
import math
import os
import platform
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import elm_mlx

from ..cli import SEED, ArgumentParser, check_output_path, float_in, int_at_least, non_negative_int, positive_int, run_cli
from ..errors import ElmError
from ..files import atomic_directory, refuse_existing
from ..load import build_model, cache_root
from ..lora.data import eval_batches, holdout_start, load_datasets, read_text
from ..lora.trainer import TrainingConfig, evaluate, plot_losses, prepare_model, train
from ..models.openelm import layerwise_multipliers, make_divisible
from ..tokenizer import SentencePieceTokenizer
from . import DEMO_DIR, DEMO_NAME, DRAFT_DIR, DRAFT_NAME

VALID_FRACTION = 0.1

# The corpus: Karpathy's tinyshakespeare (public domain), fixed by its hash so recorded figures are reproducible.
CORPUS_NAME = "tinyshakespeare"
CORPUS_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CORPUS_MAX_BYTES = 4 << 20  # the file is 1.1 MB; anything much larger is not it
DOWNLOAD_TIMEOUT = 60  # seconds without data before the download is given up

# A 6-layer OpenELM, widths by CoreNet's layer-wise scaling rule: query heads 4 -> 8,
# kv heads 2 -> 4, FFN 0.5x -> 4x model_dim. GQA ratio 2 rather than the family's 4:
# with head_dim 32 that is what lets the head counts vary at this width, and
# on MLX's CPU backend attention (its exp) dominates training time at 16 heads.
SHAPE = dict(num_transformer_layers=6, model_dim=256, head_dim=32, num_gqa_groups=2, vocab_size=2048, ffn_dim_divisor=64)
# The draft: 1.1M parameters. Two layers, because on a CPU a small model's step costs about per layer
# (dispatch, attention), not per parameter, and a draft must cost a small fraction of the target's step.
DRAFT_SHAPE = dict(SHAPE, num_transformer_layers=2, model_dim=192)
DEFAULT_ITERS = 800
DRAFT_ITERS = 400  # the bundled draft's: 29 minutes on 2 CPU cores shared with other jobs (load about 10); it ran 1 step/s alone


def demo_config(vocab_size: int = SHAPE["vocab_size"], shape: Optional[dict] = None) -> dict:
    shape = shape or SHAPE
    n, dim, head_dim, groups = (shape[k] for k in ("num_transformer_layers", "model_dim", "head_dim", "num_gqa_groups"))
    query_dims = [make_divisible(dim * m, head_dim * groups) for m in layerwise_multipliers(0.5, 1.0, n)]
    query_heads = [q // head_dim for q in query_dims]
    return {
        # What Apple's config.json files carry (transformers' custom-code model).
        "architectures": ["OpenELMForCausalLM"],
        "model_type": "openelm",
        "torch_dtype": "float16",
        **shape,
        "vocab_size": vocab_size,
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
    try:
        _train_sentencepiece(spm, train_text, vocab_size, out)
    except RuntimeError as e:  # e.g. "Vocabulary size is too high (2048). Please set it to a value <= 900."
        raise ElmError(f"training the tokenizer failed: {str(e).rsplit('] ', 1)[-1]} (see --vocab-size)") from None
    return out.getvalue()


def _train_sentencepiece(spm, train_text: str, vocab_size: int, out: io.BytesIO) -> None:
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


def model_card(config: dict, facts: dict, draft: bool = False) -> str:
    params = facts["parameters"]
    if draft:
        head = f"""# {DRAFT_NAME} (elm-mlx demo draft model)

A {params / 1e6:.1f}M-parameter OpenELM trained from scratch by elm-mlx's own trainer as the draft model for
speculative decoding with the bundled demo model {DEMO_NAME}: same corpus, same trainer, and the demo model's
own tokenizer (tokenizer.model is a byte-identical copy), so every token it proposes means the same to the target.
On its own it writes worse Shakespeare than {DEMO_NAME}; it exists to be cheap and often right about the next token.
"""
        tokenizer_line = f"- tokenizer: {DEMO_NAME}'s SentencePiece BPE ({config['vocab_size']} pieces), copied, not retrained"
    else:
        head = f"""# {DEMO_NAME} (elm-mlx demo model)

A {params / 1e6:.1f}M-parameter OpenELM trained from scratch by elm-mlx's own trainer, bundled so that
`python -m elm_mlx.generate --prompt "ROMEO:"` works offline on a fresh machine. It writes Shakespeare-like
text; it knows nothing else. For real work use Apple's models, e.g. `--model apple/OpenELM-270M-Instruct`.
"""
        tokenizer_line = f"- tokenizer: SentencePiece BPE, {config['vocab_size']} pieces, byte fallback, trained on the training split"
    return f"""{head}
- architecture: OpenELM, {config["num_transformer_layers"]} layers, model_dim {config["model_dim"]}, head_dim {config["head_dim"]},
  query heads {config["num_query_heads"]}, kv heads {config["num_kv_heads"]},
  FFN multipliers {config["ffn_multipliers"]} (layer-wise scaling), tied embeddings
- parameters: {params:,}; weights float16 ({facts["weights_bytes"] / 1e6:.1f} MB), Hugging Face layout and names
{tokenizer_line}
- data: {facts["corpus"]} ({facts["corpus_chars"]:,} characters); the last 10% (cut at a line break) is held out
  for validation; {facts["train_tokens"]:,} training tokens, {facts["valid_tokens"]:,} validation tokens
- training: {facts["iters"]} steps of {facts["batch_size"]} x {facts["max_seq_length"]} tokens (about {facts["epochs"]:.1f} epochs),
  AdamW lr {facts["learning_rate"]}, warmup {facts["warmup"]}, cosine decay, weight decay {facts["weight_decay"]}, seed {facts["seed"]},
  {facts["minutes"]:.0f} minutes on {facts["machine"]}
- validation loss of these float16 weights (evaluated in float32, windows of {facts["max_seq_length"]} tokens):
  **{facts["valid_loss"]:.4f}** nats/token, perplexity **{math.exp(facts["valid_loss"]):.2f}**
  ({facts["valid_loss"] * facts["valid_tokens"] / facts["valid_chars"] / math.log(2):.3f} bits per character);
  the curve in loss.png was measured during training on {facts["val_sample"]}

Reproduce: `{facts["command"]}`.
Made with elm-mlx {elm_mlx.__version__}.
"""


# --------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------


def cached_corpus() -> Path:
    return cache_root() / "corpus" / f"{CORPUS_NAME}.txt"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def find_corpus(say=print) -> Path:
    """tinyshakespeare from elm-mlx's cache; downloaded and checked the first time."""
    path = cached_corpus()
    if path.is_file() and _sha256(path.read_bytes()) == CORPUS_SHA256:
        return path
    say(f"downloading {CORPUS_NAME} (1.1 MB, public domain) from {CORPUS_URL}")
    data = _download(CORPUS_URL)
    if _sha256(data) != CORPUS_SHA256:
        raise ElmError(
            f"what {CORPUS_URL} sent is not the {CORPUS_NAME} this build expects (SHA-256 differs); "
            "pass a text file of your own with --corpus FILE"
        )
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, path)  # whole or not at all: a cut write is never mistaken for the corpus
    except OSError as e:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise ElmError(
            f"cannot keep the downloaded corpus in {path.parent}: {e.strerror or e}; set ELM_MLX_CACHE or pass --corpus FILE"
        ) from None
    say(f"saved it as {path}")
    return path


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            data = response.read(CORPUS_MAX_BYTES + 1)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
        reason = getattr(e, "reason", None) or e
        raise ElmError(
            f"no --corpus given, and {CORPUS_NAME} could not be downloaded from {CORPUS_URL} ({reason}); "
            "download that file yourself and pass it with --corpus FILE"
        ) from None
    if len(data) > CORPUS_MAX_BYTES:
        raise ElmError(f"{url} sent more than {CORPUS_MAX_BYTES >> 20} MiB, which is not {CORPUS_NAME}; pass --corpus FILE")
    return data


# --------------------------------------------------------------------------
# Output paths: all refusals happen before the corpus is read
# --------------------------------------------------------------------------


def _overlap(a: Path, b: Path) -> bool:
    """a is b, or one lies inside the other (links resolved)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


BUNDLED = {"demo model": DEMO_DIR, "draft model": DRAFT_DIR}


def check_paths(out: Path, work: Path, corpus: Optional[Path], force: bool, replace_bundled: bool, draft: bool = False) -> None:
    """Refuse now, in one line, any --out or --work the build could not or should not write an hour from now."""
    target = DRAFT_DIR if draft else DEMO_DIR
    if replace_bundled:
        if out.resolve() != target:
            raise ElmError(f"--replace-bundled writes only the bundled model {target}; drop --out {out}, or drop --replace-bundled")
    for what, bundled in BUNDLED.items():
        if not (replace_bundled and bundled == target) and _overlap(out, bundled):
            raise ElmError(
                f"--out {out} is, holds or lies in the bundled {what} {bundled}; "
                "choose another --out (or, to rebuild a bundled model itself, pass --replace-bundled)"
            )
        if _overlap(work, bundled):
            raise ElmError(f"--work {work} is, holds or lies in the bundled {what} {bundled}; choose another --work")
    if _overlap(out, work):
        raise ElmError(f"--out {out} and --work {work} must be separate directories, neither inside the other")
    check_output_path(out, "--out")
    check_output_path(work, "--work")
    refuse_existing(out, force or replace_bundled, keep=[corpus] if corpus else [])


# --------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------


def bundled_tokenizer() -> bytes:
    """The demo model's tokenizer.model, which a draft must share byte for byte."""
    try:
        return (DEMO_DIR / "tokenizer.model").read_bytes()
    except OSError as e:
        raise ElmError(
            f"--draft reuses the bundled demo model's tokenizer, and {DEMO_DIR / 'tokenizer.model'} cannot be read: {e.strerror or e}"
        ) from None


def build(
    corpus: Path,
    out: Path,
    work: Path,
    training: TrainingConfig,
    vocab_size: int,
    force: bool,
    command: str = "",
    say=print,
    draft: bool = False,
) -> dict:
    start = time.perf_counter()
    text = read_text(corpus)
    cut = holdout_start(text, VALID_FRACTION)  # the same split load_datasets makes below
    if draft:
        tokenizer_bytes = bundled_tokenizer()
        say(f"corpus {corpus}: {len(text):,} characters; the draft reuses {DEMO_NAME}'s tokenizer")
    else:
        say(f"corpus {corpus}: {len(text):,} characters; training a {vocab_size}-piece tokenizer on the first {1 - VALID_FRACTION:.0%}")
        tokenizer_bytes = train_tokenizer(text[:cut], vocab_size)
    work.mkdir(parents=True, exist_ok=True)
    (work / "tokenizer.model").write_bytes(tokenizer_bytes)
    tokenizer = SentencePieceTokenizer(work / "tokenizer.model")
    if draft:
        vocab_size = tokenizer.vocab_size
    config = demo_config(vocab_size, DRAFT_SHAPE if draft else SHAPE)
    name = DRAFT_NAME if draft else DEMO_NAME
    datasets = load_datasets(str(corpus), tokenizer, training.max_seq_length, valid_fraction=VALID_FRACTION)

    model = build_model(config)
    model.load_weights(list(initial_weights(config, seed=training.seed).items()))
    parameters = prepare_model(model, training)
    windows = len(datasets["valid"].examples)
    all_batches = sum(1 for _ in eval_batches(datasets["valid"], training.batch_size))
    sample = min(training.val_batches or all_batches, all_batches)
    say(
        f"model: {parameters / 1e6:.1f}M parameters; {training.iters} steps of {training.batch_size} x {training.max_seq_length} tokens, "
        f"validating on {sample} of {all_batches} held-out batches every {training.eval_every} steps"
    )
    state = train(model, datasets, training, work / "run", {"title": f"{name} (demo), full training"}, resume=False, log=say)

    # What ships is float16: measure the validation loss of exactly those values, on the whole held-out set.
    weights = {k: v.astype(mx.float16).astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    model.load_weights(list(weights.items()))
    model.eval()
    say(f"evaluating the float16 weights on all {windows} held-out windows")
    valid_loss = evaluate(model, datasets["valid"], training.batch_size)
    train_tokens = sum(len(e.tokens) - 1 for e in datasets["train"].examples)
    digest = _sha256(text.encode("utf-8"))
    facts = dict(
        corpus=f"{CORPUS_NAME} (public domain)" if digest == CORPUS_SHA256 else corpus.name,
        corpus_sha256=digest,
        parameters=sum(v.size for v in weights.values()),
        weights_bytes=2 * sum(v.size for v in weights.values()),
        corpus_chars=len(text),
        valid_chars=len(text) - cut,
        train_tokens=train_tokens,
        valid_tokens=sum(len(e.tokens) - 1 for e in datasets["valid"].examples),
        iters=training.iters,
        batch_size=training.batch_size,
        max_seq_length=training.max_seq_length,
        epochs=training.iters * training.batch_size * training.max_seq_length / train_tokens,
        learning_rate=training.learning_rate,
        warmup=training.warmup,
        weight_decay=training.weight_decay,
        seed=training.seed,
        minutes=(time.perf_counter() - start) / 60,
        machine=f"{platform.system()} {platform.machine()}, {mx.default_device()}, mlx {mx.__version__}",
        valid_loss=valid_loss,
        val_sample=f"{sample} of the {all_batches} held-out batches, spread over it",
        command=command,
        training=asdict(training),
        val_curve=state.val_losses,
    )
    with atomic_directory(out, force, keep=[corpus]) as staging:
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
        (staging / "README.md").write_text(model_card(config, facts, draft))
        (staging / "training.json").write_text(json.dumps(facts, indent=2))
        plot_losses(state, staging / "loss.png", f"{name} demo: full training from scratch")
    return facts


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m elm_mlx.demo.build",
        description=(
            f"Train the demo OpenELM ({DEMO_NAME}) from scratch on tinyshakespeare and write it as Apple ships OpenELM. "
            "The defaults are the settings of the bundled model (about an hour on 2 CPU cores)."
        ),
    )
    p.add_argument(
        "--corpus",
        type=Path,
        help=f"UTF-8 .txt file to train on (default: {CORPUS_NAME}, downloaded once from {CORPUS_URL} into "
        f"{cached_corpus()} and checked by its SHA-256)",
    )
    p.add_argument(
        "--draft",
        action="store_true",
        help=f"train the 1M-parameter draft model for speculative decoding ({DRAFT_NAME}: 2 layers, the bundled "
        f"demo model's tokenizer copied, not retrained) instead of the demo model",
    )
    p.add_argument("--out", type=Path, help=f"directory to write the model to (default: ./{DEMO_NAME}, with --draft ./{DRAFT_NAME})")
    p.add_argument("--force", action="store_true", help="replace --out if it holds an earlier build (never the bundled model)")
    p.add_argument(
        "--replace-bundled",
        action="store_true",
        help=f"write the result over the bundled model {DEMO_DIR} (with --draft {DRAFT_DIR}; for maintainers; default: never)",
    )
    p.add_argument(
        "--work", type=Path, default=Path("demo-build"), help="scratch directory for the tokenizer and checkpoints (default: %(default)s)"
    )
    p.add_argument("--iters", type=positive_int, help=f"optimizer steps (default: {DEFAULT_ITERS}, with --draft {DRAFT_ITERS})")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per step (default: %(default)s)")
    p.add_argument(
        "--max-seq-length",
        type=int_at_least(2, 512),
        default=256,
        help="tokens per sequence, at most the model's context of 512 (default: %(default)s)",
    )
    p.add_argument(
        "--learning-rate", type=float_in(0, low_open=True), default=1.5e-3, help="peak AdamW learning rate (default: %(default)s)"
    )
    p.add_argument("--warmup", type=non_negative_int, help="linear warmup steps, fewer than --iters (default: 5%% of --iters, at least 1)")
    p.add_argument(
        "--val-batches",
        type=non_negative_int,
        default=4,
        help="held-out batches per evaluation during training, spread over the held-out set; 0 = all. "
        "The figures recorded at the end always use all of it (default: %(default)s)",
    )
    p.add_argument(
        "--vocab-size",
        type=int_at_least(300, 32000),
        help=f"tokenizer pieces (default: {SHAPE['vocab_size']}; not with --draft, which reuses the bundled tokenizer)",
    )
    p.add_argument("--seed", type=SEED, default=0, help="seed for the initial weights and the batch order (default: %(default)s)")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.draft and args.vocab_size is not None:
        p.error(f"argument --vocab-size: not with --draft, whose tokenizer is the bundled {DEMO_NAME}'s ({SHAPE['vocab_size']} pieces)")
    iters = args.iters or (DRAFT_ITERS if args.draft else DEFAULT_ITERS)
    vocab_size = args.vocab_size or SHAPE["vocab_size"]
    warmup = max(1, iters // 20) if args.warmup is None else args.warmup
    if warmup >= iters:
        p.error(f"argument --warmup: must be fewer than --iters ({iters}), got {warmup}")
    bundled, name = (DRAFT_DIR, DRAFT_NAME) if args.draft else (DEMO_DIR, DEMO_NAME)
    out = args.out or (bundled if args.replace_bundled else Path(name))
    if args.corpus is not None:
        if not args.corpus.is_file():
            raise ElmError(f"--corpus {args.corpus} is not a file")
        if args.corpus.suffix != ".txt":
            raise ElmError(f"--corpus {args.corpus}: the corpus must be a UTF-8 text file named *.txt")
    check_paths(out, args.work, args.corpus, args.force, args.replace_bundled, args.draft)
    if args.draft:
        bundled_tokenizer()  # unreadable: one line now, not after training
    training = TrainingConfig(
        fine_tune_type="full",
        batch_size=args.batch_size,
        iters=iters,
        learning_rate=args.learning_rate,
        warmup=warmup,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        grad_clip=1.0,
        max_seq_length=args.max_seq_length,
        seed=args.seed,
        report_every=25,
        eval_every=max(1, iters // 10),
        val_batches=args.val_batches,
        save_every=max(1, iters // 10),
    )
    training.check()
    corpus = args.corpus or find_corpus()
    facts = build(
        corpus, out, args.work, training, vocab_size, args.force or args.replace_bundled, _command(args, warmup), draft=args.draft
    )
    print(f"wrote {out}: validation loss {facts['valid_loss']:.4f} (ppl {math.exp(facts['valid_loss']):.2f}) in {facts['minutes']:.1f} min")


def _command(args, warmup: int) -> str:
    """The command that repeats this build, for the model card."""
    words = ["python -m elm_mlx.demo.build"] + (["--draft"] if args.draft else []) + ["--out DIR"]
    if args.corpus is not None:
        words.append(f"--corpus {args.corpus.name}")
    defaults = build_parser().parse_args([])
    for name in ("iters", "batch_size", "max_seq_length", "learning_rate", "val_batches", "vocab_size", "seed"):
        if getattr(args, name) != getattr(defaults, name):
            words.append(f"--{name.replace('_', '-')} {getattr(args, name)}")
    if args.warmup is not None:
        words.append(f"--warmup {warmup}")
    return " ".join(words)


if __name__ == "__main__":
    run_cli(main)
