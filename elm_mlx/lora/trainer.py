"""The training loop shared by LoRA, DoRA, QLoRA and full fine-tuning.

Every step's result depends only on (seed, step): the batch rows come from
`Batches`, dropout is reseeded per step. With the optimizer state saved,
an interrupted run resumes exactly where it stopped.

The loss of a step is the summed token loss of all its micro-batches
(gradient accumulation) on all processes (data parallelism), divided by the
step's total count of trained tokens, which every process can compute from
the batch rows. So N processes with batch B/N each take the same step as one
process with batch B.
"""

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm  # its write() keeps a Ctrl-C notice clear of the bar

from ..errors import ElmError
from ..files import atomic_directory
from ..progress import Progress
from .adapters import ADAPTER_FILE, CONFIG_FILE, FINE_TUNE_TYPES
from .data import Batches, Dataset, eval_batches
from .layers import OPENELM_KEYS, add_adapters

CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainingConfig:
    fine_tune_type: str = "lora"
    num_layers: int = -1  # adapt the last N blocks; -1 = all
    keys: List[str] = field(default_factory=lambda: list(OPENELM_KEYS))
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    batch_size: int = 4  # sequences per micro-batch, summed over all processes
    grad_accum: int = 1
    iters: int = 1000
    learning_rate: float = 1e-4
    warmup: int = 0
    min_lr_ratio: float = 0.1  # the cosine decay ends at learning_rate * this
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    max_seq_length: int = 512
    mask_prompt: bool = False
    grad_checkpoint: bool = False
    seed: int = 0
    report_every: int = 10
    eval_every: int = 100
    val_batches: int = 25  # 0 = the whole validation set
    save_every: int = 100

    # Settings a resumed run may change; the rest must match the saved run.
    RESUMABLE_CHANGES = ("iters", "report_every", "eval_every", "val_batches", "save_every")

    def check(self) -> None:
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise ElmError(f"--fine-tune-type must be one of {', '.join(FINE_TUNE_TYPES)}, got {self.fine_tune_type!r}")
        for name in ("batch_size", "grad_accum", "iters", "max_seq_length", "report_every", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ElmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "alpha"):
            if not 0 < getattr(self, name) < math.inf:  # NaN fails this too
                raise ElmError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(self, name)}")
        for name, high in (("min_lr_ratio", 1.0), ("weight_decay", math.inf), ("grad_clip", math.inf), ("dropout", 1.0)):
            if not 0 <= getattr(self, name) <= high or not math.isfinite(getattr(self, name)):
                raise ElmError(f"--{name.replace('_', '-')} must be a finite number in [0, {high}], got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ElmError(f"--seed must be in [0, 2**32), got {self.seed}")
        if self.val_batches < 0:
            raise ElmError(f"--val-batches must be >= 0, got {self.val_batches}")
        if self.warmup < 0 or self.warmup >= self.iters:
            raise ElmError(f"--warmup must be in [0, --iters), got {self.warmup}")


# --------------------------------------------------------------------------
# Model preparation
# --------------------------------------------------------------------------


def prepare_model(model: nn.Module, config: TrainingConfig) -> int:
    """Make exactly the weights to train trainable; return how many parameters that is."""
    mx.random.seed(config.seed)  # adapter initialisation is part of what the seed reproduces
    if config.fine_tune_type == "full":
        if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
            raise ElmError("full fine-tuning needs a float model; this one is quantized (use --fine-tune-type lora for QLoRA)")
        model.unfreeze()
    else:
        model.freeze()
        add_adapters(model, config.fine_tune_type, config.num_layers, config.keys, config.rank, config.alpha, config.dropout)
    if config.grad_checkpoint:
        checkpoint_blocks(model)
    model.train()
    return sum(p.size for _, p in tree_flatten(model.trainable_parameters()))


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    Each block gets a subclass whose call runs under mx.checkpoint; other
    instances of the class (other models) are unaffected.
    """
    for block in model.layers:
        base = type(block)

        def call(self, *args, _base=base, **kwargs):
            def forward(params, *inner):
                self.update(params)
                return _base.__call__(self, *inner, **kwargs)

            return mx.checkpoint(forward)(self.trainable_parameters(), *args)

        block.__class__ = type(f"Checkpointed{base.__name__}", (base,), {"__call__": call})


# --------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------


def token_losses(model: nn.Module, inputs: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
    """Cross-entropy of every target token, zero where its weight is zero (padding, masked prompt)."""
    logits = model(inputs).astype(mx.float32)
    return nn.losses.cross_entropy(logits, targets) * weights


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, limit: int = 0, group=None) -> float:
    """Mean loss per trained token over a split (or `limit` of its batches, spread over it), all processes together."""
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    total = mx.array(0.0)
    count = mx.array(0.0)
    for i, (inputs, targets, weights) in enumerate(eval_batches(dataset, batch_size, limit or None)):
        if i % size != rank:
            continue
        losses = token_losses(model, mx.array(inputs), mx.array(targets), mx.array(weights))
        total, count = total + losses.sum(), count + float(weights.sum())
        mx.eval(total, count)
    if size > 1:
        total, count = mx.distributed.all_sum(total, group=group), mx.distributed.all_sum(count, group=group)
    return (total / mx.maximum(count, 1)).item()


# --------------------------------------------------------------------------
# Saving and resuming
# --------------------------------------------------------------------------


@dataclass
class TrainingState:
    step: int = 0
    train_losses: List[Tuple[int, float]] = field(default_factory=list)  # (step, loss) for every step
    val_losses: List[Tuple[int, float]] = field(default_factory=list)


def adapter_weights(model: nn.Module) -> Dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def _replace_atomically(path: Path, temporary: Path, write) -> None:
    """write(temporary), then rename it over `path`; a failed write (full disk) leaves no temporary behind."""
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    _replace_atomically(path, path.with_name(f".{path.name}.tmp"), lambda t: t.write_text(json.dumps(data, indent=2)))


def _save_safetensors(path: Path, arrays: Dict[str, mx.array]) -> None:
    _replace_atomically(path, path.with_name(f".{path.name}.tmp.safetensors"), lambda t: mx.save_safetensors(str(t), arrays))


def save(out_dir: Path, model: nn.Module, optimizer: optim.Optimizer, state: TrainingState, meta: dict) -> None:
    """The adapters and their config (what generation and fuse read), and a checkpoint to resume from.

    Each file is replaced atomically; the checkpoint directory as a whole.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model)
    with atomic_directory(out_dir / CHECKPOINT_DIR, force=True) as staging:
        mx.save_safetensors(str(staging / ADAPTER_FILE), weights)
        mx.save_safetensors(str(staging / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (staging / "state.json").write_text(json.dumps(asdict(state)))
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    _save_safetensors(out_dir / ADAPTER_FILE, weights)
    _write_json(out_dir / CONFIG_FILE, {**meta, "step": state.step})


def load_checkpoint(out_dir: Path, model: nn.Module, optimizer: optim.Optimizer, config: TrainingConfig) -> TrainingState:
    checkpoint = out_dir / CHECKPOINT_DIR
    if not (checkpoint / "state.json").is_file():
        raise ElmError(f"--resume: {out_dir} has no training checkpoint to resume from")
    try:
        return _read_checkpoint(checkpoint, model, optimizer, config)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # JSON and UTF-8 errors are ValueErrors
        detail = " ".join(str(e).split())[:200]
        raise ElmError(
            f"--resume: the checkpoint in {checkpoint} is damaged ({type(e).__name__}: {detail}); start over with --force"
        ) from None


def _read_checkpoint(checkpoint: Path, model: nn.Module, optimizer: optim.Optimizer, config: TrainingConfig) -> TrainingState:
    saved = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))["training"]
    now = asdict(config)
    changed = [k for k in now if k not in TrainingConfig.RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if changed:
        details = ", ".join(f"{k} was {saved.get(k)!r}, now {now[k]!r}" for k in changed)
        raise ElmError(f"--resume needs the settings of the interrupted run: {details}")
    model.load_weights(list(mx.load(str(checkpoint / ADAPTER_FILE)).items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(checkpoint / "optimizer.safetensors")).items()))
    state = TrainingState(**json.loads((checkpoint / "state.json").read_text(encoding="utf-8")))
    state.train_losses = [tuple(x) for x in state.train_losses]
    state.val_losses = [tuple(x) for x in state.val_losses]
    return state


