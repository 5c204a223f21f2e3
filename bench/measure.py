"""Timing primitives: memory bandwidth, prompt processing, time to first token, generation speed.

Every figure is a median over trials after one warm-up, reported with its
min and max. Generation ignores end-of-sequence: the same number of tokens is
produced on every run.
"""

import statistics
import time
from typing import Callable, Dict, Iterator, List, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

# A function from prompt token ids to an endless iterator of generated tokens.
StepFactory = Callable[[List[int]], Iterator]


def spread(values: Sequence[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "trials": len(values)}


def measure_bandwidth(megabytes: int = 1024, trials: int = 5) -> Dict[str, float]:
    """Achievable memory bandwidth (GB/s) for the kernel decoding runs: x @ W.T, as nn.Linear computes it.

    16 weight matrices totalling `megabytes` are each multiplied by one vector
    and evaluated together, so every byte is read once. A streaming copy is
    measured too; the better of the two is the bound. Each uses its fastest
    trial: a bound is what the machine has been seen to do.
    """
    rows = megabytes * (1 << 20) // (16 * 2048 * 4)
    weights = [mx.random.uniform(shape=(rows, 2048)) for _ in range(16)]
    x = mx.random.uniform(shape=(1, 2048))
    mx.eval(weights, x)
    total = sum(w.nbytes for w in weights)

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(trials):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    linear_gbs = total / timed(lambda: mx.eval([x @ w.T for w in weights])) / 1e9
    copy_gbs = 2 * total / timed(lambda: mx.eval([w + 1.0 for w in weights])) / 1e9
    return {"linear_gb_s": linear_gbs, "copy_gb_s": copy_gbs, "gb_s": max(linear_gbs, copy_gbs)}


def bytes_read_per_token(model: nn.Module, context: int) -> int:
    """Weight bytes a decoding step reads, plus the KV cache at `context` positions.

    Every matrix is read once per token; an untied embedding table only for one
    row, while a tied one is read whole as the output layer.
    """
    total = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    if "lm_head" in model:
        embedding = next(m for _, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)))
        total -= sum(p.nbytes for _, p in tree_flatten(embedding.parameters()))
    itemsize = next(p.dtype.size for _, p in tree_flatten(model.parameters()) if mx.issubdtype(p.dtype, mx.floating))
    for layer in model.layers:
        attention = getattr(layer, "attn", None) or layer.self_attn
        total += 2 * attention.n_kv_heads * attention.head_dim * context * itemsize
    return total


def random_prompt(length: int, vocab_size: int, seed: int) -> List[int]:
    return np.random.default_rng(seed).integers(3, vocab_size, size=length).tolist()


def time_to_first_token(make_steps: StepFactory, prompt: List[int]) -> float:
    start = time.perf_counter()
    steps = make_steps(prompt)
    next(steps)
    elapsed = time.perf_counter() - start
    steps.close()
    return elapsed


def generation_speed(make_steps: StepFactory, prompt: List[int], tokens: int) -> float:
    """Tokens per second over `tokens` decode steps after the first token."""
    steps = make_steps(prompt)
    next(steps)
    start = time.perf_counter()
    for _ in range(tokens):
        next(steps)
    elapsed = time.perf_counter() - start
    steps.close()
    return tokens / elapsed


def measure_case(make_steps: StepFactory, vocab_size: int, prompt_lengths: Sequence[int], gen_tokens: int, trials: int) -> dict:
    """Prompt tok/s and TTFT per prompt length, generation tok/s and peak memory of one model variant."""
    short = random_prompt(16, vocab_size, seed=0)
    generation_speed(make_steps, short, 4)  # warm-up: kernels compiled, memory pools filled
    mx.reset_peak_memory()
    result = {"prompt_tps": {}, "ttft_s": {}}
    for length in prompt_lengths:
        prompt = random_prompt(length, vocab_size, seed=length)
        time_to_first_token(make_steps, prompt)  # warm-up at this length
        ttfts = [time_to_first_token(make_steps, prompt) for _ in range(trials)]
        result["ttft_s"][str(length)] = spread(ttfts)
        result["prompt_tps"][str(length)] = spread([length / t for t in ttfts])
    result["gen_tps"] = spread([generation_speed(make_steps, short, gen_tokens) for _ in range(trials)])
    result["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    mx.clear_cache()
    return result
