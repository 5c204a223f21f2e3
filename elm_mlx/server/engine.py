"""The worker: one generation at a time, in arrival order, on one model.

Requests wait in a queue served by a single thread, so concurrent clients
never share model state. A client that goes away has its job cancelled: a
queued job is skipped, a running one stops at the next prefill chunk or the
next token. The worker keeps the KV cache of the last conversation
(PromptCache), so a request that resends that history only computes its new
tokens.
"""

import asyncio
import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import mlx.core as mx

from ..cache import KVOptions, PromptCache
from ..generation import Cancelled, context_length, stream_generate
from ..sample import SamplingParams, finite_logprobs
from ..tokenizer import Tokenizer


@dataclass
class Job:
    """One generation request, as the worker needs it."""

    prompt_ids: List[int]
    max_tokens: int
    sampling: SamplingParams
    stop: List[str]
    seed: Optional[int]
    top_logprobs: int
    speculative: Optional[dict] = None  # stream_generate's speculative keywords; None: the server's default; {}: plain
    constraint: Any = None  # an elm_mlx.constrain Matcher: the answer follows a JSON schema, regex or grammar
    emit: Any = None  # called from the worker thread with each GenerationResponse, then None
    inbox: Any = None  # (event loop, put): where emit puts them, for a worker that hands over many at once
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        name: str,
        aliases: Sequence[str] = (),
        prefill_step_size: int = 512,
        kv: Optional[KVOptions] = None,
        speculative: Optional[dict] = None,
    ):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        # Speculative decoding: the server's draft model (--draft-model), for requests that ask for nothing else.
        self.speculative = speculative or {}
        self.rotating_kv = kv is not None and kv.max_size is not None  # cannot take tokens back: no speculation
        self.aliases = {name, *aliases}  # model names a request may use for this model
        self.context_length = context_length(model)
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = PromptCache(model, kv)  # kv: a rotating window or quantized keys and values
        self.jobs: "queue.Queue[Job]" = queue.Queue()
        self.created = int(time.time())
        self.finished: "collections.deque[dict]" = collections.deque(maxlen=64)  # recent jobs, for /health and tests
        self.busy = False  # a job is being generated
        self._thread = threading.Thread(target=self._serve, name="elm-mlx-generation", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if not job.cancelled.is_set():
                    self.busy = True
                    self._run(job)
            except Exception as e:  # a bug must not kill the worker: report it to this client only
                job.emit(e)
            finally:
                self.busy = False
                job.emit(None)

    def _run(self, job: Job) -> None:
        last, prefilled = None, None
        responses = stream_generate(
            self.model,
            self.tokenizer,
            job.prompt_ids,
            max_tokens=job.max_tokens,
            sampling=job.sampling,
            stop=job.stop,
            seed=job.seed,
            prefill_step_size=self.prefill_step_size,
            prompt_cache=self.prompt_cache,
            cancel=job.cancelled.is_set,
            # A constrained answer is decoded plainly, even where the server speculates by default (they do not combine yet).
            **({} if job.constraint is not None else (self.speculative if job.speculative is None else job.speculative)),
            constraint=job.constraint,
        )
        try:
            for response in responses:
                if job.cancelled.is_set():
                    break
                last = response
                if job.top_logprobs and response.logprobs is not None:
                    response.logprobs = top_logprobs(response.logprobs, response.token, job.top_logprobs)
                else:
                    response.logprobs = None
                job.emit(response)
        except Cancelled as c:  # the client left during the prefill; nobody is listening
            prefilled = c.done
        finally:
            responses.close()
            self.finished.append(
                {
                    "prompt_tokens": len(job.prompt_ids),
                    "generated_tokens": last.generation_tokens if last else 0,
                    "cached_tokens": last.prompt_cached_tokens if last else 0,
                    "cancelled": job.cancelled.is_set(),
                    "cancelled_in_prefill_after": prefilled,  # prompt tokens computed before it stopped
                }
            )

    def status(self) -> dict:
        """What /health reports: the request being generated (0 or 1) and those waiting."""
        return {"active": int(self.busy), "queued": self.jobs.qsize(), "max_batch": 1}

    @property
    def speculation_refused(self) -> Optional[str]:
        """Why a request may not ask for speculative decoding here, or None when it may."""
        return (
            "this server keeps a rotating KV window (--max-kv-size), which cannot take rejected tokens back" if self.rotating_kv else None
        )

    async def run(self, job: Job):
        """Queue the job; yield its responses as the worker produces them (an exception re-raises)."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        job.emit = lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item)
        job.inbox = (loop, inbox.put_nowait)
        self.jobs.put(job)
        try:
            while True:
                item = await inbox.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            job.cancelled.set()  # the client went away (or we are done): stop generating for it


def top_logprobs(logprobs: mx.array, token: int, k: int) -> dict:
    """The chosen token's log-probability and the k most likely alternatives, all finite (JSON has no -Infinity)."""
    logprobs = finite_logprobs(logprobs)
    top = mx.argpartition(-logprobs, k - 1)[:k] if k < logprobs.size else mx.arange(logprobs.size)
    values = logprobs[top]
    order = mx.argsort(-values)
    return {
        "token": token,
        "logprob": logprobs[token].item(),
        "top": [(t, v) for t, v in zip(top[order].tolist(), values[order].tolist())],
    }
