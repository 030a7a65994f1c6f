"""The training loop: rollouts -> rewards -> balancer -> GRPO update, on accelerate.

One iteration (DESIGN.md §1):

1. ``plan_step`` picks the prompts and cuts the samples into per-process shards;
2. each process rolls out its shard in micro-batches (SDE steps keep latents and log-probs);
   every micro-batch is decoded and handed to the RewardSuite in the background, so scoring
   batch i overlaps sampling batch i+1;
3. rewards R [n, K] are gathered from all processes, and every process runs the (deterministic)
   balancer on the same global R, so advantages and balancer state agree everywhere;
4. PPO-clip updates on the trained steps (+ KL to the LoRA-disabled base), or with
   ``train.loss=nft`` negative-aware flow matching on the final samples, accumulated over
   micro-batches and steps, one optimizer step per ``gradient_accumulation`` micro-batches.

All randomness is derived from (seed, step, sample index), so a resumed run continues exactly as
an uninterrupted one, and the samples do not depend on how many processes share the work.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from apexcli.balance import build_balancer_from_config
from apexcli.balance.probe import gradient_gram, gradient_gram_by_backward, spread_over_groups
from apexcli.config import Config, config_to_dict, trained_steps
from apexcli.doctor import preflight
from apexcli.errors import ApexError
from apexcli.flow.rollout import (
    decode_latents,
    initial_noise,
    predict_velocity,
    rollout,
    step_log_prob,
    unwrap_model,
)
from apexcli.models.loading import (
    DTYPES,
    attention_kernels,
    compile_transformer_blocks,
    load_pipeline,
    resolve_device,
)
from apexcli.models.lora import adapter_layers, adapters_disabled, attach_lora, load_lora_into_adapter, save_lora
from apexcli.models.text_cache import (
    TextEmbeddingCache,
    encode_prompts,
    encoder_fingerprint,
    free_text_encoders,
    move_text_encoders,
)
from apexcli.prompts import load_prompts
from apexcli.rewards import RewardSuite
from apexcli.rewards.suite import union_objectives
from apexcli.rewards.ocr import ocr_target
from apexcli.runs import RunDir, reward_summary
from apexcli.sharding import full_state, is_sharded, load_optimizer_state_by_name, optimizer_state_by_name
from apexcli.train.checkpoint import TrainingState, save_checkpoint
from apexcli.train.run_start import abandon_after, ensure_writable, plan_start, prepare_directory, warn
from apexcli.train.ema import LoraEMA
from apexcli.train.lr_schedule import UpdateSchedule
from apexcli.train.loss import clip_advantages, grpo_policy_loss, nft_loss, nft_weight, step_kl, velocity_anchor
from apexcli.train.progress import TrainProgress
from apexcli.train.nft_points import NftPoints, draw_nft_points
from apexcli.train.sampler import mix_seed, plan_step
from apexcli.train.scope import not_on_text_mask


class Trainer:
    """``setup()`` -> ``train()`` -> ``close()``; ``save_checkpoint(step)`` at any time."""

    def __init__(self, cfg: Config, *, resume: str | None = None, argv: list[str] | None = None, overwrite: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.overwrite = overwrite
        self.argv = argv or sys.argv
        self.run = RunDir(Path(cfg.out))
        self.step = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        device = resolve_device(cfg.model.device)
        cpu = device.type == "cpu"
        if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            torch.cuda.set_device(device)  # single process on cuda:N; launchers set it per rank
        trackers = None if cfg.logging.tracker == "none" else cfg.logging.tracker
        _check_tracker_installed(trackers)
        self.accelerator = Accelerator(cpu=cpu, log_with=trackers, project_dir=str(self.run.path))
        acc = self.accelerator
        self.device = acc.device
        layout = _check_shards(cfg, acc.num_processes)
        preflight(cfg)  # apex doctor's checks: the first failing one stops the run before anything heavy loads
        if acc.is_main_process:
            print(f"apex: {layout}", file=sys.stderr)
            _warn_single_process_launch(acc.num_processes)
            _note_ema_delay(cfg, _optimizer_steps_per_update(cfg, acc.num_processes))
        # before any model loads: refuse to clobber a run, read the resume checkpoint in full
        self.start = plan_start(self.run, cfg, resume=self.resume, overwrite=self.overwrite, verbose=acc.is_main_process)
        if acc.is_main_process:
            ensure_writable(self.run.path)
        set_seed(cfg.seed)
        self.dtype = DTYPES[cfg.model.dtype]
        if self.device.type == "cpu" and self.dtype != torch.float32 and acc.is_main_process:
            # Allowed (it exercises the GPU dtype paths on a CPU), but rarely what a user wants.
            print(f"note: model.dtype={cfg.model.dtype} on CPU is slow unless the CPU has bf16 units; "
                  "model.dtype=float32 is the CPU default", file=sys.stderr)

        # Rewards first: an unknown objective fails before any model is loaded. One suite holds
        # every reward model the run uses; training, eval and the progress probe take views of it.
        eval_objectives = list(cfg.eval.objectives or cfg.objectives) if cfg.eval.every > 0 else []
        self.reward_models = RewardSuite(union_objectives(cfg.objectives, eval_objectives), device=self.device,
                                         config=cfg.rewards)
        self.suite = self.reward_models.view(cfg.objectives)
        self.objectives = self.suite.objectives
        self.balancer = build_balancer_from_config(cfg.balance, self.objectives)
        self.prompts = load_prompts(cfg.prompts.train)
        if "ocr" in self.objectives and not any(ocr_target(p) for p in self.prompts):
            raise ApexError(
                f"objective 'ocr' needs prompts with quoted text (\"...\"), and prompts.train={cfg.prompts.train} "
                "has none; use prompts.train=builtin:mixed (or builtin:ocr, or your own file)"
            )

        self.text_mask = not_on_text_mask(self.prompts, self.objectives, cfg.balance.not_on_text)

        pipe = load_pipeline(cfg.model)
        self.vae_scale_factor = pipe.vae_scale_factor
        self.scheduler = pipe.scheduler
        move_text_encoders(pipe, self.device)
        cache = TextEmbeddingCache(cfg.model.text_cache_dir, encoder_fingerprint(pipe))
        seq = cfg.model.max_sequence_length
        self.embeds = encode_prompts(pipe, self.prompts, max_sequence_length=seq, device="cpu", cache=cache)
        self.uncond = encode_prompts(pipe, [cfg.sampling.negative_prompt], max_sequence_length=seq, device=self.device, cache=cache)
        self.evaluator = None
        if cfg.eval.every > 0:
            from apexcli.eval.evaluator import Evaluator

            self.evaluator = Evaluator(cfg, pipe, cache, self.objectives, device=self.device, accelerator=acc,
                                       suite=self.reward_models.view(eval_objectives))
        self.progress_probe = None
        # a balancer that wants progress at all wants it at the first step (step 0 is always due)
        if self.balancer.wants_progress(0):
            from apexcli.eval.evaluator import Evaluator

            # training prompts, not the eval set: weights tuned on eval scores would leave no held-out eval
            self.progress_probe = Evaluator(
                cfg, pipe, cache, self.objectives, device=self.device, accelerator=acc,
                prompts=spread_prompts(self.prompts, cfg.balance.progress_prompts),
                seed=mix_seed(cfg.seed, PROGRESS_NOISE_STREAM), suite=self.suite,
            )
        if cfg.model.free_text_encoders:
            free_text_encoders(pipe)
        self.text_cache = cache
        self.pipe = pipe

        self.vae = pipe.vae.to(self.device)
        self.vae.requires_grad_(False)
        transformer = pipe.transformer.to(self.device)
        self.lora_params = attach_lora(
            transformer,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            seed=cfg.seed,
            init=cfg.lora.init,
        )
        if cfg.model.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if cfg.model.compile:
            compile_transformer_blocks(transformer)
        t = cfg.train
        optimizer = torch.optim.AdamW(
            self.lora_params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay, eps=t.adam_eps
        )
        self.lr_schedule = UpdateSchedule(optimizer, t)
        self.transformer, self.optimizer = acc.prepare(transformer, optimizer)
        # FSDP2 replaces every parameter by a DTensor shard: from here on, the trainable ones are
        # the prepared model's (the same objects as before under DDP or one process)
        self.lora_params = [p for p in unwrap_model(self.transformer).parameters() if p.requires_grad]
        self.sharded = is_sharded(self.lora_params)
        self.adapter_layers = adapter_layers(unwrap_model(self.transformer))
        self.ema = LoraEMA(self.lora_params, t.ema_decay, every=t.ema_every, warmup=t.ema_warmup) if t.ema_decay > 0 else None

        self.steps_trained = trained_steps(cfg)
        self.nan_steps = [0] * len(self.objectives)  # steps where objective k had no finite reward
        checkpoint = self.start.checkpoint
        if checkpoint is not None:
            self._restore(checkpoint, self.start.state)
        acc.wait_for_everyone()  # every process has read the checkpoint before files move
        if acc.is_main_process:
            prepare_directory(self.run, self.start)
            self.run.create()
            self.run.write_config(config_to_dict(cfg))
            self.run.append_command(self.argv)
            if checkpoint is not None:
                abandon_after(self.run, self.step)
            elif self.run.metrics_path.exists():
                self.run.metrics_path.unlink()  # --resume auto before any checkpoint: the log restarts
        if trackers:
            acc.init_trackers(cfg.name or self.run.path.name, config=_flat(config_to_dict(cfg)))
        acc.wait_for_everyone()

    def _restore(self, checkpoint: Path, state: TrainingState) -> None:
        model = unwrap_model(self.transformer)  # state was read on the CPU; each loader places its piece
        load_lora_into_adapter(model, checkpoint)
        load_optimizer_state_by_name(model, self.optimizer.optimizer, state.optimizer)
        self._apply_optimizer_config(state.lr_scheduler)
        self.balancer.load_state_dict(state.balancer)
        if self.ema is not None and state.ema is not None:
            self.ema.load_state_dict(state.ema)
            self.ema.decay = self.cfg.train.ema_decay  # the config's, as config.yaml records
        torch.set_rng_state(state.rng["torch"].cpu())  # loaded onto self.device; the CPU generator needs a CPU ByteTensor
        self.step = state.step
        if self.accelerator.is_main_process:
            print(f"resumed from {checkpoint} at step {self.step}", file=sys.stderr)

    def _apply_optimizer_config(self, scheduler_state: dict) -> None:
        """The restored optimizer and scheduler state carry the checkpoint's lr, betas, eps and
        weight decay; a resumed run uses the config's (what config.yaml records), same formula
        as the scheduler's so an unchanged config resumes bit for bit."""
        t = self.cfg.train
        self.lr_schedule.load_state_dict(scheduler_state)
        for group in self.optimizer.optimizer.param_groups:
            group.update(initial_lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)

    # ------------------------------------------------------------------ one iteration
    def _sample(self, plan) -> tuple[list, list[torch.Tensor], torch.Tensor, dict]:
        """Roll out this process's shard; rewards of each micro-batch scored in the background."""
        cfg, s = self.cfg, self.cfg.sampling
        rb = cfg.train.rollout_batch_size
        res = cfg.model.resolution
        trajectories, futures, timings = [], [], {"sample": 0.0}
        done_at: list[float] = []
        for start in range(plan.shard.start, plan.shard.stop, rb):
            idx = list(range(start, min(start + rb, plan.shard.stop)))
            cond = self.embeds.index([plan.prompt_ids[i] for i in idx]).to(self.device)
            generator = torch.Generator(self.device).manual_seed(mix_seed(cfg.seed, self.step, start))
            noise = None
            if s.share_group_noise:
                latent = res // self.vae_scale_factor
                noise = initial_noise(
                    len(idx),
                    (unwrap_model(self.transformer).config.in_channels, latent, latent),
                    group_ids=plan.group_ids[idx],
                    share_within_group=True,
                    seed=mix_seed(cfg.seed, self.step),
                    device=self.device,
                )
            t0 = time.perf_counter()
            traj = rollout(
                self.transformer,
                self.scheduler,
                cond,
                num_steps=s.num_steps,
                height=res,
                width=res,
                vae_scale_factor=self.vae_scale_factor,
                guidance_scale=s.guidance_scale,
                uncond=self.uncond,
                sampler=s.sampler,
                noise_level=s.noise_level,
                noise_block=s.noise_block,
                sde_steps=self.steps_trained,
                initial_noise=noise,
                generator=generator,
            )
            images = decode_latents(self.vae, traj.final)
            timings["sample"] += time.perf_counter() - t0
            prompts = [self.prompts[plan.prompt_ids[i]] for i in idx]
            # scored in the background (on a side CUDA stream on GPUs) while the next micro-batch samples
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
        timings["score"] = _busy_seconds([t for t, _ in futures], done)
        rewards = torch.cat([r for r, _ in results]).float()
        return trajectories, rewards, timings

    def _measure_progress(self) -> None:
        """apex's progress probe: the live policy on fixed training prompts and noise (ODE, eval
        settings); every rank hands the same means to its balancer."""
        with attention_kernels(self.cfg.model.attention):
            row = self.progress_probe.run(unwrap_model(self.transformer), self.vae, self.scheduler, self.vae_scale_factor,
                                          self.step, None, lockstep=self.sharded)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            row = broadcast_object_list([row])[0]  # only the main process gathered the scores
        mean = torch.tensor([row[f"eval/{k}/mean"] for k in self.objectives], dtype=torch.float64)
        std = torch.tensor([row[f"eval/{k}/std"] for k in self.objectives], dtype=torch.float64)
        self.balancer.set_progress_means(mean, std)

    def _probe(self, trajectories, per_objective_local: torch.Tensor, cond_ids: list[int], group_ids: torch.Tensor) -> None:
        """Per-objective policy gradients on a small sub-batch at one sampled step -> Gram [K, K]."""
        cfg = self.cfg
        rows = spread_over_groups(group_ids.tolist(), cfg.balance.probe_samples)
        traj = _cat_traj(trajectories).index(rows)
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, self.step, 7))
        t = self.steps_trained[int(torch.randint(len(self.steps_trained), (1,), generator=gen))]
        x, x_next, sigma, sigma_next = traj.transition(t)
        # the model without DDP's wrapper (its hooks expect one backward per forward); FSDP2
        # shards in place, so there this is the sharded model and its gathers still run
        model = unwrap_model(self.transformer)
        cond = self.embeds.index([cond_ids[i] for i in rows]).to(self.device)
        advantages = per_objective_local[rows].to(self.device)

        if cfg.train.loss == "nft":
            # the on-policy nft gradient per unit weight: 2 <v - target, grad v> (loss.nft_loss)
            # one point per sample, drawn as the update draws them (each sample its own group here)
            points = self._nft_points(traj, None, 1)
            every = torch.arange(len(traj), device=traj.latents.device)
            x_t, sigma_t, target = points.at(0, every, 0, traj.sigmas.to(traj.latents.device), traj.final)

            def terms() -> torch.Tensor:
                v = predict_velocity(model, x_t, sigma_t, cond, guidance_scale=cfg.sampling.guidance_scale,
                                     uncond=self.uncond)
                return 2.0 * ((v.detach() - target) * v).flatten(1).mean(dim=1)

            def weight(adv: torch.Tensor) -> torch.Tensor:
                return nft_weight(adv, cfg.train.nft_adv_scale)
        else:
            def terms() -> torch.Tensor:  # the importance ratio
                out = step_log_prob(
                    model, x, x_next, sigma, sigma_next, cond,
                    guidance_scale=cfg.sampling.guidance_scale, uncond=self.uncond,
                    **traj.step_options,
                )
                return torch.exp(out.log_prob - traj.log_probs[:, t])

            def weight(adv: torch.Tensor) -> torch.Tensor:
                return -adv

        if self.sharded:
            gram = gradient_gram_by_backward(
                lambda adv: (weight(adv) * terms()).mean(), advantages, self.lora_params,
                all_reduce_sum=lambda g: self.accelerator.reduce(g, reduction="sum"),
            )
        else:
            # the cross-rank mean of the per-objective gradients, so every rank gets the Gram of
            # the global gradients (a mean of per-rank Grams would not be)
            reduce = (lambda g: self.accelerator.reduce(g, reduction="mean")) if self.accelerator.num_processes > 1 else None
            if cfg.model.compile:  # compiled backward passes cannot share one retained graph
                gram = gradient_gram(lambda adv: (weight(adv) * terms()).mean(), advantages, self.lora_params,
                                     reduce=reduce, shared_graph=False)
            else:
                r = terms()  # one forward, K backward passes
                gram = gradient_gram(lambda adv: (weight(adv) * r).mean(), advantages, self.lora_params, reduce=reduce)
        self.balancer.set_gradient_gram(gram)

    def _update(self, trajectories, advantages: torch.Tensor, cond_ids: list[int],
                group_ids: torch.Tensor | None = None) -> dict:
        """The policy update on this process's samples; ``group_ids`` ``[n]`` (global group of each
        sample) lets ``train.loss=nft`` share its noise within a group (None: one group a sample)."""
        cfg, t = self.cfg, self.cfg.train
        acc = self.accelerator
        traj = _cat_traj(trajectories)
        n = len(traj)
        adv = clip_advantages(advantages.to(self.device), t.adv_clip)
        cond_all = self.embeds.index(cond_ids).to(self.device)
        window = torch.tensor(self.steps_trained)
        nft = t.loss == "nft"
        n_train_t = t.nft_timesteps if nft else max(1, int(math.ceil(len(window) * t.timestep_fraction)))
        micro = t.train_batch_size
        selected = self._selected_samples(advantages, micro)  # every sample, or those with A != 0
        n_micro = len(selected) // micro
        if n_micro == 0:  # every advantage is 0 on every process: nothing to learn this step
            return {"loss": 0.0, "kl": 0.0, "ratio_mean": 1.0, "clip_frac": 0.0, "ratio_max_dev": 0.0, "grad_norm": 0.0,
                    "skipped_updates": 0, "ratio_first": 1.0, "lr": self.lr_schedule.lr,
                    "optimizer_steps": 0, "samples_trained": 0}
        if t.optimizer_steps_per_epoch:
            per_update = -(-n_micro // min(t.optimizer_steps_per_epoch, n_micro))  # ceil: k updates, the last may be shorter
        else:
            per_update = t.gradient_accumulation or n_micro
        model_for_ref = unwrap_model(self.transformer)
        # Everything indexed per micro-batch lives on the device and statistics stay tensors until
        # the end: on a GPU each host-to-device copy or .item() would stall the CPU until the GPU
        # drains, and the next forward's kernels would then be launched onto an idle GPU.
        dev = traj.latents.device
        sigmas = traj.sigmas.to(dev)
        stats: dict[str, list[torch.Tensor]] = {"loss": [], "kl": [], "ratio_mean": [], "clip_frac": [], "anchor": [],
                                                "nft_flow_error": [], "nft_drift": []}
        if nft:
            points = self._nft_points(traj, group_ids, n_train_t)
            # one optimizer step over one epoch: the policy is the rollout's at every micro-batch
            on_policy = t.inner_epochs == 1 and per_update >= n_micro
            v_old = None if on_policy else self._nft_old_velocities(traj, points, cond_all)
        # steps outside the window (the last excepted: it only jumps to x0) for the anchor penalty
        outside = [i for i in range(traj.num_steps - 1) if i not in self.steps_trained] if t.anchor_beta > 0 else []
        ratio_dev: list[torch.Tensor] = []
        grad_norms: list[float] = []
        first_ratio = None
        skipped = 0
        lr_applied = self.lr_schedule.lr
        # Train mode only matters for LoRA dropout (SD3 has no other): without it the policy stays
        # in eval mode, so compiled blocks never recompile on the flag and the update's forward
        # is the rollout's forward.
        self.transformer.train(cfg.lora.dropout > 0)
        for epoch in range(t.inner_epochs):
            gen = torch.Generator().manual_seed(mix_seed(cfg.seed, self.step, 11, epoch, acc.process_index))
            order = selected[torch.randperm(len(selected), generator=gen)]
            # per sample, a random order of the window's steps; the first n_train_t are trained
            step_order = torch.stack([window[torch.randperm(len(window), generator=gen)] for _ in range(n)])
            order, step_order = order.to(dev), step_order.to(dev)
            for m in range(n_micro):
                rows = order[m * micro : (m + 1) * micro]
                last_micro_of_update = (m + 1) % per_update == 0 or m == n_micro - 1
                units = min(per_update, n_micro - (m // per_update) * per_update) * n_train_t
                for j in range(n_train_t):
                    cond = cond_all.index(rows)
                    sync = last_micro_of_update and j == n_train_t - 1
                    if nft:
                        x_t, sigma_t, target = points.at(epoch, rows, j, sigmas, traj.final)
                        with nullcontext() if sync else acc.no_sync(self.transformer):
                            guidance = dict(guidance_scale=cfg.sampling.guidance_scale, uncond=self.uncond)
                            v = predict_velocity(self.transformer, x_t, sigma_t, cond, **guidance)
                            result = nft_loss(v, v if v_old is None else v_old[epoch, j][rows], target,
                                              adv[rows.to(adv.device)], beta=t.nft_beta, adv_scale=t.nft_adv_scale)
                            loss = result.loss
                            if t.kl_beta > 0:
                                with torch.no_grad(), adapters_disabled(self.adapter_layers):
                                    v_ref = predict_velocity(model_for_ref, x_t, sigma_t, cond, **guidance)
                                kl = velocity_anchor(v, v_ref).mean()
                                stats["kl"].append(kl.detach())
                                loss = loss + t.kl_beta * kl
                            acc.backward(loss / units)
                        stats["nft_flow_error"].append(result.flow_error)
                        stats["nft_drift"].append(result.drift)
                        stats["loss"].append(loss.detach())
                        continue
                    ts = step_order[rows, j]
                    x, x_next = traj.latents[rows, ts], traj.latents[rows, ts + 1]
                    sigma, sigma_next = sigmas[ts], sigmas[ts + 1]
                    old_logp = traj.log_probs[rows, ts]
                    with nullcontext() if sync else acc.no_sync(self.transformer):
                        out = step_log_prob(
                            self.transformer, x, x_next, sigma, sigma_next, cond,
                            guidance_scale=cfg.sampling.guidance_scale, uncond=self.uncond,
                            **traj.step_options,
                        )
                        kl = None
                        if t.kl_beta > 0:
                            with torch.no_grad(), adapters_disabled(self.adapter_layers):
                                ref = step_log_prob(
                                    model_for_ref, x, x_next, sigma, sigma_next, cond,
                                    guidance_scale=cfg.sampling.guidance_scale, uncond=self.uncond,
                                    **traj.step_options,
                                )
                            kl = step_kl(out, ref, t.kl_form)
                        result = grpo_policy_loss(
                            out.log_prob, old_logp, adv[rows.to(adv.device)], clip_range=t.clip_range, kl=kl, kl_beta=t.kl_beta
                        )
                        loss = result.loss
                        if outside and j == 0:  # once per sample and micro-batch, in the same backward
                            anchor = self._anchor(traj, sigmas, rows, cond, outside, gen, model_for_ref)
                            stats["anchor"].append(anchor.detach())
                            # x n_train_t: weighed against the policy loss's mean over trained steps
                            loss = loss + t.anchor_beta * n_train_t * anchor
                        acc.backward(loss / units)
                    if first_ratio is None:
                        first_ratio = result.ratio_mean
                    for key in ("kl", "ratio_mean", "clip_frac"):
                        stats[key].append(getattr(result, key))
                    ratio_dev.append((out.log_prob.detach() - old_logp).exp().sub(1).abs().max())
                    stats["loss"].append(loss.detach())
                if last_micro_of_update:
                    if t.max_grad_norm > 0:
                        norm = acc.clip_grad_norm_(self.lora_params, t.max_grad_norm)
                    else:
                        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.lora_params if p.grad is not None]))
                    grad_norms.append(float(norm))  # the one sync per optimizer step: skip or apply
                    lr_applied = self.lr_schedule.lr  # the lr this optimizer step uses
                    if math.isfinite(grad_norms[-1]):
                        self.optimizer.step()
                        self.lr_schedule.step()
                        if self.ema is not None:
                            self.ema.update()
                    else:  # a non-finite gradient (overflow) is dropped, never applied to the LoRA
                        skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
        # one device-to-host copy for all of the update's statistics
        keys = [k for k, v in stats.items() if v]
        ratios = [first_ratio.double(), torch.stack(ratio_dev).double().max()] if ratio_dev else []
        means = torch.stack([torch.stack(stats[k]).double().mean() for k in keys] + ratios).tolist()
        out = dict(zip(keys, means[: len(keys)]))
        first_ratio, max_dev = means[len(keys):] if ratios else (None, None)
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        if acc.num_processes > 1:
            # every process trains as many micro-batches (equal shards), so the mean of the
            # per-process means is the mean over the global batch; grad_norm is already global
            keys = [k for k in ("loss", "kl", "ratio_mean", "clip_frac", "anchor", "nft_flow_error", "nft_drift") if k in out]
            local = torch.tensor([out[k] for k in keys], dtype=torch.float64, device=self.device)
            out.update(zip(keys, acc.reduce(local, reduction="mean").tolist()))
        if ratios:  # grpo: max |ratio - 1| over trained samples, > clip_range once updates go off-policy
            if acc.num_processes > 1:
                max_dev = float(acc.gather(torch.tensor([max_dev], dtype=torch.float64, device=self.device)).max())
            out["ratio_max_dev"] = max_dev
            out["ratio_first"] = first_ratio
        out["skipped_updates"] = skipped
        out["optimizer_steps"] = len(grad_norms)
        out["samples_trained"] = len(selected) * acc.num_processes
        out["lr"] = lr_applied  # of the iteration's last optimizer step (not the next one's)
        return out

    def _nft_points(self, traj, group_ids: torch.Tensor | None, points_per_sample: int) -> NftPoints:
        n = len(traj)
        return draw_nft_points(
            torch.arange(n) if group_ids is None else group_ids,
            seed=self.cfg.seed, step=self.step, epochs=self.cfg.train.inner_epochs, points_per_sample=points_per_sample,
            grid_steps=traj.num_steps, latent_shape=tuple(traj.final.shape[1:]), device=traj.latents.device,
        )

    @torch.no_grad()
    def _nft_old_velocities(self, traj, points: NftPoints, cond_all) -> torch.Tensor:
        """``[E, J, n, C, h, w]`` the rollout policy's velocity at every nft point, before any
        optimizer step moves it (the reference of nft's trust region)."""
        epochs, _, per_sample = points.steps.shape
        sigmas = traj.sigmas.to(traj.latents.device)
        micro = self.cfg.train.train_batch_size
        out = torch.empty(epochs, per_sample, *traj.final.shape, device=traj.latents.device)
        for e in range(epochs):
            for j in range(per_sample):
                for start in range(0, len(traj), micro):
                    rows = torch.arange(start, min(start + micro, len(traj)), device=traj.latents.device)
                    x_t, sigma_t, _ = points.at(e, rows, j, sigmas, traj.final)
                    out[e, j, rows] = predict_velocity(self.transformer, x_t, sigma_t, cond_all.index(rows),
                                                       guidance_scale=self.cfg.sampling.guidance_scale, uncond=self.uncond)
        return out

    def _anchor(self, traj, sigmas: torch.Tensor, rows: torch.Tensor, cond, outside: list[int], gen: torch.Generator,
                model_for_ref: torch.nn.Module) -> torch.Tensor:
        """Mean over the micro-batch of ``velocity_anchor`` at one random outside step per sample."""
        picks = torch.tensor(outside)[torch.randint(len(outside), (len(rows),), generator=gen)].to(rows.device)
        x, sigma = traj.latents[rows, picks], sigmas[picks]
        guidance = dict(guidance_scale=self.cfg.sampling.guidance_scale, uncond=self.uncond)
        v = predict_velocity(self.transformer, x, sigma, cond, **guidance)
        with torch.no_grad(), adapters_disabled(self.adapter_layers):
            v_ref = predict_velocity(model_for_ref, x, sigma, cond, **guidance)
        return velocity_anchor(v, v_ref).mean()

    def _selected_samples(self, advantages: torch.Tensor, micro: int) -> torch.Tensor:
        """Local sample indices to train on, a multiple of ``micro`` long.

        All of them, unless the balancer asks to drop zero-advantage samples (Flow-GRPO's
        ``static`` recipe: a flat group teaches nothing but would still pay KL and dilute the
        batch mean). Then the kept samples are padded with dropped ones up to whole
        micro-batches, and every process trains as many micro-batches as the fullest one (DDP
        needs the same number of backward passes everywhere), as Flow-GRPO pads to its batch count.
        """
        n = advantages.shape[0]
        every = torch.arange(n)
        if not getattr(self.balancer, "drops_zero_advantage", False):
            return every
        nonzero = (advantages != 0).cpu()
        kept, dropped = every[nonzero], every[~nonzero]
        n_micro = -(-len(kept) // micro)
        if self.accelerator.num_processes > 1:
            n_micro = int(self.accelerator.gather(torch.tensor([n_micro], device=self.device)).max())
        pad = n_micro * micro - len(kept)
        if pad > 0:
            gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, self.step, 13, self.accelerator.process_index))
            kept = torch.cat([kept, dropped[torch.randperm(len(dropped), generator=gen)[:pad]]])
        return kept

    def train_step(self) -> dict:
        cfg = self.cfg
        acc = self.accelerator
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
        progress_seconds = 0.0
        if self.progress_probe is not None and self.balancer.wants_progress(self.step - 1):
            t0 = time.perf_counter()
            self._measure_progress()
            progress_seconds = time.perf_counter() - t0
        self.transformer.eval()
        trajectories, rewards_local, timings = self._sample(plan)
        rewards = acc.gather(rewards_local.to(self.device)).cpu()  # [N, K] in global sample order
        # balance.not_on_text: those objectives sit out the prompts that quote text. Those NaN are
        # deliberate, so the reward-health count and the logged reward means read the raw rewards.
        trained = rewards
        if self.text_mask is not None:
            trained = rewards.masked_fill(self.text_mask[plan.prompt_ids], float("nan"))
        advantages, info = self.balancer(trained, plan.group_ids)
        for k, any_finite in enumerate(torch.isfinite(rewards).any(dim=0).tolist()):
            self.nan_steps[k] += not any_finite
        local_ids = [plan.prompt_ids[i] for i in range(plan.shard.start, plan.shard.stop)]
        row: dict = {"step": self.step, "kind": "train"}
        probe_seconds = 0.0
        if self.balancer.wants_probe(self.step - 1):  # 0-based iteration: probe at the first one
            t0 = time.perf_counter()
            self._probe(trajectories, info["per_objective"][plan.shard], local_ids, plan.group_ids[plan.shard])
            probe_seconds = time.perf_counter() - t0
        self.lr_schedule.begin_update(self.step)  # the lr of this update's optimizer steps
        t0 = time.perf_counter()
        update = self._update(trajectories, advantages[plan.shard], local_ids, plan.group_ids[plan.shard])
        train_seconds = time.perf_counter() - t0

        row.update(reward_summary(rewards, self.objectives, "reward"))
        row.update(info["metrics"])
        row["advantage/abs_mean"] = float(advantages.abs().mean())
        row["advantage/zero_frac"] = float((advantages == 0).double().mean())  # dropped when the balancer asks
        row.update(update)
        row["time/sample"] = timings["sample"]
        row["time/score"] = timings["score"]
        row["time/score_wait"] = timings["score_wait"]
        row["time/probe"] = probe_seconds
        row["time/progress_probe"] = progress_seconds
        row["time/train"] = train_seconds
        row["time/step"] = time.perf_counter() - t_start
        return row

    # ------------------------------------------------------------------ loop
    def train(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        main = acc.is_main_process
        progress = TrainProgress(total=cfg.train.steps, start=self.step, enabled=main and cfg.logging.progress, objectives=self.objectives)
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
                    acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None}, step=self.step)
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
                unwrap_model(self.transformer), self.vae, self.scheduler, self.vae_scale_factor, self.step, self.run,
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
        acc = getattr(self, "accelerator", None)
        if acc is not None and acc.log_with:
            acc.end_training()


