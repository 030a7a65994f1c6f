"""Reward server: host rewards over HTTP so a heavy or conflicting model (DeQA's remote code
pins an older transformers) runs in its own process or environment.

    apex serve --objectives pick,aes --port 18087
    apex train --objectives pick@http://127.0.0.1:18087,aes@http://127.0.0.1:18087,...

DeQA-Score's remote code needs transformers 4.36.1: it gets its own environment and entry point
(`make deqa-server`, then `python -m apexcli.rewards.deqa_server`), which reuses this server.

The wire format is documented in `apexcli.rewards.remote`. Binds to loopback unless told
otherwise: the server runs models on whatever it is sent. With a token (`--token` or the
APEX_SERVE_TOKEN variable) every request must carry `Authorization: Bearer <token>`.

Limits, so that a burst, a stuck client or a hostile one cannot take it down:
- listen backlog LISTEN_BACKLOG: a burst of that many connections queues in the kernel
  instead of being reset (the stdlib default is 5);
- at most `threads` connections are handled at once; further ones wait in that queue;
- `timeout_s` is a deadline for the whole request, headers and body, not for each read: a
  client that sends one byte every few seconds is dropped at it all the same (a per-read
  timeout never fired for it); it also bounds each write of the answer;
- under pressure (every slot taken and a connection waiting), the connection that has been
  sending its headers for longer than `header_grace_s` without being authenticated (valid
  token, or complete headers when no token is set) is dropped, from the address holding the
  most connections first: 40 trickling connections can no longer starve a client that has
  the token;
- one client address holds at most `max_per_client` slots; a connection over that drops the
  address's own unauthenticated ones first, else it is answered 503;
- the request body is at most MAX_REQUEST_BYTES, and its images at most `max_request_pixels`
  decoded pixels in all (read from their headers before any is decoded; 413 otherwise);
  /health tells clients the limit and `RemoteReward` splits its requests to fit; images are
  decoded under the scoring lock, so one request's pixels are in memory at a time;
- a request that is not well-formed (not a JSON object, wrong types, too deeply nested)
  answers 400, which the client does not retry; 500 is kept for a reward that crashed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import math
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from apexcli.errors import ApexError
from apexcli.images import DEFAULT_MAX_PIXELS, ImageLoadError, image_size, open_image
from apexcli.jsonsafe import dumps
from apexcli.rewards.remote import TOKEN_ENV, nan_to_none
from apexcli.rewards.suite import RewardSuite

MAX_REQUEST_BYTES = 1 << 30  # 1 GiB of JSON: a generous batch of 4k PNGs
LISTEN_BACKLOG = 256  # the kernel caps it at net.core.somaxconn (4096 on current Linux)
DEFAULT_THREADS = 32
DEFAULT_TIMEOUT_S = 60.0
# Decoded pixels one request may carry (--max-request-pixels): 32 images of 1024 x 1024, a full
# batch of the largest renders apex trains on. A 13 kB request of PNGs declaring huge sizes
# once took 3.85 GB; clients split their batches to fit (the limit is in /health).
DEFAULT_REQUEST_PIXELS = 1 << 25
# Slots one client address may hold (--max-per-client): by default the whole pool, since a
# trainer's ranks all connect from one address; lower it when clients at several addresses share
# the server. The grace is how long a connection may send its headers before, under pressure,
# it counts as a trickling client (an honest one sends them in one packet).
DEFAULT_MAX_PER_CLIENT = DEFAULT_THREADS
HEADER_GRACE_S = 1.0
_POLL_S = 0.1  # how often the accept loop, waiting for a slot, looks for a connection to drop


class BadRequest(ValueError):
    """The request itself is wrong: answered 400 (the client does not retry)."""


class TooLarge(BadRequest):
    """The request's images hold more decoded pixels than the server takes: answered 413."""


@dataclass
class _Connection:
    """A connection holding a slot: who, since when, and whether it may be dropped."""

    sock: socket.socket
    address: str
    since: float  # time.monotonic() when it was accepted (its wait for a slot counts)
    authenticated: bool = False  # token checked (or headers complete when no token is set)
    dropped: bool = False  # shut down by the server to free its slot
    refusal: str = ""  # answered 503 with this message (its address is over max_per_client)


