"""python -m bench serve: the HTTP server under concurrent streams, ours batched against ours serial and mlx_lm.server.

python -m bench serve                                  # the bundled demo model, 1 4 8 16 streams
python -m bench serve --shape openelm-270M             # random weights of the 270M shape (float32)
python -m bench serve --model DIR --concurrency 1 8    # a model directory of yours
python -m bench serve --quick                          # a smoke test: 16 tokens, 1 and 2 streams, our servers only

Each server is a subprocess on a free port: (a) elm_mlx.server --max-batch N, (b) elm_mlx.server --max-batch 1,
(c) mlx_lm.server on the same directory (skipped, with a note, if it is absent or does not start). All are started
first; then, trial by trial and level by level, each server is measured in turn while the others idle, so a busy
spell on a shared machine falls on all of them alike ("ours/mlx-lm paired" is the median of each trial's ratio,
runs minutes apart never divided). At each concurrency, that many greedy streaming /v1/completions requests start together (distinct prompts, the
same ones for every server); the bench records each request's time to first token, its tokens (usage) and the
time of its last chunk. Aggregate tok/s is all streams' completion tokens over the wall time from the first request
sent to the last stream done (prefill included). While our batched server runs, /health is sampled for the KV bytes
per active stream and the padding fraction of the batch. Every server started is stopped on the way out, Ctrl-C
and errors included.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

from elm_mlx.cli import ArgumentParser, int_at_least, one_line
from elm_mlx.errors import ElmError
from elm_mlx.files import atomic_directory

from . import output_dir

REPO = Path(__file__).resolve().parents[1]
LLAMA_TOKENIZER = REPO.parent / "shared" / "assets" / "llama2-tokenizer.model"
HOST = "127.0.0.1"
PLOT = "aggregate_tps.png"
PROMPT_ROOM = 64  # tokens kept for a prompt (they are 20 to 40 long)
SHARED_WORD_TOKENS = 2  # tokens kept per word of --shared-prefix (its words take ~1.5 with these tokenizers)
# `python -m mlx_lm server`, but with the BLAS our server uses: importing elm_mlx first loads OpenBLAS (or MKL) in
# place of the MLX CPU wheel's reference BLAS, which alone made mlx_lm.server ~4x slower on the 270M shape here.
MLX_LM_WITH_OUR_BLAS = [
    sys.executable,
    "-c",
    "import elm_mlx, runpy, sys; sys.argv[0] = 'mlx_lm'; runpy.run_module('mlx_lm', run_name='__main__', alter_sys=True)",
]

SPEAKERS = ["ROMEO", "JULIET", "HAMLET", "KING LEAR", "MACBETH", "OTHELLO", "PORTIA", "PROSPERO", "VIOLA", "BRUTUS", "FALSTAFF"]
LINES = [
    "What light through yonder window breaks, and whither goes the night?",
    "I pray you, sir, what news from the court this morning?",
    "The king is come, and all his lords attend upon him in the hall.",
    "Speak, for I have heard strange tidings of thy brother and his friends.",
    "Good morrow, gentle cousin; how fares the house of York today?",
    "Is this a dagger which I see before me, the handle toward my hand?",
    "My lord, the queen would speak with you before the council sits.",
    "Now is the winter of our discontent made glorious summer by this sun.",
    "If music be the food of love, play on, and give me excess of it.",
    "Friends, countrymen, lend me your ears, I come to bury Caesar.",
    "We are such stuff as dreams are made on, and our little life is rounded.",
    "The quality of mercy is not strained; it droppeth as the gentle rain.",
    "Tell me, good father, what counsel hast thou for a heavy heart?",
]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m bench serve", description="Serving throughput under concurrent streams: ours batched, ours serial, mlx_lm.server."
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="DIR", help="model directory or hub id to serve (default: the bundled demo model, converted)")
    which.add_argument(
        "--shape",
        metavar="NAME",
        help="serve random weights of a bench shape instead, e.g. openelm-270M, written to a temporary directory (default: none)",
    )
    p.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="weight dtype for --shape (default: %(default)s)"
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        metavar="FILE",
        help="SentencePiece tokenizer.model for --shape (default: the Llama-2 tokenizer in ../shared/assets when present, "
        "else the demo's; the model's vocabulary is cut to the tokenizer's when they differ)",
    )
    p.add_argument(
        "--concurrency",
        nargs="+",
        type=int_at_least(1, 256),
        metavar="N",
        help="numbers of simultaneous streams, each a separate measurement (default: 1 4 8 16; --quick: 1 2)",
    )
    p.add_argument("--max-tokens", type=int_at_least(2, 4096), help="tokens each request asks for, greedy (default: 128; --quick: 16)")
    p.add_argument(
        "--trials",
        type=int_at_least(1, 100),
        help="runs of each concurrency per server, trials, levels and servers interleaved; the run with the median aggregate "
        "tok/s is reported, and with 2 or more the median of each trial's ours/mlx-lm ratio (default: 1)",
    )
    p.add_argument("--max-batch", type=int_at_least(2, 256), default=8, help="--max-batch of our batched server (default: %(default)s)")
    p.add_argument("--no-peer", action="store_true", help="skip mlx_lm.server (default: run it when mlx-lm is installed)")
    p.add_argument("--no-serial", action="store_true", help="skip our --max-batch 1 server (default: run it)")
    p.add_argument(
        "--port",
        type=int_at_least(1024, 65533),
        help="first port; the servers take it and the next two (default: free ports chosen by the system)",
    )
    p.add_argument(
        "--start-timeout",
        type=int_at_least(1, 3600),
        default=300,
        help="seconds a server may take to load and answer /health (default: %(default)s)",
    )
    p.add_argument(
        "--request-timeout",
        type=int_at_least(1, 36000),
        default=1800,
        help="seconds one streaming request may take before it counts as failed (default: %(default)s)",
    )
    p.add_argument(
        "--shared-prefix",
        type=int_at_least(0, 100_000),
        default=0,
        metavar="WORDS",
        help="start the prompts of each burst with one preamble of WORDS words, new to the servers: a system prompt "
        "sent with the burst (default: %(default)s, none)",
    )
    p.add_argument("--quick", action="store_true", help="16 tokens, 1 and 2 streams, our two servers only: a smoke test")
    p.add_argument("--out", type=Path, help="output directory (default: bench-results/serve-<time>); refused if it exists unless --force")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


# --------------------------------------------------------------------------
# The model directory
# --------------------------------------------------------------------------


def resolve_model(args, workdir: Path, log) -> tuple:
    """(directory to serve, name, description dict); --shape writes random weights under `workdir`."""
    from elm_mlx.load import mlx_model_dir

    if args.shape is None:
        from elm_mlx.demo import DEMO_DIR

        source = args.model or str(DEMO_DIR)
        if args.model and not Path(args.model).expanduser().exists() and Path(args.model).expanduser().is_absolute():
            raise ElmError(f"--model {args.model} does not exist")
        directory = mlx_model_dir(source, verbose=False)
        name = Path(source).name if Path(source).expanduser().exists() else source
        config = json.loads((directory / "config.json").read_text())
        return directory, name, {"source": str(source), "directory": str(directory), "random_weights": False, **_shape_summary(config)}
    return write_random_model(args.shape, args.dtype, args.tokenizer, workdir, log)


def _shape_summary(config: dict) -> dict:
    keys = (
        "model_type",
        "vocab_size",
        "model_dim",
        "num_transformer_layers",
        "max_context_length",
        "max_position_embeddings",
        "quantization",
    )
    return {k: config[k] for k in keys if k in config}


def write_random_model(shape: str, dtype: str, tokenizer: Optional[Path], workdir: Path, log) -> tuple:
    """A model directory of the shape's random weights, seeded, with a SentencePiece tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from elm_mlx.demo import DEMO_DIR
    from elm_mlx.files import save_weights
    from elm_mlx.load import DTYPES, build_model

    from .shapes import shape_config

    config = shape_config(shape)
    if tokenizer is None:
        tokenizer = LLAMA_TOKENIZER if LLAMA_TOKENIZER.exists() else DEMO_DIR / "tokenizer.model"
    if not tokenizer.is_file():
        raise ElmError(f"--tokenizer {tokenizer} is not a file")
    import sentencepiece

    try:
        vocab = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    except Exception as e:  # sentencepiece raises OSError or RuntimeError for a file that is no model
        raise ElmError(f"--tokenizer {tokenizer} is not a SentencePiece model: {one_line(e, 120)}") from None
    note = None
    if vocab != config["vocab_size"]:
        note = f"vocabulary cut from {config['vocab_size']} to the tokenizer's {vocab}"
        config["vocab_size"] = vocab
    directory = workdir / f"{shape}-random-{dtype}"
    directory.mkdir()
    log(f"writing random {shape} weights ({dtype}) to {directory}" + (f"; {note}" if note else ""))
    mx.random.seed(0)
    model = build_model(config)
    model.set_dtype(DTYPES[dtype])
    weights = dict(tree_flatten(model.parameters()))
    parameters = sum(w.size for w in weights.values())
    save_weights(directory, weights)
    del model, weights
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(tokenizer, directory / "tokenizer.model")
    shutil.copyfile(DEMO_DIR / "tokenizer_config.json", directory / "tokenizer_config.json")
    description = {
        "source": f"random weights of {shape} (seed 0)",
        "directory": None,
        "random_weights": True,
        "dtype": dtype,
        "parameters": parameters,
        "tokenizer": str(tokenizer),
        "note": note,
        **_shape_summary(config),
    }
    return directory, f"{shape} {dtype} (random weights)", description


