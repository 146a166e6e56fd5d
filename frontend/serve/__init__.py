"""The servers: an OpenAI-compatible HTTP server (`trtllm serve`) over the runtime's engine loop.

Needs the `[serve]` extra (FastAPI, uvicorn, prometheus-client)."""
