"""Continuous batching: many requests share each decode step, joining and leaving freely.

One engine thread owns the model and one latent cache with a row per running request.
A request that arrives while others decode is prefilled on its own, and its cache row is
appended right-aligned to the running batch (``LatentCache.add_rows``), so it joins at the
very next step; a request that finishes (end of text, its token budget, or cancelled by
its client) leaves with ``keep_rows`` without stopping the others. Each row keeps its
own RoPE positions and the cache mask keeps rows from seeing each other's slots, so a
greedy request gets the same tokens alone or batched.

The engine knows token ids only; text, stop strings and HTTP are the server's. Each
request hands in a ``deliver`` callback, called from the engine thread with every new
token id and finally with a ``Finish``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..model.transformer import DeepSeekMini
from .generate import decode_one, prefill
from .sampling import SamplingError, check_sampling, next_token


@dataclass(frozen=True)
class Finish:
    """The last event of a request: ``reason`` is ``stop`` (end of text), ``length`` (the
    token budget or the model's positions ran out), ``cancelled`` or ``error``."""

    reason: str


Event = int | Finish


@dataclass
class Request:
    """One prompt to continue; ``deliver`` receives token ids, then one ``Finish``."""

    prompt: list[int]
    max_tokens: int
    deliver: Callable[[Event], None]
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (a client went away or a
        stop string matched); its slot is free from then on."""
        self.cancelled.set()


@dataclass
class _Row:
    request: Request
    generator: torch.Generator | None
    budget: int  # tokens still to deliver
    position: int  # RoPE position of ``token``: the prompt's length for the first one
    token: int  # the token fed next


class Batcher:
    """Runs requests through ``model`` in one shared batch of at most ``max_batch`` rows."""

    def __init__(self, model: DeepSeekMini, eos_id: int, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise SamplingError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.eos_id = eos_id
        self.max_batch = max_batch
        self.max_position = model.config.max_position
        self._waiting: queue.Queue[Request | None] = queue.Queue()
        self._rows: list[_Row] = []
        self._cache = model.new_cache(0, self.max_position)
        self._thread: threading.Thread | None = None
        self._closed = False

    # --- the caller's side (any thread) ---

    def check(self, prompt: list[int], max_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None) -> None:
        """Raise ``SamplingError`` for a request the engine could not run."""
        check_sampling(temperature, top_k, top_p)
        if max_tokens < 0:
            raise SamplingError(f"max_tokens must be >= 0, got {max_tokens}")
        if not prompt:
            raise SamplingError("the prompt has no tokens")
        if len(prompt) > self.max_position:
            raise SamplingError(f"the prompt is {len(prompt)} tokens long but the model reads "
                                f"at most {self.max_position} (model.max_position)")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise SamplingError(f"prompt token ids must be in [0, {vocab})")

    def submit(self, request: Request) -> None:
        """Queue ``request``; it joins the running batch at the next step with room."""
        self.check(request.prompt, request.max_tokens, request.temperature, request.top_k,
                   request.top_p)
        if self._closed:
            raise RuntimeError("the batcher is closed")
        self._waiting.put(request)

    def start(self) -> Batcher:
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the engine after its current step; requests still running are cancelled."""
        self._closed = True
        self._waiting.put(None)
        if self._thread is not None:
            self._thread.join()

    @property
    def running(self) -> int:
        """How many requests hold a row now."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    # --- the engine thread ---

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._closed:
                self._admit(block=not self._rows)
                if self._rows:
                    self._guarded(self._step, [r.request for r in self._rows])
            for row in self._rows:
                row.request.deliver(Finish("cancelled"))
            self._drain()

    def _admit(self, block: bool) -> None:
        """Take waiting requests while rows are free; wait for one when idle."""
        while len(self._rows) < self.max_batch:
            try:
                request = self._waiting.get(block=block)
            except queue.Empty:
                return
            if request is None:
                return
            block = False
            self._guarded(lambda r=request: self._join(r), [request])

    def _guarded(self, work: Callable[[], None], requests: list[Request]) -> None:
        """Run ``work``; if it fails, its requests end with an error and their rows go,
        so one bad step never hangs a client or stops the engine."""
        try:
            work()
        except Exception:  # noqa: BLE001 - reported to the requests, the engine goes on
            for request in requests:
                request.deliver(Finish("error"))
            gone = {id(r) for r in requests}
            keep = [i for i, row in enumerate(self._rows) if id(row.request) not in gone]
            self._keep(keep)

    def _join(self, request: Request) -> None:
        """Prefill ``request`` alone, deliver its first token and add its row."""
        budget = min(request.max_tokens, self.max_position - len(request.prompt))
        if request.cancelled.is_set():
            request.deliver(Finish("cancelled"))
            return
        if budget == 0:
            request.deliver(Finish("length"))
            return
        device = self.model.device
        ids = torch.tensor([request.prompt], device=device)
        cache = self.model.new_cache(1, len(request.prompt))
        positions = torch.arange(len(request.prompt), device=device)[None]
        logits = prefill(self.model, ids, cache, positions, None)
        generator = (None if request.seed is None
                     else torch.Generator(device).manual_seed(request.seed))
        row = _Row(request, generator, budget, len(request.prompt), 0)
        token = int(self._sample(logits, [row])[0])
        if self._deliver(row, token):
            self._cache.add_rows(cache)
            self._rows.append(row)

    def _step(self) -> None:
        """One token for every running row; finished and cancelled rows leave."""
        self._keep([i for i, row in enumerate(self._rows) if not self._cancelled(row)])
        if not self._rows:
            return
        if self._cache.length == self._cache.max_len:
            self._cache.compact()
        device = self.model.device
        tokens = torch.tensor([[row.token] for row in self._rows], device=device)
        positions = torch.tensor([[row.position] for row in self._rows], device=device)
        logits = decode_one(self.model, tokens, self._cache, positions)
        for row in self._rows:  # each fed token took its position; the next takes the one after
            row.position += 1
        chosen = self._sample(logits, self._rows).tolist()  # the step's one host sync
        self._keep([i for i, (row, token) in enumerate(zip(self._rows, chosen, strict=True))
                    if self._deliver(row, token)])

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """A token per row under each row's own settings: greedy rows in one argmax, and
        each sampling row with its own filters and generator (a loop over requests, not
        tokens: a seeded request draws the same numbers whoever shares its steps)."""
        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            r = row.request
            if r.temperature > 0.0:
                tokens[i] = next_token(logits[i:i + 1], r.temperature, r.top_k, r.top_p,
                                       row.generator)[0]
        return tokens

    def _deliver(self, row: _Row, token: int) -> bool:
        """Hand ``token`` to the row's request; True while the row goes on."""
        request = row.request
        if token == self.eos_id:
            request.deliver(Finish("stop"))
            return False
        request.deliver(token)
        row.budget -= 1
        if row.budget == 0:
            request.deliver(Finish("length"))
            return False
        row.token = token
        return True

    def _cancelled(self, row: _Row) -> bool:
        if row.request.cancelled.is_set():
            row.request.deliver(Finish("cancelled"))
            return True
        return False

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        self._cache.keep_rows(torch.tensor(keep, dtype=torch.long,
                                           device=self._cache.latents.device))

    def _drain(self) -> None:
        """Cancel whatever is still queued when the engine stops."""
        while True:
            try:
                request = self._waiting.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                request.deliver(Finish("cancelled"))

