"""Perplexity of a model on a text: how surprised it is, per token, on average.

The token stream is cut into windows of at most `context` input tokens. With
`stride == context` the windows do not overlap and every token after the
first is predicted exactly once, from whatever precedes it in its window. A
smaller stride slides the window by `stride` tokens and scores only the
targets the previous window had not scored, so every scored token sees at
least `context - stride` tokens of history: slower, and closer to how the
model is used. Either way each token is scored once, so the mean NLL is
token-weighted, however unequal the windows.

Windows are run `batch_size` at a time; the shorter last window is padded at
its end, which a causal model cannot see from the real positions, and the
padding is not scored.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ElmError
from ..generation import context_length
from ..lora.data import _read_jsonl, _text_example, holdout_start, read_text
from ..progress import Progress
from ..tokenizer import Tokenizer


@dataclass
class Window:
    """tokens[begin : end + 1]: inputs tokens[begin:end], targets tokens[begin+1 : end+1]; targets
    from index `first` (a position in the window's targets) on are scored."""

    begin: int
    end: int
    first: int


@dataclass
class Result:
    tokens: int  # targets scored
    windows: int
    nll: float  # mean negative log-likelihood per token, in nats
    nll_se: float  # its standard error over the per-token NLLs
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def perplexity_se(self) -> float:
        """By the delta method: d exp(x) = exp(x) dx."""
        return self.perplexity * self.nll_se

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "windows": self.windows,
            "nll": self.nll,
            "nll_se": self.nll_se,
            "perplexity": self.perplexity,
            "perplexity_se": self.perplexity_se,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
        }


def windows(n_tokens: int, context: int, stride: Optional[int] = None) -> List[Window]:
    """The windows that score each of tokens[1:] exactly once (see the module docstring)."""
    stride = context if stride is None else stride
    if not 0 < stride <= context:
        raise ElmError(f"--stride must be between 1 and --context ({context}), got {stride}")
    if n_tokens < 2:
        raise ElmError(f"the text has {n_tokens} token{'s' if n_tokens != 1 else ''}; perplexity needs at least 2")
    out, scored_to = [], 0  # targets up to index `scored_to` of the stream are scored
    begin = 0
    while scored_to < n_tokens - 1:
        end = min(begin + context, n_tokens - 1)
        out.append(Window(begin, end, scored_to - begin))
        scored_to = end
        begin += stride
    return out


def read_tokens(path: Path, tokenizer: Tokenizer, holdout: Optional[float] = None) -> List[int]:
    """One token stream from a text file (one document) or a JSONL file (documents one a line).

    Each document is encoded as elm-mlx lora encodes training text (BOS when the
    tokenizer adds one, EOS at the end), so a fine-tune's training and its
    evaluation see the same tokens. `holdout` keeps only the last fraction of a
    text file, cut at a line start (as lora splits off validation text).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ElmError(f"data file {path} does not exist")
    if path.is_dir():
        raise ElmError(f"data file {path} is a directory; give a .txt or .jsonl file")
    if path.suffix == ".jsonl":
        if holdout is not None:
            raise ElmError("--holdout applies to a text file; a .jsonl file is scored whole")
        examples, _ = _read_jsonl(path, tokenizer, mask_prompt=False)
        return [t for e in examples for t in e.tokens]
    text = read_text(path)
    if holdout is not None:
        text = text[holdout_start(text, holdout) :]
    return _text_example(tokenizer, text, str(path) + (f" (last {holdout:g})" if holdout is not None else "")).tokens


def token_nlls(model: nn.Module, batch: mx.array) -> mx.array:
    """-log p(batch[:, t+1] | batch[:, :t+1]) for every t, in float32 whatever the model's dtype."""
    logits = model(batch[:, :-1]).astype(mx.float32)
    targets = batch[:, 1:]
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return mx.logsumexp(logits, axis=-1) - picked


def scored_nlls(
    model: nn.Module,
    tokens: List[int],
    context: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "perplexity",
) -> Tuple[np.ndarray, int]:
    """-log p of each of tokens[1:], in order, scored in windows of `context` tokens
    (default: the model's context length), and how many windows that took."""
    limit = context_length(model)
    if context is None:
        if limit is None:
            raise ElmError("the model does not say its context length; pass --context")
        context = limit
    if limit is not None and context > limit:
        raise ElmError(f"--context {context} is larger than the model's context length, {limit} tokens")
    plan = windows(len(tokens), context, stride)
    stream = np.asarray(tokens, dtype=np.int32)
    scored: List[np.ndarray] = []
    running, count = 0.0, 0
    with Progress(len(tokens) - 1, desc, "token", enabled=progress) as bar:
        for i in range(0, len(plan), batch_size):
            group = plan[i : i + batch_size]
            batch, mask = _pad(stream, group)
            nll = token_nlls(model, mx.array(batch))
            mx.eval(nll)
            values = np.asarray(nll, dtype=np.float64)[mask]
            scored.append(values)
            running, count = running + values.sum(), count + values.size
            bar.update(values.size, status=f"ppl {math.exp(running / count):.3f}")
    return np.concatenate(scored), len(plan)


def perplexity(
    model: nn.Module,
    tokens: List[int],
    context: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "perplexity",
) -> Result:
    """Score `tokens` with `model` in windows of `context` tokens (default: the model's context length)."""
    start = time.perf_counter()
    nll, n_windows = scored_nlls(model, tokens, context, stride, batch_size, progress, desc)
    seconds = time.perf_counter() - start
    se = float(nll.std(ddof=1) / math.sqrt(nll.size)) if nll.size > 1 else float("nan")
    return Result(int(nll.size), n_windows, float(nll.mean()), se, seconds)


def _pad(stream: np.ndarray, group: List[Window]) -> Tuple[np.ndarray, np.ndarray]:
    """The windows as rows of one batch (padded at the end with token 0) and which targets count."""
    width = max(w.end - w.begin for w in group) + 1
    batch = np.zeros((len(group), width), dtype=np.int32)
    mask = np.zeros((len(group), width - 1), dtype=bool)
    for row, w in enumerate(group):
        batch[row, : w.end - w.begin + 1] = stream[w.begin : w.end + 1]
        mask[row, w.first : w.end - w.begin] = True
    return batch, mask
