"""The training loop: rollouts -> rewards -> balancer -> policy update, on accelerate.

One iteration:

1. ``plan_step`` picks the prompts and cuts the samples into per-process shards;
2. each process rolls out its shard in micro-batches (SDE steps keep latents and log-probs);
   every micro-batch is decoded and handed to the RewardSuite in the background, so scoring
   batch i overlaps sampling batch i+1 (``rollouts``);
3. rewards R [n, K] are gathered from all processes, and every process runs the (deterministic)
   balancer on the same global R, so advantages and balancer state agree everywhere;
4. the policy loss of ``train.loss`` (``losses``: GRPO's PPO-clip, or nft's negative-aware flow
   matching) is accumulated over micro-batches, ``train.optimizer_steps_per_epoch`` optimizer
   steps per pass over the batch (``update``).

All randomness is derived from (seed, step, sample index), so a resumed run continues exactly as
an uninterrupted one, and the samples do not depend on how many processes share the work.
The wiring lives in ``setup``, the balancer's measurements in ``probes``.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import torch
import yaml

from apexcli.config import Config, config_to_dict
from apexcli.flow.rollout import Trajectory, unwrap_model
from apexcli.models.loading import attention_kernels
from apexcli.models.lora import save_lora
from apexcli.runs import RunDir, reward_summary
from apexcli.sharding import full_state, optimizer_state_by_name
from apexcli.train.checkpoint import TrainingState, save_checkpoint
from apexcli.train.layout import check_shards as _check_shards
from apexcli.train.loss import clip_advantages
from apexcli.train.losses import UpdateBatch
from apexcli.train.probes import PROGRESS_NOISE_STREAM, spread_prompts
from apexcli.train.progress import TrainProgress
from apexcli.train.rollouts import busy_seconds as _busy_seconds
from apexcli.train.run_start import NothingToTrain, warn
from apexcli.train.sampler import StepBatch, plan_step
from apexcli.train.setup import set_up
from apexcli.train.update import selected_samples

__all__ = ["PROGRESS_NOISE_STREAM", "Trainer", "_busy_seconds", "_check_shards", "spread_prompts", "train"]


class Trainer:
    """``setup()`` -> ``train()`` -> ``close()``; ``save_checkpoint()`` at any time."""

    def __init__(
        self, cfg: Config, *, resume: str | None = None, argv: list[str] | None = None, overwrite: bool = False
    ):
        self.cfg = cfg
        self.resume = resume
        self.overwrite = overwrite
        self.argv = argv or sys.argv
        self.run = RunDir(Path(cfg.out).expanduser())
        self.step = 0

    def setup(self) -> None:
        parts = set_up(self.cfg, self.run, resume=self.resume, overwrite=self.overwrite, argv=self.argv)
        for f in fields(parts):  # the parts are the trainer's attributes (tests and benchmarks read some)
            setattr(self, f.name, getattr(parts, f.name))
        self.nan_steps = [0] * len(self.objectives)  # steps where objective k had no finite reward

    # ------------------------------------------------------------------ one iteration
    def _sample(self, plan: StepBatch) -> tuple[list[Trajectory], torch.Tensor, dict]:
        """Roll out this process's shard; rewards of each micro-batch scored in the background."""
        return self.sampler(plan, self.step)

    def _measure_progress(self) -> None:
        mean, std = self.progress_probe(
            unwrap_model(self.transformer),
            self.vae,
            self.scheduler,
            self.vae_scale_factor,
            self.step,
            lockstep=self.sharded,
        )
        self.balancer.set_progress_means(mean, std)

    def _probe(
        self,
        trajectories: list[Trajectory],
        per_objective_local: torch.Tensor,
        cond_ids: list[int],
        group_ids: torch.Tensor,
    ) -> None:
        gram = self.gradient_probe(
            Trajectory.cat(trajectories), per_objective_local, self.embeds.index(cond_ids), group_ids, self.step
        )
        self.balancer.set_gradient_gram(gram)

    def _update(
        self,
        trajectories: list[Trajectory],
        advantages: torch.Tensor,
        cond_ids: list[int],
        group_ids: torch.Tensor | None = None,
    ) -> dict:
        """The policy update on this process's samples; ``group_ids`` ``[n]`` (global group of each
        sample) lets a loss share its noise within a group (None: one group a sample)."""
        traj = Trajectory.cat(trajectories)
        batch = UpdateBatch(
            traj=traj,
            sigmas=traj.sigmas.to(traj.latents.device),
            cond=self.embeds.index(cond_ids).to(self.device),
            advantages=clip_advantages(advantages.to(self.device), self.cfg.train.adv_clip),
            group_ids=group_ids,
            step=self.step,
        )
        return self.update(batch, self._selected_samples(advantages, self.cfg.train.train_batch_size))

    def _selected_samples(self, advantages: torch.Tensor, micro: int) -> torch.Tensor:
        """Every local sample, or (a balancer that drops zero advantages) those with A != 0."""
        acc = self.accelerator
        most = None
        if acc.num_processes > 1:
            most = lambda n: int(acc.gather(torch.tensor([n], device=self.device)).max())
        return selected_samples(
            advantages,
            micro,
            drop_zero=self.balancer.drops_zero_advantage,
            seed=self.cfg.seed,
            step=self.step,
            rank=acc.process_index,
            most_micro_batches=most,
        )

    def train_step(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        t_start = time.perf_counter()
        plan = plan_step(
            step=self.step,
            seed=cfg.seed,
            num_prompts=len(self.prompts),
            prompts_per_step=cfg.train.prompts_per_step,
            group_size=cfg.train.group_size,
            rank=acc.process_index,
            world_size=acc.num_processes,
        )
        seconds = {"progress_probe": 0.0, "probe": 0.0}
        if self.progress_probe is not None and self.balancer.wants_progress(self.step - 1):
            t0 = time.perf_counter()
            self._measure_progress()
            seconds["progress_probe"] = time.perf_counter() - t0
        self.transformer.eval()
        trajectories, rewards_local, timings = self._sample(plan)
        rewards = acc.gather(rewards_local.to(self.device)).cpu()  # [N, K] in global sample order
        advantages, info = self.balancer(rewards, plan.group_ids)
        for k, any_finite in enumerate(torch.isfinite(rewards).any(dim=0).tolist()):
            self.nan_steps[k] += not any_finite
        local_ids = [plan.prompt_ids[i] for i in range(plan.shard.start, plan.shard.stop)]
        if self.balancer.wants_probe(self.step - 1):  # 0-based iteration: probe at the first one
            t0 = time.perf_counter()
            self._probe(trajectories, info["per_objective"][plan.shard], local_ids, plan.group_ids[plan.shard])
            seconds["probe"] = time.perf_counter() - t0
        self.lr_schedule.begin_update(self.step)  # the lr of this update's optimizer steps
        t0 = time.perf_counter()
        update = self._update(trajectories, advantages[plan.shard], local_ids, plan.group_ids[plan.shard])
        seconds["train"] = time.perf_counter() - t0

        row: dict = {"step": self.step, "kind": "train"}
        row.update(reward_summary(rewards, self.objectives, "reward"))
        row.update(info["metrics"])
        row["advantage/abs_mean"] = float(advantages.abs().mean())
        row["advantage/zero_frac"] = float((advantages == 0).double().mean())  # dropped when the balancer asks
        row.update(update)
        row.update({f"time/{k}": timings[k] for k in ("sample", "score", "score_wait")})
        row.update({f"time/{k}": v for k, v in seconds.items()})
        row["time/step"] = time.perf_counter() - t_start
        return row

    # ------------------------------------------------------------------ loop
    def train(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        main = acc.is_main_process
        progress = TrainProgress(
            total=cfg.train.steps, start=self.step, enabled=main and cfg.logging.progress, objectives=self.objectives
        )
        first_step = self.step
        with progress:
            if self.evaluator is not None and self.step == 0:
                progress.phase("eval", self.step)
                self._evaluate()
            while self.step < cfg.train.steps:
                self.step += 1
                progress.phase("rollout", self.step)
                with attention_kernels(cfg.model.attention):
                    row = self.train_step()
                if main:
                    self.run.append_metrics(row)
                if acc.log_with:
                    acc.log(
                        {k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None}, step=self.step
                    )
                progress.advance(self.step, row)
                last = self.step == cfg.train.steps
                # evaluate before checkpointing: a resume from this checkpoint then never lacks
                # this step's eval row, and a crash in between re-runs both from the older one
                if self.evaluator is not None and (last or self.step % cfg.eval.every == 0):
                    progress.phase("eval", self.step)
                    self._evaluate()
                every = cfg.train.checkpoint_every
                if last or (every and self.step % every == 0):
                    progress.phase("checkpoint", self.step)
                    self.save_checkpoint()
            progress.phase("done", self.step)
        if main:
            self._warn_dead_objectives(steps_run=self.step - first_step)
        return self.run.path

    def _warn_dead_objectives(self, steps_run: int) -> None:
        """An objective that was NaN for every sample of every step never moved the policy: the
        run 'succeeded' without optimising it, which must not pass in silence."""
        for name, n in zip(self.objectives, self.nan_steps):
            if steps_run > 0 and n == steps_run:
                warn(
                    f"objective '{name}' gave no finite reward in any of the {steps_run} steps of this run (all NaN), "
                    "so it was never optimised; check the reward (its prompts, server or model) with apex score"
                )

    def _evaluate(self) -> None:
        ctx = self.ema.swapped_in() if (self.ema is not None and self.cfg.eval.use_ema) else nullcontext()
        with ctx, attention_kernels(self.cfg.model.attention):
            row = self.evaluator.run(
                unwrap_model(self.transformer),
                self.vae,
                self.scheduler,
                self.vae_scale_factor,
                self.step,
                self.run,
                lockstep=self.sharded,
            )
        if self.accelerator.is_main_process and row is not None:
            self.run.append_metrics(row)
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        model = unwrap_model(self.transformer)

        # Whole tensors first, on every rank: under FSDP2 each gather is a collective that all
        # ranks join; elsewhere the tensors already are whole and this only copies the LoRA.
        def lora_weights() -> dict[str, torch.Tensor]:
            return full_state((name, p) for name, p in model.named_parameters() if p.requires_grad)

        live = lora_weights()
        ema_weights = ema_state = None
        if self.ema is not None:
            with self.ema.swapped_in():
                ema_weights = lora_weights()
            ema_state = self.ema.state_dict()
        optimizer_state = optimizer_state_by_name(model, self.optimizer.optimizer)
        path = None
        if acc.is_main_process:
            state = TrainingState(
                step=self.step,
                optimizer=optimizer_state,
                lr_scheduler=self.lr_schedule.state_dict(),
                balancer=self.balancer.state_dict(),
                ema=ema_state,
                rng={"torch": torch.get_rng_state()},
            )
            path = save_checkpoint(
                self.run,
                self.step,
                save_lora=lambda d: save_lora(model, d, live),
                save_ema_lora=None if ema_weights is None else (lambda d: save_lora(model, d, ema_weights)),
                state=state,
                config_yaml=yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False),
                keep=self.cfg.train.keep_checkpoints,
            )
        acc.wait_for_everyone()
        return path

    def close(self) -> None:
        suite = getattr(self, "reward_models", None)
        if suite is not None:
            suite.close()
        lock = getattr(self, "run_lock", None)
        if lock is not None:
            lock.release()
        acc = getattr(self, "accelerator", None)
        if acc is not None and acc.log_with:
            acc.end_training()


def train(cfg: Config, *, resume: str | None = None, argv: list[str] | None = None, overwrite: bool = False) -> Path:
    """Run training as configured; returns the run directory."""
    trainer = Trainer(cfg, resume=resume, argv=argv, overwrite=overwrite)
    try:
        trainer.setup()
        return trainer.train()
    except NothingToTrain as done:
        print(str(done), file=sys.stderr)
        return trainer.run.path
    finally:
        trainer.close()
