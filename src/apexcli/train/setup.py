"""Everything a training run is wired from, built in an order that fails early and cheaply:
launch checks and the run directory plan, then the rewards (an unknown objective stops the run
before any model loads), the pipeline and text embeddings, evaluation, the LoRA and its
optimizer, and last the resumed state. The order is also the order of the global RNG draws
(reward models, LoRA initialisation), so it is part of a run's reproducibility."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from apexcli.backbones import backbone_of_pipeline
from apexcli.balance import build_balancer_from_config
from apexcli.balance.base import Balancer
from apexcli.config import Config, config_to_dict, experimental_settings, trained_steps
from apexcli.doctor import preflight
from apexcli.errors import ApexError
from apexcli.eval.evaluator import Evaluator
from apexcli.flow.rollout import PromptEmbeds, unwrap_model
from apexcli.models.loading import compile_transformer_blocks, load_pipeline, resolve_device
from apexcli.models.lora import adapter_layers, attach_lora, load_lora_into_adapter
from apexcli.models.sources import BUILT_IN
from apexcli.models.text_cache import (
    TextEmbeddingCache,
    encode_prompts,
    encoder_fingerprint,
    free_text_encoders,
    move_text_encoders,
)
from apexcli.prompts import load_prompts
from apexcli.recipes import RECIPE_PRESETS, foreign_recipe_settings
from apexcli.rewards import RewardSuite
from apexcli.rewards.registry import reward_class
from apexcli.rewards.suite import union_objectives
from apexcli.runs import RunDir, RunLock
from apexcli.schema import flatten_dict
from apexcli.sharding import is_sharded, load_optimizer_state_by_name
from apexcli.train.checkpoint import TrainingState
from apexcli.train.ema import LoraEMA
from apexcli.train.layout import check_shards, note_ema_delay, optimizer_steps_per_update, warn_single_process_launch
from apexcli.train.losses import PolicyLoss, PolicyModels, build_policy_loss
from apexcli.train.lr_schedule import UpdateSchedule
from apexcli.train.probes import GradientProbe, ProgressProbe
from apexcli.train.rollouts import ShardSampler
from apexcli.train.run_start import (
    StartPlan,
    abandon_after,
    check_out_path,
    ensure_writable,
    plan_start,
    prepare_directory,
    warn,
)
from apexcli.train.update import PolicyUpdate


class Conditioning(NamedTuple):
    text_cache: TextEmbeddingCache
    embeds: PromptEmbeds
    """Every training prompt's embedding, on the CPU (rows move to the device per micro-batch)."""
    uncond: PromptEmbeds
    """The negative prompt's, on the device."""


class Lora(NamedTuple):
    vae: torch.nn.Module
    transformer: torch.nn.Module
    """Prepared by accelerate (DDP or FSDP wrapper, or the model itself)."""
    optimizer: Any
    """accelerate's wrapper of the AdamW over the LoRA parameters."""
    lr_schedule: UpdateSchedule
    lora_params: list[torch.nn.Parameter]
    """The trainable parameters of the prepared model (DTensor shards under FSDP2)."""
    sharded: bool
    adapter_layers: list[torch.nn.Module]
    ema: LoraEMA | None


@dataclass
class TrainingParts:
    """What ``Trainer`` trains with (it takes these as its attributes)."""

    accelerator: Accelerator
    device: torch.device
    start: StartPlan
    step: int
    """0, or the step of the checkpoint resumed from."""
    reward_models: RewardSuite
    """Every reward model of the run, loaded once; closing it releases them."""
    suite: RewardSuite
    """The trained objectives' view of ``reward_models``."""
    objectives: list[str]
    balancer: Balancer
    prompts: list[str]
    pipe: Any
    scheduler: Any
    vae_scale_factor: int
    text_cache: TextEmbeddingCache
    embeds: PromptEmbeds
    uncond: PromptEmbeds
    evaluator: Evaluator | None
    progress_probe: ProgressProbe | None
    vae: torch.nn.Module
    transformer: torch.nn.Module
    optimizer: Any
    lr_schedule: UpdateSchedule
    lora_params: list[torch.nn.Parameter]
    sharded: bool
    adapter_layers: list[torch.nn.Module]
    ema: LoraEMA | None
    steps_trained: list[int]
    policy_loss: PolicyLoss
    sampler: ShardSampler
    update: PolicyUpdate
    gradient_probe: GradientProbe
    run_lock: RunLock | None = None


