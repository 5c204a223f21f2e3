"""Benchmark output: a table for the terminal, JSON with every figure, markdown, and PNG charts."""

import json
from pathlib import Path
from typing import Dict, List

VARIANT_LABELS = {"fused": "elm-mlx (fused norms)", "naive": "elm-mlx (naive norms)", "mlx-lm": "mlx-lm"}


def _median(stat: dict) -> float:
    return stat["median"]


def ratios(rows: List[dict]) -> List[dict]:
    """Side-by-side ratios from one run: fused/naive and ours/peer, per model and dtype."""
    by_case: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault((row["model"], row["dtype"]), {})[row["variant"]] = row
    out = []
    for (model, dtype), variants in by_case.items():
        fused = variants.get("fused")
        for other, name in (("naive", "fused / naive"), ("mlx-lm", "elm-mlx / mlx-lm")):
            if fused and other in variants:
                longest = max(fused["prompt_tps"], key=int)
                out.append(
                    {
                        "model": model,
                        "dtype": dtype,
                        "ratio": name,
                        "generation": _median(fused["gen_tps"]) / _median(variants[other]["gen_tps"]),
                        f"prompt@{longest}": _median(fused["prompt_tps"][longest]) / _median(variants[other]["prompt_tps"][longest]),
                    }
                )
    return out


def table(rows: List[dict], markdown: bool = False) -> str:
    lengths = sorted({int(k) for row in rows for k in row["prompt_tps"]})
    header = [
        "model",
        "dtype",
        "variant",
        *[f"prompt@{n} tok/s" for n in lengths],
        f"TTFT@{lengths[0]} s",
        "gen tok/s",
        "peak GB",
        "% of bound",
    ]
    lines = []
    for row in rows:
        gen = row["gen_tps"]
        lines.append(
            [
                row["model"],
                row["dtype"],
                row["variant"],
                *[f"{_median(row['prompt_tps'][str(n)]):.1f}" for n in lengths],
                f"{_median(row['ttft_s'][str(lengths[0])]):.3f}",
                f"{gen['median']:.2f} ({gen['min']:.2f}-{gen['max']:.2f})",
                f"{row['peak_memory_gb']:.2f}",
                f"{100 * row['fraction_of_bound']:.0f}%",
            ]
        )
    if markdown:
        rendered = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        rendered += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(rendered)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths]), *(fmt.format(*line) for line in lines)])


def ratio_table(rows: List[dict], markdown: bool = False) -> str:
    entries = ratios(rows)
    if not entries:
        return ""
    keys = [k for k in entries[0] if k not in ("model", "dtype", "ratio")]
    lines = [[e["model"], e["dtype"], e["ratio"], *[f"{e[k]:.3f}" for k in keys]] for e in entries]
    header = ["model", "dtype", "ratio", *keys]
    if markdown:
        return "\n".join(
            ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(line) + " |" for line in lines]]
        )
    return "\n".join("  ".join(f"{cell:<18}" for cell in line) for line in [header, *lines])


def write_outputs(out_dir: Path, machine: dict, settings: dict, rows: List[dict]) -> List[Path]:
    """results.json, results.md and the charts; returns the files written."""
    results = {"machine": machine, "settings": settings, "rows": rows, "ratios": ratios(rows)}
    files = [out_dir / "results.json", out_dir / "results.md"]
    files[0].write_text(json.dumps(results, indent=2))
    files[1].write_text(
        f"# elm-mlx benchmark\n\nMachine: {machine['description']}\n\n{table(rows, markdown=True)}\n\n"
        f"{ratio_table(rows, markdown=True)}\n\nBandwidth measured in this run: {machine['bandwidth']['gb_s']:.1f} GB/s.\n"
    )
    files += _charts(out_dir, rows, machine["description"])
    return files


def _charts(out_dir: Path, rows: List[dict], machine: str) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")

    longest = str(max(int(k) for row in rows for k in row["prompt_tps"]))
    files = []

    # tok/s against model size, OpenELM vs OLMo, fused kernels, one line per family and dtype
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (family, dtype), marker in zip(sorted({(r["family"], r["dtype"]) for r in rows}), "osD^v<>ph"):
        points = sorted((r["parameters"], r) for r in rows if r["family"] == family and r["dtype"] == dtype and r["variant"] == "fused")
        if not points:
            continue
        sizes = [p / 1e6 for p, _ in points]
        axes[0].plot(sizes, [_median(r["gen_tps"]) for _, r in points], marker=marker, label=f"{family} {dtype}")
        axes[1].plot(sizes, [_median(r["prompt_tps"][longest]) for _, r in points], marker=marker, label=f"{family} {dtype}")
    for ax, title in zip(axes, ["generation", f"prompt processing ({longest} tokens)"]):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel("tokens / s")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(machine, fontsize=8)
    fig.tight_layout()
    files.append(out_dir / "tps_by_size.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    # the ablation and the peer, per model and dtype
    size = {r["model"]: r["parameters"] for r in rows}
    cases = sorted({(r["model"], r["dtype"]) for r in rows}, key=lambda case: (size[case[0]], case))
    variants = [v for v in VARIANT_LABELS if any(r["variant"] == v for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(cases) + 4), 4.2))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        found = {(r["model"], r["dtype"]): r for r in rows if r["variant"] == variant}
        xs = [j + i * width for j in range(len(cases))]
        axes[0].bar(xs, [_median(found[c]["gen_tps"]) if c in found else 0 for c in cases], width, label=VARIANT_LABELS[variant])
        axes[1].bar(
            xs, [_median(found[c]["prompt_tps"][longest]) if c in found else 0 for c in cases], width, label=VARIANT_LABELS[variant]
        )
    for ax, title in zip(axes, ["generation", f"prompt processing ({longest} tokens)"]):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], [f"{m}\n{d}" for m, d in cases], fontsize=8)
        ax.set_ylabel("tokens / s")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(machine, fontsize=8)
    fig.tight_layout()
    files.append(out_dir / "ablation.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files
