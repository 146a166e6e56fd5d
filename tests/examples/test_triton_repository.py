"""examples/triton/model_repository in a standalone Triton Inference Server (the `tritonserver`
that nvidia-pytriton bundles, with its Python backend), as its README starts it: a streamed
request over gRPC gets offline `generate`'s tokens and text."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_ports

import trtllm
from trtllm.frontend.tiny import tiny_llama
from trtllm.frontend.tiny_tokenizer import tiny_tokenizer

pytriton = pytest.importorskip("pytriton", reason="the Triton tests need nvidia-pytriton")
grpcclient = pytest.importorskip("tritonclient.grpc")

REPOSITORY = Path(__file__).parents[2] / "examples" / "triton" / "model_repository"


def _backends(tmp_path: Path) -> Path:
    """PyTriton's bundled backends, with the Python stub of this interpreter's version."""
    bundle = Path(pytriton.__file__).parent / "tritonserver"
    backends = tmp_path / "backends"
    shutil.copytree(bundle / "backends", backends)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    shutil.copy(bundle / "python_backend_stubs" / version / "triton_python_backend_stub",
                backends / "python" / "triton_python_backend_stub")
    return backends


def test_standalone_triton_serves_the_model_repository(tmp_path):
    llm = trtllm.compile(tiny_llama(), tokenizer=tiny_tokenizer(), max_seq_len=256)
    (ref,) = llm.generate(["Hello there"], trtllm.SamplingParams(max_new_tokens=12, ignore_eos=True))
    http, grpc, metrics = free_ports(3)
    server = Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver"
    # The stub links libpython3.11 and PyTriton's bundled libraries; it imports trtllm from this
    # virtual environment.
    libraries = (sysconfig.get_config_var("LIBDIR"), str(Path(pytriton.__file__).parents[1] / "nvidia_pytriton.libs"),
                 os.environ.get("LD_LIBRARY_PATH"))
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(p for p in libraries if p), "VIRTUAL_ENV": sys.prefix,
           "TRITON_INTERPRET": "1"}
    command = [str(server), f"--model-repository={REPOSITORY}", f"--backend-directory={_backends(tmp_path)}",
               "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--allow-metrics=false",
               "--disable-auto-complete-config",
               f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        deadline = time.monotonic() + 120
        while not _ready(client, "trtllm"):
            assert process.poll() is None, _log(tmp_path / "server.log")
            assert time.monotonic() < deadline, "the model did not become ready"
            time.sleep(0.5)
        tokens, text = _stream(client, b"Hello there", 12)
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()
    assert tokens == ref.token_ids and text == ref.text


def _log(path: Path) -> str:
    """The server's log without its tables, the end of it."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.startswith(("|", "+")))[-4000:]


def _ready(client, model: str) -> bool:
    try:
        return client.is_model_ready(model)
    except Exception:  # noqa: BLE001 -- not listening yet
        return False


def _stream(client, prompt: bytes, max_tokens: int) -> tuple[list[int], str]:
    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("trtllm", [
        tensor("text_input", np.array([prompt], dtype=np.object_), "BYTES"),
        tensor("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32"),
        tensor("ignore_eos", np.array([True]), "BOOL")])
    tokens, text = [], b""
    while len(tokens) < max_tokens:
        result, error = results.get(timeout=60)
        assert error is None, error
        tokens += result.as_numpy("output_ids").tolist()
        text += result.as_numpy("text_output")[0]
    client.stop_stream()
    return tokens, text.decode()
