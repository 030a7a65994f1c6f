"""A reward scored by a reward server (`apex serve`), used as `name@http://host:port`.

Wire format (JSON over HTTP):
    GET  /health -> {"status": "ok", "objectives": ["deqa", ...]}
    POST /score  {"objectives": ["deqa"], "prompts": [...], "images": [base64 PNG, ...]}
              -> {"objectives": [...], "scores": [[float|null]*K]*N, "info": {name: {...}}}
null means no score (NaN, or a non-finite value, which JSON cannot carry). Images travel as
8-bit PNG (lossless for 8-bit inputs). /health may also give "max_request_pixels", the decoded
pixels one request may carry: a batch is then sent in as many requests as it takes to fit.
Connection errors, timeouts and 5xx answers are retried with exponential back-off; 4xx answers
(a wrong request, a missing token) are not; a server that stays down is an ApexError, never
silent zeros.
When APEX_SERVE_TOKEN is set, every request carries `Authorization: Bearer <its value>`
(the server started with the same token refuses requests without it with 401).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import time
import urllib.error
import urllib.request
from typing import Any

import torch
from PIL import Image

from apexcli.errors import ApexError
from apexcli.jsonsafe import finite_or_none
from apexcli.rewards.base import ImageBatch, Reward
from apexcli.rewards.config import RemoteConfig
from apexcli.rewards.registry import reward_spec

TOKEN_ENV = "APEX_SERVE_TOKEN"  # the bearer token, read by `apex serve` and by every client


def encode_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def nan_to_none(values: list[float]) -> list[float | None]:
    """Scores as JSON-safe values: NaN and ±inf become None (null)."""
    return [None if v is None else finite_or_none(float(v)) for v in values]


def none_to_nan(values: list[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


class ServerDown(Exception):
    """Transport-level failure worth a retry."""


def request_json(url: str, payload: dict | None, config: RemoteConfig, what: str) -> dict:
    """GET (payload None) or POST JSON with retries; returns the decoded answer or raises ApexError."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    token = os.environ.get(TOKEN_ENV, "")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    attempts = 1 + max(0, int(config.retries))
    last = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(config.backoff_s * 2 ** (attempt - 1))
        req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=config.timeout_s) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", "replace")
            try:
                message = json.loads(body).get("error", body)
            except ValueError:
                message = body
            message = " ".join(str(message).split())[:200]
            if exc.code == 401:
                fix = (
                    f"the token in {TOKEN_ENV} is wrong"
                    if token
                    else f"set {TOKEN_ENV} to the token the server was started with"
                )
                raise ApexError(f"reward server {url} refused {what}: HTTP 401, no valid bearer token: {fix}") from None
            if exc.code < 500:  # the request itself is wrong: retrying cannot help
                raise ApexError(f"reward server {url} refused {what}: HTTP {exc.code}: {message}") from None
            last = f"HTTP {exc.code}: {message}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = " ".join(str(getattr(exc, "reason", exc)).split())[:120] or type(exc).__name__
        except ValueError:
            last = "answer is not JSON"
    raise ApexError(
        f"reward server {url} failed for {what} after {attempts} attempt(s) ({last}); "
        f"is `{serve_command(what)}` running there?"
    )


def serve_command(name: str) -> str:
    """The command that hosts reward `name`: DeQA has its own server in its own environment."""
    if name == "deqa":
        return "python -m apexcli.rewards.deqa_server --trust-remote-code --port PORT (make deqa-server)"
    return f"apex serve --objectives {name} --port PORT"


def pixel_groups(pixels: list[int], limit: int | None) -> list[tuple[int, int]]:
    """(start, stop) of consecutive images whose pixels add up to at most `limit` each (an
    image over it alone: the server then names its limit); one group without a limit."""
    if limit is None or not pixels:
        return [(0, len(pixels))] if pixels else []
    groups, start, total = [], 0, 0
    for i, n in enumerate(pixels):
        if i > start and total + n > limit:
            groups.append((start, i))
            start, total = i, 0
        total += n
    groups.append((start, len(pixels)))
    return groups


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class RemoteReward(Reward):
    """`name` scored by the server at `url` (checked at construction)."""

    cpu_bound = True  # waiting on the network: run beside the device rewards
    uses_pil = True

    def __init__(self, name: str, url: str, config: RemoteConfig | None = None, batch_size: int = 32):
        self.name = name  # type: ignore[misc]
        self.needs_prompt = reward_spec(name).needs_prompt  # type: ignore[misc]
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ApexError(
                f"reward URL {url!r} for {name} must start with http:// (e.g. {name}@http://127.0.0.1:18086)"
            )
        self.config = config or RemoteConfig()
        self.batch_size = batch_size
        health = request_json(self.url + "/health", None, self.config, name)
        served = health.get("objectives", [])
        self.max_request_pixels = _positive_int(health.get("max_request_pixels"))  # None: a server without one
        if name not in served:
            raise ApexError(
                f"reward server {self.url} serves {', '.join(served) or 'nothing'}, not {name}; "
                f"start one with `{serve_command(name)}`"
            )

    def score(self, batch: ImageBatch, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        """One request per group of images that fits the server's pixel limit (usually one)."""
        images = batch.pil()
        parts = [
            self._request(images[start:stop], list(prompts[start:stop]))
            for start, stop in pixel_groups([im.width * im.height for im in images], self.max_request_pixels)
        ]
        if len(parts) == 1:
            values, info = parts[0]
        else:  # per-image lists, joined in order
            values = [v for part, _ in parts for v in part]
            info = {key: [v for _, part_info in parts for v in part_info.get(key, [])] for key in parts[0][1]}
        return torch.tensor(values, dtype=torch.float32), info

    def _request(self, images: list[Image.Image], prompts: list[str]) -> tuple[list[float], dict[str, Any]]:
        payload = {"objectives": [self.name], "prompts": prompts, "images": [encode_png(im) for im in images]}
        answer = request_json(self.url + "/score", payload, self.config, self.name)
        try:
            column = answer["objectives"].index(self.name)
            values = none_to_nan([row[column] for row in answer["scores"]])
        except (KeyError, ValueError, IndexError, TypeError):
            raise ApexError(f"reward server {self.url} sent a malformed answer for {self.name}") from None
        if len(values) != len(images):
            raise ApexError(f"reward server {self.url} returned {len(values)} scores for {len(images)} images")
        return values, answer.get("info", {}).get(self.name, {})
