"""elm-mlx as an lm-evaluation-harness model registered as `elm-mlx`.

    python -m elm_mlx.evaluate.lm_eval_backend run --model elm-mlx --model_args model=M,q_bits=4 --tasks ...

is lm-eval's own command line with this model registered. lm-eval 0.4.13 looks
models up only among its own modules, so plain `lm_eval --model elm-mlx` cannot
find it there; releases that read the `lm_eval.models` entry-point group (which
pyproject.toml declares) can. `elm-mlx evaluate tasks` is the shorter way.

lm-eval asks three questions of a model; each is answered with elm-mlx's own
model and tokenizer:

- loglikelihood: log p(continuation | context) and whether greedy decoding
  would have produced the continuation. Requests run longest first, in
  batches padded at the end; a context too long for the window loses its
  oldest tokens, as lm-eval expects.
- loglikelihood_rolling: log p of a whole text, scored in windows of the
  context length (the same windows as `elm-mlx evaluate perplexity`).
- generate_until: text up to a stop sequence, through the batching core
  (elm_mlx.batching.batch_generate): requests that share stops, length and
  temperature are decoded together, longest prompt first.

Importing this module needs lm-eval (`pip install -e '.[eval]'`); the
`elm-mlx evaluate tasks` command says so in one line when it is missing.
"""

from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..batching import batch_generate
from ..generation import context_length
from ..sample import SamplingParams
from .perplexity import scored_nlls

DEFAULT_MAX_GEN_TOKENS = 256


class ElmMLX(LM):
    def __init__(
        self,
        model: Optional[str] = None,
        adapter_path: Optional[str] = None,
        dtype: Optional[str] = None,
        q_bits: Optional[int] = None,
        q_group_size: int = 64,
        q_recipe: Optional[str] = None,
        batch_size=8,
        max_length: Optional[int] = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKENS,
        loaded=None,
        pretrained: Optional[str] = None,  # what lm-eval's hf model calls `model`
        device=None,  # lm-eval passes these three to every model; they mean nothing here
        max_batch_size=None,
        trust_remote_code=None,
    ):
        # No **kwargs: a misspelt --model_args key is an error, not a silent fall-back to the demo model.
        super().__init__()
        if loaded is None:
            from ..load import load
            from ..options import resolve_model

            if model is not None and pretrained is not None and model != pretrained:
                raise ValueError("elm-mlx: model= and pretrained= name the same thing; give one")
            name = resolve_model(model or pretrained, adapter_path, verbose=False)
            bits = None if q_bits is None else int(q_bits)
            loaded = load(name, dtype=dtype, q_bits=bits, q_group_size=int(q_group_size), q_recipe=q_recipe, adapter_path=adapter_path,
                          verbose=False)  # fmt: skip
        self.model, self.tokenizer = loaded
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" means nothing here either
        self.max_length = int(max_length) if max_length else (context_length(self.model) or 2048)
        self.max_gen_toks = int(max_gen_toks)

    # -- loglikelihood --------------------------------------------------------------------------------------------

    def _pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """(context ids, continuation ids). Spaces that end the context belong to the continuation, so that
        " Paris" after "The capital is" is encoded as the tokenizer encodes it inside running text."""
        stripped = len(context) - len(context.rstrip(" "))
        if stripped:
            context, continuation = context[:-stripped], context[-stripped:] + continuation
        if not context:
            whole = self.tokenizer.encode(continuation)
            head = whole[:1] if whole and whole[0] == self.tokenizer.bos_id else []
            return head or [min(self.tokenizer.eos_ids)], whole[len(head) :]
        # The continuation is what the whole text's tokens hold past the context's token count, as lm-eval's hf model
        # and mlx-lm count it, also when a word split between the two tokenizes differently whole.
        ctx = self.tokenizer.encode(context)
        return ctx, self.tokenizer.encode(context + continuation)[len(ctx) :]

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        pairs = [self._pair(*r.args) for r in requests]
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        out: List[Optional[Tuple[float, bool]]] = [None] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1) :] for i in chunk]
            width = max(len(r) for r in rows)
            batch = np.zeros((len(rows), width), dtype=np.int32)
            for j, row in enumerate(rows):
                batch[j, : len(row)] = row
            logits = self.model(mx.array(batch[:, :-1])).astype(mx.float32)
            log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            log_probs = np.asarray(log_probs, dtype=np.float64)
            for j, i in enumerate(chunk):
                n_cont, n = len(pairs[i][1]), len(rows[j])
                positions = np.arange(n - 1 - n_cont, n - 1)
                targets = np.asarray(rows[j][-n_cont:]) if n_cont else np.zeros(0, dtype=int)
                picked = log_probs[j, positions, targets]
                greedy = bool(np.all(log_probs[j, positions].argmax(axis=-1) == targets))
                out[i] = (float(picked.sum()), greedy)
        return out

    def loglikelihood_rolling(self, requests) -> List[float]:
        out = []
        for r in requests:
            tokens = self.tokenizer.encode(r.args[0])
            if not tokens or tokens[0] != self.tokenizer.bos_id:  # something to condition the first token on
                tokens = [min(self.tokenizer.eos_ids)] + tokens
            nll, _ = scored_nlls(self.model, tokens, self.max_length, batch_size=self.batch_size)
            out.append(-float(nll.sum()))
        return out

    # -- generation -----------------------------------------------------------------------------------------------

    def generate_until(self, requests) -> List[str]:
        groups: Dict[Tuple, List[int]] = {}
        prompts: List[List[int]] = []
        for i, r in enumerate(requests):
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_tokens = max(1, min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1))
            temp = float(kwargs.get("temperature", 0.0) or 0.0) if kwargs.get("do_sample", True) else 0.0
            prompts.append(self.tokenizer.encode(context)[-(self.max_length - max_tokens) :])  # the oldest tokens go first
            groups.setdefault((until, max_tokens, temp), []).append(i)
        out: List[Optional[str]] = [None] * len(requests)
        for (until, max_tokens, temp), members in groups.items():
            members.sort(key=lambda i: -len(prompts[i]))
            results = batch_generate(self.model, self.tokenizer, [prompts[i] for i in members], max_tokens=max_tokens,
                                     sampling=SamplingParams(temp=temp), stop=list(until), max_batch=self.batch_size)  # fmt: skip
            for i, result in zip(members, results):
                out[i] = result.text  # the batching core ends before a stop string and leaves it out
        return out


if __name__ == "__main__":
    # `python -m elm_mlx.evaluate.lm_eval_backend ARGS` is lm-eval's command line with elm-mlx registered. This file
    # then runs as __main__ too; importing it under its own name registers that class, the one any later import sees.
    from lm_eval.__main__ import cli_evaluate

    import elm_mlx.evaluate.lm_eval_backend  # noqa: F401

    cli_evaluate()
else:
    register_model("elm-mlx")(ElmMLX)
