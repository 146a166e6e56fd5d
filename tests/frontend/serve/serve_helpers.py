"""Fixtures of the server tests, imported by each test module (a conftest.py here would take
the module name `conftest` from tests/conftest.py): one tiny model with its tokenizer,
compiled once per session; servers on free loopback ports, each over its own runtime (KV
cache) sharing that engine."""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("fastapi", reason="the server tests need the serve extra")

import trtllm  # noqa: E402
from trtllm.frontend.api import CompiledModel  # noqa: E402
from trtllm.frontend.serve.config import ServeConfig  # noqa: E402
from trtllm.frontend.serve.server import ServerThread  # noqa: E402
from trtllm.frontend.tiny import tiny_llama  # noqa: E402
from trtllm.frontend.tiny_tokenizer import tiny_tokenizer  # noqa: E402

API_KEY = "test-key"


@functools.cache
def _compiled() -> CompiledModel:
    return trtllm.compile(tiny_llama(), tokenizer=tiny_tokenizer(), dtype="fp32", device="cpu",
                          max_batch_size=32, max_seq_len=256)


@pytest.fixture(scope="session")
def tiny_llm() -> CompiledModel:
    """Shared by every module that imports it (each import is a fixture of its own)."""
    return _compiled()


def fresh(llm: CompiledModel) -> CompiledModel:
    """The same engine under a runtime of its own (its own KV cache, requests and steps)."""
    return CompiledModel(llm.engine, llm.config, tokenizer=llm.tokenizer)


@pytest.fixture(scope="module")
def offline(tiny_llm) -> CompiledModel:
    """For reference tokens: `generate` with no server in between."""
    return fresh(tiny_llm)


@pytest.fixture(scope="module")
def server(tiny_llm):
    with ServerThread(fresh(tiny_llm), ServeConfig(port=0, api_key=API_KEY)) as running:
        yield running


def runtime_of(running: ServerThread):
    return running.app.state.server.llm.runtime
