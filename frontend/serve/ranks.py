"""Serving a model split over ranks (`trtllm serve --tp N` or `--pp N` under torchrun): HTTP
requests reach rank 0 alone; every other rank follows it.

Each rank runs its own `LLMEngine` over its part of the model, and every step is a collective
(all-reduces, a pipeline's sends and logits broadcast), so every rank must make the same
scheduler decisions on the same requests, step for step. Rank 0's engine loop drives a
`Leader` in place of its engine: the Leader records each request the loop adds (its id, prompt
and params) and each abort, and before each step sends that record to the other ranks in one
broadcast; `follow`, on every other rank, applies the record to its own engine in the same
order, then steps. Each engine so sees the same calls in the same order as rank 0's:

    rank 0:  loop adds a, aborts b   ──broadcast [add a, abort b, step]──▶  step
    rank r:                            add a, abort b                       step

The record travels over a gloo group of its own (on the CPU, also where the model's group is
NCCL) with a long timeout, so that the other ranks can wait for an idle server's next request.
When rank 0's loop ends (the server drains at SIGTERM), the Leader sends "stop" and `follow`
returns. Meanwhile `follow` ignores SIGINT and SIGTERM: torchrun signals every rank at once,
and the others must go on stepping while rank 0 drains.
"""

from __future__ import annotations

import datetime
import logging
import signal

import torch.distributed as dist

from trtllm.runtime.llm_engine import LLMEngine
from trtllm.runtime.sampling_params import GenerationOutput, SamplingParams

_log = logging.getLogger("trtllm.serve")

STEP, STOP = "step", "stop"  # what follows each record
# How long the other ranks wait for rank 0's next record: an idle server may get none for days.
IDLE_TIMEOUT = datetime.timedelta(days=365)


def control_group():
    """The group the records travel in; every rank calls this once, at the same point."""
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


class Leader:
    """Rank 0's engine as its engine loop sees it (the calls `EngineLoop` makes): adds and
    aborts are recorded, and each step first sends the record to the other ranks."""

    def __init__(self, runtime: LLMEngine):
        self.runtime = runtime
        self._group = control_group()
        self._record: list[tuple] = []  # ("add", request_id, prompt, params) or ("abort", request_id)
        self._stopped = False

    @property
    def scheduler(self):
        return self.runtime.scheduler

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        request_id = self.runtime.add_request(prompt_token_ids, params, request_id)  # (raises before anything is recorded)
        self._record.append(("add", request_id, list(prompt_token_ids), params))
        return request_id

    def abort(self, request_id: str) -> bool:
        self._record.append(("abort", request_id))
        return self.runtime.abort(request_id)

    def progress(self, request_id: str) -> GenerationOutput | None:
        return self.runtime.progress(request_id)

    def step(self) -> list[GenerationOutput]:
        self._send(STEP)
        return self.runtime.step()

    def stop(self) -> None:
        """Let the other ranks' `follow` return (once; call it after the last step)."""
        if not self._stopped:
            self._stopped = True
            self._send(STOP)

    def _send(self, command: str) -> None:
        record, self._record = self._record, []
        dist.broadcast_object_list([[*record, command]], src=0, group=self._group)


def follow(runtime: LLMEngine) -> None:
    """On every rank but 0: apply rank 0's records to `runtime` and step when it steps, until
    it stops. SIGINT and SIGTERM are ignored meanwhile (see the module docstring)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        group = control_group()  # (once rank 0 serves, this rank already ignores the signals)
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=group)
            *record, command = box[0]
            for event in record:
                if event[0] == "add":
                    _, request_id, prompt, params = event
                    runtime.add_request(prompt, params, request_id)
                else:
                    runtime.abort(event[1])
            if command == STOP:
                return
            try:
                runtime.step()
            except Exception:  # noqa: BLE001 -- as rank 0's loop does: its requests end, the others go on
                _log.exception("engine step failed on this rank")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