def _check_tracker_installed(tracker: str | None) -> None:
    """accelerate drops a tracker whose package is missing with only a log warning (silenced
    by the CLI), so a run asked to log to tensorboard or wandb would log nowhere."""
    import importlib.util

    if tracker and importlib.util.find_spec(tracker) is None:
        raise ApexError(f"logging.tracker={tracker} needs the '{tracker}' package: pip install {tracker} (or apexcli[tracking])")


def _check_shards(cfg: Config, world_size: int) -> str:
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
    steps = _optimizer_steps_per_update(cfg, world_size)
    kind = "one process" if world_size == 1 else f"{world_size} processes"
    return (f"{kind}; {total} samples per update = {shard} per process in {micro} micro-batch(es) of "
            f"{t.train_batch_size}; {steps} optimizer step(s) per epoch")


def _warn_single_process_launch(world_size: int) -> None:
    """``accelerate launch --num_processes N`` without ``--multi_gpu`` (or a config saying so)
    starts ONE process, yet exports a rendezvous address as if for N: the run then trains on one
    GPU while its user believes it uses N. That combination is worth one line."""
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    if world_size == 1 and launched_by_accelerate and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        warn("accelerate launch started a single process although it was asked for several; add --multi_gpu "
             "(GPUs), or launch with `torchrun --nproc_per_node N -m apexcli train ...` (CPUs)")