def set_up(cfg: Config, run: RunDir, *, resume: str | None, overwrite: bool, argv: list[str]) -> TrainingParts:
    """Build the run's parts, restore a checkpoint, and open the run directory. On any failure
    the run folder's lock and the reward models are released before the error propagates."""
    lock = RunLock(run)
    reward_models = None
    try:
        accelerator, start = _launch(cfg, run, resume=resume, overwrite=overwrite, lock=lock)
        # Rewards first: an unknown objective fails before any model is loaded. One suite holds
        # every reward model the run uses; training, eval and the progress probe take views of it.
        eval_objectives = list(cfg.eval.objectives or cfg.objectives) if cfg.eval.every > 0 else []
        reward_models = RewardSuite(
            union_objectives(cfg.objectives, eval_objectives), device=accelerator.device, config=cfg.rewards
        )
        parts = _build(cfg, accelerator, start, reward_models, eval_objectives)
        if start.checkpoint is not None:
            parts.step = restore(parts, cfg, start.checkpoint, start.state)
        _open_run(cfg, run, parts, argv)
    except BaseException:
        if reward_models is not None:
            reward_models.close()
        lock.release()
        raise
    parts.run_lock = lock
    return parts


def _launch(
    cfg: Config, run: RunDir, *, resume: str | None, overwrite: bool, lock: RunLock
) -> tuple[Accelerator, StartPlan]:
    """The accelerator, the layout checks and apex doctor's, the run folder's lock (the main
    process holds it for the whole run: a second writer fails at once), then the plan for the
    run directory (refuse to clobber a run; read the resume checkpoint in full), all before any
    model loads."""
    device = resolve_device(cfg.model.device)
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(device)  # single process on cuda:N; launchers set it per rank
    trackers = None if cfg.logging.tracker == "none" else cfg.logging.tracker
    _check_tracker_installed(trackers)
    acc = Accelerator(cpu=device.type == "cpu", log_with=trackers, project_dir=str(run.path))
    layout = check_shards(cfg, acc.num_processes)
    preflight(cfg)  # apex doctor's checks: the first failing one stops the run before anything heavy loads
    if acc.is_main_process:
        check_out_path(run.path)
        lock.acquire()  # before the plan: two starts can no longer both pass its checks
    start = plan_start(run, cfg, resume=resume, overwrite=overwrite, verbose=acc.is_main_process)
    if acc.is_main_process:  # announced once the run can start: a start-up error stays the only line
        ensure_writable(run.path)
        print(f"apex: {layout}", file=sys.stderr)
        experimental = experimental_settings(cfg)
        if experimental:
            warn(f"experimental settings: {', '.join(experimental)} (docs/method/extensions.md)")
        warn_single_process_launch(acc.num_processes)
        note_ema_delay(cfg, optimizer_steps_per_update(cfg, acc.num_processes))
    set_seed(cfg.seed)
    if acc.device.type == "cpu" and cfg.model.dtype != "float32" and acc.is_main_process:
        # Allowed (it exercises the GPU dtype paths on a CPU), but rarely what a user wants.
        print(
            f"note: model.dtype={cfg.model.dtype} on CPU is slow unless the CPU has bf16 units; "
            "model.dtype=float32 is the CPU default",
            file=sys.stderr,
        )
    return acc, start