class _DeadlineReader(io.RawIOBase):
    """The socket's bytes, with one deadline for all of them: each read waits at most until
    the deadline, so trickling a byte at a time cannot stretch a request past it."""

    def __init__(self, sock: socket.socket, deadline: float):
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not complete by the server's deadline (--timeout)")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


def _digest(token: str) -> bytes:
    # compared as fixed-length digests, so the comparison time says nothing about the token,
    # not even its length
    return hashlib.sha256(token.encode("utf-8")).digest()


def check_token(token: str) -> str:
    """The token, or ApexError if it cannot travel in an HTTP header."""
    if token and not (token.isascii() and token.isprintable() and " " not in token):
        raise ApexError(f"the server token must be printable ASCII without spaces (set --token or {TOKEN_ENV})")
    return token


def check_limits(
    threads: int,
    timeout_s: float,
    port: int,
    max_request_pixels: int = DEFAULT_REQUEST_PIXELS,
    max_per_client: int = DEFAULT_MAX_PER_CLIENT,
) -> None:
    """ApexError naming the option that is out of range."""
    if threads < 1:
        raise ApexError(f"--threads {threads}: need at least 1")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ApexError(f"--timeout {timeout_s}: need a positive, finite number of seconds")
    if not 0 <= port <= 65535:
        raise ApexError(f"--port {port}: must be in 0..65535")
    if max_request_pixels < 1:
        raise ApexError(f"--max-request-pixels {max_request_pixels}: need at least 1")
    if max_per_client < 1:
        raise ApexError(f"--max-per-client {max_per_client}: need at least 1")


