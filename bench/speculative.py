"""python -m bench speculative: plain greedy against prompt lookup, a draft model, the compiled step and mlx-lm, in one run.

python -m bench speculative                        # the demo model and its bundled draft; step costs of 270M and 1.1B
python -m bench speculative --quick                # a smoke test: a few tokens, one trial, no mlx-lm, tiny shapes

1. Decoding, on the bundled demo model (float32): every method generates the same number of greedy tokens
   from the same prompts, trials interleaved (trial 1 of every prompt and method, then trial 2...), so a busy
   spell on a shared machine spreads over all of them; medians are reported with the load average before each run.
   Prompts of two kinds: "copy" (a passage, then the start of it again or of an edited copy: an answer that can
   copy its input) and "free" (a short opening: nothing to copy but what the model itself repeats). Methods: plain
   greedy, the compiled step (elm_mlx.compiled), prompt lookup (K tokens a pass), the bundled draft model (K tokens
   a pass), and mlx-lm's generate_step and speculative_generate_step (its --draft-model) on the same weights.
   Decode tok/s counts the tokens after the first target pass over the time after it, as stream_generate does,
   so prefill is left out alike for every method. Greedy speculation must write the plain text: the bench
   checks it and records it per row.
2. Step costs: one target pass over 1 token and over K+1 tokens (the verify pass), plain and compiled, after a
   128-token context, for the demo pair and for the OpenELM-270M -> 1.1B shape pair (random weights). From the
   cost ratio and an acceptance rate, the expected speedup of a draft model is
   E[tokens per pass] * t(1) / (K * t_draft(1) + t(K+1)), with E = (1 - a^(K+1)) / (1 - a) for a per-token
   acceptance a. Random weights give no real acceptance; the bench assumes the demo pair's measured one (a draft
   four times smaller from the same family and data, as 270M is for 1.1B) and tabulates others beside it.
"""

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import elm_mlx  # noqa: F401, I001  (before mlx: it loads OpenBLAS in place of the wheel's reference BLAS, for mlx-lm too)

# isort: split
import mlx.core as mx

from elm_mlx.cache import make_cache
from elm_mlx.cli import ArgumentParser, int_at_least
from elm_mlx.compiled import CompiledStep, StaticCache, generate_greedy
from elm_mlx.errors import ElmError
from elm_mlx.files import atomic_directory
from elm_mlx.generation import stream_generate
from elm_mlx.sample import SamplingParams

from . import output_dir
from .measure import spread
from .serve import _load, _render

PLOT = "speedup.png"
CONTEXT = 128  # tokens cached before a step is timed
PASSAGE = """HAMLET:
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles,
And by opposing end them. To die, to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to."""
PASSAGE_2 = """JULIET:
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name;
Or, if thou wilt not, be but sworn my love,
And I'll no longer be a Capulet.

ROMEO:
Shall I hear more, or shall I speak at this?"""


def _restart(passage: str, speaker: Optional[str] = None) -> str:
    """The passage, a blank line, then its first two lines begun again (the speaker renamed: an edit)."""
    head, first = passage.split("\n")[:2]
    return f"{passage}\n\n{speaker + ':' if speaker else head}\n{first[: len(first) // 2]}"


