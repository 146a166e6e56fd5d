"""`ServeConfig`: how `trtllm serve` listens and what it accepts."""

from __future__ import annotations

from dataclasses import dataclass

from trtllm.kernels.errors import ConfigError


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "tiny"  # the `model` clients name (404 for any other)
    host: str = "127.0.0.1"  # loopback by default: the server is reachable from this machine only
    port: int = 8000  # 0: any free port
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <api_key>` (401 otherwise)
    max_requests: int = 1024  # choices held at once, running or waiting; beyond, 503
    max_body_bytes: int = 8 * 2**20  # larger request bodies get 413
    drain_seconds: float | None = None  # at shutdown, how long held requests may take to finish (None: as long as they need)

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_requests", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key must not be empty; leave it out to serve without one")
