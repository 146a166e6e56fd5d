"""The Triton Inference Server deployment (PyTriton's bundled `tritonserver`, on loopback):
concurrent streaming requests through `tritonclient`'s gRPC stream get offline `generate`'s
exact tokens, text goes in and out with PyTriton's client, and bad requests fail clearly."""

# ruff: noqa: F811 -- the fixtures imported from serve_helpers are the tests' arguments
from __future__ import annotations

import queue

import numpy as np
import pytest
from conftest import free_ports
from serve_helpers import fresh, offline, tiny_llm  # noqa: F401 (fixtures)

import trtllm

pytest.importorskip("pytriton", reason="the Triton tests need nvidia-pytriton")
grpcclient = pytest.importorskip("tritonclient.grpc")

from pytriton.client import DecoupledModelClient  # noqa: E402
from pytriton.client.exceptions import PyTritonClientInferenceServerError  # noqa: E402

from trtllm.frontend.serve.triton import TritonConfig, TritonDeployment  # noqa: E402


@pytest.fixture(scope="module")
def triton(tiny_llm):
    http, grpc, metrics = free_ports(3)
    with TritonDeployment(fresh(tiny_llm), TritonConfig(http_port=http, grpc_port=grpc, metrics_port=metrics)) as d:
        yield d


def _input(name: str, array: np.ndarray, dtype: str):
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_concurrent_streams_match_generate(triton, offline):
    """Eight streams at once on one gRPC stream (half greedy, half seeded sampling): each
    response carries a step's new tokens, and together they are generate's tokens."""
    prompts = [[5 + i, 17, 42 + 3 * i] for i in range(8)]
    params = [trtllm.SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.8 if i % 2 else 0.0,
                                    seed=100 + i if i % 2 else None) for i in range(8)]
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.config.grpc_port}")
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        inputs = [_input("input_ids", np.array(prompt, dtype=np.int64), "INT64"),
                  _input("max_tokens", np.array([12], dtype=np.int32), "INT32"),
                  _input("ignore_eos", np.array([True]), "BOOL"),
                  _input("temperature", np.array([p.temperature], dtype=np.float32), "FP32")]
        if p.seed is not None:
            inputs.append(_input("seed", np.array([p.seed], dtype=np.int64), "INT64"))
        client.async_stream_infer("trtllm", inputs, request_id=str(i))
    streamed: dict[str, list[int]] = {str(i): [] for i in range(8)}
    responses = 0
    while sum(map(len, streamed.values())) < 8 * 12:
        result, error = results.get(timeout=60)
        assert error is None, error
        streamed[result.get_response().id] += result.as_numpy("output_ids").tolist()
        responses += 1
    client.stop_stream()
    reference = offline.generate(prompts, params)
    assert [streamed[str(i)] for i in range(8)] == [r.token_ids for r in reference]
    assert responses > 8  # streamed in several responses, not one per request


def test_text_in_and_out_with_the_pytriton_client(triton, offline):
    with DecoupledModelClient(f"grpc://127.0.0.1:{triton.config.grpc_port}", "trtllm") as client:
        responses = list(client.infer_sample(text_input=np.array([b"Hello there"]),
                                             max_tokens=np.array([10], dtype=np.int32),
                                             ignore_eos=np.array([True])))
    (ref,) = offline.generate(["Hello there"], trtllm.SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert [t for r in responses for t in r["output_ids"].tolist()] == ref.token_ids
    assert b"".join(r["text_output"][0] for r in responses).decode() == ref.text


def test_bad_requests_fail_with_the_field_named(triton):
    with DecoupledModelClient(f"grpc://127.0.0.1:{triton.config.grpc_port}", "trtllm") as client:
        with pytest.raises(PyTritonClientInferenceServerError, match="temperature"):
            list(client.infer_sample(input_ids=np.array([5, 6], dtype=np.int64),
                                     temperature=np.array([-1.0], dtype=np.float32)))
        with pytest.raises(PyTritonClientInferenceServerError, match="input_ids"):
            list(client.infer_sample(max_tokens=np.array([4], dtype=np.int32)))
    runtime = triton.llm.runtime
    assert runtime.scheduler.num_free_blocks == runtime.pool.num_blocks
