"""This process's rollouts of one update, scored in the background: the reward suite scores
micro-batch i (on a side CUDA stream on GPUs) while micro-batch i+1 samples."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from apexcli.config import Config
from apexcli.flow.rollout import PromptEmbeds, Trajectory, decode_latents, initial_noise, latent_channels, rollout
from apexcli.rewards import RewardSuite
from apexcli.seeds import mix_seed
from apexcli.train.sampler import StepBatch


def busy_seconds(submitted: list[float], done: list[float]) -> float:
    """Time the suite's single background worker spent scoring: jobs run in submission order,
    each starting when it was submitted or when the previous one finished, whichever is later."""
    busy, previous = 0.0, float("-inf")
    for start, end in zip(submitted, done):
        busy += end - max(start, previous)
        previous = end
    return busy


@dataclass
class ShardSampler:
    """``sampler(plan, step)`` -> (trajectories, rewards ``[n, K]`` of this process's samples, timings)."""

    cfg: Config
    transformer: torch.nn.Module
    scheduler: object
    vae: torch.nn.Module
    vae_scale_factor: int
    prompts: list[str]
    embeds: PromptEmbeds
    uncond: PromptEmbeds
    suite: RewardSuite
    steps_trained: list[int]
    device: torch.device

    def __call__(self, plan: StepBatch, step: int) -> tuple[list[Trajectory], torch.Tensor, dict[str, float]]:
        rb = self.cfg.train.rollout_batch_size
        trajectories, futures, timings = [], [], {"sample": 0.0}
        done_at: list[float] = []
        for start in range(plan.shard.start, plan.shard.stop, rb):
            idx = list(range(start, min(start + rb, plan.shard.stop)))
            t0 = time.perf_counter()
            traj = self._rollout(plan, idx, step, start)
            images = decode_latents(self.vae, traj.final)
            timings["sample"] += time.perf_counter() - t0
            prompts = [self.prompts[plan.prompt_ids[i]] for i in idx]
            future = self.suite.submit(images, prompts)
            future.add_done_callback(lambda _f, log=done_at: log.append(time.perf_counter()))
            futures.append((time.perf_counter(), future))
            trajectories.append(traj)
        t_wait = time.perf_counter()
        results = [f.result() for _, f in futures]
        timings["score_wait"] = time.perf_counter() - t_wait  # scoring not hidden behind sampling
        # a done-callback may still be running when result() returns: count its job as ending now
        done = sorted(done_at)[: len(futures)]
        done += [time.perf_counter()] * (len(futures) - len(done))
        timings["score"] = busy_seconds([t for t, _ in futures], done)
        rewards = torch.cat([r for r, _ in results]).float()
        return trajectories, rewards, timings

    def _rollout(self, plan: StepBatch, idx: list[int], step: int, start: int) -> Trajectory:
        """The samples ``idx``: noise from (seed, update, first index), shared per group if asked."""
        cfg, s = self.cfg, self.cfg.sampling
        res = cfg.model.resolution
        cond = self.embeds.index([plan.prompt_ids[i] for i in idx]).to(self.device)
        generator = torch.Generator(self.device).manual_seed(mix_seed(cfg.seed, step, start))
        noise = None
        if s.share_group_noise:
            latent = res // self.vae_scale_factor
            noise = initial_noise(
                len(idx),
                (latent_channels(self.transformer), latent, latent),
                group_ids=plan.group_ids[idx],
                share_within_group=True,
                seed=mix_seed(cfg.seed, step),
                device=self.device,
            )
        return rollout(
            self.transformer,
            self.scheduler,
            cond,
            num_steps=s.num_steps,
            height=res,
            width=res,
            vae_scale_factor=self.vae_scale_factor,
            guidance_scale=s.guidance_scale,
            uncond=self.uncond,
            true_cfg_scale=s.true_cfg_scale,
            sampler=s.sampler,
            noise_level=s.noise_level,
            noise_block=s.experimental.noise_block,
            sde_steps=self.steps_trained,
            initial_noise=noise,
            generator=generator,
        )
