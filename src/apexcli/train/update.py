"""The policy update every loss shares: sample order, micro-batches, gradient accumulation under
``no_sync``, clipping, the optimizer / scheduler / EMA step (skipped on a non-finite gradient),
and the statistics reduced over the update and across processes.

What differs between losses lives behind ``PolicyLoss``; this loop never asks which one it runs.
All randomness comes from generators seeded by (seed, update, epoch, process), so a resumed run
and an uninterrupted one draw the same orders.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from apexcli.config import Config
from apexcli.seeds import mix_seed
from apexcli.train.ema import LoraEMA
from apexcli.train.losses import MicroBatch, PolicyLoss, UpdateBatch
from apexcli.train.losses.base import Reduction
from apexcli.train.lr_schedule import UpdateSchedule


def selected_samples(
    advantages: torch.Tensor,
    micro: int,
    *,
    drop_zero: bool,
    seed: int,
    step: int,
    rank: int,
    most_micro_batches: Callable[[int], int] | None = None,
) -> torch.Tensor:
    """Local sample indices to train on, a multiple of ``micro`` long.

    All of them, unless the balancer asks to drop zero-advantage samples (Flow-GRPO's
    ``static`` recipe: a flat group teaches nothing but would still pay KL and dilute the
    batch mean). Then the kept samples are padded with dropped ones up to whole
    micro-batches, and every process trains as many micro-batches as the fullest one (DDP
    needs the same number of backward passes everywhere; ``most_micro_batches`` gives that
    maximum over processes), as Flow-GRPO pads to its batch count.
    """
    every = torch.arange(advantages.shape[0])
    if not drop_zero:
        return every
    nonzero = (advantages != 0).cpu()
    kept, dropped = every[nonzero], every[~nonzero]
    n_micro = -(-len(kept) // micro)
    if most_micro_batches is not None:
        n_micro = most_micro_batches(n_micro)
    pad = n_micro * micro - len(kept)
    if pad > 0:
        gen = torch.Generator().manual_seed(mix_seed(seed, step, 13, rank))
        kept = torch.cat([kept, dropped[torch.randperm(len(dropped), generator=gen)[:pad]]])
    return kept


def micro_batches_per_step(n_micro: int, optimizer_steps_per_epoch: int) -> int:
    """Micro-batches accumulated into one optimizer step: ``optimizer_steps_per_epoch`` steps (no
    more than there are micro-batches), the last of an epoch possibly shorter."""
    return -(-n_micro // max(1, min(optimizer_steps_per_epoch, n_micro)))


def idle_statistics(lr: float) -> dict:
    """The row of an update with nothing to train (every advantage 0 on every process)."""
    return {
        "loss": 0.0,
        "kl": 0.0,
        "ratio_mean": 1.0,
        "clip_frac": 0.0,
        "ratio_max_dev": 0.0,
        "grad_norm": 0.0,
        "skipped_updates": 0,
        "ratio_first": 1.0,
        "lr": lr,
        "optimizer_steps": 0,
        "samples_trained": 0,
    }


class UpdateStatistics:
    """Scalar statistics of an update's micro-batches, kept as device tensors until the end: on a
    GPU each ``.item()`` would stall the CPU until the GPU drains, and the next forward's kernels
    would then be launched onto an idle GPU."""

    def __init__(self, reductions: Mapping[str, Reduction]):
        self.reductions = reductions
        self.values: dict[str, list[torch.Tensor]] = {"loss": []}

    def add(self, loss: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> None:
        self.values["loss"].append(loss)
        for key, value in stats.items():
            self.values.setdefault(key, []).append(value)

    def _local(self, key: str) -> torch.Tensor:
        values = self.values[key]
        how = self.reductions.get(key, "mean")
        if how == "first":
            return values[0].double()
        stacked = torch.stack(values).double()
        return stacked.max() if how == "max" else stacked.mean()

    def reduced(self, accelerator: Accelerator, device: torch.device) -> dict[str, float]:
        """One device-to-host copy for all of them; then means over processes (every process trains
        as many micro-batches, so the mean of the per-process means is the global mean) and maxima."""
        keys = [k for k, v in self.values.items() if v]  # first-seen order: also the all-reduce's element order
        out = dict(zip(keys, torch.stack([self._local(k) for k in keys]).tolist()))
        if accelerator.num_processes > 1:
            means = [k for k in keys if self.reductions.get(k, "mean") == "mean"]
            local = torch.tensor([out[k] for k in means], dtype=torch.float64, device=device)
            out.update(zip(means, accelerator.reduce(local, reduction="mean").tolist()))
            for key in (k for k in keys if self.reductions.get(k) == "max"):
                out[key] = float(accelerator.gather(torch.tensor([out[key]], dtype=torch.float64, device=device)).max())
        return out


@dataclass
class PolicyUpdate:
    """``update(batch, selected)``: ``train.inner_epochs`` passes over the selected samples."""

    cfg: Config
    accelerator: Accelerator
    policy_loss: PolicyLoss
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: UpdateSchedule
    ema: LoraEMA | None

    def __call__(self, batch: UpdateBatch, selected: torch.Tensor) -> dict:
        t, acc = self.cfg.train, self.accelerator
        micro = t.train_batch_size
        n_micro = len(selected) // micro
        if n_micro == 0:  # every advantage is 0 on every process: nothing to learn this step
            return idle_statistics(self.schedule.lr)
        per_step = micro_batches_per_step(n_micro, t.optimizer_steps_per_epoch)
        # one optimizer step over one epoch: the policy is the rollout's at every micro-batch
        self.policy_loss.prepare(batch, on_policy=t.inner_epochs == 1 and per_step >= n_micro)
        stats = UpdateStatistics(self.policy_loss.reductions)
        grad_norms: list[float] = []
        skipped = 0
        lr_applied = self.schedule.lr
        # Train mode only matters for LoRA dropout (SD3 has no other): without it the policy stays
        # in eval mode, so compiled blocks never recompile on the flag and the update's forward
        # is the rollout's forward.
        self.policy_loss.models.policy.train(self.cfg.lora.dropout > 0)
        for epoch in range(t.inner_epochs):
            gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, batch.step, 11, epoch, acc.process_index))
            order = selected[torch.randperm(len(selected), generator=gen)]
            self.policy_loss.begin_epoch(epoch, gen)
            order = order.to(batch.traj.latents.device)
            for m in range(n_micro):
                last_of_step = (m + 1) % per_step == 0 or m == n_micro - 1
                passes = min(per_step, n_micro - (m // per_step) * per_step) * self.policy_loss.points_per_sample
                self._accumulate(batch, epoch, order[m * micro : (m + 1) * micro], passes, last_of_step, stats)
                if last_of_step:
                    lr_applied = self.schedule.lr  # the lr this optimizer step uses
                    grad_norms.append(self._optimizer_step())
                    skipped += not math.isfinite(grad_norms[-1])
        out = stats.reduced(acc, acc.device)
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)  # already global: the gradients are reduced
        out["skipped_updates"] = skipped
        out["optimizer_steps"] = len(grad_norms)
        out["samples_trained"] = len(selected) * acc.num_processes
        out["lr"] = lr_applied  # of the update's last optimizer step (not the next one's)
        return out

    def _accumulate(
        self,
        batch: UpdateBatch,
        epoch: int,
        rows: torch.Tensor,
        passes: int,
        last_of_step: bool,
        stats: UpdateStatistics,
    ) -> None:
        """Backward passes of one micro-batch, each its share of the step's mean; gradients sync
        across processes only in the step's very last backward."""
        points = self.policy_loss.points_per_sample
        for point in range(points):
            micro = MicroBatch(
                epoch=epoch,
                rows=rows,
                point=point,
                cond=batch.cond.index(rows),
                advantages=batch.advantages[rows.to(batch.advantages.device)],
            )
            sync = last_of_step and point == points - 1
            with nullcontext() if sync else self.accelerator.no_sync(self.policy_loss.models.policy):
                loss, values = self.policy_loss.loss(micro)
                self.accelerator.backward(loss / passes)
            stats.add(loss.detach(), values)

    def _optimizer_step(self) -> float:
        """Clip, then step (optimizer, lr schedule, EMA) unless the norm is not finite: an overflow
        is dropped, never applied to the LoRA. The norm is the one sync per optimizer step."""
        max_norm = self.cfg.train.max_grad_norm
        if max_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.params, max_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        value = float(norm)
        if math.isfinite(value):
            self.optimizer.step()
            self.schedule.step()
            if self.ema is not None:
                self.ema.update()
        self.optimizer.zero_grad(set_to_none=True)
        return value