def _build(
    cfg: Config, acc: Accelerator, start: StartPlan, reward_models: RewardSuite, eval_objectives: list[str]
) -> TrainingParts:
    """Objectives and prompts (checked against each other), the pipeline, text, evaluation and
    the LoRA, then what trains it: the policy loss, the update loop, sampler and probe."""
    device = acc.device
    suite = reward_models.view(cfg.objectives)
    objectives = suite.objectives
    balancer = build_balancer_from_config(cfg.balance, objectives)
    prompts = load_prompts(cfg.prompts.train)
    _check_objectives_apply(suite, prompts, cfg.prompts.train)
    pipe = load_pipeline(cfg.model)
    family = backbone_of_pipeline(pipe)
    family.check_true_cfg(cfg.sampling.true_cfg_scale, "sampling.true_cfg_scale")
    family.check_true_cfg(cfg.eval.true_cfg_scale, "eval.true_cfg_scale")
    _warn_foreign_recipe(cfg, family, acc.is_main_process)
    text = _encode(cfg, pipe, prompts, device)
    evaluator = progress_probe = None
    if cfg.eval.every > 0:
        evaluator = Evaluator(
            cfg,
            pipe,
            text.text_cache,
            objectives,
            device=device,
            accelerator=acc,
            suite=reward_models.view(eval_objectives),
        )
    if balancer.wants_progress(0):  # a balancer that wants progress at all wants it at the first step
        progress_probe = ProgressProbe(
            cfg, pipe, text.text_cache, objectives, prompts, device=device, accelerator=acc, suite=suite
        )
    if acc.is_main_process:
        if evaluator is not None:
            _warn_unscored(evaluator.suite, evaluator.prompts, f"the evaluation (prompts.eval={cfg.prompts.eval})")
        if progress_probe is not None:
            _warn_unscored(
                progress_probe.suite,
                progress_probe.evaluator.prompts,
                f"the progress probe (balance.experimental.progress_prompts={cfg.balance.experimental.progress_prompts})",
            )
    if cfg.model.free_text_encoders:
        free_text_encoders(pipe)
    lora = _lora(cfg, pipe, acc)
    steps_trained = trained_steps(cfg)
    models = PolicyModels(
        policy=lora.transformer,
        reference=unwrap_model(lora.transformer),
        adapters=lora.adapter_layers,
        guidance_scale=cfg.sampling.guidance_scale,
        uncond=text.uncond,
        true_cfg_scale=cfg.sampling.true_cfg_scale,
    )
    policy_loss = build_policy_loss(cfg, models, steps_trained)
    return TrainingParts(
        accelerator=acc,
        device=device,
        start=start,
        step=0,
        reward_models=reward_models,
        suite=suite,
        objectives=objectives,
        balancer=balancer,
        prompts=prompts,
        pipe=pipe,
        scheduler=pipe.scheduler,
        vae_scale_factor=pipe.vae_scale_factor,
        **text._asdict(),
        evaluator=evaluator,
        progress_probe=progress_probe,
        **lora._asdict(),
        steps_trained=steps_trained,
        policy_loss=policy_loss,
        sampler=ShardSampler(
            cfg,
            lora.transformer,
            pipe.scheduler,
            lora.vae,
            pipe.vae_scale_factor,
            prompts,
            text.embeds,
            text.uncond,
            suite,
            steps_trained,
            device,
        ),
        update=PolicyUpdate(cfg, acc, policy_loss, lora.lora_params, lora.optimizer, lora.lr_schedule, lora.ema),
        gradient_probe=GradientProbe(
            cfg, policy_loss, unwrap_model(lora.transformer), lora.lora_params, acc, sharded=lora.sharded
        ),
    )


def _check_objectives_apply(suite: RewardSuite, prompts: list[str], prompts_spec: str) -> None:
    """An objective whose reward applies to none of the training prompts is NaN on every sample
    and never trains: an error naming the objective and what its prompts need."""
    applies = suite.applies(prompts)
    for k, key in enumerate(suite.objectives):
        if not applies[:, k].any():
            reward = reward_class(key)
            raise ApexError(
                f"objective '{key}' needs {reward.prompt_requirement}, and prompts.train={prompts_spec} has none; "
                f"use {reward.prompt_fix}"
            )


def _warn_foreign_recipe(cfg: Config, family, main_process: bool) -> None:
    """One line when a released model trains with another family's recipe values (a FLUX model
    given the SD3 defaults); the built-in test pipelines have no recipe of their own."""
    if not main_process or cfg.model.pretrained in BUILT_IN:
        return
    foreign = foreign_recipe_settings(cfg, family)
    if foreign:
        preset = RECIPE_PRESETS[family.family]
        warn(
            f"a {family.family} model with another family's recipe values: {'; '.join(foreign)}; "
            f"--preset {preset} (or base: {preset} in a config file) trains its own recipe"
        )


def _warn_unscored(suite: RewardSuite, prompts: list[str], what: str) -> None:
    """The same for an evaluation: allowed (it may score other objectives), but worth a line."""
    applies = suite.applies(prompts)
    for k, key in enumerate(suite.objectives):
        if not applies[:, k].any():
            warn(
                f"objective '{key}' applies to none of the {len(prompts)} prompts of {what}, so its scores there are "
                f"NaN; it needs {reward_class(key).prompt_requirement}"
            )


