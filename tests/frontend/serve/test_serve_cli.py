"""`trtllm serve` as a user starts it: a process on a loopback port, with an API key; SIGTERM
stops it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import openai
import pytest
from conftest import free_ports, wait_until_healthy


def test_trtllm_serve_answers_chat_and_stops_on_sigterm():
    port = free_ports(1)[0]
    command = [sys.executable, "-c", "import sys; from trtllm.frontend.cli import main; sys.exit(main())", "serve",
               "--port", str(port), "--api-key", "secret", "--max-batch-size", "4", "--max-seq-len", "128",
               "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "TRITON_INTERPRET": "1"})
    try:
        wait_until_healthy(port, [process])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret", max_retries=0)
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                             max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 6 and out.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    # uvicorn drains, then re-raises the signal it caught, so the exit is by SIGTERM, not a crash
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output
    assert f"on http://127.0.0.1:{port}/v1" in output
