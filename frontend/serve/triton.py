"""Triton Inference Server through PyTriton (`nvidia-pytriton`, which bundles `tritonserver`):
one decoupled (streaming) model over the same `EngineLoop` as the OpenAI server.

    with TritonDeployment(llm, TritonConfig()) as triton:    # gRPC on 127.0.0.1:8001
        ...   # clients: tritonclient.grpc streaming, or pytriton.client.DecoupledModelClient

The model, named `TritonConfig.model_name`, takes one request per call (no Triton batching:
requests join the engine's running batch instead) and answers with one response per engine
step that made tokens, the last one when the request is done. Inputs, all optional but one
of the first two (names as TensorRT-LLM's Triton ensemble):
`text_input` BYTES [1] (needs a tokenizer) or `input_ids` INT64 [-1]; `max_tokens` INT32 [1]
(16); `temperature` FP32 [1] (0: greedy); `top_p` FP32 [1]; `top_k` INT32 [1]; `seed` INT64 [1];
`ignore_eos` BOOL [1]. Outputs: `output_ids` INT64 [-1] (the step's new tokens) and
`text_output` BYTES [1] (their text, when there is a tokenizer).

Triton's Python stub links the system's libpython3.11, which may be older than this
interpreter; it loads only when `LD_LIBRARY_PATH` starts with the interpreter's own library
folder, so that is set for the server process (and `os.environ` restored once it runs).
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import AsyncIterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from trtllm.kernels.errors import RequestError
from trtllm.runtime.sampling_params import SamplingParams

from .engine_loop import EngineLoop
from .responses import TextStream


@dataclass(frozen=True)
class TritonConfig:
    model_name: str = "trtllm"  # the model's name in Triton
    host: str = "127.0.0.1"  # loopback by default
    http_port: int = 8000  # Triton's HTTP/REST port (health, metadata; streaming needs gRPC)
    grpc_port: int = 8001  # Triton's gRPC port: streaming requests
    metrics_port: int = 8002  # Triton's own Prometheus metrics
    max_requests: int = 1024  # requests held at once; beyond, a request fails with "retry later"
    default_max_tokens: int = 16  # when a request gives no max_tokens


_INPUTS = (("input_ids", np.int64, (-1,)), ("text_input", bytes, (1,)), ("max_tokens", np.int32, (1,)),
           ("temperature", np.float32, (1,)), ("top_p", np.float32, (1,)), ("top_k", np.int32, (1,)),
           ("seed", np.int64, (1,)), ("ignore_eos", np.bool_, (1,)))


@contextmanager
def _python_stub_env():
    """LD_LIBRARY_PATH led by this interpreter's library folder, for the server process only."""
    before = os.environ.get("LD_LIBRARY_PATH")
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, before) if p)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = before


class TritonDeployment:
    """`llm` (a `CompiledModel`) served by Triton; a context manager that starts and stops it."""

    def __init__(self, llm, config: TritonConfig | None = None):
        self.llm = llm
        self.config = config or TritonConfig()
        self.loop = EngineLoop(llm.runtime, self.config.max_requests)
        self._triton = None

    def __enter__(self) -> TritonDeployment:
        from pytriton.model_config import ModelConfig, Tensor
        from pytriton.triton import Triton
        from pytriton.triton import TritonConfig as PyTritonConfig

        c = self.config
        self.loop.start()
        self._triton = Triton(config=PyTritonConfig(
            http_address=c.host, http_port=c.http_port, grpc_address=c.host, grpc_port=c.grpc_port,
            metrics_port=c.metrics_port, log_verbose=0))
        with _python_stub_env():
            self._triton.__enter__()  # starts tritonserver
            self._triton.bind(
                model_name=c.model_name, infer_func=self._infer,
                inputs=[Tensor(name=n, dtype=t, shape=s, optional=True) for n, t, s in _INPUTS],
                outputs=[Tensor(name="output_ids", dtype=np.int64, shape=(-1,)),
                         Tensor(name="text_output", dtype=bytes, shape=(1,))],
                config=ModelConfig(batching=False, decoupled=True), strict=False)
            self._triton.run()
        return self

    def __exit__(self, *exc) -> None:
        if self._triton is not None:
            self._triton.stop()
        self.loop.stop(drain=True)

    async def _infer(self, requests) -> AsyncIterator[list[dict]]:
        if len(requests) != 1:
            raise RequestError(f"the model takes one request per call, got {len(requests)}")
        ids, params = parse_inputs(self.llm, requests[0].data, self.config.default_max_tokens)
        async for outputs, _ in stream_outputs(self.loop, self.llm.tokenizer, ids, params):
            yield [outputs]


def parse_inputs(llm, inputs: dict[str, np.ndarray], default_max_tokens: int) -> tuple[list[int], SamplingParams]:
    """One request's prompt ids and sampling parameters from its input tensors (the names of
    the module docstring); RequestError naming what is unusable."""
    def scalar(name: str, default):
        value = inputs.get(name)
        return default if value is None else value.reshape(-1)[0].item()

    if inputs.get("input_ids") is not None:
        ids = [int(t) for t in inputs["input_ids"].reshape(-1)]
    elif inputs.get("text_input") is not None and llm.tokenizer is not None:
        ids = list(llm.tokenizer.encode(inputs["text_input"].reshape(-1)[0].decode()))
    else:
        raise RequestError("give input_ids, or text_input (the model needs a tokenizer for text)")
    params = SamplingParams(
        max_new_tokens=int(scalar("max_tokens", default_max_tokens)), temperature=float(scalar("temperature", 0.0)),
        top_p=float(scalar("top_p", 1.0)), top_k=int(scalar("top_k", 0)), seed=scalar("seed", None),
        ignore_eos=bool(scalar("ignore_eos", False)))
    params.validate()
    llm.runtime.check_prompt(ids)
    max_len = llm.runtime.config.max_seq_len
    if len(ids) + params.max_new_tokens > max_len:
        raise RequestError(f"prompt of {len(ids)} tokens plus max_tokens={params.max_new_tokens} exceeds "
                           f"max_seq_len={max_len}; shorten the prompt or lower max_tokens")
    return ids, params


async def stream_outputs(loop: EngineLoop, tokenizer, ids: list[int],
                         params: SamplingParams) -> AsyncIterator[tuple[dict[str, np.ndarray], bool]]:
    """Run one request on `loop`: per engine step that made tokens, its output tensors and
    whether it is the last. Closing the iterator early aborts the request."""
    handle = loop.submit([(ids, params)])
    text = TextStream(tokenizer, ()) if tokenizer is not None else None
    tokens: list[int] = []
    done = False
    try:
        async for update in handle.updates():
            tokens += update.token_ids
            done = update.finish_reason is not None
            piece = "" if text is None else text.last_piece(tokens, None) if done else text.piece(tokens)
            yield {"output_ids": np.array(update.token_ids, dtype=np.int64),
                   "text_output": np.array([piece.encode()], dtype=np.object_)}, done
    finally:
        if not done:
            loop.abort(handle)
