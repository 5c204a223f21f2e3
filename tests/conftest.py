"""Fixtures: tiny OpenELM configs, model directories and tokenizers made by the tests themselves."""

import os  # noqa: I001

# OpenBLAS 0.3.21 (Debian 12's) can deadlock inside a threaded sgemm when two threads multiply at once, and
# MLX gives every Python thread its own stream: the tests run server workers beside the main thread, and one
# full run hung in exec_blas that way. One BLAS thread per caller has no thread server to deadlock in. It must
# be set before OpenBLAS loads; subprocesses inherit it. See README, "OpenBLAS on Linux".
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# elm_mlx must be imported before mlx anywhere: it loads OpenBLAS in place of the
# wheel's reference BLAS, which only works before mlx is loaded (the split keeps
# the import sorter from moving it).
import elm_mlx  # noqa: F401, E402, I001

# isort: split
import io
import json
import random
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

# Commands say once when MLX runs on its slow reference BLAS. Tests that count stderr lines must not
# depend on whether this machine has OpenBLAS; the notice's own tests turn it back on.
os.environ["ELM_MLX_BLAS_NOTICE"] = "0"


def pytest_report_header(config):
    return f"elm_mlx BLAS: {elm_mlx.BLAS}"


SHARED = Path(__file__).resolve().parents[2] / "shared"
LLAMA_TOKENIZER = SHARED / "assets" / "llama2-tokenizer.model"
REFERENCE_CONFIGS = SHARED / "reference" / "configs"


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is only beside the project's own checkouts)")
    return path


TINY_VOCAB = 384


def tiny_config(**overrides) -> dict:
    """Four layers that differ in query heads, kv heads and FFN width; GQA ratio 4; q/k norm on."""
    config = {
        "model_type": "openelm",
        "vocab_size": TINY_VOCAB,
        "model_dim": 64,
        "head_dim": 16,
        "num_transformer_layers": 4,
        "num_query_heads": [4, 4, 8, 8],
        "num_kv_heads": [1, 1, 2, 2],
        "ffn_multipliers": [0.5, 1.0, 1.5, 2.0],
        "ffn_dim_divisor": 32,
        "num_gqa_groups": 4,
        "qkv_multipliers": [0.5, 1.0],
        "ffn_with_glu": True,
        "normalize_qk_projections": True,
        "share_input_output_layers": True,
        "rope_freq_constant": 10000,
        "rope_max_length": 4096,
        "max_context_length": 2048,
        "activation_fn_name": "swish",
        "normalization_layer_name": "rms_norm",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config.update(overrides)
    return config


def random_weights(config: dict, seed: int = 0) -> dict:
    """Random float32 weights for every parameter of the config's model (norm gains near 1)."""
    from elm_mlx.load import build_model

    rng = np.random.default_rng(seed)
    weights = {}
    for name, p in tree_flatten(build_model(config).parameters()):
        if name.endswith("norm.weight"):
            value = 1.0 + 0.2 * rng.standard_normal(p.shape)
        else:
            value = rng.standard_normal(p.shape) * (0.5 if "embeddings" in name else 0.08)
        weights[name] = mx.array(value.astype(np.float32))
    return weights


def write_model_dir(path: Path, config: dict, weights: dict, tokenizer_model: bytes = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    if tokenizer_model is not None:
        (path / "tokenizer.model").write_bytes(tokenizer_model)
    return path


def _training_text(lines: int = 3000) -> list:
    rng = random.Random(0)
    words = "the king queen lord lady speak now thou art my good friend sir come hither night day love war".split()
    extras = ["café", "naïve", "über", "日本語", "🙂", "ünïcödé"]
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + (" " + rng.choice(extras) if i % 7 == 0 else "")
        for i in range(lines)
    ]


def tiny_olmo(directory: Path, sp_model: bytes, seed: int = 3, **config):
    """A tiny OLMo (random weights, `seed`) with a SentencePiece tokenizer, written to `directory` and loaded;
    `config` overrides the shape below."""
    from elm_mlx.load import load

    config = {
        "model_type": "olmo",
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
        **config,
    }
    path = write_model_dir(directory / "olmo-tiny", config, random_weights(config, seed=seed), sp_model)
    return load(str(path), verbose=False)


@pytest.fixture(scope="session")
def olmo(tmp_path_factory, tiny_sp_model):
    """A tiny OLMo (random weights) with the tiny SentencePiece tokenizer; a test module may define its own."""
    return tiny_olmo(tmp_path_factory.mktemp("olmo"), tiny_sp_model)


def private_cache_env(tmp_path_factory):
    """For a module fixture to `yield from`: a private conversion cache (ELM_MLX_CACHE) for the module's in-process
    loads while it runs, and the environment its subprocesses need (that cache, no hub, this checkout first)."""
    cache = tmp_path_factory.mktemp("cache")
    saved = os.environ.get("ELM_MLX_CACHE")
    os.environ["ELM_MLX_CACHE"] = str(cache)
    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(repo)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    yield {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": path}
    if saved is None:
        os.environ.pop("ELM_MLX_CACHE", None)
    else:
        os.environ["ELM_MLX_CACHE"] = saved


@pytest.fixture(scope="session")
def tiny_sp_model() -> bytes:
    """A SentencePiece BPE model with byte fallback, trained here (no download, no ../shared)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text()),
        model_writer=out,
        vocab_size=TINY_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,
        # Like Llama-2's: keep newlines and repeated spaces as they are.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return out.getvalue()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_sp_model) -> Path:
    config = tiny_config()
    return write_model_dir(tmp_path_factory.mktemp("tiny") / "OpenELM-tiny", config, random_weights(config), tiny_sp_model)


@pytest.fixture(scope="session")
def demo():
    """The bundled demo model in float32, loaded once (tests only read it)."""
    from elm_mlx.demo import DEMO_DIR
    from elm_mlx.load import load

    return load(str(DEMO_DIR), dtype="float32", verbose=False)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """The tiny OpenELM of tiny_model_dir, loaded once (tests only read it)."""
    from elm_mlx.load import load

    return load(str(tiny_model_dir), verbose=False)


class CountingModel:
    """A model that notes the shape of every input it is given (how many passes, how wide)."""

    def __init__(self, model):
        self.model, self.inputs = model, []

    def __call__(self, tokens, **kwargs):
        self.inputs.append(tokens.shape)
        return self.model(tokens, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


class PeakActive:
    """While in use, how many requests a batching server's engine held at once (`peak`): a test of concurrent
    requests asserts it to show they really were batched."""

    def __init__(self, engine):
        import threading

        self.engine, self.peak, self._done = engine, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        import time

        while not self._done.is_set():
            self.peak = max(self.peak, self.engine.batch.active)
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