# --------------------------------------------------------------------------
# Servers as subprocesses
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise ElmError(f"--port: port {port} on {HOST} is not free ({e.strerror or e})") from None


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the bench dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Server:
    """One server process: started in its own process group, stopped with its children."""

    def __init__(self, key: str, label: str, command: List[str], port: int, log_file: Path):
        self.key, self.label, self.command, self.port, self.log_file = key, label, command, port, log_file
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ElmError(f"{self.label} exited with status {self.process.returncode} before serving: {self.last_log_line()}")
            try:
                status, _ = get(self.port, "/health", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise ElmError(f"{self.label} did not answer /health within {timeout:g} s (--start-timeout): {self.last_log_line()}")

    def last_log_line(self) -> str:
        try:
            lines = [line for line in self.log_file.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "(no log)"
        errors = [line for line in lines if "error" in line.lower()]
        return one_line((errors or lines or ["(no output)"])[-1], 300)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children the server started (none expected), in its group
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def get(port: int, path: str, timeout: float = 5) -> tuple:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------


class Prompts:
    """Distinct prompts, in the same order for every server (no server sees a prompt twice in a run).

    With `shared_words`, the prompts of each burst start with one preamble of
    that many words, new to the server (it opens with the burst's number): a
    system prompt that arrives with the burst, which a server should compute once.
    """

    def __init__(self, shared_words: int = 0):
        self.count, self.bursts, self.shared_words = 0, 0, shared_words

    def next(self) -> str:
        k = self.count
        self.count += 1
        first, second = SPEAKERS[k % len(SPEAKERS)], SPEAKERS[(k + 3) % len(SPEAKERS)]
        return f"{first}:\n{LINES[k % len(LINES)]}\n\n{second}:\n"

    def burst(self, n: int) -> List[str]:
        """n prompts sent together."""
        self.bursts += 1
        preamble = ""
        if self.shared_words:
            words = " ".join(LINES * (self.shared_words // 5 + 1)).split()[: self.shared_words]
            preamble = f"Scene {self.bursts}. " + " ".join(words) + "\n\n"
        return [preamble + self.next() for _ in range(n)]


def stream_request(port: int, prompt: str, max_tokens: int, timeout: float, start: threading.Barrier, record: dict) -> None:
    """One streaming completion: send time, first-token time, last-chunk time, tokens (usage), errors."""
    body = json.dumps(
        {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.connect()
        start.wait()
        record["sent"] = time.perf_counter()
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            record["error"] = f"HTTP {response.status}: {one_line(response.read().decode(errors='replace'), 200)}"
            return
        chunks = 0
        while True:
            line = response.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                record["error"] = one_line(event["error"].get("message", event["error"]), 200)
                return
            now = time.perf_counter()
            if event.get("usage"):
                record["tokens"] = event["usage"].get("completion_tokens")
                record["prompt_tokens"] = event["usage"].get("prompt_tokens")
                record["cached_tokens"] = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    chunks += 1
                    record.setdefault("first", now)
                    record["last"] = now
                if choice.get("finish_reason"):
                    record["finish_reason"] = choice["finish_reason"]
        record["chunks"] = chunks
        record.setdefault("tokens", chunks)
        record["done"] = time.perf_counter()
    except (OSError, ValueError, http.client.HTTPException, threading.BrokenBarrierError) as e:
        record["error"] = f"{type(e).__name__}: {one_line(e, 200)}"
    finally:
        connection.close()


class HealthSampler(threading.Thread):
    """GET /health every `interval` seconds until stopped; keeps the JSON bodies."""

    def __init__(self, port: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.port, self.interval, self.samples = port, interval, []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                status, body = get(self.port, "/health", timeout=2)
                if status == 200:
                    self.samples.append(json.loads(body))
            except (OSError, ValueError, http.client.HTTPException):
                pass

    def stop(self) -> list:
        self.stopping.set()
        self.join(5)
        return self.samples


def run_streams(port: int, prompts: List[str], max_tokens: int, timeout: float, health: bool = True) -> tuple:
    """All prompts at once, one thread each; (records, health samples: none without `health`)."""
    start = threading.Barrier(len(prompts) + 1)
    records = [{} for _ in prompts]
    threads = [
        threading.Thread(target=stream_request, args=(port, p, max_tokens, timeout, start, r), daemon=True)
        for p, r in zip(prompts, records)
    ]
    for t in threads:
        t.start()
    sampler = HealthSampler(port)
    try:
        start.wait(timeout=60)
    except threading.BrokenBarrierError:
        pass
    if health:
        sampler.start()
    for t in threads:
        t.join(timeout + 60)
    return records, sampler.stop() if health else []


def _percentile(values: List[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(records: List[dict], samples: List[dict]) -> dict:
    good = [r for r in records if "error" not in r and "done" in r]
    errors = [r["error"] for r in records if "error" in r] + ["no reply" for r in records if "error" not in r and "done" not in r]
    row = {"requests": len(records), "completed": len(good), "errors": errors[:5], "error_count": len(errors)}
    if not good:
        return row
    began = min(r["sent"] for r in records if "sent" in r)
    ended = max(r["done"] for r in good)
    tokens = sum(r["tokens"] or 0 for r in good)
    ttft = [r["first"] - r["sent"] for r in good if "first" in r]
    rates = [(r["tokens"] - 1) / (r["last"] - r["first"]) for r in good if "first" in r and r["tokens"] > 1 and r["last"] > r["first"]]
    row.update(
        {
            "tokens": tokens,
            "tokens_per_request": sorted({r["tokens"] for r in good}),
            "prompt_tokens": sorted({r.get("prompt_tokens") for r in good if r.get("prompt_tokens") is not None}),
            "cached_tokens": [r.get("cached_tokens") for r in good],  # per request, as usage reports it (None: not reported)
            "finish_reasons": sorted({r.get("finish_reason") or "?" for r in good}),
            "wall_s": ended - began,
            "aggregate_tps": tokens / (ended - began) if ended > began else None,
            "ttft_median_s": _percentile(ttft, 0.5),
            "ttft_p90_s": _percentile(ttft, 0.9),
            "ttft_max_s": max(ttft) if ttft else None,
            "per_stream_tps_median": _percentile(rates, 0.5),
            "per_stream_tps_min": min(rates) if rates else None,
        }
    )
    row["health"] = health_summary(samples)
    return row


def health_summary(samples: List[dict]) -> dict:
    busy = [s for s in samples if isinstance(s.get("active"), int) and s["active"] > 0]
    out = {"samples": len(samples), "fields": sorted({k for s in samples for k in s})}
    if busy:
        out["active_max"] = max(s["active"] for s in busy)
    queued = [s["queued"] for s in samples if isinstance(s.get("queued"), int)]
    if queued:
        out["queued_max"] = max(queued)
    per_stream = [s["kv_bytes"] / s["active"] for s in busy if isinstance(s.get("kv_bytes"), (int, float))]
    if per_stream:
        out["kv_bytes_per_stream_median"] = _percentile(per_stream, 0.5)
        out["kv_bytes_per_stream_max"] = max(per_stream)
        out["kv_bytes_max"] = max(s["kv_bytes"] for s in busy if isinstance(s.get("kv_bytes"), (int, float)))
    padding = [s["padding_fraction"] for s in busy if isinstance(s.get("padding_fraction"), (int, float))]
    if padding:
        out["padding_fraction_median"] = _percentile(padding, 0.5)
        out["padding_fraction_max"] = max(padding)
    return out


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def server_plan(args, directory: Path, ports: List[int], logs: Path) -> List[Server]:
    ours = [sys.executable, "-m", "elm_mlx.server", "--model", str(directory), "--no-verbose"]
    plan = [
        Server(
            "batched",
            f"elm-mlx --max-batch {args.max_batch}",
            [*ours, "--port", str(ports[0]), "--max-batch", str(args.max_batch)],
            ports[0],
            logs / "elm-mlx-batched.log",
        )
    ]
    if not args.no_serial:
        plan.append(
            Server(
                "serial",
                "elm-mlx --max-batch 1",
                [*ours, "--port", str(ports[1]), "--max-batch", "1"],
                ports[1],
                logs / "elm-mlx-serial.log",
            )
        )
    if not args.no_peer:
        plan.append(
            Server(
                "mlx-lm",
                "mlx_lm.server",
                [*MLX_LM_WITH_OUR_BLAS, "server", "--model", str(directory), "--port", str(ports[2]), "--log-level", "WARNING"],
                ports[2],
                logs / "mlx-lm.log",
            )
        )
    return plan


def ratios(rows: List[dict], concurrency: List[int]) -> List[dict]:
    def rate(server, n):
        for row in rows:
            if row["server"] == server and row["concurrency"] == n:
                return row.get("aggregate_tps")
        return None

    def trials(server, n):
        for row in rows:
            if row["server"] == server and row["concurrency"] == n:
                return row.get("aggregate_tps_trials") or []
        return []

    out = []
    for n in concurrency:
        entry = {"concurrency": n}
        for name, a, b in (("batched/serial", "batched", "serial"), ("ours/mlx-lm", "batched", "mlx-lm")):
            x, y = rate(a, n), rate(b, n)
            entry[name] = x / y if x and y else None
        paired = [x / y for x, y in zip(trials("batched", n), trials("mlx-lm", n)) if x and y]
        entry["ours/mlx-lm paired"] = statistics.median(paired) if len(paired) > 1 else None
        for server in ("batched", "serial", "mlx-lm"):
            x, single = rate(server, n), rate(server, 1)
            entry[f"{server} vs 1 stream"] = x / single if x and single else None
        out.append(entry)
    return out


def _fmt(value, spec: str = ".1f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def table(rows: List[dict], labels: dict, markdown: bool = False) -> str:
    header = [
        "server",
        "streams",
        "tokens",
        "wall s",
        "aggregate tok/s",
        "TTFT median s",
        "TTFT p90 s",
        "per-stream tok/s",
        "KV MB/stream",
        "padding",
        "errors",
        "load",
    ]
    lines = []
    for row in rows:
        health = row.get("health") or {}
        lines.append(
            [
                labels[row["server"]],
                str(row["concurrency"]),
                str(row.get("tokens", 0)),
                _fmt(row.get("wall_s")),
                _fmt(row.get("aggregate_tps")),
                _fmt(row.get("ttft_median_s"), ".3f"),
                _fmt(row.get("ttft_p90_s"), ".3f"),
                _fmt(row.get("per_stream_tps_median")),
                _fmt(health.get("kv_bytes_per_stream_median"), ".2f", 1e-6),
                _fmt(health.get("padding_fraction_median"), ".2f"),
                str(row.get("error_count", 0)),
                _fmt((row.get("load_before") or [None])[0], ".2f"),
            ]
        )
    return _render(header, lines, markdown)


def ratio_table(entries: List[dict], markdown: bool = False) -> str:
    keys = [k for k in entries[0] if k != "concurrency" and any(e[k] is not None for e in entries)] if entries else []
    header = ["streams", *keys]
    lines = [[str(e["concurrency"]), *[_fmt(e[k], ".2f") for k in keys]] for e in entries]
    return _render(header, lines, markdown)


def _render(header: List[str], lines: List[List[str]], markdown: bool) -> str:
    if markdown:
        return "\n".join(
            ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(line) + " |" for line in lines]]
        )
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths]), *(fmt.format(*line) for line in lines)])


def plot(path: Path, rows: List[dict], labels: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for server, marker in zip(labels, "osD"):
        points = sorted((r["concurrency"], r) for r in rows if r["server"] == server and r.get("aggregate_tps"))
        if not points:
            continue
        xs = [n for n, _ in points]
        axes[0].plot(xs, [r["aggregate_tps"] for _, r in points], marker=marker, label=labels[server])
        axes[1].plot(xs, [r["ttft_median_s"] for _, r in points], marker=marker, label=labels[server])
    for ax, what in zip(axes, ["aggregate tokens / s", "median time to first token (s)"]):
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(what)
        ax.set_xticks(sorted({r["concurrency"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(bottom=0)  # once all lines are drawn: set inside the loop it froze the top at the first line's
    axes[0].set_title("aggregate decode throughput")
    axes[1].set_title("time to first token")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def progress_line(label: str, n: int, run: dict, suffix: str = "") -> str:
    health = run.get("health") or {}
    kv = health.get("kv_bytes_per_stream_median")
    load = run.get("load_before")
    return (
        f"{label}, {n} stream{'s' * (n > 1)}{suffix}: {run.get('tokens', 0)} tokens in {_fmt(run.get('wall_s'))} s, "
        f"{_fmt(run.get('aggregate_tps'))} tok/s aggregate, TTFT median {_fmt(run.get('ttft_median_s'), '.3f')} s, "
        f"per stream {_fmt(run.get('per_stream_tps_median'))} tok/s"
        + (f", KV {kv / 1e6:.2f} MB/stream, padding {_fmt(health.get('padding_fraction_median'), '.2f')}" if kv is not None else "")
        + (f", {run['error_count']} failed: {run['errors'][0]}" if run["error_count"] else "")
        + f" (load {load[0] if load else '?'})"
    )


def _load() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    quick = args.quick
    concurrency = sorted(set(args.concurrency)) if args.concurrency else ([1, 2] if quick else [1, 4, 8, 16])
    max_tokens = args.max_tokens if args.max_tokens is not None else (16 if quick else 128)
    if quick:
        args.no_peer = True
    trials = args.trials or 1
    if args.tokenizer is not None and args.shape is None:
        raise ElmError("--tokenizer is for --shape (a model directory brings its own tokenizer)")
    if args.shape is not None:
        from .shapes import shape_config

        shape_config(args.shape)  # an unknown name fails here, before any work
    if not args.no_peer:
        from importlib.util import find_spec

        if find_spec("mlx_lm") is None:
            print("mlx-lm is not installed: mlx_lm.server skipped", file=sys.stderr)
            args.no_peer = True
    if args.port is not None:
        ports = [args.port, args.port + 1, args.port + 2]
        for port in ports:
            check_port(port)
    else:
        ports = None
    out = output_dir(args.out, "serve", args.force)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    workdir = Path(tempfile.mkdtemp(prefix="elm-mlx-bench-serve-"))
    servers: List[Server] = []
    try:
        with atomic_directory(out, args.force) as staging:
            directory, name, model_info = resolve_model(args, workdir, log)
            context = model_info.get("max_context_length", model_info.get("max_position_embeddings"))
            preamble = SHARED_WORD_TOKENS * args.shared_prefix
            if isinstance(context, int) and max_tokens + PROMPT_ROOM + preamble > context:
                if args.shared_prefix and PROMPT_ROOM + preamble >= context:
                    raise ElmError(
                        f"--shared-prefix {args.shared_prefix} does not fit {name}'s context of {context} tokens "
                        f"(at most {(context - PROMPT_ROOM - 2) // SHARED_WORD_TOKENS} words, fewer with --max-tokens)"
                    )
                raise ElmError(
                    f"--max-tokens {max_tokens} leaves no room for the prompts in {name}'s context of {context} tokens "
                    f"(at most {context - PROMPT_ROOM - preamble}{' with this --shared-prefix' if args.shared_prefix else ''})"
                )
            from .__main__ import machine_info

            machine = machine_info({"gb_s": None, "note": "not measured by bench serve"})
            log(machine["description"])
            logs = workdir / "logs"  # the servers' output; the error line quotes it when one fails
            logs.mkdir()
            servers = server_plan(args, directory, ports or [free_port() for _ in range(3)], logs)
            labels = {s.key: s.label for s in servers}
            rows, skipped, ready = [], [], []
            for server in servers:  # all started first, so that each level's trial runs on every server back to back
                log(f"starting {server.label} on port {server.port} ...")
                try:
                    started = time.perf_counter()
                    server.start(args.start_timeout)
                except ElmError as e:
                    server.stop()
                    if server.key != "mlx-lm":
                        raise
                    skipped.append({"server": server.key, "note": str(e)})
                    log(f"skipping {server.label}: {e}")
                    labels.pop(server.key)
                    continue
                prompts = Prompts(args.shared_prefix)
                warm, _ = run_streams(server.port, prompts.burst(1), 8, args.request_timeout)
                if "error" in warm[0]:
                    server.stop()
                    if server.key != "mlx-lm":
                        raise ElmError(f"{server.label}: the warm-up request failed: {warm[0]['error']}")
                    skipped.append({"server": server.key, "note": f"warm-up request failed: {warm[0]['error']}"})
                    log(f"skipping {server.label}: warm-up request failed: {warm[0]['error']}")
                    labels.pop(server.key)
                    continue
                if not quick:  # every batch size once, untimed
                    run_streams(server.port, prompts.burst(max(concurrency)), 8, args.request_timeout)
                log(f"{server.label} ready in {time.perf_counter() - started:.1f} s (warm-up included)")
                ready.append((server, prompts, {n: [] for n in concurrency}))
            # Trials, levels and servers interleaved: a busy spell on a shared machine spreads over all of them,
            # and each trial's runs of one level on the servers are neighbours in time (the paired ratios).
            for trial in range(trials):
                for n in concurrency:
                    for server, prompts, runs in ready:
                        load = _load()
                        records, samples = run_streams(
                            server.port, prompts.burst(n), max_tokens, args.request_timeout, health=server.key != "mlx-lm"
                        )
                        run = {**summarize(records, samples), "load_before": load, "load_after": _load()}
                        runs[n].append(run)
                        log(progress_line(server.label, n, run, f" [trial {trial + 1}/{trials}]" if trials > 1 else ""))
                        if run["error_count"] and server.key != "mlx-lm":
                            raise ElmError(
                                f"{server.label}: {run['error_count']} of {run['requests']} requests at {n} streams failed: {run['errors'][0]}"
                            )
            for server, _, runs in ready:
                for n in concurrency:
                    clean = [r for r in runs[n] if not r["error_count"]] or runs[n]  # a run with failures only if all had some
                    ordered = sorted(clean, key=lambda r: r.get("aggregate_tps") or 0)
                    row = {"server": server.key, "label": server.label, "concurrency": n, **ordered[(len(ordered) - 1) // 2]}
                    row["aggregate_tps_trials"] = [r.get("aggregate_tps") if not r["error_count"] else None for r in runs[n]]
                    row["failed_requests_all_trials"] = sum(r["error_count"] for r in runs[n])
                    rows.append(row)
                server.stop()
            entries = ratios(rows, concurrency)
            settings = {
                "concurrency": concurrency,
                "max_tokens": max_tokens,
                "max_batch": args.max_batch,
                "trials": trials,
                "quick": quick,
                "temperature": 0,
                "request": "streaming /v1/completions, distinct prompts, stream_options.include_usage",
                "shared_prefix_words": args.shared_prefix,
            }
            results = {
                "machine": machine,
                "model": {"name": name, **model_info},
                "settings": settings,
                "servers": {s.key: {"label": s.label, "port": s.port, "command": s.command} for s in servers if s.key in labels},
                "skipped": skipped,
                "rows": rows,
                "ratios": entries,
                "load_average": _load(),
            }
            (staging / "results.json").write_text(json.dumps(results, indent=2))
            notes = "".join(f"\n- {s['server']} skipped: {s['note']}" for s in skipped)
            (staging / "results.md").write_text(
                f"# elm-mlx serving benchmark: {name}\n\nMachine: {machine['description']}\n\n"
                f"{max_tokens} tokens per request (greedy), streaming /v1/completions, all streams started together"
                + (
                    f", their prompts sharing a {args.shared_prefix}-word preamble new to the server (one per burst). "
                    if args.shared_prefix
                    else ". "
                )
                + "Aggregate tok/s: all completion tokens over the wall time from the first request to the last stream done. "
                "Per-stream tok/s: a stream's tokens after its first over the time between its first and last chunk. "
                "KV MB/stream and padding: /health sampled during the run (our batched server). "
                "Load: the 1-minute load average when the run began (the CPU may be shared). "
                "Servers, levels and trials interleaved; ours/mlx-lm paired: the median over trials of the ratio of "
                "runs made one after the other.\n\n"
                f"{table(rows, labels, markdown=True)}\n\n{ratio_table(entries, markdown=True)}\n\n"
                f"Load average (1, 5, 15 min) at the end: {results['load_average']}.{notes}\n"
            )
            plot(staging / PLOT, rows, labels, f"{name}: {machine['description']}")
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(table(rows, labels))
    if entries:
        print("\n" + ratio_table(entries))
    print(f"\nresults in {out}/ (results.json, results.md, {PLOT})")


if __name__ == "__main__":
    from elm_mlx.cli import run_cli

    run_cli(main)