PROMPTS = {
    "copy": {
        "repeat": _restart(PASSAGE),
        "edit": _restart(PASSAGE, "OPHELIA"),
        "repeat-twice": f"{PASSAGE_2}\n\n{_restart(PASSAGE_2)}",
    },
    "free": {"romeo": "ROMEO:", "king": "KING HENRY:\nWhat say you, lords", "winter": "Now is the winter"},
}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m bench speculative",
        description="Speculative decoding: plain greedy vs prompt lookup vs a draft model vs the compiled step vs mlx-lm, side by side.",
    )
    p.add_argument("--draft", type=Path, help="draft model directory for the demo model (default: the bundled OpenELM-Shakespeare-draft)")
    p.add_argument("--max-tokens", type=int_at_least(4, 320), help="greedy tokens per run (default: 192; --quick: 8)")
    p.add_argument("--trials", type=int_at_least(1, 50), help="runs of every prompt and method, interleaved (default: 3; --quick: 1)")
    p.add_argument(
        "--lookup-tokens", nargs="+", type=int_at_least(1, 64), metavar="K", help="prompt lookup K values, each a method (default: 4 10)"
    )
    p.add_argument(
        "--draft-tokens", nargs="+", type=int_at_least(1, 64), metavar="K", help="draft model K values, each a method (default: 2 4)"
    )
    p.add_argument(
        "--pair",
        nargs=2,
        metavar=("TARGET", "DRAFT"),
        help="bench shapes whose step costs give the expected draft speedup (default: openelm-1_1B openelm-270M; --quick: "
        "openelm-tiny openelm-tiny)",
    )
    p.add_argument("--no-peer", action="store_true", help="skip mlx-lm (default: run it when installed; --quick skips it)")
    p.add_argument("--quick", action="store_true", help="a smoke test: 8 tokens, one prompt of each kind, one trial, tiny shapes")
    p.add_argument(
        "--out", type=Path, help="output directory (default: bench-results/speculative-<time>); refused if it exists unless --force"
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


# --------------------------------------------------------------------------
# Timed decoding: every method is a function prompt ids -> iterator of (token, pass boundary info)
# --------------------------------------------------------------------------


class Run:
    """One method on one prompt: token ids and when each arrived, and how many came with the first target pass."""

    def __init__(self):
        self.tokens: List[int] = []
        self.times: List[float] = []
        self.first_pass = 1
        self.drafted = self.accepted = self.passes = 0

    def add(self, token: int) -> None:
        self.tokens.append(token)
        self.times.append(time.perf_counter())

    @property
    def decode_tps(self) -> Optional[float]:
        n = len(self.tokens) - self.first_pass
        elapsed = self.times[-1] - self.times[self.first_pass - 1] if n > 0 else 0.0
        return n / elapsed if elapsed > 0 else None

    @property
    def tokens_per_pass(self) -> float:
        return len(self.tokens) / self.passes if self.passes else 1.0

    @property
    def acceptance(self) -> Optional[float]:
        return self.accepted / self.drafted if self.drafted else None


def ours(model, tokenizer, **speculation) -> Callable[[List[int], int], Run]:
    """elm-mlx's stream_generate, greedy, with the given speculation keywords (none: plain decoding)."""
    greedy = SamplingParams(temp=0)

    def run(prompt: List[int], n: int) -> Run:
        result = Run()
        last = None
        for r in stream_generate(model, tokenizer, prompt, max_tokens=n, sampling=greedy, **speculation):
            if r.token is not None:
                result.add(r.token)
                if speculation and r.target_passes <= 1:  # plain decoding reports no passes: its first pass is its first token
                    result.first_pass = len(result.tokens)
            last = r
        if speculation:
            result.drafted, result.accepted, result.passes = last.draft_tokens, last.accepted_tokens, last.target_passes
        result.first_pass = max(1, min(result.first_pass, len(result.tokens)))
        return result

    return run


def compiled(model) -> Callable[[List[int], int], Run]:
    step = CompiledStep(model)

    def run(prompt: List[int], n: int) -> Run:
        result = Run()
        for token in generate_greedy(model, prompt, n, step):
            result.add(token)
        return result

    return run


def peer(model, draft=None, k: int = 0) -> Callable[[List[int], int], Run]:
    """mlx-lm's generate_step, or its speculative_generate_step with `draft` (its --draft-model), greedy."""
    from mlx_lm.generate import generate_step, speculative_generate_step

    def run(prompt: List[int], n: int) -> Run:
        result = Run()
        if draft is None:
            steps = generate_step(mx.array(prompt), model, max_tokens=n)
            for token, _ in steps:
                result.add(int(token))
            return result
        first_pass = None
        for token, _, from_draft in speculative_generate_step(mx.array(prompt), model, draft, num_draft_tokens=k, max_tokens=n):
            result.add(int(token))
            if from_draft:
                result.accepted += 1
            else:
                result.passes += 1
                first_pass = first_pass or len(result.tokens)
        result.first_pass = first_pass or 1
        result.drafted = result.passes * k  # it drafts K a pass (fewer only at the very end)
        return result

    return run


def load_pair(draft_dir: Optional[Path]):
    from elm_mlx.demo import DEMO_DIR, DRAFT_DIR
    from elm_mlx.load import load
    from elm_mlx.speculative import load_draft

    model, tokenizer = load(str(DEMO_DIR), dtype="float32", verbose=False)
    path = draft_dir or DRAFT_DIR
    if not Path(path).is_dir():
        raise ElmError(f"no draft model at {path}; build it with `python -m elm_mlx.demo.build --draft` or pass --draft DIR")
    draft = load_draft(str(path), tokenizer, model, dtype="float32", verbose=False)
    return model, tokenizer, draft


def methods(model, tokenizer, draft, lookup_ks, draft_ks, with_peer: bool) -> Dict[str, Callable]:
    out = {"plain": ours(model, tokenizer), "compiled": compiled(model)}
    for k in lookup_ks:
        out[f"lookup K={k}"] = ours(model, tokenizer, prompt_lookup=k)
    # Adaptive K: fewer proposals after rejections, so text that the lookup misreads costs less.
    out[f"lookup K={max(lookup_ks)} adaptive"] = ours(model, tokenizer, prompt_lookup=max(lookup_ks), adaptive_draft=True)
    for k in draft_ks:
        out[f"draft K={k}"] = ours(model, tokenizer, draft_model=draft, num_draft_tokens=k)
    if with_peer:
        from .__main__ import peer_model

        theirs, their_draft = peer_model(model, model.args.to_dict()), peer_model(draft, draft.args.to_dict())
        out["mlx-lm"] = peer(theirs)
        for k in draft_ks:
            out[f"mlx-lm draft K={k}"] = peer(theirs, their_draft, k)
    return out


def decode_rows(runners: Dict[str, Callable], prompts: Dict[str, Dict[str, List[int]]], n: int, trials: int, log) -> List[dict]:
    """Every (prompt, method) `trials` times, interleaved; one row each, with medians and the load before each run."""
    for ids in (ids for group in prompts.values() for ids in group.values()):  # warm-up: traces, caches, allocations
        for method, run in runners.items():
            run(ids, n if method == "compiled" else min(n, 16))  # the compiled step traces once per cache capacity
    runs: Dict[Tuple[str, str, str], List[Tuple[Run, list]]] = {}
    for trial in range(trials):
        for kind, group in prompts.items():
            for name, ids in group.items():
                for method, run in runners.items():
                    load = _load()
                    runs.setdefault((kind, name, method), []).append((run(ids, n), load))
        log(f"decoding: trial {trial + 1}/{trials} done (load {_load()})")
    rows = []
    for (kind, name, method), done in runs.items():
        plain_tokens = runs[(kind, name, "plain")][0][0].tokens
        first = done[0][0]
        rates = [r.decode_tps for r, _ in done if r.decode_tps]
        rows.append(
            {
                "kind": kind,
                "prompt": name,
                "method": method,
                "tokens": len(first.tokens),
                "decode_tps": spread(rates) if rates else None,
                "tokens_per_pass": first.tokens_per_pass,
                "acceptance": first.acceptance,
                "same_as_plain": first.tokens == plain_tokens,
                "load_before": [load for _, load in done],
                "load_median": statistics.median(load[0] for _, load in done if load) if any(load for _, load in done) else None,
            }
        )
    return rows


def speedups(rows: List[dict]) -> List[dict]:
    """Per kind of prompt and method: the median over prompts of (method tok/s / plain tok/s), with tokens per pass."""
    plain = {(r["kind"], r["prompt"]): r["decode_tps"]["median"] for r in rows if r["method"] == "plain" and r["decode_tps"]}
    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["kind"] == kind and r["method"] == method and r["decode_tps"] and (kind, r["prompt"]) in plain]
            if not mine:
                continue
            ratios = [r["decode_tps"]["median"] / plain[(kind, r["prompt"])] for r in mine]
            accepted = [r["acceptance"] for r in mine if r["acceptance"] is not None]
            out.append(
                {
                    "kind": kind,
                    "method": method,
                    "speedup": statistics.median(ratios),
                    "speedup_per_prompt": dict(zip((r["prompt"] for r in mine), ratios)),
                    "tokens_per_pass": statistics.median(r["tokens_per_pass"] for r in mine),
                    "acceptance": statistics.median(accepted) if accepted else None,
                    "all_same_as_plain": all(r["same_as_plain"] for r in mine),
                    "load_median": statistics.median(r["load_median"] for r in mine if r["load_median"] is not None)
                    if any(r["load_median"] is not None for r in mine)
                    else None,
                }
            )
    return out


