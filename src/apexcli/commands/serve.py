"""`apex serve`: host rewards over HTTP (parses options, calls serve_rewards)."""

from __future__ import annotations

from typing import Annotated

import typer

from apexcli.rewards.config import RewardsConfig, apply_overrides
from apexcli.rewards.remote import TOKEN_ENV
from apexcli.rewards.server import DEFAULT_MAX_PER_CLIENT, DEFAULT_REQUEST_PIXELS, DEFAULT_THREADS, DEFAULT_TIMEOUT_S


def serve(
    objectives: Annotated[
        str, typer.Option("--objectives", "-O", help="Comma-separated rewards to host, e.g. deqa or pick,aes.")
    ],
    port: Annotated[int, typer.Option(help="TCP port.", min=0, max=65535)] = 18086,
    host: Annotated[
        str, typer.Option(help="Interface to bind; loopback by default. Beyond loopback, set a token.")
    ] = "127.0.0.1",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            help="auto = float32 on every device, the dtype training scores in (a reward's own rewards.X.dtype still applies: deqa float16); float16 or bfloat16 for the rewards without one, whose scores then differ from training's."
        ),
    ] = "auto",
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow DeQA-Score's own model code to run.")
    ] = False,
    token: Annotated[
        str,
        typer.Option(
            "--token",
            envvar=TOKEN_ENV,
            show_default=False,
            help=f"Require 'Authorization: Bearer TOKEN' on every request; clients send the value of {TOKEN_ENV}. Prefer the variable: a command line is visible to other users.",
        ),
    ] = "",
    threads: Annotated[
        int, typer.Option(help="Connections handled at once; more wait in the listen queue.")
    ] = DEFAULT_THREADS,
    timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a client has to send its whole request (headers and body, however it trickles them), and to take each write of the answer."
        ),
    ] = DEFAULT_TIMEOUT_S,
    max_request_pixels: Annotated[
        int,
        typer.Option(
            "--max-request-pixels",
            help="Decoded pixels one request's images may hold, read from their headers before decoding (413 beyond); clients split their batches to fit.",
        ),
    ] = DEFAULT_REQUEST_PIXELS,
    max_per_client: Annotated[
        int,
        typer.Option(
            "--max-per-client",
            help="Connections one client address may hold at once (503 beyond); the default is the whole --threads pool, as a trainer's ranks share one address.",
        ),
    ] = DEFAULT_MAX_PER_CLIENT,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Reward option KEY=VALUE, repeatable, e.g. --set rewards.deqa.source=/models/deqa"),
    ] = None,
) -> None:
    """Serve rewards to `train` and `score` (use them as NAME@http://HOST:PORT)."""
    from apexcli.rewards.server import serve_rewards

    config = apply_overrides(RewardsConfig(), list(overrides or []))
    # the --trust-remote-code flag, or the option given as --set rewards.deqa.trust_remote_code=true
    config.deqa.trust_remote_code = config.deqa.trust_remote_code or trust_remote_code
    serve_rewards(
        [o for o in objectives.split(",") if o.strip()],
        host=host,
        port=port,
        device=device,
        dtype=dtype,
        config=config,
        token=token,
        threads=threads,
        timeout_s=timeout,
        max_request_pixels=max_request_pixels,
        max_per_client=max_per_client,
        log=typer.echo,
    )
