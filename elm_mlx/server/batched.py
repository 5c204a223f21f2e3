"""The batching worker: many requests decoded together, one forward pass per step for all of them.

The same interface as engine.Engine (run(job), name, aliases, tokenizer,
context_length), so the app does not know which one serves it; the work is
elm_mlx.batching.BatchEngine's. One thread owns the model: it admits new
jobs, passes on cancellations from clients that left, runs a step, and hands
each job its events. A job's slot is freed at the next step after its client
goes, prefill included (a step prefills at most one chunk).
"""

import queue
import time
from typing import Any, Dict, List, Optional, Tuple

from ..batching import BatchEngine, Event, Request
from ..cache import KVOptions, PromptStore
from ..constrain import ConstraintError
from ..errors import ElmError
from ..generation import GenerationResponse
from .engine import Engine, Job, top_logprobs

GATHER_SHARE = 0.25  # of a decode step's time: how long an idle worker waits for more arrivals after the first ...
GATHER_LIMIT = 0.05  # ... but never more than this many seconds
FIRST_STEP_GUESS = 0.04  # a decode step's time before one is measured: the first burst after start-up waits 10 ms


class BatchedEngine(Engine):
    """Continuous batching for the server: up to `max_batch` requests decode together, the rest queue."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        aliases=(),
        prefill_step_size: int = 512,
        max_batch: int = 8,
        prompt_cache_bytes: Optional[int] = None,
        kv: Optional[KVOptions] = None,
    ):
        # Prefixes of earlier requests (a shared system prompt, a conversation resent with each turn) are reused.
        self.store = PromptStore(prompt_cache_bytes)
        self.max_batch, self.kv = max_batch, kv  # kv: keys and values quantized (bits), in the batch and in the store
        self.gather_limit = GATHER_LIMIT
        self.step_seconds = FIRST_STEP_GUESS  # a decode step's time: measured (a moving average) once there is one
        self._measured = False
        self.batch = self._new_batch(model, tokenizer, prefill_step_size)
        self.running: Dict[int, Job] = {}  # BatchEngine id -> the job it serves
        self.outbox: List[Tuple[Job, Any]] = []  # a step's responses, handed over together
        super().__init__(model, tokenizer, name, aliases, prefill_step_size)

    # Engine's constructor starts the worker thread on _serve.
    def _serve(self) -> None:
        while True:
            self._admit(wait=not self.running)
            self._pass_on_cancellations()
            started = time.monotonic()
            try:
                events = self.batch.step()
            except Exception as e:  # a bug must not kill the worker: fail the jobs it was serving, start afresh
                self._fail_all(e)
                continue
            if self._a_decode_step(events):
                took = time.monotonic() - started
                self.step_seconds = 0.8 * self.step_seconds + 0.2 * took if self._measured else took
                self._measured = True
            for event in events:
                self._deliver(event)
            self._hand_over()

    def _a_decode_step(self, events: List[Event]) -> bool:
        """Whether a step's time is a decode step's: it handed out tokens (so it waited for a forward pass) and
        prefilled nothing, with nothing waiting to prefill (then it hands out without launching the next pass)."""
        return (
            any(e.token is not None for e in events)
            and not any(e.prefilled is not None for e in events)
            and not self.batch.prefilling
            and not self.batch.waiting
        )

    def _new_batch(self, model, tokenizer, prefill_step_size: int) -> BatchEngine:
        return BatchEngine(
            model, tokenizer, max_batch=self.max_batch, prefill_step_size=prefill_step_size, prompt_cache=self.store, kv=self.kv
        )

    def _admit(self, wait: bool) -> None:
        """Hand every arrived job to the batch; with nothing running, sleep until one arrives.

        Requests sent together reach the queue milliseconds apart (each is
        parsed and tokenized first). An idle worker that took the first one at
        once would prefill it alone, and the others would wait for that prefill
        and a decode step. So after waking it keeps taking arrivals for a
        window of GATHER_SHARE of a decode step's measured time (at most
        GATHER_LIMIT, or until the batch is full) and prefills them together:
        a lone request pays a fraction of one step, which a prefill exceeds.
        """
        deadline = None
        while True:
            try:
                if deadline is None:
                    job = self.jobs.get(block=wait)
                else:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if wait:
                deadline = time.monotonic() + min(self.gather_limit, GATHER_SHARE * self.step_seconds)
            wait = False
            if deadline is not None and len(self.running) + 1 >= self.max_batch:
                deadline = None  # the batch is full: take what has arrived, wait no more
            if job.cancelled.is_set():
                job.emit(None)
                continue
            request = Request(job.prompt_ids, job.max_tokens, job.sampling, job.stop, job.seed, job.constraint)
            try:
                self.running[self.batch.submit(request)] = job
            except ElmError as e:  # the app checks first; this is the batch's own word on it
                job.emit(e)
                job.emit(None)

    def _pass_on_cancellations(self) -> None:
        for id, job in self.running.items():
            if job.cancelled.is_set():
                self.batch.cancel(id)

    def _deliver(self, event: Event) -> None:
        job = self.running.get(event.id)
        if job is None:
            return
        finished = event.finish_reason is not None
        if event.finish_reason == "error":  # its constraint could not be followed: this client's error only
            self.outbox.append((job, ConstraintError(event.error or "the constraint could not be followed")))
        elif event.prefilled is None and event.finish_reason != "cancelled" and not job.cancelled.is_set():
            self.outbox.append((job, self._response(job, event)))
        if finished:
            del self.running[event.id]
            self.finished.append(
                {
                    "prompt_tokens": event.prompt_tokens,
                    "generated_tokens": event.generation_tokens,
                    "cached_tokens": event.cached_tokens,
                    "cancelled": event.finish_reason == "cancelled",
                    "finish_reason": event.finish_reason,
                    "finished_at": time.monotonic(),
                }
            )
            self.outbox.append((job, None))

    def _hand_over(self) -> None:
        """The step's responses to their clients: one wake-up of each event loop per step, not one per token."""
        by_loop: Dict[Any, list] = {}
        for job, item in self.outbox:
            if job.inbox is None:
                job.emit(item)
            else:
                loop, put = job.inbox
                by_loop.setdefault(loop, []).append((put, item))
        self.outbox = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    @staticmethod
    def _response(job: Job, event: Event) -> GenerationResponse:
        logprobs = None
        if job.top_logprobs and event.logprobs is not None and event.token is not None:
            logprobs = top_logprobs(event.logprobs, event.token, job.top_logprobs)
        return GenerationResponse(
            text=event.text,
            token=event.token,
            logprobs=logprobs,
            prompt_tokens=event.prompt_tokens,
            prompt_tps=0.0,
            generation_tokens=event.generation_tokens,
            generation_tps=0.0,
            peak_memory_gb=0.0,
            finish_reason=event.finish_reason,
            prompt_cached_tokens=event.cached_tokens,
        )

    def _fail_all(self, error: Exception) -> None:
        self._hand_over()
        for job in self.running.values():
            job.emit(error)
            job.emit(None)
        self.running.clear()
        self.store.clear()  # what a failed step stored may be half-made
        self.batch = self._new_batch(self.model, self.tokenizer, self.prefill_step_size)

    @property
    def speculation_refused(self) -> Optional[str]:
        return "needs a server started with --max-batch 1 (it verifies one request at a time); this one batches requests"

    def status(self) -> dict:
        """What /health reports: requests decoding or prefilling, requests waiting, and the batch's memory."""
        return {
            "active": self.batch.active,
            "queued": self.batch.queued + self.jobs.qsize(),
            "max_batch": self.max_batch,
            "kv_bytes": self.batch.kv_bytes(),
            "padding_fraction": round(self.batch.padding_fraction(), 4),
            "prompt_cache_bytes": self.store.nbytes,
            "prompt_cache_entries": len(self.store),
        }


def _put_all(items: list) -> None:
    for put, item in items:
        put(item)
