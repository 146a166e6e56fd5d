"""trtllm as a Triton Python-backend model (decoupled): requests are handed to trtllm's
engine loop, which runs them in its running batch, and each engine step's tokens go back as
one response. See examples/triton/README.md for how to start the server."""

from __future__ import annotations

import asyncio
import json
import os
import site
import sys
import threading


def _use_environment() -> None:
    """Triton's Python stub runs an isolated interpreter, which ignores PYTHONPATH and virtual
    environments: put the active virtual environment's site-packages ($VIRTUAL_ENV) and
    PYTHONPATH's folders first on sys.path, as site dirs (so that .pth files, such as those of
    editable installs, work), ahead of the base interpreter's own packages."""
    before = list(sys.path)
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    venv = os.environ.get("VIRTUAL_ENV")
    for path in ([os.path.join(venv, "lib", version, "site-packages")] if venv else []) + [
            p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]:
        site.addsitedir(path)
    sys.path[:] = [p for p in sys.path if p not in before] + before


_use_environment()

import triton_python_backend_utils as pb_utils  # noqa: E402

from trtllm.frontend.serve.engine_loop import EngineLoop  # noqa: E402
from trtllm.frontend.serve.server import load_for_serving  # noqa: E402
from trtllm.frontend.serve.triton import parse_inputs, stream_outputs  # noqa: E402

INPUTS = ("input_ids", "text_input", "max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos")


class TritonPythonModel:
    def initialize(self, args):
        parameters = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.llm, _ = load_for_serving(parameters["model"], parameters["engine"] or None,
                                       max_batch_size=int(parameters["max_batch_size"]),
                                       max_seq_len=int(parameters["max_seq_len"]))
        self.loop = EngineLoop(self.llm.runtime, max_requests=1024)
        self.loop.start()
        # The engine loop delivers updates into an asyncio event loop; this one runs in its own thread.
        self.events = asyncio.new_event_loop()
        self.events_thread = threading.Thread(target=self.events.run_forever, daemon=True)
        self.events_thread.start()

    def execute(self, requests):
        for request in requests:
            inputs = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            asyncio.run_coroutine_threadsafe(self._respond(inputs, request.get_response_sender()), self.events)
        return None

    async def _respond(self, inputs, sender):
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            ids, params = parse_inputs(self.llm, inputs, default_max_tokens=16)
            async for outputs, done in stream_outputs(self.loop, self.llm.tokenizer, ids, params):
                response = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()])
                sender.send(response, flags=final if done else 0)
        except Exception as exc:  # noqa: BLE001 -- any failure goes back to the client as its error
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), flags=final)

    def finalize(self):
        self.loop.stop(drain=True)
        self.events.call_soon_threadsafe(self.events.stop)
        self.events_thread.join()
