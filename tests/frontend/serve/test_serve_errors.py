"""Bad requests over raw HTTP get OpenAI-style JSON errors with the right status, and clients
that leave have their requests aborted and their KV blocks freed."""

# ruff: noqa: F811 -- the fixtures imported from serve_helpers are the tests' arguments
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from serve_helpers import API_KEY, fresh, runtime_of, server, tiny_llm  # noqa: F401 (fixtures)

from trtllm.frontend.serve.config import ServeConfig
from trtllm.frontend.serve.server import ServerThread

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _post(server, path, body, headers=AUTH) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, headers={"Content-Type": "application/json", **headers})


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("field, value", [
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", "8"), ("temperature", -0.5), ("top_p", 0),
    ("top_p", 1.5), ("n", 0), ("logprobs", 99), ("stop", 5), ("seed", 1.5), ("presence_penalty", 3),
])
def test_invalid_fields_are_400_naming_the_field(server, field, value):
    error = _error(_post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", field: value}), 400)
    assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"


def test_malformed_bodies_are_400(server):
    assert "JSON" in _error(_post(server, "/v1/completions", b'{"prompt": "hi",'), 400)["message"]
    assert "object" in _error(_post(server, "/v1/completions", b"[1, 2]"), 400)["message"]
    assert _error(_post(server, "/v1/completions", {"model": "tiny"}), 400)["param"] == "prompt"
    assert _error(_post(server, "/v1/chat/completions", {"messages": []}), 400)["param"] == "messages"
    assert _error(_post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}),
                  400)["param"] == "messages[0].content"
    assert _error(_post(server, "/v1/completions", {"prompt": "hi", "echo": True}), 400)["param"] == "echo"


def test_requests_the_model_cannot_run_are_400(server):
    too_long = _error(_post(server, "/v1/completions", {"prompt": [5] * 250, "max_tokens": 10}), 400)
    assert "256" in too_long["message"]
    assert "vocabulary" in _error(_post(server, "/v1/completions", {"prompt": [5, 9999]}), 400)["message"]


def test_unknown_model_route_and_key(server):
    assert _error(_post(server, "/v1/completions", {"model": "gpt-4", "prompt": "hi"}), 404)["code"] == "model_not_found"
    assert _error(httpx.get(f"{server.url}/v1/nothing-here", headers=AUTH), 404)
    assert _error(_post(server, "/v1/completions", {"prompt": "hi"}, headers={"Authorization": "Bearer nope"}),
                  401)["code"] == "invalid_api_key"
    assert _error(httpx.get(f"{server.url}/v1/models"), 401)
    assert httpx.get(f"{server.url}/health").status_code == 200  # health and metrics need no key


def test_oversized_body_is_413(tiny_llm):
    with ServerThread(fresh(tiny_llm), ServeConfig(port=0, max_body_bytes=1000)) as running:
        assert _post(running, "/v1/completions", {"prompt": "hi", "max_tokens": 1}).status_code == 200
        _error(_post(running, "/v1/completions", {"prompt": "x" * 2000}), 413)


def _slow_steps(monkeypatch, runtime, gate: threading.Event) -> None:
    """Engine steps wait for `gate`, then take at least 50 ms each: a long request is still
    running whenever the test acts, however fast the machine."""
    step = runtime.step

    def slow_step():
        gate.wait(30)
        time.sleep(0.05)
        return step()

    monkeypatch.setattr(runtime, "step", slow_step)


def test_full_server_is_503_and_a_disconnect_frees_the_blocks(tiny_llm, monkeypatch):
    """With room for one request, a second is refused while the first streams; the first's
    client then leaves mid-stream, which aborts it and frees its blocks, and the server takes
    requests again."""
    with ServerThread(fresh(tiny_llm), ServeConfig(port=0, max_requests=1)) as running:
        runtime, gate = runtime_of(running), threading.Event()
        _slow_steps(monkeypatch, runtime, gate)
        body = {"prompt": "hello", "max_tokens": 200, "stream": True, "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body) as stream:
            error = _error(_post(running, "/v1/completions", {"prompt": "hi"}), 503)
            assert error["type"] == "service_unavailable"
            gate.set()
            next(stream.iter_lines())  # its first event: it holds blocks now
            assert runtime.scheduler.num_free_blocks < runtime.pool.num_blocks
        _wait_until_idle(runtime)
        assert 'finish_reason="abort"' in httpx.get(f"{running.url}/metrics").text
        assert _post(running, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_client_that_leaves_a_plain_request_aborts_it(tiny_llm, monkeypatch):
    with ServerThread(fresh(tiny_llm), ServeConfig(port=0)) as running:
        runtime, gate = runtime_of(running), threading.Event()
        _slow_steps(monkeypatch, runtime, gate)
        gate.set()
        host, port = running.url.removeprefix("http://").split(":")
        body = json.dumps({"prompt": "hello", "max_tokens": 240, "ignore_eos": True, "temperature": 0}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            _wait_for(lambda: runtime.scheduler.num_free_blocks < runtime.pool.num_blocks)
        _wait_until_idle(runtime)
        assert 'finish_reason="abort"' in httpx.get(f"{running.url}/metrics").text


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _wait_until_idle(runtime) -> None:
    """Every block free again, and no request left (read while the loop thread is idle)."""
    _wait_for(lambda: runtime.scheduler.num_free_blocks == runtime.pool.num_blocks and not runtime.has_unfinished())


def test_an_engine_failure_fails_its_requests_and_serving_goes_on(tiny_llm, monkeypatch):
    with ServerThread(fresh(tiny_llm), ServeConfig(port=0)) as running:
        runtime = runtime_of(running)
        step, failures = runtime.step, ["device lost"]

        def fail_once():
            if failures:
                raise RuntimeError(failures.pop())
            return step()

        monkeypatch.setattr(runtime, "step", fail_once)
        error = _error(_post(running, "/v1/completions", {"prompt": "hi", "max_tokens": 3}), 500)
        assert "device lost" in error["message"] and error["type"] == "server_error"
        assert _post(running, "/v1/completions", {"prompt": "hi", "max_tokens": 3}).status_code == 200
        _wait_until_idle(runtime)
