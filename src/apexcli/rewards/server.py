"""Reward server: host rewards over HTTP so a heavy or conflicting model (DeQA's remote code
pins an older transformers) runs in its own process or environment.

    apex serve --objectives deqa --port 18086 --trust-remote-code
    apex train --objectives pick,deqa@http://127.0.0.1:18086,...

The wire format is documented in `apexcli.rewards.remote`. Binds to loopback unless told
otherwise: the server runs models on whatever it is sent and has no authentication.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from apexcli.errors import ApexError
from apexcli.images import DEFAULT_MAX_PIXELS, ImageLoadError, open_image
from apexcli.rewards.remote import nan_to_none
from apexcli.rewards.suite import RewardSuite

MAX_REQUEST_BYTES = 1 << 30  # 1 GiB of JSON: a generous batch of 4k PNGs


class RewardHTTPServer(ThreadingHTTPServer):
    """Threaded HTTP server owning one RewardSuite; scoring is serialised by a lock."""

    daemon_threads = True

    def __init__(self, suite: RewardSuite, host: str = "127.0.0.1", port: int = 18086,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.suite = suite
        self.max_pixels = max_pixels
        self.score_lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def score_payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Decode a /score request, run the suite, encode the answer (raises ValueError on bad input)."""
        wanted = payload.get("objectives") or self.suite.objectives
        missing = [o for o in wanted if o not in self.suite.objectives]
        if missing:
            raise ValueError(f"not served here: {', '.join(missing)}; served: {', '.join(self.suite.objectives)}")
        encoded = payload.get("images")
        prompts = payload.get("prompts")
        if not isinstance(encoded, list) or not isinstance(prompts, list) or len(encoded) != len(prompts):
            raise ValueError("need 'images' (base64 PNG list) and 'prompts' of the same length")
        images = []
        for i, text in enumerate(encoded):
            try:
                images.append(open_image(base64.b64decode(text, validate=True), self.max_pixels))
            except (ImageLoadError, binascii.Error, TypeError) as exc:
                raise ValueError(f"image {i}: {exc}") from None
        with self.score_lock:
            R, info = self.suite(images, [str(p) for p in prompts])
        columns = [self.suite.objectives.index(o) for o in wanted]
        return {"objectives": list(wanted),
                "scores": [nan_to_none(row) for row in R[:, columns].tolist()],
                "info": {o: info.get(o, {}) for o in wanted}}


class _Handler(BaseHTTPRequestHandler):
    server: RewardHTTPServer

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok", "objectives": self.server.suite.objectives})
        else:
            self._send(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._send(404, {"error": f"unknown path {self.path}; use POST /score"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_REQUEST_BYTES:
            self._send(413 if length > 0 else 400, {"error": f"request body of {length} bytes"})
            return
        try:
            payload = json.loads(self.rfile.read(length).decode("utf-8"))
            self._send(200, self.server.score_payload(payload))
        except (ValueError, ApexError) as exc:  # bad request: the client should not retry
            self._send(400, {"error": str(exc)})
        except Exception as exc:  # a reward crashed: report it, the client may retry
            self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the CLI prints its own lines
        pass


def make_server(suite: RewardSuite, host: str = "127.0.0.1", port: int = 18086,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> RewardHTTPServer:
    """Bind the server (port 0 picks a free port); call serve_forever() to run it."""
    try:
        return RewardHTTPServer(suite, host, port, max_pixels)
    except OSError as exc:
        raise ApexError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port") from None


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve_rewards(objectives: list[str], *, host: str = "127.0.0.1", port: int = 18086,
                  device: str = "auto", dtype: str = "auto", config: Any = None,
                  log=print) -> None:
    """Load the rewards once and serve them until interrupted (the `apex serve` core)."""
    from apexcli.rewards.runtime import resolve_device_dtype

    dev, dt = resolve_device_dtype(device, dtype)
    suite = RewardSuite(objectives, device=dev, dtype=dt, config=config)
    server = make_server(suite, host, port)
    if host not in LOOPBACK_HOSTS:
        log(f"warning: serving on {host}: anyone who can reach this port can run the models (no authentication)")
    log(f"serving {', '.join(suite.objectives)} on {server.url} ({dev}, {dt}); "
        f"use {suite.objectives[0]}@{server.url}; Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.server_close()
        suite.close()
