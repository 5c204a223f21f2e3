"""The benchmark's honesty checks: the ablation computes the same thing, and the report has every figure."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from bench.ablation import NaiveLayerNorm, NaiveRMSNorm, use_naive_norms
from bench.measure import bytes_read_per_token
from bench.shapes import OLMO_TINY, OPENELM_TINY, shape_config
from elm_mlx.load import build_model

TOKENS = mx.array(np.random.default_rng(0).integers(0, 2048, size=(1, 24)))


@pytest.mark.parametrize(
    "config, norms, naive_type",
    [(OPENELM_TINY, 4 * 4 + 1, NaiveRMSNorm), (OLMO_TINY, 4 * 2 + 1, NaiveLayerNorm)],
    ids=["openelm-rmsnorm", "olmo-layernorm"],
)
def test_naive_norms_compute_what_the_fused_kernels_compute(config, norms, naive_type):
    mx.random.seed(0)
    model = build_model(config)
    # norm gains away from 1 (OLMo's norms have none), so that a dropped or misplaced gain would show
    gains = [(k, mx.random.uniform(0.5, 1.5, v.shape)) for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight")]
    model.update(tree_unflatten(gains))
    fused = model(TOKENS)
    assert use_naive_norms(model) == norms
    kinds = [type(m) for _, m in model.named_modules()]
    assert kinds.count(naive_type) == norms and nn.RMSNorm not in kinds and nn.LayerNorm not in kinds
    naive = model(TOKENS)
    assert mx.abs(fused - naive).max().item() <= 1e-4
    assert mx.abs(fused).max().item() > 0.1


def test_bytes_read_per_token_by_hand():
    model = build_model(OPENELM_TINY)  # tied, float32
    params = sum(p.size for _, p in tree_flatten(model.parameters()))
    kv = sum(2 * kv_heads * 32 * 10 * 4 for kv_heads in OPENELM_TINY["num_kv_heads"])
    assert bytes_read_per_token(model, context=10) == params * 4 + kv

    untied = build_model({**OLMO_TINY, "tie_word_embeddings": False})
    flat = dict(tree_flatten(untied.parameters()))
    without_embedding = sum(v.nbytes for k, v in flat.items() if "embed_tokens" not in k)
    assert bytes_read_per_token(untied, context=0) == without_embedding


def test_known_shapes_are_the_published_ones():
    assert shape_config("openelm-1_1B")["num_query_heads"][-1] == 32
    assert shape_config("olmo-1B")["hidden_size"] == 2048


def test_quick_run_writes_every_figure(tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--dtypes", "float32", "q8", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    covered = {(r["model"], r["dtype"], r["variant"]) for r in rows}
    for model in ("openelm-tiny", "olmo-tiny"):
        for dtype in ("float32", "q8"):
            assert {(model, dtype, "fused"), (model, dtype, "naive")} <= covered
            if model.startswith("openelm"):
                assert (model, dtype, "mlx-lm") in covered
    for row in rows:
        assert row["gen_tps"]["median"] > 0 and row["peak_memory_gb"] > 0 and 0 < row["fraction_of_bound"]
        assert all(v["median"] > 0 for v in row["prompt_tps"].values()) and all(v["median"] > 0 for v in row["ttft_s"].values())
        assert row["bytes_per_token"] > 0 and row["parameters"] > 0
    assert data["machine"]["bandwidth"]["gb_s"] > 0 and data["machine"]["versions"]["mlx"]
    assert {r["ratio"] for r in data["ratios"]} == {"fused / naive", "elm-mlx / mlx-lm"}
    for name in ("results.md", "tps_by_size.png", "ablation.png"):
        assert (out / name).stat().st_size > 0
    assert "gen tok/s" in result.stdout
    blas = data["machine"]["blas"]  # which BLAS made these figures, in both reports
    assert blas.split(" ")[0] in ("openblas", "mkl", "reference", "platform") and f"BLAS: {blas}" in (out / "results.md").read_text()

    again = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "already exists; pass --force" in again.stderr


def test_unknown_shape_is_one_line():
    result = subprocess.run([sys.executable, "-m", "bench", "--models", "gpt-5"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0 and "unknown model shape 'gpt-5'" in result.stderr


def test_a_model_directory_is_benchmarked_with_its_own_weights(tmp_path, tiny_model_dir):
    """Run with the wheel's reference BLAS: the bench says so once and records it."""
    out = tmp_path / "r"
    command = [
        sys.executable,
        "-m",
        "bench",
        "--model",
        str(tiny_model_dir),
        "--prompt-lengths",
        "8",
        "--gen-tokens",
        "4",
        "--trials",
        "1",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "ELM_MLX_BLAS": "reference"})
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    if sys.platform == "linux":
        assert data["machine"]["blas"] == "reference (ELM_MLX_BLAS)"
        assert result.stderr.count("slow reference BLAS") == (1 if mx.default_device() == mx.cpu else 0)
    assert {r["variant"] for r in rows} == {"fused", "naive", "mlx-lm"}
    assert all(r["model"] == tiny_model_dir.name and r["parameters"] > 0 for r in rows)
