"""`ServerMetrics`: what `GET /metrics` reports, in Prometheus' text format.

Each server has its own `CollectorRegistry` (nothing is registered globally, so several
servers, or tests, can live in one process). The engine loop thread records the counts and
latencies as they happen and samples the engine's queues and cache after each step.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from trtllm.runtime.llm_engine import LLMEngine

# Seconds: from a millisecond (a GPU decode step) to a minute (a long prompt behind a full queue).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self._model = model_name

        def one(kind, name: str, doc: str, **kwargs):
            """A metric labelled with the model name only; its one child."""
            return kind(f"trtllm_{name}", doc, ["model_name"], registry=self.registry, **kwargs).labels(model_name)

        self._requests = Counter("trtllm_requests", "finished requests (choices), by finish reason",
                                 ["model_name", "finish_reason"], registry=self.registry)
        self._prompt_tokens = one(Counter, "prompt_tokens", "prompt tokens of requests taken in")
        self._generation_tokens = one(Counter, "generation_tokens", "tokens generated")
        self._ttft = one(Histogram, "time_to_first_token_seconds", "from a request's arrival to its first token",
                         buckets=_LATENCY_BUCKETS)
        self._tpot = one(Histogram, "time_per_output_token_seconds", "time between a request's tokens after the "
                         "first (an update of k tokens counts k tokens, each 1/k of its wait)", buckets=_LATENCY_BUCKETS)
        self._e2e = one(Histogram, "e2e_request_latency_seconds", "from a request's arrival to its end",
                        buckets=_LATENCY_BUCKETS)
        self._running = one(Gauge, "num_requests_running", "requests in the running batch")
        self._waiting = one(Gauge, "num_requests_waiting", "requests waiting to join the batch")
        self._kv_usage = one(Gauge, "kv_cache_usage_ratio", "share of KV-cache blocks held (0 to 1)")

    def on_request(self, num_prompt_tokens: int) -> None:
        self._prompt_tokens.inc(num_prompt_tokens)

    def on_tokens(self, count: int, seconds: float, first: bool) -> None:
        """`count` new tokens of one choice, `seconds` after its previous update (or its arrival)."""
        self._generation_tokens.inc(count)
        if first:
            self._ttft.observe(seconds)
            count -= 1  # the rest of a first update came in the same step
            seconds = 0.0
        for _ in range(count):
            self._tpot.observe(seconds / count)

    def on_finish(self, finish_reason: str, seconds: float) -> None:
        self._requests.labels(self._model, finish_reason).inc()
        self._e2e.observe(seconds)

    def observe_engine(self, runtime: LLMEngine) -> None:
        scheduler = runtime.scheduler
        self._running.set(scheduler.num_running)
        self._waiting.set(scheduler.num_waiting)
        total = scheduler.num_total_blocks
        self._kv_usage.set((total - scheduler.num_free_blocks) / total)

    def render(self) -> bytes:
        return generate_latest(self.registry)
