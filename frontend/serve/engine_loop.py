"""`EngineLoop`: the one thread that owns an `LLMEngine` while a server runs.

Request handlers never touch the engine. They `submit` a request (its prompts, each with its
`SamplingParams`) and read `Update`s from the returned `RequestHandle`; aborts and shutdown go
through the same command queue. The thread adds what arrived, runs one engine step (requests
from every client join the running batch there: in-flight batching), and hands each request
the tokens it gained, in one call into the event loop per step. While nothing runs it sleeps
on the command queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from trtllm.kernels.errors import RequestError, TrtllmError
from trtllm.runtime.llm_engine import LLMEngine
from trtllm.runtime.sampling_params import GenerationOutput, SamplingParams

from .metrics import ServerMetrics

_log = logging.getLogger("trtllm.serve")


class QueueFullError(TrtllmError):
    """The server holds as many requests as it may; the client should retry later."""


@dataclass(frozen=True)
class Update:
    """What one choice of a request gained in one engine step."""

    index: int  # which of the request's prompts (choices) this is
    token_ids: list[int]  # tokens made since the last update
    logprobs: list[float] | None  # their log-probabilities, when asked
    top_logprobs: list[dict[int, float]] | None  # their most likely alternatives, when asked
    finish_reason: str | None = None  # "stop", "length" or "abort" once the choice is done
    text: str | None = None  # the whole text when a stop string cut it (it ends before the string)


@dataclass(eq=False)  # compared and hashed by identity
class RequestHandle:
    """One submitted request as its handler sees it: updates arrive on `queue`."""

    choices: list[tuple[list[int], SamplingParams]]  # (prompt ids, params) per choice
    loop: asyncio.AbstractEventLoop  # the handler's event loop, where updates are delivered
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # Update, or an exception that ends the request
    created: float = field(default_factory=time.perf_counter)  # when it was submitted

    async def updates(self) -> AsyncIterator[Update]:
        """Every update until all choices have finished; raises the error that ended the request."""
        remaining = set(range(len(self.choices)))
        while remaining:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                remaining.discard(item.index)
            yield item


@dataclass
class _Tracked:
    """The loop thread's view of one choice in the engine."""

    handle: RequestHandle
    index: int  # the choice's index in its handle
    sent: int = 0  # tokens already handed over
    last: float = 0.0  # perf_counter of the last update with tokens (0: none yet)


