"""DeQA-Score reward server, run from its own environment (`make deqa-server`).

DeQA-Score's remote code was written for transformers 4.36.1 (later versions need patches)
and casts its pixels and level weights to float16 inside `score()`, so the model must load in
float16 and cannot live in the training environment (transformers >= 4.46). This module runs
in `.venv-deqa` (transformers 4.36.1 and the few packages the remote code imports; apexcli
installed there without its dependencies) and speaks the remote-reward protocol of
`apexcli.rewards.remote` through the same HTTP server as `apex serve`:

    make deqa-server                                        # once: creates .venv-deqa
    .venv-deqa/bin/python -m apexcli.rewards.deqa_server --trust-remote-code --source DIR
    apex train --objectives pick,aes,ocr,deqa@http://127.0.0.1:18086 ...

It imports only the stdlib, torch, numpy, PIL, yaml, transformers (for the model) and
apexcli's reward base, server and DeQA modules, none of which need a newer transformers
(tests/test_deqa_server.py checks the import list against requirements-deqa.txt).

Two options reproduce what Flow-GRPO's DeQA reward server sees and returns:
`--jpeg-quality 75` scores each image after a JPEG round trip at that quality (the reference
ships images to its server as JPEG q75; ours travel as lossless PNG), and `--scale 0.2`
multiplies the scores (the reference trains on DeQA / 5). Both default off: scores are raw
DeQA units (1-5), the units of `apex score`, eval and the papers' tables.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from apexcli.errors import ApexError

DEFAULT_SOURCE = "zhiyuanyou/DeQA-Score-Mix3"


def jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    """`image` as a decoder sees it after a JPEG save at `quality` (PIL defaults otherwise)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("RGB")


class DeqaSuite:
    """The one-objective scorer the HTTP server hosts: DeQA-Score with the transport options.

    Duck-types the part of RewardSuite that `apexcli.rewards.server` uses: `objectives`,
    `__call__(images, prompts) -> (R [N, 1], info)` and `close()`."""

    objectives = ["deqa"]

    def __init__(self, reward: Any, jpeg_quality: int = 0, scale: float = 1.0):
        if not 0 <= int(jpeg_quality) <= 100:
            raise ApexError(f"--jpeg-quality {jpeg_quality}: use 1-100 (75 = Flow-GRPO's transport) or 0 for none")
        self.reward = reward
        self.jpeg_quality = int(jpeg_quality)
        self.scale = float(scale)

    def __call__(
        self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        images = list(images)
        if self.jpeg_quality:
            images = [jpeg_round_trip(im, self.jpeg_quality) for im in images]
        scores, info = self.reward(images, prompts)
        return (scores.float() * self.scale).reshape(-1, 1), {"deqa": info}

    def close(self) -> None:
        self.reward.close()


def build_suite(
    source: str,
    *,
    device: str = "cuda",
    dtype: str = "float16",
    batch_size: int = 8,
    attn_implementation: str = "eager",
    jpeg_quality: int = 0,
    scale: float = 1.0,
    trust_remote_code: bool = False,
) -> DeqaSuite:
    """Load DeQA-Score (its remote code) on `device` in `dtype` and wrap it for the server."""
    from apexcli.rewards.base import resolve_dtype
    from apexcli.rewards.config import DeqaConfig
    from apexcli.rewards.deqa import DeQAScore

    config = DeqaConfig(
        source=source,
        trust_remote_code=trust_remote_code,
        batch_size=batch_size,
        attn_implementation=attn_implementation,
        dtype=dtype,
    )
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ApexError(f"unknown --device {device!r}; use cuda, cuda:N or cpu") from None
    reward = DeQAScore(config, device=dev, dtype=resolve_dtype(dtype, torch.float16))
    return DeqaSuite(reward, jpeg_quality=jpeg_quality, scale=scale)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m apexcli.rewards.deqa_server",
        description="Serve DeQA-Score as the 'deqa' reward (use deqa@http://HOST:PORT).",
    )
    p.add_argument("--source", default=DEFAULT_SOURCE, help="hub id or local dir of the DeQA-Score weights")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the Python code shipped with the weights to run (required)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (loopback by default; beyond it, set a token)"
    )
    p.add_argument(
        "--token",
        default=os.environ.get("APEX_SERVE_TOKEN", ""),
        help="require 'Authorization: Bearer TOKEN' (default: $APEX_SERVE_TOKEN, which the client sends)",
    )
    p.add_argument("--port", type=int, default=18086)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument(
        "--dtype",
        default="float16",
        help="float16 (default); DeQA-Score's score() casts its inputs to half, so other dtypes fail there",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per score() call")
    p.add_argument("--attn-implementation", default="eager", help="passed to from_pretrained ('' = library default)")
    p.add_argument(
        "--jpeg-quality",
        type=int,
        default=0,
        help="score each image after a JPEG round trip at this quality; 75 = Flow-GRPO's transport; 0 = off",
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply the scores; 0.2 = Flow-GRPO's DeQA/5")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from apexcli.rewards.hub import override_hint
    from apexcli.rewards.server import LOOPBACK_HOSTS, make_server

    args = parse_args(argv)
    try:
        with override_hint("pass --source DIR"):  # this command's syntax for rewards.deqa.source
            suite = build_suite(
                args.source,
                device=args.device,
                dtype=args.dtype,
                batch_size=args.batch_size,
                attn_implementation=args.attn_implementation,
                jpeg_quality=args.jpeg_quality,
                scale=args.scale,
                trust_remote_code=args.trust_remote_code,
            )
        server = make_server(suite, args.host, args.port, token=args.token)  # type: ignore[arg-type]
    except ApexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK_HOSTS and not args.token:
        print(f"warning: serving on {args.host}: anyone who can reach this port can run the model", file=sys.stderr)
    extras = [f"JPEG q{args.jpeg_quality} round trip"] * bool(args.jpeg_quality) + [f"scores x {args.scale:g}"] * (
        args.scale != 1.0
    )
    print(
        f"serving deqa on {server.url} ({args.device}, {args.dtype}{''.join(', ' + e for e in extras)}); "
        f"use deqa@{server.url}; Ctrl-C stops",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
        suite.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
