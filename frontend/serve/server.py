"""Running the app: `serve` (what `trtllm serve` calls, until SIGINT/SIGTERM), `ServerThread`
(the same server in a background thread, for tests and benchmarks), and loading what to serve.

Shutdown drains: uvicorn stops accepting connections, the requests held finish (within
`drain_seconds` when set), then the engine loop ends.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from trtllm.kernels.errors import ConfigError

from .app import build_app
from .config import ServeConfig
from .ranks import follow


def load_for_serving(model: str = "tiny", engine: str | None = None, **compile_options):
    """A `CompiledModel` with a tokenizer, and the name clients call it by: a saved engine
    folder, a local Hugging Face folder (model and tokenizer), or "tiny" (built in, with its
    tokenizer made in code)."""
    import trtllm

    if engine is not None:  # (an engine saved split over ranks loads as it was built: a split given is checked)
        runtime = {k: v for k, v in compile_options.items()
                   if k == "device" or k in ("tensor_parallel", "pipeline_parallel") and v > 1}
        return trtllm.load(engine, **runtime), Path(engine).name
    if model == "tiny":
        from ..tiny import tiny_llama
        from ..tiny_tokenizer import tiny_tokenizer

        return trtllm.compile(tiny_llama(), tokenizer=tiny_tokenizer(), **compile_options), "tiny"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..config import BuildConfig

    dtype = BuildConfig(**compile_options).torch_dtype()
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(model, local_files_only=True, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    except OSError as exc:
        raise ConfigError(f"cannot load a model and tokenizer from {model!r} (a local Hugging Face folder, or "
                          f"'tiny'): {exc}") from None
    return trtllm.compile(hf_model, tokenizer=tokenizer, **compile_options), Path(model).name


def _uvicorn_server(llm, config: ServeConfig):
    import uvicorn

    config.validate()
    app = build_app(llm, config)
    return uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                         timeout_graceful_shutdown=config.drain_seconds))


def serve(llm, config: ServeConfig) -> None:
    """Serve until SIGINT or SIGTERM, then drain. A model split over ranks: rank 0 serves,
    every other rank follows it (ranks.py) until it stops."""
    if llm.ranks.rank != 0:
        follow(llm.runtime)
        return
    server = _uvicorn_server(llm, config)
    print(f"trtllm serve: {config.model_name!r} on http://{config.host}:{config.port}/v1", flush=True)
    try:
        server.run()
    finally:  # (the lifespan stops them after draining; not if the server never started)
        server.config.app.state.server.stop_ranks()


class ServerThread:
    """The server in a background thread: `with ServerThread(llm, config) as s: s.url`.
    Leaving the block shuts it down as a signal would (draining) and waits for it."""

    def __init__(self, llm, config: ServeConfig | None = None, start_timeout: float = 60.0):
        """config: None serves on a free loopback port."""
        self.server = _uvicorn_server(llm, config or ServeConfig(port=0))
        self.app = self.server.config.app
        self._thread = threading.Thread(target=self.server.run, name="trtllm-serve", daemon=True)
        self._start_timeout = start_timeout
        self.url = ""  # http://host:port, once started

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError("the server did not start; is the port free?")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join()