def plot_losses(state: TrainingState, file: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if state.train_losses:
        steps, losses = zip(*state.train_losses)
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="train (per step)")
        window = max(1, len(losses) // 50)
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"train ({window}-step mean)")
    if state.val_losses:
        steps, losses = zip(*state.val_losses)
        ax.plot(steps, losses, "o-", lw=1.5, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        _replace_atomically(file, file.with_name(f".{file.stem}.tmp.png"), lambda t: fig.savefig(t, dpi=120))
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


def learning_rate_schedule(config: TrainingConfig):
    """Linear warmup, then cosine decay to min_lr_ratio * learning_rate at the last step."""
    decay_steps = config.iters - config.warmup
    cosine = optim.cosine_decay(config.learning_rate, decay_steps, config.learning_rate * config.min_lr_ratio)
    if config.warmup == 0:
        return cosine
    warmup = optim.linear_schedule(config.learning_rate / config.warmup, config.learning_rate, config.warmup)
    return optim.join_schedules([warmup, cosine], [config.warmup])


class _StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step (and save); a second one aborts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if hasattr(signal, "SIGINT") and _in_main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("stopping after this step and saving (Ctrl-C again to abort without saving)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _any_rank(flag: bool, group) -> bool:
    """True if any process saw the flag, so all of them stop at the same step."""
    if group.size() == 1:
        return flag
    return mx.distributed.all_sum(mx.array(int(flag)), group=group).item() > 0


class Interrupted(Exception):
    def __init__(self, step: int, out_dir: Path):
        super().__init__(f"interrupted at step {step}; saved to {out_dir}; continue with the same command plus --resume")
        self.step = step


def train(
    model: nn.Module,
    datasets: Dict[str, Dataset],
    config: TrainingConfig,
    out_dir: Path,
    meta: dict,
    resume: bool = False,
    plot: Optional[Path] = None,
    log=print,
) -> TrainingState:
    """Train `model` (already prepared) on datasets["train"], validating on datasets["valid"].

    `meta` goes into adapter_config.json (base model, adapter shape, ...).
    """
    config.check()
    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    distributed = size > 1
    if config.batch_size % size:
        raise ElmError(f"--batch-size {config.batch_size} must be divisible by the number of processes ({size})")
    writer = rank == 0
    log = log if writer else (lambda *args, **kwargs: None)
    meta = {**meta, "training": asdict(config)}

    pad = 1 if datasets["train"].packed else 8
    batches = Batches(datasets["train"], config.batch_size, config.seed, pad_multiple=pad)
    optimizer = optim.AdamW(learning_rate=learning_rate_schedule(config), weight_decay=config.weight_decay)
    optimizer.init(model.trainable_parameters())
    state = load_checkpoint(out_dir, model, optimizer, config) if resume else TrainingState()
    if resume:
        log(f"resuming from step {state.step}")

    loss_and_grad = nn.value_and_grad(model, lambda m, x, y, w, n: token_losses(m, x, y, w).sum() / n)
    compiled_state = [model.state, mx.random.state]

    @partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    def micro_step(inputs, targets, weights, n_tokens):
        return loss_and_grad(model, inputs, targets, weights, n_tokens)

    @partial(mx.compile, inputs=[model.state, optimizer.state], outputs=[model.state, optimizer.state])
    def apply_update(grads):
        if config.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, config.grad_clip)
        optimizer.update(model, grads)

    def run_step(step: int) -> Tuple[float, int]:
        mx.random.seed(config.seed * 1_000_003 + step)  # dropout masks depend on the step only
        first = step * config.grad_accum
        micro = [first + j for j in range(config.grad_accum)]
        n_tokens = sum(sum(batches.dataset.examples[r].weights[1:]) for k in micro for r in batches.rows(k))
        n = mx.array(float(n_tokens))
        loss, grads = mx.array(0.0), None
        for k in micro:
            inputs, targets, weights = batches.batch(k, rank, size)
            part_loss, part_grads = micro_step(mx.array(inputs), mx.array(targets), mx.array(weights), n)
            loss = loss + part_loss
            grads = part_grads if grads is None else tree_map(mx.add, grads, part_grads)
            mx.eval(loss, grads)
        if distributed:
            grads = tree_map(lambda g: mx.distributed.all_sum(g, group=group), grads)
            loss = mx.distributed.all_sum(loss, group=group)
        apply_update(grads)
        mx.eval(loss, model.state, optimizer.state)
        return loss.item(), n_tokens

    def validate(step: int) -> None:
        model.eval()
        loss = evaluate(model, datasets["valid"], config.batch_size, config.val_batches, group)
        model.train()
        state.val_losses.append((step, loss))
        say(f"step {step}: validation loss {loss:.3f} (ppl {math.exp(min(loss, 50)):.2f})")

    def checkpoint() -> None:
        if writer:
            save(out_dir, model, optimizer, state, meta)
            if plot is not None:
                plot_losses(state, plot, meta.get("title", "training loss"))

    progress = Progress(config.iters, "training", "step", initial=state.step, enabled=writer)
    say = partial(progress.note, log)  # step lines above the bar on a terminal, in order in a log

    with progress, _StopRequest() as stop:
        if state.step == 0:  # the starting loss: the first point of the plot
            validate(0)
        mx.reset_peak_memory()
        window_loss = window_tokens = 0.0
        window_start = time.perf_counter()
        window_steps = 0
        while state.step < config.iters:
            loss, n_tokens = run_step(state.step)
            state.step += 1
            state.train_losses.append((state.step, loss))
            window_loss += loss * n_tokens
            window_tokens += n_tokens
            window_steps += 1
            progress.update(1, f"loss {loss:.3f}")

            if state.step % config.report_every == 0 or state.step == config.iters:
                elapsed = time.perf_counter() - window_start
                say(
                    f"step {state.step}: train loss {window_loss / window_tokens:.3f}, "
                    f"lr {optimizer.learning_rate.item():.2e}, {window_steps / elapsed:.2f} it/s, "
                    f"{window_tokens / elapsed:.1f} tok/s, peak memory {mx.get_peak_memory() / 1e9:.3f} GB"
                )
                window_loss = window_tokens = 0.0
                window_steps = 0
                window_start = time.perf_counter()
            if state.step % config.eval_every == 0 or state.step == config.iters:
                validate(state.step)
            if state.step % config.save_every == 0 or state.step == config.iters:
                checkpoint()
            if _any_rank(stop.requested, group):
                checkpoint()
                raise Interrupted(state.step, out_dir)

    if "test" in datasets:
        model.eval()
        loss = evaluate(model, datasets["test"], config.batch_size, 0, group)
        log(f"test loss {loss:.3f}, test perplexity {math.exp(min(loss, 50)):.2f}")
    return state