def _optimizer_steps_per_update(cfg: Config, world_size: int) -> int:
    """Optimizer steps per epoch over the rollout batch (``_update``'s count, all samples kept)."""
    t = cfg.train
    micro = t.prompts_per_step * t.group_size // world_size // t.train_batch_size
    return t.optimizer_steps_per_epoch or -(-micro // (t.gradient_accumulation or micro))


def _note_ema_delay(cfg: Config, steps_per_update: int) -> None:
    """With ``ema_every`` > 1, evaluations read an EMA that only moves every few optimizer steps,
    so the first evals show the base model bit for bit. Said at start, so a short run that shows
    no change is not mistaken for one that did not learn."""
    t = cfg.train
    if t.ema_decay <= 0 or t.ema_every <= 1 or not cfg.eval.use_ema or cfg.eval.every <= 0:
        return
    first = -(-t.ema_every // (steps_per_update * t.inner_epochs))
    print(f"apex: eval uses the LoRA's EMA, updated every {t.ema_every} optimizer steps: evaluations before update "
          f"{first} show the base model (eval.use_ema=false evaluates the live LoRA)", file=sys.stderr)

def _busy_seconds(submitted: list[float], done: list[float]) -> float:
    """Time the suite's single background worker spent scoring: jobs run in submission order,
    each starting when it was submitted or when the previous one finished, whichever is later."""
    busy, previous = 0.0, float("-inf")
    for start, end in zip(submitted, done):
        busy += end - max(start, previous)
        previous = end
    return busy


PROGRESS_NOISE_STREAM = -17  # mix_seed(seed, -17): the progress probe's noise; steps are >= 0, so no rollout shares it


def spread_prompts(prompts: list[str], n: int) -> list[str]:
    """``n`` prompts evenly spaced over the list (all of them when it is shorter)."""
    if n >= len(prompts):
        return list(prompts)
    return [prompts[(i * len(prompts)) // n] for i in range(n)]


def _cat_traj(trajectories):
    if len(trajectories) == 1:
        return trajectories[0]
    from dataclasses import replace

    first = trajectories[0]
    return replace(
        first,
        latents=torch.cat([t.latents for t in trajectories]),
        log_probs=torch.cat([t.log_probs for t in trajectories]),
    )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def train(cfg: Config, *, resume: str | None = None, argv: list[str] | None = None, overwrite: bool = False) -> Path:
    """Run training as configured; returns the run directory."""
    trainer = Trainer(cfg, resume=resume, argv=argv, overwrite=overwrite)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.close()
