"""How one update's samples spread over processes, micro-batches and optimizer steps, checked
and announced before any model loads."""

from __future__ import annotations

import os
import sys

from apexcli.config import Config
from apexcli.errors import ApexError
from apexcli.train.run_start import warn


def check_shards(cfg: Config, world_size: int) -> str:
    """Each process trains on total / world_size samples in micro-batches of train_batch_size;
    a remainder would silently go untrained (and a shard smaller than one micro-batch would
    train nothing at all), so it is an error before any model is loaded. So is a
    ``train.optimizer_steps_per_epoch`` that the per-process micro-batches cannot give: every
    optimizer step needs at least one micro-batch on each process, and quietly making fewer
    steps would change the recipe (and whether the clip ever acts) with the number of GPUs.
    Returns the layout in one line, printed at start."""
    t = cfg.train
    total = t.prompts_per_step * t.group_size
    if total % world_size:
        raise ApexError(
            f"train.prompts_per_step x train.group_size ({total}) must be divisible by the number of processes ({world_size})"
        )
    shard = total // world_size
    if shard % t.train_batch_size:
        raise ApexError(
            f"config key 'train.train_batch_size' ({t.train_batch_size}) must divide the samples per process "
            f"({total} / {world_size} processes = {shard})"
        )
    micro = shard // t.train_batch_size
    if t.optimizer_steps_per_epoch > micro:
        raise ApexError(
            f"train.optimizer_steps_per_epoch={t.optimizer_steps_per_epoch} needs as many micro-batches per process, but "
            f"{world_size} process(es) x {micro} micro-batch(es) of train.train_batch_size={t.train_batch_size} = {total} "
            f"samples give {micro}; set train.train_batch_size={max(1, shard // t.optimizer_steps_per_epoch)} "
            f"(or raise train.prompts_per_step)"
        )
    steps = optimizer_steps_per_update(cfg, world_size)
    kind = "one process" if world_size == 1 else f"{world_size} processes"
    return (
        f"{kind}; {total} samples per update = {shard} per process in {micro} micro-batch(es) of "
        f"{t.train_batch_size}; {steps} optimizer step(s) per epoch"
    )


def optimizer_steps_per_update(cfg: Config, world_size: int) -> int:
    """Optimizer steps per epoch over the rollout batch (the update loop's count, all samples kept)."""
    t = cfg.train
    micro = t.prompts_per_step * t.group_size // world_size // t.train_batch_size
    return min(t.optimizer_steps_per_epoch, micro)


def warn_single_process_launch(world_size: int) -> None:
    """``accelerate launch --num_processes N`` without ``--multi_gpu`` (or a config saying so)
    starts ONE process, yet exports a rendezvous address as if for N: the run then trains on one
    GPU while its user believes it uses N. That combination is worth one line."""
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    if world_size == 1 and launched_by_accelerate and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        warn(
            "accelerate launch started a single process although it was asked for several; add --multi_gpu "
            "(GPUs), or launch with `torchrun --nproc_per_node N -m apexcli train ...` (CPUs)"
        )


def note_ema_delay(cfg: Config, steps_per_update: int) -> None:
    """With ``ema_every`` > 1, evaluations read an EMA that only moves every few optimizer steps,
    so the first evals show the base model bit for bit. Said at start, so a short run that shows
    no change is not mistaken for one that did not learn."""
    t = cfg.train
    if t.ema_decay <= 0 or t.ema_every <= 1 or not cfg.eval.use_ema or cfg.eval.every <= 0:
        return
    first = -(-t.ema_every // (steps_per_update * t.inner_epochs))
    print(
        f"apex: eval uses the LoRA's EMA, updated every {t.ema_every} optimizer steps: evaluations before update "
        f"{first} show the base model (eval.use_ema=false evaluates the live LoRA)",
        file=sys.stderr,
    )
