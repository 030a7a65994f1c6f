"""Reward server: host rewards over HTTP so a heavy or conflicting model (DeQA's remote code
pins an older transformers) runs in its own process or environment.

    apex serve --objectives pick,aes --port 18087
    apex train --objectives pick@http://127.0.0.1:18087,aes@http://127.0.0.1:18087,...

DeQA-Score's remote code needs transformers 4.36.1: it gets its own environment and entry point
(`make deqa-server`, then `python -m apexcli.rewards.deqa_server`), which reuses this server.

The wire format is documented in `apexcli.rewards.remote`. Binds to loopback unless told
otherwise: the server runs models on whatever it is sent. With a token (`--token` or the
APEX_SERVE_TOKEN variable) every request must carry `Authorization: Bearer <token>`.

Limits, so that a burst or a stuck client cannot take it down:
- listen backlog LISTEN_BACKLOG: a burst of that many connections queues in the kernel
  instead of being reset (the stdlib default is 5);
- at most `threads` connections are handled at once; further ones wait in that queue;
- `timeout_s` on every socket read and write: a client that stalls is dropped after it;
- the request body is at most MAX_REQUEST_BYTES;
- a request that is not well-formed (not a JSON object, wrong types, too deeply nested)
  answers 400, which the client does not retry; 500 is kept for a reward that crashed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from apexcli.errors import ApexError
from apexcli.images import DEFAULT_MAX_PIXELS, ImageLoadError, open_image
from apexcli.jsonsafe import dumps
from apexcli.rewards.remote import TOKEN_ENV, nan_to_none
from apexcli.rewards.suite import RewardSuite

MAX_REQUEST_BYTES = 1 << 30  # 1 GiB of JSON: a generous batch of 4k PNGs
LISTEN_BACKLOG = 256  # the kernel caps it at net.core.somaxconn (4096 on current Linux)
DEFAULT_THREADS = 32
DEFAULT_TIMEOUT_S = 60.0


class BadRequest(ValueError):
    """The request itself is wrong: answered 400 (the client does not retry)."""


def _digest(token: str) -> bytes:
    # compared as fixed-length digests, so the comparison time says nothing about the token,
    # not even its length
    return hashlib.sha256(token.encode("utf-8")).digest()


def check_token(token: str) -> str:
    """The token, or ApexError if it cannot travel in an HTTP header."""
    if token and not (token.isascii() and token.isprintable() and " " not in token):
        raise ApexError(f"the server token must be printable ASCII without spaces (set --token or {TOKEN_ENV})")
    return token


def check_limits(threads: int, timeout_s: float, port: int) -> None:
    """ApexError naming the option that is out of range."""
    if threads < 1:
        raise ApexError(f"--threads {threads}: need at least 1")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ApexError(f"--timeout {timeout_s}: need a positive, finite number of seconds")
    if not 0 <= port <= 65535:
        raise ApexError(f"--port {port}: must be in 0..65535")


class RewardHTTPServer(ThreadingHTTPServer):
    """Threaded HTTP server owning one RewardSuite; scoring is serialised by a lock."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, suite: RewardSuite, host: str = "127.0.0.1", port: int = 18086,
                 max_pixels: int = DEFAULT_MAX_PIXELS, *, token: str = "",
                 threads: int = DEFAULT_THREADS, timeout_s: float = DEFAULT_TIMEOUT_S):
        check_limits(threads, timeout_s, port)
        self.suite = suite
        self.max_pixels = max_pixels
        self.score_lock = threading.Lock()
        self.token_digest = _digest(check_token(token)) if token else None
        self.timeout_s = float(timeout_s)
        self.slots = threading.BoundedSemaphore(threads)
        self._stopping = threading.Event()
        if ":" in host:  # an IPv6 literal such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # --- bounded threads: the accept loop waits for a free slot, new connections queue in the
    # kernel's backlog meanwhile; stalled ones free their slot after timeout_s
    def process_request(self, request, client_address):  # type: ignore[override]
        while not self.slots.acquire(timeout=0.2):
            if self._stopping.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):  # the client left or stalled: its loss
            return
        print(f"apex serve: request from {client_address[0]} failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    def authorized(self, header: str | None) -> bool:
        if self.token_digest is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return hmac.compare_digest(_digest(given.strip() if scheme.lower() == "bearer" else ""), self.token_digest)

    def score_payload(self, payload: Any) -> dict[str, Any]:
        """Decode a /score request, run the suite, encode the answer (BadRequest on bad input)."""
        if not isinstance(payload, dict):
            raise BadRequest(f"the body must be a JSON object, got {type(payload).__name__}")
        wanted = payload.get("objectives")
        if wanted is None or wanted == []:  # absent: every objective served here
            wanted = self.suite.objectives
        if not isinstance(wanted, list) or not all(isinstance(o, str) for o in wanted):
            raise BadRequest("'objectives' must be a list of names")
        missing = [o for o in wanted if o not in self.suite.objectives]
        if missing:
            raise BadRequest(f"not served here: {', '.join(missing)}; served: {', '.join(self.suite.objectives)}")
        encoded = payload.get("images")
        prompts = payload.get("prompts")
        if not isinstance(encoded, list) or not isinstance(prompts, list) or len(encoded) != len(prompts):
            raise BadRequest("need 'images' (base64 PNG list) and 'prompts' of the same length")
        if not all(isinstance(p, str) for p in prompts):
            raise BadRequest("'prompts' must be a list of strings")
        images = []
        for i, text in enumerate(encoded):
            if not isinstance(text, str):
                raise BadRequest(f"image {i}: expected a base64 string, got {type(text).__name__}")
            try:
                images.append(open_image(base64.b64decode(text, validate=True), self.max_pixels))
            except (ImageLoadError, binascii.Error, ValueError) as exc:
                raise BadRequest(f"image {i}: {exc}") from None
        with self.score_lock:
            R, info = self.suite(images, prompts)
        columns = [self.suite.objectives.index(o) for o in wanted]
        return {"objectives": list(wanted),
                "scores": [nan_to_none(row) for row in R[:, columns].tolist()],
                "info": {o: info.get(o, {}) for o in wanted}}


class _Handler(BaseHTTPRequestHandler):
    server: RewardHTTPServer

    def setup(self) -> None:
        self.timeout = self.server.timeout_s  # read by StreamRequestHandler.setup: socket timeout
        super().setup()

    def _send(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = dumps(body).encode("utf-8")  # never NaN/Infinity on the wire
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.server.authorized(self.headers.get("Authorization")):
            return True
        self._send(401, {"error": f"missing or wrong bearer token; set {TOKEN_ENV} to the server's token"},
                   {"WWW-Authenticate": "Bearer"})
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if not self._authorized():
            return
        if self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok", "objectives": self.server.suite.objectives})
        else:
            self._send(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/score":
            self._send(404, {"error": f"unknown path {self.path}; use POST /score"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length <= 0 or length > MAX_REQUEST_BYTES:
            self._send(413 if length > MAX_REQUEST_BYTES else 400,
                       {"error": f"need a Content-Length of 1 to {MAX_REQUEST_BYTES} bytes, "
                                 f"got {self.headers.get('Content-Length')!r}"})
            return
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True  # stalled mid-body: drop it, nobody is listening
            return
        try:
            try:
                payload = json.loads(body.decode("utf-8"))
            except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
                raise BadRequest(f"the body is not JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
            self._send(200, self.server.score_payload(payload))
        except (BadRequest, ApexError) as exc:  # bad request: the client should not retry
            self._send(400, {"error": str(exc)})
        except Exception as exc:  # a reward crashed: report it, the client may retry
            self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the CLI prints its own lines
        pass


def make_server(suite: RewardSuite, host: str = "127.0.0.1", port: int = 18086,
                max_pixels: int = DEFAULT_MAX_PIXELS, *, token: str = "",
                threads: int = DEFAULT_THREADS, timeout_s: float = DEFAULT_TIMEOUT_S) -> RewardHTTPServer:
    """Bind the server (port 0 picks a free port); call serve_forever() to run it."""
    check_limits(threads, timeout_s, port)
    try:
        return RewardHTTPServer(suite, host, port, max_pixels, token=token, threads=threads, timeout_s=timeout_s)
    except OSError as exc:
        raise ApexError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port") from None


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve_rewards(objectives: list[str], *, host: str = "127.0.0.1", port: int = 18086,
                  device: str = "auto", dtype: str = "auto", config: Any = None,
                  token: str = "", threads: int = DEFAULT_THREADS, timeout_s: float = DEFAULT_TIMEOUT_S,
                  log=print) -> None:
    """Load the rewards once and serve them until interrupted (the `apex serve` core)."""
    from apexcli.rewards.runtime import resolve_device_dtype

    check_token(token)
    check_limits(threads, timeout_s, port)  # before the models load
    dev, dt = resolve_device_dtype(device, dtype)
    suite = RewardSuite(objectives, device=dev, dtype=dt, config=config)
    server = make_server(suite, host, port, token=token, threads=threads, timeout_s=timeout_s)
    if host not in LOOPBACK_HOSTS and not token:
        log(f"warning: serving on {host} without a token: anyone who can reach this port can run the "
            f"models; set {TOKEN_ENV} (or --token) here and in the clients' environment")
    log(f"serving {', '.join(suite.objectives)} on {server.url} ({dev}, {dt}"
        f"{', token required' if token else ''}); use {suite.objectives[0]}@{server.url}; Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.server_close()
        suite.close()
