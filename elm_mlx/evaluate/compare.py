"""What quantization costs: perplexity, size and speed of variants of one model on one text.

A variant is a dtype (float32, float16, bfloat16), `qN` (N-bit weights, groups
of 64), `qNgG` (groups of G) or `mixed` (the mixed-4-6 recipe, see
elm_mlx.quantize). Each is made by elm_mlx.load exactly as `--dtype` /
`--q-bits` would make it (and cached), so the figures describe the models
users run. Size is the variant's weight files, per weight of the float model,
so quantization scales and biases are counted.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from mlx.utils import tree_flatten

from ..dtypes import DTYPES
from ..errors import ElmError
from ..quantize import BITS, GROUP_SIZES
from .perplexity import Result, perplexity

MIXED_RECIPE = "mixed-4-6"
_QUANTIZED = re.compile(r"q(\d+)(?:g(\d+))?")


@dataclass
class Variant:
    name: str
    dtype: Optional[str] = None
    bits: Optional[int] = None
    group_size: int = 64
    recipe: Optional[str] = None

    def load_options(self) -> dict:
        return {"dtype": self.dtype, "q_bits": self.bits, "q_group_size": self.group_size, "q_recipe": self.recipe}


def parse_variants(text: str) -> List[Variant]:
    """`float32,q8,q4,q4g32,mixed` -> variants; a name that is none of the forms is refused by name."""
    out = []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        match = _QUANTIZED.fullmatch(name)
        if name in DTYPES:
            variant = Variant(name, dtype=name)
        elif name == "mixed":
            variant = Variant(name, bits=4, recipe=MIXED_RECIPE)
        elif match and int(match.group(1)) in BITS and int(match.group(2) or 64) in GROUP_SIZES:
            variant = Variant(name, bits=int(match.group(1)), group_size=int(match.group(2) or 64))
        else:
            raise ElmError(
                f"unknown variant {name!r}: use {', '.join(DTYPES)}, mixed, or qN[gG] with N in {', '.join(map(str, BITS))} "
                f"and G in {', '.join(map(str, GROUP_SIZES))}"
            )
        if any(v.name == name for v in out):
            raise ElmError(f"variant {name!r} is named twice")
        out.append(variant)
    if not out:
        raise ElmError("--variants names no variant")
    return out


def weight_count(model_dir: Path) -> int:
    """Weights of the unquantized model the config describes (built lazily: nothing is allocated)."""
    from ..load import build_model, load_config

    config = dict(load_config(model_dir))
    config.pop("quantization", None)
    return sum(v.size for _, v in tree_flatten(build_model(config).parameters()))


def file_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def compare(
    model_name: str, variants: List[Variant], tokens_of, context=None, stride=None, batch_size=8, verbose=True, say=print
) -> List[dict]:
    """One row per variant. `tokens_of(tokenizer)` gives the text's tokens (all variants share one tokenizer)."""
    from ..load import load, mlx_model_dir

    weights = weight_count(mlx_model_dir(model_name, verbose=verbose))
    rows, tokens = [], None
    for v in variants:
        model, tokenizer = load(model_name, verbose=verbose, **v.load_options())
        tokens = tokens_of(tokenizer) if tokens is None else tokens
        size = file_bytes(mlx_model_dir(model_name, v.dtype, v.bits, v.group_size, v.recipe, verbose=False))
        result: Result = perplexity(model, tokens, context, stride, batch_size, progress=verbose, desc=v.name)
        row = {"variant": v.name, **v.load_options(), "file_bytes": size, "bits_per_weight": 8 * size / weights, **result.as_dict()}
        rows.append(row)
        if verbose:
            say(f"{v.name}: perplexity {result.perplexity:.4f} ± {result.perplexity_se:.4f}, {row['bits_per_weight']:.2f} bits/weight")
        del model
    return rows


def table(rows: List[dict]) -> str:
    """Markdown: perplexity against the first row's, size and speed."""
    base = rows[0]["perplexity"]
    lines = [
        f"| variant | perplexity | ± s.e. | vs {rows[0]['variant']} | bits/weight | size (MB) | tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        change = 100 * (r["perplexity"] / base - 1)
        lines.append(
            f"| {r['variant']} | {r['perplexity']:.4f} | {r['perplexity_se']:.4f} | {change:+.2f}% | "
            f"{r['bits_per_weight']:.2f} | {r['file_bytes'] / 1e6:.2f} | {r['tokens_per_second']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: List[dict], path: Path, title: str) -> None:
    """Perplexity against bits per weight, with ±1 s.e. bars: lower-left is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        ax.errorbar(r["bits_per_weight"], r["perplexity"], yerr=r["perplexity_se"], fmt="o", capsize=3)
        ax.annotate(r["variant"], (r["bits_per_weight"], r["perplexity"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("bits per weight (file size / weights)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, rows: List[dict], meta: dict, force: bool) -> None:
    """results.md, results.json and perplexity.png, all or nothing."""
    from ..files import atomic_directory

    with atomic_directory(out, force) as staging:
        (staging / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
        header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
        (staging / "results.md").write_text(f"# Perplexity of quantized variants\n\n{header}\n\n{table(rows)}")
        plot(rows, staging / "perplexity.png", f"{Path(str(meta['model'])).name} on {Path(str(meta['data'])).name}")