def _encode(cfg: Config, pipe, prompts: list[str], device: torch.device) -> Conditioning:
    """Every prompt through the text encoders once (or from the on-disk cache)."""
    move_text_encoders(pipe, device)
    cache = TextEmbeddingCache(cfg.model.text_cache_dir, encoder_fingerprint(pipe))
    seq = cfg.model.max_sequence_length
    embeds = encode_prompts(pipe, prompts, max_sequence_length=seq, device="cpu", cache=cache)
    uncond = encode_prompts(pipe, [cfg.sampling.negative_prompt], max_sequence_length=seq, device=device, cache=cache)
    return Conditioning(cache, embeds, uncond)


def _lora(cfg: Config, pipe, acc: Accelerator) -> Lora:
    """The LoRA on the transformer, its AdamW and lr schedule, prepared by accelerate."""
    device = acc.device
    vae = pipe.vae.to(device)
    vae.requires_grad_(False)
    transformer = pipe.transformer.to(device)
    params = attach_lora(
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
        params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay, eps=t.adam_eps
    )
    schedule = UpdateSchedule(optimizer, t)
    transformer, optimizer = acc.prepare(transformer, optimizer)
    # FSDP2 replaces every parameter by a DTensor shard: from here on, the trainable ones are
    # the prepared model's (the same objects as before under DDP or one process)
    params = [p for p in unwrap_model(transformer).parameters() if p.requires_grad]
    ema = LoraEMA(params, t.ema_decay, every=t.ema_every, warmup=t.ema_warmup) if t.ema_decay > 0 else None
    return Lora(
        vae,
        transformer,
        optimizer,
        schedule,
        params,
        is_sharded(params),
        adapter_layers(unwrap_model(transformer)),
        ema,
    )


def restore(parts: TrainingParts, cfg: Config, checkpoint: Path, state: TrainingState) -> int:
    """Load the checkpoint's LoRA, optimizer, schedule, balancer, EMA and RNG; returns its step.

    The restored optimizer and scheduler state carry the checkpoint's lr, betas, eps and weight
    decay; a resumed run uses the config's (what config.yaml records), by the scheduler's own
    formula, so an unchanged config resumes bit for bit."""
    model = unwrap_model(parts.transformer)  # state was read on the CPU; each loader places its piece
    load_lora_into_adapter(model, checkpoint)
    load_optimizer_state_by_name(model, parts.optimizer.optimizer, state.optimizer)
    parts.lr_schedule.load_state_dict(state.lr_scheduler)
    t = cfg.train
    for group in parts.optimizer.optimizer.param_groups:
        group.update(initial_lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    parts.balancer.load_state_dict(state.balancer)
    if parts.ema is not None and state.ema is not None:
        parts.ema.load_state_dict(state.ema)
        parts.ema.decay = t.ema_decay  # the config's, as config.yaml records
    torch.set_rng_state(state.rng["torch"].cpu())  # loaded onto the device; the CPU generator needs a CPU ByteTensor
    if parts.accelerator.is_main_process:
        print(f"resumed from {checkpoint} at step {state.step}", file=sys.stderr)
    return state.step


def _open_run(cfg: Config, run: RunDir, parts: TrainingParts, argv: list[str]) -> None:
    """Once every process has read the checkpoint: the directory, its config and command, and
    the trackers."""
    acc = parts.accelerator
    acc.wait_for_everyone()  # every process has read the checkpoint before files move
    if acc.is_main_process:
        prepare_directory(run, parts.start)
        run.create()
        run.write_marker()  # the folder is apex's own: --overwrite, --resume and pruning act only on such
        run.write_config(config_to_dict(cfg))
        run.append_command(argv)
        if parts.start.checkpoint is not None:
            abandon_after(run, parts.step)
    if acc.log_with:
        acc.init_trackers(cfg.name or run.path.name, config=_tracker_config(cfg))
    acc.wait_for_everyone()


def _check_tracker_installed(tracker: str | None) -> None:
    """accelerate drops a tracker whose package is missing with only a log warning (silenced
    by the CLI), so a run asked to log to tensorboard or wandb would log nowhere."""
    if tracker and importlib.util.find_spec(tracker) is None:
        raise ApexError(
            f"logging.tracker={tracker} needs the '{tracker}' package: pip install {tracker} (or apexcli[tracking])"
        )


def _tracker_config(cfg: Config) -> dict:
    """The config as one level of dotted keys with plain values, as trackers take it."""
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten_dict(config_to_dict(cfg)).items()
    }
