"""Which prompts each iteration trains on, and which samples each process owns.

An iteration draws ``prompts_per_step`` prompts (a seeded permutation of the prompt set, so a
run is reproducible and resumable from the step alone) and makes ``group_size`` samples of
each. The flat list of samples (group-major) is cut into equal contiguous shards, one per
process: a group may straddle two processes, which is why advantages are computed after the
rewards of all processes are gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apexcli.errors import ApexError
from apexcli.seeds import mix_seed


@dataclass(frozen=True)
class StepBatch:
    prompt_ids: list[int]
    """Index into the prompt set of each global sample ``[N]``."""
    group_ids: torch.Tensor
    """``[N]`` long: group of each global sample (0 .. prompts_per_step-1)."""
    shard: slice
    """The global samples this process owns."""


def plan_step(
    *, step: int, seed: int, num_prompts: int, prompts_per_step: int, group_size: int, rank: int, world_size: int
) -> StepBatch:
    total = prompts_per_step * group_size
    if total % world_size:
        raise ApexError(
            f"train.prompts_per_step x train.group_size ({total}) must be divisible by the number of processes ({world_size})"
        )
    gen = torch.Generator().manual_seed(mix_seed(seed, step, 1))
    # Cycle through the prompt set without repeats inside an iteration when it is large enough.
    picks = torch.randperm(num_prompts, generator=gen)[:prompts_per_step].tolist()
    while len(picks) < prompts_per_step:
        picks += torch.randperm(num_prompts, generator=gen)[: prompts_per_step - len(picks)].tolist()
    prompt_ids = [p for p in picks for _ in range(group_size)]
    group_ids = torch.arange(prompts_per_step).repeat_interleave(group_size)
    per_rank = total // world_size
    return StepBatch(prompt_ids=prompt_ids, group_ids=group_ids, shard=slice(rank * per_rank, (rank + 1) * per_rank))
