"""python -m bench structured: decoding speed under a constraint against free decoding, side by side in one run.

For each model (the bundled demo model, and the OpenELM-270M shape with
random float32 weights and the Llama-2 tokenizer when ../shared has it) the
same prompt is decoded for --gen-tokens tokens free and under a JSON schema,
a regex and a Lark grammar chosen so that they cannot complete early, in
interleaved trials (the median is reported, so a busy spell on a shared
machine spreads over all). "No overlap" computes the mask only once the
logits are ready, to show what computing it during the forward pass buys.
The mask's own cost per token is measured apart, by replaying the generated
tokens through a fresh matcher.
"""

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from elm_mlx.cli import ArgumentParser, int_at_least
from elm_mlx.files import atomic_directory

from . import output_dir

MODELS = ("demo", "openelm-270M")
QUICK_MODELS = ("demo",)
PROMPT = "ROMEO:"
TARGET = 0.85  # issue 17: constrained decoding at >= 0.85x of free decoding

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "mood": {"enum": ["happy", "sad", "angry"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "mood", "tags"],
    "additionalProperties": False,
}
SCHEMA = {"type": "array", "items": RECORD, "minItems": 1000}  # records, one after another, for as long as the run lasts
REGEX = r"([A-Z][a-z]{0,9}(, | and | or |\. )){1000}"
GRAMMAR = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | NAME | "(" expr ")" | NAME "(" expr ("," expr)* ")"
NUMBER: /[0-9]{1,4}(\.[0-9]{1,3})?/
NAME: /[a-z]{1,8}/
"""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m bench structured", description="Constrained (JSON schema, regex, grammar) against free decoding.")
    p.add_argument("--models", nargs="+", choices=MODELS, help=f"models to measure (default: {' '.join(MODELS)}; --quick: demo)")
    p.add_argument("--gen-tokens", type=int_at_least(8, 4096), help="tokens per run (default: demo 256, openelm-270M 48; --quick: 32)")
    p.add_argument("--trials", type=int_at_least(1, 50), help="interleaved trials; the median is reported (default: 5; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="the demo model, 32 tokens, one trial: a smoke test")
    p.add_argument(
        "--out", type=Path, help="output directory (default: bench-results/structured-<time>); refused if it exists unless --force"
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def constraints():
    from elm_mlx.constrain import Constraint

    return {"json_schema": Constraint.json_schema(SCHEMA), "regex": Constraint.regex(REGEX), "grammar": Constraint.grammar(GRAMMAR)}


def load_model(name: str, workdir: Path, log):
    from elm_mlx.load import load

    if name == "demo":
        from elm_mlx.demo import DEMO_DIR

        model, tokenizer = load(str(DEMO_DIR), dtype="float32", verbose=False)
        return model, tokenizer, {"source": "bundled demo model (OpenELM-Shakespeare), float32"}
    from .serve import write_random_model

    directory, label, description = write_random_model(name, "float32", None, workdir, log)
    model, tokenizer = load(str(directory), verbose=False)
    return model, tokenizer, description


def decode_run(model, tokenizer, constraint, tokens: int, seed: int, overlap: bool = True) -> dict:
    """Decode `tokens` tokens (sampled, temperature 1); tok/s over all but the first, which comes out of the prefill."""
    import mlx.core as mx

    from elm_mlx.constrain import compile_constraint, constrained_step, model_vocab
    from elm_mlx.generation import generate_step
    from elm_mlx.sample import SamplingParams, key_stream, make_sampler

    prompt = tokenizer.encode(PROMPT)
    sampler = make_sampler(SamplingParams(temp=1.0, top_p=1.0, min_p=0.0))
    keys = key_stream(seed)
    if constraint is None:
        steps = generate_step(prompt, model, sampler, keys=keys)
    else:
        matcher = compile_constraint(constraint, tokenizer, model_vocab(model))
        steps = constrained_step(prompt, model, matcher, sampler, keys=keys, overlap=overlap)
    out, start, ended = [], None, False
    for token, _ in steps:
        if start is None:
            start, cpu_start = time.perf_counter(), time.process_time()
        if token in tokenizer.eos_ids:
            ended = True
            break
        out.append(token)
        if len(out) >= tokens:
            break
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    steps.close()
    mx.clear_cache()
    # Timed steps: every token after the first, and the end token's step when the answer ended (a constraint
    # that completes early ends with one); counting it keeps a short run's rate comparable with a full one.
    n = len(out) - 1 + (ended and len(out) > 0)
    return {
        "tokens": len(out),
        "tps": n / elapsed if n > 0 and elapsed > 0 else None,
        "cpu_ms": 1e3 * cpu / n if n > 0 else None,
        "ids": out,
    }


def mask_cost(tokenizer, model, constraint, ids: List[int]) -> dict:
    """Replay `ids` through a fresh matcher: the median and 95th-percentile microseconds of mask + advance per token."""
    import numpy as np

    from elm_mlx.constrain import compile_constraint, model_vocab

    matcher = compile_constraint(constraint, tokenizer, model_vocab(model))
    row = np.zeros(matcher.words, dtype=np.int32)
    times = []
    for token in ids:
        start = time.perf_counter()
        matcher.fill_mask(row)
        matcher.consume(token)
        times.append((time.perf_counter() - start) * 1e6)
    times.sort()
    return {"median_us": round(times[len(times) // 2], 1), "p95_us": round(times[int(len(times) * 0.95)], 1)} if times else {}


def _load() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def measure_model(name: str, tokens: int, trials: int, workdir: Path, log) -> dict:
    model, tokenizer, description = load_model(name, workdir, log)
    kinds = constraints()
    variants = [("free", None, True)] + [(kind, c, True) for kind, c in kinds.items()] + [("grammar, no overlap", kinds["grammar"], False)]
    decode_run(model, tokenizer, None, 8, 0)  # warm-up
    runs = {label: [] for label, _, _ in variants}
    loads = []
    for trial in range(trials):
        loads.append(_load())
        shift = trial % len(variants)  # each trial starts with another variant: none is always first or last
        for label, constraint, overlap in variants[shift:] + variants[:shift]:
            run = decode_run(model, tokenizer, constraint, tokens, seed=trial, overlap=overlap)
            runs[label].append(run)
            log(
                f"{name} trial {trial + 1}/{trials}: {label}: {run['tokens']} tokens, {run['tps']:.1f} tok/s (load {loads[-1][0] if loads[-1] else '?'})"
            )
    free = statistics.median(r["tps"] for r in runs["free"])
    free_cpu = statistics.median(r["cpu_ms"] for r in runs["free"])
    rows = []
    for label, constraint, overlap in variants:
        tps = statistics.median(r["tps"] for r in runs[label])
        cpu = statistics.median(r["cpu_ms"] for r in runs[label])
        row = {
            "variant": label,
            "tps": round(tps, 2),
            "tps_trials": [round(r["tps"], 2) for r in runs[label]],
            "tokens": [r["tokens"] for r in runs[label]],
            "ratio": round(tps / free, 3),
            "cpu_ms_per_token": round(cpu, 2),
            "cpu_ratio": round(free_cpu / cpu, 3),
        }
        if constraint is not None and overlap:
            row["mask"] = mask_cost(tokenizer, model, constraint, runs[label][0]["ids"])
            row["sample"] = tokenizer.decode(runs[label][0]["ids"])[:160]
        rows.append(row)
    return {
        "model": name,
        "description": description,
        "vocab_size": tokenizer.vocab_size,
        "gen_tokens": tokens,
        "rows": rows,
        "load": loads,
    }


def markdown(results: dict) -> str:
    lines = [
        "# elm-mlx structured output benchmark",
        "",
        f"Machine: {results['machine']['description']}",
        "",
        f"Decoding tok/s, sampled at temperature 1 from `{PROMPT}`, the median of {results['trials']} interleaved trials; ratio to free "
        f"decoding in the same run (target >= {TARGET}). Mask: llguidance's bitmask and advance per token, median / 95th percentile "
        "(replayed apart). CPU ms/token: this process's CPU time (all its threads) per token, which other work on a shared "
        "machine disturbs far less than wall time; 'CPU vs free' is free decoding's CPU time over the variant's. Constraints: an "
        "array of records (JSON schema), a regex of words, a Lark grammar of expressions; 'no overlap' waits for the logits "
        "before computing the mask. Each trial runs the variants in a rotated order.",
        "",
    ]
    for m in results["models"]:
        lines += [f"## {m['model']} (vocabulary {m['vocab_size']}, {m['gen_tokens']} tokens per run)", ""]
        lines += [
            "| variant | tok/s | vs free | CPU ms/token | CPU vs free | mask µs (median / p95) | tok/s per trial |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in m["rows"]:
            mask = f"{r['mask']['median_us']} / {r['mask']['p95_us']}" if r.get("mask") else ""
            trials = ", ".join(f"{t:.1f}" for t in r["tps_trials"])
            lines.append(
                f"| {r['variant']} | {r['tps']:.1f} | {r['ratio']:.2f}x | {r['cpu_ms_per_token']:.1f} | {r['cpu_ratio']:.2f}x | {mask} | {trials} |"
            )
        lines += ["", f"Load average (1, 5, 15 min) at each trial's start: {m['load']}", ""]
    lines.append(f"Load average at the end: {results['load_average']}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    models = args.models or (QUICK_MODELS if args.quick else MODELS)
    trials = args.trials or (1 if args.quick else 5)
    out = output_dir(args.out, "structured", args.force)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    from .__main__ import machine_info

    workdir = Path(tempfile.mkdtemp(prefix="elm-mlx-bench-structured-"))
    try:
        with atomic_directory(out, args.force) as staging:
            machine = machine_info({"gb_s": None, "note": "not measured by bench structured"})
            log(machine["description"])
            measured = []
            for name in models:
                tokens = args.gen_tokens or (32 if args.quick else (256 if name == "demo" else 48))
                measured.append(measure_model(name, tokens, trials, workdir, log))
            results = {"machine": machine, "trials": trials, "target": TARGET, "models": measured, "load_average": _load()}
            (staging / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
            (staging / "results.md").write_text(markdown(results))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(results))
    print(f"results in {out}/ (results.json, results.md)")


if __name__ == "__main__":
    from elm_mlx.cli import run_cli

    run_cli(main)