class EngineLoop:
    """Drives `runtime` from one background thread; see the module docstring."""

    def __init__(self, runtime: LLMEngine, max_requests: int, metrics: ServerMetrics | None = None):
        self.runtime = runtime
        self.max_requests = max_requests  # choices held at once, running or waiting; more get QueueFullError
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}  # engine request id -> choice (loop thread only)
        self._held = 0  # choices submitted and not finished (guarded by _count_lock)
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="trtllm-engine-loop", daemon=True)
        self._stopping = False  # set by the loop thread on a stop command

    # -- the handlers' side (event loop thread) --------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, choices: list[tuple[list[int], SamplingParams]]) -> RequestHandle:
        """Queue a request of one or more choices; QueueFullError when the server is full."""
        with self._count_lock:
            if self._held + len(choices) > self.max_requests:
                raise QueueFullError(f"the server holds {self._held} requests, its limit is {self.max_requests}; "
                                     "retry later")
            self._held += len(choices)
        handle = RequestHandle(choices, asyncio.get_running_loop())
        self._commands.put(("add", handle))
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Stop a request's unfinished choices and free their cache blocks (the client left)."""
        self._commands.put(("abort", handle))

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """End the thread: after every held request finished (drain) or aborting them."""
        self._commands.put(("stop", drain))
        self._thread.join(timeout)

    # -- the loop thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            idle = not self._tracked
            if self._stopping and idle:
                return
            self._take_commands(block=idle and not self._stopping)
            if self._tracked:
                self._step()
            if self.metrics is not None:
                self.metrics.observe_engine(self.runtime)

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return
        while True:
            kind, arg = command
            if kind == "add":
                self._add(arg)
            elif kind == "abort":
                self._abort(arg, "abort")
            elif kind == "stop":
                self._stopping = True
                if not arg:
                    for handle in {t.handle for t in self._tracked.values()}:
                        self._abort(handle, "abort")
            try:
                command = self._commands.get(block=False)
            except queue.Empty:
                return

    def _add(self, handle: RequestHandle) -> None:
        added = []
        try:
            for index, (prompt, params) in enumerate(handle.choices):
                request_id = self.runtime.add_request(prompt, params)
                added.append(request_id)
                self._tracked[request_id] = _Tracked(handle, index)
        except RequestError as exc:  # the handler checked first; this is what it could not see
            for request_id in added:
                self.runtime.abort(request_id)
                del self._tracked[request_id]
            self._release(len(handle.choices))
            handle.loop.call_soon_threadsafe(handle.queue.put_nowait, exc)
            return
        if self.metrics is not None:
            self.metrics.on_request(sum(len(prompt) for prompt, _ in handle.choices))

    def _abort(self, handle: RequestHandle, reason: str, notify: bool = True) -> None:
        """Abort the handle's unfinished choices; with notify, each gets a last update saying so."""
        mine = [rid for rid, t in self._tracked.items() if t.handle is handle]
        updates = []
        for request_id in mine:
            self.runtime.abort(request_id)
            updates.append((handle, Update(self._tracked.pop(request_id).index, [], None, None, finish_reason=reason)))
        if notify:
            self._deliver(updates)
        self._release(len(mine))
        if self.metrics is not None:
            for _ in mine:
                self.metrics.on_finish(reason, time.perf_counter() - handle.created)

    def _release(self, count: int) -> None:
        with self._count_lock:
            self._held -= count

    def _step(self) -> None:
        try:
            finished = {out.request_id: out for out in self.runtime.step()}
        except Exception as exc:  # noqa: BLE001 -- clients must not wait forever: each gets the error, serving goes on
            _log.exception("engine step failed; ending the %d requests in it", len(self._tracked))
            for handle in {t.handle for t in self._tracked.values()}:
                self._abort(handle, "abort", notify=False)
                handle.loop.call_soon_threadsafe(handle.queue.put_nowait, exc)
            return
        now = time.perf_counter()
        updates = []
        for request_id, tracked in list(self._tracked.items()):
            out = finished.get(request_id) or self.runtime.progress(request_id)
            if out is None:
                continue
            update = self._update(tracked, out, request_id in finished, now)
            if update is not None:
                updates.append((tracked.handle, update))
            if request_id in finished:
                del self._tracked[request_id]
                self._release(1)
                if self.metrics is not None:
                    self.metrics.on_finish(out.finish_reason or "stop", now - tracked.handle.created)
        self._deliver(updates)

    def _update(self, tracked: _Tracked, out: GenerationOutput, done: bool, now: float) -> Update | None:
        """The part of `out` not handed over yet (None if nothing changed)."""
        start, new = tracked.sent, len(out.token_ids) - tracked.sent
        if new <= 0 and not done:
            return None
        if new > 0 and self.metrics is not None:
            self.metrics.on_tokens(new, now - (tracked.last or tracked.handle.created), first=tracked.last == 0.0)
        if new > 0:
            tracked.sent, tracked.last = len(out.token_ids), now
        return Update(tracked.index, out.token_ids[start:],
                      None if out.logprobs is None else out.logprobs[start:],
                      None if out.top_logprobs is None else out.top_logprobs[start:],
                      finish_reason=(out.finish_reason or "stop") if done else None, text=out.text if done else None)

    @staticmethod
    def _deliver(updates: list[tuple[RequestHandle, Update]]) -> None:
        """Hand updates to their handlers: one call into each event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Update]]] = {}
        for handle, update in updates:
            by_loop.setdefault(handle.loop, []).append((handle, update))
        for loop, items in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[RequestHandle, Update]]) -> None:
    for handle, update in items:
        handle.queue.put_nowait(update)