class RewardHTTPServer(ThreadingHTTPServer):
    """Threaded HTTP server owning one RewardSuite; scoring is serialised by a lock."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        suite: RewardSuite,
        host: str = "127.0.0.1",
        port: int = 18086,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        *,
        token: str = "",
        threads: int = DEFAULT_THREADS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_request_pixels: int = DEFAULT_REQUEST_PIXELS,
        max_per_client: int = DEFAULT_MAX_PER_CLIENT,
        header_grace_s: float = HEADER_GRACE_S,
    ):
        check_limits(threads, timeout_s, port, max_request_pixels, max_per_client)
        self.suite = suite
        self.max_pixels = max_pixels
        self.max_request_pixels = max_request_pixels
        self.max_per_client = max_per_client
        self.header_grace_s = header_grace_s
        self.score_lock = threading.Lock()
        self.token_digest = _digest(check_token(token)) if token else None
        self.timeout_s = float(timeout_s)
        self.slots = threading.BoundedSemaphore(threads)
        self.connections: dict[int, _Connection] = {}  # id(socket) -> the connection holding a slot
        self._registry = threading.Lock()
        self._stopping = threading.Event()
        if ":" in host:  # an IPv6 literal such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # --- bounded threads: the accept loop waits for a free slot (new connections queue in the
    # kernel's backlog meanwhile), dropping a trickling unauthenticated connection to free one
    def process_request(self, request, client_address):  # type: ignore[override]
        accepted = time.monotonic()
        if not self._wait_for_slot():
            self.shutdown_request(request)
            return
        try:
            self._admit(_Connection(request, str(client_address[0]), accepted))
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            self.slots.release()
            raise

    def _wait_for_slot(self) -> bool:
        """Take a slot, dropping a trickling connection first whenever none is free (the slot it
        frees comes within milliseconds); False when the server stops meanwhile."""
        while not self.slots.acquire(blocking=False):
            if self._stopping.is_set():
                return False
            self._drop_one(address=None)
            if self.slots.acquire(timeout=_POLL_S):
                break
        return True

    def process_request_thread(self, request, client_address):  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)
            self.slots.release()

    def _admit(self, connection: _Connection) -> None:
        """Register a connection that got a slot. At its address's cap, one of the address's own
        unauthenticated connections is dropped for it (once past the grace, waited for here);
        when all it holds are authenticated, the new one is answered 503."""
        address = connection.address
        while self._held_by(address) >= self.max_per_client and not self._drop_one(address=address):
            if not self._held_by(address, authenticated=False):
                connection.refusal = (
                    f"too many connections from {address} (at most {self.max_per_client} at once: "
                    "apex serve --max-per-client); retry when one is answered"
                )
                break
            if self._stopping.wait(_POLL_S):
                break
        with self._registry:
            self.connections[id(connection.sock)] = connection

    def _forget(self, request: socket.socket) -> None:
        with self._registry:
            self.connections.pop(id(request), None)

    def _held_by(self, address: str, authenticated: bool | None = None) -> int:
        """Live connections of `address` (only those with that `authenticated` state, if given)."""
        with self._registry:
            return sum(
                1
                for c in self.connections.values()
                if c.address == address
                and not c.dropped
                and (authenticated is None or c.authenticated == authenticated)
            )

    def _drop_one(self, address: str | None) -> bool:
        """Shut down the unauthenticated connection (of `address`, or of any) that has sent
        headers for longer than the grace, from the address holding the most connections, oldest
        first. Nothing while an earlier drop has yet to free its slot. True if one was dropped."""
        now = time.monotonic()
        with self._registry:
            live = [c for c in self.connections.values() if not c.dropped]
            if address is None and len(live) < len(self.connections):
                return False  # a dropped connection is still freeing its slot
            held: dict[str, int] = {}
            for c in live:
                held[c.address] = held.get(c.address, 0) + 1
            candidates = [
                c
                for c in live
                if not c.authenticated
                and now - c.since >= self.header_grace_s
                and (address is None or c.address == address)
            ]
            if not candidates:
                return False
            victim = max(candidates, key=lambda c: (held[c.address], -c.since))
            victim.dropped = True
        try:
            victim.sock.shutdown(socket.SHUT_RDWR)  # its thread's read returns at once; the slot follows
        except OSError:
            pass
        return True

    def connection(self, request: socket.socket) -> _Connection | None:
        with self._registry:
            return self.connections.get(id(request))

    def mark_authenticated(self, request: socket.socket) -> None:
        connection = self.connection(request)
        if connection is not None:
            connection.authenticated = True

    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):  # the client left or stalled: its loss
            return
        connection = self.connection(request)
        if connection is not None and connection.dropped:  # dropped under pressure: nothing to report
            return
        print(f"apex serve: request from {client_address[0]} failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    def authorized(self, header: str | None) -> bool:
        """The bearer token matches (always true without a token)."""
        if self.token_digest is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return hmac.compare_digest(_digest(given.strip() if scheme.lower() == "bearer" else ""), self.token_digest)

    def _image_bytes(self, encoded: list) -> list[bytes]:
        """The images' file bytes, after checking from their headers alone that their decoded
        pixels fit `max_request_pixels` (TooLarge otherwise)."""
        blobs = []
        for i, text in enumerate(encoded):
            if not isinstance(text, str):
                raise BadRequest(f"image {i}: expected a base64 string, got {type(text).__name__}")
            try:
                blobs.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError) as exc:
                raise BadRequest(f"image {i}: {exc}") from None
        sizes = [image_size(blob) for blob in blobs]
        total = sum(w * h for w, h in (size for size in sizes if size))
        if total > self.max_request_pixels:
            raise TooLarge(
                f"the request's {len(blobs)} images hold {total} decoded pixels, more than this server's "
                f"limit of {self.max_request_pixels} per request (apex serve --max-request-pixels); "
                "send fewer or smaller images"
            )
        return blobs

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
        blobs = self._image_bytes(encoded)
        with self.score_lock:  # decoded here, one request's pixels in memory at a time
            images = []
            for i, blob in enumerate(blobs):
                try:
                    images.append(open_image(blob, self.max_pixels))
                except ImageLoadError as exc:
                    raise BadRequest(f"image {i}: {exc}") from None
            R, info = self.suite(images, prompts)
        columns = [self.suite.objectives.index(o) for o in wanted]
        return {
            "objectives": list(wanted),
            "scores": [nan_to_none(row) for row in R[:, columns].tolist()],
            "info": {o: info.get(o, {}) for o in wanted},
        }


class _Handler(BaseHTTPRequestHandler):
    server: RewardHTTPServer

    def setup(self) -> None:
        self.timeout = self.server.timeout_s  # read by StreamRequestHandler.setup: socket timeout
        super().setup()
        # headers and body share one deadline (HTTP/1.0: one request per connection)
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, time.monotonic() + self.server.timeout_s))

    def parse_request(self) -> bool:
        """The headers are in: a connection with the token (or any, without one) is no longer
        one the server drops under pressure."""
        if not super().parse_request():
            return False
        if self.server.authorized(self.headers.get("Authorization")):
            self.server.mark_authenticated(self.request)
        return True

    def _send(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = dumps(body).encode("utf-8")  # never NaN/Infinity on the wire
        self.connection.settimeout(self.server.timeout_s)  # a write gets the full timeout, not the read deadline's rest
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _admitted(self) -> bool:
        """False after answering a connection over its address's cap (503) or without the
        token (401)."""
        connection = self.server.connection(self.request)
        if connection is not None and connection.refusal:
            self._send(503, {"error": connection.refusal}, {"Retry-After": "1"})
            return False
        if self.server.authorized(self.headers.get("Authorization")):
            return True
        self._send(
            401,
            {"error": f"missing or wrong bearer token; set {TOKEN_ENV} to the server's token"},
            {"WWW-Authenticate": "Bearer"},
        )
        return False

    def do_GET(self) -> None:
        if not self._admitted():
            return
        if self.path.rstrip("/") == "/health":
            self._send(
                200,
                {
                    "status": "ok",
                    "objectives": self.server.suite.objectives,
                    "max_request_pixels": self.server.max_request_pixels,
                },
            )
        else:
            self._send(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

    def do_POST(self) -> None:
        if not self._admitted():
            return
        if self.path.rstrip("/") != "/score":
            self._send(404, {"error": f"unknown path {self.path}; use POST /score"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length <= 0 or length > MAX_REQUEST_BYTES:
            self._send(
                413 if length > MAX_REQUEST_BYTES else 400,
                {
                    "error": f"need a Content-Length of 1 to {MAX_REQUEST_BYTES} bytes, "
                    f"got {self.headers.get('Content-Length')!r}"
                },
            )
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
        except TooLarge as exc:  # too many pixels: the client should send less
            self._send(413, {"error": str(exc)})
        except (BadRequest, ApexError) as exc:  # bad request: the client should not retry
            self._send(400, {"error": str(exc)})
        except Exception as exc:  # a reward crashed: report it, the client may retry
            self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the CLI prints its own lines
        pass


def make_server(
    suite: RewardSuite,
    host: str = "127.0.0.1",
    port: int = 18086,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    token: str = "",
    threads: int = DEFAULT_THREADS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_request_pixels: int = DEFAULT_REQUEST_PIXELS,
    max_per_client: int = DEFAULT_MAX_PER_CLIENT,
    header_grace_s: float = HEADER_GRACE_S,
) -> RewardHTTPServer:
    """Bind the server (port 0 picks a free port); call serve_forever() to run it. The limits are
    checked by the server itself, before it binds."""
    try:
        return RewardHTTPServer(
            suite,
            host,
            port,
            max_pixels,
            token=token,
            threads=threads,
            timeout_s=timeout_s,
            max_request_pixels=max_request_pixels,
            max_per_client=max_per_client,
            header_grace_s=header_grace_s,
        )
    except OSError as exc:
        raise ApexError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port") from None


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve_rewards(
    objectives: list[str],
    *,
    host: str = "127.0.0.1",
    port: int = 18086,
    device: str = "auto",
    dtype: str = "auto",
    config: Any = None,
    token: str = "",
    threads: int = DEFAULT_THREADS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_request_pixels: int = DEFAULT_REQUEST_PIXELS,
    max_per_client: int = DEFAULT_MAX_PER_CLIENT,
    log=print,
) -> None:
    """Load the rewards once and serve them until interrupted (the `apex serve` core)."""
    from apexcli.rewards.runtime import resolve_device_dtype

    check_token(token)
    check_limits(threads, timeout_s, port, max_request_pixels, max_per_client)  # before the models load
    dev, dt = resolve_device_dtype(device, dtype)
    suite = RewardSuite(objectives, device=dev, dtype=dt, config=config)
    server = make_server(
        suite,
        host,
        port,
        token=token,
        threads=threads,
        timeout_s=timeout_s,
        max_request_pixels=max_request_pixels,
        max_per_client=max_per_client,
    )
    if host not in LOOPBACK_HOSTS and not token:
        log(
            f"warning: serving on {host} without a token: anyone who can reach this port can run the "
            f"models; set {TOKEN_ENV} (or --token) here and in the clients' environment"
        )
    log(
        f"serving {', '.join(suite.objectives)} on {server.url} ({dev}, {dt}"
        f"{', token required' if token else ''}); use {suite.objectives[0]}@{server.url}; Ctrl-C stops"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.server_close()
        suite.close()