# --------------------------------------------------------------------------
# Step costs and the expected speedup
# --------------------------------------------------------------------------


def step_costs(model, lengths: Sequence[int], reps: int, with_compiled: bool = True) -> dict:
    """Median seconds of one target pass over L tokens after CONTEXT cached ones, plain and compiled, interleaved."""
    context = mx.array([list(range(3, 3 + CONTEXT))]) % model.args.vocab_size
    cache = make_cache(model)
    model(context, cache=cache)
    mx.eval([c.state for c in cache])
    step = static = None
    if with_compiled:
        step, static = CompiledStep(model), StaticCache(model, CONTEXT + max(lengths), _dtype(model))
        step(context, static)
        mx.eval(static.buffers)

    def plain(n):
        mx.eval(model(mx.array([[5] * n]), cache=cache))
        for c in cache:
            c.trim(n)

    def fast(n):
        mx.eval(step(mx.array([[5] * n]), static))
        static.trim(n)

    timers = {"plain": plain, **({"compiled": fast} if with_compiled else {})}
    times: Dict[str, Dict[int, List[float]]] = {name: {n: [] for n in lengths} for name in timers}
    for rep in range(reps + 1):  # the first round warms up (and traces)
        for name, timer in timers.items():
            for n in lengths:
                start = time.perf_counter()
                timer(n)
                if rep:
                    times[name][n].append(time.perf_counter() - start)
    return {name: {str(n): spread(values) for n, values in by_n.items()} for name, by_n in times.items()}


def _dtype(model):
    from mlx.utils import tree_flatten

    return next(p.dtype for _, p in tree_flatten(model.parameters()) if mx.issubdtype(p.dtype, mx.floating))


def expected_tokens_per_pass(a: float, k: int) -> float:
    """E[tokens a pass] with k proposals each accepted with probability a (until the first rejection), plus the target's own."""
    return k + 1.0 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def acceptance_from_tokens_per_pass(tpp: float, k: int) -> float:
    """The per-token acceptance a whose expected_tokens_per_pass(a, k) is tpp (bisection)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if expected_tokens_per_pass(mid, k) < tpp else (low, mid)
    return (low + high) / 2


def expected_speedup(a: float, k: int, target: dict, draft: dict, method: str = "plain") -> float:
    """Speedup over plain decoding (the decoder that ships) with verify and draft steps at `method`'s costs: the
    baseline is always the plain 1-token step, as a compiled 1-token step can be slower (large shapes) or faster."""
    t1 = target["plain"]["1"]["median"]
    tv, td = target[method][str(k + 1)]["median"], draft[method]["1"]["median"]
    return expected_tokens_per_pass(a, k) * t1 / (k * td + tv)


def shape_model(name: str):
    from .__main__ import prepare
    from .shapes import shape_config

    config = shape_config(name)
    model, parameters, _ = prepare(config, "float32")
    return model, parameters


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _f(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


def decode_table(rows: List[dict], markdown: bool = False) -> str:
    header = ["kind", "prompt", "method", "tokens", "decode tok/s (min-max)", "tokens/pass", "acceptance", "same as plain", "load"]
    lines = [
        [
            r["kind"],
            r["prompt"],
            r["method"],
            str(r["tokens"]),
            f"{_f(r['decode_tps']['median'], '.1f')} ({_f(r['decode_tps']['min'], '.0f')}-{_f(r['decode_tps']['max'], '.0f')})"
            if r["decode_tps"]
            else "-",
            _f(r["tokens_per_pass"]),
            _f(r["acceptance"] and 100 * r["acceptance"], ".0f") + ("%" if r["acceptance"] is not None else ""),
            "yes" if r["same_as_plain"] else "NO",
            _f(r["load_median"]),
        ]
        for r in rows
    ]
    return _render(header, lines, markdown)


def speedup_table(entries: List[dict], markdown: bool = False) -> str:
    header = ["kind", "method", "tok/s vs plain", "tokens/pass", "acceptance", "text = plain", "load"]
    lines = [
        [
            e["kind"],
            e["method"],
            f"{e['speedup']:.2f}x",
            _f(e["tokens_per_pass"]),
            _f(e["acceptance"] and 100 * e["acceptance"], ".0f") + ("%" if e["acceptance"] is not None else ""),
            "yes" if e["all_same_as_plain"] else "NO",
            _f(e["load_median"]),
        ]
        for e in entries
    ]
    return _render(header, lines, markdown)


def cost_table(costs: Dict[str, dict], markdown: bool = False) -> str:
    lengths = sorted({int(n) for c in costs.values() for by_n in c["steps"].values() for n in by_n})
    header = ["model", "parameters", "step", *[f"{n} tok ms" for n in lengths], *[f"{n} / 1" for n in lengths[1:]]]
    lines = []
    for name, c in costs.items():
        for method, by_n in c["steps"].items():
            ms = [by_n[str(n)]["median"] * 1e3 if str(n) in by_n else None for n in lengths]
            ratios = [t and t / ms[0] for t in ms[1:]]
            lines.append([name, f"{c['parameters'] / 1e6:.1f}M", method, *[_f(t) for t in ms], *[_f(r) for r in ratios]])
    return _render(header, lines, markdown)


def prediction_table(predictions: List[dict], markdown: bool = False) -> str:
    header = ["pair", "K", "acceptance a", "E tokens/pass", "expected speedup (plain steps)", "(compiled verify and draft)", "note"]
    lines = [
        [
            p["pair"],
            str(p["k"]),
            f"{p['a']:.2f}",
            f"{p['tokens_per_pass']:.2f}",
            f"{p['speedup']:.2f}x",
            _f(p.get("speedup_compiled")) + ("x" if p.get("speedup_compiled") else ""),
            p["note"],
        ]
        for p in predictions
    ]
    return _render(header, lines, markdown)


def plot(path: Path, entries: List[dict], costs: Dict[str, dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    kinds = list(dict.fromkeys(e["kind"] for e in entries))
    method_names = list(dict.fromkeys(e["method"] for e in entries))
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        by_method = {e["method"]: e for e in entries if e["kind"] == kind}
        xs = [j + (i - (len(kinds) - 1) / 2) * width for j in range(len(method_names))]
        values = [by_method[m]["speedup"] if m in by_method else 0 for m in method_names]
        bars = axes[0].bar(xs, values, width, label=f"{kind} prompts")
        for bar, m in zip(bars, method_names):
            if m in by_method and m not in ("plain", "compiled", "mlx-lm"):
                axes[0].annotate(
                    f"{by_method[m]['tokens_per_pass']:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", fontsize=7
                )
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_xticks(range(len(method_names)))
    axes[0].set_xticklabels(method_names, rotation=30, ha="right", fontsize=8)
    axes[0].set_ylabel("decode tok/s / plain greedy (median over prompts)")
    axes[0].set_title("demo model: speedup (numbers: tokens per target pass)", fontsize=9)
    axes[0].legend(fontsize=8)
    for (name, c), marker in zip(costs.items(), "osD^v"):
        for method, by_n in c["steps"].items():
            ns = sorted(int(n) for n in by_n)
            if len(ns) < 2:  # a draft's single-token step: nothing to draw
                continue
            base = by_n[str(ns[0])]["median"]
            axes[1].plot(
                ns,
                [by_n[str(n)]["median"] / base for n in ns],
                marker=marker,
                ls="-" if method == "plain" else "--",
                label=f"{name} {method}",
            )
    axes[1].set_xlabel("tokens in one target pass (verify = K + 1)")
    axes[1].set_ylabel("time / time of a 1-token step")
    axes[1].set_title("what a verify pass costs", fontsize=9)
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(staging: Path, results: dict) -> None:
    (staging / "results.json").write_text(json.dumps(results, indent=2))
    m = results["machine"]["description"]
    (staging / "results.md").write_text(
        f"# elm-mlx speculative decoding benchmark\n\nMachine: {m}. Load average (1 min) before each run is in the `load` column.\n"
        f"Settings: {json.dumps(results['settings'])}\n\n"
        f"## Speedup over plain greedy (decode tok/s; median over prompts of each kind)\n\n{speedup_table(results['speedups'], True)}\n\n"
        f"## Every prompt and method\n\n{decode_table(results['rows'], True)}\n\n"
        f"## Step costs (a target pass over N tokens after {CONTEXT} cached; float32)\n\n{cost_table(results['costs'], True)}\n\n"
        f"## Expected draft-model speedup from the step costs\n\n{prediction_table(results['predictions'], True)}\n"
    )
    plot(staging / PLOT, results["speedups"], results["costs"], m)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    quick = args.quick
    n = args.max_tokens or (8 if quick else 192)
    trials = args.trials or (1 if quick else 3)
    lookup_ks = args.lookup_tokens or ([4] if quick else [4, 10])
    draft_ks = args.draft_tokens or ([2] if quick else [2, 4])
    target_shape, draft_shape = args.pair or (["openelm-tiny", "openelm-tiny"] if quick else ["openelm-1_1B", "openelm-270M"])
    from .shapes import shape_config

    shape_config(target_shape), shape_config(draft_shape)  # unknown names fail now, before any work
    with_peer = not (args.no_peer or quick)
    if with_peer:
        from importlib.util import find_spec

        if find_spec("mlx_lm") is None:
            print("mlx-lm is not installed: its rows are skipped", file=sys.stderr)
            with_peer = False
    out = output_dir(args.out, "speculative", args.force)
    if args.draft is not None and not args.draft.is_dir():
        raise ElmError(f"--draft {args.draft} is not a model directory")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    with atomic_directory(out, args.force) as staging:
        from .__main__ import machine_info

        machine = machine_info({"gb_s": None, "note": "not measured by bench speculative"})
        log(machine["description"])
        model, tokenizer, draft = load_pair(args.draft)
        prompts = {kind: {name: tokenizer.encode(text) for name, text in group.items()} for kind, group in PROMPTS.items()}
        if quick:
            prompts = {kind: dict(list(group.items())[:1]) for kind, group in prompts.items()}
        runners = methods(model, tokenizer, draft, lookup_ks, draft_ks, with_peer)
        log(f"decoding: {len(runners)} methods x {sum(map(len, prompts.values()))} prompts x {trials} trials, {n} tokens each")
        rows = decode_rows(runners, prompts, n, trials, log)
        entries = speedups(rows)
        log(speedup_table(entries))

        reps = 3 if quick else 20
        lengths = sorted({1, *(k + 1 for k in lookup_ks + draft_ks)})
        costs = {
            "demo": {"parameters": _count(model), "steps": step_costs(model, lengths, reps)},
            "demo draft": {"parameters": _count(draft), "steps": step_costs(draft, [1], reps)},
        }
        del runners
        verify = sorted({1, *(k + 1 for k in draft_ks)})  # what a draft pair's prediction needs: big shapes step slowly
        for name, which, lens in ((draft_shape, "draft", [1]), (target_shape, "target", verify)):
            log(f"step costs: {name} ({which}, random weights, float32) ...")
            shaped, parameters = shape_model(name)
            costs[f"{name} ({which})"] = {"parameters": parameters, "steps": step_costs(shaped, lens, 3 if quick else 5)}
            del shaped
            mx.clear_cache()
        log(cost_table(costs))
        predictions = predict(entries, costs, draft_ks, target_shape, draft_shape)
        log(prediction_table(predictions))
        results = {
            "machine": machine,
            "settings": {
                "max_tokens": n,
                "trials": trials,
                "lookup_tokens": lookup_ks,
                "draft_tokens": draft_ks,
                "context": CONTEXT,
                "quick": quick,
            },
            "prompts": {kind: {name: PROMPTS[kind][name] for name in group} for kind, group in prompts.items()},
            "rows": rows,
            "speedups": entries,
            "costs": costs,
            "predictions": predictions,
            "load_average_end": _load(),
        }
        write_outputs(staging, results)
    log(f"results in {out}/ (results.json, results.md, {PLOT})")


def _count(model) -> int:
    from mlx.utils import tree_flatten

    return sum(p.size for _, p in tree_flatten(model.parameters()))


def predict(entries: List[dict], costs: dict, draft_ks: Sequence[int], target_shape: str, draft_shape: str) -> List[dict]:
    """Expected draft speedups: the demo pair (beside its measured one, a check of the formula) and the shape pair."""
    target, draft = costs[f"{target_shape} (target)"]["steps"], costs[f"{draft_shape} (draft)"]["steps"]
    demo, demo_draft = costs["demo"]["steps"], costs["demo draft"]["steps"]
    out = []
    for k in draft_ks:
        measured = [e for e in entries if e["method"] == f"draft K={k}"]
        if not measured:
            continue
        tpp = statistics.median(e["tokens_per_pass"] for e in measured)
        a = acceptance_from_tokens_per_pass(tpp, k)
        speedup = statistics.median(e["speedup"] for e in measured)
        out.append(
            {
                "pair": "demo -> its draft",
                "k": k,
                "a": a,
                "tokens_per_pass": expected_tokens_per_pass(a, k),
                "speedup": expected_speedup(a, k, demo, demo_draft),
                "speedup_compiled": expected_speedup(a, k, demo, demo_draft, "compiled") if "compiled" in demo else None,
                "note": f"a from the measured {tpp:.2f} tokens/pass; measured speedup {speedup:.2f}x",
            }
        )
        for assumed, note in ((a, "a assumed: the demo pair's"), (0.6, "a assumed"), (0.8, "a assumed")):
            out.append(
                {
                    "pair": f"{target_shape} <- {draft_shape}",
                    "k": k,
                    "a": assumed,
                    "tokens_per_pass": expected_tokens_per_pass(assumed, k),
                    "speedup": expected_speedup(assumed, k, target, draft),
                    "speedup_compiled": expected_speedup(assumed, k, target, draft, "compiled") if "compiled" in target else None,
                    "note": note,
                }
            )
    return out
